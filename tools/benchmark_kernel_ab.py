"""The fused CPU kernel of this tree against the kernel of another commit, in one process.

Kernel changes of a few percent drown in this VM's drift when the two builds run in separate processes (the same
command moves by +-10%). This script builds the other commit's ``rpe_ops`` (CPU only) under another operator
namespace (``rpe_ops_baseline``), loads both libraries into one process and times the raw operators
(``rpe_attention`` forward, and forward then ``rpe_attention_backward``) on the same inputs in interleaved pairs,
alternating which goes first. Each ratio is the median of the per-pair ratios (this tree / baseline). The inputs are
one DeiT-S attention layer as the models make it: ``q, k, v`` views of one ``(B, L, 3, H, d)`` tensor and the
zoo's iRPE-S encodings (product method, contextual, shared by the heads, the class token skipped) on ``--rpe-on``.

With ``--model``, whole steps instead: one iRPE model (``--mode train``: zero_grad, forward, cross-entropy,
backward, AdamW step; ``--mode infer``: a forward pass under ``torch.inference_mode``) runs its steps alternately on
this tree's kernel and on the baseline's (``rpe_ops.rpe_attention`` is swapped for the step; the baseline's op gets
the same autograd), interleaved with steps of timm's plain DeiT of the same size: the table gives each kernel's
ratio to plain DeiT and their ratio to each other, all from the same run.

The baseline is built once per commit into ``build/kernel_ab/<commit>/`` (about 30 s on 2 cores) and reused. Its
operators must have this tree's schema (the script stops with an error otherwise).

Usage:
    python tools/benchmark_kernel_ab.py --baseline HEAD~1                  # qkv, L=197, 2 threads
    python tools/benchmark_kernel_ab.py --baseline 03c3005 --rpe-on k --grid 24 --reps 12
    python tools/benchmark_kernel_ab.py --baseline 03c3005 --model deit_small_patch16_224_ctx_product_50_shared_qkv
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from contextlib import nullcontext
from io import BytesIO
from pathlib import Path
from unittest import mock

import _bench as bench  # first: it puts the repository root on sys.path
import timm
import torch
from _cli import UsageError, cli

import irpe
import rpe_models  # noqa: F401  (registers the iRPE models)
import rpe_ops

ROOT = bench.ROOT

BASELINE_NAMESPACE = "rpe_ops_baseline"
BUILD_TIMEOUT_S = 900


def rename_library(source: str, namespace: str = BASELINE_NAMESPACE) -> str:
    """``source`` with its ``TORCH_LIBRARY*(rpe_ops, ...)`` registrations moved to ``namespace``: two builds can then
    be loaded into one process."""
    return re.sub(r"\bTORCH_LIBRARY(_FRAGMENT|_IMPL)?\(\s*rpe_ops\s*,", rf"TORCH_LIBRARY\1({namespace},", source)


def resolve_commit(rev: str) -> str:
    """The full hash of ``rev`` in this repository; ValueError when git does not know it."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise ValueError(f"--baseline {rev!r} is not a commit of this repository (see `git log --oneline`)")
    return result.stdout.strip()


def build_baseline(commit: str) -> Path:
    """Builds ``rpe_ops`` of ``commit`` under the baseline namespace (once per commit) and returns its library."""
    where = ROOT / "build" / "kernel_ab" / commit
    built = sorted((where / "rpe_ops").glob("_C*.so"))
    if built:
        return built[0]
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "rpe_ops"], cwd=ROOT, capture_output=True, timeout=120
    )
    if archive.returncode != 0:
        raise RuntimeError(f"`git archive {commit[:10]} rpe_ops` failed: {archive.stderr.decode().strip()}")
    tmp = where.with_name(commit + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted build left: never taken for a finished one
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp, filter="data")
    for source in (tmp / "rpe_ops" / "csrc").glob("*.cpp"):
        source.write_text(rename_library(source.read_text()))
    print(f"# building rpe_ops of {commit[:10]} (CPU only) in {where} ...", file=sys.stderr, flush=True)
    try:
        log = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=tmp / "rpe_ops",
            env={**os.environ, "RPE_OPS_CUDA": "0"},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"building rpe_ops of {commit[:10]} took over {BUILD_TIMEOUT_S} s") from err
    built = sorted((tmp / "rpe_ops").glob("_C*.so"))
    if log.returncode != 0 or not built:
        log_file = where.with_name(commit + ".log")
        log_file.write_text(log.stdout + log.stderr)
        raise RuntimeError(f"building rpe_ops of {commit[:10]} failed (exit code {log.returncode}); log: {log_file}")
    tmp.rename(where)  # the finished build appears at once: an interrupted one is rebuilt next time
    return where / "rpe_ops" / built[0].name


