"""The DeiT models with iRPE of the paper, registered in timm's model registry on import.

``import rpe_models`` makes ``timm.create_model('deit_small_patch16_224_ctx_product_50_shared_k', ...)`` work, with
the pretrained cfgs of :data:`default_cfgs` (the released ones are ``timm.list_pretrained('*ctx*')``) and everything
timm's ViT builder gives (``features_only``, ``pretrained_cfg_overlay``, ``cache_dir``, ``device``, ``dtype``). Every
model uses contextual iRPE shared across heads, with one skip bucket for the class token; the name reads
``deit_<size>_patch16_224_ctx_<method>_<buckets>_shared_<on>``. :data:`MODEL_ZOO` is the one table of the nine
models and their published figures (read by ``tools/model_zoo.py`` and ``hubconf.py``).

``pretrained=True`` loads ``<prefix><name>.pth`` through :func:`models.load_pretrained` (downloaded into torch.hub's
cache, read ``weights_only``, adapted, checked key by key and strictly loaded), with ``<prefix>`` =
:data:`MODEL_ZOO_URL` unless the environment variable ``IRPE_MODEL_ZOO_URL`` names a mirror: a URL prefix or a local
directory; a ``file`` or ``url`` in ``pretrained_cfg_overlay`` names the checkpoint itself.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import irpe
import models
from rpe_vision_transformer import VisionTransformer

MODEL_ZOO_URL = "https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/"
MODEL_ZOO_ENV = "IRPE_MODEL_ZOO_URL"
PUBLISHED_SOURCE = "iRPE README model zoo (ImageNet-1k val, 224x224, the original authors' runs)"


@dataclass(frozen=True)
class ZooEntry:
    """One iRPE model of the zoo.

    Attributes:
        name: registered model name.
        size: DeiT size (``'tiny'``, ``'small'``, ``'base'``).
        method: iRPE method (``'euc'``, ``'quant'``, ``'cross'``, ``'product'``).
        ratio: ``alpha = ratio, beta = 2 ratio, gamma = 8 ratio`` of the piecewise index.
        rpe_on: where the encodings are (``'k'``, ``'qk'``, ``'qkv'``).
        released: a checkpoint ``<name>.pth`` exists under :data:`MODEL_ZOO_URL`.
        params_m: published parameters (millions), ``None`` when not published.
        macs_m: published MACs (millions) at 224.
        top1: published ImageNet-1k top-1 accuracy (%).
        top5: published top-5 accuracy (%).
    """

    name: str
    size: str
    method: str
    ratio: float
    rpe_on: str
    released: bool = False
    params_m: float | None = None
    macs_m: int | None = None
    top1: float | None = None
    top5: float | None = None

    @property
    def rpe_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`irpe.get_rpe_config` for this model."""
        return dict(ratio=self.ratio, method=self.method, mode="ctx", shared_head=True, skip=1, rpe_on=self.rpe_on)


MODEL_ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("deit_tiny_patch16_224_ctx_product_50_shared_k", "tiny", "product", 1.9, "k",
                 released=True, params_m=5.76, macs_m=1284, top1=73.7, top5=92.0),
        ZooEntry("deit_small_patch16_224_ctx_euc_20_shared_k", "small", "euc", 20, "k"),
        ZooEntry("deit_small_patch16_224_ctx_quant_51_shared_k", "small", "quant", 33, "k"),
        ZooEntry("deit_small_patch16_224_ctx_cross_56_shared_k", "small", "cross", 20, "k"),
        ZooEntry("deit_small_patch16_224_ctx_product_50_shared_k", "small", "product", 1.9, "k",
                 released=True, params_m=22.09, macs_m=4659, top1=80.9, top5=95.4),
        ZooEntry("deit_small_patch16_224_ctx_product_50_shared_qk", "small", "product", 1.9, "qk",
                 released=True, params_m=22.13, macs_m=4706, top1=81.0, top5=95.5),
        ZooEntry("deit_small_patch16_224_ctx_product_50_shared_qkv", "small", "product", 1.9, "qkv",
                 released=True, params_m=22.17, macs_m=4885, top1=81.2, top5=95.5),
        ZooEntry("deit_base_patch16_224_ctx_product_50_shared_k", "base", "product", 1.9, "k",
                 released=True, params_m=86.61, macs_m=17684, top1=82.3, top5=95.9),
        ZooEntry("deit_base_patch16_224_ctx_product_50_shared_qkv", "base", "product", 1.9, "qkv",
                 released=True, params_m=86.68, macs_m=18137, top1=82.8, top5=96.1),
    )
}  # fmt: skip


