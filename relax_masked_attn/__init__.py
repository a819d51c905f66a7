"""Batched, variable-length attention as a fast Relax operator for Apache TVM.

Importing the package registers the op ``relax_masked_attn.masked_sequence_prefill`` with its
type inference and its legalization, and the Relax pipeline ``"relax_masked_attn"``.
"""

__version__ = "0.1.0"

from . import legalize as _legalize  # noqa: F401  (registers FLegalize)
from . import nn, op, reference, transform
from .embedding import EmbeddingModel
from .modes import MODES
from .op import OP_NAME, masked_sequence_prefill

__all__ = [
    "MODES",
    "OP_NAME",
    "EmbeddingModel",
    "__version__",
    "masked_sequence_prefill",
    "nn",
    "op",
    "reference",
    "transform",
]
