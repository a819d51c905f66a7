"""CPU-only checks of the CUDA code the tensor-core kernel generates (no GPU needed)."""

import math

import pytest
import tvm

from relax_masked_attn import MODES
from relax_masked_attn.kernels import cuda_mma

from .conftest import SM90, op_module, ptxas_report


def cuda_source(mod, target=SM90):
    return tvm.compile(mod, target=target).mod.imports[0].imports[0].inspect_source()


@pytest.mark.parametrize("dtype,ab", [("float16", "f16"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("mode", MODES)
def test_tensor_core_instructions_are_generated(mode, dtype, ab):
    """Catches a silent fallback: the plain tvm.compile route must emit mma/ldmatrix/cp.async."""
    src = cuda_source(op_module(16, 8, 128, dtype, mode))
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in src
    assert "cp.async.cg.shared.global" in src


def test_shared_tiles_keep_their_full_size():
    """The default TIR pipeline must not compact the shared tiles touched only through pointers;
    past 48 KiB (head_dim 128) they are views of one dynamic pool, K's at Q's size, V's after."""
    from relax_masked_attn.kernels.config import tensor_core_tiles

    warps, atoms, cols, *_ = tensor_core_tiles(64, "float16")
    src = cuda_source(op_module(16, 8, 64, "float16", "padded"))
    assert src.count(f"half q_smem_ptr[{warps * atoms * 16 * 64}]") == 1
    assert src.count(f"half k_smem_ptr[{cols * 64}]") == 1
    assert src.count(f"half v_smem_ptr[{cols * 64}]") == 1
    warps, atoms, cols, *_ = tensor_core_tiles(128, "float16")
    src = cuda_source(op_module(16, 8, 128, "float16", "padded"))
    assert "extern __shared__" in src and "q_smem_ptr[" not in src
    rows = warps * atoms * 16
    assert f"* 8)) + {rows * 128})]" in src and f"* 8)) + {(rows + cols) * 128})]" in src


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
@pytest.mark.parametrize("head_dim,mode", [(128, "causal_padded_left"), (64, "padded")])
def test_ptxas_accepts_the_kernel_for_every_sm80_class_gpu(arch, head_dim, mode, tmp_path):
    """nvcc's ptxas compiles the CUDA source for the GPU itself: an A100 (sm_80) allows a kernel
    48 KiB of static shared memory, so head_dim 128's 64 KiB of tiles must be dynamic."""
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    ptxas_report(cuda_source(op_module(16, 8, head_dim, "float16", mode), target), arch,
                 tmp_path)


@pytest.mark.parametrize(
    "target,head_dim,dtype,expected",
    [
        (SM90, 128, "float16", True),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_80"}), 64, "bfloat16", True),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_75"}), 64, "float16", False),
        (SM90, 128, "float32", False),
        (SM90, 80, "float16", False),
        (tvm.target.Target("vulkan"), 64, "float16", False),
    ],
)
def test_kernel_choice(target, head_dim, dtype, expected):
    assert cuda_mma.supports(target, head_dim, dtype) is expected


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_kernel_is_well_formed(head_dim):
    func = cuda_mma.tensor_core_kernel(8, 2, head_dim, "float16", "causal_padded",
                                       1 / math.sqrt(head_dim))
    assert tvm.tirx.analysis.verify_well_formed(func)
    src = tvm.compile(tvm.IRModule({"main": func}), target=SM90).mod.imports[0].inspect_source()
    assert "mma.sync" in src


def test_two_different_calls_get_two_kernels():
    """Calls with different modes in one module compile to distinctly named CUDA kernels."""
    from tvm import relax

    import relax_masked_attn as rma

    main = op_module(8, 2, 64, "float16", "padded")["main"]
    bb = relax.BlockBuilder()
    with bb.function("main", list(main.params)):
        q, k, v, n = main.params
        a = bb.emit(rma.masked_sequence_prefill(q, k, v, n, "padded"))
        b = bb.emit(rma.masked_sequence_prefill(a, k, v, n, "causal_padded_left"))
        bb.emit_func_output(b)
    src = cuda_source(bb.get())
    assert "zz_masked_prefill_padded_h8_2_d64_float16_kernel" in src
    assert "zz_masked_prefill_causal_padded_left_h8_2_d64_float16_kernel" in src


