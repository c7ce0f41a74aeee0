"""Train and evaluate DeiT / iRPE image classifiers (DeiT's ``main.py``, device-agnostic and resumable).

Examples::

    # single process (CPU or one GPU)
    python main.py --model deit_small_patch16_224_ctx_product_50_shared_k --data-path /data/imagenet \\
        --output_dir outputs/run1 --device cuda
    # 8 GPUs
    torchrun --nproc_per_node=8 main.py --model ... --data-path /data/imagenet --output_dir outputs/run1
    # evaluation of a checkpoint
    python main.py --eval --resume outputs/run1/best_checkpoint.pth --model ... --data-path /data/imagenet

Flags keep DeiT's names and defaults; ``--config FILE.yaml`` supplies defaults (the command line wins) and the
resolved flags are written to ``<output_dir>/args.yaml``.

Mixed precision: on CUDA, AMP is on by default with float16 and loss scaling, as DeiT; on CPU it is off by
default (``--amp`` turns it on, with bfloat16 unless ``--amp-dtype`` says otherwise). ``--no-amp`` runs float32.

Learning rate: as DeiT, ``--lr`` is scaled by ``batch_size * world_size / 512``, and the per-epoch schedule is
timm's. The scheduler is stepped to ``epoch`` at the *start* of each epoch, so epoch ``e`` trains at ``lr(e)``
whether or not the run was resumed (DeiT stepped it after the epoch, so epoch ``e`` trained at ``lr(e - 1)``).

Errors the user can fix print ``error: ...`` and exit with code 2; a non-finite loss exits with code 1.
"""

from __future__ import annotations

import os

# OpenMP threads waiting for work spin by default, and where the cores are shared (DataLoader workers, other jobs) a
# thread that has lost its core stalls every parallel region: one CPU epoch of the demo recipe took 265 s instead of
# 9 s beside two busy processes on 2 cores, and 19 s with passive waiting, which is also no slower on idle cores
# (tools/benchmark_cpu_sharing.py). OpenMP reads the variable when torch loads it, hence before the imports below;
# a value the user sets wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import datetime
import difflib
import json
import logging
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV2
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

import models
import utils
from datasets import DATA_SETS, build_dataset
from engine import evaluate, train_one_epoch
from losses import DISTILLATION_TYPES, DistillationLoss
from samplers import RASampler, ShardedEvalSampler
from utils import TrainingError, UserError

# Importing rpe_models registers the iRPE models in timm's registry, so that timm.create_model finds them by name.
try:
    import rpe_models  # noqa: F401
    from irpe_attention import ATTN_IMPLS
    from rpe_vision_transformer import IRPESpec, add_irpe
except ValueError as _err:  # irpe.py refuses an unknown IRPE_BACKEND when imported: validate_args reports it
    if "IRPE_BACKEND" not in str(_err):
        raise
    _IRPE_IMPORT_ERROR: str | None = str(_err)
    ATTN_IMPLS = ("auto",)  # the run stops in validate_args with the import's error
else:
    _IRPE_IMPORT_ERROR = None

