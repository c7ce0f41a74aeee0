"""Train and evaluate DeiT / iRPE image classifiers (DeiT's ``main.py``, device-agnostic and resumable).

Flags keep DeiT's names and defaults; ``--config FILE.yaml`` supplies defaults (the command line wins), and the
resolved flags are written to ``<output_dir>/args.yaml``. AMP is on by default on CUDA (float16 with loss scaling,
as DeiT) and off on CPU. The scheduler is stepped to ``epoch`` at the *start* of each epoch, so epoch ``e`` trains at
``lr(e)`` whether or not the run was resumed (DeiT's trained at ``lr(e - 1)``). Errors the user can fix print
``error: ...`` and exit with code 2; a non-finite loss exits with code 1.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default, and on shared cores (DataLoader workers, other jobs) a thread that lost its
# core stalls every parallel region: a CPU epoch of the demo recipe took 265 s instead of 19 s beside two busy
# processes (tools/benchmark_cpu_sharing.py). OpenMP reads the variable when torch loads it; the user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import datetime
import difflib
import itertools
import json
import logging
import math
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, NoReturn

import timm
import torch
import torch.distributed as dist
import yaml
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV2, NativeScaler, random_seed
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torch.utils.tensorboard.summary import scalar

import models
import rpe_models  # noqa: F401  (registers the iRPE models in timm's registry: timm.create_model finds them by name)
import utils
from datasets import DATA_SETS, build_dataset
from engine import evaluate, train_one_epoch
from irpe_attention import ATTN_IMPLS
from losses import DISTILLATION_TYPES, DistillationLoss
from rpe_vision_transformer import IRPESpec, add_irpe
from samplers import RASampler, ShardedEvalSampler
from utils import TrainingError, UserError

_logger = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INAT_CATEGORIES = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name")
# What timm 1.0's create_scheduler_v2 builds (timm has no list) but 'none': the training loop steps a scheduler.
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant")
MAX_PATCHES = 4096  # 64 x 64: attention maps grow with its square, 64 MiB per head and image at 4096 patches


# Arguments: argparse types check every value (those of --config too), so a bad one is one `error:` line


def _number(kind: type, want: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` when it is finite and ``ok``, else an error saying it is not ``want``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {want}")
        return value

    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
finite_float = _number(float, "a finite number", lambda v: True)
non_negative_float = _number(float, "a finite number >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
probability = _number(float, "a probability in [0, 1]", lambda v: 0 <= v <= 1)
rate = _number(float, "a rate in [0, 1) (1 would leave nothing)", lambda v: 0 <= v < 1)  # dropout, smoothing


def optimizer_name(text: str) -> str:
    """argparse type of ``--opt``: a name timm's ``create_optimizer`` knows (``lookahead_<name>`` included)."""
    known = timm.optim.list_optimizers()
    parts = text.lower().split("_")
    if parts[-1] in known and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "lookahead")):
        return text
    close = ", ".join(difflib.get_close_matches(parts[-1], known, n=4, cutoff=0.6))
    raise argparse.ArgumentTypeError(
        f"unknown optimizer {text!r}: {f'did you mean {close}? ' if close else ''}see timm.optim.list_optimizers() "
        "(DeiT: adamw; 'lookahead_<name>' wraps one in Lookahead)"
    )


