"""Passes: legalize only ``masked_sequence_prefill``, and the ``relax_masked_attn`` pipeline."""

from __future__ import annotations

import collections
import dataclasses

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._ir import is_call_of
from .cpu_schedule import cpu_default_schedule
from .gpu_schedule import gpu_default_schedule
from .kernels import cpu_dense, cuda_dense
from .kernels.common import Epilogue
from .legalize import legalize
from .op import OP_NAME, PACKED_OP_NAME


def _mutate_functions(mutator: PyExprMutator, mod: tvm.IRModule, visit=None) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod`` (through ``visit``, default
    ``mutator.visit_expr``); PrimFuncs it adds are kept."""
    visit = visit or mutator.visit_expr
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, visit(func))
    return mutator.builder_.get()


@mutator
class _PrefillLegalizer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.ops = (tvm.ir.Op.get(OP_NAME), tvm.ir.Op.get(PACKED_OP_NAME))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and any(call.op.same_as(op) for op in self.ops):
            return legalize(self.builder_, call)
        return call


@tvm.transform.module_pass(opt_level=0, name="LegalizeMaskedPrefill")
class LegalizeMaskedPrefill:
    """Replace every ``masked_sequence_prefill`` and ``packed_sequence_prefill`` call by
    ``call_tir`` of the target's kernel.

    Leaves every other op alone, so it can stand anywhere in a ``tvm.transform.Sequential``
    before ``LegalizeOps``. The target is the tensors' vdevice, else ``Target.current()``::

        with tvm.target.Target("cuda"):
            mod = LegalizeMaskedPrefill()(mod)
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _mutate_functions(_PrefillLegalizer(mod), mod)


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


def _dense_kernel(target: tvm.target.Target, n: int, k: int, dtype: str, epilogue: Epilogue):
    """Our dense kernel for ``x[m, k] @ w[n, k].T`` with ``epilogue`` on ``target``, or None."""
    if target.kind.name == "llvm":
        if epilogue != Epilogue() or not cpu_dense.supports(n, k, dtype):
            return None
        return cpu_dense.dense_kernel(n, k, dtype)
    if not cuda_dense.supports(target, n, k, dtype):
        return None
    if cuda_dense.has_wgmma(target):
        return cuda_dense.wgmma_dense_kernel(n, k, dtype, epilogue)
    return cuda_dense.dense_kernel(n, k, dtype, epilogue)


@dataclasses.dataclass(frozen=True)
class _Product:
    """One call of our dense kernel: ``x2 [rows, k] @ w.T`` then the epilogue's steps."""

    x2: relax.Expr
    w: relax.Expr
    lead: list  # x's leading dims; the call's output [rows, n] is reshaped to [*lead, n]
    n: int
    k: int
    dtype: str
    bias: relax.Expr | None = None
    activation: str | None = None
    residual: relax.Expr | None = None  # [rows, n]

    @property
    def epilogue(self) -> Epilogue:
        return Epilogue(self.bias is not None, self.activation, self.residual is not None)


_ACTIVATION_OPS = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh"}


def _use_counts(func: relax.Function) -> collections.Counter:
    """How many times each variable of ``func`` is used."""
    counts = collections.Counter()

    @relax.expr_functor.visitor
    class _Counter(relax.PyExprVisitor):
        def visit_var_(self, var):
            counts[var] += 1

        def visit_dataflow_var_(self, var):
            counts[var] += 1

    _Counter().visit_expr(func)
    return counts


