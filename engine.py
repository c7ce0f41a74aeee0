"""One training epoch and one evaluation pass (DeiT's ``engine.py``, device-agnostic).

Both run the same on CPU and CUDA: mixed precision through ``torch.autocast(device_type, dtype)``, loss scaling
through timm's ``NativeScaler`` (a ``torch.amp.GradScaler``; float16 only), no unconditional CUDA synchronization.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.utils import NativeScaler, accuracy
from torch import nn

import utils
from losses import DistillationLoss
from utils import TrainingError

StepHook = Callable[[int, dict[str, float]], None]

_logger = logging.getLogger(__name__)


def _all_finite(loss_value: float, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together instead of hanging)."""
    if not utils.is_dist_avail_and_initialized():
        return math.isfinite(loss_value)
    flag = torch.tensor([0.0 if math.isfinite(loss_value) else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0.0


def train_one_epoch(
    model: nn.Module,
    criterion: DistillationLoss,
    data_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler: NativeScaler | None,
    amp_dtype: torch.dtype | None = None,
    max_norm: float | None = None,
    model_ema: Any | None = None,
    mixup_fn: Mixup | None = None,
    print_freq: int = 10,
    step_hook: StepHook | None = None,
    set_training_mode: bool = True,
) -> dict[str, float]:
    """Trains ``model`` for one pass over ``data_loader``.

    Args:
        model: The (possibly DDP-wrapped / compiled) model.
        criterion: Loss taking ``(inputs, outputs, targets)``.
        data_loader: Yields ``(images, targets)`` batches.
        optimizer: Optimizer; its learning rate is set by the scheduler before the epoch.
        device: Where the batches go.
        epoch: Epoch index (for progress lines).
        loss_scaler: timm's ``NativeScaler`` (a ``GradScaler``) for float16 AMP, else None.
        amp_dtype: Autocast dtype, or None for full precision.
        max_norm: Clip the global gradient norm to this value (None or 0: no clipping).
        model_ema: An EMA of the weights (timm ``ModelEmaV2``/``V3``), updated after every step.
        mixup_fn: timm ``Mixup`` producing soft targets, or None.
        print_freq: Progress line every this many steps.
        step_hook: Called after every step with the step index and ``{'loss', 'lr'}`` (TensorBoard logging).
        set_training_mode: Put the model in train mode (False keeps e.g. frozen BN in eval mode).

    Returns:
        Averages over the epoch (all ranks): ``loss`` and ``lr``.

    Raises:
        TrainingError: when the loss is not finite; the caller keeps the last good checkpoint.
    """
    model.train(set_training_mode)
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("loss", utils.SmoothedValue(window_size=20, fmt="{median:.4f} ({global_avg:.4f})"))
    header = f"Epoch: [{epoch}]"
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        loss_value = loss.item()
        if not _all_finite(loss_value, device):
            raise TrainingError(
                f"loss is {loss_value} at epoch {epoch}, step {step}: stopping training "
                "(the last checkpoint written is the last good one; try a lower --lr, --clip-grad or --no-amp)"
            )

        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:  # float16: scaled backward, unscale, clip, step and update
            loss_scaler(loss, optimizer, clip_grad=max_norm or None, parameters=model.parameters())
        else:
            loss.backward()
            if max_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()

        if model_ema is not None:
            model_ema.update(model)

        lr = optimizer.param_groups[0]["lr"]
        metric_logger.update(loss=loss_value, n=samples.shape[0])
        metric_logger.update(lr=lr)
        if step_hook is not None:
            step_hook(step, {"loss": loss_value, "lr": lr})

    metric_logger.synchronize_between_processes()
    _logger.info(f"Averaged stats: {metric_logger}")
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(
    data_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    print_freq: int = 10,
    sync: bool = True,
) -> dict[str, float]:
    """Evaluates ``model`` with cross-entropy and top-1/top-5 accuracy (percent), summed exactly over all ranks.

    Args:
        data_loader: Yields ``(images, targets)``; under distributed evaluation each rank holds a disjoint shard.
        model: The model (eval mode is set here).
        device: Where the batches go.
        amp_dtype: Autocast dtype, or None for full precision.
        print_freq: Progress line every this many steps.
        sync: Sum the metrics over ranks (False when every rank evaluated the whole set).

    Logs DeiT's summary line ``* Acc@1 {top1:.3f} Acc@5 {top5:.3f} loss {loss:.3f}`` (parsed by scripts) and accuracy.

    Returns:
        ``loss``, ``acc1``, ``acc5`` (averages over all evaluated images) and ``num_images``.
    """
    criterion = nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter="  ")
    for name in ("loss", "acc1", "acc5"):  # same meters on every rank, even one with no batch
        metric_logger.add_meter(name, utils.SmoothedValue())
    model.eval()
    for images, target in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        metric_logger.update(loss=criterion(output, target).item(), acc1=acc1.item(), acc5=acc5.item(), n=len(images))
    if sync:
        metric_logger.synchronize_between_processes()
    m = metric_logger.meters
    _logger.info(f"* Acc@1 {m['acc1'].global_avg:.3f} Acc@5 {m['acc5'].global_avg:.3f} loss {m['loss'].global_avg:.3f}")
    _logger.info(f"Accuracy of the network on the {m['acc1'].count} test images: {m['acc1'].global_avg:.1f}%")
    return {**{name: meter.global_avg for name, meter in m.items()}, "num_images": float(m["acc1"].count)}
