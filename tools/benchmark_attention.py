"""One attention layer with iRPE, each attention path against PyTorch's fused attention without RPE.

Where the model-level benchmark (``tools/benchmark.py``) says how much an iRPE model costs, this one says where: it
times forward and forward+backward of a single attention layer shaped like DeiT-S in training (``q, k, v`` views of
one ``(B, L, 3, H, d)`` tensor, as the models make them) for

- ``plain``: ``F.scaled_dot_product_attention`` without RPE (the baseline every ratio is taken against);
- ``kernel-no-terms`` (CPU, when ``rpe_ops`` is built): the fused ``rpe_ops`` kernel with no RPE term, i.e. the
  kernel's own attention against PyTorch's flash attention;
- each ``--impls`` path of ``irpe_attention.rpe_attention`` with the encodings of ``--rpe-on`` (product method, 50
  buckets, contextual, shared heads: the zoo's iRPE-S setting).

Variants run interleaved within every repetition; each ratio is the median of per-repetition ratios to ``plain``.

Usage:
    python tools/benchmark_attention.py                        # CPU, 2 threads, B=8, H=6, L=197, d=64
    python tools/benchmark_attention.py --rpe-on qk --impls ops sdpa math
    python tools/benchmark_attention.py --device cuda --batch-size 128 --impls sdpa flex math
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import _bench as bench  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F
from _cli import UsageError, cli

import irpe
import irpe_attention


def build_variants(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable], torch.Tensor]:
    """The timed callables (each returns the layer's output from fresh views of ``qkv``) and ``qkv`` itself."""
    dtype = getattr(torch, args.dtype)
    qkv, (rpe_q, rpe_k, rpe_v) = bench.layer_inputs(args, device, dtype)
    variants: dict[str, Callable] = {"plain": lambda: F.scaled_dot_product_attention(*bench.qkv_views(qkv))}
    ops = irpe.rpe_ops
    if (
        device.type == "cpu"
        and ops is not None
        and ops.has_attention_kernel()
        and dtype in (torch.float32, torch.float64)
    ):
        scale = args.head_dim**-0.5
        variants["kernel-no-terms"] = lambda: ops.rpe_attention(*bench.qkv_views(qkv), [], [], [], scale)[0]
    for impl in args.impls:
        variants[impl] = lambda impl=impl: irpe_attention.rpe_attention(
            *bench.qkv_views(qkv), rpe_q, rpe_k, rpe_v, args.grid, args.grid, impl=impl
        )
    return variants, qkv


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Forward and forward + backward times of every variant, and their ratios to ``plain``."""
    variants, qkv = build_variants(args, device)
    grad = []

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
        bench.sync(device)
        t0 = time.perf_counter()
        out = fn()
        bench.sync(device)
        t1 = time.perf_counter()
        if not grad:
            grad.append(torch.randn(out.shape, device=device, dtype=out.dtype))
        out.backward(grad[0])
        bench.sync(device)
        qkv.grad = None
        return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3

    calls = {name: lambda fn=fn: timed(fn) for name, fn in variants.items()}
    times = bench.interleave(calls, args.reps, args.warmup, how="fixed")
    fwd = {name: [t[0] for t in ts] for name, ts in times.items()}
    total = {name: [t[1] for t in ts] for name, ts in times.items()}
    return [
        {
            "variant": name,
            "fwd_ms": statistics.median(fwd[name]),
            "fwd_bwd_ms": statistics.median(total[name]),
            "fwd_ratio": bench.median_ratio(fwd[name], fwd["plain"]),
            "fwd_bwd_ratio": bench.median_ratio(total[name], total["plain"]),
        }
        for name in variants
    ]


def format_table(rows: list[dict]) -> str:
    header = ["variant", "fwd ms", "fwd+bwd ms", "fwd ratio", "fwd+bwd ratio"]
    cells = [(r["variant"], f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_ratio']:.3f}",
              f"{r['fwd_bwd_ratio']:.3f}") for r in rows]  # fmt: skip
    return bench.markdown_table(header, cells)


def get_args_parser() -> argparse.ArgumentParser:
    parser = bench.parser(__doc__, reps=60, warmup=5)
    bench.add_layer_args(parser, rpe_on="k")
    parser.add_argument("--impls", nargs="+", default=["ops", "sdpa", "math"], help="rpe_attention paths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return parser


@cli()
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = bench.device_of(args)
    try:
        rows = measure(args, device)
    except ValueError as err:  # e.g. an attention path that cannot run on this device
        raise UsageError(err) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"# {bench.machine(device, args.threads)}; B={args.batch_size}, H={args.heads}, L={args.grid**2 + 1}, "
        f"d={args.head_dim}, {args.dtype}, rpe on {args.rpe_on!r}; torch {torch.__version__}; medians of {args.reps} "
        "interleaved repetitions"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
