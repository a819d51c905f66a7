"""``DisableDlightTensorize``: keep apache-tvm 0.27's dlight away from ``sch.tensorize``."""

from __future__ import annotations

import tvm


@tvm.transform.module_pass(opt_level=0, name="DisableDlightTensorize")
def disable_dlight_tensorize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark every PrimFunc ``dlight.do_not_tensorize``.

    apache-tvm 0.27's dlight tensor-core matmul rule calls ``sch.tensorize``, which segfaults
    in the PyPI wheel (any fp16 matmul on CUDA under the default pipeline kills the process).
    With the mark, dlight schedules those matmuls on CUDA cores instead.
    """
    out = tvm.IRModule()
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            func = func.with_attr("dlight.do_not_tensorize", True)
        out[gvar] = func
    return out.with_attrs(mod.attrs) if mod.attrs else out
