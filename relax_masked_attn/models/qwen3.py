"""Qwen3-family decoders (Qwen3, Qwen3-Embedding) with masked attention, as ``nn.Module``.

Module and parameter names follow Hugging Face's ``Qwen3Model``. Batches are left-padded so the
last real token of every row sits in the last column; the layers run on the packed real tokens,
attention through ``packed_sequence_prefill(causal=True)``, and the embedding is the final
norm's last row, L2-normalized.
"""

from __future__ import annotations

import dataclasses

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .common import Embedding, PackedBatch, l2_normalize, rope, rope_tables


@dataclasses.dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # transformers' default; Qwen3 checkpoints set 1e6
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (silu)")


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        self.cfg = cfg
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = nn.RMSNorm(hd, axes=-1, epsilon=cfg.rms_norm_eps, bias=False)
        self.k_norm = nn.RMSNorm(hd, axes=-1, epsilon=cfg.rms_norm_eps, bias=False)

    def forward(self, x: nn.Tensor, batch: PackedBatch, rope_cos_sin) -> nn.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.q_norm(op.reshape(self.q_proj(x), (t, hq, hd)))
        k = self.k_norm(op.reshape(self.k_proj(x), (t, hkv, hd)))
        v = op.reshape(self.v_proj(x), (t, hkv, hd))
        q, k = rope(q, rope_cos_sin, "rope_q"), rope(k, rope_cos_sin, "rope_k")
        out = batch.attention(q, k, v, causal=True)
        return self.o_proj(op.reshape(out, (t, hq * hd)))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, axes=-1, epsilon=eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(
            cfg.hidden_size, axes=-1, epsilon=eps, bias=False
        )

    def forward(self, x: nn.Tensor, batch: PackedBatch, rope_cos_sin) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, rope_cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Embedder(nn.Module):
    """``Qwen3Model`` plus last-token pooling and L2 normalization.

    ``forward(input_ids, attention_mask, token_index)``: ids and mask ``[batch, seq]`` int32,
    left-padded, each row's mask one block of ones at the end; ``token_index`` ``[t]`` int32 the
    flat indices of the mask's ones (``numpy.flatnonzero(mask)``), which the layers run on
    (:class:`~relax_masked_attn.models.common.PackedBatch`). Returns ``[batch, hidden]``.
    ``hidden_states`` returns the final norm's ``[batch, seq, hidden]``.
    """

    padding_side = "left"

    def __init__(self, cfg: Qwen3Config, normalize: bool = True):
        self.config, self.normalize = cfg, normalize
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, axes=-1, epsilon=cfg.rms_norm_eps, bias=False)

    def hidden_states(self, input_ids: nn.Tensor, attention_mask: nn.Tensor,
                      token_index: nn.Tensor) -> nn.Tensor:
        batch = PackedBatch(attention_mask, token_index, self.padding_side)
        cfg = self.config
        x = self.embed_tokens(batch.to_packed(input_ids))
        tables = rope_tables(batch.positions(), cfg.rope_theta, cfg.head_dim, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, tables)
        return batch.to_padded(self.norm(x))

    def forward(self, input_ids: nn.Tensor, attention_mask: nn.Tensor,
                token_index: nn.Tensor) -> nn.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, token_index)
        seq = hidden.shape[1]
        last = op.wrap_nested(
            relax.op.strided_slice(hidden._expr, axes=[1], begin=[seq - 1], end=[seq],
                                   assume_inbound=True), "last_row"
        )  # (b, 1, h): left padding puts every row's last real token in the last column
        # (in bounds: seq >= 1; the plain form's shape carries a clamp that LiftTransformParams
        # cannot type)
        last = op.squeeze(last, axis=1)
        return l2_normalize(last) if self.normalize else last
