"""The nn wrappers inside an nn.Module: export_tvm, compile, run, compare to the reference."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

import relax_masked_attn as rma

from .conftest import assert_matches_reference, random_qkv


class MaskedSelfAttention(nn.Module):
    """Projections around the op, with valid_len derived from a 0/1 attention mask."""

    def __init__(self, hidden, heads_q, heads_kv, mode):
        self.heads_q, self.heads_kv, self.mode = heads_q, heads_kv, mode
        self.head_dim = hidden // heads_q

    def forward(self, q, k, v, mask):
        valid_len = rma.nn.valid_len_from_attention_mask(mask)
        out = rma.nn.masked_sequence_prefill(q, k, v, valid_len, mode=self.mode)
        return out * 1.0  # something after the op, so it fuses into a real graph


@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_export_compile_run(mode):
    heads_q, heads_kv, d = 4, 2, 32
    spec = {
        "forward": {
            "q": nn.spec.Tensor(["batch", "seq", heads_q, d], "float32"),
            "k": nn.spec.Tensor(["batch", "seq", heads_kv, d], "float32"),
            "v": nn.spec.Tensor(["batch", "seq", heads_kv, d], "float32"),
            "mask": nn.spec.Tensor(["batch", "seq"], "int64"),
        }
    }
    mod, _ = MaskedSelfAttention(heads_q * d, heads_q, heads_kv, mode).export_tvm(spec)
    assert rma.OP_NAME in mod["forward"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(1)
    for batch, seq in [(3, 11), (1, 4)]:
        q, k, v = random_qkv(batch, seq, seq, heads_q, heads_kv, d, "float32", rng)
        valid_len = rng.integers(0, seq + 1, batch).astype("int32")
        pos = np.arange(seq)[None, :]
        if mode.endswith("_left"):
            mask = pos >= seq - valid_len[:, None]
        else:
            mask = pos < valid_len[:, None]
        out = vm["forward"](*(tvm.runtime.tensor(x) for x in (q, k, v, mask.astype("int64"))))
        assert_matches_reference(out.numpy(), q, k, v, valid_len, mode)


def test_valid_len_from_mask_needs_2d():
    class Bad(nn.Module):
        def forward(self, mask):
            return rma.nn.valid_len_from_attention_mask(mask)

    with pytest.raises(ValueError, match="mask should have 2 dimensions"):
        Bad().export_tvm({"forward": {"mask": nn.spec.Tensor([2, 3, 4], "int32")}})
