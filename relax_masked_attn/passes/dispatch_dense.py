"""``DispatchDense``: ``nn.Linear`` products onto our dense kernels, with their epilogues."""

from __future__ import annotations

import collections
import dataclasses
import functools

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.backend.utils import BackendDispatcher
from tvm.relax.expr_functor import mutator

from .._ir import as_rows, is_call_of, mutate_functions
from ..kernels import cpu_dense, cuda_dense, cuda_pingpong_dense, cuda_tma_dense
from ..kernels.epilogue import MAX_SPLIT, Epilogue, gated_weight


def _has_dense_kernel(target: tvm.target.Target, n: int, k: int, dtype: str,
                      epilogue: Epilogue) -> bool:
    """Whether one of our dense kernels serves ``x[m, k] @ w[n, k].T`` with ``epilogue``."""
    if target.kind.name == "llvm":
        return not epilogue.gated and cpu_dense.supports(target, n, k, dtype)
    return cuda_dense.supports(target, n, k, dtype)


def _pingpong_for_residuals(n: int, k: int, dtype: str, epilogue: Epilogue,
                            tma_store: bool = False):
    """The ping-pong kernel for products that add a residual, the cooperative one for others
    (gated ones: the persistent kernel; ``tma_store``: the persistent form that stores each tile
    by TMA)."""
    if epilogue.residual:
        return cuda_pingpong_dense.pingpong_dense_kernel(n, k, dtype, epilogue)
    if tma_store:
        return cuda_tma_dense.tma_dense_kernel(n, k, dtype, epilogue, persistent=True,
                                               tma_store=True)
    return cuda_pingpong_dense.cooperative_dense_kernel(n, k, dtype, epilogue)


# The Hopper dense kernel generators by name, each ``(n, k, dtype, epilogue)`` -> the same
# PrimFunc: the warp-specialized TMA kernel, its persistent form, the persistent kernels whose
# roles never join (ping-pong: the consumers take turns on whole tiles; cooperative: both on
# every tile), and the kernel whose threads all copy through ``cp.async``. ``HOPPER_DENSE`` is
# what ``sm_90a`` targets get: the ping-pong form for products that add a residual (1-15% faster
# than the persistent form on an H200: their epilogue reads a tile of the residual, which the
# other consumer's products now hide), the cooperative one for the others (0.93-1.00x cuBLAS at
# 8192 and 10368 rows, its tile width chosen by the row count; 0-3% ahead of the persistent form
# at one width, with its deeper ring; the ping-pong form's smaller tiles cost it up to 5% there),
# SwiGLU's gated products the persistent one;
# ``bench_models.py --hopper-dense NAME`` puts another there to compare whole models, and
# ``bench_dense.py`` times each (docs/performance.md#dense).
HOPPER_DENSE_KERNELS = {
    "wgmma": cuda_dense.wgmma_dense_kernel,
    "tma": cuda_tma_dense.tma_dense_kernel,
    "persistent": functools.partial(cuda_tma_dense.tma_dense_kernel, persistent=True),
    "pingpong": cuda_pingpong_dense.pingpong_dense_kernel,
    "cooperative": cuda_pingpong_dense.cooperative_dense_kernel,
    # the ping-pong form in clusters of two CTAs sharing each w box by TMA multicast (opt-in:
    # 2-14% slower than the plain ping-pong form on an H200, docs/performance.md#dense)
    "pingpong-cluster": functools.partial(cuda_pingpong_dense.pingpong_dense_kernel, cluster=2),
    # the persistent form storing each tile by TMA (no residual; opt-in: on an H200 within 2%
    # of the persistent form's own stores, docs/performance.md#dense)
    "persistent-tma-store": functools.partial(cuda_tma_dense.tma_dense_kernel, persistent=True,
                                              tma_store=True),
}
# What ``HOPPER_DENSE`` may be: one form for every product, or a choice between forms
# (``tma-store``: the default's choice with the persistent form's TMA stores).
HOPPER_DENSE_CHOICES = {
    **HOPPER_DENSE_KERNELS,
    "residual-pingpong": _pingpong_for_residuals,
    "tma-store": functools.partial(_pingpong_for_residuals, tma_store=True),
}
HOPPER_DENSE = HOPPER_DENSE_CHOICES["residual-pingpong"]


