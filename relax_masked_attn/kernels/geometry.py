"""The attention kernels' shared frame: log2-domain constants, where each batch row's real
block lies (:class:`Rows`, padded and packed), the op's PrimFunc signatures
(:func:`attention_func`), the zeroing of rows outside every real block and the tensor-core
kernels' output epilogue through shared memory (:func:`staged_output`)."""

from __future__ import annotations

import dataclasses
import math

from tvm import tirx
from tvm.script import tirx as T

from .int32_guard import OVERFLOW, fits_int32

LOG2E = math.log2(math.e)
NEG_INF = -1.0e30  # finite "minus infinity": exp2 of it minus a real max is exactly 0


@dataclasses.dataclass(frozen=True)
class Rows:
    """Where the real block of batch row ``b`` lies in a kernel's 4-D ``[*, seq, heads, dim]``
    buffers, for the padded op (one batch row each, ``valid_len``) and the packed one (every
    sequence in one ``[1, t, heads, dim]`` view, ``seq_start``). Methods return PrimExprs of the
    kernel's index dtype.

    * padded: ``n = clamp(valid_len[b], 0, min(seq_q, seq_kv))``, the block at the start of the
      row, or at its end when ``left``; the rows outside it are padding, which kernels zero.
    * packed: ``start = clamp(seq_start[b], 0, t)``, ``n = clamp(seq_start[b + 1], start, t) -
      start``; queries and keys are rows ``[start, start + n)`` of the same ``t`` rows. Rows
      before ``seq_start[0]`` or from ``seq_start[batch]`` on belong to no sequence: kernels zero
      them (:meth:`uncovered`). ``seq_q`` and ``seq_kv`` are then ``max_len``, the longest
      sequence a grid is sized for; kernels loop over any tiles past it. The grid has
      :meth:`grid_batch` rows: at least one, so that with no sequence at all (``seq_start`` of
      one entry) a block still zeroes every row.
    """

    packed: bool
    left: bool
    lengths: object  # valid_len [batch] or seq_start [batch + 1] (int32 buffers)
    seq_q: object
    seq_kv: object
    total: object = None  # packed: t
    index_dtype: str = "int32"

    def _idx(self, value):
        return tirx.Cast(self.index_dtype, value)

    @staticmethod
    def heads(bh, heads_q: int, group: int):
        """``(b, h, h_kv)``: the batch row, query head and KV head of task ``bh`` of a kernel's
        ``batch * heads_q`` (GQA: ``group = heads_q // heads_kv`` query heads share a KV head).
        Kernels bind them with a tuple assignment."""
        h = bh % heads_q
        return bh // heads_q, h, h // group

    def offsets(self, b, n):
        """``(q_off, kv_off, bi)`` of batch row ``b`` with ``n`` real rows: its first real query
        row, its first real key row, its index in the 4-D buffers."""
        return self.q_offset(b, n), self.kv_offset(b, n), self.batch_index(b)

    def batch_index(self, b):
        """The first index of ``b``'s rows in the 4-D buffers."""
        return tirx.const(0, self.index_dtype) if self.packed else b

    def start(self, b):
        return tirx.max(tirx.min(self._idx(self.lengths[b]), self.total), self._zero())

    def grid_batch(self, batch):
        """The batch rows a kernel's grid covers: ``batch``; packed, :func:`packed_grid_batch`."""
        return packed_grid_batch(batch) if self.packed else batch

    def length(self, b):
        if self.packed:
            last = self.lengths.shape[0] - 1  # seq_start[b + 1], read in bounds for b = batch
            nxt = self.lengths[tirx.min(self._idx(b) + 1, self._idx(last))]
            end = tirx.max(tirx.min(self._idx(nxt), self.total), self.start(b))
            return end - self.start(b)
        return tirx.max(tirx.min(self._idx(self.lengths[b]), tirx.min(self.seq_q, self.seq_kv)),
                        self._zero())

    def q_offset(self, b, n):
        """The row of the first real query."""
        if self.packed:
            return self.start(b)
        return tirx.if_then_else(self.left, self.seq_q - n, self._zero())

    def kv_offset(self, b, n):
        if self.packed:
            return self.start(b)
        return tirx.if_then_else(self.left, self.seq_kv - n, self._zero())

    def uncovered(self, b):
        """Packed: ``(begin, end)`` of the rows of no sequence that batch row ``b`` zeroes (those
        before the first sequence for ``b = 0``, after the last for the last ``b``)."""
        batch = self.grid_batch(tirx.Cast(self.index_dtype, self.lengths.shape[0]) - 1)
        head_end = tirx.if_then_else(b == 0, self.start(b), self._zero())
        tail_begin = tirx.if_then_else(b == batch - 1, self.start(b) + self.length(b), self.total)
        return head_end, tail_begin

    def tile_repeats(self, n, rows: int, grid_tiles, qt_first):
        """How many query tiles of ``rows`` rows a GPU block of first tile ``qt_first`` takes in
        a block of ``n`` real rows: 1 padded (the grid covers ``seq_q``); packed, its tiles
        ``qt_first + i * grid_tiles`` below ``ceil(n / rows)`` (the grid covers ``max_len``)."""
        if not self.packed:
            return 1
        return ((n + rows - 1) // rows + grid_tiles - 1 - qt_first) // grid_tiles

    def _zero(self):
        return tirx.const(0, self.index_dtype)


# The most batch rows (sequences), and query tiles of the longest one, a tensor-core attention
# kernel's grid takes: they are CUDA's grid y and z dimensions, whose limit this is.
GRID_BATCH_LIMIT = 65535
GRID_BATCH_MESSAGE = ("attention on CUDA tensor cores takes at most 65535 batch rows (sequences) "
                      "and 65535 query tiles of 64-128 rows a call; split the batch")


@T.macro
def check_grid_limits(batch, seq_q, rows: int):
    """Host side, before a tensor-core attention launch: at most :data:`GRID_BATCH_LIMIT` batch
    rows and query tiles of ``rows`` rows, else :data:`GRID_BATCH_MESSAGE`."""
    assert batch <= GRID_BATCH_LIMIT, GRID_BATCH_MESSAGE
    assert (seq_q + rows - 1) // rows <= GRID_BATCH_LIMIT, GRID_BATCH_MESSAGE


def tensor_core_grid(heads_q: int, rows: int, threads: int):
    """The grid of both tensor-core attention kernels: a macro ``grid(batch, seq_q, block,
    args)`` that launches blocks of ``threads`` threads over heads (x, innermost), query tiles
    of ``rows`` rows (y; the kernels take the longest first) and batch rows (z), and runs
    ``block(*args, bh, qt_launch, tx)`` in each (``bh = b * heads_q + h``).

    That order keeps the blocks resident at once on one or a few batch rows, whose K and V
    stay in L2 (with the query tiles outermost each block read its own), and starts each batch
    row's heaviest tiles of every head first. Batch rows and query tiles are limited to
    :data:`GRID_BATCH_LIMIT` each (CUDA's limit on grid y and z): more stop with
    :data:`GRID_BATCH_MESSAGE` before the launch."""

    @T.macro
    def grid(batch, seq_q, block, args):
        check_grid_limits(batch, seq_q, rows)
        h_launch = T.launch_thread("blockIdx.x", heads_q)
        qt_launch = T.launch_thread("blockIdx.y", (seq_q + rows - 1) // rows)
        b_launch = T.launch_thread("blockIdx.z", batch)
        bh = b_launch * heads_q + h_launch
        tx = T.launch_thread("threadIdx.x", threads)
        block(*args, bh, qt_launch, tx)

    return grid


class PersistentTileGrid:
    """The grid of a persistent tensor-core attention kernel: at most ``blocks`` blocks of
    ``threads`` threads, each taking one work item, a (batch row, query tile of ``rows`` rows,
    head), a round.

    The items are ordered query tiles outermost (the longest first), then batch rows, then heads,
    and dealt out in rounds of ``grid`` items, every other round in reverse block order (block
    ``bid`` takes item ``round * grid + bid`` in even rounds, ``round * grid + grid - 1 - bid``
    in odd ones): with causal attention a query tile's cost grows with its index, and this
    deals each block heavy and light tiles alike (a model of the static schedule puts the
    busiest block 3% over the mean at (16, 1024, 16 heads) and 0.1% at (4, 4096), against 46% and
    15% for batch rows outermost dealt in plain rotation). A block's items in one round share
    one query tile of a few batch rows; the blocks of one batch row's K and V read it from L2.

    ``launch(batch, seq_q, block, args)`` (a ``T.macro``) runs ``block(*args, bid, tx)`` in
    each block; in the kernel, ``rounds(batch, seq_q)`` is how many rounds there are and
    ``item(batch, seq_q, bid, i)`` block ``bid``'s item of round ``i`` as ``(bh, qt_launch,
    real)``: ``bh = b * heads_q + h`` and ``qt_launch`` as :func:`tensor_core_grid` gives a
    block (int32), ``real`` false past the last item. Each is an expression of the kernel's
    arguments, written out where used (a name bound on the host would be a variable the kernel
    does not receive); the count runs in int64."""

    def __init__(self, heads_q: int, rows: int, threads: int, blocks: int):
        self.heads_q, self.rows, self.blocks = heads_q, rows, blocks

        @T.macro
        def launch(batch, seq_q, block, args):
            check_grid_limits(batch, seq_q, rows)
            bid = T.launch_thread("blockIdx.x", T.Cast("int32", self.grid(batch, seq_q)))
            tx = T.launch_thread("threadIdx.x", threads)
            block(*args, bid, tx)

        self.launch = launch

    def tiles(self, seq_q):
        return (seq_q + self.rows - 1) // self.rows

    def total(self, batch, seq_q):
        return T.Cast("int64", batch) * T.Cast("int64", self.tiles(seq_q)) * self.heads_q

    def grid(self, batch, seq_q):
        return T.min(self.total(batch, seq_q), T.int64(self.blocks))

    def rounds(self, batch, seq_q):
        grid = self.grid(batch, seq_q)
        return (self.total(batch, seq_q) + grid - 1) // grid

    def item(self, batch, seq_q, bid, i):
        grid = self.grid(batch, seq_q)
        w = i * grid + T.if_then_else(i % 2 == 0, T.Cast("int64", bid),
                                      grid - 1 - T.Cast("int64", bid))
        per_tile = T.Cast("int64", batch) * self.heads_q  # items of one query tile
        b_h = w % per_tile  # = b * heads_q + h
        # int32: batch rows and query tiles are at most GRID_BATCH_LIMIT each
        return (T.Cast("int32", b_h), T.Cast("int32", w // per_tile),
                w < self.total(batch, seq_q))


def packed_grid_batch(batch):
    """The packed op's grid rows for ``batch`` sequences: at least 1, so that with no sequence
    at all the one block finds length 0 and zeroes all ``t`` rows."""
    return tirx.max(batch, 1)


def padding_zeroer(dtype: str, head_dim: int, threads: int):
    """A ``T.macro`` ``zero_padding(out, geom, b, h, n, qt_launch, r0, rows, tx)`` for GPU kernels
    whose ``threads`` threads write 16 bytes each: padded, the padding rows of batch row ``b``
    that the tile of rows ``[r0, r0 + rows)`` of the ``seq_q - n`` padding rows covers; packed,
    for ``qt_launch == 0``, the rows of no sequence before the first / after the last (``b``'s
    share, :meth:`Rows.uncovered`). Exact zeros, head ``h``."""
    chunks = head_dim // 8

    @T.macro
    def zero_rows(out, bi, h, begin, end, zero16, tx):
        for it in T.serial(((end - begin) * chunks + threads - 1) // threads):
            if begin + (it * threads + tx) // chunks < end:
                for j in T.vectorized(8):
                    out[bi, begin + (it * threads + tx) // chunks, h,
                        (it * threads + tx) % chunks * 8 + j] = zero16[j]

    @T.macro
    def zero_padding(out, geom, b, h, n, qt_launch, r0, rows, tx):
        zero16 = T.alloc_buffer((8,), dtype, scope="local")
        for j in T.unroll(8):
            zero16[j] = T.Cast(dtype, T.float32(0))
        if geom.packed:
            if qt_launch == 0:
                head_end, tail_begin = geom.uncovered(b)
                zero_rows(out, 0, h, 0, head_end, zero16, tx)
                zero_rows(out, 0, h, tail_begin, geom.total, zero16, tx)
        else:
            pad_off = T.if_then_else(geom.left, 0, n)  # first padding row
            zero_rows(out, b, h, pad_off + r0, pad_off + T.min(r0 + rows, geom.seq_q - n),
                      zero16, tx)

    return zero_padding


def staged_output(dtype: str, head_dim: int, heads_q: int, chunk_offset, opaque: bool = False):
    """The output epilogue of both tensor-core attention kernels, through shared memory: two
    ``T.macro`` s, ``(stage, write)``.

    ``stage(smem, base, o_acc, l_i, a, row, t4)``: this thread's rows ``row`` and ``row + 8`` of
    the tile (m16 tile ``a`` of ``o_acc [atoms, head_dim / 8, 4]``: element ``[a, j, 2 i + c]``
    is row ``row + 8 i``, column ``8 j + 2 t4 + c``; ``l_i [atoms, 2]`` holds this lane's part of
    the two row sums), normalized and cast, into the staging tile at element ``base`` of the
    flat shared buffer ``smem``, 4 bytes a store.

    ``write(words, base, out, bi, q_off, h, r0, n, first, count, tid, nthreads)``: rows
    ``[first, first + count)`` of the staged tile whose query row ``r0 + r`` is real (``< n``),
    from ``words`` (the same shared memory as uint32) to ``out``, 16 bytes a store, by
    ``nthreads`` threads (``count * head_dim / 8`` a multiple of it).

    ``chunk_offset(r, c)``: element offset of 16-byte chunk ``c`` of row ``r`` in the staging
    tile (each kernel's own swizzle: a warp's 8 rows of one chunk in distinct banks). A block
    syncs between the two; stores of 16 bytes send whole 32-byte sectors, where the fragments'
    own 4-byte stores send a quarter of each. ``opaque``: the staging tile is written and read
    by ``st.shared`` / ``ld.shared`` on its addresses, which TVM's barrier planner does not see
    (for kernels whose warpgroups order their own accesses with named barriers)."""
    chunks = head_dim // 8

    @T.macro
    def stage(smem, base, o_acc, l_i, a, row, t4):
        pair = T.alloc_buffer((2,), dtype, scope="local")
        if opaque:
            pair_word = T.decl_buffer((1,), "uint32", data=pair.data, scope="local")
        for i in T.unroll(2):
            l_i[a, i] = T.cuda.warp_sum(l_i[a, i], 4)
            for j in T.unroll(chunks):
                for c in T.unroll(2):
                    pair[c] = T.Cast(dtype, o_acc[a, j, 2 * i + c] / l_i[a, i])
                if opaque:
                    T.ptx.st.shared.b32(
                        smem.ptr_to([base + chunk_offset(row + i * 8, j) + t4 * 2]),
                        pair_word[0])
                else:
                    smem[T.Ramp(base + chunk_offset(row + i * 8, j) + t4 * 2, 1, 2)] = pair[
                        T.Ramp(0, 1, 2)]

    @T.macro
    def write(words, base, out, bi, q_off, h, r0, n, first, count, tid, nthreads):
        vec = T.alloc_buffer((4,), "uint32", scope="local")
        out_words = T.decl_buffer((out.shape[0] * out.shape[1] * (heads_q * head_dim // 2),),
                                  "uint32", data=out.data)
        for it in T.unroll(count * chunks // nthreads):
            rr = first + (it * nthreads + tid) // chunks  # row of the tile
            cc = (it * nthreads + tid) % chunks  # its 16-byte chunk
            if r0 + rr < n:
                # base and every chunk's offset are multiples of 8 elements (16 bytes); written
                # as base // 8 * 4 so that the word index is provably a multiple of 4 and the
                # load one 16-byte vector
                if opaque:
                    T.ptx.ld.shared.v4.b32(vec[0], vec[1], vec[2], vec[3], words.ptr_to(
                        [base // 8 * 4 + chunk_offset(rr, cc) // 2]))
                else:
                    vec[T.Ramp(0, 1, 4)] = words[T.Ramp(
                        base // 8 * 4 + chunk_offset(rr, cc) // 2, 1, 4)]
                out_words[T.Ramp(((bi * out.shape[1] + q_off + r0 + rr) * heads_q + h)
                                 * (head_dim // 2) + cc * 4, 1, 4)] = vec[T.Ramp(0, 1, 4)]

    return stage, write


def attention_func(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, body, index_dtype: str = "int32",
    scheduled: bool = True, packed: bool = False, left: bool = False,
) -> tirx.PrimFunc:
    """The op's PrimFunc around a kernel body.

    Padded (the ``masked_sequence_prefill`` op): ``(q, k, v, valid_len, out)``, q
    ``[batch, seq_q, heads_q, head_dim]``, k/v ``[batch, seq_kv, heads_kv, head_dim]``,
    valid_len ``[batch]`` int32, out shaped like q; ``left``: the real tokens sit at the end.
    Packed (``packed_sequence_prefill``): ``(q, k, v, seq_start, max_len, out)``, q
    ``[t, heads_q, head_dim]``, k/v ``[t, heads_kv, head_dim]``, seq_start ``[batch + 1]`` int32,
    out like q, ``max_len`` an int64 scalar (the longest sequence the grid is sized for).

    ``body`` is a ``T.macro`` called as ``body(q, k, v, rows, out, batch, seq_q, seq_kv)`` with
    4-D buffers (the packed ones viewed as ``[1, t, heads, head_dim]``) and a :class:`Rows`;
    batch and lengths are symbolic variables of ``index_dtype``. ``scheduled`` marks the function
    ``tirx.is_scheduled`` (GPU kernels with explicit threads; dlight leaves them alone). An
    empty output (no batch rows or no query rows; packed, no tokens) skips ``body`` on the host:
    CUDA cannot launch a grid of no blocks, and there is nothing to write.
    """
    attrs = {"tirx.noalias": True, **({"tirx.is_scheduled": True} if scheduled else {})}
    index_var = getattr(T, index_dtype)
    d = head_dim

    def longest(max_len):
        return tirx.Cast(index_dtype, tirx.max(max_len, tirx.const(1, "int64")))

    if packed:

        @T.prim_func
        def packed_prefill(
            q_handle: T.handle,
            k_handle: T.handle,
            v_handle: T.handle,
            seq_start_handle: T.handle,
            max_len: T.int64,
            out_handle: T.handle,
        ):
            T.func_attr(attrs)
            batch1 = index_var()
            t = index_var()
            q = T.match_buffer(q_handle, (t, heads_q, d), dtype)
            k = T.match_buffer(k_handle, (t, heads_kv, d), dtype)
            v = T.match_buffer(v_handle, (t, heads_kv, d), dtype)
            seq_start = T.match_buffer(seq_start_handle, (batch1,), "int32")
            out = T.match_buffer(out_handle, (t, heads_q, d), dtype)
            assert batch1 >= 1, "packed_sequence_prefill: seq_start must have at least 1 entry"
            if index_dtype == "int32":
                assert fits_int32(t, heads_q * d), OVERFLOW.format(
                    what="packed_sequence_prefill: q", bound="t * heads_q * head_dim")
            q4 = T.decl_buffer((1, t, heads_q, d), dtype, data=q.data)
            k4 = T.decl_buffer((1, t, heads_kv, d), dtype, data=k.data)
            v4 = T.decl_buffer((1, t, heads_kv, d), dtype, data=v.data)
            out4 = T.decl_buffer((1, t, heads_q, d), dtype, data=out.data)
            # (the grid's longest sequence written as an expression, not bound to a variable:
            # the host computes launch extents from it)
            if t > 0:  # no tokens, nothing to write: no launch of a kernel over no rows
                body(q4, k4, v4,
                     Rows(True, False, seq_start, longest(max_len), longest(max_len), t,
                          index_dtype),
                     out4, packed_grid_batch(batch1 - 1), longest(max_len), longest(max_len))

        return packed_prefill

    @T.prim_func
    def masked_prefill(
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        valid_len_handle: T.handle,
        out_handle: T.handle,
    ):
        T.func_attr(attrs)
        batch = index_var()
        seq_q = index_var()
        seq_kv = index_var()
        q = T.match_buffer(q_handle, (batch, seq_q, heads_q, d), dtype)
        k = T.match_buffer(k_handle, (batch, seq_kv, heads_kv, d), dtype)
        v = T.match_buffer(v_handle, (batch, seq_kv, heads_kv, d), dtype)
        valid_len = T.match_buffer(valid_len_handle, (batch,), "int32")
        out = T.match_buffer(out_handle, (batch, seq_q, heads_q, d), dtype)
        if index_dtype == "int32":
            assert fits_int32(batch, seq_q, heads_q * d), OVERFLOW.format(
                what="masked_sequence_prefill: q", bound="batch * seq_q * heads_q * head_dim")
            assert fits_int32(batch, seq_kv, heads_kv * d), OVERFLOW.format(
                what="masked_sequence_prefill: k", bound="batch * seq_kv * heads_kv * head_dim")
        if batch > 0 and seq_q > 0:  # an empty output: no launch of a grid of no blocks
            body(q, k, v, Rows(False, left, valid_len, seq_q, seq_kv, None, index_dtype), out,
                 batch, seq_q, seq_kv)

    return masked_prefill
