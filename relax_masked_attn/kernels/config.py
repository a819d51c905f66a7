"""Tile sizes of every kernel, per target and dtype, in one place."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ..targets import VECTOR_LANES


def largest_divisor(value: int, limit: int) -> int:
    """The largest divisor of ``value`` that is at most ``limit`` (1 at least)."""
    return max(d for d in range(1, max(1, min(value, limit)) + 1) if value % d == 0)


@dataclasses.dataclass(frozen=True)
class CpuAttentionTiles:
    """The blocking of the CPU attention kernel (``kernels/cpu.py``).

    A query tile of ``rows`` rows walks key tiles of ``keys`` keys. Scores are held transposed
    (``[keys, rows]``) so that the softmax statistics, the exponentials and the rescaling run as
    vectors across rows. ``S^T = K Q^T`` is computed ``key_block`` keys at a time (that many
    rows of ``rows / lanes`` vector accumulators); ``O += P V`` ``row_block`` query rows by
    ``col_block`` output columns at a time (``row_block * col_block / lanes`` accumulators).
    """

    rows: int
    keys: int
    key_block: int
    row_block: int
    col_block: int


def cpu_tiles(isa: str, head_dim: int) -> CpuAttentionTiles:
    """The CPU attention kernel's blocking for a vector ISA (``targets.cpu_isa``).

    Register budgets: 12 accumulators of the 16 vector registers of AVX2 and SSE, 24 of the 32
    of AVX-512 and NEON; ``rows`` is two AVX2/AVX-512 vectors or four NEON/SSE ones (a power of
    two: LLVM splits a 24-lane vector into shuffles), ``col_block`` a power of two too. 48 keys a
    tile amortize each tile's per-row work (maximum, rescale) and divide into key blocks of 2,
    3, 4, 6 or 12. Measured on a
    2-core Zen 3 (AVX2) for all-MiniLM-L6-v2's attention (40 rows of 100-176 tokens, 12 heads of
    32): see docs/performance.md; the other ISAs follow the same register counts, unmeasured.
    """
    lanes = VECTOR_LANES[isa]
    budget, rows = {"avx512": (24, 32), "avx2": (12, 16), "neon": (24, 16), "sse": (12, 16)}[isa]
    keys = 48
    key_block = largest_divisor(keys, budget // (rows // lanes))
    col_block = max(c for c in (1, 2, 4, 8, 16, 32, 64) if head_dim % c == 0 and c <= 4 * lanes)
    row_block = largest_divisor(rows, budget // max(1, col_block // lanes))
    return CpuAttentionTiles(rows, keys, key_block, row_block, col_block)


def portable_gpu_tiles(head_dim: int, dtype: str) -> tuple[int, int]:
    """(query rows = threads per block, key columns per shared tile) of the portable GPU kernel.

    64 threads a block keep enough blocks per multiprocessor for short sequences; 32 keys a tile
    keep the two float32 shared tiles at 2 * 32 * head_dim * 4 bytes (32 KiB at head_dim 128).
    """
    del dtype
    return 64, 32 if head_dim <= 128 else 16


def tensor_core_tiles(head_dim: int, dtype: str) -> tuple[int, int, int, bool, bool]:
    """(warps, m16 tiles a warp, key rows a tile, Q fragments kept in registers, output staged
    through shared memory) of one block of the tensor-core attention kernel; a block owns
    ``warps * atoms * 16`` query rows.

    head_dim 64 and 128: 4 warps x 2 m16 tiles = 128 query rows, 64-key tiles, Q re-read from
    shared memory every k-step (FlashAttention-2's layout): each K/V fragment loaded with
    ``ldmatrix`` feeds two ``mma``. Shared memory: Q 128 x head_dim plus K and V 64 x head_dim
    (64 KiB at head_dim 128, one dynamic pool: sm_80-class GPUs allow 48 KiB of static shared
    memory; nvcc 13 with TVM's flags: 255 registers and 24-28 bytes spilled at head_dim 128, 214
    and none at 64). Swept on an H200
    (``bench_kernel.py --sweep``, full lengths, useful TFLOP/s at (32, 512, 12/12, 64) /
    (16, 1024, 16/8, 128) / (4, 4096, 16/8, 128) bf16, one run, all with 4-byte stores):
    171.5 / 221.8 / 298.3 against 145.9 / 184.8 / 250.6 (4 x 1 tiles, Q in registers),
    162.1 / 200.7 / 280.4 (4 x 2 tiles, 32 keys) and 112.1 / 177.3 / 241.9 (8 x 1 tiles).

    Other head dims: 4 warps x 1 m16 tile = 64 query rows, 64-key tiles, Q in registers: Q, K
    and V take 3 * 64 * head_dim * 2 bytes of shared memory.

    The output is staged (each warp normalizes O into its own rows of the Q tile, then the
    block writes 16-byte vectors: ``geometry.staged_output``, as the ``wgmma`` kernel does). On
    the H200 (same sweep, same run) it is 31% / 11% / 3% faster than 4-byte stores straight from
    the accumulators at the three shapes (224.1 / 247.1 / 307.4 against 171.5 / 221.8 / 298.3
    TFLOP/s; 4 x 1 tiles with Q in registers: 169.1 / 208.3 / 263.5 against 145.9 / 184.8 /
    250.6). For sm_80 the staged form builds with no spills at head_dim 64 and 12 bytes for the
    packed op at 32; at 128 both forms spill at the 255-register cap (24-48 bytes).
    """
    del dtype
    if head_dim in (64, 128):
        return 4, 2, 64, False, True
    return 4, 1, 64, True, True


@dataclasses.dataclass(frozen=True)
class CpuDenseTiles:
    """The blocking of the CPU dense kernel (``kernels/cpu_dense.py``).

    ``rows x cols`` outputs are one register block (``rows * cols / lanes`` accumulators);
    ``depth`` is the most ``k`` a block runs before its partial sums go back to ``out`` (one
    weight panel of ``depth x cols`` floats stays in L1), except that a ``k`` of at most
    ``whole_k`` runs in one slice; a parallel task owns ``task_rows`` rows (``long_task_rows``
    for a ``k`` of at least ``long_k``, where set) and ``task_cols`` columns. Within a slice a
    task walks its weight panels outermost, each read by its register blocks in turn, except
    that for a ``k`` of at most ``blocks_outer_k`` it walks its register blocks outermost, each
    block's packed x rows read against every panel in turn.
    """

    rows: int
    cols: int
    lanes: int
    depth: int = 256
    task_rows: int = 48
    task_cols: int = 256
    whole_k: int = 0
    long_k: int = 0
    long_task_rows: int = 0
    blocks_outer_k: int = 0


def cpu_dense_tiles(isa: str) -> CpuDenseTiles:
    """The CPU dense kernel's blocking for a vector ISA (``targets.cpu_isa``).

    The register block is what BLIS's single-precision micro-kernels hold, given as x rows
    (broadcast) by weight columns (vector loads): ``avx2`` 6 x 16 (12 of the 16 ymm registers
    accumulate, 2 hold the weight row, 1 the broadcast); ``avx512`` 12 x 32 (24 of 32 zmm);
    ``neon`` 6 x 16 (24 of 32 q registers); ``sse`` (baseline x86-64) 6 x 8 (12 of 16 xmm).
    Measured for ``avx2`` on a 2-core Zen 3 (``bench_dense.py --device cpu``: 1.02-1.35x torch)
    and for ``avx512`` on a 16-core Xeon (0.71-1.26x torch, 1.06-1.37 TFLOP/s; a sweep of 6 x 64
    blocks, k slices of 128 and 512 and other task sizes, ``--sweep``, stayed within that VM's
    run-to-run spread; on 2 of its cores 0.74-1.46x, and a five-round interleaved sweep of 6 x 64
    blocks, 512-column tasks, k in one slice and 128-deep slices with 192-row tasks ranked none
    above this blocking beyond that VM's spread); ``neon`` is unmeasured (no ARM machine), sized
    by the same register count.

    ``avx2`` runs a ``k`` of up to 768 in one slice (a 48 KiB weight panel, streamed from L2
    well enough): alternating with the 256-deep slices and torch in one process on the Zen 3
    (6 rounds), 7% faster at k = 384 (n = 384 and 1536) and 768 x 768, within 1% at
    384 x 1536 and 3072 x 768; at k = 3072 whole slices of 768 were 8% slower than 256, so
    longer ``k`` keeps 256. On AVX-512 the Xeon sweep above (panels outermost) saw no gain from
    512-deep slices.
    A ``k`` of 2048 or more runs tasks of 96 rows, not 48: a task's weight (256 columns by k,
    3 MiB at k = 3072) then serves twice the rows; at 768 x 3072 on the Zen 3, alternating in
    one process, 3%, 16% and 7% faster in three runs; at k = 768 and 1536 it was -11% to +5%,
    within that VM's noise, so those keep 48.

    ``avx512`` walks its register blocks outermost up to k = 768: a 12 x 32 block's panel
    slice (32 columns by 256 of k, 32 KiB) fills the L1 by itself, so a panel cannot stay there
    for the next block while that block's x rows come in, where a block's 12 packed rows (12 KiB)
    stay there across the task's 8 panels. On a 2-core Skylake-SP, 8192 rows, 2 threads,
    alternating with the panel-outer order in one process (median of 5 to 7 rounds, three
    runs): 384 x 384 +16%, -2%, +11%; 1536 x 384 +28%; 768 x 768 +4.5%, +13%, +7.5%; 3072 x 768
    +6%, +27%, +4.5% (one thread: +8% and +13%); at k = 1536 +1%, at k = 3072 -15%, -4% and
    (one thread) +2%, so longer ``k`` keeps the panels outermost. The AVX2 build, measured the
    same way, gained nothing from it (-12% to +2%) and keeps them everywhere.

    With its blocks outermost, ``avx512`` also runs a ``k`` of up to 768 in one slice, as
    ``avx2`` does: a block's accumulators then stay in registers over the whole ``k`` instead of
    going back to ``out`` and returning at each slice, while its packed x rows (18 KiB at
    k = 384, 36 KiB at 768) stay in or near the L1 and the panels stream from L2 as before. On
    the Skylake-SP, 8192 rows, alternating with 256-deep slices in one process and taking the
    median of the per-round ratios (9 to 15 rounds): at k = 384, +7.6% and +4.3% (384 x 384,
    1536 x 384; 2 threads), +9.1% and +7.4% (one thread); at k = 768, +3.4%, +0.5%, +2.1%,
    +2.5% (768 x 768, 3072 x 768, two runs on 2 threads), +1.2% and -2.3% on one thread.
    """
    rows, cols = {"avx512": (12, 32), "avx2": (6, 16), "neon": (6, 16), "sse": (6, 8)}[isa]
    return CpuDenseTiles(rows, cols, VECTOR_LANES[isa], task_rows=rows * 8,
                         **({"whole_k": 768} if isa in ("avx2", "avx512") else {}),
                         **({"long_k": 2048, "long_task_rows": 96} if isa == "avx2" else {}),
                         **({"blocks_outer_k": 768} if isa == "avx512" else {}))


def tensor_core_dense_tiles(dtype: str) -> tuple[int, int, int, int, int, int]:
    """(rows of x, rows of w, k-step, warps along m, warps along n, pipeline stages) of one block
    of the CUDA tensor-core dense kernel.

    128 x 128 outputs a block on 2 x 2 warps (64 x 64 outputs, 128 fp32 accumulators a thread),
    k-steps of 64 through a 3-stage cp.async ring: 3 * (128 + 128) * 64 * 2 bytes = 96 KiB of
    dynamic shared memory, 2 blocks an SM. Swept on the H100 (`bench_dense.py --sweep`, 8192 rows,
    the seven linears of BERT-base and Qwen3-0.6B): 5-10% faster than 8 warps of 64 x 32 with
    k-steps of 32 in 3 or 4 stages, and than 128 x 256 tiles; 2-stage rings were 10-25% slower.
    """
    del dtype
    return 128, 128, 64, 2, 2, 3


def wgmma_dense_tiles(n: int, dtype: str) -> tuple[int, int]:
    """(columns of a block, pipeline stages) of both Hopper dense kernels (``sm_90a``: the
    warp-specialized TMA one, ``kernels/cuda_tma_dense.py``, and the ``cp.async`` one,
    ``cuda_dense.wgmma_dense_kernel``).

    Blocks of 128 rows on two consumer warpgroups, 64-wide k-steps through a 4-stage ring;
    256 columns (128 fp32 accumulators a thread, 192 KiB of shared memory) where ``n`` is a
    multiple of 256, else 128 (64 accumulators, 128 KiB). Measured on an H200, one run each:

    * the raw-kernel sweeps (``bench_dense.py --sweep wgmma`` / ``--sweep tma``, 8192 rows)
      have 256 columns 7-13% faster for n = 1024, 2048 and 3072 and 4-10% slower for n = 768
      (TMA, 768 x 768: 0.022 ms against 0.020; 8192 rows are 192 blocks of 256 columns, 1.45
      waves of the 132 SMs);
    * but whole BERT-base, whose batches are not 8192 rows, is faster with 256 columns for its
      n = 768 linears: TMA kernel 5.28 / 4.88 ms (32 rows in [64, 512] / 128 in [16, 128])
      against 5.69 / 5.12 ms with 128; the ``cp.async`` kernel 6.64 against 7.03 ms (8876
      rows). So n = 768 keeps 256.

    3 to 6 stages are within 5% for both kernels (the TMA sweep: (256, 3) and (256, 4) equal);
    the persistent TMA form, whose staging tile lies apart from the ring, takes at most 3.
    """
    del dtype
    return (256 if n % 256 == 0 else 128), 4


class WgmmaAttentionTiles(NamedTuple):
    """The layout of the ``wgmma`` attention kernel (``kernels/cuda_wgmma.py``); a plain tuple
    of the first five fields (sweeps) means 64-key tiles."""

    blocks: int  # blocks an SM the registers are capped for (__launch_bounds__)
    defer_pv: bool  # O += P V(kt) waited for only after the next tile's loads
    stages: int  # K/V ring stages
    staged_out: bool  # the output leaves through shared memory in 16-byte vectors
    overlap: bool  # the softmax of key tile kt + 1 during O += P V(kt)
    key_tile: int = 64  # keys a tile (64 or 128)
    tma_kv: bool = False  # K and V tiles copied by TMA (one thread; a K and a V mbarrier a stage)
    # a producer warpgroup (Q, K and V by TMA) and two consumer warpgroups that take turns at
    # the tensor cores, one block an SM (FlashAttention-3's structure; opt-in)
    specialized: bool = False


def wgmma_attention_tiles(head_dim: int, dtype: str) -> WgmmaAttentionTiles:
    """The layout (:class:`WgmmaAttentionTiles`) of the ``wgmma`` attention kernel.

    A block is two warpgroups (256 threads); shared memory at head_dim 128: Q 128 x 128 (32 KiB)
    and per stage a K and a V tile of 64 x 128 (32 KiB). Two stages: K and V of tile kt + 1
    load during all of tile kt, one barrier a tile (one stage: K(kt + 1) during O += P V(kt)
    and V(kt) during S(kt), two barriers a tile).

    The chosen layout copies K and V by TMA (``tma_kv``: one thread issues a tile's boxes,
    every thread waits on its mbarrier, one for K and one for V a stage): no thread computes
    addresses or issues ``cp.async`` for them, and ptxas needs fewer registers (92 against 109
    at head_dim 64; at 128 no spill where the ``cp.async`` form spills 28 bytes, and 32 bytes
    against 40 for the packed op's non-causal kernel; nvcc 13 with TVM's flags). A box takes
    the rows past a sequence as they are, so the V rows past the real keys are zeroed in shared
    memory before the products (P is 0 there, but 0 times NaN is not). The output is staged
    (each warpgroup normalizes O into its own rows of the Q tile, then the block writes 16-byte
    vectors), as in the dense kernels.

    Swept on the H200 (``bench_kernel.py --sweep``, full lengths, useful TFLOP/s at
    (32, 512, 12, 64) / (16, 1024, 16/8, 128) / (4, 4096, 16/8, 128) bf16, one run; fields
    (blocks, defer, stages, staged, overlap[, keys, TMA])):

    ==============================  =======================  ===============================
    layout                          TFLOP/s                  note
    ==============================  =======================  ===============================
    (2, F, 2, T, F, 64, T)          279.4 / 341.9 / 450.9    chosen: K/V by TMA
    (2, F, 2, T, F)                 279.6 / 341.5 / 433.1    ``cp.async`` K/V
    (2, F, 2, F, F)                 217.5 / 269.2 / 397.9    4-byte stores from registers
    (1, F, 2, T, F)                 278.6 / 283.9 / 354.8    one block an SM
    (2, F, 2, T, T)                 278.2 / 238.2 / 296.2    overlap; spills at head_dim 128
    (1, F, 2, T, T)                 277.6 / 292.5 / 369.3    overlap, one block an SM
    (2, F, 2, T, T, 64, T)          281.2 / 229.2 / 285.1    overlap on TMA copies
    (1, F, 2, T, T, 128)            243.7 / 297.2 / 392.1    overlap, 128-key tiles
    (1, F, 2, T, F, 128, T)         239.2 / 309.0 / 429.4    128-key tiles by TMA
    (1, F, 2, T, T, 128, T)         240.9 / 307.0 / 423.0    both
    ==============================  =======================  ===============================

    FlashAttention-3's intra-warpgroup overlap (``overlap``: S(kt + 1) issued before
    O += P V(kt), the softmax of kt + 1 on the CUDA cores while the tensor cores run the
    product; P(kt) stays packed in registers meanwhile) gains nothing here: at head_dim 64 two
    blocks an SM already overlap one block's softmax with the other's products, and at 128 the
    16 more registers a thread either spill (two blocks) or cost the second block. 128-key
    tiles (64 registers of S a thread) likewise need one block an SM. Earlier sweeps: the
    deferred O += P V wait was no better than the plain one, and one stage spilled a few bytes.

    ``specialized`` (FlashAttention-3's block: a persistent block an SM, a TMA producer
    warpgroup and two consumer warpgroups at 232 registers taking turns at the tensor cores, in
    the serial or the overlapped loop, 64- or 128-key tiles) passes the GPU tests but is slower
    than the chosen layout on every config: ``bench_kernel.py --sweep --layouts 0,1,2,3,4`` on
    the H200 (2026-11-30, one run; the same three configs, full lengths, useful TFLOP/s):

    ==============================  =======================  ===============================
    layout                          TFLOP/s                  note
    ==============================  =======================  ===============================
    (2, F, 2, T, F, 64, T)          315.5 / 360.0 / 471.7    the chosen one, same run
    (1, F, 2, T, F, 64, T, T)       240.3 / 266.6 / 339.8    specialized, serial loop
    (1, F, 2, T, F, 128, T, T)      270.8 / 307.1 / 406.7    and 128-key tiles
    (1, F, 2, T, T, 128, T, T)      270.9 / 341.4 / 459.2    overlapped loop, 128-key tiles
    (1, F, 2, T, T, 64, T, T)       233.4 / 314.4 / 399.3    overlapped loop, 64-key tiles
    ==============================  =======================  ===============================

    Its best form is 0.86x / 0.95x / 0.97x of the default (a second run: 273.0 / 348.6 /
    472.6 against 319.8 / 364.2 / 475.8, 0.85x / 0.96x / 0.99x): two consumer warpgroups an SM hide
    less of the softmax than the default's four (two blocks of two), and at head_dim 64 there is
    too little product a key tile to cover it (FlashAttention-3 runs three consumer warpgroups
    there). The same block launched one a (batch row, query tile, head) instead of persistent
    ran 171-264 TFLOP/s at head_dim 64 and 256-319 at (16, 1024) (the prologue and epilogue of
    each block on an otherwise idle SM); persistent blocks dealt the work in plain rotation, batch
    rows outermost, ran 205-301 at (16, 1024), where a model of that schedule puts the busiest
    block 46% over the mean (``geometry.PersistentTileGrid`` has the order that balances it).
    """
    del head_dim, dtype
    return WgmmaAttentionTiles(2, False, 2, True, False, 64, True)
