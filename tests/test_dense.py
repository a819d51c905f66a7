"""The dense kernels behind nn.Linear (CPU float32, CUDA tensor cores) and their dispatch."""

import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

from relax_masked_attn.kernels import cpu_dense, cuda_dense, cuda_pingpong_dense, cuda_tma_dense
from relax_masked_attn.kernels.epilogue import _ERF_P, Epilogue
from relax_masked_attn.passes.dispatch_dense import dispatch_dense, standalone_linear_module
from relax_masked_attn.targets import host_cpu_target

from .conftest import SM90, cuda_available

SM90A = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})


def kernels_of(mod):
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def dispatched(mod, target):
    with tvm.target.Target(target):
        return dispatch_dense(mod)


def run_linear(mod, target, dev, *arrays):
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(a, device=dev) for a in arrays if a is not None]
    return vm["main"](*args).numpy()


def reference(x, w, bias=None, activation=None, residual=None):
    """``act(x @ w.T + bias) + residual`` in float64 (torch's gelu definitions)."""
    import torch

    out = x.astype("float64") @ w.astype("float64").T
    if bias is not None:
        out = out + bias.astype("float64")
    if activation:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        out = torch.nn.functional.gelu(torch.from_numpy(out), approximate=approximate).numpy()
    if residual is not None:
        out = out + residual.astype("float64")
    return out


# Epilogues (bias, activation, residual) the CUDA tests cover.
EPILOGUES = [(False, None, False), (True, None, False), (True, "gelu", False),
             (True, None, True), (True, "gelu_tanh", True), (False, "gelu", True)]


# --- CPU (float32) ---------------------------------------------------------------------------


def test_gelu_erf_is_as_accurate_as_float32_allows():
    """Every gelu epilogue's erf (``epilogue.polynomial_erf``, CPU and CUDA alike) against
    Python's double-precision ``math.erf`` over [-8, 8] (saturated beyond 4): within 4e-7,
    float32 ``erf``'s own class (its value is rounded to 6e-8 near 1)."""
    import math

    from tvm import te

    from relax_masked_attn.kernels.epilogue import polynomial_erf

    x = te.placeholder((200001,), "float32", name="x")
    y = te.compute(x.shape, lambda i: polynomial_erf(x[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), target="llvm")
    xs = np.linspace(-8, 8, 200001).astype("float32")
    out = tvm.runtime.tensor(np.zeros_like(xs))
    lib(tvm.runtime.tensor(xs), out)
    expected = np.array([math.erf(v) for v in xs.astype("float64")])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=4e-7)


@pytest.mark.parametrize("make,arch", [(cuda_dense.dense_kernel, "sm_80"),
                                       (cuda_dense.wgmma_dense_kernel, "sm_90a"),
                                       (cuda_pingpong_dense.pingpong_dense_kernel, "sm_90a")])
def test_cuda_gelu_epilogue_has_no_libdevice_erf(make, arch):
    """The CUDA gelu epilogues compute erf as :func:`polynomial_erf` does, not by CUDA's
    ``erff`` (25 instructions an output, 9 of them selects, against 19), and print its input
    once."""
    from tvm.target import Target

    func = make(768, 768, "float16", Epilogue(True, "gelu"))
    src = tvm.compile(tvm.IRModule({"main": func}),
                      target=Target({"kind": "cuda", "arch": arch})).mod.imports[0]
    src = src.inspect_source()
    assert "erff(" not in src and "erf(" not in src
    assert "fmaxf(" in src or "max(" in src  # the clamp to [-4, 4]
    # each erf clamps its input once: the clamped value and its square are variables, not
    # expressions printed at each of their 20 uses (which made BERT-base's CUDA source 1.5x as
    # long and nvcc's compile of it 2.7x as slow)
    erfs = src.count(float.hex(abs(_ERF_P[0])))  # its first coefficient, once an erf
    assert erfs > 0
    assert src.count("max(min(") == erfs
    assert len(src) < 320_000  # the mma.sync kernel's: about 304,000 characters


CPU_TARGETS = {"baseline x86-64 (sse)": tvm.target.Target("llvm"), "this CPU": host_cpu_target()}


@pytest.mark.parametrize("target", CPU_TARGETS.values(), ids=CPU_TARGETS.keys())
@pytest.mark.parametrize("bias,activation,residual", EPILOGUES)
@pytest.mark.parametrize("rows,k", [(1, 70), (13, 600), (100, 64), (100, 2112)])
def test_cpu_dense_matches_numpy(target, bias, activation, residual, rows, k):
    """Our CPU dense kernel with each epilogue fused, for the ISA of the target: row counts
    under, at and over a register block and a task (tails), k unsliced (70, 64; 600 on AVX2
    and AVX-512, which slice only a k over 768), in slices (600 elsewhere; 2112, on AVX2 in
    tasks of 96 rows, ``CpuDenseTiles.long_task_rows``)."""
    n = 96  # a multiple of every ISA's register block width
    mod = standalone_linear_module(n, k, bias=bias, activation=activation, residual=residual,
                                   rank=2)
    name = f"zz_dense{Epilogue(bias, activation, residual).name}_n{n}_k{k}_float32"
    assert kernels_of(dispatched(mod, target)) == [name]
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, k)).astype("float32")
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype("float32")  # outputs of order 1
    b = rng.standard_normal(n).astype("float32") if bias else None
    r = rng.standard_normal((rows, n)).astype("float32") if residual else None
    np.testing.assert_allclose(run_linear(mod, target, tvm.cpu(), x, w, b, r),
                               reference(x, w, b, activation, r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks_outer", [False, True])
@pytest.mark.parametrize("rows,k", [(13, 600), (100, 2112)])
def test_cpu_dense_loop_orders_match_numpy(blocks_outer, rows, k):
    """Both orders a task may walk its register blocks and weight panels in
    (``CpuDenseTiles.blocks_outer_k``: AVX-512 walks its blocks outermost up to k = 768), on
    this CPU's ISA whichever it is, with 3 panels a task and several slices of k, bias, gelu
    and residual fused."""
    import dataclasses

    target = host_cpu_target()
    tiles = dataclasses.replace(cpu_dense.tiles_for(target), whole_k=0,
                                blocks_outer_k=k if blocks_outer else 0)
    n = 3 * tiles.cols
    epilogue = Epilogue(True, "gelu", True)
    kernel = tvm.compile(tvm.IRModule({"main": cpu_dense.dense_kernel(
        n, k, "float32", epilogue, tiles)}), target=target)["main"]
    rng = np.random.default_rng(k)
    x = rng.standard_normal((rows, k)).astype("float32")
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype("float32")
    b = rng.standard_normal(n).astype("float32")
    r = rng.standard_normal((rows, n)).astype("float32")
    wp = np.ascontiguousarray(w.reshape(n // tiles.cols, tiles.cols, k).transpose(0, 2, 1))
    out = tvm.runtime.tensor(np.full((rows, n), np.nan, "float32"))
    kernel(*[tvm.runtime.tensor(a) for a in (x, wp, b, r)], out)
    np.testing.assert_allclose(out.numpy(), reference(x, w, b, "gelu", r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 7), (2, 33)])
def test_cpu_dense_dispatch_matches_numpy(batch, seq):
    """nn.Linear-shaped matmuls with leading dims go to our CPU dense kernel."""
    mod = standalone_linear_module(48, 64)
    assert kernels_of(dispatched(mod, "llvm")) == ["zz_dense_n48_k64_float32"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, seq, 64)).astype("float32")
    w = rng.standard_normal((48, 64)).astype("float32")
    np.testing.assert_allclose(run_linear(mod, "llvm", tvm.cpu(), x, w), x @ w.T,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k,dtype", [(50, 64, "float32"), (48, 64, "float16")])
def test_cpu_dense_dispatch_leaves_other_shapes_alone(n, k, dtype):
    assert kernels_of(dispatched(standalone_linear_module(n, k, dtype), "llvm")) == []


def test_prepacked_weights_run_once_in_transform_params():
    """With ``prepack_weights``, the panel layout moves to ``transform_params``: ``main`` takes
    its outputs and reads no [n, k] weight any more."""
    mod = standalone_linear_module(96, 64, bias=True, rank=2)
    mod["main"] = mod["main"].with_attr("num_input", 1)
    pipeline = relax.get_pipeline("relax_masked_attn", prepack_weights=True)
    ex = tvm.compile(mod, target="llvm", relax_pipeline=pipeline)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(3)
    x, w, b = (rng.standard_normal(s).astype("float32") for s in ((5, 64), (96, 64), (96,)))
    params = vm["transform_params"]([tvm.runtime.tensor(w), tvm.runtime.tensor(b)])
    assert tuple(params[0].shape) != (96, 64)  # the packed panels
    out = vm["main"](tvm.runtime.tensor(x), *params).numpy()
    np.testing.assert_allclose(out, x @ w.T + b, rtol=1e-5, atol=1e-4)


def test_dispatch_needs_a_target():
    with pytest.raises(ValueError, match="Target not found"):
        dispatch_dense(standalone_linear_module(48, 64))


def test_dispatch_follows_the_vdevice():
    """x on a CPU vdevice inside a CUDA build gets the CPU kernel (TVM's BackendDispatcher rule:
    the vdevice first, then the current target); the kernel's name says its target."""
    cpu = relax.VDevice(tvm.target.Target("llvm"), 0, "global")
    x = relax.Var("x", relax.TensorType((tirx.Var("m", "int64"), 64), "float32", vdevice=cpu))
    w = relax.Var("w", relax.TensorType((48, 64), "float32", vdevice=cpu))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(w))
            out = bb.emit_output(bb.emit(relax.op.matmul(x, wt)))
        bb.emit_func_output(out)
    mod = bb.get()
    mod.update_global_info("vdevice", [cpu])
    with SM90:
        assert kernels_of(dispatch_dense(mod)) == ["zz_dense_n48_k64_float32_llvm"]
    assert kernels_of(dispatch_dense(mod)) == ["zz_dense_n48_k64_float32_llvm"]  # no target


# --- CUDA tensor cores: generated code, checked on CPU-only machines ---------------------------


@pytest.mark.parametrize(
    "target,n,k,dtype,expected",
    [
        (SM90, 768, 768, "float16", True),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_80"}), 3072, 1024, "bfloat16", True),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_75"}), 768, 768, "float16", False),
        (SM90, 768, 768, "float32", False),
        (SM90, 100, 768, "float16", False),  # n not a multiple of the 128-wide tile
        (SM90, 768, 96, "float16", False),  # k not a multiple of the 64-wide k-step
        (tvm.target.Target("llvm"), 768, 768, "float16", False),
    ],
)
def test_cuda_kernel_choice(target, n, k, dtype, expected):
    assert cuda_dense.supports(target, n, k, dtype) is expected