@mutator
class _DenseDispatcher(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target
        self.products = {}  # our kernel call's output var -> _Product
        self.kernel_names = set()
        self.uses = collections.Counter()  # of the function being visited, before rewriting

    def visit_function(self, func: relax.Function) -> relax.Expr:
        self.uses = _use_counts(func)
        return self.visit_expr(func)

    def _linear(self, call: relax.Call):
        """A :class:`_Product` when ``call`` is ``matmul(x, permute_dims(w))`` with a static
        ``[n, k]`` ``w`` of x's dtype; else None."""
        if not is_call_of(call, "relax.matmul"):
            return None
        x, wt = call.args
        binding = self.lookup_binding(wt) if isinstance(wt, relax.Var) else wt
        if not is_call_of(binding, "relax.permute_dims"):
            return None
        axes = binding.attrs.axes
        w = binding.args[0]
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        x_ty, w_ty = x.ty, w.ty
        if w_ty.ndim != 2 or x_ty.ndim < 2 or x_ty.shape is None or w_ty.shape is None:
            return None
        n, k = w_ty.shape.values
        last = x_ty.shape.values[-1]
        if not all(isinstance(v, tvm.tirx.IntImm) for v in (n, k, last)):
            return None
        if w_ty.dtype.dtype != x_ty.dtype.dtype or int(last) != int(k):
            return None
        out_dtype = call.attrs.out_dtype
        if out_dtype is not None and str(out_dtype) not in ("", "void", x_ty.dtype.dtype):
            return None  # accumulates into another dtype: not what our kernels write
        lead = list(x_ty.shape.values[:-1])
        rows = lead[0]
        for dim in lead[1:]:
            rows = rows * dim
        x2 = x if len(lead) == 1 else relax.op.reshape(x, [rows, int(k)])
        return _Product(x2, w, lead, int(n), int(k), x_ty.dtype.dtype)

    def _emit(self, product: _Product):
        """Emit our kernel's call for ``product`` (None when no kernel serves it)."""
        epilogue = product.epilogue
        func = _dense_kernel(self.target, product.n, product.k, product.dtype, epilogue)
        if func is None:
            return None
        name = f"zz_dense{epilogue.name}_n{product.n}_k{product.k}_{product.dtype}"
        func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
        gv = self.builder_.add_func(func, name)
        self.kernel_names.add(name)
        x2 = product.x2
        if not isinstance(x2, relax.Var):
            x2 = self.builder_.emit(x2)
            product = dataclasses.replace(product, x2=x2)
        args = [x2, product.w, *(e for e in (product.bias, product.residual) if e is not None)]
        rows = x2.ty.shape.values[0]
        out = self.builder_.emit(
            relax.call_tir(gv, args, out_ty=relax.TensorType([rows, product.n], product.dtype))
        )
        self.products[out] = product
        return out if len(product.lead) == 1 else relax.op.reshape(out, [*product.lead, product.n])

    def _product_of(self, var, original) -> _Product | None:
        """The product whose output ``var`` is (through a reshape or aliases), when ``original``
        (the same value before rewriting) has no other use; else None."""
        if not isinstance(var, relax.Var) or self.uses[original] != 1:
            return None
        out = var if var in self.products else self.lookup_binding(var)
        if is_call_of(out, "relax.reshape"):
            out = out.args[0]
        while isinstance(out, relax.Var) and out not in self.products:
            out = self.lookup_binding(out)  # follow aliases
        return self.products.get(out)

    def _fuse_add(self, call: relax.Call, original: relax.Call):
        """``product + b``: ``b`` a ``[n]`` vector joins as the bias (first step only); ``b`` of
        the product's own shape as the residual (last step)."""
        for (lin, other), orig in zip((call.args, call.args[::-1]), (original.args, original.args[::-1])):
            product = self._product_of(lin, orig[0])
            other_ty = other.ty
            if product is None or other_ty.shape is None or other_ty.dtype.dtype != product.dtype:
                continue
            if other_ty.ndim == 1 and product.epilogue == Epilogue():
                size = other_ty.shape.values[0]
                if isinstance(size, tvm.tirx.IntImm) and int(size) == product.n:
                    return self._emit(dataclasses.replace(product, bias=other))
            elif product.residual is None and tvm_ffi.structural_equal(
                other_ty.shape, lin.ty.shape
            ):
                rows = product.x2.ty.shape.values[0]
                residual = other if other_ty.ndim == 2 else self.builder_.emit(
                    relax.op.reshape(other, [rows, product.n])
                )
                return self._emit(dataclasses.replace(product, residual=residual))
        return None

    def _fuse_activation(self, call: relax.Call, original: relax.Call):
        """``gelu(product)`` with no activation or residual yet: the activation joins."""
        product = self._product_of(call.args[0], original.args[0])
        if product is None or product.activation is not None or product.residual is not None:
            return None
        return self._emit(dataclasses.replace(product, activation=_ACTIVATION_OPS[call.op.name]))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        original = call
        call = self.visit_expr_post_order(call)
        if is_call_of(call, "relax.add"):
            fused = self._fuse_add(call, original)
        elif isinstance(call.op, tvm.ir.Op) and call.op.name in _ACTIVATION_OPS:
            fused = self._fuse_activation(call, original)
        else:
            product = self._linear(call)
            fused = None if product is None else self._emit(product)
        return call if fused is None else fused


@tvm.transform.module_pass(opt_level=0, name="DispatchDense")
def dispatch_dense(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Replace ``matmul(x, permute_dims(w))`` (``nn.Linear``: ``w`` a static ``[n, k]`` tensor)
    by ``call_tir`` of our dense kernel for the current target:
    :mod:`~relax_masked_attn.kernels.cpu_dense` (float32 on ``llvm``) or
    :mod:`~relax_masked_attn.kernels.cuda_dense` (fp16/bf16 tensor cores, CUDA sm80+).
    Shapes and dtypes the kernels do not cover are left to TVM's own legalization.

    On CUDA, what follows the product joins its kernel's epilogue, in this order, each step only
    where the value before it has no other use: ``+ bias`` (a ``[n]`` vector), ``nn.gelu`` or
    ``nn.gelu_tanh``, ``+ residual`` (a tensor of the product's shape): BERT's
    ``gelu(x W1^T + b1)`` and ``x W^T + b + x`` are one kernel each.

    apache-tvm 0.27 has no CPU matmul schedule (a legalized ``nn.Linear`` runs as plain loops)
    and its CUDA tensor-core matmul rule crashes in the PyPI wheel. The ``"relax_masked_attn"``
    pipeline runs this pass first; alone, run it inside ``with target:``.
    """
    target = tvm.target.Target.current()
    if target is None:
        raise ValueError("DispatchDense: no target (run it inside `with tvm.target.Target(...)`)")
    dispatcher = _DenseDispatcher(mod, target)
    mod = _mutate_functions(dispatcher, mod, dispatcher.visit_function)
    # A product whose bias got fused is dead: drop its binding, then its kernel if unused.
    used = set()
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            func = relax.analysis.remove_all_unused(func)
            mod[gvar] = func
            used.update(gv.name_hint for gv in relax.analysis.all_global_vars(func))
    for name in dispatcher.kernel_names - used:
        del mod[name]
    return mod


@mutator
class _GeluRewriter(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not is_call_of(call, "relax.nn.gelu"):
            return call
        from tvm import topi

        x = call.args[0]
        if x.ty.dtype.dtype != "float32":
            return call
        half = relax.const(0.5, "float32")
        scaled = self.builder_.emit(relax.op.multiply(x, relax.const(0.5**0.5, "float32")))
        erf = self.builder_.call_te(topi.fast_erf, scaled)
        one_plus = relax.op.add(relax.const(1.0, "float32"), erf)
        return relax.op.multiply(relax.op.multiply(x, half), one_plus)


@tvm.transform.module_pass(opt_level=0, name="VectorizableGelu")
def vectorizable_gelu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite exact (erf) ``nn.gelu`` on float32 as ``0.5 x (1 + erf(x / sqrt 2))`` with TVM's
    polynomial ``topi.fast_erf``, which LLVM vectorizes; the libm ``erf`` it replaces runs one
    lane at a time (it was 45% of all-MiniLM-L6-v2's CPU time). For CPU targets."""
    return _mutate_functions(_GeluRewriter(mod), mod)


PIPELINE_NAME = "relax_masked_attn"


def pipeline_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The target's default build passes, with our legalization and :func:`dispatch_dense` first;
    on GPUs :func:`disable_dlight_tensorize` before every dlight scheduling pass; on CPUs
    :func:`vectorizable_gelu` and, after ``FuseTIR``, the CPU schedules of
    :mod:`relax_masked_attn.cpu_schedule`; on CUDA the vector schedule of
    :mod:`relax_masked_attn.gpu_schedule` before TVM's default one."""
    import importlib

    kind = target.kind.name
    backend = {"cuda": "cuda", "rocm": "rocm", "llvm": "cpu_generic"}.get(kind, "gpu_generic")
    if backend == "gpu_generic" and "gpu" not in target.keys:
        raise ValueError(f"relax_masked_attn pipeline: unsupported target kind {kind!r}")
    rp = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    passes = [LegalizeMaskedPrefill(), *rp.library_dispatch_passes(target)]
    passes.append(dispatch_dense)
    if kind == "llvm":
        passes.append(vectorizable_gelu)
    for p in rp.legalize_passes(target):
        if p.info.name == "ApplyDefaultSchedule":
            passes += [gpu_default_schedule(), disable_dlight_tensorize]
        passes.append(p)
        if kind == "llvm" and p.info.name == "FuseTIR":
            passes.append(cpu_default_schedule())
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


from .fuse_attention import FuseMaskedAttention, fuse_masked_attention

__all__ = [
    "FuseMaskedAttention",
    "LegalizeMaskedPrefill",
    "disable_dlight_tensorize",
    "dispatch_dense",
    "fuse_masked_attention",
    "pipeline_passes",
    "vectorizable_gelu",
]
