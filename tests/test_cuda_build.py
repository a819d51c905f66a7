"""The parallel CUDA build (``cuda_build.parallel_kernel_build``): the split of a build's kernels
into device modules, checked on the CUDA source TVM generates (no GPU needed)."""

import re

import pytest
import tvm

from relax_masked_attn import cuda_build
from relax_masked_attn.kernels import cuda_dense, cuda_wgmma
from relax_masked_attn.kernels.epilogue import Epilogue

SM90A = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(')


def several_kernels() -> tvm.IRModule:
    """Four PrimFuncs of different sizes (two attention kernels, two dense products)."""
    funcs = {
        "attention": cuda_wgmma.wgmma_attention_kernel(8, 4, 64, "float16", "padded", 0.125),
        "causal": cuda_wgmma.wgmma_attention_kernel(8, 8, 128, "float16", "causal_padded_left",
                                                    0.1),
        "dense": cuda_dense.wgmma_dense_kernel(768, 768, "float16", Epilogue(True)),
        "gelu": cuda_dense.dense_kernel(3072, 768, "float16", Epilogue(True, "gelu")),
    }
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def device_kernels(lib) -> list[set[str]]:
    """The kernel names of each CUDA module a built library imports."""
    found = []

    def walk(module):
        for imported in module.imports:
            if imported.kind == "cuda":
                found.append(set(KERNEL.findall(imported.inspect_source())))
            walk(imported)

    walk(lib.mod if hasattr(lib, "mod") else lib)
    return found


def test_parallel_build_puts_each_kernel_in_one_device_module():
    """Built under the context, the same kernels as TVM's one-module build, each in exactly one
    of three device modules, none empty."""
    mod = several_kernels()
    one = device_kernels(tvm.compile(mod, target=SM90A))
    assert len(one) == 1
    names = one[0]
    assert len(names) >= 4
    with cuda_build.parallel_kernel_build(3):
        split = device_kernels(tvm.compile(mod, target=SM90A))
    assert len(split) == 3
    assert all(split)  # no empty module
    assert set().union(*split) == names
    assert sum(len(s) for s in split) == len(names)  # each kernel in exactly one module


def test_split_groups_are_balanced_and_cover_every_function():
    """Largest first, each to the smallest group: the groups' sizes differ by at most one
    kernel's; more groups asked for than kernels give one kernel a group."""
    funcs = {f"f{i}": cuda_dense.wgmma_dense_kernel(256 * (i + 1), 768, "float16", Epilogue())
             for i in range(5)}
    mod = tvm.IRModule(funcs)
    groups = cuda_build.split_kernels(mod, 2)
    assert len(groups) == 2
    names = [sorted(g.name_hint for g in group.functions) for group in groups]
    assert sorted(sum(names, [])) == sorted(funcs)
    sizes = [sum(cuda_build.kernel_size(f) for f in group.functions.values())
             for group in groups]
    largest = max(cuda_build.kernel_size(f) for f in funcs.values())
    assert abs(sizes[0] - sizes[1]) <= largest  # greedy: within one kernel of each other
    assert len(cuda_build.split_kernels(mod, 9)) == 5  # never an empty group


def test_tvm_build_is_back_after_the_context():
    """Nested contexts take the larger thread count; TVM's own build is back once the last one
    closes, also after a refused thread count."""
    import importlib

    build_module = importlib.import_module("tvm.tirx.build")
    original = build_module.tir_to_runtime
    with cuda_build.parallel_kernel_build(4):
        with cuda_build.parallel_kernel_build(2):  # nested: the larger count applies
            assert cuda_build._threads() == 4
        assert build_module.tir_to_runtime is not original
    assert build_module.tir_to_runtime is original
    with pytest.raises(ValueError, match="at least 1"):
        with cuda_build.parallel_kernel_build(0):
            pass
    assert build_module.tir_to_runtime is original


@pytest.mark.parametrize("value,threads", [(None, 1), ("1", 1), ("16", 16), (" 8 ", 8)])
def test_build_threads_from_env(monkeypatch, value, threads):
    if value is None:
        monkeypatch.delenv(cuda_build.ENV_THREADS, raising=False)
    else:
        monkeypatch.setenv(cuda_build.ENV_THREADS, value)
    assert cuda_build.build_threads_from_env() == threads


@pytest.mark.parametrize("value", ["0", "-2", "many", "2.5"])
def test_bad_build_threads_name_the_variable(monkeypatch, value):
    monkeypatch.setenv(cuda_build.ENV_THREADS, value)
    with pytest.raises(ValueError, match=cuda_build.ENV_THREADS):
        cuda_build.build_threads_from_env()
