"""``EmbeddingModel.encode`` against sentence-transformers itself: vectors, prompts, Matryoshka
truncation, quantized codes, Hub ids."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from relax_masked_attn.embedding import EmbeddingModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["A cat naps in the sun.", "Stocks fell after the rate decision.", "Hi",
         "Compilers fuse kernels for every target " * 4, "kittens sleeping", "the bond market"]


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def st_minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.mark.parametrize("options", [
    {}, {"normalize_embeddings": True}, {"truncate_dim": 128},
    {"truncate_dim": 96, "normalize_embeddings": True}, {"prompt": "query: "},
    {"batch_size": 2},
])
def test_encode_matches_sentence_transformers(minilm, st_minilm, options):
    ours, theirs = minilm.encode(TEXTS, **options), st_minilm.encode(TEXTS, **options)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert (cosine(ours, theirs) >= 0.99999).all(), cosine(ours, theirs)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1),
                               rtol=1e-5)


def test_one_string_gives_one_vector(minilm, st_minilm):
    ours, theirs = minilm.encode("just one"), st_minilm.encode("just one")
    assert ours.shape == theirs.shape == (384,)
    assert cosine(ours, theirs) >= 0.99999
    listed = minilm.encode(TEXTS[:2], convert_to_numpy=False)
    assert isinstance(listed, list) and [v.shape for v in listed] == [(384,), (384,)]


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantized_codes_are_sentence_transformers(minilm, st_minilm, precision):
    """Our codes are exactly sentence-transformers' quantize_embeddings of our vectors, and agree
    with its own encode(precision=...) everywhere but at bucket edges the 1e-6 float differences
    can cross."""
    from sentence_transformers.util import quantize_embeddings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilm.encode(TEXTS, precision=precision)
        reference = quantize_embeddings(minilm.encode(TEXTS), precision=precision)
        theirs = st_minilm.encode(TEXTS, precision=precision)
    assert ours.dtype == reference.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, reference)
    assert (ours == theirs).mean() >= 0.99
    if precision in ("int8", "uint8"):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_bad_options_are_named(minilm):
    with pytest.raises(ValueError, match="precision must be one of"):
        minilm.encode(TEXTS, precision="int4")
    with pytest.raises(ValueError, match="truncate_dim must be an int in"):
        minilm.encode(TEXTS, truncate_dim=1000)
    with pytest.raises(ValueError, match="prompt_name 'query' is not among"):
        minilm.encode(TEXTS, prompt_name="query")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        minilm.encode(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="int8 quantization needs"):
        minilm.encode("one text", precision="int8")


def test_similarity_is_cosine(minilm, st_minilm):
    a, b = minilm.encode(TEXTS[:3]), minilm.encode(TEXTS[3:])
    np.testing.assert_allclose(minilm.similarity(a, b), st_minilm.similarity(a, b).numpy(),
                               atol=1e-6)
    assert minilm.similarity(a[0], b).shape == (1, 3)


PROMPTS = {"query": "Instruct: Given a question, find passages that answer it\nQuery:",
           "document": "", "title": "title: "}


@pytest.fixture(scope="module")
def minilm_with_prompts(minilm_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "ckpt"
    shutil.copytree(minilm_path, path)
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": PROMPTS, "default_prompt_name": "title", "similarity_fn_name": "cosine"}))
    return path


def test_prompts_from_the_checkpoint(minilm_with_prompts):
    from sentence_transformers import SentenceTransformer

    ours = EmbeddingModel.from_pretrained(minilm_with_prompts)
    theirs = SentenceTransformer(str(minilm_with_prompts), device="cpu")
    assert ours.prompts == theirs.prompts == PROMPTS
    for name, a, b in [
        ("query", ours.encode_query(TEXTS), theirs.encode_query(TEXTS)),
        ("document", ours.encode_document(TEXTS), theirs.encode_document(TEXTS)),
        ("default", ours.encode(TEXTS), theirs.encode(TEXTS)),
        ("named", ours.encode(TEXTS, prompt_name="query"),
         theirs.encode(TEXTS, prompt_name="query")),
    ]:
        assert (cosine(a, b) >= 0.99999).all(), name
    # the prompt really changes the vectors
    assert cosine(ours.encode_query(TEXTS[:1]), ours.encode_document(TEXTS[:1])) < 0.999


def test_hub_id_through_a_prefilled_cache(minilm_path, tmp_path, monkeypatch):
    """``from_pretrained("org/name")`` resolves through huggingface_hub's cache, offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "abc123"
    shutil.copytree(minilm_path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = EmbeddingModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    assert model.spec.path == snapshot
    from relax_masked_attn.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="Hugging Face Hub could not provide it"):
        EmbeddingModel.from_pretrained("nobody/no-such-model")


@pytest.fixture(scope="module")
def qwen3_st_checkpoint(tiny_qwen3, tmp_path_factory):
    """The small random Qwen3 checkpoint made whole for sentence-transformers: a word-level
    tokenizer, last-token pooling, Normalize, and Qwen3-Embedding-style prompts."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    path = tmp_path_factory.mktemp("qwen3_st") / "ckpt"
    shutil.copytree(tiny_qwen3[0], path)
    words = ("instruct given a question find passages that answer it query the cat sat on mat "
             "stocks fell").split()
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    files = {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "pad_token": "<pad>", "unk_token": "<unk>",
                                  "padding_side": "left", "model_max_length": 64},
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True,
                                  "pooling_mode_mean_tokens": False},
        "sentence_bert_config.json": {"max_seq_length": 64},
        "config_sentence_transformers.json": {"prompts": {
            "query": "Instruct: Given a question find passages that answer it\nQuery:",
            "document": ""}},
    }
    for name, value in files.items():
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text(json.dumps(value))
    (path / "2_Normalize").mkdir()
    return path


def test_qwen3_prompts_match_sentence_transformers(qwen3_st_checkpoint):
    from sentence_transformers import SentenceTransformer

    texts = ["the cat sat on the mat", "stocks fell", "cat", "the question the answer " * 5]
    ours = EmbeddingModel.from_pretrained(qwen3_st_checkpoint, use_cache=False)
    theirs = SentenceTransformer(str(qwen3_st_checkpoint), device="cpu")
    assert ours.prompts == theirs.prompts and ours.spec.padding_side == "left"
    for a, b in [(ours.encode_query(texts), theirs.encode_query(texts)),
                 (ours.encode_document(texts), theirs.encode_document(texts)),
                 (ours.encode(texts, truncate_dim=32, normalize_embeddings=True),
                  theirs.encode(texts, truncate_dim=32, normalize_embeddings=True))]:
        assert (cosine(a, b) >= 0.99999).all(), cosine(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ours.encode(texts, precision="ubinary"),
                                      theirs.encode(texts, precision="ubinary"))
