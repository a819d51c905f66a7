"""The NumPy reference against torch's scaled_dot_product_attention with a boolean mask."""

import numpy as np
import pytest
import torch

from relax_masked_attn import MODES, reference

from .conftest import random_qkv


def torch_masked_sdpa(q, k, v, valid_len, mode, sm_scale=None):
    """torch SDPA with an explicit [batch, 1, seq_q, seq_kv] boolean mask built for ``mode``."""
    batch, seq_q, heads_q, _ = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    n = torch.from_numpy(np.clip(valid_len, 0, min(seq_q, seq_kv)).astype("int64"))[:, None]
    rows, cols = torch.arange(seq_q)[None, :], torch.arange(seq_kv)[None, :]
    if mode.endswith("_left"):
        q_real, kv_real = rows >= seq_q - n, cols >= seq_kv - n
        rel_r, rel_c = rows - (seq_q - n), cols - (seq_kv - n)
    else:
        q_real, kv_real = rows < n, cols < n
        rel_r, rel_c = rows, cols
    mask = q_real[:, :, None] & kv_real[:, None, :]
    if mode.startswith("causal"):
        mask &= rel_c[:, None, :] <= rel_r[:, :, None]
    t = [torch.from_numpy(x.astype("float64")).transpose(1, 2) for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(
        t[0], t[1], t[2], attn_mask=mask[:, None], scale=sm_scale,
        enable_gqa=heads_q != heads_kv,
    ).transpose(1, 2)
    return out.numpy(), q_real.numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq_q,seq_kv", [(9, 9), (5, 11)])
def test_reference_matches_torch(mode, seq_q, seq_kv):
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(4, seq_q, seq_kv, 4, 2, 16, "float64", rng)
    valid_len = np.array([0, 3, min(seq_q, seq_kv), 99], dtype="int32")  # 99 is clamped
    ours = reference.masked_sequence_prefill(q, k, v, valid_len, mode, sm_scale=0.3)
    theirs, q_real = torch_masked_sdpa(q, k, v, valid_len, mode, sm_scale=0.3)
    np.testing.assert_allclose(ours[q_real], theirs[q_real], atol=1e-12)
    assert (ours[~q_real] == 0).all()
