"""``LegalizeMaskedPrefill``: legalize only our two attention ops, anywhere in a pipeline."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._ir import mutate_functions
from ..legalize import legalize
from ..op import OP_NAME, PACKED_OP_NAME


@mutator
class _PrefillLegalizer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.ops = (tvm.ir.Op.get(OP_NAME), tvm.ir.Op.get(PACKED_OP_NAME))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and any(call.op.same_as(op) for op in self.ops):
            return legalize(self.builder_, call)
        return call


@tvm.transform.module_pass(opt_level=0, name="LegalizeMaskedPrefill")
class LegalizeMaskedPrefill:
    """Replace every ``masked_sequence_prefill`` and ``packed_sequence_prefill`` call by
    ``call_tir`` of the target's kernel.

    Leaves every other op alone, so it can stand anywhere in a ``tvm.transform.Sequential``
    before ``LegalizeOps``. The target is the tensors' vdevice, else ``Target.current()``::

        with tvm.target.Target("cuda"):
            mod = LegalizeMaskedPrefill()(mod)
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return mutate_functions(_PrefillLegalizer(mod), mod)
