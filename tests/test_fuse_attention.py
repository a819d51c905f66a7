"""FuseMaskedAttention on models imported from PyTorch, checked against PyTorch itself."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import relax_masked_attn as rma
from relax_masked_attn.fuse_attention import FuseMaskedAttention, fuse_masked_attention


class HiddenStates(torch.nn.Module):
    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids, attention_mask, position_ids):
        kw = {"position_ids": position_ids}
        if self.kind == "bert":
            kw["token_type_ids"] = torch.zeros_like(input_ids)
        else:
            kw["use_cache"] = False
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return out.last_hidden_state


def make_model(kind, impl):
    from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=96, max_position_embeddings=64, attn_implementation=impl)
        return BertModel(cfg).eval()
    cfg = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=64, attn_implementation=impl)
    return Qwen3Model(cfg).eval()


def imported(kind, impl):
    """(relax module, torch wrapper): exported with dynamic batch and sequence."""
    from tvm.relax.frontend.torch import from_exported_program

    wrapper = HiddenStates(make_model(kind, impl), kind)
    ids = torch.randint(1, 100, (2, 8))
    args = (ids, torch.ones(2, 8, dtype=torch.long), torch.arange(8)[None].expand(2, 8))
    b, s = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    dyn = {name: {0: b, 1: s} for name in ("input_ids", "attention_mask", "position_ids")}
    ep = torch.export.export(wrapper, args, dynamic_shapes=dyn)
    return from_exported_program(ep), wrapper


def ops_in(func) -> str:
    return func.script()


CASES = [("bert", "eager", "right"), ("bert", "sdpa", "right"),
         ("qwen3", "eager", "left"), ("qwen3", "sdpa", "left")]


@pytest.mark.parametrize("pipeline", [None, "relax_masked_attn"])
@pytest.mark.parametrize("kind,impl,side", CASES)
def test_fused_model_matches_pytorch(kind, impl, side, pipeline):
    """Plain tvm.compile, and our pipeline (which also sends the imported linears, matmul with
    permute_dims and a bias add, to our dense kernel)."""
    mod, wrapper = imported(kind, impl)
    fused, counts = fuse_masked_attention(mod, padding_side=side)
    assert counts == {"main": 2}  # both layers
    text = ops_in(fused["main"])
    assert "R.nn.softmax" not in text and text.count(rma.OP_NAME) == 2
    assert "R.index_tensor" not in text  # the mask chain is gone
    if pipeline:
        from relax_masked_attn.transform import dispatch_dense

        with tvm.target.Target("llvm"):
            dense = [gv.name_hint for gv in dispatch_dense(fused).get_global_vars()
                     if gv.name_hint.startswith("zz_dense")]
        assert dense, "the imported linears should reach our dense kernel"
        ex = tvm.compile(fused, target="llvm", relax_pipeline=relax.get_pipeline(pipeline))
    else:
        ex = tvm.compile(fused, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    for batch, seq in [(3, 11), (1, 5), (4, 16)]:
        lengths = rng.integers(1, seq + 1, batch)
        lengths[0] = seq
        pos = np.arange(seq)[None]
        if side == "left":
            mask = (pos >= seq - lengths[:, None]).astype("int64")
        else:
            mask = (pos < lengths[:, None]).astype("int64")
        ids = rng.integers(1, 100, (batch, seq)).astype("int64")
        positions = np.broadcast_to(np.arange(seq), (batch, seq)).copy()
        with torch.no_grad():
            ref = wrapper(*(torch.from_numpy(x) for x in (ids, mask, positions))).numpy()
        out = vm["main"](*(tvm.runtime.tensor(x) for x in (ids, mask, positions)))[0].numpy()
        assert np.isfinite(out).all()
        real = mask.astype(bool)
        np.testing.assert_allclose(out[real], ref[real], atol=1e-5)


@pytest.fixture(scope="module")
def bert_module():
    return imported("bert", "eager")


def rewrite_softmax_inputs(mod, change):
    """Apply ``change(bb, softmax_call) -> new call`` to every softmax of ``main``."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Edit(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.softmax":
                return change(self.builder_, call)
            return call

    edit = Edit(mod)
    out = tvm.IRModule({"main": edit.visit_expr(mod["main"])})
    return out


def test_additive_float_bias_is_left_untouched(bert_module):
    """An ALiBi-style float bias added on top of the mask: not a pure padding mask, no rewrite."""
    mod, _ = bert_module

    def add_alibi(bb, call):
        logits = call.args[0]
        slopes = relax.const(np.array([0.5, 0.25], "float32").reshape(1, 2, 1, 1))
        return relax.op.nn.softmax(bb.normalize(relax.op.add(logits, slopes)), axis=-1)

    with_alibi = rewrite_softmax_inputs(mod, add_alibi)
    fused, counts = fuse_masked_attention(with_alibi)
    assert counts == {"main": 0}
    assert fused["main"].script().count("R.nn.softmax") == 2


def test_other_softmax_axis_is_left_untouched(bert_module):
    mod, _ = bert_module
    other_axis = rewrite_softmax_inputs(
        mod, lambda bb, call: relax.op.nn.softmax(call.args[0], axis=2)
    )
    pass_ = FuseMaskedAttention("right")
    out = pass_(other_axis)
    assert pass_.rewritten == {"main": 0}
    tvm.ir.assert_structural_equal(out, other_axis)