@pytest.mark.parametrize("dtype,ab", [("float16", "f16"), ("bfloat16", "bf16")])
def test_cuda_bias_is_fused_and_tensor_cores_are_used(dtype, ab):
    mod = dispatched(standalone_linear_module(256, 128, dtype, bias=True), SM90)
    assert kernels_of(mod) == [f"zz_dense_bias_n256_k128_{dtype}"]
    assert "R.add" not in mod["main"].script() and "R.matmul" not in mod["main"].script()
    ex = tvm.compile(standalone_linear_module(256, 128, dtype, bias=True), target=SM90,
                     relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    src = ex.mod.imports[0].imports[0].inspect_source()
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src
    assert "cp.async.cg.shared.global" in src


@pytest.mark.parametrize("n,wide", [(384, 128), (768, 256), (1024, 256)])  # 256 where n allows
@pytest.mark.parametrize("dtype,ab", [("float16", "f16"), ("bfloat16", "bf16")])
def test_sm90a_gets_the_wgmma_kernel(dtype, ab, n, wide):
    """Hopper's a-arch: both operands read by wgmma from swizzled shared memory, filled by TMA
    bulk tensor copies (the warp-specialized kernel); plain sm_90 keeps mma.sync (the test
    above). mma.sync serves only the split-k kernel of small batches here: the full-size kernel
    (the branch past SMALL_ROWS) issues no mma.sync."""
    ex = tvm.compile(standalone_linear_module(n, 128, dtype, bias=True), target=SM90A,
                     relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    src = ex.mod.imports[0].imports[0].inspect_source()
    assert f"wgmma.mma_async.sync.aligned.m64n{wide}k16.f32.{ab}.{ab}" in src
    assert "cp.async.bulk.tensor.2d" in src and "wgmma.wait_group.sync.aligned" in src
    full_size = cuda_tma_dense.tma_dense_kernel(n, 128, dtype, Epilogue(True)).script()
    full_size = full_size[full_size.index("else:"):]
    assert "wgmma" in full_size and "mma.sync" not in full_size


@pytest.mark.parametrize("arch,expected", [("sm_90", "sm_90a"), ("sm_80", "sm_80"),
                                            ("sm_100", "sm_100")])
def test_device_cuda_target_names_sm90a_on_hopper(monkeypatch, arch, expected):
    """Target.from_device names sm_90 on an H100/H200; the a-arch (wgmma) must be asked for."""
    from relax_masked_attn.targets import device_cuda_target

    device_target = tvm.target.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024})
    monkeypatch.setattr(tvm.target.Target, "from_device", staticmethod(lambda dev: device_target))
    target = device_cuda_target()
    assert str(target.attrs["arch"]) == expected
    assert int(target.attrs["max_num_threads"]) == 1024  # the rest of the device's target kept


@pytest.mark.parametrize("n,k,tiles", [(768, 768, (128, 2)), (640, 768, (256, 4)),
                                       (768, 96, (128, 4)), (768, 768, (64, 4))])
def test_wgmma_kernel_refuses_tiles_it_cannot_run(n, k, tiles):
    with pytest.raises(ValueError, match="wgmma_dense_kernel"):
        cuda_dense.wgmma_dense_kernel(n, k, "float16", tiles=tiles)


def test_only_sm90a_has_wgmma():
    assert cuda_dense.has_wgmma(SM90A)
    assert not cuda_dense.has_wgmma(SM90)
    assert not cuda_dense.has_wgmma(tvm.target.Target({"kind": "cuda", "arch": "sm_100a"}))


def test_cuda_unsupported_shapes_stay_with_tvm():
    assert kernels_of(dispatched(standalone_linear_module(100, 64, "float16"), SM90)) == []


