"""The benchmark tools run end to end (tiny sizes): benchmark.py with its re-exec under glibc's keep settings, the
memory child and JSON; benchmark_attention.py with its variants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--input-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--memory-repeats", "1"]


@pytest.mark.parametrize("malloc", ["keep", "default"])
def test_benchmark_cli_reports_ratios(malloc):
    cmd = [
        sys.executable,
        "tools/benchmark.py",
        "--models",
        "deit_tiny_patch16_224_ctx_product_50_shared_k",
        "--impls",
        "auto",
        "math",
        "--malloc",
        malloc,
        "--json",
        *TINY,
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["attn_impl"] for r in rows] == ["auto", "math"]
    for row in rows:
        assert row["baseline"] == "deit_tiny_patch16_224"
        for key in ("train_ratio", "infer_ratio", "memory_ratio"):
            assert 0 < row[key] < 100, (key, row)
        assert row["peak_mib"] > 0 and row["baseline_peak_mib"] > 0


def test_benchmark_cli_rejects_a_model_of_unknown_size():
    cmd = [sys.executable, "tools/benchmark.py", "--models", "vit_huge_rpe", "--malloc", "default", *TINY]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0
    assert "cannot tell the DeiT size of 'vit_huge_rpe'" in result.stderr


def test_attention_benchmark_cli_reports_every_variant():
    cmd = [
        sys.executable,
        "tools/benchmark_attention.py",
        *("--impls", "auto", "sdpa", "math", "--rpe-on", "qk", "--batch-size", "1", "--heads", "2", "--grid", "3"),
        *("--reps", "2", "--warmup", "1", "--json"),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    rows = {row["variant"]: row for row in json.loads(result.stdout)}
    assert {"plain", "auto", "sdpa", "math"} <= set(rows)
    assert rows["plain"]["fwd_bwd_ratio"] == 1.0
    for row in rows.values():
        assert 0 < row["fwd_ms"] <= row["fwd_bwd_ms"], row
