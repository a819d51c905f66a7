"""The dense kernels' shared frame: what follows the product (:class:`Epilogue`: bias, gelu,
residual) and the dense PrimFunc signature (:func:`dense_func`)."""

from __future__ import annotations

import dataclasses
import math

from tvm import tirx
from tvm.script import tirx as T

from .int32_guard import OVERFLOW, fits_int32


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What a dense kernel does to ``x @ w.T`` before it writes ``out``, in this order: add
    ``bias[n]``, apply ``activation`` (in fp32, before the one rounding to the output dtype), then
    add ``residual[m, n]`` (in the output dtype's precision, as a separate ``+`` would).

    ``gated`` (SwiGLU, alone): the weight holds a gate and an up projection interleaved in groups
    of ``g`` rows (:func:`gated_weight`), and ``out[m, n / 2]`` is ``silu(gate) * up`` of the two
    products, each rounded to the output dtype first, as two separate products would be.

    ``split`` (CUDA kernels; no residual, not gated): the product of weights stacked along ``n``
    (a layer's q, k and v projections) written to one output per weight, ``split`` their row
    counts: ``out_i[m, split[i]]`` (:func:`dense_func`)."""

    bias: bool = False
    activation: str | None = None  # None, "gelu" (erf) or "gelu_tanh"
    residual: bool = False
    gated: bool = False
    split: tuple[int, ...] = ()

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Epilogue: activation must be one of {ACTIVATIONS}, "
                             f"but got {self.activation!r}")
        if self.gated and (self.bias or self.activation or self.residual):
            raise ValueError("Epilogue: a gated (SwiGLU) product takes no other step")
        if self.split and (self.gated or self.residual or not 2 <= len(self.split) <= MAX_SPLIT):
            raise ValueError(f"Epilogue: split into 2 to {MAX_SPLIT} outputs, without a "
                             f"residual or gate, but got split={self.split}")

    @property
    def name(self) -> str:
        """``""``, ``_swiglu``, or ``_bias``, ``_gelu``, ``_residual``, ``_to<widths>`` joined in
        order (kernel names)."""
        if self.gated:
            return "_swiglu"
        parts = (["bias"] if self.bias else []) + ([self.activation] if self.activation else [])
        parts += (["residual"] if self.residual else [])
        parts += (["to" + "_".join(map(str, self.split))] if self.split else [])
        return "".join(f"_{p}" for p in parts)

    def outputs(self, n: int) -> list[tuple[int, int]]:
        """``(first column, width)`` of each output within the product's ``n`` columns."""
        widths = self.split or (self.out_columns(n),)
        if sum(widths) != self.out_columns(n):
            raise ValueError(f"Epilogue: split {self.split} does not add up to n={n}")
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return list(zip(starts, widths))

    def out_columns(self, n: int) -> int:
        """Columns of ``out`` for a weight of ``n`` rows."""
        return n // 2 if self.gated else n

    @staticmethod
    def swiglu(dtype: str, gate, up):
        """``silu(gate) * up`` of two values of ``dtype``, in fp32, rounded once."""
        g, u = T.Cast("float32", gate), T.Cast("float32", up)
        return T.Cast(dtype, g / (T.float32(1) + T.exp(-g)) * u)

    def value(self, acc, bias_value):
        """The float32 value before the residual: ``activation(acc + bias)``."""
        return self.activate(acc + T.Cast("float32", bias_value) if self.bias else acc)

    def store(self, dtype: str, acc, bias_value, residual_value):
        """The output element: :meth:`value` rounded to ``dtype``, plus the residual (rounded
        again) when there is one."""
        out = T.Cast(dtype, self.value(acc, bias_value))
        return self.add_residual(dtype, out, residual_value) if self.residual else out

    @staticmethod
    def add_residual(dtype: str, out, residual_value):
        return T.Cast(dtype, T.Cast("float32", out) + T.Cast("float32", residual_value))

    def activate(self, value):
        """``activation(value)`` for a float32 PrimExpr (gelu's erf: :func:`polynomial_erf`)."""
        if self.activation == "gelu":  # x / 2 (1 + erf(x / sqrt 2))
            return bound(value, lambda x: x * T.float32(0.5) * (
                T.float32(1) + polynomial_erf(x * T.float32(SQRT_HALF))))
        if self.activation == "gelu_tanh":  # x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            return bound(value, lambda x: x * T.float32(0.5) * (T.float32(1) + T.tanh(
                T.float32(SQRT_2_OVER_PI) * (x + T.float32(0.044715) * (x * x * x)))))
        return value