@pytest.mark.parametrize("target", [SM90, "llvm"])
def test_a_matmul_into_another_dtype_stays_with_tvm(target):
    """matmul(x, w.T, out_dtype=float32) on fp16 inputs: our kernels write the input dtype."""
    dtype = "float16" if target is SM90 else "float32"
    x = relax.Var("x", relax.TensorType((tirx.Var("m", "int64"), 128), dtype))
    w = relax.Var("w", relax.TensorType((256, 128), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        wt = bb.emit(relax.op.permute_dims(w))
        other = "float32" if dtype == "float16" else "float16"
        bb.emit_func_output(bb.emit(relax.op.matmul(x, wt, out_dtype=other)))
    assert kernels_of(dispatched(bb.get(), target)) == []


@pytest.mark.parametrize("make", [cuda_dense.dense_kernel, cuda_dense.wgmma_dense_kernel])
@pytest.mark.parametrize("bias,activation,residual", EPILOGUES)
def test_cuda_kernel_is_well_formed(make, bias, activation, residual):
    func = make(256, 192, "float16", Epilogue(bias, activation, residual))
    assert tvm.tirx.analysis.verify_well_formed(func)
    names = [str(p.name) for p in func.params]
    assert names == ["x", "w", *(["bias"] if bias else []), *(["residual"] if residual else []),
                     "out"]


def test_mma_kernel_bounds_only_the_last_tile_of_rows():
    """The mma.sync kernel's copies of w and of a whole tile of x rows take no bounds (their
    addresses a base plus constants); only x's last, partial tile of rows reads with a row clamp
    and zero fill. Each CUDA kernel's copies of w and x, with and without a source size."""
    from tvm.target import Target

    func = cuda_dense.dense_kernel(768, 768, "float16", Epilogue(True))
    src = tvm.compile(tvm.IRModule({"main": func}),
                      target=Target({"kind": "cuda", "arch": "sm_80"})).mod.imports[0]
    kernels = re.split(r'extern "C" __global__', src.inspect_source())[1:]
    # each copy: (whether it has a source size, the buffer it reads: its second pointer)
    copies = re.compile(r"cp_async_cg(_src_size)?_async_cg_shared_global_16\("
                        r"[^;]*?&\(smem_ptr\[[^;]*?&\((\w+)_ptr\[")
    products = 0
    for kernel in kernels:
        found = copies.findall(kernel.split(") {", 1)[-1])
        if not found:
            continue  # the split-k path's sum
        products += 1
        bounded = {name for size, name in found if size}
        assert bounded == {"x"}, bounded
        unbounded = [name for size, name in found if not size]
        assert set(unbounded) == {"x", "w"}
    assert products == 2  # the product and the split-k path's partial sums


@pytest.mark.parametrize("target", [SM90, SM90A])
@pytest.mark.parametrize("bias,activation,residual", EPILOGUES[1:])
@pytest.mark.parametrize("rank", [2, 3])
def test_cuda_epilogue_joins_the_kernel(target, bias, activation, residual, rank):
    """bias, gelu and the residual add: one kernel call, none of the ops left in main."""
    linear = standalone_linear_module(256, 128, "float16", bias, rank, activation, residual)
    mod = dispatched(linear, target)
    name = "zz_dense" + "".join(f"_{p}" for p, on in (("bias", bias), (activation, activation),
                                                     ("residual", residual)) if on)
    assert kernels_of(mod) == [f"{name}_n256_k128_float16"]
    script = mod["main"].script()
    assert "R.add" not in script and "R.nn.gelu" not in script and "R.matmul" not in script


@pytest.mark.parametrize("target", [SM90A, "llvm"])
def test_a_product_used_twice_keeps_its_epilogue_apart(target):
    """The product is returned too: fusing the bias would compute the product twice."""
    dtype = "float32" if target == "llvm" else "float16"
    mod = dispatched(standalone_linear_module(256, 128, dtype, bias=True, activation="gelu",
                                   keep_product=True), target)
    assert kernels_of(mod) == [f"zz_dense_n256_k128_{dtype}"]
    script = mod["main"].script()
    assert "R.add" in script and "R.nn.gelu" in script


def test_cpu_fuses_bias_gelu_and_residual():
    linear = standalone_linear_module(48, 64, bias=True, activation="gelu", residual=True)
    mod = dispatched(linear, "llvm")
    assert kernels_of(mod) == ["zz_dense_bias_gelu_residual_n48_k64_float32"]
    script = mod["main"].script()
    assert "R.add" not in script and "R.nn.gelu" not in script


# --- CUDA on a real GPU ---------------------------------------------------------------------


def gpu_target(kernel: str, monkeypatch=None) -> tvm.target.Target:
    """The visible GPU's target for ``kernel``: ``mma``, its plain target; ``wgmma``, its
    sm_90a target (skips the test off Hopper), with the default ``HOPPER_DENSE``;
    ``tma-store``, the same with the opt-in TMA-store choice put there through
    ``monkeypatch``."""
    from relax_masked_attn.passes import dispatch_dense as dd
    from relax_masked_attn.targets import device_cuda_target

    if kernel == "mma":
        return tvm.target.Target.from_device(tvm.cuda(0))
    target = device_cuda_target()
    if not cuda_dense.has_wgmma(target):
        pytest.skip("not a Hopper GPU")
    if kernel == "tma-store":
        monkeypatch.setattr(dd, "HOPPER_DENSE", dd.HOPPER_DENSE_CHOICES["tma-store"])
    return target


def gpu_vm(mod, kernel: str, name_part: str, prepack: bool, monkeypatch=None):
    """``mod`` built through our pipeline for :func:`gpu_target` ``(kernel)``, after checking
    that one of its dense kernels' names holds ``name_part``; its VM on the GPU."""
    target = gpu_target(kernel, monkeypatch)
    assert any(name_part in name for name in kernels_of(dispatched(mod, target)))
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline(
        "relax_masked_attn", prepack_weights=prepack))
    return relax.VirtualMachine(ex, tvm.cuda(0))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mma", "wgmma", "tma-store"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bias,activation,residual", EPILOGUES)
@pytest.mark.parametrize("n,k", [(128, 64), (768, 768), (384, 1536), (1024, 192)])
def test_cuda_dense_matches_numpy(n, k, bias, activation, residual, dtype, kernel,
                                  monkeypatch):
    """Row counts off the 128-row tile (1, 7, 127, 129, 1000) and over it; every epilogue.
    ``mma``: the device's plain target; ``wgmma``: its sm_90a target (Hopper only);
    ``tma-store``: the same with the opt-in TMA stores."""
    import ml_dtypes

    assert cuda_available()
    dev = tvm.cuda(0)
    target = gpu_target(kernel, monkeypatch)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np_dtype)
    b = rng.standard_normal(n).astype(np_dtype) if bias else None
    shapes = ((2, (1, k)), (2, (7, k)), (3, (1, 127, k)), (3, (3, 43, k)), (2, (1000, k)))
    for rank, shape in shapes:
        mod = standalone_linear_module(n, k, dtype, bias, rank, activation, residual)
        assert kernels_of(dispatched(mod, target)), "our kernel was not dispatched"
        x = rng.standard_normal(shape).astype(np_dtype)
        r = rng.standard_normal((*shape[:-1], n)).astype(np_dtype) if residual else None
        out = run_linear(mod, target, dev, x, w, b, r).astype("float32")
        ref = reference(x, w, b, activation, r)
        tol = 2e-2 if dtype == "float16" else 6e-2
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("n,k", [(768, 3072), (3072, 768)])
def test_cuda_small_batches_stay_right_call_after_call(n, k, kernel):
    """Twenty calls of one compiled product in one virtual machine, row counts up to
    SMALL_ROWS (the split-k path, its workspace and sum kernel reused call after call) and one
    above, each against NumPy."""
    dev = tvm.cuda(0)
    mod = standalone_linear_module(n, k, "float16", bias=True, rank=2, activation="gelu",
                                   residual=True)
    vm = gpu_vm(mod, kernel, "_bias_gelu_residual", prepack=False)
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float16)
    for call in range(20):
        rows = (1, 64, 33, 7, 65)[call % 5]
        x = rng.standard_normal((rows, k)).astype(np.float16)
        r = rng.standard_normal((rows, n)).astype(np.float16)
        args = [tvm.runtime.tensor(a, device=dev) for a in (x, w, b, r)]
        out = vm["main"](*args).numpy().astype("float32")
        np.testing.assert_allclose(out, reference(x, w, b, "gelu", r), rtol=2e-2, atol=2e-2,
                                   err_msg=f"call {call}, {rows} rows")