def _dense_kernel(target: tvm.target.Target, n: int, k: int, dtype: str, epilogue: Epilogue):
    """Our dense kernel for ``x[m, k] @ w[n, k].T`` with ``epilogue`` on ``target``
    (:func:`_has_dense_kernel` must hold)."""
    if target.kind.name == "llvm":
        return cpu_dense.dense_kernel(n, k, dtype, epilogue, cpu_dense.tiles_for(target))
    if cuda_dense.has_wgmma(target):
        return HOPPER_DENSE(n, k, dtype, epilogue)
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
    target: tvm.target.Target  # x's vdevice, else the current target
    bias: relax.Expr | None = None
    activation: str | None = None
    residual: relax.Expr | None = None  # [rows, n]
    gated: bool = False  # w is gate and up interleaved; the output has n / 2 columns

    @property
    def epilogue(self) -> Epilogue:
        return Epilogue(self.bias is not None, self.activation, self.residual is not None,
                        self.gated)


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
class _DenseDispatcher(BackendDispatcher):
    """The target of each product is TVM's dispatch rule (``BackendDispatcher``): x's vdevice,
    else ``Target.current()``, else an error."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.current = tvm.target.Target.current()
        self.products = {}  # our kernel call's output var -> _Product
        self.placeholders = {}  # kernel name -> GlobalVar of its placeholder in the module
        self.kernels = {}  # kernel name -> the arguments of _dense_kernel that build it
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
        return _Product(as_rows(x), w, lead, int(n), int(k), x_ty.dtype.dtype,
                        self._get_target(x_ty))

    def placeholder(self, target, n: int, k: int, dtype: str, epilogue: Epilogue,
                    arity: int) -> relax.GlobalVar:
        """The GlobalVar of our kernel for these arguments, an empty function of its name and
        ``arity`` parameters until the pass ends: most products are emitted several times as
        their epilogue grows (bias, then gelu, then residual), and only the kernels still
        called then are built (parsing one takes about 0.4 s)."""
        name = f"zz_dense{epilogue.name}_n{n}_k{k}_{dtype}"
        if self.current is None or target != self.current:  # a vdevice's own kernel
            name += f"_{target.kind.name}"
        gv = self.placeholders.get(name)
        if gv is None:
            params = [tvm.tirx.Var(f"arg{i}", "handle") for i in range(arity)]
            stub = tvm.tirx.PrimFunc(params, tvm.tirx.Evaluate(0))
            gv = self.placeholders[name] = self.builder_.add_func(
                stub.with_attr("global_symbol", name), name)
            self.kernels[name] = (target, n, k, dtype, epilogue)
        return gv

    def _emit(self, product: _Product):
        """Emit our kernel's call for ``product`` (None when no kernel serves it)."""
        epilogue = product.epilogue
        target = product.target
        if not _has_dense_kernel(target, product.n, product.k, product.dtype, epilogue):
            return None
        x2 = product.x2
        if not isinstance(x2, relax.Var):
            x2 = self.builder_.emit(x2)
            product = dataclasses.replace(product, x2=x2)
        w = product.w
        if target.kind.name == "llvm":  # the CPU kernel reads the weight in panels
            w = self.builder_.emit(cpu_dense.pack_weight(w, cpu_dense.tiles_for(target).cols))
        args = [x2, w, *(e for e in (product.bias, product.residual) if e is not None)]
        gv = self.placeholder(target, product.n, product.k, product.dtype, epilogue,
                              len(args) + 1)  # and the output
        rows = x2.ty.shape.values[0]
        n_out = epilogue.out_columns(product.n)
        out = self.builder_.emit(
            relax.call_tir(gv, args, out_ty=relax.TensorType([rows, n_out], product.dtype))
        )
        self.products[out] = product
        return out if len(product.lead) == 1 else relax.op.reshape(out, [*product.lead, n_out])

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
        both_orders = zip((call.args, call.args[::-1]), (original.args, original.args[::-1]))
        for (lin, other), orig in both_orders:
            product = self._product_of(lin, orig[0])
            other_ty = other.ty
            if (product is None or product.gated or other_ty.shape is None
                    or other_ty.dtype.dtype != product.dtype):
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

    def _fuse_swiglu(self, call: relax.Call):
        """``silu(x @ Wg.T) * (x @ Wu.T)`` (either order), both products of the same ``x`` with
        nothing fused yet and no other use: one product on the interleaved weight whose epilogue
        writes ``silu(gate) * up`` (CUDA only)."""
        for silu_var, up_var in (call.args, call.args[::-1]):
            if not isinstance(silu_var, relax.Var) or self.uses[silu_var] != 1:
                continue
            silu = self.lookup_binding(silu_var)
            if not is_call_of(silu, "relax.nn.silu"):
                continue
            gate = self._product_of(silu.args[0], silu.args[0])
            up = self._product_of(up_var, up_var)
            if (gate is None or up is None or gate.epilogue != Epilogue()
                    or up.epilogue != Epilogue() or not gate.x2.same_as(up.x2)
                    or (gate.n, gate.k, gate.dtype) != (up.n, up.k, up.dtype)
                    or gate.target.kind.name != "cuda"
                    or not cuda_dense.supports(gate.target, 2 * gate.n, gate.k, gate.dtype)):
                continue
            group = cuda_dense.gate_group(gate.target, 2 * gate.n, gate.dtype)
            w = self.builder_.emit(gated_weight(gate.w, up.w, group))
            return self._emit(dataclasses.replace(gate, w=w, n=2 * gate.n, gated=True))
        return None

    def _fuse_activation(self, call: relax.Call, original: relax.Call):
        """``gelu(product)`` with no activation or residual yet: the activation joins."""
        product = self._product_of(call.args[0], original.args[0])
        if (product is None or product.activation is not None or product.residual is not None
                or product.gated):
            return None
        return self._emit(dataclasses.replace(product, activation=_ACTIVATION_OPS[call.op.name]))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        original = call
        call = self.visit_expr_post_order(call)
        if is_call_of(call, "relax.add"):
            fused = self._fuse_add(call, original)
        elif isinstance(call.op, tvm.ir.Op) and call.op.name in _ACTIVATION_OPS:
            fused = self._fuse_activation(call, original)
        elif is_call_of(call, "relax.multiply"):
            fused = self._fuse_swiglu(call)
        else:
            product = self._linear(call)
            fused = None if product is None else self._emit(product)
        if fused is None:
            return call
        # A step fused through a reshape (an importer's ``reshape(x2 @ w.T, [b, s, n]) + r``)
        # gives the kernel's [rows, n]: give the call's own shape back.
        fused = self.builder_.normalize(fused)
        if not tvm_ffi.structural_equal(fused.ty.shape, call.ty.shape):
            fused = relax.op.reshape(fused, call.ty.shape)
        return fused


