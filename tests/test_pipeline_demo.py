"""The `make demo` driver end to end at a tiny size (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_driver_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", "--out", str(out), "--device", "cpu", "--epochs", "1",
           "--train-per-class", "4", "--val-per-class", "2", "--min-acc", "0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== demo done" in proc.stdout and "tensorboard" in proc.stdout.lower()
    for name in ("log.txt", "args.yaml", "checkpoint.pth", "best_checkpoint.pth", "curves.png"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "data" / "train.tar").is_file() and (out / "data" / "val.tar").is_file()
