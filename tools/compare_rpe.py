"""Does iRPE help where relative position matters? Trains plain DeiT-Tiny and iRPE variants with one recipe.

Generates a relational dataset (``tools/make_relational_dataset.py``: the class is where a blue square is relative
to a red disc, at random absolute positions), then trains every variant with the same ``main.py`` recipe, seeds
and epochs, each run a ``main.py`` subprocess, and prints the final top-1 per variant (mean, sample standard
deviation and each seed's value) and draws the validation curves into one PNG.

Variants (``--variants``), all DeiT-Tiny (12 blocks, width 192, 3 heads) trained from scratch:

* ``plain``: timm's ``deit_tiny_patch16_224`` (what ``main.py --model deit_tiny_patch16_224`` builds), no RPE;
* ``plain_ours``: the iRPE models' own ``VisionTransformer`` with no encoding (``get_rpe_config(mode=None)``): the
  same code and initialisation as the iRPE variants, so that a gap to ``plain`` that is only initialisation shows;
* ``ctx_k``: ``deit_tiny_patch16_224_ctx_product_50_shared_k`` (registered zoo model): contextual product iRPE on
  keys, 50 buckets, shared by the heads;
* ``bias_k``: bias product iRPE on keys, 50 buckets, one table per head;
* ``ctx_qkv``: contextual product iRPE on queries, keys and values, shared (not in the default set).

``plain_ours``, ``bias_k`` and ``ctx_qkv`` have no registered tiny model (``rpe_models`` has tiny only with
``ctx_product_k``, and its builders fix their own configuration), so this script registers them in timm
(:func:`register_variants`) in the ``main.py`` process: their runs are ``python -c "<register>; runpy main.py"
main.py <flags>``, which runs the unchanged ``main.py`` as ``__main__`` with the same flags; the other runs are plain
``python main.py <flags>``.

Default: ``plain plain_ours bias_k ctx_k``, 200 training and 100 validation images per class at 48 px (a 3x3 patch
grid), 12 epochs, seeds 0 and 1, so 8 runs, 2 at a time with one thread each; the recipe is :data:`RECIPE` (AdamW
at 2.5e-4, batch 32, cosine schedule, label smoothing, no mixup/cutmix/RandAugment/erasing). Outputs in ``--out``:
``data/``, ``runs/<variant>/seed<k>/`` (each run's ``main.py`` output folder and ``stdout.txt``), ``results.md``,
``results.json``, ``curves.png``.

Example::

    python tools/compare_rpe.py                      # the default comparison (see --help for its budget)
    python tools/compare_rpe.py --quick              # a smoke run in well under a minute or two
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


@dataclass(frozen=True)
class Variant:
    """One model of the comparison.

    Attributes:
        key: short name (``--variants``).
        model: timm model name passed to ``main.py --model``.
        description: for the table.
        rpe: :func:`irpe.get_rpe_config` arguments of a model this script registers; ``None`` for a model timm
            already knows (timm's own or ``rpe_models``').
    """

    key: str
    model: str
    description: str
    rpe: dict[str, Any] | None = None


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("plain", "deit_tiny_patch16_224", "timm DeiT-Tiny, no RPE"),
        Variant(
            "plain_ours",
            "deit_tiny_patch16_224_norpe",
            "this repo's iRPE ViT without encodings (the iRPE variants' code and initialisation)",
            {"mode": None},
        ),
        Variant("ctx_k", "deit_tiny_patch16_224_ctx_product_50_shared_k", "iRPE contextual product, keys, shared"),
        Variant(
            "bias_k",
            "deit_tiny_patch16_224_bias_product_50_k",
            "iRPE bias product, keys, per head",
            {"ratio": 1.9, "method": "product", "mode": "bias", "shared_head": False, "skip": 1, "rpe_on": "k"},
        ),
        Variant(
            "ctx_qkv",
            "deit_tiny_patch16_224_ctx_product_50_shared_qkv",
            "iRPE contextual product, q+k+v, shared",
            {"ratio": 1.9, "method": "product", "mode": "ctx", "shared_head": True, "skip": 1, "rpe_on": "qkv"},
        ),
    )
}
DEFAULT_VARIANTS: tuple[str, ...] = ("plain", "plain_ours", "bias_k", "ctx_k")


def register_variants() -> list[str]:
    """Registers the variants timm does not know (``Variant.rpe``) as timm models; returns their names.

    Each is the zoo's DeiT-Tiny (``rpe_models.DEIT_ARCHS['tiny']``, built as ``rpe_models`` builds its models) with
    ``rpe_config=irpe.get_rpe_config(**rpe)`` and no released weights. Registering twice is a no-op.
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
            return _build_tiny(_variant, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = variant.model
        entrypoint.__doc__ = f"DeiT-Tiny, {variant.description} (registered by tools/compare_rpe.py)."
        register_model(entrypoint)
        names.append(variant.model)
    return names


def _build_tiny(variant: Variant, **kwargs: Any):
    """DeiT-Tiny with the variant's iRPE configuration, by the zoo models' builder of this checkout."""
    from timm.models import build_model_with_cfg, get_pretrained_cfg

    import irpe
    import rpe_models
    from rpe_vision_transformer import VisionTransformer

    rpe_config = irpe.get_rpe_config(**variant.rpe)
    zoo = "deit_tiny_patch16_224_ctx_product_50_shared_k"  # same data configuration (mean, std, crop)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {**get_pretrained_cfg(zoo).to_dict(), "url": ""}
    kwargs.pop("cache_dir", None)
    arch = {**rpe_models.DEIT_ARCHS["tiny"], **kwargs}
    return build_model_with_cfg(VisionTransformer, variant.model, pretrained=False, rpe_config=rpe_config, **arch)


# The recipe every variant trains with (main.py flags). DeiT's defaults where they fit a few-minute CPU run on
# small data; no mixup/cutmix/RandAugment/erasing/colour jitter (colour tells the two objects apart). main.py's
# training transform still applies DeiT's random-resized crop and horizontal flip (it has no flag to turn them off);
# the dataset's classes are chosen to survive the flip.
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
        image_size: generated image side; ``input_size`` what the models see (a multiple of 16).
        epochs: training epochs.
        seeds: ``main.py --seed`` of the runs of each variant.
    """

    train_per_class: int
    val_per_class: int
    image_size: int
    input_size: int
    epochs: int
    seeds: tuple[int, ...]


DEFAULT_BUDGET = Budget(train_per_class=200, val_per_class=100, image_size=48, input_size=48, epochs=12, seeds=(0, 1))
QUICK_BUDGET = Budget(train_per_class=16, val_per_class=4, image_size=32, input_size=32, epochs=1, seeds=(0, 1))
QUICK_VARIANTS: tuple[str, ...] = ("plain", "bias_k")  # one plain main.py run and one through the launcher

LAUNCHER = (
    "import runpy, sys; sys.path.insert(0, 'tools'); import compare_rpe; compare_rpe.register_variants(); "
    "sys.argv = sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')"
)


def main_command(variant: Variant, data: Path, out_dir: Path, seed: int, budget: Budget) -> list[str]:
    """The ``main.py`` command line of one run (through :data:`LAUNCHER` for variants this script registers)."""
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
    for key, value in RECIPE.items():
        flags += [key, value]
    flags += list(RECIPE_SWITCHES)
    prefix = [sys.executable, "-c", LAUNCHER] if variant.rpe is not None else [sys.executable]
    return [*prefix, "main.py", *flags]


@dataclass
class Run:
    """One training run and, once finished, its outcome."""

    variant: str
    seed: int
    out_dir: Path
    cmd: list[str]
    returncode: int | None = None
    seconds: float = 0.0


def run_all(runs: list[Run], jobs: int, threads: int) -> None:
    """Runs the ``main.py`` commands, ``jobs`` at a time with ``threads`` CPU threads each, in the repository.

    Each run's output goes to ``<out_dir>/stdout.txt``; ``returncode`` and ``seconds`` are filled in.
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
            if proc.poll() is None:
                continue
            log.close()
            run.returncode, run.seconds = proc.returncode, time.time() - start
            active.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"  {status}: {run.variant} seed {run.seed} in {run.seconds:.0f} s", flush=True)


