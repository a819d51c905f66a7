"""The GPU vector schedule our pipeline gives TVM's own elementwise ops and gathers."""

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

import relax_masked_attn  # noqa: F401  (registers the "relax_masked_attn" pipeline)

from .conftest import SM90 as CUDA


def module(width: int, dtype: str, shift: int):
    """main(x [m, width], bias [width], index [t]) = (x[index] + bias)[:, shift:] * 2 + 1."""
    m, t = tirx.Var("m", "int64"), tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType((m, width), dtype))
    bias = relax.Var("bias", relax.TensorType((width,), dtype))
    index = relax.Var("index", relax.TensorType((t,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, bias, index]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.take(x, index, axis=0, mode="clip"), bias))
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[shift], end=[width]))
            y = relax.op.add(relax.op.multiply(y, relax.const(2.0, dtype)), relax.const(1.0, dtype))
            gv = bb.emit_output(bb.emit(y))
        bb.emit_func_output(gv)
    return bb.get()


def cuda_kernels(mod) -> dict[str, str]:
    """Generated CUDA source of each kernel, by name."""
    ex = tvm.compile(mod, target=CUDA, relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    source = ex.mod.imports[0].imports[0].inspect_source()
    parts = re.split(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    return {name: body for name, body in zip(parts[1::2], parts[2::2])
            if "{" in body.split(";")[0]}  # definitions, not declarations


@pytest.mark.parametrize("dtype, vector", [("float16", "uint4"), ("float32", "float4")])
def test_aligned_chain_runs_on_16_byte_vectors(dtype, vector):
    kernels = cuda_kernels(module(768, dtype, shift=0))
    assert kernels and all(f"*({vector}*)" in body for body in kernels.values())


@pytest.mark.parametrize("shift, width", [(1, 768), (0, 20)])
def test_misaligned_or_short_rows_keep_scalar_accesses(shift, width):
    """A slice starting off a vector boundary, or rows not a multiple of 8 halves: no vector
    access may be emitted (it would fault on a misaligned address)."""
    kernels = cuda_kernels(module(width, "float16", shift=shift))
    sliced = [body for name, body in kernels.items() if "strided_slice" in name]
    assert sliced and all("*(uint4*)" not in body for body in sliced)


@pytest.mark.parametrize("kind", ["vulkan", "rocm", "llvm"])
def test_other_targets_are_left_to_dlight(kind):
    from relax_masked_attn.gpu_schedule import GPUInjective

    with tvm.target.Target(kind) as target:
        mod = relax.transform.LegalizeOps()(module(768, "float16", shift=0))
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert funcs and all(GPUInjective().apply(f, target, False) is None for f in funcs)
    assert GPUInjective().apply(funcs[0], CUDA, False) is not None  # the same function on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shift, width", [(0, 768), (8, 768), (1, 768), (0, 20)])
def test_scheduled_chain_matches_torch_on_gpu(dtype, shift, width):
    ex = tvm.compile(module(width, dtype, shift), target="cuda",
                     relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(ex, dev)
    rng = np.random.default_rng(width + shift)
    x = rng.standard_normal((37, width)).astype(dtype)
    bias = rng.standard_normal(width).astype(dtype)
    index = rng.integers(-3, 40, 1001).astype("int32")  # out-of-range ids clip
    out = vm["main"](*(tvm.runtime.tensor(a, dev) for a in (x, bias, index))).numpy()
    rows = torch.from_numpy(np.clip(index, 0, 36)).long()
    ref = ((torch.from_numpy(x)[rows] + torch.from_numpy(bias))[:, shift:] * 2 + 1).numpy()
    np.testing.assert_allclose(out.astype("float32"), ref.astype("float32"), rtol=2e-3, atol=2e-3)
