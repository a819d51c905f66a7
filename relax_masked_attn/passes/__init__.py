"""Relax passes, one a module; :mod:`relax_masked_attn.transform` gathers them."""
