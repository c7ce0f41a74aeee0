"""Vision Transformer (DeiT) with image relative position encoding (iRPE), on timm's own ViT classes.

Reference: Kan Wu, Houwen Peng, Minghao Chen, Jianlong Fu, Hongyang Chao, "Rethinking and Improving Relative
Position Encoding for Vision Transformer", ICCV 2021 (https://arxiv.org/abs/2107.14222), on top of DeiT
(Touvron et al., "Training data-efficient image transformers & distillation through attention", ICML 2021).

The classes subclass timm's (``timm.models.vision_transformer.VisionTransformer``, ``Block``,
``timm.layers.Attention``; the distilled model ``timm.models.deit.VisionTransformerDistilled``), so they have
what timm's ViT has: ``features_only`` / ``forward_intermediates`` / ``feature_info``, ``set_grad_checkpointing``,
``group_matcher``, ``reset_classifier(num_classes, global_pool)``, ``dynamic_img_size``. Only the attention is
ours, because iRPE adds terms inside the softmax (queries, keys) and after it (values); as timm's ``eva.py`` hands
its rotary embedding to every block, the model hands every block the patch grid ``(height, width)`` of the input,
from which each iRPE module computes its bucket ids. Nothing ever guesses the grid from the sequence length.

:func:`add_irpe` puts iRPE into a model built by timm's own ``VisionTransformer`` (ViT, DeiT, DeiT-III, ViTs with
registers, ...), pretrained or not, by turning it into these classes in place: same parameters under the same names,
plus zero tables, so it computes what it did until training moves them.

Parameter names are the timm-0.3 ViT layout of the released DeiT and iRPE checkpoints (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``;
``dist_token`` and ``head_dist`` for distilled models; iRPE tables at ``blocks.{i}.attn.rpe_{q,k,v}.*``), so those
checkpoints load with ``strict=True``.

Resolution policy: a model is built for ``img_size`` (an int or ``(height, width)``), which sets the size of
``pos_embed``. With ``dynamic_img_size=True`` (the default here) any input whose sides are multiples of
``patch_size`` is accepted and timm resamples ``pos_embed`` to its grid; with ``False`` only ``img_size`` is.

Tracing and export: the grid checks raise ``ValueError`` in eager mode and become ``torch._check`` assertions under
``torch.compile`` / ``torch.export``; :func:`image_patch_grid` and :func:`rpe_attention` are leaves (``torch.fx.wrap``)
for ``torch.fx`` symbolic tracing, so timm's and torchvision's FX feature extractors work; ``torch.jit.trace``
records the traced input's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import Attention, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

import irpe
import irpe_attention
from irpe_attention import rpe_attention

__all__ = [
    "ATTN_IMPLS",
    "DistilledVisionTransformer",
    "IRPESpec",
    "RPEAttention",
    "RPEBlock",
    "VisionTransformer",
    "add_irpe",
    "image_patch_grid",
]

AttnImpl = Literal["auto", "math", "sdpa", "flex", "ops", "triton"]
# Attention implementations RPEAttention can run (see irpe_attention.resolve_attn_impl): 'math' materialises the
# (B, H, L, L) probabilities; 'sdpa' runs PyTorch's fused attention with the iRPE bias and keeps nothing L x L for
# backward; 'flex' adds the bias inside FlexAttention (no values); 'ops' is the fused CPU kernel of rpe_ops. 'auto'
# takes 'ops' on CPU where rpe_ops is built, else 'sdpa', and 'math' in training with attention dropout.
ATTN_IMPLS: tuple[str, ...] = irpe_attention.ATTN_IMPLS


def _require(cond: bool | torch.SymBool, message: str) -> None:
    """``ValueError(message)`` unless ``cond``; under torch.compile/export a symbolic ``cond`` is a ``torch._check``
    (a guard, or a runtime assertion of the exported program) instead."""
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


@torch.fx.wrap
def image_patch_grid(x: torch.Tensor, patch_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` patch grid of images ``x (B, C, H_img, W_img)``; sides must be multiples of the patch.

    A leaf of ``torch.fx`` tracing (the check runs when the traced graph runs); under ``torch.jit.trace`` the sizes
    are read as Python ints, so the trace is specialised to the traced input's grid (as its iRPE bucket ids are).

    Raises:
        ValueError: a side is not a multiple of the patch size.
    """
    img_h, img_w = x.shape[-2], x.shape[-1]
    if torch.jit.is_tracing():
        img_h, img_w = int(img_h), int(img_w)  # jit.trace reads sizes as 0-dim tensors
    ph, pw = patch_size
    message = f"the image size {img_h}x{img_w} must be a multiple of the patch size {ph}x{pw}"
    _require(img_h % ph == 0, message)
    _require(img_w % pw == 0, message)
    return img_h // ph, img_w // pw


