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

import argparse
import copy
import datetime
import difflib
import json
import os
import random
import re
import sys
import time
from collections.abc import Sequence
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

import models  # noqa: F401  (registers the DeiT baselines)
import rpe_models  # noqa: F401  (registers the iRPE models in timm's registry)
import utils
from datasets import DATA_SETS, build_dataset
from engine import evaluate, train_one_epoch
from losses import DISTILLATION_TYPES, DistillationLoss
from samplers import RASampler, ShardedEvalSampler
from utils import TrainingError, UserError

AMP_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INAT_CATEGORIES = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name")


# ----------------------------------------------------------------------------------------------------------------
# Arguments


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
        choices=("auto", "math", "sdpa", "flex", "ops"),
        help="attention implementation, passed to models that accept `attn_impl` (auto: the model's choice)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

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


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """Checks a YAML value against the flag's choices and converts it like the flag's ``type`` would."""
    if value is None:
        return None
    if action.nargs in ("+", "*") and not isinstance(value, list):
        value = [value]
    if action.type is not None and not isinstance(action, argparse.BooleanOptionalAction):
        try:
            value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
        except (TypeError, ValueError) as e:
            raise UserError(f"config key {key!r}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Reads flag defaults from a YAML mapping; keys are flag names with ``-`` or ``_``.

    Raises:
        UserError: if the file is missing or malformed, or holds keys that are not flags (all named).
    """
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse config {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of flag: value")
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest != "help":
            actions.setdefault(a.dest, a)
    unknown = sorted(k for k in data if str(k).replace("-", "_") not in actions or k == "config")
    if unknown:
        raise UserError(f"unknown key(s) in config {path}: {', '.join(map(str, unknown))}")
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
    """Writes the resolved flags as YAML (loadable again with ``--config``)."""
    data = {k: v for k, v in utils.to_plain(args).items() if k != "config"}
    path.write_text(yaml.safe_dump(data, sort_keys=True), encoding="utf-8")


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


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """Creates ``args.model`` with timm at ``args.input_size``.

    Raises:
        UserError: unknown name, bad input size, ``--attn-impl`` unsupported, pretrained weights unavailable.
    """
    check_model_name(args.model)
    check_input_size(args.input_size, _patch_size_from_name(args.model), args.model)
    kwargs: dict[str, Any] = dict(
        pretrained=args.pretrained,
        num_classes=num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        img_size=args.input_size,
    )
    if args.attn_impl != "auto":
        kwargs["attn_impl"] = args.attn_impl
    try:
        model = timm.create_model(args.model, **kwargs)
    except (TypeError, ValueError) as e:
        if "attn_impl" in str(e):
            raise UserError(f"model {args.model} does not support --attn-impl {args.attn_impl}: {e}") from None
        if not args.pretrained:
            raise
        raise UserError(f"cannot load pretrained weights of {args.model}: {type(e).__name__}: {e}") from None
    except (OSError, RuntimeError) as e:
        if not args.pretrained:
            raise
        raise UserError(f"cannot load pretrained weights of {args.model}: {type(e).__name__}: {e}") from None
    check_input_size(args.input_size, model_patch_size(model), args.model)
    return model


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_model_state(model: nn.Module, state_dict: dict[str, Any], source: str, model_name: str) -> None:
    """Loads ``state_dict`` strictly, or raises a ``UserError`` listing missing/unexpected/mismatched keys."""
    state_dict = _strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = [f"checkpoint {source} does not match model {model_name} (is it from another model?)"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches (checkpoint vs model): {show(mismatched)}")
        raise UserError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_finetune_weights(model: nn.Module, source: str) -> None:
    """Loads a checkpoint for finetuning: drops a head of another class count and resizes the position embedding."""
    ckpt = utils.load_checkpoint(source)
    state_dict = _strip_prefixes(ckpt.get("model", ckpt))
    own = model.state_dict()
    for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if k in state_dict and k in own and state_dict[k].shape != own[k].shape:
            print(f"Removing key {k} from pretrained checkpoint")
            del state_dict[k]
    if "pos_embed" in state_dict and "pos_embed" in own and state_dict["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        num_prefix = int(getattr(model, "num_prefix_tokens", 1 + int(getattr(model, "dist_token", None) is not None)))
        grid = getattr(model.patch_embed, "grid_size", None)
        new_size = list(grid) if grid is not None else [int((own["pos_embed"].shape[1] - num_prefix) ** 0.5)] * 2
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"], new_size=new_size, num_prefix_tokens=num_prefix
        )
    result = model.load_state_dict(state_dict, strict=False)
    print(f"Finetuning from {source}: {result}")


def build_teacher(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    """Creates and loads the frozen distillation teacher."""
    if not args.teacher_path:
        raise UserError("--distillation-type needs --teacher-path (teacher weights, file or URL)")
    check_model_name(args.teacher_model)
    print(f"Creating teacher model: {args.teacher_model}")
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes, global_pool="avg")
    ckpt = utils.load_checkpoint(args.teacher_path)
    load_model_state(teacher, ckpt.get("model", ckpt), args.teacher_path, args.teacher_model)
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
    """Writes per-step train loss/lr and per-epoch metrics to TensorBoard (rank 0 only; no-op elsewhere)."""

    def __init__(self, log_dir: str, every: int, steps_per_epoch: int) -> None:
        self.writer = None
        self.every = max(int(every), 1)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        if log_dir and utils.is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def step(self, step: int, values: dict[str, float]) -> None:
        """Logs ``values`` as ``train/<name>`` every ``every`` steps (global step = epoch * steps + step)."""
        if self.writer is None or step % self.every:
            return
        global_step = self.epoch * self.steps_per_epoch + step
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, global_step)

    def epoch_end(self, epoch: int, stats: dict[str, float]) -> None:
        """Logs every numeric epoch statistic as ``epoch/<name>``."""
        if self.writer is None:
            return
        for k, v in stats.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"epoch/{k}", v, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Runs training (with evaluation after every epoch) or, with ``--eval``, one evaluation.

    Returns:
        The last evaluation statistics (and ``max_accuracy`` when training).
    """
    resolved = argparse.Namespace(**vars(args))  # the flags as given, for args.yaml and checkpoints
    device = resolve_device(args.device)  # before the process group: a bad device is one error line per rank
    utils.init_distributed_mode(args)
    amp_dtype = resolve_amp_dtype(args, device)
    print(f"device: {device}, world size: {utils.get_world_size()}, amp: {amp_dtype or 'off'}")
    seed_everything(args.seed + utils.get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_args_yaml(resolved, output_dir / "args.yaml")

    check_model_name(args.model)
    check_input_size(args.input_size, _patch_size_from_name(args.model), args.model)
    dataset_train, nb_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args, class_to_idx=getattr(dataset_train, "class_to_idx", None))
    args.nb_classes = nb_classes
    print(f"data: {len(dataset_train)} train / {len(dataset_val)} val images, {nb_classes} classes")
    loader_train, loader_val, sampler_train = build_loaders(args, dataset_train, dataset_val)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=nb_classes,
        )

    print(f"Creating model: {args.model}")
    model = build_model(args, nb_classes)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # timm's distilled DeiT returns (cls, dist) logits in train mode
    if args.finetune and not args.eval:
        if args.distillation_type != "none":
            raise UserError("finetuning with distillation is not supported")
        load_finetune_weights(model, args.finetune)
    model.to(device)
    model_without_ddp = model

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)

    run_model: nn.Module = model
    if args.compile:
        run_model = torch.compile(run_model)
    if args.distributed:
        device_ids = [args.gpu] if device.type == "cuda" else None
        run_model = nn.parallel.DistributedDataParallel(run_model, device_ids=device_ids)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")

    opt_args = argparse.Namespace(**vars(args))
    opt_args.lr = args.lr * args.batch_size * utils.get_world_size() / 512.0  # DeiT's linear scaling rule
    print(f"lr: {args.lr} scaled to {opt_args.lr:.3e} (batch {args.batch_size} x {utils.get_world_size()} / 512)")
    optimizer = create_optimizer(opt_args, model_without_ddp)
    loss_scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    lr_scheduler, _ = create_scheduler(opt_args, optimizer)

    if mixup_active:
        base_criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is folded into the mixup targets
    elif args.smoothing:
        base_criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base_criterion = nn.CrossEntropyLoss()
    teacher = None
    if args.distillation_type != "none" and not args.eval:
        teacher = build_teacher(args, nb_classes, device)
    criterion = DistillationLoss(
        base_criterion, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau
    )

    max_accuracy = 0.0
    if args.resume:
        ckpt = utils.load_checkpoint(args.resume)
        if "model" not in ckpt:
            raise UserError(f"checkpoint {args.resume} has no 'model' entry")
        load_model_state(model_without_ddp, ckpt["model"], args.resume, args.model)
        if not args.eval and "optimizer" in ckpt and "epoch" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("lr_scheduler"):
                lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            args.start_epoch = int(ckpt["epoch"]) + 1
            if model_ema is not None and ckpt.get("model_ema"):
                load_model_state(model_ema.module, ckpt["model_ema"], args.resume + " (model_ema)", args.model)
            if loss_scaler is not None and ckpt.get("scaler"):
                loss_scaler.load_state_dict(ckpt["scaler"])
            max_accuracy = float(ckpt.get("max_accuracy", 0.0))
            print(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}")

    eval_sync = args.dist_eval or not args.distributed
    if args.eval:
        test_stats = evaluate(loader_val, run_model, device, amp_dtype, args.print_freq, sync=eval_sync)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    tb = TensorBoardLogger(args.log_dir or args.output_dir, args.tb_log_freq, len(loader_train))
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    test_stats: dict[str, float] = {}
    try:
        for epoch in range(args.start_epoch, args.epochs):
            if hasattr(sampler_train, "set_epoch"):
                sampler_train.set_epoch(epoch)
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
            test_stats = evaluate(loader_val, run_model, device, amp_dtype, args.print_freq, sync=eval_sync)
            print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
            first_best = output_dir is not None and not (output_dir / "best_checkpoint.pth").exists()
            improved = test_stats["acc1"] > max_accuracy or first_best  # a best checkpoint exists even at 0%
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            print(f"Max accuracy: {max_accuracy:.2f}%")

            log_stats = {
                **{f"train_{k}": v for k, v in train_stats.items()},
                **{f"test_{k}": v for k, v in test_stats.items()},
                "epoch": epoch,
                "n_parameters": n_parameters,
                "max_accuracy": max_accuracy,
            }
            tb.epoch_end(epoch, log_stats)
            if output_dir is not None and utils.is_main_process():
                with (output_dir / "log.txt").open("a", encoding="utf-8") as f:
                    f.write(json.dumps(log_stats) + "\n")
            if output_dir is not None:
                state = {
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": utils.to_plain(lr_scheduler.state_dict()),
                    "epoch": epoch,
                    "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                    "scaler": scaler_state(loss_scaler),
                    "max_accuracy": max_accuracy,
                    "args": utils.to_plain(resolved),
                }
                utils.save_on_master(state, output_dir / "checkpoint.pth")
                if improved:
                    utils.save_on_master(state, output_dir / "best_checkpoint.pth")
    finally:
        tb.close()
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total_time}")
    return {**test_stats, "max_accuracy": max_accuracy}


def cli(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: runs ``main`` and turns user errors into ``error: ...`` and an exit code."""
    try:
        args = parse_args(argv)
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        main(args)
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