_logger = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INAT_CATEGORIES = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name")


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def irpe_spec(text: str) -> str:
    """argparse type of ``--irpe``: the canonical text of an ``IRPESpec`` (``''``: no iRPE).

    Raises:
        argparse.ArgumentTypeError: what is wrong with ``text`` and the form it takes.
    """
    if not text or _IRPE_IMPORT_ERROR is not None:  # a bad IRPE_BACKEND is validate_args' first error
        return text
    try:
        return str(IRPESpec.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """DeiT's flags (same names and defaults) plus config, AMP, compile and logging flags.

    Built with ``add_help=False`` so that ``run_with_submitit.py`` can reuse it through ``parents=[...]``.
    """
    parser = argparse.ArgumentParser("DeiT training and evaluation script", add_help=add_help)
    parser.add_argument("--config", default="", metavar="FILE.yaml", help="YAML file of flag defaults (CLI wins)")
    parser.add_argument("--batch-size", default=64, type=int, help="batch size per process")
    parser.add_argument("--epochs", default=300, type=int)

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL", help="timm model name")
    g.add_argument("--pretrained", action="store_true", help="start from the released weights of --model")
    g.add_argument("--input-size", default=224, type=int, help="image size (the model is built at this size)")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="PCT", help="drop path (stochastic depth) rate")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    parser.set_defaults(model_ema=True)
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument(
        "--attn-impl",
        default="auto",
        choices=ATTN_IMPLS,
        help="attention implementation, passed to models that accept `attn_impl` and to --irpe (auto: the model's "
        "choice)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--irpe",
        default="",
        type=irpe_spec,
        metavar="METHOD,MODE,ON",
        help="put iRPE (zero tables) into every block of a timm ViT/DeiT --model, e.g. a --pretrained one: METHOD "
        "euc|quant|cross|product, MODE ctx|bias, ON any of q, k, v, then optionally ratio=R and shared_head=false "
        "(e.g. product,ctx,qkv)",
    )

    g = parser.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    g.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm (off if unset)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=float, default=0.05)

    g = parser.add_argument_group("learning rate schedule")
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="learning rate for a total batch of 512")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    g.add_argument("--cooldown-epochs", type=int, default=10, metavar="N")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME", help="AutoAugment policy; none")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train-interpolation", type=str, default="bicubic", help="random, bilinear or bicubic")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    parser.set_defaults(repeated_aug=True)
    g.add_argument("--load-tar", action="store_true", help="read <data-path>/train.tar and val.tar in place")

    g = parser.add_argument_group("random erase")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT")
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--resplit", action="store_true", default=False, help="accepted for compatibility (no effect)")

    g = parser.add_argument_group("mixup")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"))

    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    g.add_argument("--teacher-path", type=str, default="")
    g.add_argument("--distillation-type", default="none", choices=DISTILLATION_TYPES, type=str)
    g.add_argument("--distillation-alpha", default=0.5, type=float)
    g.add_argument("--distillation-tau", default=1.0, type=float)

    g = parser.add_argument_group("finetuning")
    g.add_argument("--finetune", default="", help="start from this checkpoint (file or URL; head and pos. reset)")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", default=None, type=str, help="dataset root")
    g.add_argument("--data-set", default="IMNET", choices=DATA_SETS, type=str)
    g.add_argument("--inat-category", default="name", choices=INAT_CATEGORIES, type=str)
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--pin-mem", action="store_true", help="pin CPU memory in the DataLoader")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="where to save checkpoints and logs (nothing saved if empty)")
    g.add_argument("--log-dir", default="", help="TensorBoard directory (default: output_dir)")
    g.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:N or cpu; cuda when a GPU is visible",
    )
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="resume from this checkpoint (file or URL)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")
    g.add_argument("--eval", action="store_true", help="only evaluate")
    g.add_argument(
        "--eval-random-init",
        action="store_true",
        help="allow --eval without --resume or --pretrained (evaluates randomly initialized weights)",
    )
    g.add_argument(
        "--dist-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shard evaluation over processes (exact: no image counted twice)",
    )
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA only")
    g.add_argument("--amp-dtype", default=None, choices=tuple(AMP_DTYPES), help="default: float16 CUDA, bfloat16 CPU")
    g.add_argument("--print-freq", default=10, type=int, help="progress line every N steps")
    g.add_argument("--tb-log-freq", default=10, type=int, help="TensorBoard train loss/lr every N steps")

    g = parser.add_argument_group("distributed")
    g.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    # torch.distributed.launch without --use_env passes --local-rank; the rank is read from the environment anyway.
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _describe(value: Any) -> str:
    """How a YAML value reads in an error message."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return f"the list {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    return f"{value!r} ({type(value).__name__})"


def _expected(action: argparse.Action) -> str:
    """What a flag takes, for error messages."""
    if action.nargs == 0:
        return "true or false"
    kind = {int: "an integer", float: "a number"}.get(action.type, "a string")  # type: ignore[arg-type]
    if action.choices is not None:
        kind = f"one of {', '.join(map(str, action.choices))}"
    return f"a list of {kind.removeprefix('an ').removeprefix('a ')}s" if action.nargs in ("+", "*") else kind


def _coerce_scalar(action: argparse.Action, where: str, value: Any) -> Any:
    """Converts one YAML scalar as argparse converts a command-line string, refusing what the CLI could not give."""
    kind = action.type
    if isinstance(value, str):  # what the command line gives; YAML also reads `1e-3` as a string
        if kind in (None, str):
            result = value
        else:
            try:
                result = kind(value)  # type: ignore[misc]
            except argparse.ArgumentTypeError as e:  # a type that says what is wrong (--irpe)
                raise UserError(f"{where}: {e}") from None
            except (TypeError, ValueError):
                raise UserError(f"{where}: expected {_expected(action)}, got {_describe(value)}") from None
    elif isinstance(value, bool) or kind in (None, str) or not isinstance(value, (int, float)):
        hint = " (quote it for a string)" if kind in (None, str) and not isinstance(value, (list, dict)) else ""
        raise UserError(f"{where}: expected {_expected(action)}, got {_describe(value)}{hint}")
    elif kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise UserError(f"{where}: expected an integer, got {value!r}")
        result = int(value)
    else:
        result = kind(value)  # type: ignore[misc]
    if action.choices is not None and result not in action.choices:
        raise UserError(f"{where}: {result!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """Checks a YAML value against its flag exactly as argparse checks the command line, and converts it.

    Switches (``--x``, ``--x/--no-x``) take ``true``/``false`` only; typed flags take their type or a string it
    converts; ``true``/``false`` are not numbers; an integer flag refuses a fraction; only ``nargs`` flags take a
    list (a single value becomes a one-item list); choices are enforced. ``null`` is accepted where the default is.

    Raises:
        UserError: naming the key, what it expects and what it got.
    """
    where = f"config key {key!r}"
    if value is None:
        if action.default is None:
            return None
        raise UserError(f"{where}: no value (expected {_expected(action)}); remove the key to keep the default")
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise UserError(f"{where}: expected at least one value, got an empty list")
        return [_coerce_scalar(action, where, v) for v in items]
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected a single value ({_expected(action)}), got {_describe(value)}")
    return _coerce_scalar(action, where, value)


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Reads flag defaults from a YAML mapping; keys are flag names with ``-`` or ``_``.

    Raises:
        UserError: if the file is missing, unreadable, not UTF-8 or malformed, holds keys that are not flags (all
            named) or a value its flag would refuse on the command line.
    """
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse config {path}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of flag: value")
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest != "help":
            actions.setdefault(a.dest, a)
    unknown = sorted(str(k) for k in data if str(k).replace("-", "_") not in actions or k == "config")
    if unknown:
        raise UserError(f"unknown key(s) in config {path}: {', '.join(unknown)}")
    out = {}
    for k, v in data.items():
        dest = str(k).replace("-", "_")
        out[dest] = _coerce(actions[dest], str(k), v)
    return out


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows the default of every flag, also of those without a help text (most of DeiT's)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses flags, taking defaults from ``--config`` when given (the command line wins)."""
    parser = argparse.ArgumentParser(
        "DeiT training and evaluation script",
        parents=[get_args_parser()],
        formatter_class=DefaultsHelpFormatter,
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


def write_args_yaml(args: argparse.Namespace, path: Path) -> None:
    """Writes the resolved flags as YAML (loadable again with ``--config``), atomically as the checkpoints.

    Raises:
        OSError: the write failed (e.g. the disk is full); ``path`` is unchanged.
    """
    data = {k: v for k, v in utils.to_plain(args).items() if k != "config"}
    utils.atomic_write_text(path, yaml.safe_dump(data, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for ``--device``; a CUDA device without a visible GPU is a user error."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"invalid --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def resolve_amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for float32: AMP defaults to on for CUDA (float16) and off for CPU (bfloat16)."""
    enabled = args.amp if args.amp is not None else device.type == "cuda"
    if not enabled:
        return None
    name = args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    return AMP_DTYPES[name]


def scaler_state(loss_scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """The checkpoint's ``scaler`` entry: the loss scaler's state, or a fresh scaler's when none is used.

    DeiT's ``main.py`` passes ``checkpoint['scaler']`` to an enabled ``GradScaler.load_state_dict`` on resume, which
    refuses ``None`` and an empty dict, so a checkpoint of a run without loss scaling still carries a valid state.
    """
    if loss_scaler is not None and loss_scaler.is_enabled():
        return loss_scaler.state_dict()
    return torch.amp.GradScaler("cpu").state_dict()


def check_model_name(name: str) -> None:
    """Raises a ``UserError`` suggesting close registered names when ``name`` is not a timm model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"unknown model {name!r}{hint}")


def _patch_size_from_name(name: str) -> int | None:
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else None


def check_input_size(input_size: int, patch_size: int | None, model_name: str) -> None:
    """Raises a ``UserError`` when the image size is not a multiple of the patch size."""
    if patch_size and input_size % patch_size:
        lower, upper = input_size // patch_size * patch_size, (input_size // patch_size + 1) * patch_size
        raise UserError(
            f"--input-size {input_size} is not divisible by the patch size {patch_size} of {model_name} "
            f"(try {lower or upper} or {upper})"
        )


def model_patch_size(model: nn.Module) -> int | None:
    """The (square) patch size of a ViT-like model, or None."""
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(ps, (tuple, list)):
        return int(ps[0])
    return int(ps) if ps else None


# ----------------------------------------------------------------------------------------------------------------
# Validation of the flags, before any data, model or process group is set up

# The largest patch grid accepted: 64 x 64 = 4096 patches (1024 px at patch 16, 512 px at patch 8). Attention maps
# grow with the square of the patch count: 4096^2 floats are 64 MiB per head and image, about 10 GiB for a batch
# of 64 images in one layer of DeiT-tiny's 3 heads; a larger grid cannot train, and a much larger one makes timm
# allocate a position embedding of many gigabytes before failing.
MAX_PATCHES = 4096

# timm.scheduler has no list of its schedulers: these are the names create_scheduler_v2 builds (timm 1.0). 'none'
# (no scheduler) is left out: the training loop steps the scheduler at every epoch.
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant")


def _flag(dest: str) -> str:
    """The command-line spelling of the flag stored in ``dest`` (``batch_size`` -> ``--batch-size``)."""
    for action in get_args_parser()._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return f"--{dest}"


def _default_hint(dest: str) -> str:
    """``default: <value>`` of the flag stored in ``dest``, as a fix hint."""
    return f"default: {get_args_parser().get_default(dest)}"


def _check_range(
    args: argparse.Namespace,
    dest: str,
    low: float,
    high: float | None = None,
    *,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """Raises a ``UserError`` unless ``low <= args.<dest>`` and ``args.<dest> <= high`` (``< high``: high_open)."""
    value = getattr(args, dest)
    if value is None:
        return
    ok = value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if high is None:
            want = f"must be at least {low}"
        else:
            want = f"must be in [{low}, {high}{')' if high_open else ']'}"
        raise UserError(f"{_flag(dest)} {value}: {want}; {hint or _default_hint(dest)}")


def check_optimizer_name(name: str) -> None:
    """Raises a ``UserError`` unless timm's ``create_optimizer`` knows ``name`` (``lookahead_<name>`` included)."""
    known = timm.optim.list_optimizers()
    parts = name.lower().split("_")
    if parts[-1] in known and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "lookahead")):
        return
    close = difflib.get_close_matches(parts[-1], known, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown --opt {name!r}: {hint}timm's optimizers are listed by timm.optim.list_optimizers() (DeiT: adamw; "
        "'lookahead_<name>' wraps one in Lookahead)"
    )


def check_vit_model(name: str) -> int | None:
    """Raises a ``UserError`` unless ``name`` builds a ViT-style model (one with a patch embedding).

    The model is built on the meta device (no memory, a fraction of a second). Returns its patch size, or None when
    it cannot be built that way (``build_model`` then reports what is wrong).
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001  (anything build_model would meet again and report)
        return None
    if getattr(model, "patch_embed", None) is None:
        raise UserError(
            f"--model {name} is not a ViT-style model: only models with a patch embedding are supported (DeiT, ViT "
            "and the iRPE models, e.g. deit_small_patch16_224_ctx_product_50_shared_k); --teacher-model may be a CNN"
        )
    return model_patch_size(model)


def apply_irpe(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``add_irpe`` with the encodings of ``--irpe``; a model it cannot take is a ``UserError``."""
    try:
        return add_irpe(model, **asdict(IRPESpec.parse(args.irpe)), attn_impl=args.attn_impl)
    except ValueError as e:
        raise UserError(f"--irpe {args.irpe} with --model {args.model}: {e}") from None


def check_irpe_model(args: argparse.Namespace) -> None:
    """Raises a ``UserError`` unless ``--irpe`` can go into ``--model``: tried on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(args.model, pretrained=False)
    except Exception:  # noqa: BLE001  (anything build_model would meet again and report)
        return
    apply_irpe(model, args)


def _device_type(name: str) -> str | None:
    try:
        return torch.device(name).type
    except RuntimeError:
        return None  # resolve_device reports it


def validate_args(args: argparse.Namespace) -> None:
    """Checks every flag that can be checked without data or weights, before anything is built.

    A bad value is then one ``error:`` line (exit code 2) naming the flag and a fix, instead of a traceback or a
    huge allocation minutes later.

    Raises:
        UserError: the first problem found.
    """
    if _IRPE_IMPORT_ERROR is not None:
        value = os.environ.get("IRPE_BACKEND", "")
        raise UserError(f"IRPE_BACKEND={value!r} is not an iRPE backend: use auto, torch or ops, or unset it (auto)")
    for dest, value in sorted(vars(args).items()):
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            shown = " ".join(map(str, values))
            raise UserError(f"{_flag(dest)} {shown}: not a finite number; {_default_hint(dest)}")
    _check_range(args, "epochs", 1, hint="train for at least one epoch (to only evaluate, use --eval)")
    _check_range(args, "batch_size", 1, hint="the batch size is per process")
    _check_range(args, "num_workers", 0, hint="0 loads the data in the main process")
    for dest in ("lr", "min_lr", "warmup_lr"):
        _check_range(args, dest, 0, hint="learning rates cannot be negative (DeiT: --lr 5e-4 for a batch of 512)")
    for dest in ("weight_decay", "momentum", "opt_eps", "color_jitter", "mixup", "cutmix", "decay_rate"):
        _check_range(args, dest, 0)
    for dest in ("warmup_epochs", "cooldown_epochs", "patience_epochs", "start_epoch", "recount"):
        _check_range(args, dest, 0)
    for dest in ("print_freq", "tb_log_freq"):
        _check_range(args, dest, 1)
    for dest in ("drop", "drop_path"):
        _check_range(args, dest, 0, 1, high_open=True, hint="rates are probabilities (DeiT: --drop-path 0.1)")
    _check_range(args, "smoothing", 0, 1, high_open=True, hint="1 would make every target uniform (DeiT: 0.1)")
    for dest in ("reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay", "distillation_alpha"):
        _check_range(args, dest, 0, 1)
    for dest in ("decay_epochs", "distillation_tau", "clip_grad"):
        value = getattr(args, dest)
        if value is not None and value <= 0:
            hint = "omit it for no clipping" if dest == "clip_grad" else _default_hint(dest)
            raise UserError(f"{_flag(dest)} {value}: must be positive; {hint}")

    check_optimizer_name(args.opt)
    if args.sched not in SCHEDULERS:
        raise UserError(f"unknown --sched {args.sched!r}: timm's schedulers are {', '.join(SCHEDULERS)} (DeiT: cosine)")

    check_model_name(args.model)
    patch = check_vit_model(args.model) or _patch_size_from_name(args.model)
    if args.input_size < max(patch or 1, 1):
        raise UserError(
            f"--input-size {args.input_size}: the image size must be a positive multiple of the patch size"
            f"{f' {patch}' if patch else ''} (e.g. 224)"
        )
    check_input_size(args.input_size, patch, args.model)
    if args.irpe:
        check_irpe_model(args)
    if patch and (args.input_size // patch) ** 2 > MAX_PATCHES:
        side = int(MAX_PATCHES**0.5)
        raise UserError(
            f"--input-size {args.input_size}: {(args.input_size // patch) ** 2} patches of {patch} px; at most "
            f"{MAX_PATCHES} ({side * patch} px) are supported, as attention memory grows with the square of the "
            "patch count"
        )

    for dest in ("output_dir", "log_dir"):
        path = getattr(args, dest)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{_flag(dest)} {path} is a file, not a directory: pick another path")
    if not args.resume:  # else the checkpoint may set the start (see check_start_epoch)
        check_start_epoch(args, None)
    check_output_dir_unused(args)

    if args.eval and not (args.resume or args.pretrained or args.eval_random_init):
        note = " (--finetune is not applied with --eval)" if args.finetune else ""
        raise UserError(
            f"--eval without --resume or --pretrained would evaluate randomly initialized weights{note}: pass "
            "--resume CHECKPOINT or --pretrained, or --eval-random-init if that is what you want"
        )
    if args.attn_impl == "flex" and not args.eval and _device_type(args.device) == "cpu":
        raise UserError(
            "--attn-impl flex cannot train on CPU (PyTorch's FlexAttention has no CPU backward): use auto, ops, sdpa "
            "or math on CPU; flex works on CPU for --eval only"
        )


# ----------------------------------------------------------------------------------------------------------------
# Model, teacher, checkpoints and data loaders


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """Creates ``args.model`` with timm at ``args.input_size`` (name and size were checked by ``validate_args``).

    ``--pretrained`` weights of the iRPE models load through :func:`models.load_pretrained`; those of timm's own
    models (the DeiT baselines) through timm's loader.

    Raises:
        UserError: ``--attn-impl`` unsupported by the model, or an input size that is not a multiple of its patch.
        models.CheckpointError: the pretrained weights cannot be fetched, read or matched to the model.
    """
    kwargs: dict[str, Any] = dict(
        pretrained=args.pretrained,
        num_classes=num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        img_size=args.input_size,
    )
    if args.attn_impl != "auto" and not args.irpe:
        kwargs["attn_impl"] = args.attn_impl
    try:
        model = timm.create_model(args.model, **kwargs)
    except (OSError, RuntimeError, TypeError, ValueError) as e:
        if "attn_impl" in str(e) and not isinstance(e, models.CheckpointError):
            raise UserError(f"model {args.model} does not support --attn-impl {args.attn_impl}: {e}") from None
        if not args.pretrained:
            raise
        reason = str(e) if isinstance(e, models.CheckpointError) else f"{type(e).__name__}: {e}"
        raise models.CheckpointError(f"cannot load pretrained weights of {args.model}: {reason}") from None
    check_input_size(args.input_size, model_patch_size(model), args.model)
    if args.irpe:  # after the pretrained weights have loaded: the tables start at zero
        apply_irpe(model, args)
    return model


def check_resume_checkpoint(ckpt: dict[str, Any], source: str) -> None:
    """Checks the entries of a ``--resume`` checkpoint that ``main`` reads, before the data and model are built.

    Raises:
        models.CheckpointError: an entry is missing or of the wrong kind (named, with what it holds).
    """
    models.checkpoint_state_dict(ckpt, source, required=True)
    if ckpt.get("model_ema") is not None:
        models.checkpoint_state_dict(ckpt, source, "model_ema")
    epoch = ckpt.get("epoch")
    if "epoch" in ckpt and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise models.CheckpointError(
            f"checkpoint {source}: 'epoch' must be a non-negative integer, got {_describe(epoch)}"
        )
    for key in ("optimizer", "lr_scheduler"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise models.CheckpointError(
                f"checkpoint {source}: {key!r} must be a state dict, got a {type(ckpt[key]).__name__}"
            )
    acc = ckpt.get("max_accuracy", 0.0)
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        raise models.CheckpointError(f"checkpoint {source}: 'max_accuracy' must be a number, got {_describe(acc)}")


def check_resume_irpe(ckpt: dict[str, Any], args: argparse.Namespace) -> None:
    """Raises a ``UserError`` when the ``--resume`` checkpoint was written with another ``--irpe``: the model is
    rebuilt from the flags, so they must put the checkpoint's iRPE tables into it (checkpoints without the flag in
    their ``args`` are not checked)."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict) or not isinstance(saved.get("irpe"), str) or saved["irpe"] == args.irpe:
        return
    want = f"--irpe {saved['irpe']}" if saved["irpe"] else "no --irpe"
    given = f"--irpe {args.irpe}" if args.irpe else "no --irpe"
    raise UserError(f"checkpoint {args.resume} was trained with {want}, this run has {given}: pass {want}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], source: str, args: Any) -> None:
    """Loads a checkpoint's optimizer state, or raises a ``CheckpointError`` when it is another model's/optimizer's.

    ``Optimizer.load_state_dict`` checks only the number of parameters per group; the shapes of the moment buffers
    are checked here too (a mismatch would otherwise fail at the first step).
    """
    why = (
        f"checkpoint {source}: its optimizer state does not fit --opt {args.opt} on {args.model} (saved with "
        f"another model, --opt or parameter grouping?); to start from its weights only, use --finetune {source}"
    )
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise models.CheckpointError(f"{why} ({type(e).__name__}: {e})") from None
    for param, param_state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            buf = param_state.get(key)
            if isinstance(buf, torch.Tensor) and buf.shape != param.shape:
                raise models.CheckpointError(f"{why} ({key} {tuple(buf.shape)} for a parameter {tuple(param.shape)})")


def build_teacher(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    """Creates the distillation teacher, loads ``--teacher-path`` strictly, and freezes it in eval mode.

    Raises:
        UserError: no ``--teacher-path``, or an unknown ``--teacher-model``.
        models.CheckpointError: the checkpoint cannot be fetched or read, or is not the teacher's.
    """
    if not args.teacher_path:
        raise UserError("--distillation-type needs --teacher-path (teacher weights, file or URL)")
    check_model_name(args.teacher_model)
    _logger.info(f"Creating teacher model: {args.teacher_model}")
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes, global_pool="avg")
    ckpt = models.load_checkpoint(args.teacher_path, revalidate=True)
    state = models.checkpoint_state_dict(ckpt, args.teacher_path)
    models.load_state_dict(teacher, state, args.teacher_path, name=args.teacher_model)
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loaders(args: argparse.Namespace, dataset_train: Any, dataset_val: Any) -> tuple[DataLoader, DataLoader, Any]:
    """Training and validation DataLoaders with DeiT's samplers (RA / distributed / exact sharded eval)."""
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed:
        if args.repeated_aug:
            sampler_train: Any = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        else:
            sampler_train = DistributedSampler(
                dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed
            )
        sampler_val: Any = (
            ShardedEvalSampler(dataset_val, world, rank) if args.dist_eval else SequentialSampler(dataset_val)
        )
    else:
        # A one-replica DistributedSampler: an epoch-seeded shuffle, so a resumed run sees the same order.
        sampler_train = DistributedSampler(dataset_train, num_replicas=1, rank=0, shuffle=True, seed=args.seed)
        sampler_val = SequentialSampler(dataset_val)
    pin = bool(args.pin_mem) and torch.cuda.is_available() and str(args.device).startswith("cuda")
    common = dict(num_workers=args.num_workers, pin_memory=pin, persistent_workers=args.num_workers > 0)
    loader_train = DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size, drop_last=True, **common
    )
    loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size), **common)
    if not args.eval and len(loader_train) == 0:
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler_train)} training images per process: "
            "no full batch (lower --batch-size)"
        )
    return loader_train, loader_val, sampler_train


