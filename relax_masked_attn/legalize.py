"""Legalization of ``masked_sequence_prefill`` and ``packed_sequence_prefill``: pick the target,
generate its kernel, call it.

The target is the one of q's virtual device if it has one, else ``Target.current()`` (set by
``tvm.compile`` while it legalizes), else a clear error. Then:

* ``llvm`` (CPU): :func:`relax_masked_attn.kernels.cpu.cpu_kernel`;
* CUDA arch ``sm_90a`` (H100/H200 with the Hopper-only features), fp16/bf16, head_dim 64/128:
  :func:`relax_masked_attn.kernels.cuda_wgmma.wgmma_attention_kernel`;
* CUDA with compute capability >= 8.0, fp16/bf16, head_dim 32/64/128:
  the tensor-core kernel :func:`relax_masked_attn.kernels.cuda_mma.tensor_core_kernel`;
* any other GPU target (ROCm, Metal, Vulkan, older CUDA, float32 on CUDA):
  :func:`relax_masked_attn.kernels.gpu.portable_gpu_kernel`.
"""

from __future__ import annotations

import dataclasses
import warnings

from tvm import relax, tirx
from tvm.relax.transform.legalize_ops.common import register_legalize
from tvm.target import Target

from .kernels.cpu import cpu_kernel
from .kernels.gpu import portable_gpu_kernel
from .op import OP_NAME, PACKED_OP_NAME, call_causal, call_mode, call_sm_scale
from .targets import cpu_isa


def target_of(call: relax.Call) -> Target:
    """The target a call is compiled for: q's vdevice, else the current target."""
    vdevice = getattr(call.args[0].ty, "vdevice", None)
    if vdevice is not None and vdevice.target is not None:
        return vdevice.target
    target = Target.current()
    if target is None:
        raise ValueError(
            "masked_sequence_prefill: no target to legalize for. Compile with "
            "tvm.compile(mod, target=...), run the pass inside `with tvm.target.Target(...)`, "
            "or give the tensors a vdevice."
        )
    return target


def is_gpu(target: Target) -> bool:
    return "gpu" in target.keys


def _static_dims(call: relax.Call, op_name: str) -> tuple[int, int, int, str]:
    q_ty, k_ty = call.args[0].ty, call.args[1].ty
    head_axis = q_ty.ndim - 2  # [batch, seq, heads, dim] or packed [t, heads, dim]
    dims = []
    for ty, axis, what in ((q_ty, head_axis, "heads_q"), (k_ty, head_axis, "heads_kv"),
                           (q_ty, head_axis + 1, "head_dim")):
        dim = None if ty.shape is None else ty.shape.values[axis]
        if not isinstance(dim, tirx.IntImm):
            raise ValueError(
                f"{op_name}: {what} must be a static integer to generate a kernel, but got {dim}"
            )
        dims.append(int(dim.value))
    return dims[0], dims[1], dims[2], q_ty.dtype.dtype


KERNEL_PREFIX = "zz_masked_prefill"
PACKED_KERNEL_PREFIX = "zz_packed_prefill"


@dataclasses.dataclass(frozen=True)
class _Request:
    """What a call of either op asks of a kernel generator."""

    op_name: str
    packed: bool
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    mode: str  # packed: "causal_padded" or "padded" (causal or not is the whole mode)
    sm_scale: float
    name: str

    @property
    def kernel_args(self) -> tuple:
        """The positional arguments every kernel generator takes."""
        return (self.heads_q, self.heads_kv, self.head_dim, self.dtype, self.mode, self.sm_scale)


