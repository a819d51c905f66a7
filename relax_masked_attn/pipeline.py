"""The ``"relax_masked_attn"`` Relax pipeline: the target's default build with our passes."""

from __future__ import annotations

import tvm
from tvm import relax

from .cpu_schedule import cpu_default_schedule
from .gpu_schedule import gpu_default_schedule
from .passes.dispatch_dense import dispatch_dense
from .passes.dispatch_norm import dispatch_norm
from .passes.dlight_workaround import disable_dlight_tensorize
from .passes.legalize_prefill import LegalizeMaskedPrefill
from .passes.vectorizable_gelu import vectorizable_gelu

PIPELINE_NAME = "relax_masked_attn"


def pipeline_passes(target: tvm.target.Target,
                    prepack_weights: bool = False) -> list[tvm.transform.Pass]:
    """The target's default build passes, with our legalization, :func:`dispatch_dense` and
    :func:`dispatch_norm` first
    (then, with ``prepack_weights``, ``LiftTransformParams``: see :func:`_pipeline`);
    on GPUs :func:`disable_dlight_tensorize` before every dlight scheduling pass; on CPUs
    :func:`vectorizable_gelu` and, after ``FuseTIR``, the CPU schedules of
    :mod:`relax_masked_attn.cpu_schedule`; on CUDA the vector schedule of
    :mod:`relax_masked_attn.gpu_schedule` before TVM's default one."""
    import importlib

    kind = target.kind.name
    backend = {"cuda": "cuda", "rocm": "rocm", "llvm": "cpu_generic"}.get(kind, "gpu_generic")
    if backend == "gpu_generic" and "gpu" not in target.keys:
        raise ValueError(f"relax_masked_attn pipeline: unsupported target kind {kind!r}")
    rp = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    passes = [LegalizeMaskedPrefill(), *rp.library_dispatch_passes(target)]
    passes += [dispatch_dense, dispatch_norm]
    if prepack_weights:
        passes.append(relax.transform.LiftTransformParams(shared_transform=True))
    if kind == "llvm":
        passes.append(vectorizable_gelu)
    for p in rp.legalize_passes(target):
        if p.info.name == "ApplyDefaultSchedule":
            passes += [gpu_default_schedule(), disable_dlight_tensorize]
        passes.append(p)
        if kind == "llvm" and p.info.name == "FuseTIR":
            passes.append(cpu_default_schedule())
    return passes + [*rp.dataflow_lower_passes(target), *rp.finalize_passes(target)]


def _pipeline(target: tvm.target.Target | str | None = None, prepack_weights: bool = False,
              **_kwargs) -> tvm.transform.Pass:
    """``tvm.compile(mod, target, relax_pipeline=relax.get_pipeline("relax_masked_attn"))``.

    ``get_pipeline("relax_masked_attn", prepack_weights=True)``: the weight layouts our kernels
    read (the CPU dense kernel's panels) are computed once, by a function ``transform_params``
    that ``LiftTransformParams`` builds from every function with a ``"num_input"`` attribute
    (what ``nn.Module.export_tvm`` writes): call ``vm["transform_params"](params)`` once and pass
    its results in place of the parameters. Without it the layouts are computed in every call
    (a copy of each weight: small next to the product at hundreds of rows, not at a few).
    """

    @tvm.transform.module_pass(opt_level=0, name="relax_masked_attn_pipeline")
    def run(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        tgt = tvm.target.Target(target) if target is not None else tvm.target.Target.current()
        if tgt is None:
            raise ValueError("relax_masked_attn pipeline: no target (pass one to tvm.compile)")
        with tgt:
            return tvm.transform.Sequential(pipeline_passes(tgt, prepack_weights))(mod)

    return run


if PIPELINE_NAME not in relax.pipeline.PIPELINE_MAP:
    relax.register_pipeline(PIPELINE_NAME)(_pipeline)