def read_run(run: Run) -> list[dict[str, Any]]:
    """The epochs of a finished run's ``log.txt`` (via ``tools/plot_logs.read_log``)."""
    from plot_logs import read_log

    return read_log(run.out_dir / "log.txt")


def summarize(runs: list[Run], variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """One row per variant: final top-1 of each seed, their mean and sample standard deviation, best-epoch mean."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r.variant == variant.key]
        logs = [read_run(r) for r in mine]
        final = [log[-1]["test_acc1"] for log in logs]
        best = [max(e["test_acc1"] for e in log) for log in logs]
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
                "minutes": sum(r.seconds for r in mine) / 60,
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
        "| variant | model | #params (M) | top-1 final, mean ± std (%) | top-1 per seed (%) | best epoch, mean (%) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = ", ".join(f"{v:.1f}" for v in row["top1"])
        lines.append(
            f"| {row['variant']} | `{row['model']}` | {row['params_m']:.2f} | {row['top1_mean']:.1f} ± "
            f"{row['top1_std']:.1f} | {seeds} | {row['best_mean']:.1f} |"
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
    d = DEFAULT_BUDGET
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nExample")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/compare", help="output folder (data, runs, table, curves)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help=f"default: {' '.join(DEFAULT_VARIANTS)} (--quick: {' '.join(QUICK_VARIANTS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny data, 1 epoch, two variants: checks the pipeline only (~1 min)"
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {d.epochs})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, d.seeds))}")
    parser.add_argument("--train-per-class", type=int, default=None, help=f"default {d.train_per_class}")
    parser.add_argument("--val-per-class", type=int, default=None, help=f"default {d.val_per_class}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    return parser


def resolve_budget(args: argparse.Namespace) -> Budget:
    """The budget of ``--quick`` or the default, with the command line's overrides."""
    base = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
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
    return budget


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

    out = (REPO / args.out).resolve()
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    counts = rel.make_dataset(data, budget.train_per_class, budget.val_per_class, budget.image_size, seed=0)
    print(f"data: {counts['train']} train / {counts['val']} val images of {len(rel.CLASS_NAMES)} classes in {data}")
    keys = args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    variants = [VARIANTS[k] for k in dict.fromkeys(keys)]
    runs = [
        Run(v.key, seed, out / "runs" / v.key / f"seed{seed}", [])
        for v in variants
        for seed in budget.seeds  # fmt: skip
    ]
    for run in runs:
        run.cmd = main_command(VARIANTS[run.variant], data, run.out_dir, run.seed, budget)
    print(f"{len(runs)} runs, {args.jobs} at a time, {args.threads} thread(s) each; first command:")
    print("  " + " ".join(runs[0].cmd[1:] if VARIANTS[runs[0].variant].rpe is None else runs[0].cmd), flush=True)
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
    note = (
        f"{budget.epochs} epochs, {counts['train']} train / {counts['val']} val images at {budget.input_size} px, "
        f"seeds {', '.join(map(str, budget.seeds))}; {seconds / 60:.1f} min wall-clock, {args.jobs} runs at a time "
        f"x {args.threads} thread(s), {os.cpu_count()} CPUs"
    )
    (out / "results.md").write_text(f"{table}\n\n{note}\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"budget": asdict(budget), "rows": rows, "seconds": seconds}, indent=1), encoding="utf-8"
    )
    print(f"\n{table}\n\n{note}\ncurves: {curves}\ntable: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
