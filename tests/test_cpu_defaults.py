"""CPU defaults for shared cores: main.py makes OpenMP wait passively unless the user chose, and the benchmark that
measures it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_main_sets_a_passive_openmp_wait_policy_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    probe = "import os, sys; import main; print(os.environ['OMP_WAIT_POLICY'])"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [expected]
    source = (REPO / "main.py").read_text()
    assert source.index('os.environ.setdefault("OMP_WAIT_POLICY"') < source.index("import torch")


@pytest.mark.slow  # two short main.py runs
def test_cpu_sharing_benchmark_runs():
    cmd = [sys.executable, "tools/benchmark_cpu_sharing.py", "--busy", "0", "--settings", "default",
           "OMP_WAIT_POLICY=PASSIVE,OMP_NUM_THREADS=1", "--train-per-class", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| default | " in proc.stdout and "| OMP_WAIT_POLICY=PASSIVE,OMP_NUM_THREADS=1 | " in proc.stdout