@pytest.mark.parametrize("dtype,ab", [("float16", "f16"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90a_gets_the_wgmma_kernel(mode, dtype, ab, head_dim):
    """On sm_90a both products run on wgmma: S from two shared-memory descriptors, O += P V with
    P in registers and V through a transposed (MN-major) descriptor; no mma.sync left."""
    sm90a = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    src = cuda_source(op_module(16, 8, head_dim, dtype, mode), sm90a)
    assert f"wgmma.mma_async.sync.aligned.m64n64k16.f32.{ab}.{ab}" in src
    assert f"wgmma.mma_async.sync.aligned.m64n{head_dim}k16.f32.{ab}.{ab}" in src
    assert "fence.proxy.async.shared::cta" in src
    assert "mma.sync.aligned.m16n8k16" not in src


@pytest.mark.parametrize("packed", [False, True])
def test_wgmma_kernel_is_well_formed(packed):
    from relax_masked_attn.kernels import cuda_wgmma

    func = cuda_wgmma.wgmma_attention_kernel(8, 2, 128, "bfloat16", "causal_padded", 0.1,
                                             packed=packed)
    assert tvm.tirx.analysis.verify_well_formed(func)


@pytest.mark.parametrize(
    "target,head_dim,dtype,expected",
    [
        (tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}), 128, "float16", True),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}), 64, "bfloat16", True),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}), 32, "float16", False),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}), 128, "float32", False),
        (SM90, 128, "float16", False),
    ],
)
def test_wgmma_kernel_choice(target, head_dim, dtype, expected):
    from relax_masked_attn.kernels import cuda_wgmma

    assert cuda_wgmma.supports(target, head_dim, dtype) is expected


def test_int32_indexing_is_guarded_before_the_launch():
    """The CUDA kernels index with int32; the host code checks the sizes first (a clear error
    for a batch too large, not a silent overflow)."""
    import relax_masked_attn as rma
    from relax_masked_attn.kernels import cuda_dense

    for mod in (op_module(16, 8, 128, "float16", "padded"),
                rma.op.standalone_packed_module(16, 8, 128, "float16", True, 512)):
        host = tvm.compile(mod, target=SM90).mod.imports[0].inspect_source()
        assert "indexes with int32" in host and "split the batch" in host
    dense = cuda_dense.dense_kernel(256, 128, "float16")
    host = tvm.compile(tvm.IRModule({"main": dense}), target=SM90).mod.inspect_source()
    assert "dense kernel (256x128) is too large" in host


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("packed", [False, True])
def test_staged_output_stores_16_bytes_without_spilling(head_dim, packed, tmp_path):
    """The output staged through the Q tile (``tensor_core_tiles``' last field): the real rows
    leave in 16-byte vectors read from shared memory in one piece (not gathered word by word),
    and nvcc's ptxas builds it for sm_80 spilling at most 16 bytes at head_dim 32 and 64; at
    128, where both forms spill at the 255-register cap, the staged one at most 32 bytes more
    (``config.tensor_core_tiles``)."""
    import re

    from relax_masked_attn.kernels.config import tensor_core_tiles

    sm80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    spills = []
    for staged in (False, True):
        tiles = (*tensor_core_tiles(head_dim, "float16")[:4], staged)
        func = cuda_mma.tensor_core_kernel(8, 4, head_dim, "float16", "padded", 0.125,
                                           tiles=tiles, packed=packed)
        src = tvm.compile(tvm.IRModule({"main": func}), target=sm80).mod.imports[0].inspect_source()
        stores = re.findall(r"\*\(uint4\*\)\(\(\(uint\*\)out\w*\) \+", src)
        assert bool(stores) == staged
        assert "make_uint4" not in src
        report = ptxas_report(src, "sm_80", tmp_path)
        spills.append(int(re.search(r"(\d+) bytes spill stores", report).group(1)))
    if head_dim < 128:
        assert spills[1] <= 16
    else:
        assert spills[1] <= spills[0] + 32