ACTIVATIONS = (None, "gelu", "gelu_tanh")
MAX_SPLIT = 3  # outputs of a split product (q, k, v)
SQRT_HALF = math.sqrt(0.5)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (float32 erf is +-1 beyond): the rational fit that
# Eigen's and TVM's ``fast_erf`` use, max error a few float32 ulp.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def polynomial_erf(value):
    """erf of a float32 PrimExpr with multiplies, adds and one divide: the erf of every gelu
    epilogue. On CPUs LLVM vectorizes it (``T.erf`` becomes a libm call a lane at a time). On
    CUDA (nvcc 13, sm_90a, TVM's ``--use_fast_math``) it is 19 instructions an output against
    CUDA ``erff``'s 25, of which 9 selects that run at half the FP32 rate: in the persistent
    dense kernel's gelu epilogue, 3336 SASS instructions a thread a 128 x 256 tile against 4096
    (896 without gelu). Its error on gelu (float32, against float64) is at most 1.4e-6, against
    4.5e-7 for a correctly rounded float32 erf, far below an fp16 output's resolution. The
    clamped input and its square are bound to variables (:func:`bound`)."""

    def rational(x):
        def of_square(x2):
            p, q = T.float32(_ERF_P[0]), T.float32(_ERF_Q[0])
            for c in _ERF_P[1:]:
                p = p * x2 + T.float32(c)
            for c in _ERF_Q[1:]:
                q = q * x2 + T.float32(c)
            return x * p / q

        return bound(x * x, of_square)

    return bound(T.max(T.min(value, T.float32(4)), T.float32(-4)), rational)


def bound(value, body):
    """``body(v)`` with ``v`` a float32 variable bound to ``value`` (a ``Let``): code generators
    print ``value`` once, where the plain expression would repeat it at every use (gelu's erf
    used its clamped input 20 times: 4.5 KB of CUDA source an output element)."""
    var = tirx.Var("v", "float32")
    return tirx.Let(var, value, body(var))


def gated_weight(gate, up, group: int):
    """The weight of a gated product (Relax expressions, ``[n, k]`` each): ``group`` rows of
    ``gate``, then the same ``group`` rows of ``up``, and so on (``[2 n, k]``), so that a kernel
    tile of ``2 group`` columns holds both halves of ``group`` outputs. A Relax expression on the
    parameters: ``LiftTransformParams`` runs it once at load time."""
    from tvm import relax

    n, k = (int(v) for v in gate.ty.shape.values)
    halves = [relax.op.reshape(w, [n // group, group, k]) for w in (gate, up)]
    return relax.op.reshape(relax.op.concat(halves, axis=1), [2 * n, k])


def dense_func(
    n: int, k: int, dtype: str, body, epilogue: Epilogue | None = None,
    index_dtype: str = "int32", scheduled: bool = True, w_shape: tuple | None = None,
) -> tirx.PrimFunc:
    """The dense PrimFunc ``(x [m, k], w [n, k], [bias [n],] [residual [m, n],] out [m, n])``
    around a kernel body; ``bias`` and ``residual`` are there when ``epilogue`` has them, and
    ``w`` has ``w_shape`` where the kernel takes the weight in another layout. A ``split``
    epilogue has one output per part, ``out_i [m, split[i]]``, in place of ``out``.

    ``body`` is a ``T.macro`` called as ``body(x, w, bias, residual, outs, m)`` (``bias`` and
    ``residual`` None when absent; ``outs`` the tuple of output buffers); ``m`` is a symbolic
    variable of ``index_dtype``. ``scheduled`` as in :func:`attention_func`.
    """
    attrs = {"tirx.noalias": True, **({"tirx.is_scheduled": True} if scheduled else {})}
    index_var = getattr(T, index_dtype)
    epilogue = epilogue or Epilogue()
    parts = epilogue.outputs(n)
    widths = [width for _, width in parts] + [1] * MAX_SPLIT
    count = len(parts)

    @T.prim_func
    def dense(x_handle: T.handle, w_handle: T.handle, bias_handle: T.handle,
              residual_handle: T.handle, out_handle: T.handle, out1_handle: T.handle,
              out2_handle: T.handle):
        T.func_attr(attrs)
        m = index_var()
        x = T.match_buffer(x_handle, (m, k), dtype)
        w = T.match_buffer(w_handle, w_shape or (n, k), dtype)
        bias = T.match_buffer(bias_handle, (n,), dtype)
        residual = T.match_buffer(residual_handle, (m, n), dtype)
        out = T.match_buffer(out_handle, (m, widths[0]), dtype)
        out1 = T.match_buffer(out1_handle, (m, widths[1]), dtype)
        out2 = T.match_buffer(out2_handle, (m, widths[2]), dtype)
        if index_dtype == "int32":
            assert fits_int32(m, max(n, k)), OVERFLOW.format(
                what=f"dense kernel ({n}x{k})", bound="rows * max(n, k)")
        body(x, w, bias if epilogue.bias else None, residual if epilogue.residual else None,
             (out, out1, out2)[:count], m)

    # Drop the parameters this epilogue does not use (their buffers appear nowhere in the body).
    x_h, w_h, bias_h, residual_h, *out_h = dense.params
    keep = [x_h, w_h, *([bias_h] if epilogue.bias else []),
            *([residual_h] if epilogue.residual else []), *out_h[:count]]
    return tirx.PrimFunc(keep, dense.body, dense.ret_type, dense.attrs)
