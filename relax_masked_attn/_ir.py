"""Small Relax IR helpers shared by the passes."""

from __future__ import annotations

import tvm
from tvm import relax


def is_call_of(expr, op_name: str) -> bool:
    """Whether ``expr`` is a call of the registered op ``op_name`` (e.g. ``"relax.matmul"``)."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == op_name)
