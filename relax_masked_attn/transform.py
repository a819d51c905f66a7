"""The passes of this package, in one namespace.

Each lives in a module named for it:

* :mod:`relax_masked_attn.passes.legalize_prefill`: ``LegalizeMaskedPrefill``;
* :mod:`relax_masked_attn.passes.dispatch_dense`: ``DispatchDense``;
* :mod:`relax_masked_attn.passes.dispatch_norm`: ``DispatchNorm``;
* :mod:`relax_masked_attn.passes.vectorizable_gelu`: ``VectorizableGelu``;
* :mod:`relax_masked_attn.passes.dlight_workaround`: ``DisableDlightTensorize``;
* :mod:`relax_masked_attn.fuse_attention`: ``FuseMaskedAttention``, for models imported from
  PyTorch;
* :mod:`relax_masked_attn.pipeline`: the ``"relax_masked_attn"`` pipeline.
"""

from .fuse_attention import FuseMaskedAttention, fuse_masked_attention
from .passes.dispatch_dense import dispatch_dense
from .passes.dispatch_norm import dispatch_norm
from .passes.dlight_workaround import disable_dlight_tensorize
from .passes.legalize_prefill import LegalizeMaskedPrefill
from .passes.vectorizable_gelu import vectorizable_gelu
from .pipeline import PIPELINE_NAME, pipeline_passes

__all__ = [
    "PIPELINE_NAME",
    "FuseMaskedAttention",
    "LegalizeMaskedPrefill",
    "disable_dlight_tensorize",
    "dispatch_dense",
    "dispatch_norm",
    "fuse_masked_attention",
    "pipeline_passes",
    "vectorizable_gelu",
]