@pytest.mark.parametrize("head_dim,blocks,keys", [(64, 2, 64), (128, 1, 64), (64, 1, 128),
                                                 (128, 1, 128)])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
@pytest.mark.parametrize("packed", [False, True])
def test_overlapped_wgmma_kernel_keeps_its_products_asynchronous(head_dim, blocks, keys, mode,
                                                                 packed, tmp_path):
    """The softmax-overlapping loop (``WgmmaAttentionTiles.overlap``): each key tile issues S
    of the next before O += P V of this one and waits for all but the last group, and nvcc's
    ptxas builds it (64-key tiles: two blocks an SM at head_dim 64, one at 128; 128-key tiles:
    one) with no spills and no serialized wgmma."""
    import re

    from relax_masked_attn.kernels import cuda_wgmma

    func = cuda_wgmma.wgmma_attention_kernel(8, 4, head_dim, "float16", mode, 0.1, packed=packed,
                                             tiles=(blocks, False, 2, True, True, keys))
    sm90a = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    src = tvm.compile(tvm.IRModule({"main": func}), target=sm90a).mod.imports[0].inspect_source()
    wait1 = src.index("wgmma_wait_group_wait_group_sync_aligned_1();")  # the call
    s_next = src.rindex(f"ss_mma_async_sync_aligned_m64n{keys}k16", 0, wait1)
    pv = src.rindex(f"rs_mma_async_sync_aligned_m64n{head_dim}k16", 0, wait1)
    assert s_next < pv  # S(kt + 1) issued, then O += P V(kt), then the wait for S alone
    with pytest.raises(ValueError, match="2 stages"):
        cuda_wgmma.wgmma_attention_kernel(8, 4, head_dim, "float16", mode, 0.1,
                                          tiles=(blocks, True, 2, True, True, keys))
    report = ptxas_report(src, "sm_90a", tmp_path)
    assert re.search(r"\b0 bytes spill stores", report)
    assert "C7512" not in report


@pytest.mark.parametrize("head_dim,blocks,keys,overlap", [
    (64, 2, 64, False), (128, 2, 64, False), (128, 1, 128, False), (64, 2, 64, True),
    (128, 1, 64, True)])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
@pytest.mark.parametrize("packed", [False, True])
def test_wgmma_kernel_with_tma_copies(head_dim, blocks, keys, overlap, mode, packed, tmp_path):
    """K and V by TMA (``WgmmaAttentionTiles.tma_kv``), in the serial and the overlapped loop:
    the kernel takes both tensor maps, one thread copies each tile's boxes (``head_dim / 64`` of
    K or of V) behind their barrier, every thread waits on it, and the V rows past the real keys
    are zeroed before the products; Q still arrives by ``cp.async``. nvcc's ptxas builds it
    without serialized wgmma."""
    import re

    from relax_masked_attn.kernels import cuda_wgmma

    tiles = (blocks, False, 2, True, overlap, keys, True)
    func = cuda_wgmma.wgmma_attention_kernel(8, 4, head_dim, "float16", mode, 0.1, packed=packed,
                                             tiles=tiles)
    sm90a = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    src = tvm.compile(tvm.IRModule({"main": func}), target=sm90a).mod.imports[0].inspect_source()
    kernel = src[src.rindex("__launch_bounds__"):]
    assert "const __grid_constant__ CUtensorMap k_map" in kernel
    assert "const __grid_constant__ CUtensorMap v_map" in kernel
    copies = re.findall(r"async_bulk_tensor_3d\w*\(", kernel)
    # the first tiles' and the next ones' (overlapped: K(0), K(1), V(0); K(kt + 2), V(kt + 1))
    assert len(copies) == (5 if overlap else 4) * head_dim // 64
    assert "mbarrier_try_wait_parity" in kernel and "cp_async_cg" in kernel  # Q: cp.async
    assert "make_uint4((uint)0, (uint)0, (uint)0, (uint)0)" in kernel  # V's tail zeroed
    deferred = (blocks, True, 2, True, False, keys, True)
    one_stage = (blocks, False, 1, True, False, keys, True)
    for bad in (deferred, one_stage):
        with pytest.raises(ValueError):
            cuda_wgmma.wgmma_attention_kernel(8, 4, head_dim, "float16", mode, 0.1, tiles=bad)
    assert "C7512" not in ptxas_report(src, "sm_90a", tmp_path)


