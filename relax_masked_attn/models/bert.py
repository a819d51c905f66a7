"""BERT-family encoders (BERT, MiniLM, bge, e5) with masked attention, as ``nn.Module``.

Module and parameter names follow Hugging Face's ``BertModel`` so checkpoint weights load one to
one. Batches are right-padded; the layers run on the packed real tokens and attention through
``packed_sequence_prefill(causal=False)``.
"""

from __future__ import annotations

import dataclasses

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .common import Embedding, PackedBatch, l2_normalize, mean_pool


@dataclasses.dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (gelu or gelu_new)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that computes in float32 for bfloat16 models (TVM 0.27's layer_norm
    takes float32 and float16 only); parameter names stay ``weight`` and ``bias``."""

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if x.dtype != "bfloat16":
            return super().forward(x)
        weight, bias = (op.astype(p, "float32") for p in (self.weight, self.bias))
        out = op.layer_norm(op.astype(x, "float32"), self.normalized_shape, weight, bias, self.eps)
        return op.astype(out, x.dtype)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: nn.Tensor, positions: nn.Tensor) -> nn.Tensor:
        """Packed ``[t]`` token ids and positions -> ``[t, hidden]``."""
        token_type = self.token_type_embeddings(op.zeros((1,), "int32"))  # one segment: (1, h)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + token_type)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: nn.Tensor, batch: PackedBatch) -> nn.Tensor:
        t, h = x.shape
        q, k, v = (op.reshape(f(x), (t, self.heads, self.head_dim))
                   for f in (self.query, self.key, self.value))  # (t, nh, hd)
        return op.reshape(batch.attention(q, k, v, causal=False), (t, h))


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig, in_features: int):
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: nn.Tensor, residual: nn.Tensor) -> nn.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: nn.Tensor, batch: PackedBatch) -> nn.Tensor:
        return self.output(self.self(x, batch), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.approximate = None if cfg.hidden_act == "gelu" else "tanh"

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.gelu(self.dense(x), approximate=self.approximate)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: nn.Tensor, batch: PackedBatch) -> nn.Tensor:
        x = self.attention(x, batch)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: nn.Tensor, batch: PackedBatch) -> nn.Tensor:
        for layer in self.layer:
            x = layer(x, batch)
        return x


class BertEmbedder(nn.Module):
    """``BertModel`` plus sentence-transformers pooling (mean or CLS) and optional L2 norm.

    ``forward(input_ids, attention_mask, token_index)``: ids and mask ``[batch, seq]`` int32,
    right-padded, each row's mask one block of ones at the start; ``token_index`` ``[t]`` int32
    the flat indices of the mask's ones (``numpy.flatnonzero(mask)``), which the layers run on
    (:class:`~relax_masked_attn.models.common.PackedBatch`). Returns ``[batch, hidden]``.
    ``hidden_states`` returns ``[batch, seq, hidden]`` (padding rows are not meaningful).
    """

    padding_side = "right"

    def __init__(self, cfg: BertConfig, pooling: str = "mean", normalize: bool = True):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', but got {pooling!r}")
        self.config, self.pooling, self.normalize = cfg, pooling, normalize
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def _encode(self, input_ids, attention_mask, token_index):
        batch = PackedBatch(attention_mask, token_index, self.padding_side)
        x = self.embeddings(batch.to_packed(input_ids), batch.positions())
        return batch.to_padded(self.encoder(x, batch)), batch

    def hidden_states(self, input_ids: nn.Tensor, attention_mask: nn.Tensor,
                      token_index: nn.Tensor) -> nn.Tensor:
        return self._encode(input_ids, attention_mask, token_index)[0]

    def forward(self, input_ids: nn.Tensor, attention_mask: nn.Tensor,
                token_index: nn.Tensor) -> nn.Tensor:
        hidden, batch = self._encode(input_ids, attention_mask, token_index)
        if self.pooling == "mean":
            pooled = mean_pool(hidden, attention_mask, batch.valid_len)
        else:
            pooled = op.squeeze(op.split(hidden, [1], axis=1)[0], axis=1)  # the [CLS] row
        return l2_normalize(pooled) if self.normalize else pooled
