"""``DispatchNorm``: ``nn.rms_norm`` and ``nn.layer_norm`` over the last axis onto our CUDA
kernel (:mod:`~relax_masked_attn.kernels.cuda_norm`)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.utils import BackendDispatcher
from tvm.relax.expr_functor import mutator

from .._ir import as_rows, mutate_functions
from ..kernels import cuda_norm

_KINDS = {"relax.nn.rms_norm": "rms", "relax.nn.layer_norm": "layer"}


def _last_axis_only(axes, ndim: int) -> bool:
    return len(axes) == 1 and int(axes[0]) in (-1, ndim - 1)


def _eps_tag(eps: float) -> str:
    """``eps`` in a symbol name: ``1e-06`` -> ``1em06``."""
    return f"{eps:.3g}".replace("-", "m").replace("+", "p").replace(".", "_")


@mutator
class _NormDispatcher(BackendDispatcher):
    """Each norm's target as TVM's dispatch rule gives it: x's vdevice, else the current one."""

    def _rewrite(self, call: relax.Call):
        kind = _KINDS[call.op.name]
        x = call.args[0]
        x_ty = x.ty
        if x_ty.shape is None or x_ty.ndim < 1:
            return None
        target = self._get_target(x_ty)
        if target.kind.name != "cuda" or not _last_axis_only(call.attrs.axes, x_ty.ndim):
            return None
        if kind == "layer" and not (call.attrs.center and call.attrs.scale):
            return None
        hidden = x_ty.shape.values[-1]
        dtype = x_ty.dtype.dtype
        params = call.args[1:]
        if not isinstance(hidden, tvm.tirx.IntImm) or not cuda_norm.supports(int(hidden), dtype):
            return None
        if any(p.ty.dtype.dtype != dtype or p.ty.ndim != 1 for p in params):
            return None
        hidden, eps = int(hidden), float(call.attrs.epsilon)
        name = f"zz_{kind}_norm_h{hidden}_{dtype}_e{_eps_tag(eps)}"
        func = cuda_norm.norm_kernel(kind, hidden, dtype, eps)
        gv = self.builder_.add_func(func.with_attr("global_symbol", name), name)
        x2 = as_rows(x)
        if not x2.same_as(x):
            x2 = self.builder_.emit(x2)
        rows = x2.ty.shape.values[0]
        out = self.builder_.emit(relax.call_tir(
            gv, [x2, *params], out_ty=relax.TensorType([rows, hidden], dtype)))
        return out if x2.same_as(x) else relax.op.reshape(out, x_ty.shape)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name in _KINDS:
            rewritten = self._rewrite(call)
            if rewritten is not None:
                return rewritten
        return call


@tvm.transform.module_pass(opt_level=0, name="DispatchNorm")
def dispatch_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Replace ``nn.rms_norm`` and ``nn.layer_norm`` (with weight and bias) over the last axis of
    a CUDA tensor (fp16, bf16 or fp32; the last dimension static, a multiple of 32) by
    ``call_tir`` of our one-warp-a-row kernel; other norms, and other targets, stay with TVM.
    Leading dimensions are flattened into rows (Qwen3's per-head ``q_norm`` of ``[t, heads, d]``
    runs as ``t * heads`` rows of ``d``). Alone, run it inside ``with target:``."""
    return mutate_functions(_NormDispatcher(mod), mod)