class TensorBoardLogger:
    """Writes per-step train loss/lr and per-epoch metrics to TensorBoard (rank 0 only; no-op elsewhere).

    Events go through :class:`utils.ScalarEventFile`, which writes in this thread, so that a failed write (a full
    disk) is one ``UserError`` naming the event file; the events written before it stay readable.

    Args:
        log_dir: Folder of the event file ('' for none).
        every: Log the per-step values every ``every`` steps.
        steps_per_epoch: Steps of one epoch (global step = epoch * steps_per_epoch + step).
        output_dir: The run's output folder, for the error message of a failed write (what can be resumed).

    Raises:
        UserError: the event file cannot be created or written (also from :meth:`step` and :meth:`epoch_end`).
    """

    def __init__(self, log_dir: str, every: int, steps_per_epoch: int, output_dir: Path | None = None) -> None:
        self.writer: utils.ScalarEventFile | None = None
        self.every = max(int(every), 1)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.output_dir = output_dir if output_dir is not None else Path(log_dir)
        if log_dir and utils.is_main_process():
            try:
                self.writer = utils.ScalarEventFile(log_dir)
            except OSError as e:
                path = Path(e.filename) if e.filename else Path(log_dir)
                raise write_error(path, e, self.output_dir, checkpoint_state(self.output_dir)) from None

    def _failed(self, writer: utils.ScalarEventFile, err: OSError) -> UserError:
        """Closes ``writer`` after its write failed with ``err``; returns the error to raise."""
        self.writer = None
        writer.close_quietly()
        intact = f"the events written before are intact, {checkpoint_state(self.output_dir)}"
        return write_error(writer.path, err, self.output_dir, intact)

    def step(self, step: int, values: dict[str, float]) -> None:
        """Logs ``values`` as ``train/<name>`` every ``every`` steps (global step = epoch * steps + step)."""
        if self.writer is None or step % self.every:
            return
        global_step = self.epoch * self.steps_per_epoch + step
        try:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, global_step)
        except OSError as e:
            raise self._failed(self.writer, e) from None

    def epoch_end(self, epoch: int, stats: dict[str, float]) -> None:
        """Logs every numeric epoch statistic as ``epoch/<name>``, and writes the events to the file."""
        if self.writer is None:
            return
        try:
            for k, v in stats.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"epoch/{k}", v, epoch)
            self.writer.flush()
        except OSError as e:
            raise self._failed(self.writer, e) from None

    def close(self) -> None:
        """Closes the event file; never raises, as it runs while another error may be on its way out.

        Every epoch ends with a flush (:meth:`epoch_end`), so only the steps of an epoch cut short can be lost.
        """
        if self.writer is not None:
            self.writer.close_quietly()
            self.writer = None


