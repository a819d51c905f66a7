"""The demo command: compiles the op, runs a mixed batch, and reports agreement with NumPy."""

import subprocess
import sys

import pytest

from relax_masked_attn.cli import main


@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_demo_runs_and_agrees(mode, capsys):
    assert main(["demo", "--mode", mode]) == 0
    out = capsys.readouterr().out
    err = float(out.split("max |ours - NumPy reference| = ")[1].split()[0])
    assert err < 1e-4


def test_module_entry_point_rejects_unknown_mode():
    proc = subprocess.run(
        [sys.executable, "-m", "relax_masked_attn", "demo", "--mode", "sideways"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "invalid choice: 'sideways'" in proc.stderr
