"""Benchmark the iRPE lookup primitives: compiled rpe_ops vs the PyTorch fallback vs the original's formulations.

Measured per case (B, H) at L=197 (14x14 grid + class token), nb=50 real product-method bucket ids (ratio 1.9):

- `rpe_index` (contextual/bias lookup on keys): ops = `rpe_ops.rpe_index`; torch = irpe's fallback
  (`torch.gather`, backward scatter_add); original = the original's precomputed flat index,
  `table.flatten(2)[:, :, flat].view(B, H, Lq, Lk)` (backward: index_put with accumulation).
- `rpe_bucket_sum`: ops vs torch (`zeros().scatter_add_`, backward gather).
- contextual on values, `out = sum_j attn[b,h,i,j] * W[bucket(i,j)]`: ops = `rpe_bucket_sum(attn) @ W`; torch =
  the same with the fallback bucket sum; original = `W[:, index.flatten()].view(Hm, Lq, Lk, d)` materialised, then
  `matmul(attn.permute(1, 2, 0, 3), W_mat).permute(2, 0, 1, 3)`.

Phases: fwd (with autograd recording, as in training), bwd (`y.backward(g)` after an untimed forward) and fwd+bwd.
Variants are interleaved within every repetition; times are medians after warm-up. On CUDA (when present) also a
plain device copy of the rpe_index output size, the memory-bound reference for fwd+bwd.

Usage:
    python tools/benchmark_ops.py                 # CPU, 2 threads, DeiT-S/B training shapes
    python tools/benchmark_ops.py --quick         # smoke run
    python tools/benchmark_ops.py --json out.json # also write the raw results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import _bench as bench  # first: it puts the repository root on sys.path
import torch
from torch import Tensor

import irpe
import rpe_ops

L_TOKENS = 197
HEAD_DIM = 64
ORIGINAL_TORCH_MS = 151.26  # ../shared/reference/bench.md: original fallback fwd+bwd, B=64, H=6, 2 threads
ORIGINAL_CPP_MS = 542.31  # same, original C++ op


@dataclass
class Result:
    device: str
    dtype: str
    B: int
    H: int
    op: str
    variant: str
    phase: str
    ms: float


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def bucket_ids(device: torch.device) -> tuple[Tensor, int]:
    """Product-method ids of a 14x14 grid plus one class token (ratio 1.9)."""
    ids, nb = irpe.get_bucket_ids_2d(irpe.METHOD.PRODUCT, 14, 14, 1, 1.9, 3.8, 15.2)
    return ids.to(device), nb


# ----------------------------------------------------------------------------------------------------------------------
# Variants: each is fn(*inputs) -> output, differentiable w.r.t. the inputs.


def torch_index(table: Tensor, index: Tensor) -> Tensor:
    with rpe_ops.disabled():  # irpe's PyTorch code
        return irpe.rpe_index(table, index)


def torch_bucket_sum(values: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    with rpe_ops.disabled():
        return irpe.rpe_bucket_sum(values, index, num_buckets)


def original_index_fn(index: Tensor, num_buckets: int) -> Callable[[Tensor], Tensor]:
    """The original's fallback: a flat index precomputed once (it cached it), then advanced indexing."""
    Lq, Lk = index.shape
    offsets = torch.arange(Lq, device=index.device)[:, None] * num_buckets
    flat = (index.long() + offsets).flatten()

    def lookup(table: Tensor) -> Tensor:
        B, H = table.shape[:2]
        return table.flatten(2)[:, :, flat].view(B, H, Lq, Lk)

    return lookup


def values_ours(bucket_sum: Callable[..., Tensor], attn: Tensor, weight: Tensor, index: Tensor, nb: int) -> Tensor:
    """`sum_j attn[..., j] * W[bucket(i, j)]` as a bucket sum (B, H, Lq, nb) times W (Hm, nb, d)."""
    summed = bucket_sum(attn, index, nb)
    return summed @ (weight[0] if weight.shape[0] == 1 else weight.unsqueeze(0))


def values_original(attn: Tensor, weight: Tensor, index: Tensor) -> Tensor:
    """The original's contextual-on-values: materialise W[index] (Hm, Lq, Lk, d), then a batched matmul."""
    Hm, _, d = weight.shape
    Lq, Lk = index.shape
    w_mat = weight[:, index.flatten()].view(Hm, Lq, Lk, d)
    return torch.matmul(attn.permute(1, 2, 0, 3), w_mat).permute(2, 0, 1, 3)


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def run_phase(phase: str, fn: Callable[..., Tensor], inputs: list[Tensor], grad: Tensor, device: torch.device) -> float:
    """One timed run of a phase, in ms."""
    for x in inputs:
        x.grad = None
    if phase == "bwd":
        out = fn(*inputs)
        bench.sync(device)
        start = time.perf_counter()
        out.backward(grad)
    else:
        bench.sync(device)
        start = time.perf_counter()
        out = fn(*inputs)
        if phase == "fwd+bwd":
            out.backward(grad)
    bench.sync(device)
    elapsed = (time.perf_counter() - start) * 1e3
    del out
    return elapsed