# ----------------------------------------------------------------------------------------------------------------
# Outputs: the save order of an epoch, and the repair on resume
#
# checkpoint.pth is the commit point of an epoch. Rank 0 writes epoch e's outputs in this order:
#   1. best_checkpoint.pth, when e improved on max_accuracy (atomic: temporary file, fsync, rename);
#   2. e's line appended to log.txt (flushed and fsynced);
#   3. checkpoint.pth (atomic), holding epoch e.
# Invariant: with c the epoch in checkpoint.pth, a kill at any instant leaves
#   - log.txt with exactly one line for each epoch <= c, then at most one line of epoch c + 1 (maybe cut short);
#   - best_checkpoint.pth with the most accurate weights measured so far: those of an epoch <= c, or of epoch c + 1
#     when the kill came after step 1. Its max_accuracy is never below checkpoint.pth's, so no kill loses best
#     weights (a rename replaces the previous best only with complete, better weights);
#   - at most one temporary ``.<file>.*.tmp`` per file, left by a kill inside an atomic write.
# Resuming from checkpoint.pth restores it (reconcile_outputs): the temporary files are deleted, the log lines after
# c are dropped (atomic rewrite), and max_accuracy is taken from best_checkpoint.pth. Epoch c + 1 is then trained
# again, logged once, and replaces best_checkpoint.pth only if more accurate. reconcile_outputs also repairs output
# folders of earlier versions, which wrote log.txt, then checkpoint.pth, then best_checkpoint.pth (duplicated log
# lines; a best_checkpoint.pth below checkpoint.pth's max_accuracy, restored from checkpoint.pth when that holds the
# best epoch).
# The kill points of the test hook (utils.kill_point, IRPE_TEST_KILL_AT) sit inside these three writes.
# A folder holds one run: a training run that does not resume from a checkpoint in it refuses a folder that holds
# log.txt or a checkpoint (check_output_dir_unused), so no log mixes the epochs of two runs.

