"""Plain DeiT baselines on our :class:`rpe_vision_transformer.VisionTransformer`, and the shared model builder.

The baselines (``rpe_config=None``) are DeiT-Tiny/Small/Base at 224, their distilled variants and DeiT-Base (plain
and distilled) at 384, with the DeiT release checkpoints (``{'model': state_dict}``, SHA-256 prefix in the file
name, checked on download) loading with ``strict=True``.

Name clash policy: timm registers ``deit_tiny_patch16_224`` & co. itself, with an equivalent architecture and the
same checkpoint layout. This module does NOT register anything, so importing it never overwrites (nor warns about)
timm's registry: ``timm.create_model('deit_small_patch16_224')`` keeps giving timm's model, while our builders are
the plain functions below (also exported by ``hubconf.py``) and :data:`BASELINES`. The iRPE models, whose names are
ours, are registered with timm by :mod:`rpe_models`.

The download/verification helpers here are shared with :mod:`rpe_models`: checkpoints are fetched into torch.hub's
cache (``torch.hub.get_dir()/checkpoints``, or timm's ``cache_dir``), read with ``torch.load(weights_only=True)``,
checked key by key and shape by shape against the model, and loaded strictly. Two adaptations follow from the
constructor arguments: ``pos_embed`` is resampled when the model is built for another ``img_size``, and the
classifier head(s) keep their fresh initialisation when ``num_classes`` differs from the checkpoint's.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from torch import nn

from rpe_vision_transformer import VisionTransformer

__all__ = [
    "BASELINES",
    "DEIT_SIZES",
    "DEIT_URL_PREFIX",
    "NoReleasedWeightsError",
    "PretrainedWeightsError",
    "checkpoint_cache_dir",
    "create_deit",
    "deit_base_distilled_patch16_224",
    "deit_base_distilled_patch16_384",
    "deit_base_patch16_224",
    "deit_base_patch16_384",
    "deit_small_distilled_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_tiny_patch16_224",
    "load_pretrained",
]

DEIT_URL_PREFIX = "https://dl.fbaipublicfiles.com/deit/"

# Width and heads of the DeiT sizes (depth 12, MLP ratio 4, qkv bias, LayerNorm eps 1e-6 for all).
DEIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "num_heads": 3},
    "small": {"embed_dim": 384, "num_heads": 6},
    "base": {"embed_dim": 768, "num_heads": 12},
}

# Keyword arguments timm.create_model (1.x) hands every entrypoint, which are not model arguments.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be downloaded, read or matched to the model."""


class NoReleasedWeightsError(PretrainedWeightsError, ValueError):
    """``pretrained=True`` for a model that has no released checkpoint."""


@dataclass(frozen=True)
class Baseline:
    """A plain DeiT of the DeiT release.

    Attributes:
        name: model name (as in DeiT and timm).
        size: ``'tiny'``, ``'small'`` or ``'base'`` (see :data:`DEIT_SIZES`).
        img_size: training resolution.
        distilled: has the distillation token and head.
        checkpoint: file name of the release checkpoint under :data:`DEIT_URL_PREFIX` (``<name>-<sha256 prefix>``).
    """

    name: str
    size: str
    img_size: int
    distilled: bool
    checkpoint: str

    @property
    def url(self) -> str:
        return DEIT_URL_PREFIX + self.checkpoint


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("deit_tiny_patch16_224", "tiny", 224, False, "deit_tiny_patch16_224-a1311bcf.pth"),
        Baseline("deit_small_patch16_224", "small", 224, False, "deit_small_patch16_224-cd65a155.pth"),
        Baseline("deit_base_patch16_224", "base", 224, False, "deit_base_patch16_224-b5f2ef4d.pth"),
        Baseline("deit_tiny_distilled_patch16_224", "tiny", 224, True, "deit_tiny_distilled_patch16_224-b40b3cf7.pth"),
        Baseline(
            "deit_small_distilled_patch16_224", "small", 224, True, "deit_small_distilled_patch16_224-649709d9.pth"
        ),
        Baseline("deit_base_distilled_patch16_224", "base", 224, True, "deit_base_distilled_patch16_224-df68dfff.pth"),
        Baseline("deit_base_patch16_384", "base", 384, False, "deit_base_patch16_384-8de9b5d1.pth"),
        Baseline("deit_base_distilled_patch16_384", "base", 384, True, "deit_base_distilled_patch16_384-d0272ac0.pth"),
    )
}


# ------------------------------------------------------------------------------------------------------------------
# Fetching, reading and verifying checkpoints.
# ------------------------------------------------------------------------------------------------------------------