def test_unrelated_softmax_is_left_untouched():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 8, 8), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.softmax(x, axis=-1)))
    mod = bb.get()
    fused, counts = fuse_masked_attention(mod)
    assert counts == {"main": 0}
    tvm.ir.assert_structural_equal(fused, mod)


def test_checked_mode_asserts_contiguous_masks(bert_module):
    mod, wrapper = bert_module
    fused, counts = fuse_masked_attention(mod, "right", checked=True)
    assert counts == {"main": 2} and "R.assert_op" in fused["main"].script()
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    ids = np.random.default_rng(0).integers(1, 100, (2, 6)).astype("int64")
    positions = np.broadcast_to(np.arange(6), (2, 6)).copy()
    good = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype="int64")
    out = vm["main"](*(tvm.runtime.tensor(x) for x in (ids, good, positions)))[0].numpy()
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(x) for x in (ids, good, positions))).numpy()
    np.testing.assert_allclose(out[good.astype(bool)], ref[good.astype(bool)], atol=1e-5)
    holes = np.array([[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype="int64")
    with pytest.raises(Exception, match="one block of ones on the right side"):
        vm["main"](*(tvm.runtime.tensor(x) for x in (ids, holes, positions)))


def test_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        FuseMaskedAttention("middle")


def test_rewrite_counts_are_logged(bert_module, caplog):
    mod, _ = bert_module
    with caplog.at_level("INFO", logger="relax_masked_attn.fuse"):
        fuse_masked_attention(mod)
    assert "main: 2 attention block(s)" in caplog.text


def test_checked_mode_left_padding():
    mod, wrapper = imported("qwen3", "sdpa")
    fused, counts = fuse_masked_attention(mod, "left", checked=True)
    assert counts == {"main": 2}
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    ids = np.random.default_rng(1).integers(1, 100, (2, 5)).astype("int64")
    positions = np.broadcast_to(np.arange(5), (2, 5)).copy()
    good = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype="int64")
    out = vm["main"](*(tvm.runtime.tensor(x) for x in (ids, good, positions)))[0].numpy()
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(x) for x in (ids, good, positions))).numpy()
    np.testing.assert_allclose(out[good.astype(bool)], ref[good.astype(bool)], atol=1e-5)
    right_padded = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype="int64")
    with pytest.raises(Exception, match="one block of ones on the left side"):
        vm["main"](*(tvm.runtime.tensor(x) for x in (ids, right_padded, positions)))


# --- hand-written attention: masked_fill(~mask, min) and torch.where --------------------------


class HandWritten(torch.nn.Module):
    """One attention block as people write it by hand: the keep mask from a ``[b, s]`` padding
    mask, maybe AND-ed with a triangle, applied with ``masked_fill`` or ``torch.where``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / 4.0
        keep = mask[:, None, None, :].bool()
        ones = torch.ones(s, s, dtype=torch.bool, device=x.device)
        extra = {"causal": ones.tril(), "anti_causal": ones.triu(),
                 "causal_offset": ones.tril(diagonal=1),
                 "sliding_window": ones.tril() & ones.triu(diagonal=-2)}.get(self.kind)
        if extra is not None:
            keep = keep & extra
        if self.kind == "position_bias":  # ALiBi-like: -0.25 |i - j| (float aranges: TVM 0.27
            # imports int64 * 0.25 as an int64 product, which torch promotes to float)
            pos = torch.arange(s, device=x.device, dtype=torch.float32)
            scores = scores - 0.25 * (pos[None, :] - pos[:, None]).abs()
        if self.kind == "where":
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        else:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 32)


@pytest.mark.parametrize("kind,side,fused", [
    ("padding", "right", True), ("where", "right", True), ("causal", "right", True),
    ("causal", "left", True),
    ("anti_causal", "right", False), ("causal_offset", "right", False),
    ("sliding_window", "right", False), ("position_bias", "right", False),
])
def test_hand_written_masked_fill(kind, side, fused):
    """Padding and padding + causal masks applied with masked_fill / torch.where are fused; a
    sliding window, the upper triangle, a shifted triangle or an additive bias are left alone.
    Either way the compiled block gives PyTorch's result at every real position."""
    from tvm.relax.frontend.torch import from_exported_program

    model = HandWritten(kind).eval()
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)
    b, s = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(model, (x, mask),
                             dynamic_shapes={"x": {0: b, 1: s}, "mask": {0: b, 1: s}})
    mod, counts = fuse_masked_attention(from_exported_program(ep), padding_side=side)
    assert counts == {"main": int(fused)}
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(1)
    for batch, seq in [(3, 11), (2, 16)]:
        lengths = rng.integers(1, seq + 1, batch)
        pos = np.arange(seq)[None]
        real = pos >= seq - lengths[:, None] if side == "left" else pos < lengths[:, None]
        xs = rng.standard_normal((batch, seq, 32)).astype("float32")
        with torch.no_grad():
            ref = model(torch.from_numpy(xs), torch.from_numpy(real.astype("int64"))).numpy()
        out = vm["main"](tvm.runtime.tensor(xs),
                         tvm.runtime.tensor(real.astype("int64")))[0].numpy()
        np.testing.assert_allclose(out[real], ref[real], atol=2e-5)