# The DeiT architectures (Touvron et al., 2021): 12 blocks, MLP ratio 4, qkv bias, LayerNorm eps 1e-6 (the default
# norm of rpe_vision_transformer.VisionTransformer).
DEIT_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 192, "num_heads": 3, "depth": 12, "mlp_ratio": 4.0, "qkv_bias": True},
    "small": {"embed_dim": 384, "num_heads": 6, "depth": 12, "mlp_ratio": 4.0, "qkv_bias": True},
    "base": {"embed_dim": 768, "num_heads": 12, "depth": 12, "mlp_ratio": 4.0, "qkv_bias": True},
}


def rpe_config_of(name: str) -> irpe.RPEConfigs:
    """The iRPE configuration of the zoo model ``name``."""
    if name not in MODEL_ZOO:
        raise ValueError(f"unknown iRPE model {name!r}; known: {', '.join(MODEL_ZOO)}")
    return irpe.get_rpe_config(**MODEL_ZOO[name].rpe_kwargs)


def checkpoint_location(name: str, mirror: str | None = None) -> str:
    """URL (or local path) ``<prefix><name>.pth`` of the checkpoint of ``name``.

    ``mirror`` is the prefix; ``None`` reads ``IRPE_MODEL_ZOO_URL``, else :data:`MODEL_ZOO_URL`. A prefix without
    ``scheme://`` is a local directory.

    Raises:
        ValueError: the mirror is neither a URL nor an existing directory.
    """
    prefix = (mirror if mirror is not None else os.environ.get(MODEL_ZOO_ENV, "").strip()) or MODEL_ZOO_URL
    if models.is_url(prefix):
        return f"{prefix.rstrip('/')}/{name}.pth"
    if not Path(prefix).expanduser().is_dir():
        raise ValueError(f"{MODEL_ZOO_ENV}={prefix!r} is neither a URL prefix (scheme://...) nor an existing directory")
    return str(Path(prefix).expanduser() / f"{name}.pth")


# timm's pretrained cfgs, read by register_model for every entrypoint below: the release URL ('' without a release);
# timm's defaults are DeiT's eval transform (1000 classes, 224 px, bicubic, crop 0.875, ImageNet mean and std).
default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": checkpoint_location(name, mirror=MODEL_ZOO_URL) if entry.released else "",
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "paper_ids": "arXiv:2107.14222",
            "origin_url": "https://github.com/microsoft/Cream/tree/main/iRPE",
        }
        for name, entry in MODEL_ZOO.items()
    }
)


