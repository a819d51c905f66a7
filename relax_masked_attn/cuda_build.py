"""Build a CUDA target's kernels as several device modules, in parallel threads.

apache-tvm 0.27 turns all of a build's CUDA kernels into one source and compiles it in one NVRTC
call (``tvm.tirx.build.tir_to_runtime`` -> ``target.build.cuda`` -> the Python callback
``tvm_callback_cuda_compile``), on one core: most of a model's cold start on the GPU machine.
:func:`parallel_kernel_build` splits a CUDA target's kernels into groups of about equal size (by
the length of their TVMScript), builds each group into a device module of its own on a thread of
a pool and imports every one into the host module. A kernel launch finds its kernel by name
through the host module's imports, so the built library runs as the one-module build does, and
``export_library`` stores every imported module.

It is opt-in (``threads`` > 1; ``EmbeddingModel`` reads ``$RELAX_MASKED_ATTN_BUILD_THREADS``):
the groups compile in parallel only where both TVM's call into the C++ build and NVRTC release
the Python lock, and that has not yet been measured on a GPU machine.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm import tirx

_tirx_build = importlib.import_module("tvm.tirx.build")  # the module, not the function
_original_tir_to_runtime = _tirx_build.tir_to_runtime
_lock = threading.Lock()
_active: list[int] = []  # thread counts of the contexts now open (the largest applies)

ENV_THREADS = "RELAX_MASKED_ATTN_BUILD_THREADS"


def build_threads_from_env() -> int:
    """``$RELAX_MASKED_ATTN_BUILD_THREADS`` as a thread count (1, the one-module build, where
    unset); anything but a positive integer is an error that names the variable."""
    value = os.environ.get(ENV_THREADS, "1").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV_THREADS} must be a positive integer (threads), not {value!r}")
    return int(value)


def kernel_size(func: tirx.PrimFunc) -> int:
    """A kernel's size for balancing the groups: the length of its TVMScript (TVM 0.27
    exposes no TIR visitor to Python, and ``save_json`` crashes on some kernels)."""
    return len(func.script())


def split_kernels(device_mod: tvm.IRModule, groups: int) -> list[tvm.IRModule]:
    """``device_mod``'s functions in at most ``groups`` modules (its attributes on each), the
    largest first, each to the group of least size so far; no group is empty."""
    sized = sorted(((kernel_size(func), gvar.name_hint, gvar, func)
                    for gvar, func in device_mod.functions.items()),
                   key=lambda item: (-item[0], item[1]))
    bins: list[tuple[int, dict]] = [(0, {}) for _ in range(min(groups, len(sized)))]
    for size, _, gvar, func in sized:
        i = min(range(len(bins)), key=lambda j: bins[j][0])
        total, funcs = bins[i]
        funcs[gvar] = func
        bins[i] = (total + size, funcs)
    return [tvm.IRModule(funcs, attrs=device_mod.attrs) for _, funcs in bins]


def _threads() -> int:
    with _lock:
        return max(_active, default=1)


def _tir_to_runtime(host_mod, device_mod_dict, target_host):
    """``tvm.tirx.build.tir_to_runtime``, with each CUDA target's kernels split into groups
    built on a thread pool; the other targets' modules and the host module as TVM builds them."""
    threads = _threads()
    if threads <= 1 or not any(t.kind.name == "cuda" and len(m.functions) > 1
                               for t, m in device_mod_dict.items()):
        return _original_tir_to_runtime(host_mod, device_mod_dict, target_host)
    parts = []
    for target, device_mod in device_mod_dict.items():
        if len(device_mod.functions) == 0:
            continue
        groups = split_kernels(device_mod, threads) if target.kind.name == "cuda" else [
            device_mod]
        parts += [(target, group) for group in groups]
    context = tvm.transform.PassContext.current()

    def build(part):
        target, group = part
        # the pass context and the target are per thread: the worker enters the caller's
        # (NVRTC's callback names its architecture from the current target)
        with context, target:
            return _tirx_build.codegen_build(group, target)

    with ThreadPoolExecutor(min(threads, len(parts))) as pool:
        device_modules = list(pool.map(build, parts))
    host = tvm.IRModule({}, attrs=host_mod.attrs)
    host.update(host_mod)
    mhost = _tirx_build.codegen_build(host, target_host)
    for module in device_modules:
        mhost.import_module(module)
    return mhost


@contextlib.contextmanager
def parallel_kernel_build(threads: int):
    """Within it, every TVM build (``tvm.compile``, ``relax.build``) in this process builds each
    CUDA target's kernels as up to ``threads`` device modules on a thread pool; ``threads`` 1
    leaves the build as TVM does it. Contexts may nest or overlap across threads: while any is
    open the largest thread count applies, and TVM's own build is back once the last closes."""
    if threads < 1:
        raise ValueError(f"parallel_kernel_build: threads must be at least 1, not {threads}")
    if threads == 1:  # TVM's own build: nothing to change
        yield
        return
    with _lock:
        _active.append(threads)
        _tirx_build.tir_to_runtime = _tir_to_runtime
    try:
        yield
    finally:
        with _lock:
            _active.remove(threads)
            if not _active:
                _tirx_build.tir_to_runtime = _original_tir_to_runtime