def load_baseline(library: Path) -> object:
    """``torch.ops.rpe_ops_baseline`` after loading ``library``; ValueError when its schema is not this tree's."""
    torch.ops.load_library(str(library))
    ops = getattr(torch.ops, BASELINE_NAMESPACE)
    for name in ("rpe_attention", "rpe_attention_backward"):
        ours = [a.name for a in getattr(torch.ops.rpe_ops, name).default._schema.arguments]
        if not hasattr(ops, name) or [a.name for a in getattr(ops, name).default._schema.arguments] != ours:
            raise ValueError(f"the baseline's {name} does not have this tree's schema ({ours}): pick a later commit")
    rpe_ops.register_attention_autograd(BASELINE_NAMESPACE)
    return ops


def baseline_attention(
    q, k, v, weights, indices, transposed, scale, value_weights=(), value_indices=(), attn_mask=None
):
    """``rpe_ops.rpe_attention`` on the baseline's operator (what ``--model`` swaps in for the baseline's steps)."""
    flags = [int(bool(t)) for t in transposed]
    return getattr(torch.ops, BASELINE_NAMESPACE).rpe_attention.default(
        q, k, v, list(weights), list(indices), flags, list(value_weights), list(value_indices), float(scale), attn_mask
    )


def layer_inputs(args: argparse.Namespace) -> tuple:
    """``(q, k, v)`` and the operator's remaining arguments for one layer (see the module docstring)."""
    B, H, d, grid = args.batch_size, args.heads, args.head_dim, args.grid
    L = grid * grid + 1
    config = irpe.get_rpe_config(ratio=1.9, method="product", mode="ctx", shared_head=True, skip=1, rpe_on=args.rpe_on)
    rpe_q, rpe_k, rpe_v = irpe.build_rpe(config, d, H)
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    q, k, v = torch.randn(B, L, 3, H, d, generator=generator).permute(2, 0, 3, 1, 4).unbind(0)
    weights, indices, transposed, value_weights, value_indices = [], [], [], [], []
    for module, is_query in ((rpe_k, 0), (rpe_q, 1)):
        if module is not None:
            weights.append(0.02 * torch.randn(1, d, module.num_buckets, generator=generator))
            indices.append(module.get_bucket_ids(grid, grid, 1, cpu))  # square grid: (L, L) either way
            transposed.append(is_query)
    if rpe_v is not None:
        value_weights.append(0.02 * torch.randn(1, rpe_v.num_buckets, d, generator=generator))
        value_indices.append(rpe_v.get_bucket_ids(grid, grid, 1, cpu))
    return (q, k, v), (weights, indices, transposed, value_weights, value_indices, d**-0.5)


def measure(args: argparse.Namespace, baseline: object) -> list[dict]:
    """Median times and per-pair ratios (this tree / baseline) of the forward and of forward + backward."""
    (q, k, v), rest = layer_inputs(args)
    weights, indices, transposed, value_weights, value_indices, scale = rest
    libraries = {"this tree": torch.ops.rpe_ops, "baseline": baseline}
    grad = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(1))

    def forward(ops) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rpe_attention.default(q, k, v, weights, indices, transposed, value_weights, value_indices, scale)

    def forward_backward(ops) -> list[torch.Tensor]:
        out, lse = forward(ops)
        return ops.rpe_attention_backward.default(
            grad, q, k, v, lse, weights, indices, transposed, value_weights, value_indices, scale
        )

    ours = [forward(libraries["this tree"])[0], *forward_backward(libraries["this tree"])]
    theirs = [forward(libraries["baseline"])[0], *forward_backward(libraries["baseline"])]
    difference = max((a - b).abs().max().item() for a, b in zip(ours, theirs))

    clock = bench.CLOCKS[args.clock]

    def timed(fn, ops) -> float:
        t0 = clock()
        fn(ops)
        return (clock() - t0) * 1e3

    rows = []
    for label, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        calls = {name: lambda fn=fn, ops=ops: timed(fn, ops) for name, ops in libraries.items()}
        times = bench.interleave(calls, args.reps, args.warmup)
        rows.append(
            {
                "pass": label,
                "baseline_ms": statistics.median(times["baseline"]),
                "this_ms": statistics.median(times["this tree"]),
                "ratio": bench.median_ratio(times["this tree"], times["baseline"]),
                "max_grad_difference": difference,
            }
        )
    return rows