def create_irpe_deit(name: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build the zoo model ``name`` with timm's ``build_model_with_cfg`` (the builder of every entrypoint).

    ``pretrained`` loads the released checkpoint (see the module docstring); ``kwargs`` are those of
    :class:`rpe_vision_transformer.VisionTransformer` (``img_size``, ``num_classes``, ``attn_impl``, ...) and what
    ``timm.create_model`` passes (``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``, ``out_indices``, ...).

    Raises:
        ValueError: unknown name, or an ``rpe_config`` (each zoo model fixes its own).
        models.CheckpointError: the weights cannot be fetched, read or matched to the model;
            :class:`models.NoReleasedWeightsError` for a model without released weights.
    """
    rpe_config = rpe_config_of(name)
    if "rpe_config" in kwargs:
        raise ValueError(
            f"{name} fixes its own rpe_config; build other configurations with "
            "rpe_vision_transformer.VisionTransformer(rpe_config=..., **rpe_models.DEIT_ARCHS[size])"
        )
    cache_dir = kwargs.pop("cache_dir", None)
    weights = None
    if pretrained:
        weights = _weights_location(name, kwargs.get("pretrained_cfg_overlay"))
        source = "url" if models.is_url(weights) else "file"
        kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), source: weights}
    return build_model_with_cfg(
        functools.partial(_build, weights=weights, cache_dir=cache_dir),
        name,
        pretrained=False,  # timm builds; _build loads the weights through models.load_pretrained
        feature_cfg={"out_indices": kwargs.pop("out_indices", 3), "feature_cls": "getter"},
        **{"rpe_config": rpe_config, **DEIT_ARCHS[MODEL_ZOO[name].size], **kwargs},
    )


def _weights_location(name: str, overlay: Mapping[str, Any] | None) -> str:
    """Where the weights of ``name`` are: the overlay's ``file`` or ``url``, else :func:`checkpoint_location`."""
    override = (overlay or {}).get("file") or (overlay or {}).get("url")
    if override:
        return str(override)
    if not MODEL_ZOO[name].released:
        released = ", ".join(n for n, e in MODEL_ZOO.items() if e.released)
        raise models.NoReleasedWeightsError(
            f"{name} has no released checkpoint, so pretrained=True cannot be honoured. Build it with "
            "pretrained=False and load weights you have with `python main.py --resume <checkpoint.pth>` (or "
            f"pretrained_cfg_overlay={{'file': <checkpoint.pth>}}). Released models: {released}"
        )
    return checkpoint_location(name)


def _build(*, weights: str | None, cache_dir: str | os.PathLike | None, **kwargs: Any) -> VisionTransformer:
    """``VisionTransformer(**kwargs)``, with the checkpoint at ``weights`` loaded by :func:`models.load_pretrained`.

    With ``num_classes=0`` the checkpoint's backbone is loaded into a model with a one-class head (which stays
    fresh, see :func:`models.adapt_state_dict`), removed afterwards.
    """
    headless = weights is not None and kwargs.get("num_classes", 1000) == 0
    model = VisionTransformer(**{**kwargs, "num_classes": 1} if headless else kwargs)
    if weights is not None:
        models.load_pretrained(model, weights, cache_dir=cache_dir)
    if headless:
        model.reset_classifier(0)
    return model


def _zoo_model(fn: Callable[..., VisionTransformer]) -> Callable[..., VisionTransformer]:
    """Register ``fn`` (named after a :data:`MODEL_ZOO` entry, body unused) as a timm entrypoint of that model."""
    if fn.__name__ not in MODEL_ZOO:
        raise ValueError(f"{fn.__name__} is not in MODEL_ZOO")

    @functools.wraps(fn)
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return create_irpe_deit(fn.__name__, pretrained=pretrained, **kwargs)

    return register_model(entrypoint)


@_zoo_model
def deit_tiny_patch16_224_ctx_product_50_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny, contextual product iRPE on keys (ratio 1.9: 50 buckets incl. the class-token bucket)."""


@_zoo_model
def deit_small_patch16_224_ctx_euc_20_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small, contextual Euclidean iRPE on keys (ratio 20)."""


@_zoo_model
def deit_small_patch16_224_ctx_quant_51_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small, contextual quantised-Euclidean iRPE on keys (ratio 33)."""


@_zoo_model
def deit_small_patch16_224_ctx_cross_56_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small, contextual cross iRPE (row table + column table) on keys (ratio 20)."""


@_zoo_model
def deit_small_patch16_224_ctx_product_50_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small, contextual product iRPE on keys (ratio 1.9)."""


@_zoo_model
def deit_small_patch16_224_ctx_product_50_shared_qk(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small, contextual product iRPE on queries and keys (ratio 1.9)."""


@_zoo_model
def deit_small_patch16_224_ctx_product_50_shared_qkv(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small, contextual product iRPE on queries, keys and values (ratio 1.9)."""


@_zoo_model
def deit_base_patch16_224_ctx_product_50_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base, contextual product iRPE on keys (ratio 1.9)."""


@_zoo_model
def deit_base_patch16_224_ctx_product_50_shared_qkv(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base, contextual product iRPE on queries, keys and values (ratio 1.9)."""
