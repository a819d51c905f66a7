"""``FuseMaskedAttention``: put ``masked_sequence_prefill`` into models imported from PyTorch.

``torch.export`` + ``from_exported_program`` decompose attention into permutes, batched matmuls,
a scale, the ``add`` of a mask bias, ``softmax(axis=-1)`` (plus torch's "safe softmax" chain for
sdpa) and a matmul with V. This pass walks back from every 4-D ``softmax(axis=-1)`` and, when the
whole chain is recognised and its bias comes from a ``[batch, seq]`` padding-mask parameter,
replaces the attention output by our op. Anything not fully recognised is left as it was.

Assumption (the graph cannot show it): each row of the mask is one contiguous block of ones on
the declared side. ``checked=True`` adds a runtime assertion of it.
"""

from __future__ import annotations

import dataclasses
import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._ir import is_call_of
from .op import masked_sequence_prefill

logger = logging.getLogger("relax_masked_attn.fuse")


@dataclasses.dataclass
class _Match:
    out_var: relax.Var  # [b, h, s, d] attention output (reshape of the P @ V matmul)
    q: relax.Expr  # [b, h_q, s, d]
    k: relax.Expr  # [b, h_kv, s, d]
    v: relax.Expr  # [b, h_kv, s, d]
    scale: float
    causal: bool
    mask_param: relax.Var  # [b, s] attention_mask


class _Graph:
    """Bindings of one function: var -> value, and who uses each var."""

    def __init__(self, func: relax.Function):
        self.value: dict[relax.Var, relax.Expr] = {}
        self.users: dict[relax.Var, list[relax.Var]] = {}
        self.params = set(func.params)
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.value[binding.var] = binding.value
                    for arg in _call_args(binding.value):
                        if isinstance(arg, relax.Var):
                            self.users.setdefault(arg, []).append(binding.var)

    def resolve(self, expr):
        while isinstance(expr, relax.Var) and expr in self.value:
            nxt = self.value[expr]
            if not isinstance(nxt, relax.Var):
                return expr, nxt
            expr = nxt
        return expr, None

    def call(self, expr, op_name: str):
        """The call bound to ``expr`` if it is a call of ``op_name``, else None."""
        _, value = self.resolve(expr)
        return value if is_call_of(value, op_name) else None


def _call_args(value):
    if isinstance(value, relax.Call):
        for arg in value.args:
            if isinstance(arg, relax.Tuple):
                yield from arg.fields
            else:
                yield arg
    elif isinstance(value, relax.Tuple):
        yield from value.fields