OUTPUT_FILES = ("log.txt", "checkpoint.pth", "best_checkpoint.pth")  # what a folder that holds a run holds


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint that continues the run in ``output_dir``: checkpoint.pth, else best_checkpoint.pth, else None.

    best_checkpoint.pth holds a whole training state too, and is the only one after a kill or a failed write in
    epoch 0's save, between its rename and that of the first checkpoint.pth.
    """
    for name in ("checkpoint.pth", "best_checkpoint.pth"):
        if (output_dir / name).is_file():
            return output_dir / name
    return None


def resume_hint(output_dir: Path) -> str:
    """How the run in ``output_dir`` goes on: ``continue with --resume <its checkpoint>``, or start again."""
    ckpt = resumable_checkpoint(output_dir)
    if ckpt is None:
        return "start the run again (no checkpoint was saved, so nothing can be resumed)"
    return f"continue with --resume {ckpt}"


def _logged_epochs(path: Path) -> list[int]:
    """The epochs of the complete lines of a log.txt (none when it is missing or unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]  # the last piece is not complete
    except OSError:
        return []
    epochs = []
    for line in lines:
        try:
            epochs.append(int(json.loads(line)["epoch"]))
        except (ValueError, KeyError, TypeError):
            continue
    return epochs


def _checkpoint_epoch(path: Path) -> int | None:
    """The ``epoch`` a checkpoint holds (read memory-mapped, not loaded), or None when it has none or is unreadable."""
    try:
        ckpt = models.load_checkpoint_file(path, mmap=True)
    except Exception:  # noqa: BLE001  (unreadable or not a zip checkpoint: the log tells how far the run got)
        return None
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def check_output_dir_unused(args: argparse.Namespace) -> None:
    """Refuses to mix two runs in one ``--output_dir`` (checked on every rank, before anything is written).

    log.txt is appended to and the checkpoints are replaced, so a training run writes into a folder that holds a
    run's log.txt or checkpoints only when it resumes from a checkpoint in that folder. ``--eval`` writes neither.

    Raises:
        UserError: naming the folder, what it holds, the epoch it reached, and the two ways on.
    """
    if args.eval or not args.output_dir:
        return
    output_dir = Path(args.output_dir)
    held = [name for name in OUTPUT_FILES if (output_dir / name).is_file() and (output_dir / name).stat().st_size]
    if not held or (args.resume and _same_file(Path(args.resume).parent, output_dir)):
        return
    epochs = _logged_epochs(output_dir / "log.txt")
    epochs += [e for e in (_checkpoint_epoch(output_dir / n) for n in held if n.endswith(".pth")) if e is not None]
    what = f"--output_dir {output_dir} holds another run ({', '.join(held)}"
    what += f"; it reached epoch {max(epochs)})" if epochs else ")"
    ckpt = resumable_checkpoint(output_dir)
    if args.resume:
        other = f"--resume {ckpt} to continue the run there" if ckpt else f"delete its {' and '.join(held)}"
        raise UserError(f"{what}, and --resume {args.resume} is not in it: pass another --output_dir, or {other}")
    if ckpt is None:
        held_files = " and ".join(held)
        raise UserError(f"{what} with no checkpoint to resume: delete its {held_files}, or pass another --output_dir")
    raise UserError(f"{what}: continue it with --resume {ckpt}, or pass another --output_dir for a new run")


def checkpoint_state(output_dir: Path) -> str:
    """What a failed write leaves of the run's checkpoints, for its error message."""
    ckpt_path = output_dir / "checkpoint.pth"
    return f"the previous {ckpt_path} is intact" if ckpt_path.exists() else "no checkpoint.pth was written yet"


