"""One PrimFunc per set of arguments: kernel generators are pure, and a model asks for the same
few kernels at every layer (BERT-base: 72 products of 4 kinds, 12 attention calls of one kind)
while parsing one TVMScript kernel takes 0.1-0.5 s. Without this, compiling BERT-base for
``sm_90a`` spent 3/4 of its time parsing the same 4 dense kernels 72 times over."""

from __future__ import annotations

import functools

# Results kept per generator: every kernel of a few models at once, and a bound on what a
# long-running process that compiles many models holds.
MAX_KERNELS = 64


def memoized(generator):
    """``generator`` with its last :data:`MAX_KERNELS` results kept (arguments must be hashable;
    the PrimFuncs it returns are immutable, so callers may share them)."""
    return functools.lru_cache(maxsize=MAX_KERNELS)(generator)
