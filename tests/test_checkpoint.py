"""Checkpoint folders that must be refused with a CheckpointError naming the file and the
problem, never a raw ValueError, struct.error, FileNotFoundError, AttributeError or TypeError."""

import json
import shutil

import numpy as np
import pytest

from relax_masked_attn.checkpoint import CheckpointError, read_spec
from relax_masked_attn.embedding import EmbeddingModel
from relax_masked_attn.weights import read_safetensors


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        EmbeddingModel.from_pretrained(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        EmbeddingModel.from_pretrained(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        EmbeddingModel.from_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path):
    config = {"model_type": "t5", "architectures": ["T5Model"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture 't5'.*bert.*qwen3"):
        EmbeddingModel.from_pretrained(tmp_path)


def test_incomplete_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="config.json lacks hidden_size"):
        EmbeddingModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("config,match", [
    ([1, 2, 3], "config.json must hold an object, but holds list"),
    ("just a string", "config.json must hold an object, but holds str"),
])
def test_config_that_is_not_an_object(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        read_spec(tmp_path)


@pytest.mark.parametrize("which,field,value", [
    ("tiny_bert", "hidden_size", "64"),
    ("tiny_bert", "num_hidden_layers", 2.5),
    ("tiny_bert", "layer_norm_eps", "tiny"),
    ("tiny_bert", "vocab_size", True),
    ("tiny_qwen3", "head_dim", "32"),
    ("tiny_qwen3", "rope_theta", None),
])
def test_config_fields_of_the_wrong_type(which, field, value, request, tmp_path):
    path = copy_checkpoint(request.getfixturevalue(which)[0], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config.json field {field} must be"):
        read_spec(path)


def test_missing_weights(tiny_bert, tmp_path):
    path, _ = tiny_bert
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        EmbeddingModel.from_pretrained(tmp_path, use_cache=False)


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header_only":
        header_len = int.from_bytes(data[:8], "little")
        data = data[: 8 + header_len]
    elif how == "tiny":
        data = data[:5]
    elif how == "empty":
        data = bytearray()
    elif how == "header_length":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif how == "header_bytes":
        data[8:24] = b"\xff" * 16
    elif how == "offsets":
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        name = next(k for k in header if k != "__metadata__")
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end + 4]
        text = json.dumps(header).encode()
        text += b" " * (header_len - len(text)) if len(text) <= header_len else b""
        data = bytearray(len(text).to_bytes(8, "little")) + text + data[8 + header_len:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,match", [
    ("truncated", "truncated"),
    ("header_only", "truncated"),
    ("tiny", "not a safetensors file"),
    ("empty", "not a safetensors file"),
    ("header_length", "truncated or not a safetensors file"),
    ("header_bytes", "header is not valid JSON"),
    ("offsets", "data_offsets .* do not fit its shape"),
])
def test_corrupt_safetensors(tiny_bert, tmp_path, how, match):
    path = copy_checkpoint(tiny_bert[0], tmp_path)
    _corrupt(path / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=match) as err:
        read_safetensors(path)
    assert "model.safetensors" in str(err.value)


def test_sharded_checkpoint_reads_every_shard_and_names_a_missing_one(tiny_bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = copy_checkpoint(tiny_bert[0], tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    read = read_safetensors(path)
    assert sorted(read) == names
    for k in names:
        np.testing.assert_array_equal(read[k], tensors[k])

    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names the shard model-00002-of-00002.safetensors"):
        read_safetensors(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(CheckpointError, match="weight_map must map"):
        read_safetensors(path)
    (path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="must hold an object"):
        read_safetensors(path)


def test_corrupt_tokenizer_is_a_checkpoint_error(tiny_bert, tmp_path):
    path = copy_checkpoint(tiny_bert[0], tmp_path)
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(CheckpointError, match="tokenizer.json is not a tokenizer"):
        EmbeddingModel.from_pretrained(path, use_cache=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_parameters_are_cast_in_slices_on_threads(dtype):
    """Tensors larger than a slice are copied in several pieces on several threads: every
    element is NumPy's own cast, prefixes are resolved, unused tensors ignored."""
    import ml_dtypes

    from relax_masked_attn.weights import match_parameters

    rng = np.random.default_rng(0)
    tensors = {"model.embed.weight": rng.standard_normal((9000, 1000)).astype("float32"),
               "layer.bias": rng.standard_normal(7).astype("float32"),
               "scale": np.array(3.5, "float32"),
               "lm_head.weight": np.zeros((2, 2), "float32")}
    wanted = [("embed.weight", (9000, 1000)), ("layer.bias", (7,)), ("scale", ())]
    out = match_parameters(wanted, tensors, dtype, workers=3)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    for got, key in zip(out, ["model.embed.weight", "layer.bias", "scale"]):
        assert got.dtype == np_dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, tensors[key].astype(np_dtype))
    with pytest.raises(CheckpointError, match="expects"):
        match_parameters([("layer.bias", (8,))], tensors, dtype)