class _SiblingJoiner:
    """Products of one input with the same plain epilogue (none, or a bias), as a layer's q, k
    and v projections are: one call of a kernel with a ``split`` epilogue on the weights (and
    biases) concatenated, which writes each product's own output. On CUDA, up to
    ``MAX_SPLIT`` products whose column ranges each start on the kernel's column tile. The
    concatenations are expressions of the parameters (``LiftTransformParams`` runs them once);
    each product's variable is bound to its part of the joint call, where the first was."""

    def __init__(self, dispatcher: _DenseDispatcher):
        self.dispatcher = dispatcher

    def _product(self, binding):
        """``(kernel arguments, call)`` when ``binding`` calls one of our dense placeholders."""
        value = binding.value
        if not is_call_of(value, "relax.call_tir"):
            return None
        spec = self.dispatcher.kernels.get(value.args[0].name_hint)
        if spec is None or spec[0].kind.name != "cuda" or spec[4] not in _SPLITTABLE:
            return None
        return spec, value

    def _groups(self, block, defined):
        """Lists of binding indices whose products can be joined: their other arguments
        (weights, biases) are bound before the first of them, where the joint call goes."""
        bindings = list(block.bindings)
        groups = collections.defaultdict(list)
        for i, binding in enumerate(bindings):
            found = self._product(binding)
            if found is not None:
                spec, call = found
                target, _, k, dtype, epilogue = spec
                groups[call.args[1].fields[0], str(target), k, dtype, epilogue].append((i, spec))
        out = []
        for members in groups.values():
            members = members[:MAX_SPLIT]
            first = members[0][0]
            target, _, k, dtype, _ = members[0][1]
            before = defined | {b.var for b in bindings[:first]}
            args = [a for i, _ in members for a in bindings[i].value.args[1].fields[1:]]
            if (len(members) > 1
                    and cuda_dense.split_fits(target, [spec[1] for _, spec in members], k, dtype)
                    and all(a in before for a in args)):
                out.append([i for i, _ in members])
        return out

    def join(self, func: relax.Function) -> relax.Function:
        if not isinstance(func.body, relax.SeqExpr):
            return func
        defined = set(func.params)
        blocks = []
        for block in func.body.blocks:
            groups = self._groups(block, defined) if isinstance(block,
                                                               relax.DataflowBlock) else []
            if groups:
                block = self._join_block(block, groups)
            defined.update(b.var for b in block.bindings)
            blocks.append(block)
        body = relax.SeqExpr(blocks, func.body.body)
        return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)

    def _join_block(self, block, groups) -> relax.DataflowBlock:
        joined = {members[0]: members for members in groups}
        moved = {i for members in groups for i in members}
        bindings = []
        for i, binding in enumerate(block.bindings):
            if i in joined:
                bindings += self._joint_call([block.bindings[j] for j in joined[i]])
            elif i not in moved:
                bindings.append(binding)
        return relax.DataflowBlock(bindings)

    def _joint_call(self, members) -> list:
        specs = [self._product(b)[0] for b in members]
        target, _, k, dtype, epilogue = specs[0]
        widths = tuple(spec[1] for spec in specs)
        calls = [b.value for b in members]
        x = calls[0].args[1].fields[0]
        bindings = []

        def bind(name, expr):
            var = relax.DataflowVar(name, self.dispatcher.builder_.normalize(expr).ty)
            bindings.append(relax.VarBinding(var, expr))
            return var

        weights = bind("joint_weight", relax.op.concat([c.args[1].fields[1] for c in calls]))
        args = [x, weights]
        if epilogue.bias:
            args.append(bind("joint_bias", relax.op.concat([c.args[1].fields[2]
                                                            for c in calls])))
        joint = dataclasses.replace(epilogue, split=widths)
        gv = self.dispatcher.placeholder(target, sum(widths), k, dtype, joint,
                                         len(args) + len(widths))
        rows = x.ty.shape.values[0]
        outs = [relax.TensorType([rows, w], dtype) for w in widths]
        tup = bind("joint", relax.call_tir(gv, args, out_ty=outs))
        for i, b in enumerate(members):
            bindings.append(relax.VarBinding(b.var, relax.TupleGetItem(tup, i)))
        return bindings