@pytest.mark.parametrize("head_dim,keys,overlap", [
    (64, 64, False), (128, 64, False), (128, 128, False), (64, 64, True), (128, 128, True)])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
@pytest.mark.parametrize("packed", [False, True])
def test_warp_specialized_wgmma_block(head_dim, keys, overlap, mode, packed, tmp_path):
    """The warp-specialized block (``WgmmaAttentionTiles.specialized``, FlashAttention-3's
    structure): 384 threads, one block an SM, persistent (a loop over its work items); one
    block-wide barrier (after the mbarriers are set up); the producer warpgroup gives registers
    to the consumers and copies Q, K and V by TMA (three tensor maps; Q's tile once both
    consumers are done with the last, a stage once both released it); the consumers take turns
    issuing S = Q K^T (named barriers 1 and 2, warpgroup 2 giving warpgroup 1 the first turn)
    and stage their output through shared memory by ``st.shared`` / ``ld.shared`` behind their
    own named barriers (3, 4); with ``overlap`` each turn issues S of the next key tile and O +=
    P V of this one, and waits for all but the last group. nvcc's ptxas builds it (64- or
    128-key tiles) with no spills and no serialized wgmma. Other layouts are refused."""
    import re

    from relax_masked_attn.kernels import cuda_wgmma

    tiles = (1, False, 2, True, overlap, keys, True, True)
    func = cuda_wgmma.wgmma_attention_kernel(8, 4, head_dim, "float16", mode, 0.1, packed=packed,
                                             tiles=tiles)
    sm90a = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    src = tvm.compile(tvm.IRModule({"main": func}), target=sm90a).mod.imports[0].inspect_source()
    kernel = src[src.rindex("__launch_bounds__(384, 1)"):]
    for name in ("q_map", "k_map", "v_map"):
        assert f"const __grid_constant__ CUtensorMap {name}" in kernel
    body = kernel[kernel.index("{"):]
    assert body.count("__syncthreads()") == 1
    assert body.count("setmaxnreg_dec_sync_aligned_u32_40()") == 1
    assert body.count("setmaxnreg_inc_sync_aligned_u32_232()") == 1
    # Q's boxes, then K's and V's of a query tile's first key tile and of the others (each
    # head_dim / 64 boxes of 64 columns)
    assert len(re.findall(r"async_bulk_tensor_3d\w*\(", body)) == 5 * head_dim // 64
    assert "cp_async_cg" not in body  # no thread copies Q
    assert body.count("bar_arrive_arrive((uint)1, (uint)256)") == 1  # warpgroup 1 goes first
    assert "bar_sync_count_sync(((uint)1 + ((uint)wg" in body
    assert "bar_arrive_arrive(((uint)2 - ((uint)wg" in body
    assert "ptx_st_shared_b32" in body and "ptx_ld_vec_shared_v4_b32" in body
    assert "mbarrier_init_init_shared_b64" in body
    if overlap:
        wait1 = body.index("wgmma_wait_group_wait_group_sync_aligned_1();")
        s_next = body.rindex(f"ss_mma_async_sync_aligned_m64n{keys}k16", 0, wait1)
        pv = body.rindex(f"rs_mma_async_sync_aligned_m64n{head_dim}k16", 0, wait1)
        turn = body.rindex("bar_arrive_arrive(((uint)2 - ((uint)wg", 0, wait1)
        assert s_next < pv < turn  # S(kt + 1), O += P V(kt), the turn handed over, the wait
    for bad in ((2, False, 2, True, False, 64, True, True), (1, False, 2, True, False, 64, False,
                                                             True)):
        with pytest.raises(ValueError, match="warp-specialized"):
            cuda_wgmma.wgmma_attention_kernel(8, 4, head_dim, "float16", mode, 0.1, tiles=bad)
    report = ptxas_report(src, "sm_90a", tmp_path)
    entry = report[report.index("Compiling entry function 'masked_prefill_kernel'"
                                if not packed else "Compiling entry function 'packed_prefill"):]
    assert re.search(r"\b0 bytes spill stores", entry.split("Compiling entry")[1])
    assert "C7512" not in report


