"""Small Relax IR helpers shared by the passes."""

from __future__ import annotations

import tvm
from tvm import relax


def is_call_of(expr, op_name: str) -> bool:
    """Whether ``expr`` is a call of the registered op ``op_name`` (e.g. ``"relax.matmul"``)."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == op_name)


def mutate_functions(mutator, mod: tvm.IRModule, visit=None) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod`` (through ``visit``, default
    ``mutator.visit_expr``); PrimFuncs it adds are kept."""
    visit = visit or mutator.visit_expr
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, visit(func))
    return mutator.builder_.get()


def as_rows(x: relax.Expr) -> relax.Expr:
    """``x`` viewed as ``[rows, last]``, its leading dimensions flattened into rows (one row for
    a 1-D ``x``): ``x`` itself when it is 2-D, else a ``reshape``."""
    *lead, last = x.ty.shape.values
    if len(lead) == 1:
        return x
    rows = lead[0] if lead else 1
    for dim in lead[1:]:
        rows = rows * dim
    return relax.op.reshape(x, [rows, last])
