"""Embedding quantization with sentence-transformers' semantics
(``sentence_transformers.quantization.quantize_embeddings``), in NumPy.

* ``float32``: unchanged;
* ``int8`` / ``uint8``: each dimension's ``[min, max]`` over the embeddings (or ``ranges``, a
  ``[2, dim]`` array) cut into 256 buckets; ``floor((x - min) / step)`` clipped to ``[0, 255]``,
  minus 128 for ``int8``;
* ``binary`` / ``ubinary``: one bit a dimension, ``x > 0``, packed 8 to a byte (``dim / 8``
  bytes), minus 128 as int8 for ``binary``.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def quantize_embeddings(embeddings: np.ndarray, precision: str,
                        ranges: np.ndarray | None = None) -> np.ndarray:
    """``embeddings`` ``[n, dim]`` float in ``precision`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, but got {precision!r}")
    embeddings = np.asarray(embeddings)
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("int8"):
        if ranges is None:
            if embeddings.ndim == 1 or embeddings.shape[0] < 2:
                raise ValueError(f"{precision} quantization needs the per-dimension ranges of "
                                 "several embeddings: encode at least two texts, or pass ranges")
            ranges = np.vstack((embeddings.min(axis=0), embeddings.max(axis=0)))
        ranges = np.asarray(ranges, dtype=np.float32)
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        codes = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    packed = np.packbits(embeddings > 0, axis=-1)
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