def irpe_spec(text: str) -> str:
    """argparse type of ``--irpe``: the canonical text of an ``IRPESpec`` (``''``: no iRPE), or what is wrong."""
    if not text:
        return text
    try:
        return str(IRPESpec.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """DeiT's flags (same names and defaults) plus config, AMP, compile and logging flags; built with
    ``add_help=False`` so that ``run_with_submitit.py`` can reuse it through ``parents=[...]``."""
    parser = argparse.ArgumentParser("DeiT training and evaluation script", add_help=add_help)
    parser.add_argument("--config", default="", metavar="FILE.yaml", help="YAML file of flag defaults (CLI wins)")
    parser.add_argument("--batch-size", default=64, type=positive_int, help="batch size per process")
    parser.add_argument("--epochs", default=300, type=positive_int, help="to only evaluate, use --eval")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL", help="timm model name")
    g.add_argument("--pretrained", action="store_true", help="start from the released weights of --model")
    g.add_argument("--input-size", default=224, type=positive_int, help="image size (the model is built at it)")
    g.add_argument("--drop", type=rate, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", type=rate, default=0.1, metavar="PCT", help="drop path (stochastic depth) rate")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--model-ema-decay", type=probability, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS, help="attention of --model and --irpe")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--irpe",
        default="",
        type=irpe_spec,
        metavar="METHOD,MODE,ON",
        help="iRPE (zero tables) in every block of a timm ViT --model, e.g. a --pretrained one: METHOD euc|quant|cross|"
        "product, MODE ctx|bias, ON any of q, k, v, then optionally ratio=R, shared_head=false (e.g. product,ctx,qkv)",
    )

    g = parser.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=optimizer_name, metavar="OPTIMIZER")
    g.add_argument("--opt-eps", default=1e-8, type=non_negative_float, metavar="EPSILON")
    g.add_argument("--opt-betas", default=None, type=finite_float, nargs="+", metavar="BETA")
    g.add_argument("--clip-grad", type=positive_float, default=None, metavar="NORM", help="clip gradient norm")
    g.add_argument("--momentum", type=non_negative_float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05)

    g = parser.add_argument_group("learning rate schedule")
    g.add_argument("--sched", default="cosine", choices=SCHEDULERS, metavar="SCHEDULER", help=", ".join(SCHEDULERS))
    g.add_argument("--lr", type=non_negative_float, default=5e-4, metavar="LR", help="for a total batch of 512")
    g.add_argument("--lr-noise", type=finite_float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", type=finite_float, default=0.67, metavar="PERCENT")
    g.add_argument("--lr-noise-std", type=finite_float, default=1.0, metavar="STDDEV")
    g.add_argument("--warmup-lr", type=non_negative_float, default=1e-6, metavar="LR")
    g.add_argument("--min-lr", type=non_negative_float, default=1e-5, metavar="LR")
    g.add_argument("--decay-epochs", type=positive_float, default=30, metavar="N")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=5, metavar="N")
    g.add_argument("--cooldown-epochs", type=non_negative_int, default=10, metavar="N")
    g.add_argument("--patience-epochs", type=non_negative_int, default=10, metavar="N")
    g.add_argument("--decay-rate", "--dr", type=non_negative_float, default=0.1, metavar="RATE")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=non_negative_float, default=0.4, metavar="PCT")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME", help="AutoAugment policy; none")
    g.add_argument("--smoothing", type=rate, default=0.1, help="label smoothing")
    g.add_argument("--train-interpolation", type=str, default="bicubic", help="random, bilinear or bicubic")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--load-tar", action="store_true", help="read <data-path>/train.tar and val.tar in place")

    g = parser.add_argument_group("augmentation: random erase")
    g.add_argument("--reprob", type=probability, default=0.25, metavar="PCT")
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=non_negative_int, default=1)
    g.add_argument("--resplit", action="store_true", default=False, help="accepted for compatibility (no effect)")

    g = parser.add_argument_group("mixup")
    g.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=finite_float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"))

    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    g.add_argument("--teacher-path", type=str, default="")
    g.add_argument("--distillation-type", default="none", choices=DISTILLATION_TYPES, type=str)
    g.add_argument("--distillation-alpha", default=0.5, type=probability)
    g.add_argument("--distillation-tau", default=1.0, type=positive_float)
    g.add_argument("--finetune", default="", help="start from this checkpoint (file or URL; head and pos. reset)")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", default=None, type=str, help="dataset root")
    g.add_argument("--data-set", default="IMNET", choices=DATA_SETS, type=str)
    g.add_argument("--inat-category", default="name", choices=INAT_CATEGORIES, type=str)
    g.add_argument("--num_workers", default=10, type=non_negative_int, help="0: load in the main process")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True, help="pin loader memory")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="where to save checkpoints and logs (nothing saved if empty)")
    g.add_argument("--log-dir", default="", help="TensorBoard directory (default: output_dir)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    g.add_argument("--seed", default=0, type=non_negative_int)
    g.add_argument("--resume", default="", help="resume from this checkpoint (file or URL)")
    g.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N")
    g.add_argument("--eval", action="store_true", help="only evaluate")
    g.add_argument("--eval-random-init", action="store_true", help="allow --eval of randomly initialized weights")
    g.add_argument("--dist-eval", action=argparse.BooleanOptionalAction, default=True, help="exact sharded eval")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA only")
    g.add_argument("--amp-dtype", default=None, choices=tuple(AMP_DTYPES), help="default: float16 CUDA, bfloat16 CPU")
    g.add_argument("--print-freq", default=10, type=positive_int, help="progress line every N steps")
    g.add_argument("--tb-log-freq", default=10, type=positive_int, help="TensorBoard train loss/lr every N steps")
    g.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    # torch.distributed.launch without --use_env passes --local-rank; the rank is read from the environment anyway.
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors raise ``UserError``, so that ``cli`` prints one ``error:`` line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows the default of every flag, also of those without a help text (most of DeiT's)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def config_tokens(config: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """The command-line tokens that give the flags of ``parser`` the values of a YAML mapping (keys: flag names), for
    argparse to check: a switch takes true/false (``--x``/``--no-x``), a list gives several values, null the default.
    Keys that are not flags (all named) and a switch that is not true/false are a ``UserError``."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(str(key) for key in config if str(key).replace("-", "_") not in actions)
    if unknown:
        raise UserError(f"unknown key(s): {', '.join(unknown)}")
    tokens = []
    for key, value in config.items():
        action = actions[str(key).replace("-", "_")]
        flag = action.option_strings[0]
        if value is None:
            continue
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise UserError(f"key {key!r}: expected true or false, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else action.option_strings[1])
            elif value:
                tokens.append(flag)
        elif action.nargs in ("+", "*"):
            tokens += [flag, *map(_yaml_text, value if isinstance(value, list) else [value])]
        else:
            tokens.append(f"{flag}={_yaml_text(value)}")
    return tokens


def _yaml_text(value: Any) -> str:
    """A YAML scalar as the command line spells it (``true``, not Python's ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_config(path: str) -> dict[str, Any]:
    """The flag values of a ``--config`` YAML file, checked by argparse as on the command line (else a ``UserError``,
    as for a missing, unreadable or malformed file)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(config, dict):
        raise UserError(f"config {path} must be a mapping of flag: value")
    parser = ArgumentParser(parents=[get_args_parser()])
    try:
        given = vars(parser.parse_args(config_tokens(config, parser)))
    except UserError as e:
        raise UserError(f"config {path}: {e}") from None
    return {dest: given[dest] for dest in (str(key).replace("-", "_") for key in config)}


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parses ``argv`` with ``parser`` (default: main.py's; run_with_submitit.py's holds more flags), taking defaults
    from ``--config`` (the command line wins)."""
    parser = parser or ArgumentParser(
        "DeiT training and evaluation script", parents=[get_args_parser()], formatter_class=DefaultsHelpFormatter
    )
    config = parser.parse_known_args(argv)[0].config  # also checks the command line's values
    if config:
        parser.set_defaults(**load_config(config))
    return parser.parse_args(argv)


# What argparse cannot check (device, model, folders, combinations), checked before any data or process group


def resolve_amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for float32: AMP defaults to on for CUDA (float16) and off for CPU (bfloat16)."""
    if not (args.amp if args.amp is not None else device.type == "cuda"):
        return None
    return AMP_DTYPES[args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")]


def check_model_name(name: str) -> None:
    """Raises a ``UserError`` suggesting close registered names when ``name`` is not a timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown model {name!r}{hint}")


def model_patch_size(model: nn.Module | None, name: str) -> int | None:
    """The (square) patch size of a ViT-like model, else the ``patch<N>`` of its name, else None."""
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps:
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else None


def check_input_size(args: argparse.Namespace, patch: int | None) -> None:
    """Raises a ``UserError`` unless ``--input-size`` is a positive multiple of ``patch`` within MAX_PATCHES."""
    size = args.input_size
    if patch and (size < patch or size % patch):
        sizes = [str(n) for n in (size // patch * patch, (size // patch + 1) * patch) if n]
        raise UserError(
            f"--input-size {size} is not divisible by the patch size {patch} of {args.model} (try {' or '.join(sizes)})"
        )
    if patch and (size // patch) ** 2 > MAX_PATCHES:
        raise UserError(
            f"--input-size {size}: {(size // patch) ** 2} patches of {patch} px; at most {MAX_PATCHES} "
            f"({int(MAX_PATCHES**0.5) * patch} px) are supported, as attention memory grows with the square of the "
            "patch count"
        )


def apply_irpe(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``add_irpe`` with the encodings of ``--irpe``; a model it cannot take is a ``UserError``."""
    try:
        return add_irpe(model, **asdict(IRPESpec.parse(args.irpe)), attn_impl=args.attn_impl)
    except ValueError as e:
        raise UserError(f"--irpe {args.irpe} with --model {args.model}: {e}") from None


def validate_args(args: argparse.Namespace) -> torch.device:
    """Checks what argparse cannot, before anything is built, and returns the ``--device``. ``--model`` is built on the
    meta device (no memory) for its patch size and ``--irpe``; one that cannot be is left to ``build_model``."""
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"invalid --device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no CUDA GPU is visible; use --device cpu")
    check_model_name(args.model)
    try:
        with torch.device("meta"):
            model = timm.create_model(args.model, pretrained=False)
    except Exception:  # noqa: BLE001  (anything build_model would meet again and report)
        model = None
    if model is not None and getattr(model, "patch_embed", None) is None:
        raise UserError(
            f"--model {args.model} is not a ViT-style model: only models with a patch embedding are supported (DeiT, "
            "ViT and the iRPE models, e.g. deit_small_patch16_224_ctx_product_50_shared_k); --teacher-model may be a "
            "CNN"
        )
    check_input_size(args, model_patch_size(model, args.model))
    if args.irpe and model is not None:
        apply_irpe(model, args)
    for flag, path in (("--output_dir", args.output_dir), ("--log-dir", args.log_dir)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file, not a directory: pick another path")
    check_output_dir_unused(args)
    if args.eval and not (args.resume or args.pretrained or args.eval_random_init):
        raise UserError(
            "--eval without --resume or --pretrained would evaluate randomly initialized weights"
            f"{' (--finetune is not applied with --eval)' if args.finetune else ''}: pass --resume CHECKPOINT or "
            "--pretrained, or --eval-random-init if that is what you want"
        )
    if args.attn_impl == "flex" and not args.eval and device.type == "cpu":
        raise UserError(
            "--attn-impl flex cannot train on CPU (PyTorch's FlexAttention has no CPU backward): use auto, ops, sdpa "
            "or math on CPU; flex works on CPU for --eval only"
        )
    return device


def check_start_epoch(args: argparse.Namespace, ckpt: dict[str, Any] | None) -> bool:
    """Whether training resumes the ``--resume`` training state (optimizer and epoch), else it starts at
    ``--start_epoch`` (a warning for a checkpoint of weights only); a ``UserError`` when nothing is left to train."""
    if args.eval:
        return False
    resumes = ckpt is not None and ckpt.get("optimizer") is not None and "epoch" in ckpt
    if resumes:
        epoch = int(ckpt["epoch"])  # type: ignore[index]
        place = "the last" if epoch == args.epochs - 1 else f"past the last (epoch {args.epochs - 1})"
        start, why = epoch + 1, f"--resume {args.resume} holds epoch {epoch}, {place} of --epochs {args.epochs}"
    else:
        if ckpt is not None:
            _logger.warning(
                f"{args.resume} has no {'epoch' if ckpt.get('optimizer') is not None else 'optimizer state'}, so "
                "training does not resume: its weights are loaded, and training starts at epoch "
                f"{args.start_epoch} (--start_epoch) with a fresh optimizer and learning-rate schedule"
            )
        start = args.start_epoch
        why = f"--start_epoch {start} is not below --epochs {args.epochs} (epochs 0 to {args.epochs - 1})"
    if start >= args.epochs:
        raise UserError(
            f"{why}: nothing to train; raise --epochs above {start} to train on, or add --eval to only evaluate"
        )
    return resumes


# Checkpoints, model, data


def read_checkpoints(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """The ``--resume`` checkpoint and the ``--finetune`` weights (not with ``--eval``), each None when not given; the
    entries ``main`` reads are checked, and the checkpoint's ``--irpe`` must be this run's (the model is rebuilt)."""
    finetune = None
    if args.finetune and not args.eval:
        finetune = models.checkpoint_state_dict(models.load_checkpoint(args.finetune, refresh=True), args.finetune)
    if not args.resume:
        return None, finetune
    ckpt = models.load_checkpoint(args.resume, refresh=True)
    models.checkpoint_state_dict(ckpt, args.resume, required=True)
    if ckpt.get("model_ema") is not None:
        models.checkpoint_state_dict(ckpt, args.resume, "model_ema")
    epoch, acc = ckpt.get("epoch"), ckpt.get("max_accuracy", 0.0)
    if "epoch" in ckpt and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise models.CheckpointError(f"checkpoint {args.resume}: 'epoch' must be a non-negative integer, got {epoch!r}")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        raise models.CheckpointError(f"checkpoint {args.resume}: 'max_accuracy' must be a number, got {acc!r}")
    saved = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else ckpt.get("args")
    if isinstance(saved, dict) and isinstance(saved.get("irpe"), str) and saved["irpe"] != args.irpe:
        want = f"--irpe {saved['irpe']}" if saved["irpe"] else "no --irpe"
        given = f"--irpe {args.irpe}" if args.irpe else "no --irpe"
        raise UserError(f"checkpoint {args.resume} was trained with {want}, this run has {given}: pass {want}")
    return ckpt, finetune


def build_model(args: argparse.Namespace, num_classes: int, finetune: dict[str, torch.Tensor] | None) -> nn.Module:
    """Creates ``args.model`` with timm at ``args.input_size``, with its ``--pretrained`` weights (timm's loader),
    then the ``--irpe`` tables (at zero) and the ``--finetune`` weights (adapted to the model)."""
    _logger.info(f"Creating model: {args.model}")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.attn_impl != "auto" and not args.irpe:
        kwargs["attn_impl"] = args.attn_impl
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, img_size=args.input_size, **kwargs)
    except (OSError, RuntimeError, TypeError, ValueError) as e:
        if "attn_impl" in str(e) and not isinstance(e, models.CheckpointError):
            raise UserError(f"model {args.model} does not support --attn-impl {args.attn_impl}: {e}") from None
        if not args.pretrained:
            raise
        reason = str(e) if isinstance(e, models.CheckpointError) else f"{type(e).__name__}: {e}"
        raise models.CheckpointError(f"cannot load pretrained weights of {args.model}: {reason}") from None
    check_input_size(args, model_patch_size(model, args.model))
    if args.irpe:
        apply_irpe(model, args)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # timm's distilled DeiT returns (cls, dist) logits in train mode
    if finetune is not None:
        if args.distillation_type != "none":
            raise UserError("finetuning with distillation is not supported")
        skipped = models.load_state_dict(model, finetune, args.finetune, name=args.model, adapt=True, strict=False)
        _logger.info(f"Finetuning from {args.finetune}: {skipped}")
    return model


def load_training_state(optimizer: torch.optim.Optimizer, lr_scheduler: Any, ckpt: dict[str, Any], args: Any) -> None:
    """Loads the ``--resume`` optimizer and schedule; those of another model or optimizer are a ``CheckpointError``
    (``Optimizer.load_state_dict`` checks the parameter counts; the tensor shapes are checked here)."""
    why = (
        f"checkpoint {args.resume}: its optimizer state does not fit --opt {args.opt} on {args.model} (saved with "
        f"another model, --opt or parameter grouping?); to start from its weights only, use --finetune {args.resume}"
    )
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("lr_scheduler"):
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise models.CheckpointError(f"{why} ({type(e).__name__}: {e})") from None
    for param, param_state in optimizer.state.items():
        for key, buf in param_state.items():
            if isinstance(buf, torch.Tensor) and buf.dim() and buf.shape != param.shape:
                raise models.CheckpointError(f"{why} ({key} {tuple(buf.shape)} for a parameter {tuple(param.shape)})")


def build_criterion(args: argparse.Namespace, num_classes: int, device: torch.device, mixup: bool) -> DistillationLoss:
    """The loss: soft-target (after ``mixup``), label-smoothing or plain cross-entropy, and the distillation teacher
    (``--teacher-model`` with the ``--teacher-path`` weights, loaded strictly, frozen in eval mode)."""
    if mixup:
        base: nn.Module = SoftTargetCrossEntropy()  # smoothing is folded into the mixup targets
    else:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
    teacher = None
    if args.distillation_type != "none" and not args.eval:
        if not args.teacher_path:
            raise UserError("--distillation-type needs --teacher-path (teacher weights, file or URL)")
        check_model_name(args.teacher_model)
        _logger.info(f"Creating teacher model: {args.teacher_model}")
        teacher = timm.create_model(args.teacher_model, num_classes=num_classes, global_pool="avg")
        state = models.checkpoint_state_dict(models.load_checkpoint(args.teacher_path, refresh=True), args.teacher_path)
        models.load_state_dict(teacher, state, args.teacher_path, name=args.teacher_model)
        teacher = teacher.to(device).eval().requires_grad_(False)
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)


def build_data(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, Mixup | None, int]:
    """The training and validation loaders, the mixup of the labels (None when off) and the number of classes. The
    epoch-seeded training shuffle also runs in one process, so that a resumed run sees the same order."""
    dataset_train, num_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args, class_to_idx=getattr(dataset_train, "class_to_idx", None))
    _logger.info(f"data: {len(dataset_train)} train / {len(dataset_val)} val images, {num_classes} classes")
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed and args.repeated_aug:
        sampler_train: Any = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    dist_eval = args.distributed and args.dist_eval
    sampler_val = ShardedEvalSampler(dataset_val, world, rank) if dist_eval else SequentialSampler(dataset_val)
    pin = args.pin_mem and torch.cuda.is_available() and str(args.device).startswith("cuda")
    common = dict(num_workers=args.num_workers, pin_memory=pin, persistent_workers=args.num_workers > 0)
    loader_train = DataLoader(dataset_train, args.batch_size, sampler=sampler_train, drop_last=True, **common)
    loader_val = DataLoader(dataset_val, int(1.5 * args.batch_size), sampler=sampler_val, **common)
    if not args.eval and len(loader_train) == 0:
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler_train)} training images per process: "
            "no full batch (lower --batch-size)"
        )
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
    return loader_train, loader_val, mixup_fn, num_classes