def _scalar_const(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(expr.value, "numpy"):
        data = expr.value.numpy()
        if data.size == 1:
            return float(data.reshape(()))
    return None


def _axes(call) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def _strip_scale(g: _Graph, expr):
    """(tensor, factor): peel ``multiply(x, scalar const)`` and ``divide(x, scalar const)``
    layers off ``expr``."""
    factor = 1.0
    while True:
        mul, div = g.call(expr, "relax.multiply"), g.call(expr, "relax.divide")
        if div is not None:
            c = _scalar_const(div.args[1])
            if c is None or c == 0:
                return expr, factor
            factor, expr = factor / c, div.args[0]
            continue
        if mul is None:
            return expr, factor
        for a, b in (mul.args, mul.args[::-1]):
            c = _scalar_const(b)
            if c is not None:
                factor *= c
                expr = a
                break
        else:
            return expr, factor


def _strip_batch_merge(g: _Graph, expr):
    """``reshape([b*h, ...], broadcast_to(x))`` or ``reshape(x)`` -> x (4-D)."""
    reshape = g.call(expr, "relax.reshape")
    if reshape is None:
        return None
    inner = reshape.args[0]
    bcast = g.call(inner, "relax.broadcast_to")
    if bcast is not None:
        inner = bcast.args[0]
    return inner if inner.ty.ndim == 4 else None


def _chain(g: _Graph, expr, *op_names: str):
    """The calls ``op_names[0](op_names[1](...))`` bound behind ``expr``, outermost first; None
    unless every link is there."""
    calls = []
    for name in op_names:
        call = g.call(expr, name)
        if call is None:
            return None
        calls.append(call)
        expr = call.args[0]
    return calls


def _strip_gqa(g: _Graph, expr):
    """``reshape(broadcast_to(expand_dims(x, 2)))`` (repeat_kv) -> x; else expr itself."""
    calls = _chain(g, expr, "relax.reshape", "relax.broadcast_to", "relax.expand_dims")
    if calls is None or calls[-1].args[0].ty.ndim != 4:
        return expr
    return calls[-1].args[0]


def _ancestors(g: _Graph, expr, limit: int = 200):
    """Every call bound upstream of ``expr`` (breadth first, bounded)."""
    seen, todo, out = set(), [expr], []
    while todo and len(out) < limit:
        cur = todo.pop(0)
        if not isinstance(cur, relax.Var) or cur in seen or cur not in g.value:
            continue
        seen.add(cur)
        value = g.value[cur]
        out.append(value)
        todo.extend(a for a in _call_args(value) if isinstance(a, relax.Var))
    return out


def _arange_derived(g: _Graph, expr) -> bool:
    return any(is_call_of(c, "relax.arange") for c in _ancestors(g, expr, 20))


def _mask_bias(g: _Graph, expr) -> tuple[relax.Var, bool] | None:
    """(mask parameter, causal) if ``expr`` is ``where(cond, 0, very negative)`` built from a
    ``[b, s]`` padding-mask parameter; None otherwise."""
    where = g.call(expr, "relax.where")
    if where is None:
        return None
    cond, on_true, on_false = where.args
    zero = _const_of(g, on_true)
    full = g.call(on_true, "relax.full")
    if zero is None and full is not None:
        zero = _scalar_const(full.args[1])
    if zero != 0.0 or not _very_negative(g, on_false):
        return None
    mask_param, causal = None, False
    for call in _ancestors(g, cond):
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
            continue
        name = call.op.name
        if name == "relax.index_tensor":
            src = call.args[0]
            astype = g.call(src, "relax.astype")
            if astype is not None and astype.args[0] in g.params and astype.args[0].ty.ndim == 2:
                mask_param = astype.args[0]
        elif name in ("relax.less_equal", "relax.greater_equal", "relax.less", "relax.greater"):
            a, b = call.args
            if _arange_derived(g, a) and _arange_derived(g, b):
                causal = True
            elif not (_scalar_const(b) == 0.0 and name == "relax.greater_equal"):
                return None  # a compare we do not understand (sliding window, ...)
        elif name in ("relax.add", "relax.subtract", "relax.multiply"):
            # arange offsets (+0) are fine; anything else touching the mask is not a padding mask
            if not any(_arange_derived(g, a) for a in call.args if isinstance(a, relax.Var)):
                return None
    if mask_param is None:
        return None
    return mask_param, causal


def _masked_scores(g: _Graph, logits):
    """(scores, mask parameter, causal) of a softmax input that is the scores masked by a
    padding mask (and maybe causal): ``scores + where(cond, 0, NEG)`` (the bias Hugging Face
    models build), or ``where(~keep, NEG, scores)`` / ``where(keep, scores, NEG)`` (PyTorch's
    ``masked_fill`` and ``torch.where``, what hand-written models use). None otherwise."""
    add = g.call(logits, "relax.add")
    if add is not None:
        for scores, other in (add.args, add.args[::-1]):
            bias = _mask_bias(g, other)
            if bias is not None:
                return scores, *bias
        return None
    where = g.call(logits, "relax.where")
    if where is None:
        return None
    cond, on_true, on_false = where.args
    if _very_negative(g, on_true):  # masked_fill(~keep, NEG): where(~keep, NEG, scores)
        keep, scores = _negation_of(g, cond), on_false
    elif _very_negative(g, on_false):  # where(keep, scores, NEG)
        keep, scores = cond, on_true
    else:
        return None
    if keep is None:
        return None
    found = _keep_mask(g, keep)
    return None if found is None else (scores, *found)


def _const_of(g: _Graph, expr) -> float | None:
    return _scalar_const(g.resolve(expr)[1] if isinstance(expr, relax.Var) else expr)


def _very_negative(g: _Graph, expr) -> bool:
    value = _const_of(g, expr)
    return value is not None and value <= -1e4


def _negation_of(g: _Graph, expr):
    for name in ("relax.bitwise_not", "relax.logical_not"):
        call = g.call(expr, name)
        if call is not None:
            return call.args[0]
    return None


def _keep_mask(g: _Graph, keep) -> tuple[relax.Var, bool] | None:
    """(mask parameter, causal) when ``keep`` (True = attend) is the AND of exactly one key
    padding mask ``[b, 1, 1, s]`` from a ``[b, s]`` parameter and any number of lower-triangle
    (causal) masks and all-True fills; None for anything else (sliding windows, anti-causal or
    offset triangles, masks of other shapes)."""
    terms: list = []
    todo = [keep]
    while todo:
        expr = todo.pop()
        conj = g.call(expr, "relax.bitwise_and")
        if conj is None:
            conj = g.call(expr, "relax.logical_and")
        if conj is not None:
            todo += list(conj.args)
        else:
            terms.append(expr)
    masks, causal = set(), False
    for term in terms:
        full = g.call(term, "relax.full")
        if full is not None and _const_of(g, full.args[1]) == 1.0:
            continue  # all True
        if _is_lower_triangle(g, term):
            causal = True
            continue
        param = _key_padding_param(g, term)
        if param is None:
            return None
        masks.add(param)
    return (masks.pop(), causal) if len(masks) == 1 else None


def _key_padding_param(g: _Graph, term):
    """The ``[b, s]`` parameter ``term`` reads, when ``term`` is it cast to bool (or compared
    ``!= 0``) and expanded to ``[b, 1, 1, s]`` (keys on the last axis); else None."""
    ty = term.ty
    if (not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.dtype.dtype != "bool"
            or ty.shape is None or any(_int(d) != 1 for d in ty.shape.values[1:3])):
        return None
    expr = term
    while True:
        if isinstance(expr, relax.Var) and expr in g.params:
            return expr if expr.ty.ndim == 2 else None
        _, value = g.resolve(expr)
        if value is None:
            return None
        if is_call_of(value, "relax.not_equal") and _const_of(g, value.args[1]) == 0.0:
            expr = value.args[0]
        elif any(is_call_of(value, n) for n in ("relax.astype", "relax.expand_dims",
                                                "relax.reshape")):
            expr = value.args[0]
        else:
            return None


def _int(dim) -> int | None:
    return int(dim.value) if isinstance(dim, tvm.tirx.IntImm) else None


def _arange_axis(g: _Graph, expr) -> int | None:
    """-1 for ``arange(0, s)`` laid along the last of two axes (``[1, s]``, the key column),
    -2 for ``[s, 1]`` (the query row); None for anything else (an offset, a scaled arange)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != 2 or ty.shape is None:
        return None
    _, value = g.resolve(expr)
    while value is not None and (is_call_of(value, "relax.expand_dims")
                                 or is_call_of(value, "relax.reshape")):
        _, value = g.resolve(value.args[0])
    if not is_call_of(value, "relax.arange"):
        return None
    start, _, step = (_prim(a) for a in value.args[:3])  # PrimExprs (relax.prim_value)
    if start != 0 or step != 1:
        return None
    rows, cols = (_int(d) for d in ty.shape.values)
    return -1 if rows == 1 and cols != 1 else (-2 if cols == 1 and rows != 1 else None)


def _prim(value) -> float | None:
    return float(value.value) if isinstance(value, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) else None


def _is_lower_triangle(g: _Graph, term) -> bool:
    """``col <= row`` (torch.tril's keep mask) as the importer writes it: ``col - row <= 0``,
    ``row - col >= 0``, ``col <= row`` or ``row >= col``, with ``col``/``row`` unshifted aranges
    along the key / query axis. An offset (``<= 1``), the upper triangle or a window is not."""
    for name, sign in (("relax.less_equal", 1), ("relax.greater_equal", -1)):
        cmp = g.call(term, name)
        if cmp is None:
            continue
        lhs, rhs = cmp.args
        sub = g.call(lhs, "relax.subtract")
        if sub is not None and _const_of(g, rhs) == 0.0:
            a, b = (_arange_axis(g, x) for x in sub.args)
            return (a, b) == ((-1, -2) if sign == 1 else (-2, -1))
        a, b = _arange_axis(g, lhs), _arange_axis(g, rhs)
        return (a, b) == ((-1, -2) if sign == 1 else (-2, -1))
    return False


def _match(g: _Graph, softmax_var: relax.Var, softmax: relax.Call) -> _Match | None:
    if softmax.attrs.axis not in (-1, 3) or softmax.args[0].ty.ndim != 4:
        return None
    masked = _masked_scores(g, softmax.args[0])
    if masked is None:
        return None
    scores, mask_param, causal = masked
    scores, s_scale = _strip_scale(g, scores)
    calls = _chain(g, scores, "relax.reshape", "relax.matmul")
    if calls is None:
        return None
    qk = calls[-1]
    q = _strip_batch_merge(g, qk.args[0])
    kt = _strip_batch_merge(g, qk.args[1])
    if q is None or kt is None:
        return None
    q, q_scale = _strip_scale(g, q)
    kt, k_scale = _strip_scale(g, kt)
    transpose = g.call(kt, "relax.permute_dims")
    if transpose is None or _axes(transpose) != [0, 1, 3, 2]:
        return None
    k = _strip_gqa(g, transpose.args[0])

    # Forward: softmax (or its safe-softmax where) -> merge -> matmul with V -> reshape to bhsd.
    probs = [softmax_var]
    for user in g.users.get(softmax_var, []):
        where = g.call(user, "relax.where")
        if where is not None and where.args[2].same_as(softmax_var):
            probs.append(user)
    for p in probs:
        for user in g.users.get(p, []):
            cur = user
            if g.call(cur, "relax.broadcast_to") is not None:
                nxt = g.users.get(cur, [])
                cur = nxt[0] if len(nxt) == 1 else None
            if cur is None or g.call(cur, "relax.reshape") is None:
                continue
            for mm_var in g.users.get(cur, []):
                pv = g.call(mm_var, "relax.matmul")
                if pv is None or not pv.args[0].same_as(cur):
                    continue
                v = _strip_batch_merge(g, pv.args[1])
                outs = g.users.get(mm_var, [])
                if v is None or len(outs) != 1 or g.call(outs[0], "relax.reshape") is None:
                    continue
                if outs[0].ty.ndim != 4:
                    continue
                v = _strip_gqa(g, v)
                scale = s_scale * q_scale * k_scale
                return _Match(outs[0], q, k, v, scale, causal, mask_param)
    return None


def _permute(x):
    return relax.op.permute_dims(x, [0, 2, 1, 3])


@tvm.transform.module_pass(opt_level=0, name="FuseMaskedAttention")
class FuseMaskedAttention:
    """Replace decomposed, padding-masked attention in imported graphs by our op.

    Parameters
    ----------
    padding_side : "right" or "left"
        Where each row's padding sits (the graph cannot tell). Right-padded bidirectional
        attention becomes ``mode="padded"``, left-padded causal ``"causal_padded_left"``, and so on.
    checked : bool
        Add a runtime assertion that every row of the mask is one contiguous block of ones on
        ``padding_side`` (the assumption that makes ``valid_len = sum(mask)`` exact).

    After the pass, ``self.rewritten`` maps each function name to the number of attention blocks
    replaced; the same counts are logged at INFO on the ``relax_masked_attn.fuse`` logger (quiet
    unless you enable it). Run ``relax.transform.DeadCodeElimination()`` afterwards to drop the
    now-unused mask chain (``fuse_masked_attention`` does both).
    """

    def __init__(self, padding_side: str = "right", checked: bool = False):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', but got {padding_side!r}")
        self.padding_side, self.checked = padding_side, checked
        self.rewritten: dict[str, int] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(attrs=mod.attrs) if mod.attrs else tvm.IRModule()
        self.rewritten = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                func, count = self._rewrite(func)
                self.rewritten[gvar.name_hint] = count
                logger.info("FuseMaskedAttention: %s: %d attention block(s)", gvar.name_hint, count)
            out[gvar] = func
        return out

    def _mode(self, causal: bool) -> str:
        base = "causal_padded" if causal else "padded"
        return base + ("_left" if self.padding_side == "left" else "")

    def _rewrite(self, func: relax.Function) -> tuple[relax.Function, int]:
        if not isinstance(func.body, relax.SeqExpr):
            return func, 0
        g = _Graph(func)
        matches: dict[relax.Var, _Match] = {}
        for var, value in g.value.items():
            if is_call_of(value, "relax.nn.softmax"):
                m = _match(g, var, value)
                if m is not None:
                    matches[m.out_var] = m
        if not matches:
            return func, 0
        lead, valid_len = self._lead_bindings(func, {m.mask_param for m in matches.values()})
        body = relax.SeqExpr([relax.BindingBlock(lead), *func.body.blocks], func.body.body)
        func = relax.Function(func.params, body, func.ret_ty, func.is_pure and not self.checked,
                              func.attrs, func.span)
        rewriter = _Rewriter(matches, valid_len, self._mode)
        return rewriter.visit_expr(func), len(matches)

    def _lead_bindings(self, func, masks):
        """Bindings computing valid_len (and, checked, the assertion) from the mask parameters,
        typed by a BlockBuilder; to stand first in the function body."""
        bb = relax.BlockBuilder()
        valid_len = {}
        with bb.function("lead", list(func.params), pure=not self.checked):
            for mask in masks:
                counts = relax.op.sum(relax.op.astype(mask, "int32"), axis=[1])
                valid_len[mask] = bb.emit(counts, name_hint=f"{mask.name}_valid_len")
                if self.checked:
                    self._emit_assert_contiguous(bb, mask, valid_len[mask])
            bb.emit_func_output(relax.Tuple(list(valid_len.values())))
        return list(bb.get()["lead"].body.blocks[0].bindings), valid_len

    def _emit_assert_contiguous(self, bb, mask, valid_len):
        seq = mask.ty.shape.values[1]
        pos = bb.emit(relax.op.expand_dims(relax.op.arange(0, seq, 1, "int32"), [0]))  # (1, s)
        n = bb.emit(relax.op.expand_dims(valid_len, [1]))  # (b, 1)
        if self.padding_side == "left":
            # real tokens start at seq - n: compare pos + n >= seq, seq taken from the mask
            ones = relax.op.ones_like(mask, "int32")
            seq_len = relax.op.expand_dims(relax.op.sum(ones, axis=[1]), [1])
            start = bb.emit(relax.op.subtract(seq_len, n))
            expected = bb.emit(relax.op.greater_equal(pos, start))
        else:
            expected = bb.emit(relax.op.less(pos, n))
        # (compared as int32: LLVM codegen of `equal` on bool tensors fails in TVM 0.27)
        real = relax.op.astype(relax.op.astype(mask, "bool"), "int32")
        same = bb.emit(relax.op.equal(real, relax.op.astype(expected, "int32")))
        ok = bb.emit(relax.op.astype(relax.op.min(relax.op.astype(same, "int32")), "bool"))
        bb.emit(relax.op.assert_op(
            ok, [], f"FuseMaskedAttention: every attention_mask row must be one block of ones "
            f"on the {self.padding_side} side",
        ))




@mutator
class _Rewriter(PyExprMutator):
    """Replaces each matched attention output binding by our op (q/k/v permuted to bshd)."""

    def __init__(self, matches, valid_len, mode_of):
        super().__init__()
        self.matches, self.valid_len, self.mode_of = matches, valid_len, mode_of

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        m = self.matches.get(binding.var)
        if m is None:
            super().visit_var_binding_(binding)
            return
        q, k, v = (self.visit_expr(x) for x in (m.q, m.k, m.v))
        attn = masked_sequence_prefill(
            _permute(q), _permute(k), _permute(v), self.visit_expr(self.valid_len[m.mask_param]),
            self.mode_of(m.causal), m.scale,
        )
        new_var = self.builder_.emit(_permute(attn), name_hint="masked_attention")
        self.set_var_remap(binding.var, new_var)


def fuse_masked_attention(mod: tvm.IRModule, padding_side: str = "right",
                          checked: bool = False) -> tuple[tvm.IRModule, dict[str, int]]:
    """Run :class:`FuseMaskedAttention`, then drop dead code and fold the permute pairs it
    leaves; returns the module and the per-function rewrite counts."""
    fuse = FuseMaskedAttention(padding_side, checked)
    mod = fuse(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = relax.transform.CanonicalizeBindings()(mod)
    return mod, dict(fuse.rewritten)


__all__ = ["FuseMaskedAttention", "fuse_masked_attention"]
