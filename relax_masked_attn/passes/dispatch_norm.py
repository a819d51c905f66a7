"""``DispatchNorm``: ``nn.rms_norm`` and ``nn.layer_norm`` over the last axis onto our CUDA
kernel (:mod:`~relax_masked_attn.kernels.cuda_norm`), an RMSNorm of attention heads together
with the rotary embedding that follows it."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.utils import BackendDispatcher
from tvm.relax.expr_functor import mutator

from .._ir import as_rows, is_call_of, mutate_functions
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
        name = _norm_name(kind, hidden, dtype, eps)
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


def _same_shape(dims, expected) -> bool:
    """Whether ``dims`` are provably ``expected`` (symbolic dimensions included)."""
    analyzer = tvm.sym.Analyzer()
    return len(dims) == len(expected) and all(
        analyzer.can_prove_equal(a, b) for a, b in zip(dims, expected))


def _norm_name(kind: str, hidden: int, dtype: str, eps: float) -> str:
    return f"zz_{kind}_norm_h{hidden}_{dtype}_e{_eps_tag(eps)}"


@mutator
class _NormRopeFuser(BackendDispatcher):
    """``rope(rms_norm(x))`` of :func:`~relax_masked_attn.models.common.rope`'s form (``x``
    ``[t, heads, d]``, the norm over ``d``): ``y4 * cos + flip(y4, axis=2) * sin`` of the norm's
    ``[t, heads, 2, d / 2]`` view ``y4`` is one call of the norm kernel with ``rope_heads``."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if is_call_of(call, "relax.add"):
            fused = self._fuse(call)
            if fused is not None:
                return fused
        return call

    def _bound(self, expr, op_name: str):
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return value if is_call_of(value, op_name) else None

    def _fuse(self, call: relax.Call):
        for plain, rotated in (call.args, call.args[::-1]):
            by_cos, by_sin = self._bound(plain, "relax.multiply"), self._bound(rotated,
                                                                               "relax.multiply")
            if by_cos is None or by_sin is None:
                continue
            (view, cos), (flipped, sin) = by_cos.args, by_sin.args
            flip = self._bound(flipped, "relax.flip")
            reshape = self._bound(view, "relax.reshape")
            norm = None if reshape is None else self._bound(reshape.args[0], "relax.nn.rms_norm")
            if flip is not None and flip.args[0].same_as(view) and norm is not None:
                fused = self._emit(norm, cos, sin, call, int(flip.attrs.axis))
                if fused is not None:
                    return fused
        return None

    def _emit(self, norm: relax.Call, cos, sin, call: relax.Call, flip_axis: int):
        x, weight = norm.args
        x_ty = x.ty
        if x_ty.shape is None or x_ty.ndim != 3 or flip_axis not in (2, -2):
            return None
        t, heads, d = x_ty.shape.values
        dtype = x_ty.dtype.dtype
        if (not all(isinstance(v, tvm.tirx.IntImm) for v in (heads, d))
                or self._get_target(x_ty).kind.name != "cuda"
                or not _last_axis_only(norm.attrs.axes, 3)
                or not cuda_norm.supports_rope(int(d), dtype)
                or weight.ty.dtype.dtype != dtype):
            return None
        heads, d = int(heads), int(d)
        half = d // 2
        table = [t, 1, 2, half]
        for tab in (cos, sin):
            if (tab.ty.shape is None or tab.ty.dtype.dtype != dtype
                    or not _same_shape(tab.ty.shape.values, table)):
                return None
        if call.ty.shape is None or not _same_shape(call.ty.shape.values, [t, heads, 2, half]):
            return None
        eps = float(norm.attrs.epsilon)
        name = _norm_name("rms", d, dtype, eps) + f"_rope{heads}"
        func = cuda_norm.norm_kernel("rms", d, dtype, eps, rope_heads=heads)
        gv = self.builder_.add_func(func.with_attr("global_symbol", name), name)
        x2 = self.builder_.emit(as_rows(x))  # [t * heads, d]
        args = [x2, weight,
                *(self.builder_.emit(relax.op.reshape(tab, [t, d])) for tab in (cos, sin))]
        out = self.builder_.emit(relax.call_tir(
            gv, args, out_ty=relax.TensorType([x2.ty.shape.values[0], d], dtype)))
        return relax.op.reshape(out, call.ty.shape)


@tvm.transform.module_pass(opt_level=0, name="DispatchNorm")
def dispatch_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Replace ``nn.rms_norm`` and ``nn.layer_norm`` (with weight and bias) over the last axis of
    a CUDA tensor (fp16, bf16 or fp32; the last dimension static, a multiple of 32) by
    ``call_tir`` of our one-warp-a-row kernel; other norms, and other targets, stay with TVM.
    Leading dimensions are flattened into rows (Qwen3's per-head ``q_norm`` of ``[t, heads, d]``
    runs as ``t * heads`` rows of ``d``). First, a per-head RMSNorm that only feeds the rotary
    embedding (:class:`_NormRopeFuser`) becomes one kernel that does both. Alone, run it inside
    ``with target:``."""
    mod = mutate_functions(_NormRopeFuser(mod), mod)
    for gvar, func in mod.functions_items():  # the fused norms' and ropes' own bindings
        if isinstance(func, relax.Function):
            mod[gvar] = relax.analysis.remove_all_unused(func)
    return mutate_functions(_NormDispatcher(mod), mod)
