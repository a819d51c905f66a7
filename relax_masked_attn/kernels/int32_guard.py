"""The host-side int32 guard of GPU kernels: a launch whose tensors CUDA kernels cannot index
with int32 fails before it starts, with an error saying so."""

from __future__ import annotations

from tvm import tirx

OVERFLOW = ("{what} is too large for this kernel: it indexes with int32 and needs {bound} < "
            "2**31; split the batch")


def fits_int32(*factors):
    """``prod(factors) < 2**31``, computed in int64 (a host-side check before the launch)."""
    total = tirx.const(1, "int64")
    for factor in factors:
        total = total * tirx.Cast("int64", factor)
    return total < tirx.const(2**31, "int64")
