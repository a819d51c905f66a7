"""TMA in apache-tvm 0.27 (``kernels/hopper.py``): a tensor map encoded on the host, boxes of
rows copied to shared memory by ``cp.async.bulk.tensor`` behind an mbarrier, landing in the
128-byte-swizzled layout that the ``wgmma`` descriptors read. What a warp-specialized Hopper
kernel would build on; checked here with a kernel that copies a tensor through it."""


import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from relax_masked_attn.kernels.hopper import (
    TILE_COLUMNS,
    encode_row_tiles,
    init_barrier,
    load_row_tile,
    realign_pool,
    wait_barrier,
)

SM90A = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
BOX = 64  # rows a copy


def tile_copy(dtype: str):
    """``out[r, c] = x[r, c]`` for the ``[m, 64]`` tensor ``x``, each block moving one box of
    BOX rows through TMA into shared memory and out of it by the swizzle rule (chunk ``c`` of
    row ``r`` at ``c ^ (r % 8)``); ``out`` has whole boxes (``mp`` rows), so the rows of the
    last box past ``m`` show what TMA filled in."""

    @T.prim_func
    def copy(x_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        mp = T.int32()
        x = T.match_buffer(x_handle, (m, TILE_COLUMNS), dtype)
        out = T.match_buffer(out_handle, (mp, TILE_COLUMNS), dtype)
        tmap: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode_row_tiles(tmap, x.data, dtype, m, TILE_COLUMNS, BOX)
        bx = T.launch_thread("blockIdx.x", (m + BOX - 1) // BOX)
        tx = T.launch_thread("threadIdx.x", 128)
        smem = T.alloc_buffer((BOX * TILE_COLUMNS + 512,), dtype, scope="shared.dyn")
        bar = T.alloc_buffer((1,), "uint64", scope="shared")
        base = T.alloc_buffer((2,), "uint32", scope="local")
        realign_pool(base, smem)
        pad = T.alloc_buffer((1,), "int32", scope="local")  # elements to the 1 KiB boundary
        pad[0] = T.Cast("int32", base[1])
        if tx == 0:
            init_barrier(bar.ptr_to([0]), 1)
        T.tvm_storage_sync("shared")
        if tx == 0:
            load_row_tile(smem.ptr_to([pad[0]]), tmap, bx * BOX, 0, bar.ptr_to([0]),
                          BOX * TILE_COLUMNS * 2)
        wait_barrier(bar.ptr_to([0]), 0)
        for it in T.serial(BOX * 8 // 128):
            r = it * 16 + tx // 8
            c = tx % 8
            if bx * BOX + r < mp:
                for e in T.serial(8):
                    out[bx * BOX + r, c * 8 + e] = smem[pad[0] + r * 64 + (c ^ (r % 8)) * 8 + e]

    return copy


def copy_source(dtype: str) -> tuple[str, str]:
    ex = tvm.compile(tvm.IRModule({"main": tile_copy(dtype)}), target=SM90A)
    return ex.mod.imports[0].inspect_source(), ex.mod.inspect_source()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_tile_copy_compiles_to_tma(dtype):
    """The kernel takes the tensor map by value, copies with cp.async.bulk.tensor behind an
    mbarrier, and its host code encodes the map through the CUDA runtime."""
    device, host = copy_source(dtype)
    assert "const __grid_constant__ CUtensorMap tmap" in device
    assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" in device
    assert "mbarrier.arrive.expect_tx.shared.b64" in device
    assert "runtime.cuTensorMapEncodeTiled" in host


def test_ptxas_accepts_the_tile_copy(tmp_path):
    from .conftest import ptxas_report

    ptxas_report(copy_source("float16")[0], "sm_90a", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 64, 100, 300])
def test_tma_copies_boxes_in_the_wgmma_layout(dtype, rows):
    """On a Hopper GPU: every element arrives where the 128-byte swizzle puts it (the copy
    out of shared memory by that rule gives the input back bit for bit), and the rows of the
    last box past the tensor arrive as zeros."""
    import ml_dtypes

    from relax_masked_attn.kernels.cuda_dense import has_wgmma
    from relax_masked_attn.targets import device_cuda_target

    if not has_wgmma(device_cuda_target()):
        pytest.skip("not a Hopper GPU")
    dev = tvm.cuda(0)
    kernel = tvm.compile(tvm.IRModule({"main": tile_copy(dtype)}), target=SM90A)["main"]
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    x = np.random.default_rng(rows).standard_normal((rows, TILE_COLUMNS)).astype(np_dtype)
    padded = -(-rows // BOX) * BOX
    out = tvm.runtime.tensor(np.full((padded, TILE_COLUMNS), 7, np_dtype), device=dev)
    kernel(tvm.runtime.tensor(x, device=dev), out)
    got = out.numpy()
    np.testing.assert_array_equal(got[:rows].view(np.uint16), x.view(np.uint16))
    assert (got[rows:].astype("float32") == 0).all()