def checkpoint_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloaded checkpoints go: ``cache_dir`` if given, else ``torch.hub.get_dir()/checkpoints``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a file-system path."""
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def _help_text(location: str | os.PathLike, cache: Path) -> str:
    return (
        f"(source: {location}; download cache: {cache}). To use weights you already have, build the model with "
        "pretrained=False and load them with `python main.py --resume <checkpoint.pth>` (or "
        "`model.load_state_dict(torch.load(path, weights_only=True)['model'])`); IRPE_MODEL_ZOO_URL=<URL prefix or "
        "local directory> points the iRPE models at a mirror."
    )


def fetch_checkpoint(
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
) -> Path:
    """Local path of a checkpoint: a file path as is, a URL downloaded once into the cache.

    Args:
        location: URL or local file.
        cache_dir: download directory (default: torch.hub's ``checkpoints`` directory).
        check_hash: verify the SHA-256 prefix that the file name carries (``<name>-<hex>.pth``).
        progress: show a download progress bar.

    Raises:
        PretrainedWeightsError: missing local file, or failed download (HTTP error, network, hash mismatch).
    """
    cache = checkpoint_cache_dir(cache_dir)
    if not is_url(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"no checkpoint file at {path} " + _help_text(location, cache))
        return path
    file_name = os.path.basename(urllib.parse.urlparse(str(location)).path)
    path = cache / file_name
    if path.is_file():
        return path
    hash_prefix = None
    if check_hash:
        match = torch.hub.HASH_REGEX.search(file_name)
        hash_prefix = match.group(1) if match else None
    cache.mkdir(parents=True, exist_ok=True)
    try:
        # downloads to a temporary file and renames it at the end: a failure leaves nothing in the cache
        torch.hub.download_url_to_file(str(location), str(path), hash_prefix=hash_prefix, progress=progress)
    except (OSError, RuntimeError, ValueError) as err:  # HTTPError/URLError are OSError; hash mismatch RuntimeError
        raise PretrainedWeightsError(f"could not download {location}: {err} " + _help_text(location, cache)) from err
    return path


def read_state_dict(path: Path, *, location: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint file: ``checkpoint['model']``, or the file itself if it is a flat state dict.

    Raises:
        PretrainedWeightsError: unreadable file (truncated, not a torch checkpoint, unsafe pickle) or no state dict.
    """
    cache = path.parent
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails with many types (zip, pickle, EOF, unsafe globals): report them all
        raise PretrainedWeightsError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); delete it so that it is fetched again "
            + _help_text(location or path, cache)
        ) from err
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            f"{path} holds no state dict (expected {{'model': state_dict}}) " + _help_text(location or path, cache)
        )
    return dict(state)


def adapt_state_dict(model: VisionTransformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to the constructor arguments of ``model`` (a new dict; ``state`` is left alone).

    * ``pos_embed`` of a square grid is resampled (bicubic) to the patch grid of ``model`` if it differs;
    * classifier heads whose number of classes differs are replaced by the model's own (fresh) ones.
    """
    state = dict(state)
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape and pos.shape[-1] == own["pos_embed"].shape[-1]:
        num_patches = pos.shape[1] - model.num_prefix_tokens
        side = math.isqrt(max(num_patches, 0))
        if side * side == num_patches:
            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(model.patch_grid), old_size=[side, side], num_prefix_tokens=model.num_prefix_tokens
            )
    for head in ("head", "head_dist"):
        weight = state.get(f"{head}.weight")
        own_weight = own.get(f"{head}.weight")
        if weight is not None and own_weight is not None and weight.shape[0] != own_weight.shape[0]:
            state[f"{head}.weight"] = own_weight
            state[f"{head}.bias"] = own[f"{head}.bias"]
    return state


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``state`` and ``model.state_dict()`` (keys and shapes); empty if none."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            problems.append(f"shape of {key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    return problems


def load_pretrained(
    model: VisionTransformer,
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
) -> None:
    """Fetch, read, verify (keys and shapes) and strictly load a checkpoint into ``model``.

    Raises:
        PretrainedWeightsError: the checkpoint cannot be fetched or read, or does not match the model.
    """
    path = fetch_checkpoint(location, cache_dir=cache_dir, check_hash=check_hash, progress=progress)
    state = adapt_state_dict(model, read_state_dict(path, location=location))
    problems = state_dict_mismatch(model, state)
    if problems:
        raise PretrainedWeightsError(
            f"the checkpoint {path} does not match {type(model).__name__}: "
            + "; ".join(problems)
            + " "
            + _help_text(location, checkpoint_cache_dir(cache_dir))
        )
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------------------------
# The shared builder.
# ------------------------------------------------------------------------------------------------------------------


def default_cfg(url: str | None, img_size: int | tuple[int, int], num_classes: int, distilled: bool) -> dict[str, Any]:
    """timm-style data configuration (``model.pretrained_cfg``), read by ``timm.data.resolve_data_config``."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return {
        "url": url or "",
        "num_classes": num_classes,
        "input_size": (3, height, width),
        "pool_size": None,
        "crop_pct": 0.875 if max(height, width) <= 224 else 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": ("head", "head_dist") if distilled else "head",
    }


