"""Legalization: which kernel each target gets, the module it leaves, and its errors."""

import numpy as np
import pytest
import tvm
from tvm import relax

import relax_masked_attn as rma
from relax_masked_attn.transform import LegalizeMaskedPrefill

from .conftest import SM90, assert_matches_reference, op_module, random_qkv

CUDA = SM90  # (this file's name for it)


def legalized(mod, target):
    with tvm.target.Target(target):
        return LegalizeMaskedPrefill()(mod)


def called_kernels(mod):
    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc))


def _expected(before: tvm.IRModule, kernel, name: str, extra_args=()) -> tvm.IRModule:
    """``before`` with its one op call replaced by ``call_tir`` of ``kernel`` named ``name``
    (the Before/Expected form of TVM's own legalization tests)."""
    main = before["main"]
    bb = relax.BlockBuilder()
    kernel = kernel.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", name)
    gv = bb.add_func(kernel, name)
    with bb.function("main", list(main.params)):
        out_ty = main.body.blocks[0].bindings[0].value.ty
        out = bb.emit(relax.call_tir(gv, [*main.params, *extra_args], out_ty=out_ty))
        bb.emit_func_output(out)
    return bb.get()


def test_pass_replaces_the_call_with_call_tir():
    from relax_masked_attn.kernels.cpu import cpu_kernel

    before = op_module(8, 2, 64, "float16", "causal_padded_left")
    name = "zz_masked_prefill_causal_padded_left_h8_2_d64_float16"
    kernel = cpu_kernel(8, 2, 64, "float16", "causal_padded_left", 0.125, isa="sse")  # plain llvm
    tvm.ir.assert_structural_equal(legalized(before, "llvm"), _expected(before, kernel, name))


def test_packed_call_becomes_call_tir_with_max_len():
    from relax_masked_attn.kernels import cuda_mma

    before = rma.op.standalone_packed_module(8, 4, 64, "float16", causal=True, max_len=512)
    name = "zz_packed_prefill_causal_h8_4_d64_float16"
    kernel = cuda_mma.tensor_core_kernel(8, 4, 64, "float16", "causal_padded", 0.125, packed=True)
    max_len = tvm.tirx.IntImm("int64", 512)
    tvm.ir.assert_structural_equal(legalized(before, CUDA),
                                   _expected(before, kernel, name, [max_len]))


def test_pass_leaves_other_ops_alone():
    mod = op_module(4, 4, 32, "float32", "padded")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    with bb.function("other", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.softmax(x)))
    mod["other"] = bb.get()["other"]
    out = legalized(mod, "llvm")
    assert "R.nn.softmax" in out["other"].script()


def test_same_kernel_is_added_once():
    mod = op_module(4, 4, 32, "float32", "padded")
    main = mod["main"]
    bb = relax.BlockBuilder()
    with bb.function("main", list(main.params)):
        q, k, v, n = main.params
        a = bb.emit(rma.masked_sequence_prefill(q, k, v, n))
        b = bb.emit(rma.masked_sequence_prefill(a, k, v, n))
        bb.emit_func_output(b)
    assert len(called_kernels(legalized(bb.get(), "llvm"))) == 1


def test_vdevice_target_wins_over_current():
    vdev = relax.VDevice(CUDA, 0, "global")
    q = relax.Var("q", relax.TensorType((2, 8, 4, 64), "float32", vdevice=vdev))
    n = relax.Var("n", relax.TensorType((2,), "int32", vdevice=vdev))
    call = rma.masked_sequence_prefill(q, q, q, n)
    call = relax.BlockBuilder().normalize(call)
    from relax_masked_attn.legalize import target_of

    with tvm.target.Target("llvm"):
        assert target_of(call).kind.name == "cuda"


def test_no_target_is_a_clear_error():
    with pytest.raises(ValueError, match="no target to legalize for"):
        LegalizeMaskedPrefill()(op_module(4, 4, 32, "float32", "padded"))


def test_unsupported_target_kind():
    with pytest.raises(ValueError, match="no kernel for target kind 'c'"):
        legalized(op_module(4, 4, 32, "float32", "padded"), "c")


