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
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import irpe  # noqa: E402
import irpe_attention  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable], torch.Tensor]:
    """The timed callables (each returns the layer's output from fresh views of ``qkv``) and ``qkv`` itself."""
    B, H, d, grid = args.batch_size, args.heads, args.head_dim, args.grid
    L = 1 + grid * grid  # the class token is the skip token
    dtype = getattr(torch, args.dtype)
    config = irpe.get_rpe_config(ratio=1.9, method="product", mode="ctx", shared_head=True, skip=1, rpe_on=args.rpe_on)
    rpe_q, rpe_k, rpe_v = (
        m.to(device=device, dtype=dtype) if m is not None else None for m in irpe.build_rpe(config, d, H)
    )
    for module in (rpe_q, rpe_k, rpe_v):
        if module is not None:
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.02)
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(B, L, 3, H, d, device=device, dtype=dtype, generator=generator).requires_grad_()

    def views():
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, d), strided

    variants: dict[str, Callable] = {"plain": lambda: F.scaled_dot_product_attention(*views())}
    ops = irpe.compiled_ops()[0]
    if (
        device.type == "cpu"
        and ops is not None
        and ops.has_attention_kernel()
        and dtype in (torch.float32, torch.float64)
    ):
        variants["kernel-no-terms"] = lambda: ops.rpe_attention(*views(), [], [], [], d**-0.5)[0]
    for impl in args.impls:
        variants[impl] = lambda impl=impl: irpe_attention.rpe_attention(
            *views(), rpe_q, rpe_k, rpe_v, grid, grid, impl=impl
        )
    return variants, qkv


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    variants, qkv = build_variants(args, device)
    grad = None
    fwd: dict[str, list[float]] = {name: [] for name in variants}
    total: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.warmup + args.reps):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            t1 = time.perf_counter()
            if grad is None:
                grad = torch.randn(out.shape, device=device, dtype=out.dtype)
            out.backward(grad)
            _sync(device)
            t2 = time.perf_counter()
            qkv.grad = None
            if rep >= args.warmup:
                fwd[name].append((t1 - t0) * 1e3)
                total[name].append((t2 - t0) * 1e3)
    rows = []
    for name in variants:
        rows.append(
            {
                "variant": name,
                "fwd_ms": statistics.median(fwd[name]),
                "fwd_bwd_ms": statistics.median(total[name]),
                "fwd_ratio": statistics.median(a / b for a, b in zip(fwd[name], fwd["plain"])),
                "fwd_bwd_ratio": statistics.median(a / b for a, b in zip(total[name], total["plain"])),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_ratio']:.3f} | "
            f"{r['fwd_bwd_ratio']:.3f} |"
        )
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs="+", default=["ops", "sdpa", "math"], help="rpe_attention paths")
    parser.add_argument("--rpe-on", default="k", choices=["k", "q", "qk", "v", "qkv"], help="where the encodings go")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--grid", type=int, default=14, help="patch grid side: L = grid * grid + 1")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        rows = measure(args, device)
    except ValueError as err:  # e.g. an attention path that cannot run on this device
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    L = args.grid * args.grid + 1
    print(
        f"# {where}; B={args.batch_size}, H={args.heads}, L={L}, d={args.head_dim}, {args.dtype}, rpe on "
        f"{args.rpe_on!r}; torch {torch.__version__}; medians of {args.reps} interleaved repetitions"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
