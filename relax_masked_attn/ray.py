"""Corpus jobs on Ray Data: an ``embedding`` column for every row of a dataset.

``pip install relax_masked_attn[ray]``. The model is compiled once, on the driver
(:func:`shared_library`); its shared library travels to the actors through Ray's object store,
so every actor of a multi-node cluster loads the same build instead of compiling its own. Each
actor (:class:`EmbedBatch`, for ``Dataset.map_batches``) loads the checkpoint's weights and
tokenizer from ``model`` — a folder every node can read (shared storage, or the same path on
each node) or a Hugging Face Hub id each node can resolve.

    relax-masked-attn embed-dataset corpus.parquet out/ --text-column text --actors 4
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def shared_library(model: str | Path, target: str = "llvm", dtype: str | None = None):
    """Compile (or take from the cache) ``model`` for ``target`` on the driver; an ``ObjectRef``
    of the library's bytes for :class:`EmbedBatch`."""
    import ray

    from .checkpoint import read_spec
    from .embedding import cached_library_path, compile_model, default_dtype, resolve_target

    spec = read_spec(model)
    tgt, _ = resolve_target(target)
    dtype = dtype or default_dtype(tgt)
    compile_model(spec, tgt, dtype)  # fills the cache (or checks the entry there)
    return ray.put(cached_library_path(spec, tgt, dtype).read_bytes())


class EmbedBatch:
    """``Dataset.map_batches(EmbedBatch, fn_constructor_kwargs=...)``: each actor loads the model
    once, then adds ``embedding`` (float32 ``[rows, dim]``) to every batch of ``text_column``.

    ``library``: :func:`shared_library`'s reference (the driver's build); without it the actor
    compiles or uses its node's cache. ``encode_options`` go to
    :meth:`~relax_masked_attn.EmbeddingModel.encode` (``normalize_embeddings``,
    ``truncate_dim``, ``prompt_name``, ...).
    """

    def __init__(self, model: str, text_column: str = "text", target: str = "llvm",
                 dtype: str | None = None, library=None, encode_options: dict | None = None):
        from .embedding import EmbeddingModel

        self.text_column, self.encode_options = text_column, dict(encode_options or {})
        path = None
        if library is not None:
            import ray

            data = ray.get(library) if not isinstance(library, bytes) else library
            fd, path = tempfile.mkstemp(prefix="relax_masked_attn-", suffix=".so")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            self.model = EmbeddingModel.from_pretrained(model, target=target, dtype=dtype,
                                                        library=path)
        finally:
            if path is not None:
                os.unlink(path)  # loaded: the process keeps its mapping

    def __call__(self, batch: dict) -> dict:
        if self.text_column not in batch:
            raise KeyError(f"the dataset has no column {self.text_column!r} "
                           f"(columns: {sorted(batch)})")
        texts = [str(t) for t in batch[self.text_column]]
        batch["embedding"] = np.asarray(self.model.encode(texts, **self.encode_options),
                                        dtype=np.float32)
        return batch


def read_dataset(path: str):
    """A Ray dataset of Parquet files, or of JSON Lines (``.jsonl``/``.json``)."""
    import ray.data

    name = str(path)
    if name.endswith((".jsonl", ".json")) or (
            Path(name).is_dir() and any(Path(name).glob("*.jsonl"))):
        return ray.data.read_json(name)
    return ray.data.read_parquet(name)


def embed_dataset(input_path: str, output_dir: str, model: str, text_column: str = "text",
                  actors: int = 1, target: str = "llvm", dtype: str | None = None,
                  batch_size: int = 256, threads_per_actor: int | None = None,
                  encode_options: dict | None = None) -> None:
    """Read ``input_path`` (Parquet or JSONL), add ``embedding`` with ``actors`` actors, write
    Parquet part files ``part-000000.parquet``, ... into ``output_dir`` (new or empty); every
    input column is kept and rows keep their order. On GPU targets each actor takes one GPU."""
    import ray

    _check_output_dir(Path(output_dir))
    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    library = shared_library(model, target, dtype)
    gpu = target != "llvm"
    cpus = ray.available_resources().get("CPU", 1)
    threads = threads_per_actor or max(1, int(cpus) // actors)
    # Actors reserve all CPUs but one between them (and use ``threads`` each): the read and write
    # tasks need a free CPU, and without one the job waits forever.
    reserved = max((cpus - 1) / actors, 0.1)
    # at least a few blocks an actor: one Parquet file of one row group is one block, which
    # would give all the work to one actor
    ds = read_dataset(input_path)
    ds = ds.repartition(4 * actors)
    ds = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": str(model), "text_column": text_column,
                               "target": target, "dtype": dtype, "library": library,
                               "encode_options": encode_options},
        batch_size=batch_size, batch_format="numpy", concurrency=actors,
        num_gpus=1 if gpu else 0, num_cpus=min(reserved, 1.0) if gpu else reserved,
        runtime_env={"env_vars": {"TVM_NUM_THREADS": str(threads)}},
    )
    _write_in_order(ds, Path(output_dir))


def _check_output_dir(output_dir: Path) -> None:
    """Refuse a directory that already holds Parquet files: reading it back would mix two runs'
    rows."""
    existing = sorted(p.name for p in output_dir.glob("*.parquet")) if output_dir.is_dir() else []
    if existing:
        raise FileExistsError(f"{output_dir} already holds Parquet files ({existing[0]}, ...): "
                              "write into an empty or new directory")


def _write_in_order(ds, output_dir: Path) -> None:
    """Each block of ``ds`` into ``output_dir/part-NNNNNN.parquet``, numbered in the dataset's
    order, written by the driver as the blocks arrive (one at a time in memory). Ray's own
    ``write_parquet`` numbers files by write task, and those tasks are not always started in
    row order (seen with two actors: one run in four had blocks swapped), so a directory read
    back in name order could come out shuffled. A directory that already holds Parquet files
    is refused (:func:`_check_output_dir`, before any work)."""
    import pyarrow.parquet as pq

    output_dir.mkdir(parents=True, exist_ok=True)
    for i, block in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        pq.write_table(block, output_dir / f"part-{i:06d}.parquet")