# irpe_attention.rpe_attention is a leaf of torch.fx tracing: its modules compute bucket ids in Python from the grid,
# which symbolic tracing only knows as a proxy.
torch.fx.wrap("rpe_attention")
# timm's resampling branches on sizes: a leaf, so that a dynamic_img_size model traces.
torch.fx.wrap("resample_abs_pos_embed")


def _uses_rpe(rpe_config: irpe.RPEConfigs | None) -> bool:
    """Whether a configuration from :func:`irpe.get_rpe_config` encodes anything at all."""
    return rpe_config is not None and any(getattr(rpe_config, f"rpe_{w}") is not None for w in "qkv")


def _check_attn_impl(attn_impl: str, rpe_config: irpe.RPEConfigs | None, attn_drop: float) -> None:
    """``ValueError`` for an unknown ``attn_impl``, or an explicit one that cannot run this configuration (e.g. a
    fused path with attention dropout): raised when the model is built rather than at its first step."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl={attn_impl!r}; choose one of {ATTN_IMPLS}")
    if attn_impl not in ("auto", "math") and _uses_rpe(rpe_config):
        irpe_attention.resolve_attn_impl(attn_impl, rpe_config.rpe_v is not None, attn_drop, device=None)


class RPEAttention(Attention):
    """timm's multi-head self-attention with iRPE on queries, keys and/or values.

    Args:
        dim: token channels.
        num_heads: attention heads; ``dim`` must be divisible by it.
        qkv_bias: learn a bias in the ``qkv`` projection.
        qk_scale: logit scale; ``None`` gives ``head_dim ** -0.5``.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
        rpe_config: from :func:`irpe.get_rpe_config`; ``None`` gives plain attention.
        attn_impl: attention implementation, one of :data:`ATTN_IMPLS` (see :func:`irpe_attention.rpe_attention`).
        **kwargs: the other arguments of ``timm.layers.Attention`` (``qk_norm``, ``proj_bias``, ``norm_layer``,
            ``device``, ``dtype``, ...).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: AttnImpl = "auto",
        **kwargs: Any,
    ) -> None:
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        super().__init__(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **kwargs
        )
        self.set_rpe(rpe_config, attn_impl=attn_impl, qk_scale=qk_scale)

    def set_rpe(
        self, rpe_config: irpe.RPEConfigs | None, attn_impl: AttnImpl = "auto", qk_scale: float | None = None
    ) -> None:
        """(Re)build the iRPE modules ``rpe_q``, ``rpe_k``, ``rpe_v`` (zero tables) and set the attention path.

        :class:`RPEBlock` calls it after timm's ``Block`` has built the attention, as timm's ``attn_layer`` hook
        passes only timm's own arguments; :func:`add_irpe` calls it on the attention of a timm model.
        """
        _check_attn_impl(attn_impl, rpe_config, self.attn_drop.p)
        modules = irpe.build_rpe(rpe_config, head_dim=self.head_dim, num_heads=self.num_heads)
        self.attn_impl = attn_impl
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        weight = self.qkv.weight
        self.rpe_q, self.rpe_k, self.rpe_v = (
            m if m is None else m.to(device=weight.device, dtype=weight.dtype) for m in modules
        )

    def __prepare_scriptable__(self) -> RPEAttention:
        # torch.jit.script calls this first: say why it cannot work, rather than fail deep inside irpe's modules
        raise RuntimeError(
            "torch.jit.script cannot compile the iRPE attention (irpe's encoding modules and lookups are Python); "
            "use torch.jit.trace, torch.export or torch.onnx.export(..., dynamo=True) instead"
        )

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:g}, attn_impl={self.attn_impl}"

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Attend over ``x (B, L, C)`` laid out as ``L - height * width`` leading tokens then the patch grid.

        Args:
            x: tokens ``(B, L, C)``.
            attn_mask: as ``timm.layers.Attention`` takes it (``F.scaled_dot_product_attention``'s convention: a bool
                True marks a pair that takes part, a float mask is added to the logits), broadcastable to ``(B,
                num_heads, L, L)`` from the right; a query with no key left gets a zero output.
            is_causal: unsupported (image tokens attend in every direction); must be ``False``.
            height: patch-grid rows; pass it (and ``width``) whenever an iRPE module is present.
            width: patch-grid columns.

        Returns:
            ``(B, L, C)``.
        """
        if is_causal:
            raise ValueError("RPEAttention takes no is_causal: image tokens attend in every direction; pass attn_mask")
        if attn_mask is not None:  # rpe_attention's bool masks follow nn.MultiheadAttention: True is masked out
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))  # (.., L, L), 4-D
        B, L, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = rpe_attention(
            q,
            k,
            v,
            self.rpe_q,
            self.rpe_k,
            self.rpe_v,
            height,
            width,
            scale=self.scale,
            dropout_p=dropout_p,
            impl=self.attn_impl,
            attn_mask=attn_mask,
        )  # (B, H, L, d)
        x = self.norm(x.transpose(1, 2).reshape(B, L, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class RPEBlock(Block):
    """timm's pre-norm transformer block with :class:`RPEAttention`, which it passes the patch grid.

    Args:
        dim: token channels.
        num_heads: attention heads.
        rpe_config: iRPE configuration, or ``None``.
        attn_impl: see :class:`RPEAttention`.
        qk_scale: logit scale override.
        **kwargs: the arguments of ``timm.models.vision_transformer.Block`` (``mlp_ratio``, ``qkv_bias``,
            ``proj_drop``, ``attn_drop``, ``drop_path``, ``norm_layer``, ...). ``attn_layer`` is always
            :class:`RPEAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: AttnImpl = "auto",
        qk_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["attn_layer"] = RPEAttention
        super().__init__(dim, num_heads, **kwargs)
        self.attn.set_rpe(rpe_config, attn_impl=attn_impl, qk_scale=qk_scale)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """``x (B, L, C)`` -> ``(B, L, C)``; ``height``/``width`` is the patch grid (see :class:`RPEAttention`)."""
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, height=height, width=width)
        x = x + self.drop_path1(self.ls1(attn))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(TimmVisionTransformer):
    """DeiT/ViT classifier with optional iRPE in every block: timm's ``VisionTransformer`` with :class:`RPEBlock`.

    Args:
        img_size: image size the model is built for (sets ``pos_embed``); int or ``(height, width)``.
        patch_size: square patch side.
        in_chans: input channels.
        num_classes: classes of the head; 0 gives no head (pooled features).
        embed_dim: token channels.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        qkv_bias: learn a bias in the ``qkv`` projections.
        qk_scale: logit scale override (``None``: ``head_dim ** -0.5``).
        drop_rate: DeiT's dropout: after the position embedding, the attention projections and in the MLPs (timm's
            ``pos_drop_rate`` / ``proj_drop_rate`` set them separately); the classifier has none.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, increasing linearly from 0 to this rate over the blocks.
        norm_layer: normalisation factory; ``None`` gives ``LayerNorm(eps=1e-6)`` as every DeiT model uses.
        rpe_config: from :func:`irpe.get_rpe_config`; ``None`` builds the plain DeiT. The class (and distillation)
            token are the ``skip`` leading tokens of iRPE, so ``skip`` must equal the number of prefix tokens.
        attn_impl: attention implementation of every block (see :class:`RPEAttention`).
        distilled: build a :class:`DistilledVisionTransformer` (DeiT's distillation token and head) instead.
        dynamic_img_size: accept any input whose sides are multiples of the patch size (``pos_embed`` is resampled
            to its grid); ``False`` accepts ``img_size`` only.
        **kwargs: other arguments of timm's ``VisionTransformer`` (``global_pool``, ``act_layer``, ``device``, ...).

    Raises:
        ValueError: an iRPE ``skip`` that differs from the number of prefix tokens, or patch dropout (it would drop
            grid cells that the bucket ids refer to).
    """

    def __new__(cls, *args: Any, distilled: bool = False, **kwargs: Any) -> VisionTransformer:
        # VisionTransformer(distilled=True) gives the distilled class, as this project's models always have.
        return super().__new__(DistilledVisionTransformer if distilled else cls)

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: AttnImpl = "auto",
        distilled: bool = False,
        dynamic_img_size: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("patch_drop_rate", 0.0) > 0 and _uses_rpe(rpe_config):
            raise ValueError("patch_drop_rate > 0 drops patches, which the iRPE bucket ids of the grid refer to")
        kwargs.setdefault("pos_drop_rate", drop_rate)
        kwargs.setdefault("proj_drop_rate", drop_rate)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer or partial(nn.LayerNorm, eps=1e-6),
            block_fn=partial(RPEBlock, rpe_config=rpe_config, attn_impl=attn_impl, qk_scale=qk_scale),
            dynamic_img_size=dynamic_img_size,
            **kwargs,
        )
        self.rpe_config = rpe_config
        _check_rpe_skip(rpe_config, self.num_prefix_tokens)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's initialisation, with DeiT's class token (truncated normal, std 0.02); iRPE tables stay zero."""
        super().init_weights(mode=mode, needs_reset=needs_reset)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The ``(height, width)`` patch grid the model was built for."""
        return tuple(self.patch_embed.grid_size)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix tokens and ``pos_embed`` (resampled to the grid with ``dynamic_img_size``) added to the patches.

        What timm's ``VisionTransformer._pos_embed`` and ``VisionTransformerDistilled._pos_embed`` do, for both: the
        prefix is the class token, then the register or distillation token. Ours calls the resampling as a
        ``torch.fx`` leaf, as timm's own traces into its size checks.
        """
        B, C = x.shape[0], x.shape[-1]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token, self._dist_token()) if t is not None]
        if self.pos_embed is None:
            return torch.cat([*prefix, x.view(B, -1, C)], dim=1)
        pos_embed = self.pos_embed  # (1, prefix + N, C), or (1, N, C) with no_embed_class
        if self.dynamic_img_size:
            _, H, W, _ = x.shape  # (B, Gh, Gw, C)
            pos_embed = resample_abs_pos_embed(
                pos_embed,
                new_size=(H, W),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
            x = x.view(B, -1, C)
        if self.no_embed_class:
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        return self.pos_drop(x)  # (B, prefix + N, C)

    def _dist_token(self) -> torch.Tensor | None:
        return None

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Tokens ``(B, prefix + N, C)`` of images ``x``, with their patch grid ``(height, width)``."""
        if self.patch_embed.dynamic_img_pad:
            height, width = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        else:
            height, width = image_patch_grid(x, self.patch_embed.patch_size)
        x = self.patch_embed(x)  # (B, Gh, Gw, C) with dynamic_img_size, else (B, N, C)
        x = self._pos_embed(x)  # (B, prefix + N, C)
        return self.norm_pre(self.patch_drop(x)), height, width

    def _block(self, block: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x, height=height, width=width)
        return block(x, height=height, width=width)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Normalised tokens ``(B, prefix + N, C)`` of images ``x (B, in_chans, H_img, W_img)``.

        ``attn_mask`` and ``is_causal`` (timm's signature) must be left unset.
        """
        if attn_mask is not None or is_causal:
            raise ValueError("iRPE models take no attn_mask and no is_causal")
        x, height, width = self._embed(x)
        for block in self.blocks:
            x = self._block(block, x, height, width)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H_img, W_img)`` -> logits ``(B, num_classes)`` (pooled features without a head).

        Unlike timm's ViT, no ``attn_mask``/``is_causal``: every token attends to every token. That also keeps them
        out of ``torch.fx`` traces, whose inputs are the forward's arguments.
        """
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """Block outputs as timm's ``VisionTransformer.forward_intermediates`` gives them (same arguments).

        Args:
            x: images ``(B, in_chans, H_img, W_img)``.
            indices: blocks to take: the last ``n`` for an int, these for a list, all for ``None``.
            return_prefix_tokens: pair every intermediate with its prefix tokens ``(B, prefix, C)``.
            norm: apply the final norm to the intermediates.
            stop_early: run no block after the last one taken.
            output_fmt: ``'NCHW'`` (``(B, C, height, width)``) or ``'NLC'`` (``(B, N, C)``) patch tokens.
            intermediates_only: return the intermediates only.
            output_dict: return ``{'image_intermediates', 'image_intermediates_prefix', 'image_features'}``.
            attn_mask: must be ``None``; is_causal: must be ``False`` (timm's signature).

        Returns:
            ``(final normalised tokens, intermediates)``, the intermediates alone, or the dict.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("iRPE models take no attn_mask and no is_causal")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, height, width = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._block(block, x, height, width)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]  # (B, prefix, C)
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]  # (B, N, C)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, height, width, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


class DistilledVisionTransformer(VisionTransformer, VisionTransformerDistilled):
    """DeiT with a distillation token and head, timm's ``VisionTransformerDistilled`` with :class:`RPEBlock`.

    Takes the arguments of :class:`VisionTransformer`. As timm's, it returns ``(logits, logits_dist)`` only in
    training mode after ``set_distilled_training(True)``, and their mean otherwise.
    """

    def __init__(self, *args: Any, distilled: bool = True, **kwargs: Any) -> None:
        if distilled is not True:
            raise ValueError("DistilledVisionTransformer is always distilled; use VisionTransformer instead")
        super().__init__(*args, **kwargs)

    def _dist_token(self) -> torch.Tensor | None:
        return self.dist_token


def _check_rpe_skip(rpe_config: irpe.RPEConfigs | None, num_prefix_tokens: int) -> None:
    """The class (and distillation) tokens are iRPE's skip tokens: the configuration must reserve exactly them."""
    if not _uses_rpe(rpe_config):
        return
    for which in "qkv":
        single = getattr(rpe_config, f"rpe_{which}")
        if single is not None and single.skip != num_prefix_tokens:
            raise ValueError(
                f"rpe_{which} has skip={single.skip}, but the model has {num_prefix_tokens} prefix token(s) (class "
                f"token, distillation token): build the configuration with get_rpe_config(..., skip="
                f"{num_prefix_tokens})"
            )


# ----------------------------------------------------------------------------------------------------------------
# iRPE in a timm ViT: add_irpe


# The timm classes add_irpe retrofits, and the class of this file each becomes. Both of ours add only the overrides
# that hand the patch grid to the blocks (`_embed`, `forward_features`, `forward_intermediates`); every parameter,
# buffer and attribute timm's constructor made stays as it is.
_RETROFIT_CLASSES: dict[type, type] = {
    TimmVisionTransformer: VisionTransformer,
    VisionTransformerDistilled: DistilledVisionTransformer,
    VisionTransformer: VisionTransformer,
    DistilledVisionTransformer: DistilledVisionTransformer,
}


@dataclass(frozen=True)
class IRPESpec:
    """The iRPE that :func:`add_irpe` puts into a model, written as ``main.py --irpe`` takes it.

    Text form: ``METHOD,MODE,ON[,ratio=R][,shared_head=false]``, e.g. ``product,ctx,qkv`` or
    ``euc,bias,k,ratio=20``. The fields are canonicalised (``contextual`` -> ``ctx``, ``kq`` -> ``qk``), so equal
    encodings have equal text.

    Attributes:
        method: ``'euc'``, ``'quant'``, ``'cross'`` or ``'product'``.
        mode: ``'ctx'`` (contextual: a vector per bucket) or ``'bias'`` (a scalar per bucket).
        rpe_on: where the encodings are: any of ``'q'``, ``'k'``, ``'v'`` (values need ``ctx``).
        ratio: scale of the piecewise index (``alpha, beta, gamma = ratio * (1, 2, 8)``); sets the bucket count.
        shared_head: one table for all heads (``True``) or one per head.
    """

    method: str = "product"
    mode: str = "ctx"
    rpe_on: str = "k"
    ratio: float = 1.9
    shared_head: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("euc", "quant", "cross", "product"):
            raise ValueError(f"unknown iRPE method {self.method!r}: use euc, quant, cross or product")
        mode = {"ctx": "ctx", "contextual": "ctx", "bias": "bias"}.get(self.mode)
        if mode is None:
            raise ValueError(f"unknown iRPE mode {self.mode!r}: use ctx (contextual) or bias")
        on = self.rpe_on
        if not on or set(on) - set("qkv") or len(set(on)) != len(on):
            raise ValueError(f"iRPE on {on!r}: name where the encodings go with the letters q, k, v (e.g. k, qkv)")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "rpe_on", "".join(w for w in "qkv" if w in on))
        irpe.get_rpe_config(self.ratio, self.method, self.mode, self.shared_head, rpe_on=self.rpe_on)  # the rest

    @classmethod
    def parse(cls, text: str) -> IRPESpec:
        """The spec of ``text`` (see the class docstring).

        Raises:
            ValueError: what is wrong with ``text``, and the form it should take.
        """
        form = "METHOD,MODE,ON[,ratio=R][,shared_head=false], e.g. product,ctx,k or euc,bias,qk,ratio=20"
        parts = [p.strip() for p in text.lower().split(",")]
        if len(parts) < 3 or any("=" in p for p in parts[:3]):
            raise ValueError(f"{text!r} is not an iRPE spec: write {form}")
        options: dict[str, Any] = {}
        for part in parts[3:]:
            key, _, value = part.partition("=")
            if key == "ratio":
                try:
                    options["ratio"] = float(value)
                except ValueError:
                    raise ValueError(f"{text!r}: ratio={value!r} is not a number (e.g. ratio=1.9)") from None
            elif key == "shared_head" and value in ("true", "false"):
                options["shared_head"] = value == "true"
            else:
                raise ValueError(f"{text!r}: unknown option {part!r}; the options are ratio=R, shared_head=true|false")
        return cls(*parts[:3], **options)

    def __str__(self) -> str:
        text = f"{self.method},{self.mode},{self.rpe_on}"
        if self.ratio != IRPESpec.ratio:
            text += f",ratio={float(self.ratio)!r}"
        return text if self.shared_head else f"{text},shared_head=false"


def _retrofit_problems(model: nn.Module) -> list[str]:
    """What keeps :func:`add_irpe` from putting iRPE into ``model``; empty when it can."""
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if type(model) not in _RETROFIT_CLASSES:
        return [
            f"{kind} is not timm's VisionTransformer or VisionTransformerDistilled (add_irpe covers ViT, DeiT, "
            "DeiT-III, ViTs with registers, DINOv2, CLIP- and SigLIP-style ViTs); windowed or hierarchical attention "
            "(Swin, MViT, ...) has no single patch grid, and models with attention of their own (EVA, BEiT, RoPE "
            "ViTs, ...) are not built on timm's Attention"
        ]
    problems = []
    if _uses_rpe(getattr(model, "rpe_config", None)):
        problems.append("the model has iRPE already (rpe_config is set): build it without an rpe_config instead")
    if type(model.patch_embed) is not PatchEmbed:
        problems.append(
            f"its patch embedding is {type(model.patch_embed).__name__}, not timm's PatchEmbed (hybrid CNN stems "
            "are not supported)"
        )
    if not isinstance(model.patch_drop, nn.Identity):
        problems.append("it drops patches (patch_drop_rate > 0), which the iRPE bucket ids of the grid refer to")
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) not in (Block, RPEBlock) or type(attn) not in (Attention, RPEAttention):
            with_attn = f" with {type(attn).__name__}" if attn is not None else ""
            problems.append(
                f"block {i} is {type(block).__name__}{with_attn}, not timm's Block with its Attention (parallel, "
                "post-norm or differential attention blocks are not supported)"
            )
            break
    return problems


def add_irpe(
    model: nn.Module,
    *,
    ratio: float = 1.9,
    method: str | irpe.METHOD = "product",
    mode: str = "ctx",
    shared_head: bool = True,
    rpe_on: str = "k",
    attn_impl: AttnImpl = "auto",
) -> nn.Module:
    """Put iRPE into every block of a timm ViT, pretrained or not, in place; returns ``model``.

    Covers timm's ``VisionTransformer`` (class token or global pooling, register tokens, ``dynamic_img_size``,
    ``dynamic_img_pad``, qk-norm, layer scale, MAP pooling) and ``VisionTransformerDistilled`` built with timm's
    ``Block`` and ``Attention``, and a ``features_only=True`` wrapper of one (timm's ``FeatureGetterNet``). Each
    attention becomes :class:`RPEAttention` and each block :class:`RPEBlock` (same parameters, same names), and the
    model this file's :class:`VisionTransformer` (or :class:`DistilledVisionTransformer`), whose forward hands the
    blocks the patch grid of every input, as the iRPE models of this project do. So a checkpoint of the original
    model loads with ``strict=False`` missing only the iRPE tables, and the model computes what it computed before
    until training moves the tables (they start at zero). The encodings' ``skip`` is the model's prefix-token count
    (class, register and distillation tokens).

    Args:
        model: the timm model (changed in place).
        ratio: scale of the piecewise index (``alpha, beta, gamma = ratio * (1, 2, 8)``).
        method: ``'euc'``, ``'quant'``, ``'cross'``, ``'product'`` or an :class:`irpe.METHOD`.
        mode: ``'ctx'``/``'contextual'`` or ``'bias'``.
        shared_head: one table for all heads, or one per head.
        rpe_on: where the encodings go: any of ``'q'``, ``'k'``, ``'v'``.
        attn_impl: the attention path of every block (see :class:`RPEAttention`).

    Returns:
        ``model``, with iRPE.

    Raises:
        ValueError: a model this cannot retrofit (with the reason; the model is left unchanged), or a bad setting.
    """
    target = model.model if isinstance(model, FeatureGetterNet) else model
    problems = _retrofit_problems(target)
    if problems:
        raise ValueError(f"add_irpe cannot put iRPE into this model: {'; '.join(problems)}")
    config = irpe.get_rpe_config(ratio, method, mode, shared_head, skip=target.num_prefix_tokens, rpe_on=rpe_on)
    if not _uses_rpe(config):
        raise ValueError(f"mode={mode!r}, rpe_on={rpe_on!r} encode nothing: use mode 'ctx' or 'bias' and rpe_on 'k'")
    for block in target.blocks:
        _check_attn_impl(attn_impl, config, block.attn.attn_drop.p)
    target.__class__ = _RETROFIT_CLASSES[type(target)]
    target.rpe_config = config
    for block in target.blocks:
        block.__class__ = RPEBlock
        block.attn.__class__ = RPEAttention
        block.attn.set_rpe(config, attn_impl=attn_impl, qk_scale=block.attn.scale)
    return model