def _request(call: relax.Call) -> _Request:
    """The kernel a call of either op needs; its name is
    ``zz_masked_prefill_<mode>_h<heads_q>_<heads_kv>_d<head_dim>_<dtype>`` (the packed op:
    ``zz_packed_prefill_<causal|full>_...``).

    The ``zz_`` sorts our kernels after every other function of the module, on purpose: in
    apache-tvm 0.27 the LLVM code generator gives every function of a module a ``_compute_``
    body with ``noalias`` arguments only when the module's last function (by name) has a
    parallel loop, and without it the CPU kernel runs about 2x slower (measured on this
    project's 2-core Zen 5 machine: 0.29 s vs 0.14 s for batch 8, seq 512, 12 heads, dim 64).
    """
    packed = call.op.name == PACKED_OP_NAME
    op_name = "packed_sequence_prefill" if packed else "masked_sequence_prefill"
    heads_q, heads_kv, head_dim, dtype = _static_dims(call, op_name)
    if packed:  # the packed geometry needs no padding side: causal or not is the whole mode
        mode, label = ("causal_padded", "causal") if call_causal(call) else ("padded", "full")
    else:
        mode = label = call_mode(call)
    prefix = PACKED_KERNEL_PREFIX if packed else KERNEL_PREFIX
    return _Request(
        op_name, packed, heads_q, heads_kv, head_dim, dtype, mode, call_sm_scale(call, head_dim),
        f"{prefix}_{label}_h{heads_q}_{heads_kv}_d{head_dim}_{dtype}",
    )


_warned_baseline = False


def warn_if_baseline_cpu(target: Target) -> None:
    """Warn once per process when an x86 ``llvm`` target names no ``mcpu``: LLVM then compiles
    for baseline x86-64 (SSE2, no AVX or FMA), at about half the speed."""
    global _warned_baseline
    if _warned_baseline or "mcpu" in target.attrs:
        return
    triple = str(target.attrs.get("mtriple", ""))
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return
    _warned_baseline = True
    warnings.warn(
        "relax_masked_attn: the target 'llvm' names no mcpu, so LLVM compiles for baseline x86-64 "
        "(SSE2: no AVX2, AVX-512 or FMA) and the attention kernel runs about 2x slower; compile "
        "for this CPU with target=relax_masked_attn.targets.host_cpu_target() (and set "
        "TVM_NUM_THREADS to the core count: TVM's thread pool takes half the cores)",
        stacklevel=2,
    )


def _kernel(target: Target, request: _Request) -> tirx.PrimFunc:
    args, packed = request.kernel_args, request.packed
    if target.kind.name == "llvm":
        warn_if_baseline_cpu(target)
        return cpu_kernel(*args, packed=packed, isa=cpu_isa(target))
    if is_gpu(target):
        from .kernels import cuda_mma, cuda_wgmma  # imported here: CPU-only users never need it

        if cuda_wgmma.supports(target, request.head_dim, request.dtype):
            return cuda_wgmma.wgmma_attention_kernel(*args, packed=packed)
        if cuda_mma.supports(target, request.head_dim, request.dtype):
            return cuda_mma.tensor_core_kernel(*args, packed=packed)
        return portable_gpu_kernel(*args, packed=packed)
    raise ValueError(
        f"{request.op_name}: no kernel for target kind {target.kind.name!r}; "
        "supported: llvm (CPU) and GPU targets (cuda, rocm, metal, vulkan)"
    )


def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Replace one call of either op by ``call_tir`` of the target's kernel."""
    request = _request(call)
    func = _kernel(target_of(call), request)
    # the name is also the symbol, so kernels of different calls never collide
    func = func.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", request.name)
    gv = bb.add_func(func, request.name)
    if not request.packed:
        return relax.call_tir(gv, list(call.args), out_ty=call.ty)
    # max_len (an integer PrimExpr, which type inference checked) is the kernel's int64 scalar
    max_len = call.args[4]
    value = max_len if str(max_len.ty.dtype) == "int64" else tirx.Cast("int64", max_len)
    return relax.call_tir(gv, [*call.args[:4], value], out_ty=call.ty)


register_legalize(OP_NAME, legalize)
register_legalize(PACKED_OP_NAME, legalize)