@pytest.mark.parametrize("target", [SM90, SM90A, {"kind": "llvm", "mcpu": "haswell"}])
def test_each_kernel_is_generated_once_per_model(target):
    """A model asks for the same kernel at every layer: four layers parse as many kernels as one,
    and the module holds one copy."""
    from tvm.relax.frontend import nn

    class Layers(nn.Module):
        def __init__(self, count):
            self.linears = nn.ModuleList([nn.Linear(128, 128) for _ in range(count)])

        def forward(self, x: nn.Tensor):
            for linear in self.linears:  # one after another (products of one input would join)
                x = linear(x)
            return x

    target = tvm.target.Target(target)
    dtype = "float32" if target.kind.name == "llvm" else "float16"
    generator = (cpu_dense.dense_kernel if target.kind.name == "llvm"
                 else cuda_pingpong_dense.cooperative_dense_kernel
                 if cuda_dense.has_wgmma(target)
                 else cuda_dense.dense_kernel)
    generated = []
    for count in (1, 4):
        model = Layers(count)
        model.to(dtype)
        mod, _ = model.export_tvm({"forward": {"x": nn.spec.Tensor(["m", 128], dtype)}})
        generator.cache_clear()
        mod = dispatched(mod, target)
        assert kernels_of(mod) == [f"zz_dense_bias_n128_k128_{dtype}"]
        generated.append(generator.cache_info().misses)
    assert generated[0] == generated[1] >= 1


def test_cpu_kernels_of_different_isas_stay_apart():
    """The attention kernel's cache is keyed by the ISA that the current target resolves to."""
    from relax_masked_attn.kernels.cpu import cpu_kernel

    kernels = []
    for mcpu in ("haswell", "skylake-avx512", "haswell"):
        with tvm.target.Target({"kind": "llvm", "mcpu": mcpu}):
            kernels.append(cpu_kernel(4, 4, 64, "float32", "padded", 0.125))
    assert kernels[0] is kernels[2]
    assert not tvm_ffi.structural_equal(kernels[0], kernels[1])


def swiglu_module(hidden: int, inner: int, dtype: str, share_gate: bool = False):
    """Qwen3's MLP, ``down(silu(gate(x)) * up(x))``; with ``share_gate`` the gate product is
    also returned (then it must stay a product of its own)."""
    from tvm.relax.frontend import nn

    class MLP(nn.Module):
        def __init__(self):
            self.gate_proj = nn.Linear(hidden, inner, bias=False)
            self.up_proj = nn.Linear(hidden, inner, bias=False)
            self.down_proj = nn.Linear(inner, hidden, bias=False)

        def forward(self, x: nn.Tensor):
            gate = self.gate_proj(x)
            out = self.down_proj(nn.op.silu(gate) * self.up_proj(x))
            return (out, gate) if share_gate else out

    model = MLP()
    model.to(dtype)
    mod, _ = model.export_tvm({"forward": {"x": nn.spec.Tensor(["t", hidden], dtype)}})
    return mod


@pytest.mark.parametrize("target", [SM90, SM90A])
def test_cuda_swiglu_is_one_product(target):
    mod = dispatched(swiglu_module(256, 512, "float16"), target)
    assert kernels_of(mod) == ["zz_dense_n256_k512_float16", "zz_dense_swiglu_n1024_k256_float16"]
    script = mod["forward"].script()
    assert "R.nn.silu" not in script and "R.multiply" not in script


@pytest.mark.parametrize("target,share_gate", [({"kind": "llvm", "mcpu": "haswell"}, False),
                                               (SM90A, True)])
def test_swiglu_stays_apart_on_cpus_and_when_the_gate_is_used_again(target, share_gate):
    dtype = "float16" if share_gate else "float32"
    mod = dispatched(swiglu_module(256, 512, dtype, share_gate), target)
    assert not any("swiglu" in name for name in kernels_of(mod))
    assert "R.nn.silu" in mod["forward"].script()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mma", "wgmma", "tma-store"])
@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("hidden,inner,dtype", [(256, 512, "float16"), (1024, 3072, "float16"),
                                                (128, 384, "bfloat16")])
