"""Does iRPE help where relative position matters? Trains plain and iRPE vision transformers with one recipe.

Generates a relational dataset (``tools/make_relational_dataset.py``: the class is where a blue square is relative
to a red disc, at random absolute positions), then trains every variant with the same ``main.py`` recipe, seeds
and epochs, each run a ``main.py`` subprocess, and prints the final top-1 per variant (mean, sample standard
deviation and each seed's value) and draws the validation curves into one PNG.

Two presets (``--preset``), each with its data, budget, recipe and default variants:

* ``grid8`` (the default, ``make compare``): the paper's ablation in miniature (its largest gains come without
  absolute position embedding). A micro ViT (4 blocks, width 64, 2 heads, patch 4) on 32 px images, an 8x8
  patch grid; at 32 px ``main.py`` trains with DeiT's small-image transform (padded random crop and flip, which
  keep both objects in view) instead of the random-resized crop that cuts objects out at larger sizes.
  Variants: ``abs`` (learned absolute position embedding, no RPE), ``nopos`` (no position information at all:
  the model is invariant to permuting the patches, so it can only guess), ``nopos_bias_k`` and ``nopos_ctx_k``
  (bias or contextual product iRPE on keys as the only position information); ``abs_ctx_k`` (both) on request.
* ``deit3x3``: DeiT-Tiny (12 blocks, width 192, 3 heads) on 48 px images, a 3x3 grid, with absolute position
  embedding. Variants: ``plain`` (timm's ``deit_tiny_patch16_224``), ``plain_ours`` (the iRPE models' own
  ``VisionTransformer`` with no encoding: the iRPE variants' code and initialisation, so that a gap to ``plain``
  that is only initialisation shows), ``bias_k`` and ``ctx_k`` (the zoo's
  ``deit_tiny_patch16_224_ctx_product_50_shared_k``); ``ctx_qkv`` on request.

Every model but timm's ``plain`` and the zoo's ``ctx_k`` is registered in timm by this script
(:func:`register_variants`) in the ``main.py`` process: their runs are ``python -c "<register>; runpy main.py"
main.py <flags>``, which runs the unchanged ``main.py`` as ``__main__`` with the same flags; the other runs are plain
``python main.py <flags>``. Runs go 2 at a time with one thread each. Outputs in ``--out``: ``data/``,
``runs/<variant>/seed<k>/`` (each run's ``main.py`` output folder and ``stdout.txt``), ``results.md``,
``results.json``, ``curves.png``; the summary gives wall-clock and CPU time (the runs' CPU time over the number
of runs at a time estimates the wall-clock on idle cores).

Example::

    python tools/compare_rpe.py                      # the default comparison (see --help for its budget)
    python tools/compare_rpe.py --preset deit3x3     # DeiT-Tiny on a 3x3 grid with absolute position embedding
    python tools/compare_rpe.py --quick              # a smoke run in well under a minute or two
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
for _path in (REPO, TOOLS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


# The micro ViT of the grid8 preset: small enough that 22 epochs of 1500 images take about a CPU minute and a half,
# with 32-dimensional heads like DeiT's. main.py passes img_size=--input-size, which replaces img_size here.
MICRO_ARCH: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
}
NOPOS_ARCH: dict[str, Any] = {**MICRO_ARCH, "pos_embed": "none"}  # timm's VisionTransformer without pos_embed
CTX_K: dict[str, Any] = {
    "ratio": 1.9,
    "method": "product",
    "mode": "ctx",
    "shared_head": True,
    "skip": 1,
    "rpe_on": "k",
}
BIAS_K: dict[str, Any] = {**CTX_K, "mode": "bias", "shared_head": False}


@dataclass(frozen=True)
class Variant:
    """One model of the comparison.

    Attributes:
        key: short name (``--variants``).
        model: timm model name passed to ``main.py --model``.
        description: for the table.
        rpe: :func:`irpe.get_rpe_config` arguments of a model this script registers; ``None`` for a model timm
            already knows (timm's own or ``rpe_models``').
        arch: ``rpe_vision_transformer.VisionTransformer`` arguments of a registered model; ``None``: DeiT-Tiny's
            (``rpe_models.DEIT_ARCHS['tiny']``).
    """

    key: str
    model: str
    description: str
    rpe: dict[str, Any] | None = None
    arch: dict[str, Any] | None = None


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        # deit3x3: DeiT-Tiny with absolute position embedding.
        Variant("plain", "deit_tiny_patch16_224", "timm DeiT-Tiny, no RPE"),
        Variant(
            "plain_ours",
            "deit_tiny_patch16_224_norpe",
            "this repo's iRPE ViT without encodings (the iRPE variants' code and initialisation)",
            {"mode": None},
        ),
        Variant("ctx_k", "deit_tiny_patch16_224_ctx_product_50_shared_k", "iRPE contextual product, keys, shared"),
        Variant("bias_k", "deit_tiny_patch16_224_bias_product_50_k", "iRPE bias product, keys, per head", BIAS_K),
        Variant(
            "ctx_qkv",
            "deit_tiny_patch16_224_ctx_product_50_shared_qkv",
            "iRPE contextual product, q+k+v, shared",
            {**CTX_K, "rpe_on": "qkv"},
        ),
        # grid8: the micro ViT on an 8x8 grid, with and without absolute position embedding.
        Variant("abs", "micro_vit_patch4_32_abs", "absolute position embedding, no RPE", {"mode": None}, MICRO_ARCH),
        Variant("nopos", "micro_vit_patch4_32_nopos", "no position information", {"mode": None}, NOPOS_ARCH),
        Variant(
            "nopos_bias_k",
            "micro_vit_patch4_32_nopos_bias_product_50_k",
            "no absolute embedding; iRPE bias product, keys, per head",
            BIAS_K,
            NOPOS_ARCH,
        ),
        Variant(
            "nopos_ctx_k",
            "micro_vit_patch4_32_nopos_ctx_product_50_shared_k",
            "no absolute embedding; iRPE contextual product, keys, shared",
            CTX_K,
            NOPOS_ARCH,
        ),
        Variant(
            "abs_ctx_k",
            "micro_vit_patch4_32_abs_ctx_product_50_shared_k",
            "absolute embedding and iRPE contextual product, keys, shared",
            CTX_K,
            MICRO_ARCH,
        ),
    )
}


def register_variants() -> list[str]:
    """Registers the variants timm does not know (``Variant.rpe``) as timm models; returns their names.

    Each is this checkout's ``rpe_vision_transformer.VisionTransformer``, built as ``rpe_models`` builds its models,
    with the variant's ``arch`` (default: DeiT-Tiny), ``rpe_config=irpe.get_rpe_config(**rpe)`` and no released
    weights. Registering twice is a no-op.
    """
    import timm
    from timm.models import register_model

    names = []
    for variant in VARIANTS.values():
        if variant.rpe is None or timm.is_model(variant.model):
            continue

        def entrypoint(pretrained: bool = False, _variant: Variant = variant, **kwargs: Any):
            if pretrained:
                raise ValueError(f"{_variant.model} has no released weights (a variant of tools/compare_rpe.py)")
            return _build(_variant, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = variant.model
        entrypoint.__doc__ = f"{variant.description} (registered by tools/compare_rpe.py)."
        register_model(entrypoint)
        names.append(variant.model)
    return names


def _build(variant: Variant, **kwargs: Any):
    """The variant's ViT with its iRPE configuration, by the zoo models' builder of this checkout."""
    from timm.models import build_model_with_cfg, get_pretrained_cfg

    import irpe
    import rpe_models
    from rpe_vision_transformer import VisionTransformer

    rpe_config = irpe.get_rpe_config(**variant.rpe)
    zoo = "deit_tiny_patch16_224_ctx_product_50_shared_k"  # same data configuration (mean, std, crop)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {**get_pretrained_cfg(zoo).to_dict(), "url": ""}
    kwargs.pop("cache_dir", None)
    arch = {**(variant.arch or rpe_models.DEIT_ARCHS["tiny"]), **kwargs}
    return build_model_with_cfg(VisionTransformer, variant.model, pretrained=False, rpe_config=rpe_config, **arch)


# The recipe every variant trains with (main.py flags; a preset replaces some). DeiT's defaults where they fit a
# few-minute CPU run on small data; no mixup/cutmix/RandAugment/erasing/colour jitter (colour tells the two objects
# apart). main.py's training transform still applies DeiT's horizontal flip, and above 32 px its random-resized crop
# (it has no flag to turn them off); the dataset's classes are chosen to survive the flip.
RECIPE: dict[str, str] = {
    "--batch-size": "32",
    "--lr": "4e-3",  # scaled by batch / 512: AdamW at 2.5e-4 (1e-3 stalled at chance on this data)
    "--warmup-epochs": "1",
    "--warmup-lr": "1e-6",
    "--min-lr": "1e-5",
    "--weight-decay": "0.05",
    "--drop-path": "0.0",
    "--mixup": "0",
    "--cutmix": "0",
    "--aa": "none",
    "--reprob": "0",
    "--color-jitter": "0",
    "--smoothing": "0.1",
    "--num_workers": "1",
    "--print-freq": "50",
    "--device": "cpu",
}
RECIPE_SWITCHES: tuple[str, ...] = ("--no-repeated-aug", "--no-model-ema")


@dataclass(frozen=True)
class Budget:
    """Data and training budget, the same for every variant.

    Attributes:
        train_per_class, val_per_class: generated images per class.
        image_size: generated image side; ``input_size`` what the models see (a multiple of their patch size).
        epochs: training epochs.
        seeds: ``main.py --seed`` of the runs of each variant.
    """

    train_per_class: int
    val_per_class: int
    image_size: int
    input_size: int
    epochs: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    """One comparison (``--preset``): its data and budget, its recipe and its variants.

    Attributes:
        name: ``--preset`` value.
        budget: the default budget; ``quick`` that of ``--quick`` (a pipeline check, not a result).
        variants: the default variant keys; ``quick_variants`` those of ``--quick``.
        recipe: ``main.py`` flags that replace :data:`RECIPE`'s.
    """

    name: str
    budget: Budget
    quick: Budget
    variants: tuple[str, ...]
    quick_variants: tuple[str, ...]
    recipe: dict[str, str]

    def main_flags(self) -> dict[str, str]:
        """The recipe's ``main.py`` flags: :data:`RECIPE` with this preset's replacements."""
        return {**RECIPE, **self.recipe}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "grid8",
            Budget(train_per_class=500, val_per_class=100, image_size=32, input_size=32, epochs=22, seeds=(0, 1, 2)),
            Budget(train_per_class=24, val_per_class=4, image_size=32, input_size=32, epochs=1, seeds=(0, 1)),
            ("abs", "nopos", "nopos_bias_k", "nopos_ctx_k"),
            ("nopos", "nopos_ctx_k"),
            # AdamW at 4e-3 (the flag is scaled by batch / 512), 16x deit3x3's: at 2e-3, abs stayed at chance for 22
            # epochs with seeds 0 and 1 (and with --warmup-epochs 5, seed 1); at 4e-3 it left chance with both.
            {"--batch-size": "64", "--lr": "3.2e-2"},
        ),
        Preset(
            "deit3x3",
            Budget(train_per_class=200, val_per_class=100, image_size=48, input_size=48, epochs=12, seeds=(0, 1)),
            Budget(train_per_class=16, val_per_class=4, image_size=32, input_size=32, epochs=1, seeds=(0, 1)),
            ("plain", "plain_ours", "bias_k", "ctx_k"),
            ("plain", "bias_k"),  # one plain main.py run and one through the launcher
            {},
        ),
    )
}
DEFAULT_PRESET = "grid8"

LAUNCHER = (
    "import runpy, sys; sys.path.insert(0, 'tools'); import compare_rpe; compare_rpe.register_variants(); "
    "sys.argv = sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')"
)


def main_command(
    variant: Variant, data: Path, out_dir: Path, seed: int, budget: Budget, recipe: dict[str, str]
) -> list[str]:
    """The ``main.py`` command line of one run (through :data:`LAUNCHER` for variants this script registers).

    Args:
        variant: the model.
        data: the dataset root (``--data-path``).
        out_dir: the run's ``--output_dir``.
        seed: ``--seed``.
        budget: input size and epochs.
        recipe: the other ``main.py`` flags (:meth:`Preset.main_flags`).
    """
    flags = [
        "--model",
        variant.model,
        "--data-path",
        str(data),
        "--output_dir",
        str(out_dir),
        "--input-size",
        str(budget.input_size),
        "--epochs",
        str(budget.epochs),
        "--seed",
        str(seed),
    ]
    for key, value in recipe.items():
        flags += [key, value]
    flags += list(RECIPE_SWITCHES)
    prefix = [sys.executable, "-c", LAUNCHER] if variant.rpe is not None else [sys.executable]
    return [*prefix, "main.py", *flags]


@dataclass
class Run:
    """One training run and, once finished, its outcome: exit status, wall-clock and CPU seconds (user + system, of
    the run's process and its data-loader workers)."""

    variant: str
    seed: int
    out_dir: Path
    cmd: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def run_all(runs: list[Run], jobs: int, threads: int) -> None:
    """Runs the ``main.py`` commands, ``jobs`` at a time with ``threads`` CPU threads each, in the repository.

    Each run's output goes to ``<out_dir>/stdout.txt``; ``returncode``, ``seconds`` and ``cpu_seconds`` are filled
    in. The CPU time of a run is what this process's reaped-children usage grows by when the run is reaped (it
    includes the run's own reaped children, the data-loader workers): runs are reaped one at a time, here.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(runs)
    active: list[tuple[Run, subprocess.Popen, float, Any]] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            if run.out_dir.exists():
                shutil.rmtree(run.out_dir)  # main.py appends to log.txt: every run starts empty
            run.out_dir.mkdir(parents=True)
            log = (run.out_dir / "stdout.txt").open("w", encoding="utf-8")
            proc = subprocess.Popen(run.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            active.append((run, proc, time.time(), log))
            print(f"  started {run.variant} seed {run.seed}", flush=True)
        time.sleep(0.2)
        for item in list(active):
            run, proc, start, log = item
            before = _children_cpu_seconds()
            if proc.poll() is None:
                continue
            log.close()
            run.returncode, run.seconds = proc.returncode, time.time() - start
            run.cpu_seconds = _children_cpu_seconds() - before
            active.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"  {status}: {run.variant} seed {run.seed} in {run.seconds:.0f} s ({run.cpu_seconds:.0f} s CPU)",
                  flush=True)  # fmt: skip


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's terminated and reaped children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_run(run: Run) -> list[dict[str, Any]]:
    """The epochs of a finished run's ``log.txt`` (via ``tools/plot_logs.read_log``)."""
    from plot_logs import read_log

    return read_log(run.out_dir / "log.txt")


def summarize(runs: list[Run], variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """One row per variant: final top-1 of each seed, their mean and sample standard deviation, best-epoch mean.

    Also the top-1 averaged over all epochs (the area under the validation curve over its length: how early a
    variant learns, where final values tie), its mean and spread over seeds, and the runs' wall-clock and CPU minutes.
    """
    rows = []
    for variant in variants:
        mine = [r for r in runs if r.variant == variant.key]
        logs = [read_run(r) for r in mine]
        final = [log[-1]["test_acc1"] for log in logs]
        best = [max(e["test_acc1"] for e in log) for log in logs]
        area = [_mean([e["test_acc1"] for e in log]) for log in logs]
        rows.append(
            {
                "variant": variant.key,
                "model": variant.model,
                "description": variant.description,
                "params_m": logs[0][-1].get("n_parameters", 0) / 1e6,
                "seeds": [r.seed for r in mine],
                "top1": final,
                "top1_mean": _mean(final),
                "top1_std": _std(final),
                "best_mean": _mean(best),
                "epochs_mean": _mean(area),
                "epochs_std": _std(area),
                "minutes": sum(r.seconds for r in mine) / 60,
                "cpu_minutes": sum(r.cpu_seconds for r in mine) / 60,
            }
        )
    return rows


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| variant | model | #params (M) | top-1 final, mean ± std (%) | top-1 per seed (%) | best epoch, mean (%) "
        "| top-1 over all epochs, mean ± std (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = ", ".join(f"{v:.1f}" for v in row["top1"])
        lines.append(
            f"| {row['variant']} | `{row['model']}` | {row['params_m']:.2f} | {row['top1_mean']:.1f} ± "
            f"{row['top1_std']:.1f} | {seeds} | {row['best_mean']:.1f} | {row['epochs_mean']:.1f} ± "
            f"{row['epochs_std']:.1f} |"
        )
    return "\n".join(lines)


def plot_curves(runs: list[Run], variants: Sequence[Variant], out: Path) -> Path:
    """Validation top-1 and training loss per epoch: the mean over seeds per variant, with the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in variants:
        logs = [read_run(r) for r in runs if r.variant == variant.key]
        epochs = min(len(log) for log in logs)
        xs = [logs[0][i]["epoch"] for i in range(epochs)]
        for ax, key in zip(axes, ("test_acc1", "train_loss")):
            values = [[log[i][key] for log in logs] for i in range(epochs)]
            mean = [_mean(v) for v in values]
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{variant.key} ({len(logs)} seeds)")
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    axes[0].set_title("validation top-1 (%): mean over seeds, band = range")
    axes[1].set_title("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    d = PRESETS[DEFAULT_PRESET]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nExample")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        help=f"the comparison: data, budget, recipe and variants (default {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--out", default=None, help="output folder: data, runs, table, curves (default outputs/compare/<preset>)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help="default: the preset's ("
        + "; ".join(
            f"{p.name}: {' '.join(p.variants)}, --quick: {' '.join(p.quick_variants)}" for p in PRESETS.values()
        )
        + ")",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny data, 1 epoch, two variants: checks the pipeline only (~1 min)"
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs ({d.name}: {d.budget.epochs})")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help=f"{d.name}: {' '.join(map(str, d.budget.seeds))}"
    )
    parser.add_argument("--train-per-class", type=int, default=None, help=f"{d.name}: {d.budget.train_per_class}")
    parser.add_argument("--val-per-class", type=int, default=None, help=f"{d.name}: {d.budget.val_per_class}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    return parser


def resolve_budget(args: argparse.Namespace) -> Budget:
    """The budget of the preset (or of its ``--quick``), with the command line's overrides."""
    from make_relational_dataset import CLASS_NAMES

    preset = PRESETS[args.preset]
    base = preset.quick if args.quick else preset.budget
    budget = Budget(
        train_per_class=args.train_per_class or base.train_per_class,
        val_per_class=args.val_per_class or base.val_per_class,
        image_size=base.image_size,
        input_size=base.input_size,
        epochs=args.epochs or base.epochs,
        seeds=tuple(args.seeds) if args.seeds else base.seeds,
    )
    if min(budget.train_per_class, budget.val_per_class, budget.epochs) < 1:
        raise ValueError("--epochs, --train-per-class and --val-per-class must be >= 1")
    if len(set(budget.seeds)) < 2:
        raise ValueError("give at least two different --seeds (the table reports the spread over seeds)")
    batch = int(preset.main_flags()["--batch-size"])
    if budget.train_per_class * len(CLASS_NAMES) < batch:
        raise ValueError(
            f"--train-per-class {budget.train_per_class} gives fewer training images than one batch ({batch}) of "
            f"preset {preset.name}: main.py drops the last incomplete batch, so nothing would train; give at least "
            f"{-(-batch // len(CLASS_NAMES))}"
        )
    return budget


def time_note(seconds: float, runs: Sequence[Run], own_cpu_seconds: float, jobs: int, threads: int) -> str:
    """Wall-clock and CPU time of a comparison, and the wall-clock it would take on idle cores.

    On ``jobs * threads`` idle cores the runs' CPU time spreads over ``jobs`` runs at a time (one thread each
    by default); this process's own time (data, table, plot) adds to it. On busy cores the wall-clock is longer
    and says little, while the CPU time changes less, so the estimate is what to compare across machines' loads.
    """
    runs_cpu = sum(r.cpu_seconds for r in runs)
    idle = own_cpu_seconds + runs_cpu / jobs
    return (
        f"{seconds / 60:.1f} min wall-clock, {(runs_cpu + own_cpu_seconds) / 60:.1f} min CPU "
        f"({runs_cpu / 60:.1f} in the runs); {jobs} runs at a time x {threads} thread(s), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end; on {jobs * threads} idle cores about {idle / 60:.1f} min"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.time()
    try:
        budget = resolve_budget(args)
        if args.jobs < 1 or args.threads < 1:
            raise ValueError("--jobs and --threads must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import make_relational_dataset as rel

    preset = PRESETS[args.preset]
    out = (REPO / (args.out or f"outputs/compare/{preset.name}")).resolve()
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    counts = rel.make_dataset(data, budget.train_per_class, budget.val_per_class, budget.image_size, seed=0)
    print(f"data: {counts['train']} train / {counts['val']} val images of {len(rel.CLASS_NAMES)} classes in {data}")
    keys = args.variants or (preset.quick_variants if args.quick else preset.variants)
    variants = [VARIANTS[k] for k in dict.fromkeys(keys)]
    runs = [
        Run(v.key, seed, out / "runs" / v.key / f"seed{seed}", [])
        for v in variants
        for seed in budget.seeds  # fmt: skip
    ]
    for run in runs:
        run.cmd = main_command(VARIANTS[run.variant], data, run.out_dir, run.seed, budget, preset.main_flags())
    print(
        f"preset {preset.name}: {len(runs)} runs, {args.jobs} at a time, {args.threads} thread(s) each; first command:"
    )
    print("  " + shlex.join(runs[0].cmd[1:] if VARIANTS[runs[0].variant].rpe is None else runs[0].cmd), flush=True)
    run_all(runs, args.jobs, args.threads)
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        for r in failed:
            print(f"error: {r.variant} seed {r.seed} failed (exit {r.returncode}); see {r.out_dir}/stdout.txt",
                  file=sys.stderr)  # fmt: skip
        return 1
    rows = summarize(runs, variants)
    table = format_table(rows)
    curves = plot_curves(runs, variants, out / "curves.png")
    seconds = time.time() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    own_cpu = own.ru_utime + own.ru_stime
    note = (
        f"preset {preset.name}: {budget.epochs} epochs, {counts['train']} train / {counts['val']} val images at "
        f"{budget.input_size} px, seeds {', '.join(map(str, budget.seeds))}; "
        + time_note(seconds, runs, own_cpu, args.jobs, args.threads)
    )
    (out / "results.md").write_text(f"{table}\n\n{note}\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {
                "preset": preset.name,
                "budget": asdict(budget),
                "recipe": preset.main_flags(),
                "rows": rows,
                "seconds": seconds,
                "cpu_seconds": own_cpu + sum(r.cpu_seconds for r in runs),
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    print(f"\n{table}\n\n{note}\ncurves: {curves}\ntable: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
