"""Batched, variable-length attention as a fast Relax operator for Apache TVM.

Importing the package registers the ops ``relax_masked_attn.masked_sequence_prefill`` (padded
batches) and ``relax_masked_attn.packed_sequence_prefill`` (sequences packed without padding)
with their type inference and legalization, and the Relax pipeline ``"relax_masked_attn"``.
"""

__version__ = "0.1.0"

from . import legalize as _legalize  # noqa: F401  (registers FLegalize)
from . import nn, op, reference, transform
from .embedding import EmbeddingModel
from .modes import MODES
from .op import OP_NAME, PACKED_OP_NAME, masked_sequence_prefill, packed_sequence_prefill

__all__ = [
    "MODES",
    "OP_NAME",
    "PACKED_OP_NAME",
    "EmbeddingModel",
    "__version__",
    "masked_sequence_prefill",
    "nn",
    "op",
    "packed_sequence_prefill",
    "reference",
    "transform",
]