def test_cuda_swiglu_matches_torch(hidden, inner, dtype, prepack, kernel, monkeypatch):
    """The gated product against torch's ``down(silu(x Wg^T) * (x Wu^T))``, with the weights
    interleaved once by ``transform_params`` (prepack) or in every call."""
    import torch

    vm = gpu_vm(swiglu_module(hidden, inner, dtype), kernel, "swiglu", prepack, monkeypatch)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(inner)
    wg, wu = (torch.randn(inner, hidden, generator=gen) / hidden**0.5 for _ in range(2))
    wd = torch.randn(hidden, inner, generator=gen) / inner**0.5
    weights = [w.to(tdtype).cuda() for w in (wg, wu, wd)]
    params = [tvm.runtime.from_dlpack(w) for w in weights]
    if prepack:
        params = vm["transform_params"](params)
    for rows in (1, 7, 130, 1000):
        x = torch.randn(rows, hidden, generator=gen).to(tdtype).cuda()
        out = torch.from_dlpack(vm["forward"](tvm.runtime.from_dlpack(x), *params)).float()
        g, u, d = (w.float() for w in weights)
        ref = (torch.nn.functional.silu(x.float() @ g.T) * (x.float() @ u.T)) @ d.T
        tol = 2e-2 if dtype == "float16" else 8e-2
        np.testing.assert_allclose(out.cpu().numpy(), ref.cpu().numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("make,arch", [(cuda_dense.dense_kernel, "sm_80"),
                                       (cuda_dense.wgmma_dense_kernel, "sm_90a"),
                                       (cuda_tma_dense.tma_dense_kernel, "sm_90a")])
def test_small_batches_take_the_split_k_kernels(make, arch):
    """Up to SMALL_ROWS rows the product runs split along k (a grid blockIdx.z deep) and a
    second kernel adds the parts; above, the one full-size kernel: three kernels, the host
    choosing by the row count."""
    import re

    # 128-column tiles x parts, within SMALL_BLOCKS = 132: 6 x 12 = 72, 6 x 16 = 96,
    # 24 x 4 = 96 blocks (12 k-steps of 64 split 4 ways; 5 would not divide them)
    assert cuda_dense.small_batch_splits(768, 768) == 12
    assert cuda_dense.small_batch_splits(768, 3072) == 16
    assert cuda_dense.small_batch_splits(3072, 768) == 4
    func = make(768, 3072, "float16", Epilogue(True, None, True))
    assert f"m <= {cuda_dense.SMALL_ROWS}" in func.script()
    ex = tvm.compile(tvm.IRModule({"main": func}),
                     target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    src = ex.mod.imports[0].inspect_source()
    kernels = {name for name in re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)", src)}
    assert len(kernels) == 3


def test_kernels_with_unhashable_arguments_are_generated_too():
    """A list of tiles is not cached, but serves as well as the tuple."""
    listed = cuda_dense.dense_kernel(256, 128, "float16", None, [128, 128, 64, 2, 2, 3])
    tupled = cuda_dense.dense_kernel(256, 128, "float16", None, (128, 128, 64, 2, 2, 3))
    assert tvm_ffi.structural_equal(listed, tupled)


# --- Products of one input joined into one kernel with split outputs (q, k, v) -----------------


def siblings_module(hidden: int, widths, dtype: str, bias: bool, gelu_last: bool = False):
    """Products of one ``x [t, hidden]`` by weights of ``widths`` rows (an attention layer's q,
    k and v), each returned; ``gelu_last`` gives the last product another epilogue."""
    from tvm.relax.frontend import nn

    class Siblings(nn.Module):
        def __init__(self):
            self.projs = nn.ModuleList([nn.Linear(hidden, w, bias=bias) for w in widths])

        def forward(self, x: nn.Tensor):
            outs = [proj(x) for proj in self.projs]
            if gelu_last:
                outs[-1] = nn.op.gelu(outs[-1])
            return tuple(outs)

    model = Siblings()
    model.to(dtype)
    mod, _ = model.export_tvm({"forward": {"x": nn.spec.Tensor(["t", hidden], dtype)}})
    return mod


@pytest.mark.parametrize("target,widths,bias,expected", [
    (SM90A, (768, 768, 768), True, ["zz_dense_bias_to768_768_768_n2304_k768_float16"]),
    (SM90, (2048, 1024, 1024), False, ["zz_dense_to2048_1024_1024_n4096_k768_float16"]),
    (SM90A, (1024, 1024), False, ["zz_dense_to1024_1024_n2048_k768_float16"]),
    (SM90, (256, 512), True, ["zz_dense_bias_to256_512_n768_k768_float16"]),
])
def test_cuda_products_of_one_input_are_one_kernel(target, widths, bias, expected):
    module = siblings_module(768, widths, "float16", bias)
    mod = dispatched(module, target)
    assert kernels_of(mod) == expected
    script = mod["forward"].script()
    assert script.count("R.call_tir") == 1 and "R.concat" in script
    ex = tvm.compile(module, target=target, relax_pipeline=relax.get_pipeline(
        "relax_masked_attn", prepack_weights=True))
    assert f"{expected[0]}_kernel" in ex.mod.imports[0].imports[0].inspect_source()


@pytest.mark.parametrize("target,widths,gelu_last", [
    ({"kind": "llvm", "mcpu": "haswell"}, (768, 768, 768), False),  # CPUs keep them apart
    (SM90A, (768, 768), True),  # the other one has another epilogue
    (SM90A, (128, 384), False),  # the second part would start inside a 256-column tile
])
def test_products_stay_apart_where_one_kernel_cannot_write_them(target, widths, gelu_last):
    dtype = "float32" if target == {"kind": "llvm", "mcpu": "haswell"} else "float16"
    mod = dispatched(siblings_module(768, widths, dtype, True, gelu_last), target)
    assert not any("_to" in name for name in kernels_of(mod))


def test_split_epilogue_checks_its_parts():
    with pytest.raises(ValueError, match="split into 2 to 3"):
        Epilogue(residual=True, split=(128, 128))
    with pytest.raises(ValueError, match="does not add up"):
        Epilogue(split=(128, 128)).outputs(384)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mma", "wgmma", "tma-store"])
@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("hidden,widths,bias,dtype", [
    (768, (768, 768, 768), True, "float16"), (1024, (2048, 1024, 1024), False, "float16"),
    (256, (256, 512), True, "bfloat16")])
def test_cuda_split_products_match_torch(hidden, widths, bias, dtype, prepack, kernel,
                                         monkeypatch):
    """Each output of the joint kernel against torch's own ``linear`` of its weight, rows on
    both paths (split-k up to 64, the full-size kernel above), weights concatenated once by
    ``transform_params`` (prepack) or in every call."""
    import torch

    vm = gpu_vm(siblings_module(hidden, widths, dtype, bias), kernel, "_to", prepack,
                monkeypatch)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(sum(widths))
    weights = []
    for w in widths:
        weights.append((torch.randn(w, hidden, generator=gen) / hidden**0.5).to(tdtype).cuda())
        if bias:
            weights.append(torch.randn(w, generator=gen).to(tdtype).cuda())
    params = [tvm.runtime.from_dlpack(t) for t in weights]
    if prepack:
        params = vm["transform_params"](params)
    for rows in (1, 7, 64, 65, 1000):
        x = torch.randn(rows, hidden, generator=gen).to(tdtype).cuda()
        outs = vm["forward"](tvm.runtime.from_dlpack(x), *params)
        step = 2 if bias else 1
        for i, out in enumerate(outs):
            ref = torch.nn.functional.linear(x.float(), weights[i * step].float(),
                                             weights[i * step + 1].float() if bias else None)
            tol = 2e-2 if dtype == "float16" else 8e-2
            np.testing.assert_allclose(torch.from_dlpack(out).float().cpu().numpy(),
                                       ref.cpu().numpy(), rtol=tol, atol=tol)


# --- The warp-specialized TMA kernel (kernels/cuda_tma_dense.py; sm_90a's dense kernel) --------


def sm90a_source(func) -> str:
    """The CUDA source of PrimFunc ``func`` built for sm_90a."""
    return tvm.compile(tvm.IRModule({"main": func}), target=SM90A).mod.imports[0].inspect_source()


def tma_cuda_source(n, k, epilogue, tiles=None, persistent=False, tma_store=False) -> str:
    return sm90a_source(cuda_tma_dense.tma_dense_kernel(n, k, "float16", epilogue, tiles,
                                                        persistent, tma_store))


def pingpong_cuda_source(n, k, epilogue, tiles=None) -> str:
    return sm90a_source(cuda_pingpong_dense.pingpong_dense_kernel(n, k, "float16", epilogue,
                                                                  tiles))


def cooperative_cuda_source(n, k, epilogue, tiles=None) -> str:
    return sm90a_source(cuda_pingpong_dense.cooperative_dense_kernel(n, k, "float16", epilogue,
                                                                     tiles))


def never_joining_body(src: str) -> str:
    """The body of the 384-thread kernel in ``src``, after checking the frame both kernels of
    ``cuda_pingpong_dense`` share: one block-wide barrier (after the ring's barriers are set
    up), the registers split once (producer 40, consumers 232) and never handed back."""
    body = src[src.index("__launch_bounds__(384)"):]
    body = body[body.index("{"):]
    assert body.count("__syncthreads()") == 1
    assert body.count("setmaxnreg_dec_sync_aligned_u32_40()") == 1
    assert body.count("setmaxnreg_inc_sync_aligned_u32_232()") == 1
    assert "u32_168" not in body
    return body


@pytest.mark.parametrize("epilogue,tiles", [
    (Epilogue(True, "gelu"), (256, 4)), (Epilogue(True, None, True), (128, 6)),
    (Epilogue(), (128, 3)), (Epilogue(True, split=(256, 256, 256)), (256, 3))])
def test_cooperative_kernel_never_joins_its_roles(epilogue, tiles):
    """The cooperative kernel: one block-wide barrier (after the ring's barriers are set up),
    the registers split once, both consumers on every tile (one ``m64n256`` or ``m64n128``
    product a 16-wide k-step, no turns at the ring), each staging and storing its rows 128
    columns at a time behind its own named barrier (twice a window), the staging tile read
    back at swizzled addresses; 4 stages of 256-column tiles (6 of 128 columns) fit in
    226 KiB, 5 are refused."""
    full = never_joining_body(cooperative_cuda_source(768, 512, epilogue, tiles))
    assert "(uint)256)" not in full and "bar_arrive" not in full
    assert full.count(f"mma_async_sync_aligned_m64n{tiles[0]}k16") == 4
    assert full.count("bar_sync_count_sync(((uint)2 + ((uint)((int)threadIdx.y))), (uint)128)"
                      ) == 2 * tiles[0] // 128
    reads = [line for line in full.splitlines() if "ld_vec_shared_v4_b32(" in line]
    assert reads and all(" ^ " in line for line in reads)
    assert "ptx_st_shared_b32" in full and "cp_async_bulk_tensor" in full
    with pytest.raises(ValueError, match="226 KiB"):
        cuda_pingpong_dense.cooperative_dense_kernel(768, 512, "float16", epilogue, (256, 5))


@pytest.mark.parametrize("n,m,wide", [
    (768, 8192, False), (768, 10368, True), (3072, 8192, True), (3072, 10368, False),
    (1024, 8192, True), (1024, 10368, False), (2304, 8192, False), (2304, 10368, True),
    (3072, 65, False), (768, 1000, False), (768, 20000, True)])
def test_cooperative_kernel_takes_the_tiles_that_fill_their_waves(n, m, wide):
    """By default the cooperative kernel holds both tile widths where ``n`` allows 256 columns
    and the host picks by the row count: wide tiles where their waves of 132 blocks are as
    full as the narrow ones' (a wide tile's work at 1.03x the rate), narrow ones where a wide
    grid would leave a wave mostly empty (8192 rows of n = 768: 192 tiles, 2 waves, against
    384 in 3) or where either fits in one wave. Both kernels are built; a width ``n`` does not
    allow is never built."""
    from relax_masked_attn.kernels.hopper import PERSISTENT_BLOCKS

    def waves(cols):
        return -(-(-(-m // 128) * (n // cols)) // PERSISTENT_BLOCKS)

    assert (waves(256) * 2 / 1.03 <= waves(128)) == wide
    assert bool(cuda_pingpong_dense.wide_tiles_win(n, m)) == wide
    if m == 8192 and n == 768:
        src = cooperative_cuda_source(n, 512, Epilogue(True))
        assert "m64n256k16" in src and "m64n128k16" in src
        assert "m64n256k16" not in cooperative_cuda_source(640, 512, Epilogue(True))


def test_wgmma_kernels_sharing_a_primfunc_take_no_uint64_parameter():
    """Two ``wgmma`` kernels in one PrimFunc, the host choosing between them by the row count
    (the cooperative kernel's two tile widths): their descriptors' constant fields stay literals
    inside each kernel. Written as shifts, TVM's common-subexpression pass lifted them above the
    host's choice, so that both kernels took them as ``uint64`` parameters, which apache-tvm
    0.27's CUDA launcher refuses ("Cannot handle uint64 as device function argument"): every
    call failed."""
    from tvm.script import tirx as T

    from relax_masked_attn.kernels.epilogue import dense_func

    epilogue = Epilogue(True)
    wide = cuda_pingpong_dense.cooperative_body(768, 768, "float16", epilogue, 256, 4)
    narrow = cuda_pingpong_dense.cooperative_body(768, 768, "float16", epilogue, 128, 6)

    @T.macro
    def by_rows(x, w, bias, residual, outs, m):
        if m >= 1024:
            wide(x, w, bias, residual, outs, m)
        else:
            narrow(x, w, bias, residual, outs, m)

    func = dense_func(768, 768, "float16", by_rows, epilogue)
    src = sm90a_source(func)
    signatures = re.findall(r"__global__ void __launch_bounds__\(384\) \w+\(([^)]*)\)", src)
    assert len(set(signatures)) == 2
    assert not any("uint64_t" in signature for signature in signatures)


def test_swizzled_staging_tile_is_free_of_bank_conflicts():
    """The cooperative kernel's staging tile (64 x 128, unpadded): every element once; the 8
    rows of a fragment that a warp writes at once (4 threads a row, 4 bytes each) fall in 32
    distinct banks, and the 8 threads of a quarter warp reading one row's 16-byte chunks read
    8 distinct 16-byte bank groups."""
    offset, _ = cuda_dense.staged_store(768, "float16", Epilogue(), 64, 128, 128, 64 * 128,
                                        "shared.dyn", opaque=True, swizzled=True)
    offsets = {offset(r, c) for r in range(64) for c in range(128)}
    assert offsets == set(range(64 * 128))
    for row0 in range(0, 64, 8):
        for col in range(0, 128, 8):
            banks = {(offset(row0 + g, col + 2 * t) * 2 // 4) % 32
                     for g in range(8) for t in range(4)}
            assert len(banks) == 32
    for r in range(64):
        for first in (0, 64):
            groups = {(offset(r, first + 8 * j) * 2 // 16) % 8 for j in range(8)}
            assert len(groups) == 8


@pytest.mark.parametrize("epilogue,tiles", [
    (Epilogue(True, "gelu"), None), (Epilogue(True, None, True), (128, 4)),
    (Epilogue(True, split=(256, 256, 256)), (128, 3))])
def test_pingpong_kernel_never_joins_its_roles(epilogue, tiles):
    """The ping-pong kernel: one block-wide barrier (after the ring's barriers are set up), the
    registers split once and never handed back, each consumer ordering its own staging tile
    with its named barrier (3 or 4: 2 + warpgroup), read and written by ``ld.shared`` /
    ``st.shared``, the consumers handing each other the ring on barriers 5 and 6; the ring plus
    two staging tiles fit in 226 KiB or are refused."""
    full = never_joining_body(pingpong_cuda_source(768, 512, epilogue, tiles))
    assert full.count("bar_sync_count_sync(((uint)2 + ((uint)((int)threadIdx.y))), (uint)128)") == 2
    # the consumers take turns at the ring: without it the second one's wait on the ring's
    # `full` barrier of a k-step two phases ahead passed at once (a parity wait cannot tell
    # them apart) and the kernel read slots not yet loaded
    assert full.count("bar_sync_count_sync(((uint)4 + ((uint)((int)threadIdx.y))), (uint)256)") == 1
    assert full.count("bar_arrive_arrive(((uint)7 - ((uint)((int)threadIdx.y))), (uint)256)") == 1
    assert "ptx_st_shared_b32" in full and "ptx_ld_vec_shared_v4_b32" in full
    assert "cp_async_bulk_tensor" in full and "mbarrier_try_wait_parity" in full
    with pytest.raises(ValueError, match="226 KiB"):
        cuda_pingpong_dense.pingpong_dense_kernel(768, 512, "float16", epilogue, (128, 5))


def test_pingpong_cluster_form_multicasts_w_and_releases_slots_in_both_ctas():
    """The ping-pong form in clusters of two: launched in clusters (a ``clusterCtaIdx.x`` of
    2), each CTA multicasting its half of the ``w`` box to both CTAs (mask 3) next to its own
    ``x`` box, a consumer arriving on a slot's ``empty`` barrier in CTA 0 and in CTA 1 through
    ``mapa``, the barriers made visible to the cluster before use, and a cluster barrier at the
    start and at the end. The plain form has none of it; other cluster sizes are refused."""
    epilogue = Epilogue(True, None, True)
    func = cuda_pingpong_dense.pingpong_dense_kernel(768, 512, "float16", epilogue, None, 2)
    assert 'T.launch_thread("clusterCtaIdx.x", 2)' in func.script()
    src = sm90a_source(func)
    full = src[src.index("__launch_bounds__(384)"):]
    full = full[full.index("{"):]
    assert full.count("multicast__cluster(") == 1 and "(ushort)3)" in full
    assert full.count("g2s_cluster_async_bulk_tensor_2d_shared__cluster_global_mbarrier__"
                      "complete_tx__bytes(") == 1  # x, this CTA's own
    ranks = re.findall(r"mapa_u32_shared__cluster_u32\(remote_ptr\w*\[0\], tvm_builtin_cuda_cvta_"
                       r"generic_to_shared\(\(&\(empty_ptr\[[^]]*\]\)\)\), \(uint\)(\d)\);", full)
    assert sorted(ranks) == ["0", "0", "1", "1"]  # in the main loop and after the last k-step
    assert full.count("mbarrier_arrive_nocount_arrive_shared__cluster_b64(") == 4
    assert full.count("fence_mbarrier_init_mbarrier_init_release_cluster()") == 1
    assert full.count("tvm_builtin_cuda_cluster_sync()") == 2
    plain = pingpong_cuda_source(768, 512, epilogue)
    assert "cluster_sync()" not in plain[plain.index("__launch_bounds__(384)"):]
    assert "multicast" not in plain
    with pytest.raises(ValueError, match="clusters of 1 or 2"):
        cuda_pingpong_dense.pingpong_dense_kernel(768, 512, "float16", epilogue, None, 4)


@pytest.mark.parametrize("make", [cuda_pingpong_dense.pingpong_dense_kernel,
                                  cuda_pingpong_dense.cooperative_dense_kernel])
def test_never_joining_kernels_leave_gated_products_to_the_persistent_kernel(make):
    """A SwiGLU product's weight interleaves gate and up in groups of half the persistent
    kernel's tile; the ping-pong and cooperative generators hand it that kernel."""
    gated = Epilogue(gated=True)
    assert tvm_ffi.structural_equal(
        make(1536, 512, "float16", gated),
        cuda_tma_dense.tma_dense_kernel(1536, 512, "float16", gated, persistent=True))


@pytest.mark.parametrize("epilogue,tiles", [
    (Epilogue(True, "gelu"), (256, 4)), (Epilogue(True, None, True), (128, 6)),
    (Epilogue(gated=True), None), (Epilogue(True, split=(256, 256, 256)), (256, 3))])
def test_tma_kernel_has_a_producer_and_two_consumers(epilogue, tiles):
    """The full-size kernel: 384 threads, the producer warpgroup giving registers to the
    consumers, x and w read through two tensor maps by bulk tensor copies; the PrimFunc's
    parameters are those of the other dense kernels."""
    import re

    n = 768 if not epilogue.gated else 1536
    func = cuda_tma_dense.tma_dense_kernel(n, 512, "float16", epilogue, tiles)
    assert [str(p.name) for p in func.params] == [
        str(p.name) for p in cuda_dense.wgmma_dense_kernel(n, 512, "float16", epilogue).params]
    src = tma_cuda_source(n, 512, epilogue, tiles)
    full = src[src.index("__launch_bounds__(384)"):]
    assert re.search(r"const __grid_constant__ CUtensorMap w_map, "
                     r"const __grid_constant__ CUtensorMap x_map", full)
    assert full.count("setmaxnreg_dec_sync_aligned_u32_40()") == 1
    assert full.count("setmaxnreg_inc_sync_aligned_u32_232()") == 1
    assert "cp_async_bulk_tensor" in full and "mbarrier_try_wait_parity" in full
    assert "bra.uni" not in src  # waits poll from a loop in C++, not inside an asm block


@pytest.mark.parametrize("epilogue,tiles", [
    (Epilogue(True, "gelu"), None), (Epilogue(True, None, True), (128, 4)),
    (Epilogue(gated=True), None), (Epilogue(True, split=(256, 256, 256)), (256, 2))])
def test_persistent_tma_kernel_walks_tiles_with_its_roles_rejoined(epilogue, tiles):
    """The persistent form: one loop over the block's output tiles, each split into the roles
    and rejoined at the launch budget (so nothing after the join is held to the producer's 40
    registers), the staging tile apart from the ring, which fits in 226 KiB; too many stages
    are refused, not built."""
    n = 768 if not epilogue.gated else 1536
    src = tma_cuda_source(n, 512, epilogue, tiles, persistent=True)
    full = src[src.index("__launch_bounds__(384)"):]
    for call in ("dec_sync_aligned_u32_40", "inc_sync_aligned_u32_232",
                 "inc_sync_aligned_u32_168", "dec_sync_aligned_u32_168"):
        assert full.count(f"setmaxnreg_{call}()") == 1, call
    # the producer takes its registers back only after both consumers hold theirs
    assert full.index("bar_sync_count_sync((uint)2, (uint)384)") < full.index(
        "setmaxnreg_inc_sync_aligned_u32_168()")
    assert full.index("setmaxnreg_inc_sync_aligned_u32_232()") < full.index(
        "bar_arrive_arrive((uint)2, (uint)384)")
    assert full.count("for (int it = 0;") == 1
    assert "cp_async_bulk_tensor" in full and "mbarrier_try_wait_parity" in full
    with pytest.raises(ValueError, match="226 KiB"):
        cuda_tma_dense.tma_dense_kernel(768, 512, "float16", epilogue, (256, 4), True)


@pytest.mark.parametrize("epilogue,boxes", [
    (Epilogue(True, "gelu"), 4), (Epilogue(gated=True), 2),
    (Epilogue(True, split=(1024, 1024, 1024)), 12)])
def test_tma_store_form_stores_tiles_behind_the_next_main_loop(epilogue, boxes):
    """The persistent form's TMA stores: the consumers write the tile in TMA boxes (128-byte
    swizzle), fence it for the TMA unit and join; one thread stores it, a box per 64 columns
    (gated tiles have half as many output columns; a split product one tensor map an output),
    and waits for the stores to have read the tile only before the next tile's writes, after
    that tile's main loop, and once more at the end; no block-wide barrier for reading the
    staging tile back. Residual products are refused (they take the ping-pong form)."""
    import re

    src = tma_cuda_source(3072, 768, epilogue, persistent=True, tma_store=True)
    full = src[src.index("__launch_bounds__(384)"):]
    full = full[full.index("{"):]
    assert full.count("cp_async_bulk_tensor_s2g") == boxes
    assert len(set(re.findall(r"s2g\w*\(\(\(void\*\)\(\(unsigned long long\)\(&\((\w+)\)",
                              full))) == (3 if epilogue.split else 1)
    assert full.count("cp_async_bulk_commit_group") == 1
    assert full.count("cp_async_bulk_wait_group_async_bulk_wait_group_read_0()") == 2
    waits = full.index("cp_async_bulk_wait_group_async_bulk_wait_group_read_0()")
    # the first wait follows a main loop's end (its products waited for)
    assert "wgmma_wait_group_wait_group_sync_aligned_0()" in full[
        full.rindex("mma_async", 0, waits):waits]
    assert full.index("bar_sync_count_sync((uint)1, (uint)256)") > waits
    assert full.count("__syncthreads()") == 2  # the ring's setup, the join before the stores
    assert "fence_proxy_proxy_async_shared__cta();\n      tvm_builtin_ptx_setmaxnreg_dec" in full
    with pytest.raises(ValueError, match="without a residual"):
        cuda_tma_dense.tma_dense_kernel(768, 768, "float16", Epilogue(True, None, True),
                                        persistent=True, tma_store=True)
    with pytest.raises(ValueError, match="persistent"):
        cuda_tma_dense.tma_dense_kernel(768, 768, "float16", Epilogue(True), tma_store=True)


@pytest.mark.parametrize("index", range(64))
def test_tma_box_layout_is_the_swizzle_that_loads_land_in(index):
    """The staging tile of the TMA stores is laid out as a box loaded by TMA lands
    (hopper.swizzle128_descriptor's layout): element (r, c) of a 128 x 256 tile at 64-column
    box c // 64, row r, 16-byte chunk (c % 64 // 8) ^ (r % 8); every element once."""
    rng = np.random.default_rng(index)
    r, c = int(rng.integers(128)), int(rng.integers(256))
    expected = (c // 64) * 8192 + r * 64 + (((c % 64) // 8) ^ (r % 8)) * 8 + c % 8
    assert cuda_tma_dense.box_offset(r, c) == expected
    if index == 0:
        offsets = {cuda_tma_dense.box_offset(r, c) for r in range(128) for c in range(256)}
        assert offsets == set(range(128 * 256))


@pytest.mark.parametrize("form,epilogue", [
    ("one-shot", Epilogue(True, None, True)), ("persistent", Epilogue(True, None, True)),
    ("pingpong", Epilogue(True, None, True)), ("pingpong", Epilogue(True, "gelu")),
    ("pingpong", Epilogue(True, split=(1024, 1024, 1024))),
    ("tma-store", Epilogue(True, "gelu")), ("tma-store", Epilogue(gated=True)),
    ("tma-store", Epilogue(True, split=(1024, 1024, 1024))),
    ("cooperative", Epilogue(True, "gelu")), ("cooperative", Epilogue(True, None, True)),
    ("cooperative", Epilogue(True, split=(1024, 1024, 1024)))])
def test_ptxas_keeps_the_tma_kernel_out_of_local_memory(tmp_path, form, epilogue):
    """nvcc's ptxas builds the 384-thread kernel with no spills (an accumulator that lived past
    the join of the roles was capped by the producer's budget: 1600 bytes spilled and the wgmma
    instructions serialized)."""
    import re

    from .conftest import ptxas_report

    if form == "pingpong":
        src = pingpong_cuda_source(3072 if epilogue.split else 768, 3072, epilogue)
    elif form == "cooperative":
        src = cooperative_cuda_source(3072 if epilogue.split else 768, 3072, epilogue)
    elif form == "tma-store":
        src = tma_cuda_source(3072, 768, epilogue, persistent=True, tma_store=True)
    else:
        src = tma_cuda_source(768, 3072, epilogue, persistent=form == "persistent")
    name = re.search(r"__launch_bounds__\(384\) (\w+)\(", src).group(1)
    full = ptxas_report(src, "sm_90a", tmp_path)
    report = full[full.index(f"Compiling entry function '{name}'"):]
    assert "0 bytes spill stores, 0 bytes spill loads" in report.split("Compiling entry")[1]
    assert "C7512" not in full  # "wgmma.mma_async instructions are serialized"


@pytest.mark.parametrize("kernel", ["mma", "wgmma", "persistent"])
def test_residual_reads_are_in_flight_together(kernel):
    """The staged epilogue reads the residual vectors of RESIDUAL_BATCH rows before it stores
    the first of them (at least 4): read next to each store, every row waited out a global
    latency (ptxas kept each read behind the previous row's store): 6 us of BERT's 768 x 768
    product on an H200."""
    import re

    from tvm.target import Target

    epilogue = Epilogue(True, None, True)
    if kernel == "persistent":
        src = tma_cuda_source(768, 3072, epilogue, persistent=True)
    else:
        make = cuda_dense.dense_kernel if kernel == "mma" else cuda_dense.wgmma_dense_kernel
        target = Target({"kind": "cuda", "arch": "sm_80" if kernel == "mma" else "sm_90a"})
        func = make(768, 3072, "float16", epilogue)
        src = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.imports[0]
        src = src.inspect_source()
    stores = [match.start() for match in re.finditer(r"\*\(uint4\*\)\(\(\(uint\*\)out_ptr\)", src)]
    assert stores, "no 16-byte store of the output"
    first = stores[0]
    kernel_start = src.rindex("__global__", 0, first)
    reads = src[kernel_start:first].count("((uint*)residual_ptr)")
    assert reads == cuda_dense.RESIDUAL_BATCH >= 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bias,activation,residual", EPILOGUES)
@pytest.mark.parametrize("n,k,tiles,form", [
    (768, 768, None, "one-shot"), (3072, 768, (256, 3), "one-shot"),
    (256, 1536, (128, 6), "one-shot"), (768, 768, None, "persistent"),
    (3072, 192, (256, 2), "persistent"), (256, 1536, (128, 4), "persistent"),
    (768, 768, None, "pingpong"), (3072, 192, (128, 2), "pingpong"),
    (256, 1536, (128, 3), "pingpong"), (768, 768, None, "pingpong-cluster"),
    (3072, 192, (128, 2), "pingpong-cluster"), (256, 1536, (128, 3), "pingpong-cluster"),
    (768, 768, None, "tma-store"),
    (3072, 192, (256, 2), "tma-store"), (256, 1536, (128, 4), "tma-store"),
    (768, 768, None, "cooperative"), (3072, 192, (256, 2), "cooperative"),
    (256, 1536, (128, 4), "cooperative")])
def test_tma_kernel_matches_numpy(n, k, tiles, form, bias, activation, residual, dtype):
    """On a Hopper GPU, row counts off and on the 128-row tile (rows past m arrive from TMA as
    zeros and are never stored), both paths (split-k up to 64 rows); the persistent and
    ping-pong forms also with more tiles than blocks (20000 rows: each consumer of a ping-pong
    block takes several), k shorter than the ring (3 k-steps, 2 stages)."""
    import ml_dtypes

    from relax_masked_attn.targets import device_cuda_target

    if not cuda_dense.has_wgmma(device_cuda_target()):
        pytest.skip("not a Hopper GPU")
    dev = tvm.cuda(0)
    epilogue = Epilogue(bias, activation, residual)
    if form == "tma-store" and residual:
        pytest.skip("the TMA-store form takes no residual")
    if form == "cooperative":
        func = cuda_pingpong_dense.cooperative_dense_kernel(n, k, dtype, epilogue, tiles)
    elif form.startswith("pingpong"):
        func = cuda_pingpong_dense.pingpong_dense_kernel(n, k, dtype, epilogue, tiles,
                                                         2 if form == "pingpong-cluster" else 1)
    else:
        func = cuda_tma_dense.tma_dense_kernel(n, k, dtype, epilogue, tiles, form != "one-shot",
                                               form == "tma-store")
    kernel = tvm.compile(tvm.IRModule({"main": func}), target=SM90A)["main"]
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np_dtype)
    b = rng.standard_normal(n).astype(np_dtype)
    for rows in (1, 7, 127, 129, 1000) + ((20000,) if form != "one-shot" else ()):
        x = rng.standard_normal((rows, k)).astype(np_dtype)
        r = rng.standard_normal((rows, n)).astype(np_dtype)
        inputs = [x, w] + ([b] if bias else []) + ([r] if residual else [])
        out = tvm.runtime.tensor(np.full((rows, n), np.nan, np_dtype), device=dev)
        kernel(*[tvm.runtime.tensor(a, device=dev) for a in inputs], out)
        tol = 2e-2 if dtype == "float16" else 6e-2
        np.testing.assert_allclose(out.numpy().astype("float32"),
                                   reference(x, w, b if bias else None, activation,
                                             r if residual else None),
                                   rtol=tol, atol=tol, err_msg=f"{rows} rows")


@pytest.mark.parametrize("kernel", ["residual-pingpong", "persistent", "tma", "wgmma", "pingpong",
                                    "pingpong-cluster", "cooperative", "tma-store"])
def test_models_build_with_each_hopper_dense_kernel(monkeypatch, kernel):
    """The pipeline builds a layer's joined q/k/v product, BERT's output product with its
    residual and Qwen3's SwiGLU product for sm_90a with each choice of ``HOPPER_DENSE``
    (``bench_models.py --hopper-dense``): the default gives the residual product the ping-pong
    kernel, the gated one the persistent kernel and the others (q/k/v, Qwen3's down product) the
    cooperative one; the ping-pong and cooperative generators give the gated product of Qwen3's
    MLP the persistent kernel (its down product their own)."""
    from relax_masked_attn.passes import dispatch_dense as dd

    assert dd.HOPPER_DENSE is dd.HOPPER_DENSE_CHOICES["residual-pingpong"]
    monkeypatch.setattr(dd, "HOPPER_DENSE", dd.HOPPER_DENSE_CHOICES[kernel])
    for what, mod in [
            ("siblings", siblings_module(768, (768, 768, 768), "float16", True)),
            ("residual", standalone_linear_module(768, 3072, "float16", bias=True,
                                                  residual=True)),
            ("swiglu", swiglu_module(1024, 3072, "float16"))]:
        ex = tvm.compile(mod, target=SM90A, relax_pipeline=relax.get_pipeline("relax_masked_attn"))
        src = ex.mod.imports[0].imports[0].inspect_source()  # host module, then its CUDA one
        tma = "__launch_bounds__(384)" in src and "CUtensorMap x_map" in src
        assert tma == (kernel != "wgmma")
        persistent = "setmaxnreg_inc_sync_aligned_u32_168" in src  # its roles rejoin each tile
        pingpong = "bar_arrive_arrive(((uint)7 - " in src  # its consumers hand over the ring
        tma_stores = "cp_async_bulk_tensor_s2g" in src
        # the cooperative kernel's staging tiles are swizzled: read back at XORed addresses
        cooperative = any(" ^ " in line for line in src.splitlines() if "ld_vec_shared" in line)
        mixed = kernel in ("residual-pingpong", "tma-store")
        every_pingpong = kernel.startswith("pingpong")
        assert persistent == (kernel == "persistent"
                              or (every_pingpong or mixed or kernel == "cooperative")
                              and what == "swiglu"
                              or kernel == "tma-store" and what == "siblings"), what
        assert pingpong == (every_pingpong or mixed and what == "residual"), what
        assert cooperative == (kernel == "cooperative"
                               or kernel == "residual-pingpong" and what != "residual"), what
        assert ("multicast" in src) == (kernel == "pingpong-cluster"), what
        assert tma_stores == (kernel == "tma-store" and what != "residual"), what