_SPLITTABLE = (Epilogue(), Epilogue(bias=True))


@tvm.transform.module_pass(opt_level=0, name="DispatchDense")
def dispatch_dense(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Replace ``matmul(x, permute_dims(w))`` (``nn.Linear``: ``w`` a static ``[n, k]`` tensor)
    by ``call_tir`` of our dense kernel for its target (x's vdevice, else the current target,
    as TVM's ``BackendDispatcher`` decides):
    :mod:`~relax_masked_attn.kernels.cpu_dense` (float32 on ``llvm``) or
    :mod:`~relax_masked_attn.kernels.cuda_dense` (fp16/bf16 tensor cores, CUDA sm80+).
    Shapes and dtypes the kernels do not cover are left to TVM's own legalization.

    What follows the product joins its kernel's epilogue, in this order, each step only where
    the value before it has no other use: ``+ bias`` (a ``[n]`` vector), ``nn.gelu`` or
    ``nn.gelu_tanh``, ``+ residual`` (a tensor of the product's shape): BERT's
    ``gelu(x W1^T + b1)`` and ``x W^T + b + x`` are one kernel each. On CUDA, SwiGLU's
    ``silu(x Wg^T) * (x Wu^T)`` (Qwen3's MLP) is one product on the two weights interleaved
    (``epilogue.gated_weight``, lifted out with the other layouts). On CPUs the kernel reads
    the weight in panels: the call gets ``pack_weight(w)``, which ``prepack_weights`` in the
    pipeline lifts out to run once.

    apache-tvm 0.27 has no CPU matmul schedule (a legalized ``nn.Linear`` runs as plain loops)
    and its CUDA tensor-core matmul rule crashes in the PyPI wheel. The ``"relax_masked_attn"``
    pipeline runs this pass first; alone, run it inside ``with target:``.
    """
    dispatcher = _DenseDispatcher(mod)
    mod = mutate_functions(dispatcher, mod, dispatcher.visit_function)
    # A product whose bias got fused is dead: drop its binding, then its kernel if unused;
    # join products of one input (split outputs); build the kernels still called in place of
    # their placeholders.
    used = set()
    joiner = _SiblingJoiner(dispatcher)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            func = joiner.join(relax.analysis.remove_all_unused(func))
            dispatcher.builder_.update_func(gvar, func)
            used.update(gv.name_hint for gv in relax.analysis.all_global_vars(func))
    mod = dispatcher.builder_.get()
    for name, gv in dispatcher.placeholders.items():
        if name in used:
            kernel = _dense_kernel(*dispatcher.kernels[name])
            mod[gv] = kernel.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
        else:
            del mod[name]
    return mod


def standalone_linear_module(n: int, k: int, dtype: str = "float32", bias: bool = False,
                             rank: int = 3, activation: str | None = None,
                             residual: bool = False, keep_product: bool = False) -> tvm.IRModule:
    """``main(x, w[, b][, r]) = act(x @ w.T (+ b)) (+ r)`` with symbolic leading dims, as
    nn.Linear (and BERT's gelu and residual adds) export it: x ``[b, s, k]`` (``rank`` 3) or
    ``[m, k]`` (``rank`` 2), w ``[n, k]``; ``activation`` ``"gelu"`` or ``"gelu_tanh"``.
    ``keep_product``: ``main`` returns the plain product too, so it has a second use. For
    benchmarks and for checking :func:`dispatch_dense` in isolation."""
    lead = [tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")][:rank - 1]
    x = relax.Var("x", relax.TensorType((*lead, k), dtype))
    w = relax.Var("w", relax.TensorType((n, k), dtype))
    params = [x, w]
    if bias:
        params.append(relax.Var("bias", relax.TensorType((n,), dtype)))
    if residual:
        params.append(relax.Var("residual", relax.TensorType((*lead, n), dtype)))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(w))
            product = out = bb.emit(relax.op.matmul(x, wt))
            if bias:
                out = bb.emit(relax.op.add(out, params[2]))
            if activation:
                out = bb.emit(getattr(relax.op.nn, activation)(out))
            if residual:
                out = bb.emit(relax.op.add(params[-1], out))  # the residual first, as in BERT
            if keep_product:
                out = relax.Tuple([out, product])
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()
