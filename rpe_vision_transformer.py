"""Vision Transformer (DeiT) with image relative position encoding (iRPE).

Reference: Kan Wu, Houwen Peng, Minghao Chen, Jianlong Fu, Hongyang Chao, "Rethinking and Improving Relative
Position Encoding for Vision Transformer", ICCV 2021 (https://arxiv.org/abs/2107.14222), on top of DeiT
(Touvron et al., "Training data-efficient image transformers & distillation through attention", ICML 2021).

The layers come from timm (``PatchEmbed``, ``Mlp``, ``DropPath``, ``trunc_normal_``); only the attention is ours,
because iRPE adds terms inside the softmax (queries, keys) and after it (values). Parameter names follow the
timm-0.3 ViT layout of the released DeiT and iRPE checkpoints (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``; ``dist_token`` and
``head_dist`` for distilled models; iRPE tables at ``blocks.{i}.attn.rpe_{q,k,v}.*``), so those checkpoints load
with ``strict=True``.

Resolution policy: a model is built for ``img_size`` (an int or ``(height, width)``; non-square works), which sets
the size of ``pos_embed``. At run time any input whose sides are multiples of ``patch_size`` is accepted: the patch
grid ``(height, width)`` is read from the patch embedding, ``pos_embed`` is resampled bicubically to that grid when
it differs from the built one (as DeiT does when fine-tuning at 384), and the grid is passed to every iRPE module,
which computes its bucket ids for it. Nothing ever guesses the grid from the sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch import nn

import irpe

__all__ = ["ATTN_IMPLS", "RPEAttention", "RPEBlock", "VisionTransformer", "DistilledVisionTransformer"]

AttnImpl = Literal["auto", "math", "sdpa", "flex", "ops"]
# Attention implementations RPEAttention can run (see irpe.rpe_attention): 'math' materialises the (B, H, L, L)
# probabilities; 'sdpa' runs the fused kernel with the iRPE bias and keeps nothing L x L for backward; 'flex' adds
# the bias inside FlexAttention; 'auto' takes 'sdpa' where it is exact (no iRPE on values, no attention dropout).
ATTN_IMPLS: tuple[str, ...] = irpe.ATTN_IMPLS


def _uses_rpe(rpe_config: irpe.RPEConfigs | None) -> bool:
    """Whether a configuration from :func:`irpe.get_rpe_config` encodes anything at all."""
    if rpe_config is None:
        return False
    return any(getattr(rpe_config, f"rpe_{w}") is not None for w in "qkv")


class RPEAttention(nn.Module):
    """Multi-head self-attention with iRPE on queries, keys and/or values.

    Args:
        dim: token channels.
        num_heads: attention heads; ``dim`` must be divisible by it.
        qkv_bias: learn a bias in the ``qkv`` projection.
        qk_scale: logit scale; ``None`` gives ``head_dim ** -0.5``.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
        rpe_config: from :func:`irpe.get_rpe_config`; ``None`` gives plain attention.
        attn_impl: attention implementation, one of :data:`ATTN_IMPLS` (see :func:`irpe.rpe_attention`).
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
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl={attn_impl!r}; choose one of {ATTN_IMPLS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.attn_impl = attn_impl

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_q, self.rpe_k, self.rpe_v = irpe.build_rpe(rpe_config, head_dim=self.head_dim, num_heads=num_heads)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:g}, attn_impl={self.attn_impl}"

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Attend over ``x (B, L, C)`` laid out as ``L - height * width`` leading tokens then the patch grid.

        Args:
            x: tokens ``(B, L, C)``.
            height: patch-grid rows; pass it (and ``width``) whenever an iRPE module is present.
            width: patch-grid columns.

        Returns:
            ``(B, L, C)``.
        """
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, d) each
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = irpe.rpe_attention(
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
        )  # (B, H, L, d)
        out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))


class RPEBlock(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(RPEAttention(norm1(x)))``, then ``x + DropPath(Mlp(norm2(x)))``.

    Args:
        dim: token channels.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: learn a bias in the ``qkv`` projection.
        qk_scale: logit scale override.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic-depth rate of both residual branches.
        act_layer: MLP activation.
        norm_layer: normalisation layer factory.
        rpe_config: iRPE configuration, or ``None``.
        attn_impl: see :class:`RPEAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RPEAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            rpe_config=rpe_config,
            attn_impl=attn_impl,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``x (B, L, C)`` -> ``(B, L, C)``; ``height``/``width`` is the patch grid (see :class:`RPEAttention`)."""
        x = x + self.drop_path(self.attn(self.norm1(x), height=height, width=width))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def _init_weights(module: nn.Module) -> None:
    """DeiT/timm-0.3 initialisation: truncated-normal linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """DeiT/ViT classifier with optional iRPE in every block.

    Args:
        img_size: image size the model is built for (sets ``pos_embed``); int or ``(height, width)``.
        patch_size: square patch side.
        in_chans: input channels.
        num_classes: classes of the head; 0 gives an identity head (features).
        embed_dim: token channels.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        qkv_bias: learn a bias in the ``qkv`` projections.
        qk_scale: logit scale override (``None``: ``head_dim ** -0.5``).
        drop_rate: dropout after the position embedding, in the MLPs and after attention projections.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, increasing linearly from 0 to this rate over the blocks.
        norm_layer: normalisation factory; ``None`` gives ``LayerNorm(eps=1e-6)`` as every DeiT model uses.
        act_layer: MLP activation; ``None`` gives GELU.
        rpe_config: from :func:`irpe.get_rpe_config`; ``None`` builds the plain DeiT. The class (and distillation)
            token are the ``skip`` leading tokens of iRPE, so an iRPE configuration needs ``skip >= 1``.
        distilled: add the DeiT distillation token and head (see :class:`DistilledVisionTransformer`).
        attn_impl: attention implementation of every block (see :class:`RPEAttention`).
    """

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
        act_layer: Callable[..., nn.Module] | None = None,
        rpe_config: irpe.RPEConfigs | None = None,
        distilled: bool = False,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        _check_rpe_skip(rpe_config)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.rpe_config = rpe_config

        # strict_img_size=False: other resolutions are fine as long as they are multiples of the patch size
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth: linear decay rule
        self.blocks = nn.ModuleList(
            RPEBlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                rpe_config=rpe_config,
                attn_impl=attn_impl,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (
            (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if distilled else None
        )

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        self.apply(_init_weights)  # iRPE lookup tables are not Linear/LayerNorm: they keep their zero init

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The ``(height, width)`` patch grid the model was built for."""
        return tuple(self.patch_embed.grid_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay, as DeiT."""
        return {"pos_embed", "cls_token", "dist_token"} if self.distilled else {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) by freshly initialised ones with ``num_classes`` outputs (0: identity)."""
        self.num_classes = num_classes
        for name in ("head", "head_dist") if self.distilled else ("head",):
            head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            head.apply(_init_weights)
            setattr(self, name, head.to(self.cls_token.device, self.cls_token.dtype))

    def _pos_embed_for(self, height: int, width: int) -> torch.Tensor:
        """``pos_embed`` for a ``height x width`` patch grid: resampled when it is not the built grid."""
        if (height, width) == self.patch_grid:
            return self.pos_embed  # (1, prefix + N, C)
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=[height, width],
            old_size=list(self.patch_grid),
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(B, prefix + N, C)`` of images ``x (B, in_chans, H_img, W_img)``."""
        B, _, img_h, img_w = x.shape
        ph, pw = self.patch_embed.patch_size
        if img_h % ph != 0 or img_w % pw != 0:
            raise ValueError(f"the image size {img_h}x{img_w} must be a multiple of the patch size {ph}x{pw}")
        x = self.patch_embed(x)  # (B, Gh, Gw, C)
        _, height, width, C = x.shape
        x = x.reshape(B, height * width, C)  # (B, N, C), row-major as iRPE's bucket ids
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat([*prefix, x], dim=1)  # (B, prefix + N, C)
        x = self.pos_drop(x + self._pos_embed_for(height, width))
        for block in self.blocks:
            x = block(x, height=height, width=width)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits from the normalised tokens (class token; the distilled model also uses the distillation token).

        The distilled model returns ``(logits, logits_dist)`` in training mode and their mean in eval mode, as DeiT.
        """
        if pre_logits:
            return x[:, 0] if not self.distilled else (x[:, 0], x[:, 1])
        logits = self.head(x[:, 0])  # (B, num_classes)
        if not self.distilled:
            return logits
        logits_dist = self.head_dist(x[:, 1])  # (B, num_classes)
        if self.training and not torch.jit.is_scripting():
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, in_chans, H_img, W_img)`` -> logits ``(B, num_classes)`` (see :meth:`forward_head`)."""
        return self.forward_head(self.forward_features(x))


class DistilledVisionTransformer(VisionTransformer):
    """DeiT with a distillation token and head: ``VisionTransformer(..., distilled=True)``."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.pop("distilled", True) is not True:
            raise ValueError("DistilledVisionTransformer is always distilled; use VisionTransformer instead")
        super().__init__(*args, distilled=True, **kwargs)


def _check_rpe_skip(rpe_config: irpe.RPEConfigs | None) -> None:
    """The class token is always present: an iRPE configuration must reserve a skip bucket for it."""
    if not _uses_rpe(rpe_config):
        return
    for which in "qkv":
        single = getattr(rpe_config, f"rpe_{which}")
        if single is not None and single.skip < 1:
            raise ValueError(
                f"rpe_{which} has skip={single.skip}, but the VisionTransformer prepends a class token: build the "
                "configuration with get_rpe_config(..., skip=1)"
            )
