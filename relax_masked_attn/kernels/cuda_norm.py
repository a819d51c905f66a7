"""CUDA RMSNorm and LayerNorm over the last axis: one warp a row, 16-byte loads and stores.

apache-tvm 0.27 schedules ``nn.rms_norm`` and ``nn.layer_norm`` with dlight's generic
reduction rules, which on an H200 moved Qwen3-0.6B's activations at about 0.4 TB/s (its four
norms a layer took a fifth of the model's GPU time). Here a warp owns a row: each lane loads
``hidden / 32`` elements as 16-byte vectors (consecutive lanes, consecutive vectors, so a warp
reads whole 512-byte runs), keeps them in registers as float32, reduces with warp shuffles and
writes the row back the same way; the row is read once and written once.

Statistics and the affine step are float32, rounded once to the output dtype (Hugging Face
rounds the normalized value to the input dtype before multiplying by the weight; the two differ
by an ulp of the output dtype at most).

With ``rope_heads``, an RMSNorm's rows are attention heads (``[tokens * heads, head_dim]``) and
the kernel applies the rotary embedding to the normalized row before writing it (Qwen3's
``q_norm``/``k_norm`` followed by RoPE: one read and one write of q and k instead of two). The
rotate-half partner of a lane's elements sits ``head_dim / 2`` further: in the lane 16 apart
(one xor shuffle) when a lane holds one vector of the row, else in the same lane's other half.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .memo import memoized

KINDS = ("rms", "layer")
WARPS = 4  # rows a block


def supports(hidden: int, dtype: str) -> bool:
    """Whether :func:`norm_kernel` serves rows of ``hidden`` elements of ``dtype``."""
    return dtype in ("float16", "bfloat16", "float32") and hidden % 32 == 0 and hidden <= 8192


def supports_rope(hidden: int, dtype: str) -> bool:
    """Whether :func:`norm_kernel` can apply the rotary embedding to rows of ``hidden``: the
    partner of each of a lane's elements is in the lane 16 apart or in the same lane."""
    if not supports(hidden, dtype):
        return False
    per_lane = hidden // 32
    chunks = per_lane // _vector(per_lane, dtype)
    return chunks == 1 or chunks % 2 == 0


def _shuffle_xor(value, lane_mask: int):
    """``value`` of the lane ``lane_mask`` apart (xor), within the warp."""
    return tirx.call_intrin("float32", "tirx.cuda.__shfl_xor_sync", tirx.const(0xFFFFFFFF,
                            "uint32"), value, lane_mask, 32)


def _vector(per_lane: int, dtype: str) -> int:
    """Elements a lane moves at once: the most that fit 16 bytes and divide its share."""
    most = 16 // (4 if dtype == "float32" else 2)
    return max(v for v in (1, 2, 4, 8) if v <= most and per_lane % v == 0)


