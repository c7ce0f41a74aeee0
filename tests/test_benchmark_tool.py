"""The benchmark tools run end to end (tiny sizes): benchmark.py with its re-exec under glibc's keep settings, the
memory child, JSON and several image sizes; benchmark_attention.py with its variants; benchmark_kernel_ab.py (its
library renaming, its errors, and, slow, a build of HEAD's kernel timed against this tree's); tools/gpu_check.sh
(syntax, usage, and its CPU dry run, slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import benchmark  # noqa: E402

TINY = ["--input-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--memory-repeats", "1"]


def _tool(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs tools/<script> with args from the repository root."""
    cmd = [sys.executable, f"tools/{script}", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("malloc", ["keep", "default"])
def test_benchmark_cli_reports_ratios(malloc):
    result = _tool(
        "benchmark.py",
        *("--models", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--impls", "auto", "math"),
        *("--malloc", malloc, "--json", *TINY),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["attn_impl"] for r in rows] == ["auto", "math"]
    for row in rows:
        assert row["baseline"] == "deit_tiny_patch16_224"
        assert row["peak_mib"] > 0 and row["baseline_peak_mib"] > 0
        # the ratios are the measured figures' own: memory of the peaks, time the median of the paired steps' ratios
        # (two steps here: between the smaller and the larger paired ratio, which bound the ratio of the medians too)
        assert row["memory_ratio"] == pytest.approx(row["peak_mib"] / row["baseline_peak_mib"])
        for kind in ("train", "infer"):
            of_medians = row[f"{kind}_ms"] / row[f"baseline_{kind}_ms"]
            assert row[f"{kind}_ratio"] > 0 and 0.5 < row[f"{kind}_ratio"] / of_medians < 2, (kind, row)
        assert row["train_img_s"] == pytest.approx(2 * 1000 / row["train_ms"], rel=1e-6)  # batch 2
        assert row["targets"] == dict.fromkeys(("train_ratio", "memory_ratio", "infer_ratio"))  # none for DeiT-Ti


def test_benchmark_breakdown_splits_profiled_steps_into_attention_and_the_rest():
    result = _tool(
        "benchmark.py",
        *("--models", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--impls", "auto", "--malloc", "default"),
        *("--threads", "1", "--breakdown", "2", "--json", *TINY),
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert set(row["breakdown"]) == {"train", "infer"}
    for kind, parts in row["breakdown"].items():
        # both models run a fused attention op (rpe_ops' kernel or PyTorch's) and other ops in every step
        assert all(parts[f"{prefix}{part}_ms"] > 0 for prefix in ("", "baseline_") for part in ("attention", "rest"))
        assert parts["attention_ms"] + parts["rest_ms"] < 4 * row[f"{kind}_ms"], (kind, parts)  # ms, not us
    table = benchmark.format_table([benchmark.Result(**row)])
    assert "Where the time goes" in table and "| 32 (5) | train |" in table and "| 32 (5) | infer |" in table
    for bad, message in (("-1", "expected a count of steps >= 0"), ("1 --device cuda", "expected a CPU measurement")):
        result = _tool("benchmark.py", "--malloc", "default", "--breakdown", *bad.split())
        assert result.returncode == 2 and f"error: --breakdown {bad.split()[0]}: {message}" in result.stderr


def test_benchmark_cli_rejects_a_model_of_unknown_size():
    result = _tool("benchmark.py", "--models", "vit_huge_rpe", "--malloc", "default", *TINY)
    assert result.returncode != 0
    assert "cannot tell the DeiT size of 'vit_huge_rpe'" in result.stderr


def test_attention_benchmark_cli_reports_every_variant():
    result = _tool(
        "benchmark_attention.py",
        *("--impls", "auto", "sdpa", "math", "--rpe-on", "qk", "--batch-size", "1", "--heads", "2", "--grid", "3"),
        *("--reps", "2", "--warmup", "1", "--json"),
    )
    assert result.returncode == 0, result.stderr
    rows = {row["variant"]: row for row in json.loads(result.stdout)}
    assert {"plain", "auto", "sdpa", "math"} <= set(rows)
    assert rows["plain"]["fwd_bwd_ratio"] == 1.0
    for row in rows.values():
        assert 0 < row["fwd_ms"] <= row["fwd_bwd_ms"], row


def test_benchmark_cli_measures_several_image_sizes():
    result = _tool(
        "benchmark.py",
        *("--models", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--impls", "auto", "--malloc", "default"),
        *("--threads", "1", "--json", *TINY[2:], "--img-size", "32", "48"),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["input_size"], r["seq_len"]) for r in rows] == [(32, 5), (48, 10)]
    table = benchmark.format_table([benchmark.Result(**row) for row in rows])
    assert "| 48 (10) |" in table
    assert "Memory ratio vs sequence length L:" in table and "L=5: " in table and "L=10: " in table
    bad = _tool("benchmark.py", "--img-size", "30", "--malloc", "default")
    assert bad.returncode == 2 and "--img-size 30: expected a positive multiple of the patch size" in bad.stderr


def test_gpu_check_script_parses_and_explains_its_usage():
    assert subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=REPO_ROOT, check=False).returncode == 0
    help_text = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert help_text.returncode == 0 and "--dry-run" in help_text.stdout and "Expected time" in help_text.stdout
    bad = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--fast"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr


def test_gpu_check_dry_run_writes_one_dated_block(tmp_path):
    # Every step of the GPU check, on CPU at tiny sizes (about a minute on 2 cores; --compile and the Triton benchmark
    # are left out): the commands, the benchmarks' and probes' Python parts, the training script's runs and the
    # block of results under $OUT. In the default suite, so that the script a lent GPU runs as it is keeps working.
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--dry-run"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (block,) = tmp_path.glob("gpu_check_*.md")
    text = block.read_text()
    assert text.startswith("## GPU check ") and "(dry run, CPU, tiny sizes)" in text
    for step in (
        "pre-flight",
        "probe: rpe_ops CUDA kernels and the Triton kernel ran",
        "pytest -m cuda",
        "benchmark.py, k, qk and qkv models, 224 px",
        "benchmark.py, k, qk and qkv models, 384 px",
        "qkv DeiT-S step: rpe_ops vs PyTorch lookups, and triton",
        "torchrun --nproc_per_node=1, two steps",
    ):
        assert f"| {step} |" in text, step
    assert "FAILED" not in text and "NOT RUN" not in text
    assert "torch " in text and "triton " in text and "timm " in text  # the pre-flight's versions
    assert "| deit_small_patch16_224_ctx_product_50_shared_qkv | sdpa | 32 (5) |" in text


def test_benchmark_skips_a_path_the_model_cannot_take():
    # flex cannot encode values: the qkv model's build error is the reason given, the k model builds with it
    qkv = benchmark.path_error("deit_small_patch16_224_ctx_product_50_shared_qkv", "flex")
    assert qkv is not None and "attn_impl='flex' cannot encode values" in qkv
    assert benchmark.path_error("deit_small_patch16_224_ctx_product_50_shared_k", "flex") is None
    assert benchmark.path_error("deit_small_patch16_224_ctx_product_50_shared_qkv", "sdpa") is None


def test_kernel_ab_moves_every_library_registration_to_the_baseline_namespace():
    import benchmark_kernel_ab as ab

    snippet = (
        "TORCH_LIBRARY(rpe_ops, m) {}\nTORCH_LIBRARY_FRAGMENT(rpe_ops, m) {}\nTORCH_LIBRARY_IMPL( rpe_ops , CPU, m) {}"
    )
    renamed = ab.rename_library(snippet + '\nconstexpr const char* op = "rpe_ops::rpe_index";')
    assert renamed.count(f"({ab.BASELINE_NAMESPACE},") == 3
    assert '"rpe_ops::rpe_index"' in renamed  # error messages keep the name users know
    for source in (REPO_ROOT / "rpe_ops" / "csrc").glob("*.cpp"):  # nothing of this tree stays in rpe_ops
        text = ab.rename_library(source.read_text())
        assert not any("(rpe_ops," in line for line in text.splitlines() if "TORCH_LIBRARY" in line), source


def _kernel_ab(*args: str) -> subprocess.CompletedProcess:
    return _tool("benchmark_kernel_ab.py", *args, timeout=1200)


def test_kernel_ab_names_a_baseline_git_does_not_know():
    import rpe_ops

    result = _kernel_ab("--baseline", "no-such-revision")
    assert result.returncode == 2
    if rpe_ops.has_attention_kernel():
        assert "error: --baseline 'no-such-revision' is not a commit of this repository" in result.stderr
    else:
        assert "error: this tree's rpe_ops is not built" in result.stderr
    assert _kernel_ab("--baseline", "HEAD", "--reps", "0").returncode == 2
    no_model = _kernel_ab("--baseline", "HEAD", "--model", "deit_small_rpe")
    assert no_model.returncode == 2 and "--model 'deit_small_rpe' is not a registered model" in no_model.stderr


@pytest.mark.slow
def test_kernel_ab_times_this_tree_against_a_built_commit():
    import rpe_ops

    if not rpe_ops.has_attention_kernel():
        pytest.skip("rpe_ops is not built (make ops)")
    tiny = ("--batch-size", "1", "--heads", "2", "--head-dim", "8", "--grid", "3", "--reps", "2", "--warmup", "1")
    result = _kernel_ab("--baseline", "HEAD", "--rpe-on", "qkv", *tiny)  # builds HEAD's kernel once (~30 s)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| fwd")]
    assert [row.split("|")[1].strip() for row in rows] == ["fwd", "fwd+bwd"], result.stdout
    for row in rows:
        assert float(row.split("|")[4]) > 0, row
    model = ("--model", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--img-size", "32", "--batch-size", "2")
    result = _kernel_ab("--baseline", "HEAD", *model, "--reps", "1", "--warmup", "0")  # the build is reused
    assert result.returncode == 0, result.stderr
    assert "| train, baseline kernel |" in result.stdout and "| train, this tree kernel |" in result.stdout
