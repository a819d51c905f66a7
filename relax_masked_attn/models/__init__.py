"""The embedding model architectures, as ``nn.Module``s named like the Hugging Face ones.

Reading a checkpoint folder into one of them is :mod:`relax_masked_attn.checkpoint`'s job.
"""

from __future__ import annotations

from .bert import BertConfig, BertEmbedder
from .qwen3 import Qwen3Config, Qwen3Embedder

# model_type (config.json) -> the module that embeds with it
MODULES = {"bert": BertEmbedder, "qwen3": Qwen3Embedder}
SUPPORTED = {"bert": "BERT family (BERT, MiniLM, bge, e5)",
             "qwen3": "Qwen3 family (Qwen3, Qwen3-Embedding)"}

__all__ = ["MODULES", "SUPPORTED", "BertConfig", "BertEmbedder", "Qwen3Config", "Qwen3Embedder"]