@memoized
def norm_kernel(kind: str, hidden: int, dtype: str, eps: float,
                rope_heads: int = 0) -> tirx.PrimFunc:
    """PrimFunc ``(x [rows, hidden], weight [hidden], [bias [hidden],] out [rows, hidden])``,
    ``rows`` symbolic: ``kind`` ``"rms"`` is ``x / sqrt(mean(x^2) + eps) * weight``, ``"layer"``
    is ``(x - mean) / sqrt(var + eps) * weight + bias`` (variance without Bessel's correction,
    as torch's).

    ``rope_heads`` > 0 (``"rms"`` only): ``(x, weight, cos [tokens, hidden], sin [tokens,
    hidden], out)``, row ``r`` is a head of token ``r // rope_heads`` and the output is
    ``y * cos + swap_halves(y) * sin`` of the normalized row ``y`` (``sin`` carries the
    rotate-half sign: :func:`~relax_masked_attn.models.common.rope_tables`)."""
    if kind not in KINDS:
        raise ValueError(f"norm_kernel: kind must be one of {KINDS}, but got {kind!r}")
    if not supports(hidden, dtype):
        raise ValueError(f"norm_kernel: rows of {hidden} {dtype} are not supported "
                         "(float16, bfloat16 or float32; a multiple of 32 up to 8192)")
    if rope_heads and (kind != "rms" or not supports_rope(hidden, dtype)):
        raise ValueError(f"norm_kernel: no rotary embedding for {kind} rows of {hidden} {dtype}")
    per_lane = hidden // 32
    vec = _vector(per_lane, dtype)
    chunks = per_lane // vec
    layer = kind == "layer"
    inv_hidden = 1.0 / hidden
    heads = max(rope_heads, 1)
    rope = rope_heads > 0

    def span(start):
        """``vec`` elements from ``start`` (a vector index, or the one element)."""
        return start if vec == 1 else T.Ramp(start, 1, vec)

    def partner(c: int, e: int, lane_value):
        """The normalized element ``hidden / 2`` away from chunk ``c``'s element ``e``."""
        if chunks == 1:
            return _shuffle_xor(lane_value, 16)
        return None if lane_value is None else (c + chunks // 2) % chunks * vec + e

    @T.prim_func
    def norm(x_handle: T.handle, w_handle: T.handle, b_handle: T.handle, cos_handle: T.handle,
             sin_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int32()
        tokens = T.int32()
        x = T.match_buffer(x_handle, (rows, hidden), dtype)
        weight = T.match_buffer(w_handle, (hidden,), dtype)
        bias = T.match_buffer(b_handle, (hidden,), dtype)
        cos = T.match_buffer(cos_handle, (tokens, hidden), dtype)
        sin = T.match_buffer(sin_handle, (tokens, hidden), dtype)
        out = T.match_buffer(out_handle, (rows, hidden), dtype)
        bx = T.launch_thread("blockIdx.x", (rows + WARPS - 1) // WARPS)
        tx = T.launch_thread("threadIdx.x", WARPS * 32)
        vals = T.alloc_buffer((per_lane,), "float32", scope="local")
        part = T.alloc_buffer((vec,), dtype, scope="local")
        wv = T.alloc_buffer((vec,), dtype, scope="local")
        bv = T.alloc_buffer((vec,), dtype, scope="local")
        stat = T.alloc_buffer((2,), "float32", scope="local")  # mean, 1 / sqrt(var + eps)
        acc = T.alloc_buffer((1,), "float32", scope="local")
        row = bx * WARPS + tx // 32
        lane = tx % 32
        if row < rows:  # a whole warp shares its row: the shuffles below never diverge
            for c in T.unroll(chunks):
                part[span(0)] = x[row, span((c * 32 + lane) * vec)]
                for e in T.unroll(vec):
                    vals[c * vec + e] = T.Cast("float32", part[e])
            stat[0] = T.float32(0)
            if layer:
                acc[0] = T.float32(0)
                for i in T.unroll(per_lane):
                    acc[0] = acc[0] + vals[i]
                stat[0] = T.cuda.warp_sum(acc[0], 32) * T.float32(inv_hidden)
            acc[0] = T.float32(0)
            for i in T.unroll(per_lane):
                acc[0] = acc[0] + (vals[i] - stat[0]) * (vals[i] - stat[0])
            stat[1] = T.rsqrt(T.cuda.warp_sum(acc[0], 32) * T.float32(inv_hidden)
                              + T.float32(eps))
            for c in T.unroll(chunks):
                wv[span(0)] = weight[span((c * 32 + lane) * vec)]
                if layer:
                    bv[span(0)] = bias[span((c * 32 + lane) * vec)]
                for e in T.unroll(vec):
                    if layer:
                        part[e] = T.Cast(dtype, (vals[c * vec + e] - stat[0]) * stat[1]
                                         * T.Cast("float32", wv[e]) + T.Cast("float32", bv[e]))
                    elif rope:
                        vals[c * vec + e] = vals[c * vec + e] * stat[1] * T.Cast("float32",
                                                                                  wv[e])
                    else:
                        part[e] = T.Cast(dtype, vals[c * vec + e] * stat[1]
                                         * T.Cast("float32", wv[e]))
                if not rope:
                    out[row, span((c * 32 + lane) * vec)] = part[span(0)]
            if rope:
                for c in T.unroll(chunks):
                    wv[span(0)] = cos[row // heads, span((c * 32 + lane) * vec)]
                    bv[span(0)] = sin[row // heads, span((c * 32 + lane) * vec)]
                    for e in T.unroll(vec):
                        if chunks == 1:
                            acc[0] = partner(c, e, vals[c * vec + e])
                        else:
                            acc[0] = vals[partner(c, e, 0)]
                        part[e] = T.Cast(dtype, vals[c * vec + e] * T.Cast("float32", wv[e])
                                         + acc[0] * T.Cast("float32", bv[e]))
                    out[row, span((c * 32 + lane) * vec)] = part[span(0)]

    x_h, w_h, b_h, cos_h, sin_h, out_h = norm.params
    tables = [cos_h, sin_h] if rope else []
    params = [x_h, w_h, *([b_h] if layer else []), *tables, out_h]
    return tirx.PrimFunc(params, norm.body, norm.ret_type, norm.attrs)
