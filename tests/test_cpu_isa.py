"""The CPU kernels per vector ISA: what each target's features select, and the code they make.

The ISA comes from the target (its ``mcpu``/``mattr``/``mtriple``), never from the machine that
compiles, so every ISA's build is checked here, whatever this CPU is. Running AArch64 code is out
of reach on an x86-64 machine: its build and its instructions are checked, not its results.
"""

import re

import pytest
import tvm
from tvm import relax

from relax_masked_attn.kernels import cpu_dense
from relax_masked_attn.kernels.cpu import cpu_kernel
from relax_masked_attn.kernels.epilogue import Epilogue
from relax_masked_attn.targets import cpu_isa, cpu_vector_lanes

AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
TARGETS = {
    "llvm": (tvm.target.Target("llvm"), "sse", 4),
    "haswell": (tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), "avx2", 8),
    "znver3": (tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}), "avx2", 8),
    "skylake-avx512": (tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}), "avx512", 16),
    "znver5": (tvm.target.Target({"kind": "llvm", "mcpu": "znver5"}), "avx512", 16),
    "aarch64": (AARCH64, "neon", 4),
}
NEON_FMA = re.compile(r"\bfmla\s+v\d+\.4s")


@pytest.mark.parametrize("name", TARGETS)
def test_isa_comes_from_the_target(name):
    target, isa, lanes = TARGETS[name]
    assert cpu_isa(target) == isa
    assert cpu_vector_lanes(target) == lanes
    tiles = cpu_dense.tiles_for(target)
    assert tiles.cols % lanes == 0 and tiles.lanes == lanes


def asm_of(func, target) -> str:
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                          target=target).inspect_source("asm")


def test_x86_dense_kernel_uses_the_isa_vectors():
    """A Haswell build multiplies-adds on 256-bit ymm registers, a Skylake-AVX512 build on zmm,
    a baseline build on xmm only (it may not assume AVX)."""
    for name, register in (("haswell", "ymm"), ("skylake-avx512", "zmm"), ("llvm", "xmm")):
        target = TARGETS[name][0]
        func = cpu_dense.dense_kernel(384, 384, "float32", Epilogue(), cpu_dense.tiles_for(target))
        asm = asm_of(func, target)
        fma = re.findall(r"\bv?fmadd\d*ps\s+%?(\w+)|\bmulps\s+%?(\w+)", asm)
        assert fma, name
        used = {r for pair in fma for r in pair if r}
        assert all(r.startswith(register) for r in used), (name, used)


@pytest.mark.parametrize("name", ["haswell", "skylake-avx512"])
def test_dense_inner_loop_reads_x_from_registers_only(name):
    """The loop over k of a register block (6 x 16 on AVX2, 12 x 32 on AVX-512) loads each x
    row through one base register at constant distances (the packed rows) and touches no stack
    slot: with a pointer a row, AVX-512's 12 rows outnumber the free general registers and the
    pointers are reloaded from the stack at every step of k."""
    target, _, lanes = TARGETS[name]
    tiles = cpu_dense.tiles_for(target)
    asm = asm_of(cpu_dense.dense_kernel(768, 768, "float32", Epilogue(), tiles), target)
    # each innermost loop's body: from a label to a jump back to it, no label between
    bodies = re.findall(r"^(\.LBB\w+):\n((?:(?!\.LBB\w+:).)*?\n\s+j\w+\s+\1)$", asm,
                        re.S | re.M)
    loops = [block for _, block in bodies
             if len(re.findall(r"vfmadd231ps", block)) == tiles.rows * tiles.cols // lanes]
    full = [block for block in loops
            if len(set(re.findall(r"vbroadcastss\s+-?\d*\((%\w+),", block))) == 1]
    assert full, f"{name}: no loop reads all {tiles.rows} rows of x through one register"
    assert all("(%rsp)" not in block for block in full)


def test_aarch64_kernels_use_neon_fmla():
    dense = cpu_dense.dense_kernel(384, 1536, "float32", Epilogue(True, "gelu", True),
                                   cpu_dense.tiles_for(AARCH64))
    attention = cpu_kernel(12, 12, 32, "float32", "padded", 32**-0.5)
    for func in (dense, attention):
        assert len(NEON_FMA.findall(asm_of(func, AARCH64))) >= 8


def test_aarch64_build_of_minilm(minilm_path):
    """The whole all-MiniLM-L6-v2 model compiles for AArch64 (weights prepacked), and its
    dense and attention kernels are in the library with NEON vector FMAs."""
    from relax_masked_attn.checkpoint import read_spec
    from relax_masked_attn.embedding import export

    mod, _ = export(read_spec(minilm_path), "float32")
    pipeline = relax.get_pipeline("relax_masked_attn", prepack_weights=True)
    ex = tvm.compile(mod, target=AARCH64, relax_pipeline=pipeline)
    asm = "".join(lib.inspect_source("asm") for lib in ex.mod.imports)
    assert "zz_dense_bias_gelu_n1536_k384_float32" in asm
    assert "prefill" in asm
    assert len(NEON_FMA.findall(asm)) >= 100


def test_parallel_bodies_take_only_their_buffers_from_the_workspace_pool():
    """TVM 0.27 takes each buffer of a parallel body, and each scalar bound by a plain assignment
    (``x = ...`` in TVMScript), from its workspace pool, for every parallel part: the kernels
    bind their scalars with ``T.let``, so that the allocations a part makes are its buffers
    alone (the dense kernel's accumulators and packed x rows; the attention kernel's tiles, at
    most 11)."""
    target = TARGETS["haswell"][0]
    dense = cpu_dense.dense_kernel(384, 1536, "float32", Epilogue(True, "gelu", True),
                                   cpu_dense.tiles_for(target))
    attention = cpu_kernel(8, 2, 64, "float32", "causal_padded_left", 0.125, packed=True,
                           isa="avx2")
    for func, buffers in ((dense, 2), (attention, 11)):
        ll = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                            target=target).inspect_source("ll")
        sizes = [int(b) for b in re.findall(r"call ptr %\d+\(i32 1, i32 %dev_id, i64 (\d+)", ll)]
        assert 1 <= len(sizes) <= buffers and min(sizes) > 8, sizes  # no scalar among them
