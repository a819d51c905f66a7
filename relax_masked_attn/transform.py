"""Passes: legalize only ``masked_sequence_prefill``, and the ``relax_masked_attn`` pipeline."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .legalize import legalize
from .op import OP_NAME


@mutator
class _PrefillLegalizer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.op = tvm.ir.Op.get(OP_NAME)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.same_as(self.op):
            return legalize(self.builder_, call)
        return call

    def transform(self) -> tvm.IRModule:
        for gvar, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="LegalizeMaskedPrefill")
class LegalizeMaskedPrefill:
    """Replace every ``masked_sequence_prefill`` call by ``call_tir`` of the target's kernel.

    Leaves every other op alone, so it can stand anywhere in a ``tvm.transform.Sequential``
    before ``LegalizeOps``. The target is the tensors' vdevice, else ``Target.current()``::

        with tvm.target.Target("cuda"):
            mod = LegalizeMaskedPrefill()(mod)
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _PrefillLegalizer(mod).transform()


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


PIPELINE_NAME = "relax_masked_attn"


def pipeline_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The target's default build passes, with our legalization first and, before every dlight
    scheduling pass, :func:`disable_dlight_tensorize`."""
    import importlib

    kind = target.kind.name
    backend = {"cuda": "cuda", "rocm": "rocm", "llvm": "cpu_generic"}.get(kind, "gpu_generic")
    if backend == "gpu_generic" and "gpu" not in target.keys:
        raise ValueError(f"relax_masked_attn pipeline: unsupported target kind {kind!r}")
    rp = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    passes = [LegalizeMaskedPrefill(), *rp.library_dispatch_passes(target)]
    for p in rp.legalize_passes(target):
        if p.info.name == "ApplyDefaultSchedule":
            passes.append(disable_dlight_tensorize)
        passes.append(p)
    return passes + [*rp.dataflow_lower_passes(target), *rp.finalize_passes(target)]


def _pipeline(target: tvm.target.Target | str | None = None, **_kwargs) -> tvm.transform.Pass:
    """``tvm.compile(mod, target, relax_pipeline=relax.get_pipeline("relax_masked_attn"))``."""

    @tvm.transform.module_pass(opt_level=0, name="relax_masked_attn_pipeline")
    def run(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        tgt = tvm.target.Target(target) if target is not None else tvm.target.Target.current()
        if tgt is None:
            raise ValueError("relax_masked_attn pipeline: no target (pass one to tvm.compile)")
        with tgt:
            return tvm.transform.Sequential(pipeline_passes(tgt))(mod)

    return run


if PIPELINE_NAME not in relax.pipeline.PIPELINE_MAP:
    relax.register_pipeline(PIPELINE_NAME)(_pipeline)


from .fuse_attention import FuseMaskedAttention, fuse_masked_attention  # noqa: E402

__all__ = [
    "FuseMaskedAttention",
    "LegalizeMaskedPrefill",
    "disable_dlight_tensorize",
    "fuse_masked_attention",
    "pipeline_passes",
]