def create_deit(
    size: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    released: bool = True,
    check_hash: bool = False,
    model_name: str = "this model",
    img_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    distilled: bool = False,
    **kwargs: Any,
) -> VisionTransformer:
    """Build a DeiT of ``size`` (optionally with iRPE through ``rpe_config=``) and load its weights if asked.

    Args:
        size: ``'tiny'``, ``'small'`` or ``'base'``.
        pretrained: load the released weights at ``checkpoint``.
        checkpoint: URL or file of the released weights (where they would be, if ``released`` is False).
        released: whether ``checkpoint`` exists; ``pretrained=True`` without a release raises.
        check_hash: verify the SHA-256 prefix in the checkpoint's file name.
        model_name: for error messages.
        img_size: image size the model is built for (int or ``(height, width)``).
        patch_size: patch side.
        distilled: DeiT distillation token and head.
        **kwargs: :class:`VisionTransformer` arguments (``num_classes``, ``drop_path_rate``, ``rpe_config``, ...),
            plus what ``timm.create_model`` passes: ``pretrained_cfg`` (ignored), ``pretrained_cfg_overlay`` (its
            ``file`` or ``url`` replaces ``checkpoint``), ``cache_dir`` (download directory), ``device``, ``dtype``.

    Raises:
        ValueError: unknown size or arguments.
        PretrainedWeightsError: see :func:`load_pretrained`; :class:`NoReleasedWeightsError` without a release.
    """
    if size not in DEIT_SIZES:
        raise ValueError(f"unknown DeiT size {size!r}; choose one of {sorted(DEIT_SIZES)}")
    timm_kwargs = {k: kwargs.pop(k) for k in _TIMM_ONLY_KWARGS if k in kwargs}
    overlay = timm_kwargs.get("pretrained_cfg_overlay") or {}
    override = overlay.get("file") or overlay.get("url")
    if override:
        checkpoint, released = override, True
    cache_dir = timm_kwargs.get("cache_dir")
    device, dtype = timm_kwargs.get("device"), timm_kwargs.get("dtype")
    if pretrained and (checkpoint is None or not released):
        raise NoReleasedWeightsError(
            f"{model_name} has no released checkpoint, so pretrained=True cannot be honoured "
            + _help_text(checkpoint or "<none>", checkpoint_cache_dir(cache_dir))
        )
    args: dict[str, Any] = {
        "depth": 12,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "norm_layer": partial(nn.LayerNorm, eps=1e-6),
        **DEIT_SIZES[size],
        **kwargs,
    }
    with torch.device(device) if device is not None else nullcontext():
        model = VisionTransformer(img_size=img_size, patch_size=patch_size, distilled=distilled, **args)
    if dtype is not None:
        model = model.to(dtype)
    model.pretrained_cfg = model.default_cfg = default_cfg(
        str(checkpoint) if checkpoint and released else None, img_size, model.num_classes, distilled
    )
    if pretrained:
        load_pretrained(model, checkpoint, cache_dir=cache_dir, check_hash=check_hash)
    return model


def _create_baseline(name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    spec = BASELINES[name]
    kwargs.setdefault("img_size", spec.img_size)
    return create_deit(
        spec.size,
        pretrained=pretrained,
        checkpoint=spec.url,
        check_hash=True,
        model_name=name,
        distilled=spec.distilled,
        **kwargs,
    )


def deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny (5.7 M parameters) at 224."""
    return _create_baseline("deit_tiny_patch16_224", pretrained, **kwargs)


def deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small (22.1 M parameters) at 224."""
    return _create_baseline("deit_small_patch16_224", pretrained, **kwargs)


def deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base (86.6 M parameters) at 224."""
    return _create_baseline("deit_base_patch16_224", pretrained, **kwargs)


def deit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny with the distillation token at 224."""
    return _create_baseline("deit_tiny_distilled_patch16_224", pretrained, **kwargs)


def deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small with the distillation token at 224."""
    return _create_baseline("deit_small_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base with the distillation token at 224."""
    return _create_baseline("deit_base_distilled_patch16_224", pretrained, **kwargs)


def deit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base fine-tuned at 384."""
    return _create_baseline("deit_base_patch16_384", pretrained, **kwargs)


def deit_base_distilled_patch16_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base with the distillation token, fine-tuned at 384."""
    return _create_baseline("deit_base_distilled_patch16_384", pretrained, **kwargs)
