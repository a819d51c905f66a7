"""The four mask modes of ``masked_sequence_prefill`` and the geometry they share.

For batch row ``b`` with ``L = clamp(valid_len[b], 0, min(seq_q, seq_kv))`` every mode picks a
block of ``L`` real queries and ``L`` real keys:

======================  ==========================  ===========================  ===========
mode                    real queries                real keys                    visibility
======================  ==========================  ===========================  ===========
``padded``              ``[0, L)``                  ``[0, L)``                   all pairs
``causal_padded``       ``[0, L)``                  ``[0, L)``                   ``c <= r``
``padded_left``         ``[seq_q - L, seq_q)``      ``[seq_kv - L, seq_kv)``     all pairs
``causal_padded_left``  ``[seq_q - L, seq_q)``      ``[seq_kv - L, seq_kv)``     ``c <= r``
======================  ==========================  ===========================  ===========

where ``r`` and ``c`` count from the start of the real block (for the left-padded causal mode this
is ``col <= row + (seq_kv - seq_q)`` in absolute positions).
"""

from __future__ import annotations

MODES: tuple[str, ...] = ("padded", "causal_padded", "padded_left", "causal_padded_left")


def check_mode(mode: object) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise a ValueError naming them."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"masked_sequence_prefill: mode must be one of {', '.join(map(repr, MODES))}, "
            f"but got {mode!r}"
        )
    return mode


def is_causal(mode: str) -> bool:
    """Whether queries see only keys at or before their own position in the real block."""
    return check_mode(mode).startswith("causal")


def is_left_padded(mode: str) -> bool:
    """Whether the real tokens sit at the end of each row (padding first)."""
    return check_mode(mode).endswith("_left")