# TensorBoard

_event_file_ids = itertools.count()  # two loggers of one process started in the same second write two files


class TensorBoardLogger:
    """Train loss/lr every ``every`` steps and the epoch metrics in a TensorBoard event file (rank 0; else a no-op).

    torch's ``SummaryWriter`` writes in a thread of its own, where a failed write (a full disk) prints a traceback and
    fails again later; here the caller writes, so a failed write is one ``UserError`` naming the file, and the records
    before it stay readable. Flushed at every epoch's end and at the first record ``flush_secs`` after a flush."""

    flush_secs = 120.0

    def __init__(self, log_dir: str, every: int, steps_per_epoch: int, output_dir: Path | None = None) -> None:
        self.every, self.steps_per_epoch, self.epoch = every, steps_per_epoch, 0
        self.output_dir = output_dir if output_dir is not None else Path(log_dir)
        self._file: IO[bytes] | None = None
        if not log_dir or not utils.is_main_process():
            return
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_event_file_ids)}"
        self.path = Path(log_dir) / f"events.out.tfevents.{stamp}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("xb")
            self._records = RecordWriter(self._file)
            self._records.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            self._file.flush()
        except OSError as e:
            self.close()
            intact = checkpoint_state(self.output_dir)
            raise write_error(Path(e.filename or self.path), e, self.output_dir, intact) from None
        self._last_flush = time.monotonic()

    def _write(self, scalars: dict[str, float], step: int, flush: bool = False) -> None:
        """Writes ``scalars`` at ``step``; a failed write closes the file and raises the ``UserError`` saying so."""
        try:
            for tag, value in scalars.items():
                event = Event(wall_time=time.time(), step=step, summary=scalar(tag, value))
                self._records.write(event.SerializeToString())
            if flush or time.monotonic() - self._last_flush >= self.flush_secs:
                self._last_flush = time.monotonic()
                self._file.flush()  # type: ignore[union-attr]
        except OSError as e:
            self.close()
            intact = f"the events written before are intact, {checkpoint_state(self.output_dir)}"
            raise write_error(self.path, e, self.output_dir, intact) from None

    def step(self, step: int, values: dict[str, float]) -> None:
        """Logs ``values`` as ``train/<name>`` every ``every`` steps of the epoch."""
        if self._file is not None and step % self.every == 0:
            self._write({f"train/{k}": v for k, v in values.items()}, self.epoch * self.steps_per_epoch + step)

    def epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        """Logs every numeric epoch statistic as ``epoch/<name>``, and flushes the file."""
        if self._file is not None:
            numbers = {f"epoch/{k}": v for k, v in stats.items() if k != "epoch" and isinstance(v, (int, float))}
            self._write(numbers, epoch, flush=True)

    def close(self) -> None:
        """Closes the event file; never raises, as it runs while another error may be on its way out."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # after a failed write, which was reported then
                self._file.close()
            self._file = None


# Outputs: the save order of an epoch, and the repair of a kill on resume
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
# Resuming from a checkpoint of the folder restores it (prepare_output_dir, reconcile_outputs); epoch c + 1 is then
# trained again, logged once, and replaces best_checkpoint.pth only if more accurate. A folder holds one run
# (check_output_dir_unused), so no log mixes the epochs of two runs.

OUTPUT_FILES = ("log.txt", "checkpoint.pth", "best_checkpoint.pth")  # what a folder that holds a run holds


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """checkpoint.pth, else best_checkpoint.pth (the only one after a kill in epoch 0's save), else None."""
    found = [output_dir / name for name in ("checkpoint.pth", "best_checkpoint.pth") if (output_dir / name).is_file()]
    return found[0] if found else None


def checkpoint_state(output_dir: Path) -> str:
    """What a failed write leaves of the run's checkpoints, for its error message."""
    ckpt_path = output_dir / "checkpoint.pth"
    return f"the previous {ckpt_path} is intact" if ckpt_path.exists() else "no checkpoint.pth was written yet"


def write_error(path: Path, err: OSError, output_dir: Path, intact: str) -> UserError:
    """The one-line error of a failed write: the file, the reason, what is ``intact``, and how the run goes on."""
    what = f"cannot write {path}: {err.strerror or err}; {intact}: free disk space, then"
    ckpt = resumable_checkpoint(output_dir)
    if ckpt is None:
        return UserError(f"{what} start the run again (no checkpoint was saved, so nothing can be resumed)")
    return UserError(f"{what} continue with --resume {ckpt}")


def _log_lines(path: Path) -> list[tuple[int, str]]:
    """The complete lines of a log.txt and their epochs (none when it is missing or unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]  # the last piece is not complete
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append((int(json.loads(line)["epoch"]), line))
    return out


def _in_folder(path: str, folder: Path) -> bool:
    """Whether the file ``path`` is in ``folder``."""
    return Path(path).parent.resolve() == folder.resolve()


def check_output_dir_unused(args: argparse.Namespace) -> None:
    """Refuses to train into an ``--output_dir`` that holds another run's log.txt or checkpoints (the two would mix)
    unless resuming from a checkpoint there; the error names what the folder holds and the two ways on."""
    if args.eval or not args.output_dir:
        return
    output_dir = Path(args.output_dir)
    held = [name for name in OUTPUT_FILES if (output_dir / name).is_file() and (output_dir / name).stat().st_size]
    if not held or (args.resume and _in_folder(args.resume, output_dir)):
        return
    epochs = [epoch for epoch, _ in _log_lines(output_dir / "log.txt")]  # every epoch saved is logged first
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


def prepare_output_dir(path: str, resolved: argparse.Namespace) -> Path | None:
    """Creates ``--output_dir`` (rank 0), deletes the temporary files of a killed save, and writes ``args.yaml``;
    returns the folder, or None when ``--output_dir`` is empty (nothing is saved)."""
    if not path:
        return None
    output_dir = Path(path)
    if utils.is_main_process():
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            for tmp in utils.remove_stale_temp_files(output_dir, (*OUTPUT_FILES, "args.yaml")):
                _logger.info(f"Removed {tmp}, left by a run killed while saving")
        except OSError as e:
            raise UserError(f"cannot prepare --output_dir {output_dir}: {e.strerror or e} ({e.filename})") from None
        try:  # the resolved flags, loadable again with --config
            flags = {k: v for k, v in utils.to_plain(resolved).items() if k != "config"}
            utils.atomic_write_text(output_dir / "args.yaml", yaml.safe_dump(flags, sort_keys=True))
        except OSError as e:
            kept = "the previous args.yaml is unchanged, " if (output_dir / "args.yaml").exists() else ""
            raise write_error(output_dir / "args.yaml", e, output_dir, kept + checkpoint_state(output_dir)) from None
    return output_dir


def save_epoch_outputs(output_dir: Path, state: dict[str, Any], log_stats: dict[str, Any], improved: bool) -> None:
    """Writes one epoch's best checkpoint (if ``improved``), log line and checkpoint in the order above (rank 0); a
    failed write (a full disk) is a ``UserError`` naming the file, what is intact and what to resume."""
    intact = checkpoint_state(output_dir)
    for name in ("best_checkpoint.pth", "log.txt", "checkpoint.pth")[0 if improved else 1 :]:
        try:
            if name == "log.txt":
                utils.append_line(output_dir / name, json.dumps(log_stats))
            else:
                utils.atomic_torch_save(state, output_dir / name)
        except OSError as e:
            previous = f"{name} is unchanged, " if name == "best_checkpoint.pth" else ""
            raise write_error(output_dir / name, e, output_dir, previous + intact) from None


def reconcile_outputs(output_dir: Path, epoch: int, max_accuracy: float) -> float:
    """Restores the invariant above after a kill, before resuming from the checkpoint of ``epoch`` (rank 0); returns
    max_accuracy, that of best_checkpoint.pth when a kill left it higher (so only better weights replace it)."""
    log = output_dir / "log.txt"
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    kept = [line for logged, line in _log_lines(log) if logged <= epoch]
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        utils.atomic_write_text(log, new_text)
        dropped = len(text.rstrip("\n").split("\n")) - len(kept)
        _logger.info(f"{log}: removed {dropped} line(s) of epochs after {epoch} or cut short by a kill")
    try:
        best = models.load_checkpoint_file(output_dir / "best_checkpoint.pth", mmap=True).get("max_accuracy")
    except Exception:  # noqa: BLE001  (missing or unreadable: the checkpoint's max_accuracy stands)
        return max_accuracy
    if not isinstance(best, (int, float)) or best <= max_accuracy:
        return max_accuracy
    _logger.info(f"best_checkpoint.pth holds {best:.2f}% (epoch {epoch + 1}), above the checkpoint's: kept")
    return float(best)


# Main


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Trains (evaluating and saving after every epoch) or, with ``--eval``, evaluates; returns the last evaluation's
    statistics. The flags are checked before the process group is created (one error line per rank, not a hang), and
    the checkpoints are read before the data and the model are built (a wrong file fails in seconds)."""
    utils.setup_logging()
    resolved = argparse.Namespace(**vars(args))  # the flags as given, for args.yaml and the checkpoints
    device = validate_args(args)
    utils.init_distributed_mode(args)
    amp_dtype = resolve_amp_dtype(args, device)
    _logger.info(f"device: {device}, world size: {utils.get_world_size()}, amp: {amp_dtype or 'off'}")
    random_seed(args.seed, utils.get_rank())
    torch.backends.cudnn.benchmark = device.type == "cuda"
    resume, finetune = read_checkpoints(args)
    resumes = check_start_epoch(args, resume)
    output_dir = prepare_output_dir(args.output_dir, resolved)

    loader_train, loader_val, mixup_fn, num_classes = build_data(args)
    model = build_model(args, num_classes, finetune).to(device)
    ema_device = "cpu" if args.model_ema_force_cpu else None
    model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device=ema_device) if args.model_ema else None
    run_model: nn.Module = torch.compile(model) if args.compile else model
    if args.distributed:
        run_model = nn.parallel.DistributedDataParallel(run_model, [args.gpu] if device.type == "cuda" else None)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info(f"number of params: {n_parameters}")

    opt_args = argparse.Namespace(**vars(args))
    opt_args.lr = args.lr * args.batch_size * utils.get_world_size() / 512.0  # DeiT's linear scaling rule
    _logger.info(f"lr: {args.lr} scaled to {opt_args.lr:.3e} (batch {args.batch_size} x {utils.get_world_size()})")
    try:
        optimizer = create_optimizer(opt_args, model)
    except (ImportError, AssertionError) as e:  # apex / bitsandbytes optimizers: package or CUDA missing
        raise UserError(f"--opt {args.opt} is not available here: {e}") from None
    lr_scheduler, _ = create_scheduler(opt_args, optimizer)
    loss_scaler = NativeScaler(device.type) if amp_dtype == torch.float16 else None
    criterion = build_criterion(args, num_classes, device, mixup=mixup_fn is not None)

    max_accuracy = 0.0
    if resume is not None:
        models.load_state_dict(model, resume["model"], args.resume, name=args.model)
    if resumes:
        load_training_state(optimizer, lr_scheduler, resume, args)
        if model_ema is not None and resume.get("model_ema"):
            models.load_state_dict(model_ema.module, resume["model_ema"], f"{args.resume} (model_ema)", name=args.model)
        if loss_scaler is not None and resume.get("scaler"):
            loss_scaler.load_state_dict(resume["scaler"])
        args.start_epoch = int(resume["epoch"]) + 1
        max_accuracy = float(resume.get("max_accuracy", 0.0))
        if output_dir is not None and utils.is_main_process() and _in_folder(args.resume, output_dir):
            max_accuracy = reconcile_outputs(output_dir, args.start_epoch - 1, max_accuracy)  # after a kill
        _logger.info(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}")
    del resume, finetune  # loaded: no second copy of the weights through training
    sync = args.dist_eval or not args.distributed  # without --dist-eval every rank evaluates the whole set
    if args.eval:
        return evaluate(loader_val, run_model, device, amp_dtype, args.print_freq, sync)

    tb = TensorBoardLogger(args.log_dir or args.output_dir, args.tb_log_freq, len(loader_train), output_dir)
    _logger.info(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    test_stats: dict[str, float] = {}
    try:
        for epoch in range(args.start_epoch, args.epochs):
            loader_train.sampler.set_epoch(epoch)  # type: ignore[union-attr]
            lr_scheduler.step(epoch)  # epoch e trains at lr(e), also right after a resume
            tb.epoch = epoch
            train_stats = train_one_epoch(
                run_model,
                criterion,
                loader_train,
                optimizer,
                device,
                epoch,
                loss_scaler,
                amp_dtype=amp_dtype,
                max_norm=args.clip_grad,
                model_ema=model_ema,
                mixup_fn=mixup_fn,
                print_freq=args.print_freq,
                step_hook=tb.step,
            )
            test_stats = evaluate(loader_val, run_model, device, amp_dtype, args.print_freq, sync)
            first_best = output_dir is not None and not (output_dir / "best_checkpoint.pth").exists()
            improved = test_stats["acc1"] > max_accuracy or first_best  # a best checkpoint exists even at 0%
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            _logger.info(f"Max accuracy: {max_accuracy:.2f}%")
            log_stats = {
                **{f"train_{k}": v for k, v in train_stats.items()},
                **{f"test_{k}": v for k, v in test_stats.items()},
                "epoch": epoch,
                "n_parameters": n_parameters,
                "max_accuracy": max_accuracy,
            }
            tb.epoch_end(epoch, log_stats)
            if output_dir is not None and utils.is_main_process():
                state = {  # DeiT's entries, as plain data
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": utils.to_plain(lr_scheduler.state_dict()),
                    "epoch": epoch,
                    "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                    # DeiT's resume loads it into an enabled GradScaler, which refuses None and {}
                    "scaler": (loss_scaler or NativeScaler("cpu")).state_dict(),
                    "max_accuracy": max_accuracy,
                    "args": utils.to_plain(resolved),
                }
                save_epoch_outputs(output_dir, state, log_stats, improved)  # crash-safe order, see above
    finally:
        tb.close()
    _logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return {**test_stats, "max_accuracy": max_accuracy}


def cli(argv: Sequence[str] | None = None) -> int:
    """Runs ``main`` and turns errors into one ``error: ...`` line and an exit code: 2 for what the user can fix
    (``UserError``, which ``models.CheckpointError`` is), 1 for a run that cannot go on (``TrainingError``)."""
    try:
        main(parse_args(argv))
        return 0
    except (UserError, TrainingError) as e:
        utils.eprint(f"error: {utils.user_message(e)}")
        return 2 if isinstance(e, UserError) else 1
    finally:
        if utils.is_dist_avail_and_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