def write_error(path: Path, err: OSError, output_dir: Path, intact: str) -> UserError:
    """The one-line error of a failed write: the file, the reason, what is ``intact``, and how the run goes on."""
    return UserError(
        f"cannot write {path}: {err.strerror or err}; {intact}: free disk space, then {resume_hint(output_dir)}"
    )


def save_epoch_outputs(output_dir: Path, state: dict[str, Any], log_stats: dict[str, Any], improved: bool) -> None:
    """Writes one epoch's best checkpoint (if ``improved``), log line and checkpoint, in the order above (rank 0).

    Raises:
        UserError: a write failed (e.g. the disk is full): names the file, says what is intact and what to resume.
    """
    intact = checkpoint_state(output_dir)
    steps = [
        ("best_checkpoint.pth", lambda: utils.atomic_torch_save(state, output_dir / "best_checkpoint.pth")),
        ("log.txt", lambda: utils.append_line(output_dir / "log.txt", json.dumps(log_stats))),
        ("checkpoint.pth", lambda: utils.atomic_torch_save(state, output_dir / "checkpoint.pth")),
    ]
    for name, write in steps[0 if improved else 1 :]:
        try:
            write()
        except OSError as e:
            previous = f"{name} is unchanged, " if name == "best_checkpoint.pth" else ""
            raise write_error(output_dir / name, e, output_dir, previous + intact) from None


def _reconcile_log(path: Path, epoch: int) -> float | None:
    """Keeps one line per epoch <= ``epoch`` in log.txt (the last one), rewriting it atomically if that changes it.

    Returns:
        The ``test_acc1`` logged for ``epoch``, or None.
    """
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    dropped = int(bool(lines.pop()))  # the last piece is "" after a final newline, else a line cut by a kill
    kept: dict[int, str] = {}
    for line in lines:
        try:
            e = int(json.loads(line)["epoch"])
        except (ValueError, KeyError, TypeError):
            dropped += bool(line.strip())
            continue
        if e > epoch:
            dropped += 1
            continue
        dropped += e in kept  # a line repeated by a resumed run of an earlier version: the later one is kept
        kept[e] = line
    new_text = "".join(kept[e] + "\n" for e in sorted(kept))
    if new_text != text:
        utils.atomic_write_text(path, new_text)
        _logger.info(f"{path}: removed {dropped} line(s) of epochs after {epoch}, repeated or cut short by a kill")
    if epoch not in kept:
        return None
    acc = json.loads(kept[epoch]).get("test_acc1")
    return float(acc) if isinstance(acc, (int, float)) else None


def _max_accuracy_of(path: Path) -> float:
    """The ``max_accuracy`` stored in a checkpoint of ours (read memory-mapped: no full load)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (e.g. not a zip checkpoint: load it as any other checkpoint)
        ckpt = models.load_checkpoint(path)
    return float(ckpt.get("max_accuracy", 0.0))


def reconcile_outputs(output_dir: Path, ckpt: dict[str, Any], ckpt_path: Path) -> float:
    """Restores the save-order invariant after a kill, before resuming from ``ckpt`` (rank 0, see above).

    Args:
        output_dir: The run's output folder, which holds ``ckpt_path``.
        ckpt: The loaded checkpoint resumed from.
        ckpt_path: Its file.

    Returns:
        The max_accuracy to continue with: that of best_checkpoint.pth, so that it is replaced only by better weights.
    """
    epoch = int(ckpt["epoch"])
    max_accuracy = float(ckpt.get("max_accuracy", 0.0))
    logged_acc = _reconcile_log(output_dir / "log.txt", epoch)
    own_acc = ckpt.get("test_acc1", logged_acc)
    best_path = output_dir / "best_checkpoint.pth"
    best_acc = _max_accuracy_of(best_path) if best_path.is_file() else None
    if best_acc is not None and best_acc >= max_accuracy:
        if best_acc > max_accuracy:
            _logger.info(
                f"{best_path} holds {best_acc:.2f}% (epoch {epoch + 1}, cut short by a kill), above the checkpoint's "
                f"{max_accuracy:.2f}%: kept; later epochs replace it only with more accurate weights"
            )
        return best_acc
    if own_acc is not None and float(own_acc) >= max_accuracy:  # checkpoint.pth holds the best epoch itself
        utils.atomic_copy(ckpt_path, best_path)
        before = "was missing" if best_acc is None else f"held {best_acc:.2f}%"
        _logger.info(f"{best_path} {before}: restored from {ckpt_path} (epoch {epoch}, {max_accuracy:.2f}%)")
        return max_accuracy
    _logger.warning(
        f"the weights of max_accuracy {max_accuracy:.2f}% are in neither {best_path} nor {ckpt_path}; "
        "best_checkpoint.pth will hold the best epoch from here on"
    )
    return best_acc if best_acc is not None else 0.0


def _same_file(a: str | Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same existing file or folder."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Main: the steps of a run


@dataclass
class Run:
    """Where and how the run computes and writes (the set-up step)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for float32
    output_dir: Path | None  # None: nothing is saved


@dataclass
class Data:
    """The loaders of the data step, and the mixup/cutmix that turns training labels into soft targets."""

    loader_train: DataLoader
    loader_val: DataLoader
    sampler_train: Any  # its set_epoch(epoch) seeds the shuffle of every epoch
    num_classes: int
    mixup_fn: Mixup | None

    @property
    def num_val(self) -> int:
        """Number of validation images."""
        return len(self.loader_val.dataset)  # type: ignore[arg-type]


@dataclass
class RunModels:
    """The model (the module checkpoints hold), what runs it (compiled and/or DDP-wrapped) and its EMA."""

    model: nn.Module
    run_model: nn.Module
    model_ema: ModelEmaV2 | None
    n_parameters: int