def time_variants(
    variants: dict[str, Callable[..., Tensor]],
    inputs: list[Tensor],
    grad: Tensor,
    device: torch.device,
    phases: tuple[str, ...],
    warmup: int,
    reps: int,
) -> dict[tuple[str, str], float]:
    """Median ms per (variant, phase); variants interleaved and rotated within every repetition."""

    def all_phases(fn: Callable[..., Tensor]) -> list[float]:
        return [run_phase(phase, fn, inputs, grad, device) for phase in phases]

    calls = {name: lambda fn=fn: all_phases(fn) for name, fn in variants.items()}
    times = bench.interleave(calls, reps, warmup, how="rotate")
    return {(name, p): statistics.median(t[i] for t in times[name]) for name in variants for i, p in enumerate(phases)}


def copy_reference_ms(grad: Tensor, device: torch.device, warmup: int, reps: int) -> float:
    """A plain device copy of a tensor of the rpe_index output size (reads and writes it once)."""
    times = bench.interleave({"copy": lambda: run_phase("fwd", torch.clone, [grad], grad, device)}, reps, warmup)
    return statistics.median(times["copy"])


# ----------------------------------------------------------------------------------------------------------------------
# Cases


def bench_case(
    device: torch.device, dtype: torch.dtype, batch: int, heads: int, warmup: int, reps: int, phases: tuple[str, ...]
) -> list[Result]:
    B, H = batch, heads
    index, nb = bucket_ids(device)
    L = index.shape[0]
    g = torch.Generator(device=device).manual_seed(0)
    results: list[Result] = []

    def record(op: str, timings: dict[tuple[str, str], float]) -> None:
        for (variant, phase), ms in timings.items():
            results.append(Result(device.type, str(dtype).removeprefix("torch."), B, H, op, variant, phase, ms))

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    table = rand(B, H, L, nb).requires_grad_()
    grad_lk = rand(B, H, L, L)
    ops = {
        "ops": lambda t: rpe_ops.rpe_index(t, index),
        "torch": lambda t: torch_index(t, index),
        "original": original_index_fn(index, nb),
    }
    record("rpe_index", time_variants(ops, [table], grad_lk, device, phases, warmup, reps))
    if device.type == "cuda":
        results.append(
            Result(device.type, str(dtype).removeprefix("torch."), B, H, "rpe_index", "device copy", "fwd+bwd",
                   copy_reference_ms(grad_lk, device, warmup, reps))
        )  # fmt: skip
    del table

    values = rand(B, H, L, L).requires_grad_()
    grad_nb = rand(B, H, L, nb)
    sums = {
        "ops": lambda v: rpe_ops.rpe_bucket_sum(v, index, nb),
        "torch": lambda v: torch_bucket_sum(v, index, nb),
    }
    record("rpe_bucket_sum", time_variants(sums, [values], grad_nb, device, phases, warmup, reps))

    attn = values.detach().softmax(-1).requires_grad_()
    del values
    weight = (rand(1, nb, HEAD_DIM) * 0.02).requires_grad_()
    grad_out = rand(B, H, L, HEAD_DIM)
    ctx = {
        "ops": lambda a, w: values_ours(rpe_ops.rpe_bucket_sum, a, w, index, nb),
        "torch": lambda a, w: values_ours(torch_bucket_sum, a, w, index, nb),
        "original": lambda a, w: values_original(a, w, index),
    }
    record("contextual values", time_variants(ctx, [attn, weight], grad_out, device, phases, warmup, reps))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report


def find(results: list[Result], **key: object) -> float | None:
    for r in results:
        if all(getattr(r, k) == v for k, v in key.items()):
            return r.ms
    return None


