"""The benchmark scripts' shared harness: options, device set-up, interleaved timing, model steps and report lines.

Every benchmark runs its variants interleaved: each repetition runs every variant once, in an order that changes
from one repetition to the next (:func:`order`), so that variants taken back to back see the same machine load, and
it reports medians, with each ratio the median of the per-repetition ratios (:func:`median_ratio`): on a shared VM
the load drifts by more than the few percent being measured, and a ratio of medians would mix different moments.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import _cli
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLAIN_FOR_SIZE = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224", "base": "deit_base_patch16_224"}


def parser(doc: str, reps: int | None = None, warmup: int | None = None) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of ``doc``, with ``--threads`` (CPU, default 2) and, when
    given defaults, ``--reps`` (timed repetitions) and ``--warmup`` (untimed ones first)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    if reps is not None:
        p.add_argument("--reps", type=int, default=reps, help="timed (interleaved) repetitions")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    return p


def add_layer_args(p: argparse.ArgumentParser, rpe_on: str) -> None:
    """Options of one attention layer shaped like DeiT-S's (:func:`layer_inputs`)."""
    p.add_argument("--rpe-on", default=rpe_on, choices=["k", "q", "qk", "v", "qkv"], help="where the encodings go")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--grid", type=int, default=14, help="patch grid side: L = grid * grid + 1")


def device_of(args: argparse.Namespace) -> torch.device:
    """``args.device``, checked to be usable; on CPU ``args.threads`` threads."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _cli.UsageError("--device cuda but no CUDA device is visible")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device


def machine(device: torch.device, threads: int) -> str:
    """The GPU's name, or ``CPU, N threads``: the first words of every report's header."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"


def sync(device: torch.device) -> None:
    """Waits for the GPU, so that a clock read after it times the work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def order(names: Sequence[str], rep: int, how: str = "alternate") -> list[str]:
    """The order of the variants in repetition ``rep``: ``alternate`` (reversed every other one), ``rotate`` (shifted
    by one each time) or ``fixed``."""
    names = list(names)
    if how == "alternate":
        return names if rep % 2 == 0 else names[::-1]
    if how == "rotate":
        shift = rep % len(names)
        return names[shift:] + names[:shift]
    return names


def interleave(
    variants: dict[str, Callable[[], Any]], reps: int, warmup: int, how: str = "alternate"
) -> dict[str, list[Any]]:
    """Runs every variant once per repetition in :func:`order`; what each returns (its own timing), per variant, for
    the ``reps`` repetitions after the ``warmup`` ones."""
    results: dict[str, list[Any]] = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name in order(variants, rep, how):
            result = variants[name]()
            if rep >= warmup:
                results[name].append(result)
    return results


def median_ratio(values: Iterable[float], baselines: Iterable[float]) -> float:
    """The median of the per-repetition ratios ``value / baseline``."""
    return statistics.median(a / b for a, b in zip(values, baselines))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: the header, its rule, a line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------------------------
# What is timed: one DeiT-S-shaped attention layer, or whole model steps.


def layer_inputs(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[nn.Module | None]]:
    """``qkv (B, L, 3, H, d)`` (leaf, requires grad) and ``[rpe_q, rpe_k, rpe_v]`` of one layer: the zoo's iRPE-S
    encodings (product method, 50 buckets, contextual, shared by the heads, the class token skipped) on
    ``args.rpe_on``, tables drawn from N(0, 0.02); L = grid * grid + 1."""
    import irpe

    config = irpe.get_rpe_config(ratio=1.9, method="product", mode="ctx", shared_head=True, skip=1, rpe_on=args.rpe_on)
    modules = [None if m is None else m.to(device, dtype) for m in irpe.build_rpe(config, args.head_dim, args.heads)]
    generator = torch.Generator(device).manual_seed(0)
    for module in filter(None, modules):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    shape = (args.batch_size, args.grid * args.grid + 1, 3, args.heads, args.head_dim)
    return torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(), modules


def qkv_views(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``q, k, v (B, H, L, d)``: strided views of ``qkv (B, L, 3, H, d)``, as the models make them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def plain_name(model_name: str) -> str:
    """timm's plain DeiT of the size of the iRPE model ``model_name`` (the baseline of its ratios)."""
    size = model_name.split("_")[1] if "_" in model_name else ""
    if size not in PLAIN_FOR_SIZE:
        raise ValueError(f"cannot tell the DeiT size of {model_name!r}; expected deit_{{tiny,small,base}}_...")
    return PLAIN_FOR_SIZE[size]


# What a time is: wall clock, or this process's CPU time, which other processes on shared cores barely move (with
# one thread; with more, the workers' spin-waits count too).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class Runner:
    """One model with its AdamW optimizer and a fixed batch; times train steps (``zero_grad``, forward,
    cross-entropy, backward, optimizer step) and inference passes (forward under ``torch.inference_mode``) on
    ``clock`` (a key of :data:`CLOCKS`)."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        img_size: int,
        device: torch.device,
        amp_dtype: str = "none",
        clock: str = "wall",
    ) -> None:
        self.clock = CLOCKS[clock]
        self.model = model.to(device)
        self.device = device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4, weight_decay=0.05)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
        self.targets = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
        self.amp_dtype = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[amp_dtype]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self) -> float:
        """One timed train step, in seconds."""
        self.model.train()
        sync(self.device)
        start = self.clock()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self.model(self.images), self.targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sync(self.device)
        return self.clock() - start

    @torch.inference_mode()
    def infer(self) -> float:
        """One timed inference pass, in seconds."""
        self.model.eval()
        sync(self.device)
        start = self.clock()
        with self._autocast():
            self.model(self.images)
        sync(self.device)
        return self.clock() - start