@dataclass
class Optimization:
    """Optimizer, learning-rate schedule, float16 loss scaler (None otherwise) and loss."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_scaler: torch.amp.GradScaler | None
    criterion: DistillationLoss


def setup_run(args: argparse.Namespace, resolved: argparse.Namespace) -> Run:
    """Validates the flags, then sets up the device, the process group, AMP, the seeds and the output folder.

    The flags and the device are checked before the process group is created, so that a bad value is one error line
    per rank rather than a hang or a traceback.
    """
    validate_args(args)
    device = resolve_device(args.device)
    utils.init_distributed_mode(args)
    amp_dtype = resolve_amp_dtype(args, device)
    _logger.info(f"device: {device}, world size: {utils.get_world_size()}, amp: {amp_dtype or 'off'}")
    seed_everything(args.seed + utils.get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Run(device, amp_dtype, prepare_output_dir(args.output_dir, resolved))


def prepare_output_dir(path: str, resolved: argparse.Namespace) -> Path | None:
    """Creates ``--output_dir`` (rank 0), deletes temporary files a killed save left, and writes ``args.yaml``.

    Returns:
        The folder, or None when ``--output_dir`` is empty (nothing is saved).
    """
    if not path:
        return None
    output_dir = Path(path)
    if utils.is_main_process():
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --output_dir {output_dir}: {e.strerror or e}") from None
        try:
            for tmp in utils.remove_stale_temp_files(output_dir, (*OUTPUT_FILES, "args.yaml")):
                _logger.info(f"Removed {tmp}, left by a run killed while saving")
        except OSError as e:
            raise UserError(f"cannot delete {e.filename} in --output_dir {output_dir}: {e.strerror or e}") from None
        try:
            write_args_yaml(resolved, output_dir / "args.yaml")
        except OSError as e:
            kept = "the previous args.yaml is unchanged, " if (output_dir / "args.yaml").exists() else ""
            raise write_error(output_dir / "args.yaml", e, output_dir, kept + checkpoint_state(output_dir)) from None
    return output_dir


def read_checkpoints(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """Reads and checks the ``--resume`` checkpoint and the ``--finetune`` weights (not applied with ``--eval``).

    Both are read before the data and the model are built, so that a wrong file fails in seconds.

    Returns:
        The ``--resume`` checkpoint and the ``--finetune`` state dict, each None when not given.
    """
    resume = models.load_checkpoint(args.resume, revalidate=True) if args.resume else None
    if resume is not None:
        check_resume_checkpoint(resume, args.resume)
        check_resume_irpe(resume, args)
    finetune = None
    if args.finetune and not args.eval:
        finetune = models.checkpoint_state_dict(models.load_checkpoint(args.finetune, revalidate=True), args.finetune)
    return resume, finetune


def build_data(args: argparse.Namespace) -> Data:
    """Builds the datasets (validation classes numbered as the training ones), their loaders and mixup."""
    dataset_train, num_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args, class_to_idx=getattr(dataset_train, "class_to_idx", None))
    _logger.info(f"data: {len(dataset_train)} train / {len(dataset_val)} val images, {num_classes} classes")
    loader_train, loader_val, sampler_train = build_loaders(args, dataset_train, dataset_val)
    return Data(loader_train, loader_val, sampler_train, num_classes, build_mixup(args, num_classes))


def mixup_active(args: argparse.Namespace) -> bool:
    """Whether mixup or cutmix is on (then the targets are soft and smoothing is folded into them)."""
    return args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None


def build_mixup(args: argparse.Namespace, num_classes: int) -> Mixup | None:
    """timm's ``Mixup`` for ``--mixup``/``--cutmix`` (with label smoothing), or None when both are off."""
    if not mixup_active(args):
        return None
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )


def build_models(
    args: argparse.Namespace, device: torch.device, num_classes: int, finetune: dict[str, torch.Tensor] | None
) -> RunModels:
    """Builds the model, loads the ``--finetune`` weights into it, then its EMA, ``torch.compile`` and DDP wrappers.

    Raises:
        UserError: finetuning with distillation, or what :func:`build_model` raises.
        models.CheckpointError: the ``--finetune`` weights do not fit the model.
    """
    _logger.info(f"Creating model: {args.model}")
    model = build_model(args, num_classes)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # timm's distilled DeiT returns (cls, dist) logits in train mode
    if finetune is not None:
        if args.distillation_type != "none":
            raise UserError("finetuning with distillation is not supported")
        skipped = models.load_state_dict(model, finetune, args.finetune, name=args.model, adapt=True, strict=False)
        _logger.info(f"Finetuning from {args.finetune}: {skipped}")
    model.to(device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
    run_model: nn.Module = torch.compile(model) if args.compile else model
    if args.distributed:
        device_ids = [args.gpu] if device.type == "cuda" else None
        run_model = nn.parallel.DistributedDataParallel(run_model, device_ids=device_ids)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info(f"number of params: {n_parameters}")
    return RunModels(model, run_model, model_ema, n_parameters)


def build_optimization(args: argparse.Namespace, model: nn.Module, run: Run, num_classes: int) -> Optimization:
    """Builds the optimizer (DeiT's linear lr scaling), the schedule, the loss scaler and the (distillation) loss.

    Raises:
        UserError: an optimizer whose package or device is missing, or what :func:`build_teacher` raises.
    """
    opt_args = argparse.Namespace(**vars(args))
    opt_args.lr = args.lr * args.batch_size * utils.get_world_size() / 512.0  # DeiT's linear scaling rule
    _logger.info(
        f"lr: {args.lr} scaled to {opt_args.lr:.3e} (batch {args.batch_size} x {utils.get_world_size()} / 512)"
    )
    try:
        optimizer = create_optimizer(opt_args, model)
    except (ImportError, AssertionError) as e:  # apex / bitsandbytes optimizers: package or CUDA missing
        raise UserError(f"--opt {args.opt} is not available here: {e}") from None
    loss_scaler = torch.amp.GradScaler(run.device.type) if run.amp_dtype == torch.float16 else None
    lr_scheduler, _ = create_scheduler(opt_args, optimizer)
    return Optimization(optimizer, lr_scheduler, loss_scaler, build_criterion(args, num_classes, run.device))


def build_criterion(args: argparse.Namespace, num_classes: int, device: torch.device) -> DistillationLoss:
    """The training loss: soft-target, label-smoothing or plain cross-entropy, with the teacher when distilling."""
    if mixup_active(args):
        base_criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is folded into the mixup targets
    elif args.smoothing:
        base_criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base_criterion = nn.CrossEntropyLoss()
    teacher = None
    if args.distillation_type != "none" and not args.eval:
        teacher = build_teacher(args, num_classes, device)
    return DistillationLoss(
        base_criterion, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau
    )


def resumes_training(ckpt: dict[str, Any]) -> bool:
    """Whether a ``--resume`` checkpoint holds a training state (optimizer and epoch), not only weights."""
    return ckpt.get("optimizer") is not None and "epoch" in ckpt


def check_epochs_left(start_epoch: int, epochs: int, why: str) -> None:
    """Raises a ``UserError`` when training would start at or after ``--epochs`` (nothing to train).

    Args:
        start_epoch: The first epoch to train.
        epochs: ``--epochs``.
        why: The start of the message: where ``start_epoch`` comes from and how it compares with ``--epochs``.
    """
    if start_epoch < epochs:
        return
    raise UserError(
        f"{why}: nothing to train; raise --epochs above {start_epoch} to train on, or add --eval to only evaluate"
    )


def check_start_epoch(args: argparse.Namespace, ckpt: dict[str, Any] | None) -> None:
    """Raises a ``UserError`` when the run has nothing to train (checked before the data and the model are built).

    Training starts at the epoch after a ``--resume`` checkpoint's training state, else at ``--start_epoch``; a
    ``--resume`` checkpoint of weights only is one warning line, as the run then starts over.
    """
    if args.eval:
        return
    if ckpt is not None and not resumes_training(ckpt):
        missing = "epoch" if ckpt.get("optimizer") is not None else "optimizer state"
        _logger.warning(
            f"{args.resume} has no {missing}, so training does not resume: its weights are loaded, and training "
            f"starts at epoch {args.start_epoch} (--start_epoch) with a fresh optimizer and learning-rate schedule"
        )
    if ckpt is None or not resumes_training(ckpt):
        why = f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs} (epochs 0 to {args.epochs - 1})"
        check_epochs_left(args.start_epoch, args.epochs, why)
        return
    epoch = int(ckpt["epoch"])
    place = "the last" if epoch == args.epochs - 1 else f"past the last (epoch {args.epochs - 1})"
    why = f"--resume {args.resume} holds epoch {epoch}, {place} of --epochs {args.epochs}"
    check_epochs_left(epoch + 1, args.epochs, why)


