"""One PrimFunc per set of arguments: kernel generators are pure, and a model asks for the same
few kernels at every layer (BERT-base: 72 products of 4 kinds, 12 attention calls of one kind)
while parsing one TVMScript kernel takes 0.1-0.5 s. Parsing one for every call is 164 s of a
212 s compile of BERT-base for ``sm_90a`` (cProfile, a 2-core machine); with the results kept
that compile takes 12 s."""

from __future__ import annotations

import functools

from .macro_lookup import quick_macro_lookup

# Results kept per generator: every kernel of a few models at once, and a bound on what a
# long-running process that compiles many models holds.
MAX_KERNELS = 64


def memoized(generator):
    """``generator`` with its last :data:`MAX_KERNELS` results kept (the PrimFuncs it returns
    are immutable, so callers may share them). Calls whose arguments cannot be hashed (a list
    of tiles) run the generator itself. The generator runs under
    :func:`~relax_masked_attn.kernels.macro_lookup.quick_macro_lookup`."""

    def generate(*args, **kwargs):
        with quick_macro_lookup():
            return generator(*args, **kwargs)

    cached = functools.lru_cache(maxsize=MAX_KERNELS)(generate)

    @functools.wraps(generator)
    def call(*args, **kwargs):
        try:
            hash((args, tuple(kwargs.items())))
        except TypeError:
            return generate(*args, **kwargs)
        return cached(*args, **kwargs)

    call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear
    return call