@pytest.mark.parametrize("how", ["default", "pipeline"])
def test_tvm_compile_default_and_named_pipeline(how):
    mod = op_module(4, 2, 32, "float32", "padded_left")
    pipeline = {"relax_pipeline": relax.get_pipeline("relax_masked_attn")}
    kwargs = pipeline if how == "pipeline" else {}
    ex = tvm.compile(mod, target="llvm", **kwargs)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(3, 10, 10, 4, 2, 32, "float32", rng)
    valid_len = np.array([10, 0, 4], dtype="int32")
    out = vm["main"](*(tvm.runtime.tensor(x) for x in (q, k, v, valid_len))).numpy()
    assert_matches_reference(out, q, k, v, valid_len, "padded_left")


def test_pass_in_a_users_sequential():
    seq = tvm.transform.Sequential([LegalizeMaskedPrefill(), relax.transform.LegalizeOps()])
    with tvm.target.Target("llvm"):
        mod = seq(op_module(4, 4, 32, "float32", "padded"))
    assert len(called_kernels(mod)) == 1


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_kernels_generate_cuda(dtype):
    """CPU-only check that the CUDA module builds: float32 gets the portable kernel, fp16 and
    bf16 the ``mma.sync`` tensor-core one."""
    mod = op_module(8, 4, 64, dtype, "causal_padded_left")
    ex = tvm.compile(mod, target=CUDA)
    src = ex.mod.imports[0].imports[0].inspect_source()
    assert "__global__" in src and "__shared__" in src
    assert ("mma.sync.aligned" in src) is (dtype != "float32")


def test_symbolic_head_dim_is_refused():
    from tvm import tirx

    d = tirx.Var("d", "int64")
    q = relax.Var("q", relax.TensorType((2, 8, 4, d), "float32"))
    n = relax.Var("n", relax.TensorType((2,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, n]):
        bb.emit_func_output(bb.emit(rma.masked_sequence_prefill(q, q, q, n)))
    with pytest.raises(ValueError, match="head_dim must be a static integer"):
        legalized(bb.get(), "llvm")


def test_cpu_kernel_gets_a_noalias_compute_body_inside_relax_modules():
    """Our kernels sort last so apache-tvm 0.27's LLVM codegen keeps the fast `_compute_` path."""
    ex = tvm.compile(op_module(4, 2, 32, "float32", "padded"), target="llvm")
    ll = ex.mod.imports[0].inspect_source("ll")
    assert "@zz_masked_prefill_padded_h4_2_d32_float32_compute_(" in ll


@pytest.mark.parametrize("kind", ["metal", "opencl"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_portable_gpu_kernel_builds_for_other_gpu_targets(kind, dtype):
    """The portable kernel is generic TIR: other GPU backends of this wheel build it too.
    (This wheel has no Vulkan code generator and ROCm needs its toolchain; neither is tried.)"""
    ex = tvm.compile(op_module(8, 2, 64, dtype, "causal_padded_left"), target=kind)
    assert ex is not None


def test_vectorizable_gelu_matches_exact_gelu():
    import torch

    from relax_masked_attn.transform import vectorizable_gelu

    x = relax.Var("x", relax.TensorType((1000,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.gelu(x)))
    mod = vectorizable_gelu(bb.get())
    assert "R.nn.gelu" not in mod["main"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    xs = np.linspace(-8, 8, 1000).astype("float32")
    ref = torch.nn.functional.gelu(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xs)).numpy(), ref, atol=2e-6)


def test_plain_llvm_warns_once_and_names_host_cpu_target(monkeypatch):
    """A target of just ``llvm`` compiles for baseline x86-64: one warning a process, naming the
    fix; a target with an mcpu (host_cpu_target(), -mcpu=haswell) gives none."""
    import warnings

    from relax_masked_attn import legalize
    from relax_masked_attn.targets import host_cpu_target

    monkeypatch.setattr(legalize, "_warned_baseline", False)
    mod = op_module(4, 2, 32, "float32", "padded")
    with pytest.warns(UserWarning, match=r"names no mcpu.*host_cpu_target\(\).*TVM_NUM_THREADS"):
        legalized(mod, "llvm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        legalized(mod, "llvm")  # once only
        monkeypatch.setattr(legalize, "_warned_baseline", False)
        legalized(mod, host_cpu_target())
        legalized(mod, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