@pytest.mark.parametrize("sm_scale", [1e-12, 0.125, 1e6])
def test_tensor_core_kernels_build_for_any_positive_scale(sm_scale):
    """The softmax masks raw scores with ``NEG_INF / scale`` (``fragment_softmax``): a tiny
    scale would make that a literal beyond float32, which TVM refuses; it is held at float32's
    lowest value, and both kernels build."""
    from relax_masked_attn.kernels import cuda_wgmma

    for make, arch in ((cuda_wgmma.wgmma_attention_kernel, "sm_90a"),
                       (cuda_mma.tensor_core_kernel, "sm_80")):
        func = make(8, 4, 64, "float16", "causal_padded_left", sm_scale)
        target = tvm.target.Target({"kind": "cuda", "arch": arch})
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
        assert "exp2f" in lib.mod.imports[0].inspect_source()


@pytest.mark.parametrize("batch,seq_q,heads,blocks", [
    (16, 1024, 16, 132), (3, 300, 2, 132), (1, 128, 1, 132), (5, 1000, 3, 7)])
def test_persistent_attention_schedule_deals_every_tile_once(batch, seq_q, heads, blocks):
    """The warp-specialized block's persistent schedule (``geometry.PersistentTileGrid``),
    evaluated on constants: every (batch row, query tile, head) is some block's item in exactly
    one round, and with causal costs (a query tile's key tiles: ``tiles - qt_launch``, the
    longest first) the busiest block carries at most 5% over the mean where every block gets
    at least 8 items."""
    from collections import Counter

    from relax_masked_attn.kernels.geometry import PersistentTileGrid

    grid = PersistentTileGrid(heads, 128, 384, blocks)
    ana = tvm.sym.Analyzer()

    def value(expr):
        return int(ana.simplify(expr))

    b_, s_ = tvm.tirx.const(batch, "int32"), tvm.tirx.const(seq_q, "int32")
    tiles = -(-seq_q // 128)
    launched, rounds = value(grid.grid(b_, s_)), value(grid.rounds(b_, s_))
    assert launched == min(blocks, batch * tiles * heads)
    seen, load = Counter(), Counter()
    for bid in range(launched):
        for i in range(rounds):
            bh, qt, real = grid.item(b_, s_, tvm.tirx.const(bid, "int32"),
                                     tvm.tirx.const(i, "int64"))
            if value(real):
                seen[value(bh), value(qt)] += 1
                load[bid] += tiles - value(qt)
    assert seen == Counter({(bh, qt): 1 for bh in range(batch * heads) for qt in range(tiles)})
    if batch * tiles * heads >= 8 * launched:
        assert max(load.values()) <= 1.05 * sum(load.values()) / launched