def markdown_table(results: list[Result], phases: tuple[str, ...]) -> str:
    """One row per (device, dtype, B, H, op, variant); ms per phase and the fwd+bwd speed-up of ops over it."""
    rows = []
    for key in dict.fromkeys((r.device, r.dtype, r.B, r.H, r.op, r.variant) for r in results):
        sel = dict(zip(("device", "dtype", "B", "H", "op"), key))
        cells = [find(results, **sel, variant=key[5], phase=phase) for phase in phases]
        ops_ms = find(results, **sel, variant="ops", phase="fwd+bwd")
        this_ms = find(results, **sel, variant=key[5], phase="fwd+bwd")
        ratio = "" if not ops_ms or this_ms is None else f"{this_ms / ops_ms:.2f}x"
        rows.append([*key, *("" if ms is None else f"{ms:.2f}" for ms in cells), ratio])
    header = ["device", "dtype", "B", "H", "op", "variant", *(f"{p} ms" for p in phases), "ops speed-up (fwd+bwd)"]
    return bench.markdown_table(header, rows)


def target_lines(results: list[Result]) -> list[str]:
    """MET / NOT MET per target of issue 3 (CPU, float32, B=64, H=6, one run)."""
    sel = {"device": "cpu", "dtype": "float32", "B": 64, "H": 6, "phase": "fwd+bwd"}
    ops = find(results, **sel, op="rpe_index", variant="ops")
    if ops is None:
        return ["targets: not evaluated (they need the CPU float32 case B=64, H=6; run without --quick)"]
    orig = find(results, **sel, op="rpe_index", variant="original")
    gather = find(results, **sel, op="rpe_index", variant="torch")
    v_ops = find(results, **sel, op="contextual values", variant="ops")
    v_orig = find(results, **sel, op="contextual values", variant="original")

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    return [
        f"- rpe_index fwd+bwd >= 3x faster than the original's PyTorch formulation (same run): "
        f"{orig / ops:.2f}x ({ops:.1f} vs {orig:.1f} ms; their figure {ORIGINAL_TORCH_MS} ms): "
        f"{verdict(orig >= 3 * ops)}",
        f"- rpe_index fwd+bwd <= 54 ms (10x the original C++ op's {ORIGINAL_CPP_MS} ms): {ops:.1f} ms: "
        f"{verdict(ops <= 54.0)}",
        f"- rpe_index fwd+bwd faster than plain gather + its backward (same run): {gather / ops:.2f}x "
        f"({ops:.1f} vs {gather:.1f} ms): {verdict(ops < gather)}",
        f"- contextual values fwd+bwd >= 2x faster than the materialising formulation (same run): "
        f"{v_orig / v_ops:.2f}x ({v_ops:.1f} vs {v_orig:.1f} ms): {verdict(v_orig >= 2 * v_ops)}",
    ]


def parse_args() -> argparse.Namespace:
    parser = bench.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small batch, few repetitions")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="devices to measure")
    parser.add_argument("--cases", default=None, help="comma-separated BxH cases, e.g. 64x6,128x12 (default: DeiT-S/B)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 9, quick 3)")
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH", help="write raw results (- = stdout)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not rpe_ops.is_available():
        sys.exit(f"rpe_ops unavailable: {rpe_ops.load_error()}")
    torch.set_num_threads(args.threads)
    phases = ("fwd", "bwd", "fwd+bwd")
    warmup, reps = (1, args.reps or 3) if args.quick else (2, args.reps or 9)
    custom = [tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")] if args.cases else None
    plans: list[tuple[torch.device, torch.dtype, int, int]] = []
    if args.device in ("all", "cpu"):
        cpu_cases = custom or ([(8, 6)] if args.quick else [(64, 1), (64, 6), (64, 12), (128, 6)])
        plans += [(torch.device("cpu"), torch.float32, B, H) for B, H in cpu_cases]
    if args.device in ("all", "cuda") and torch.cuda.is_available() and rpe_ops.has_cuda_kernels():
        cuda_cases = custom or ([(8, 6)] if args.quick else [(64, 6), (128, 6), (128, 12)])
        plans += [
            (torch.device("cuda"), dtype, B, H)
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
            for B, H in cuda_cases
        ]
    results: list[Result] = []
    for device, dtype, B, H in plans:
        print(f"# {device.type} {dtype} B={B} H={H} ...", file=sys.stderr, flush=True)
        results += bench_case(device, dtype, B, H, warmup, reps, phases)

    header = (
        f"torch {torch.__version__}, {args.threads} CPU threads, L={L_TOKENS}, nb=50, head_dim={HEAD_DIM} (values: "
        f"shared W, Hm=1), bucket ids: product method (irpe); "
        f"median of {reps} after {warmup} warm-up(s), ms"
    )
    if args.json != "-":
        print(header + "\n")
        print(markdown_table(results, phases) + "\n")
        print("\n".join(target_lines(results)))
    if args.json is not None:
        payload = json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=1)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n")


if __name__ == "__main__":
    main()
