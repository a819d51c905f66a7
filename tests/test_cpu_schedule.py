"""The CPU schedules our pipeline gives TVM's own ops (elementwise chains, norms, gathers)."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from relax_masked_attn.cpu_schedule import cpu_default_schedule
from relax_masked_attn.targets import host_cpu_target


def module(width: int):
    """main(x [m, width], gamma, beta, index [t]) = gelu(layer_norm(x) * 2 + 1)[index] + 3."""
    m, t = tirx.Var("m", "int64"), tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType((m, width), "float32"))
    gamma = relax.Var("gamma", relax.TensorType((width,), "float32"))
    beta = relax.Var("beta", relax.TensorType((width,), "float32"))
    index = relax.Var("index", relax.TensorType((t,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, gamma, beta, index]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1]))
            y = bb.emit(relax.op.add(relax.op.multiply(y, relax.const(2.0)), relax.const(1.0)))
            y = bb.emit(relax.op.nn.gelu(y))
            y = bb.emit(relax.op.take(y, index, axis=0))
            gv = bb.emit_output(bb.emit(relax.op.add(y, relax.const(3.0))))
        bb.emit_func_output(gv)
    return bb.get()


def scheduled(mod):
    target = host_cpu_target()
    with target:
        seq = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
               relax.transform.FuseOps(), relax.transform.FuseTIR(), cpu_default_schedule()]
        return tvm.transform.Sequential(seq)(mod)


def test_every_legalized_function_gets_a_parallel_loop():
    mod = scheduled(module(384))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert funcs
    for name, func in funcs.items():
        assert "T.parallel" in func.script(), name


@pytest.mark.parametrize("width", [384, 20, 7])  # vectorized by 16, by 4 x 5 (flattened), odd
def test_scheduled_module_matches_torch(width):
    ex = tvm.compile(module(width), target=host_cpu_target(),
                     relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(width)
    x = rng.standard_normal((37, width)).astype("float32")
    gamma, beta = rng.standard_normal((2, width)).astype("float32")
    index = rng.integers(0, 37, 50).astype("int32")
    out = vm["main"](*(tvm.runtime.tensor(a) for a in (x, gamma, beta, index))).numpy()
    y = torch.nn.functional.layer_norm(torch.from_numpy(x), (width,), torch.from_numpy(gamma),
                                       torch.from_numpy(beta), eps=1e-5)
    ref = (torch.nn.functional.gelu(y * 2 + 1)[torch.from_numpy(index).long()] + 3).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
