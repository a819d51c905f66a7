"""DispatchNorm and the CUDA norm kernel: which norms it takes, what it generates, and (on a GPU)
its results against torch's rms_norm and layer_norm."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend import nn

from relax_masked_attn.kernels import cuda_norm
from relax_masked_attn.passes.dispatch_norm import dispatch_norm

from .conftest import SM90

SM80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def norm_module(kind: str, shape: tuple, dtype: str, axes=-1, eps: float = 1e-6):
    """``rms_norm`` or ``layer_norm`` of an ``[rows, *shape[1:]]`` input (rows symbolic)."""
    hidden = shape[-1] if axes == -1 else shape[axes]

    class Norm(nn.Module):
        def __init__(self):
            self.weight = nn.Parameter((hidden,), dtype)
            self.bias = nn.Parameter((hidden,), dtype)

        def forward(self, x: nn.Tensor):
            if kind == "rms":
                return nn.op.rms_norm(x, self.weight, [axes], eps)
            return nn.op.layer_norm(x, [hidden], self.weight, self.bias, eps)

    mod, _ = Norm().export_tvm({"forward": {"x": nn.spec.Tensor(["rows", *shape[1:]], dtype)}})
    return mod


def kernels_of(mod):
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def dispatched(mod, target):
    with tvm.target.Target(target):
        return dispatch_norm(mod)


@pytest.mark.parametrize("kind,shape,expected", [
    ("rms", (0, 1024), "zz_rms_norm_h1024_float16_e1em06"),
    ("rms", (0, 16, 128), "zz_rms_norm_h128_float16_e1em06"),  # Qwen3's per-head q_norm
    ("layer", (0, 768), "zz_layer_norm_h768_float16_e1em06"),
])
def test_cuda_norms_go_to_our_kernel(kind, shape, expected):
    mod = dispatched(norm_module(kind, shape, "float16"), SM90)
    assert kernels_of(mod) == [expected]
    script = mod["forward"].script()
    assert "R.nn.rms_norm" not in script and "R.nn.layer_norm" not in script


@pytest.mark.parametrize("target,kind,shape,axes", [
    ({"kind": "llvm"}, "rms", (0, 1024), -1),  # the CPU keeps TVM's
    (SM90, "rms", (0, 1000), -1),  # not a multiple of 32
    (SM90, "rms", (0, 64, 8), 1),  # not the last axis
])
def test_other_norms_stay_with_tvm(target, kind, shape, axes):
    mod = dispatched(norm_module(kind, shape, "float16", axes=axes), target)
    assert kernels_of(mod) == []
    assert "R.nn.rms_norm" in mod["forward"].script()


@pytest.mark.parametrize("hidden,dtype,vector", [(1024, "float16", "uint4"),
                                                 (128, "bfloat16", "nv_bfloat164"),
                                                 (768, "float32", "float4")])
def test_kernel_moves_whole_vectors(hidden, dtype, vector):
    """x is read and out written in vectors (16 bytes, or a lane's whole share when smaller)."""
    import re

    ex = tvm.compile(tvm.IRModule({"main": cuda_norm.norm_kernel("rms", hidden, dtype, 1e-6)}),
                     target=SM80)
    src = ex.mod.imports[0].inspect_source()
    assert set(re.findall(r"\*\((\w+)\*\)\(x_ptr", src)) == {vector}
    assert set(re.findall(r"\*\((\w+)\*\)\(out_ptr", src)) == {vector}
    assert "__shfl_xor_sync" in src


def test_kernel_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda_norm.norm_kernel("rms", 100, "float16", 1e-6)
    with pytest.raises(ValueError, match="kind must be one of"):
        cuda_norm.norm_kernel("batch", 128, "float16", 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", [(1, 1024), (37, 768), (1030, 1024), (13, 16, 128), (5, 64)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cuda_norm_matches_torch(kind, shape, dtype):
    import torch

    hidden, eps = shape[-1], 1e-6
    target = tvm.target.Target.from_device(tvm.cuda(0))
    ex = tvm.compile(norm_module(kind, shape, dtype, eps=eps), target=target,
                     relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    vm = relax.VirtualMachine(ex, tvm.cuda(0))
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(hidden + len(shape))
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(tdtype).cuda()
    w = (torch.rand(hidden, generator=gen) + 0.5).to(tdtype).cuda()
    b = torch.randn(hidden, generator=gen).to(tdtype).cuda()
    args = [tvm.runtime.from_dlpack(t) for t in (x, w, b)]
    out = torch.from_dlpack(vm["forward"](*args)).float()
    if kind == "rms":
        ref = torch.nn.functional.rms_norm(x.float(), (hidden,), w.float(), eps)
    else:
        ref = torch.nn.functional.layer_norm(x.float(), (hidden,), w.float(), b.float(), eps)
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}[dtype]
    np.testing.assert_allclose(out.cpu().numpy(), ref.cpu().numpy(), rtol=tol, atol=tol * 4)


# --- RMSNorm of attention heads followed by the rotary embedding (Qwen3's q/k) ---------------


def norm_rope_module(heads: int, head_dim: int, dtype: str, keep_norm: bool = False):
    """``rope(rms_norm(x))`` of ``x [t, heads, head_dim]`` at ``positions [t]``, written with
    the model code's own ``rope_tables`` and ``rope``; ``keep_norm`` also returns the norm."""
    from relax_masked_attn.models.common import rope, rope_tables

    class NormRope(nn.Module):
        def __init__(self):
            self.norm = nn.RMSNorm(head_dim, axes=-1, epsilon=1e-6, bias=False)

        def forward(self, x: nn.Tensor, positions: nn.Tensor):
            y = self.norm(x)
            out = rope(y, rope_tables(positions, 1e6, head_dim, dtype))
            return (out, y) if keep_norm else out

    module = NormRope()
    module.to(dtype)
    mod, _ = module.export_tvm({"forward": {
        "x": nn.spec.Tensor(["t", heads, head_dim], dtype),
        "positions": nn.spec.Tensor(["t"], "int32")}})
    return mod


def test_head_norm_and_rope_become_one_kernel():
    mod = dispatched(norm_rope_module(16, 128, "float16"), SM90)
    assert "zz_rms_norm_h128_float16_e1em06_rope16" in kernels_of(mod)
    script = mod["forward"].script()
    assert "R.flip" not in script and "R.nn.rms_norm" not in script
    # The norm's value used elsewhere too: the fused kernel, and the plain norm for that use.
    mod = dispatched(norm_rope_module(8, 64, "float16", keep_norm=True), SM90)
    assert {"zz_rms_norm_h64_float16_e1em06_rope8",
            "zz_rms_norm_h64_float16_e1em06"} <= set(kernels_of(mod))
    # On a CPU nothing changes.
    cpu = dispatched(norm_rope_module(16, 128, "float32"), {"kind": "llvm"})
    assert "R.flip" in cpu["forward"].script() and "R.nn.rms_norm" in cpu["forward"].script()


def test_rope_kernel_refuses_rows_without_a_partner_lane():
    assert cuda_norm.supports_rope(128, "float16") and cuda_norm.supports_rope(512, "float16")
    assert not cuda_norm.supports_rope(96 * 3, "float32")  # 3 vectors a lane: no pairing
    with pytest.raises(ValueError, match="no rotary embedding"):
        cuda_norm.norm_kernel("layer", 128, "float16", 1e-6, rope_heads=4)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,head_dim", [(16, 128), (8, 64), (4, 32), (2, 512)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_norm_and_rope_match_torch(heads, head_dim, dtype):
    """Against Hugging Face's formula in float32: ``rms_norm`` then ``q * cos +
    rotate_half(q) * sin`` with ``cos``/``sin`` of ``[pos * theta^(-2i/d)]`` repeated twice."""
    import torch

    target = tvm.target.Target.from_device(tvm.cuda(0))
    ex = tvm.compile(norm_rope_module(heads, head_dim, dtype), target=target,
                     relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    assert f"_rope{heads}" in ex.mod.imports[0].inspect_source()
    vm = relax.VirtualMachine(ex, tvm.cuda(0))
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(heads * head_dim)
    t = 77
    x = (torch.randn((t, heads, head_dim), generator=gen) * 3).to(tdtype).cuda()
    w = (torch.rand(head_dim, generator=gen) + 0.5).to(tdtype).cuda()
    pos = torch.randint(0, 4000, (t,), generator=gen, dtype=torch.int32).cuda()
    out = torch.from_dlpack(vm["forward"](*(tvm.runtime.from_dlpack(a) for a in (x, pos, w))))
    y = torch.nn.functional.rms_norm(x.float(), (head_dim,), w.float(), 1e-6)
    inv = 1e6 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.cat([pos.double().cpu()[:, None] * inv] * 2, dim=-1)[:, None, :]
    cos, sin = (f(angles).to(tdtype).float().cuda() for f in (torch.cos, torch.sin))
    rotated = torch.cat([-y[..., head_dim // 2:], y[..., :head_dim // 2]], dim=-1)
    ref = y * cos + rotated * sin
    tol = {"float16": 4e-3, "bfloat16": 3e-2}[dtype]
    np.testing.assert_allclose(out.float().cpu().numpy(), ref.cpu().numpy(), rtol=tol, atol=tol)