def resume_from(
    args: argparse.Namespace, ckpt: dict[str, Any], built: RunModels, optim: Optimization, output_dir: Path | None
) -> float:
    """Loads the ``--resume`` weights and, when training, the optimizer, schedule, EMA, scaler and epoch.

    Sets ``args.start_epoch`` to the epoch after the checkpoint's. Resuming into the folder the checkpoint is in
    first repairs what a kill left there (:func:`reconcile_outputs`).

    Returns:
        The max_accuracy to continue with (0 for ``--eval`` or a weights-only checkpoint).

    Raises:
        models.CheckpointError: the checkpoint's model, EMA or optimizer state does not fit.
    """
    models.load_state_dict(built.model, ckpt["model"], args.resume, name=args.model)
    if args.eval:
        return 0.0
    if not resumes_training(ckpt):  # check_start_epoch said so
        return 0.0
    load_optimizer_state(optim.optimizer, ckpt["optimizer"], args.resume, args)
    if ckpt.get("lr_scheduler"):
        optim.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    args.start_epoch = int(ckpt["epoch"]) + 1
    if built.model_ema is not None and ckpt.get("model_ema"):
        models.load_state_dict(built.model_ema.module, ckpt["model_ema"], f"{args.resume} (model_ema)", name=args.model)
    if optim.loss_scaler is not None and ckpt.get("scaler"):
        optim.loss_scaler.load_state_dict(ckpt["scaler"])
    max_accuracy = float(ckpt.get("max_accuracy", 0.0))
    if output_dir is not None and utils.is_main_process() and _same_file(Path(args.resume).parent, output_dir):
        max_accuracy = reconcile_outputs(output_dir, ckpt, Path(args.resume))  # after a kill, see above
    _logger.info(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}")
    return max_accuracy


def evaluate_model(args: argparse.Namespace, run: Run, data: Data, built: RunModels) -> dict[str, float]:
    """One pass over the validation set (sharded over the ranks with ``--dist-eval``); logs the top-1 accuracy."""
    sync = args.dist_eval or not args.distributed  # without --dist-eval every rank evaluates the whole set
    stats = evaluate(data.loader_val, built.run_model, run.device, run.amp_dtype, args.print_freq, sync=sync)
    _logger.info(f"Accuracy of the network on the {data.num_val} test images: {stats['acc1']:.1f}%")
    return stats


def train(
    args: argparse.Namespace,
    resolved: argparse.Namespace,
    run: Run,
    data: Data,
    built: RunModels,
    optim: Optimization,
    max_accuracy: float,
) -> dict[str, Any]:
    """Trains from ``args.start_epoch`` to ``args.epochs``, evaluating and saving (rank 0) after every epoch.

    Returns:
        The last evaluation statistics and ``max_accuracy``.
    """
    tb = TensorBoardLogger(args.log_dir or args.output_dir, args.tb_log_freq, len(data.loader_train), run.output_dir)
    _logger.info(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    test_stats: dict[str, float] = {}
    try:
        for epoch in range(args.start_epoch, args.epochs):
            if hasattr(data.sampler_train, "set_epoch"):
                data.sampler_train.set_epoch(epoch)
            optim.lr_scheduler.step(epoch)  # epoch e trains at lr(e), also right after a resume
            tb.epoch = epoch
            train_stats = train_one_epoch(
                built.run_model,
                optim.criterion,
                data.loader_train,
                optim.optimizer,
                run.device,
                epoch,
                optim.loss_scaler,
                amp_dtype=run.amp_dtype,
                max_norm=args.clip_grad,
                model_ema=built.model_ema,
                mixup_fn=data.mixup_fn,
                print_freq=args.print_freq,
                step_hook=tb.step,
            )
            test_stats = evaluate_model(args, run, data, built)
            first_best = run.output_dir is not None and not (run.output_dir / "best_checkpoint.pth").exists()
            improved = test_stats["acc1"] > max_accuracy or first_best  # a best checkpoint exists even at 0%
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            _logger.info(f"Max accuracy: {max_accuracy:.2f}%")
            log_stats = {
                **{f"train_{k}": v for k, v in train_stats.items()},
                **{f"test_{k}": v for k, v in test_stats.items()},
                "epoch": epoch,
                "n_parameters": built.n_parameters,
                "max_accuracy": max_accuracy,
            }
            tb.epoch_end(epoch, log_stats)
            if run.output_dir is not None and utils.is_main_process():
                state = epoch_checkpoint(epoch, built, optim, max_accuracy, test_stats["acc1"], resolved)
                save_epoch_outputs(run.output_dir, state, log_stats, improved)  # crash-safe order, see above
    finally:
        tb.close()
    _logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return {**test_stats, "max_accuracy": max_accuracy}


def epoch_checkpoint(
    epoch: int, built: RunModels, optim: Optimization, max_accuracy: float, acc1: float, resolved: argparse.Namespace
) -> dict[str, Any]:
    """What ``checkpoint.pth`` holds after ``epoch``: DeiT's entries (plain data only) plus ``test_acc1``."""
    return {
        "model": built.model.state_dict(),
        "optimizer": optim.optimizer.state_dict(),
        "lr_scheduler": utils.to_plain(optim.lr_scheduler.state_dict()),
        "epoch": epoch,
        "model_ema": built.model_ema.module.state_dict() if built.model_ema is not None else None,
        "scaler": scaler_state(optim.loss_scaler),
        "max_accuracy": max_accuracy,
        "test_acc1": acc1,  # tells reconcile_outputs whether this epoch is the best
        "args": utils.to_plain(resolved),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Runs training (with evaluation after every epoch) or, with ``--eval``, one evaluation.

    Returns:
        The last evaluation statistics (and ``max_accuracy`` when training).
    """
    utils.setup_logging()
    resolved = argparse.Namespace(**vars(args))  # the flags as given, for args.yaml and checkpoints
    run = setup_run(args, resolved)
    resume_ckpt, finetune_state = read_checkpoints(args)
    if resume_ckpt is not None:  # without one, validate_args checked --start_epoch
        check_start_epoch(args, resume_ckpt)
    data = build_data(args)
    built = build_models(args, run.device, data.num_classes, finetune_state)
    optim = build_optimization(args, built.model, run, data.num_classes)
    max_accuracy = resume_from(args, resume_ckpt, built, optim, run.output_dir) if resume_ckpt is not None else 0.0
    del resume_ckpt, finetune_state  # loaded: do not keep a second copy of the weights through training
    if args.eval:
        return evaluate_model(args, run, data, built)
    return train(args, resolved, run, data, built, optim, max_accuracy)


def cli(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: runs ``main`` and turns errors into one ``error: ...`` line and an exit code.

    Exit code 2 for what the user can fix (``UserError``, which ``models.CheckpointError`` is), 1 for a run that
    cannot go on (``TrainingError``).
    """
    try:
        args = parse_args(argv)
        main(args)  # validates the flags first, then creates --output_dir (rank 0)
        return 0
    except UserError as e:
        utils.eprint(f"error: {utils.user_message(e)}")
        return 2
    except TrainingError as e:
        utils.eprint(f"error: {e}")
        return 1
    finally:
        if utils.is_dist_avail_and_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