def measure_model(args: argparse.Namespace) -> list[dict]:
    """Median step times of plain DeiT and of ``args.model`` on either kernel, with the per-round ratios."""

    def runner(name: str) -> bench.Runner:
        model = timm.create_model(name, img_size=args.img_size)
        return bench.Runner(model, args.batch_size, args.img_size, torch.device("cpu"), clock=args.clock)

    plain, irpe_model = runner(bench.plain_name(args.model)), runner(args.model)

    def step(variant: str) -> float:
        runner = plain if variant == "plain" else irpe_model
        swap = mock.patch.object(rpe_ops, "rpe_attention", baseline_attention) if variant == "baseline" else None
        with swap or nullcontext():
            return runner.infer() if args.mode == "infer" else runner.train_step()

    calls = {name: lambda name=name: step(name) * 1e3 for name in ("plain", "baseline", "this tree")}
    times = bench.interleave(calls, args.reps, args.warmup)
    return [
        {
            "pass": f"{args.mode}, {name} kernel",
            "plain_ms": statistics.median(times["plain"]),
            "ms": statistics.median(times[name]),
            "ratio_to_plain": bench.median_ratio(times[name], times["plain"]),
            "ratio_to_baseline": bench.median_ratio(times[name], times["baseline"]),
        }
        for name in ("baseline", "this tree")
    ]


def format_model_table(rows: list[dict]) -> str:
    cells = [(r["pass"], f"{r['plain_ms']:.0f}", f"{r['ms']:.0f}", f"{r['ratio_to_plain']:.3f}",
              f"{r['ratio_to_baseline']:.3f}") for r in rows]  # fmt: skip
    return bench.markdown_table(["step", "plain ms", "iRPE ms", "iRPE / plain", "/ baseline kernel"], cells)


def format_table(rows: list[dict]) -> str:
    cells = [(r["pass"], f"{r['baseline_ms']:.2f}", f"{r['this_ms']:.2f}", f"{r['ratio']:.3f}") for r in rows]
    return bench.markdown_table(["pass", "baseline ms", "this tree ms", "this tree / baseline"], cells)


def get_args_parser() -> argparse.ArgumentParser:
    parser = bench.parser(__doc__, reps=30, warmup=3)
    parser.add_argument("--baseline", required=True, help="commit whose kernel to compare with (e.g. HEAD~1)")
    bench.add_layer_args(parser, rpe_on="qkv")
    parser.add_argument("--clock", default="wall", choices=list(bench.CLOCKS), help="what a time is (see CLOCKS)")
    parser.add_argument("--model", help="an iRPE model name: time its whole steps instead of one layer")
    parser.add_argument("--img-size", type=int, default=224, help="--model: image size")
    parser.add_argument("--mode", default="train", choices=["train", "infer"], help="--model: step kind")
    return parser


@cli()
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not rpe_ops.has_attention_kernel():
        raise UsageError("this tree's rpe_ops is not built with its CPU attention kernel: run `make ops`")
    for name in ("threads", "batch_size", "heads", "head_dim", "grid", "reps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.model is not None and not timm.is_model(args.model):
        raise UsageError(f"--model {args.model!r} is not a registered model (the iRPE models: README's model zoo)")
    try:
        commit = resolve_commit(args.baseline)
        baseline = load_baseline(build_baseline(commit))
    except (ValueError, RuntimeError) as err:
        raise UsageError(err) from None
    torch.set_num_threads(args.threads)
    if args.model is not None:
        rows = measure_model(args)
        print(
            f"# CPU, {args.threads} threads, {args.clock} clock; {args.model} vs {bench.plain_name(args.model)}, "
            f"batch {args.batch_size}, {args.img_size}px, float32, {args.mode}; baseline {commit[:10]}; "
            f"torch {torch.__version__}; medians of {args.reps} interleaved rounds"
        )
        print(format_model_table(rows))
        return 0
    rows = measure(args, baseline)
    L = args.grid * args.grid + 1
    print(
        f"# CPU, {args.threads} threads, {args.clock} clock; B={args.batch_size}, H={args.heads}, L={L}, "
        f"d={args.head_dim}, float32, rpe on {args.rpe_on!r}; baseline {commit[:10]}; torch {torch.__version__}; "
        f"medians of {args.reps} interleaved pairs; largest output/gradient difference "
        f"{rows[0]['max_grad_difference']:.1e}"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
