"""Vision Transformer (DeiT) with image relative position encoding (iRPE), built on timm's own ViT classes.

Reference: Kan Wu, Houwen Peng, Minghao Chen, Jianlong Fu, Hongyang Chao, "Rethinking and Improving Relative
Position Encoding for Vision Transformer", ICCV 2021 (https://arxiv.org/abs/2107.14222), on top of DeiT
(Touvron et al., "Training data-efficient image transformers & distillation through attention", ICML 2021).

The classes subclass timm's ``Attention``, ``Block``, ``VisionTransformer`` and ``VisionTransformerDistilled``, so they
have what timm's ViT has (``features_only``, ``forward_intermediates``, grad checkpointing, ``group_matcher``,
``reset_classifier``, ``dynamic_img_size``). Only the attention is ours, as iRPE adds terms inside the softmax (queries,
keys) and after it (values); as timm's ``eva.py`` hands its rotary embedding to every block, the model hands every
block the patch grid ``(height, width)`` of its input, from which the iRPE modules compute their bucket ids: nothing
guesses the grid from the sequence length. :func:`add_irpe` turns a model of timm's own classes into these, in place.
Parameter names are those of the released DeiT and iRPE checkpoints (iRPE tables at ``blocks.{i}.attn.rpe_{q,k,v}.*``).

Tracing: the grid checks raise ``ValueError`` in eager mode and are ``torch._check`` assertions under
``torch.compile`` / ``torch.export``; :func:`image_patch_grid`, ``rpe_attention`` and ``resample_abs_pos_embed`` are
``torch.fx`` leaves, so FX feature extractors work; ``torch.jit.trace`` records the traced input's grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
# The attention paths of RPEAttention (see irpe_attention.rpe_attention); 'auto' takes the fastest that can run.
ATTN_IMPLS: tuple[str, ...] = irpe_attention.ATTN_IMPLS


@torch.fx.wrap
def image_patch_grid(x: torch.Tensor, patch_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` patch grid of images ``x (B, C, H_img, W_img)``; ``ValueError`` unless the sides are
    multiples of the patch.

    A leaf of ``torch.fx`` tracing (the check runs when the traced graph runs); under ``torch.jit.trace`` the sizes
    are read as Python ints, so the trace is specialised to the traced input's grid (as its iRPE bucket ids are).
    """
    img_h, img_w = x.shape[-2], x.shape[-1]
    if torch.jit.is_tracing():
        img_h, img_w = int(img_h), int(img_w)  # jit.trace reads sizes as 0-dim tensors
    ph, pw = patch_size
    message = f"the image size {img_h}x{img_w} must be a multiple of the patch size {ph}x{pw}"
    for divisible in (img_h % ph == 0, img_w % pw == 0):
        if isinstance(divisible, torch.SymBool):  # torch.compile/export: a guard, or an assertion of the program
            torch._check(divisible, lambda: message)
        elif not divisible:
            raise ValueError(message)
    return img_h // ph, img_w // pw


# Leaves of torch.fx tracing: the iRPE modules compute bucket ids in Python from the grid (a proxy to symbolic
# tracing), and timm's resampling branches on sizes.
torch.fx.wrap("rpe_attention")
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
        dim: token channels, a multiple of ``num_heads``.
        num_heads: attention heads.
        rpe_config: from :func:`irpe.get_rpe_config`; ``None`` gives plain attention.
        attn_impl: attention implementation, one of :data:`ATTN_IMPLS` (see :func:`irpe_attention.rpe_attention`).
        qk_scale: logit scale; ``None`` gives ``head_dim ** -0.5``.
        **kwargs: the other arguments of ``timm.layers.Attention`` (``qkv_bias``, ``attn_drop``, ``proj_drop``,
            ``qk_norm``, ``norm_layer``, ``device``, ``dtype``, ...).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: AttnImpl = "auto",
        qk_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.set_rpe(rpe_config, attn_impl=attn_impl, qk_scale=qk_scale)

    def set_rpe(
        self, rpe_config: irpe.RPEConfigs | None, attn_impl: AttnImpl = "auto", qk_scale: float | None = None
    ) -> None:
        """(Re)build the iRPE modules ``rpe_q``, ``rpe_k``, ``rpe_v`` (zero tables), set the path and the logit scale
        (``qk_scale=None`` keeps it); the models and :func:`add_irpe` call it on every attention after timm built it.
        """
        _check_attn_impl(attn_impl, rpe_config, self.attn_drop.p)
        modules = irpe.build_rpe(rpe_config, head_dim=self.head_dim, num_heads=self.num_heads)
        weight = self.qkv.weight
        self.rpe_q, self.rpe_k, self.rpe_v = (m if m is None else m.to(weight.device, weight.dtype) for m in modules)
        self.attn_impl = attn_impl
        self.scale = qk_scale if qk_scale is not None else self.scale

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
        """Attend over ``x (B, L, C)``: ``L - height * width`` leading tokens, then the patch grid; ``(B, L, C)``.

        Args:
            x: tokens ``(B, L, C)``.
            attn_mask: as ``timm.layers.Attention`` takes it (``F.scaled_dot_product_attention``'s convention: a bool
                True marks a pair that takes part, a float mask is added to the logits), broadcastable to ``(B,
                num_heads, L, L)`` from the right; a query with no key left gets a zero output.
            is_causal: unsupported (image tokens attend in every direction); must be ``False``.
            height, width: the patch grid (rows, columns); required whenever an iRPE module is present.
        """
        if is_causal:
            raise ValueError("RPEAttention takes no is_causal: image tokens attend in every direction; pass attn_mask")
        if attn_mask is not None:  # rpe_attention's bool masks follow nn.MultiheadAttention: True is masked out
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))  # (.., L, L), 4-D
        B, L, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        rpe = (self.rpe_q, self.rpe_k, self.rpe_v)
        p_drop = self.attn_drop.p if self.training else 0.0
        x = rpe_attention(
            q, k, v, *rpe, height, width, scale=self.scale, dropout_p=p_drop, impl=self.attn_impl, attn_mask=attn_mask
        )  # (B, H, L, d)
        x = self.norm(x.transpose(1, 2).reshape(B, L, self.attn_dim))
        return self.proj_drop(self.proj(x if gate is None else x * gate))


class RPEBlock(Block):
    """timm's pre-norm transformer block that passes the patch grid to its :class:`RPEAttention`.

    Built as timm's ``Block`` with ``attn_layer=RPEAttention``; :meth:`RPEAttention.set_rpe` then sets the iRPE.
    """

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        """``x (B, L, C)`` -> ``(B, L, C)``; ``attn_kwargs`` (``height``, ``width``, ...) go to the attention."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _check_rpe_skip(rpe_config: irpe.RPEConfigs | None, num_prefix_tokens: int) -> None:
    """The class (and distillation) tokens are iRPE's skip tokens: the configuration must reserve exactly them."""
    singles = [rpe_config.rpe_q, rpe_config.rpe_k, rpe_config.rpe_v] if rpe_config is not None else []
    wrong = {single.skip for single in singles if single is not None} - {num_prefix_tokens}
    if wrong:
        raise ValueError(
            f"the iRPE has skip={wrong.pop()}, but the model has {num_prefix_tokens} prefix token(s) (class token, "
            f"distillation token): build the configuration with get_rpe_config(..., skip={num_prefix_tokens})"
        )


class VisionTransformer(TimmVisionTransformer):
    """DeiT/ViT classifier with optional iRPE in every block: timm's ``VisionTransformer`` with :class:`RPEBlock`.

    Takes timm's arguments (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``,
    ``drop_path_rate``, ``device``, ...; the norm is DeiT's ``LayerNorm(eps=1e-6)``) and these, whose defaults or
    meanings differ from timm's:

    Args:
        qkv_bias: learn a bias in the ``qkv`` projections.
        qk_scale: logit scale override (``None``: ``head_dim ** -0.5``).
        drop_rate: DeiT's dropout: after the position embedding, the attention projections and in the MLPs (timm's
            ``pos_drop_rate`` / ``proj_drop_rate`` set them separately); the classifier has none.
        rpe_config: from :func:`irpe.get_rpe_config`; ``None`` builds the plain DeiT. Its ``skip`` must equal the
            number of prefix tokens (class and distillation tokens): ``ValueError`` otherwise.
        attn_impl: attention implementation of every block (see :class:`RPEAttention`).
        distilled: build a :class:`DistilledVisionTransformer` (DeiT's distillation token and head) instead.
        dynamic_img_size: accept any input whose sides are multiples of the patch size (``pos_embed`` is resampled
            to its grid); ``False`` accepts ``img_size`` only.
        **kwargs: timm's other arguments; a ``patch_drop_rate`` with iRPE is a ``ValueError`` (it would drop grid
            cells that the bucket ids refer to).
    """

    def __new__(cls, *args: Any, distilled: bool = False, **kwargs: Any) -> VisionTransformer:
        # VisionTransformer(distilled=True) gives the distilled class, as this project's models always have.
        return super().__new__(DistilledVisionTransformer if distilled else cls)

    def __init__(
        self,
        *args: Any,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: AttnImpl = "auto",
        distilled: bool = False,
        dynamic_img_size: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("patch_drop_rate", 0.0) > 0 and _uses_rpe(rpe_config):
            raise ValueError("patch_drop_rate > 0 drops patches, which the iRPE bucket ids of the grid refer to")
        kwargs = {"pos_drop_rate": drop_rate, "proj_drop_rate": drop_rate, **kwargs}  # DeiT's drop_rate
        blocks = dict(block_fn=RPEBlock, attn_layer=RPEAttention)
        super().__init__(*args, qkv_bias=qkv_bias, dynamic_img_size=dynamic_img_size, **blocks, **kwargs)
        _check_rpe_skip(rpe_config, self.num_prefix_tokens)
        self.rpe_config = rpe_config
        for block in self.blocks:
            block.attn.set_rpe(rpe_config, attn_impl=attn_impl, qk_scale=qk_scale)

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
        """Patches ``x`` (``(B, Gh, Gw, C)`` with ``dynamic_img_size``, else ``(B, N, C)``) -> ``(B, prefix + N, C)``.

        What timm's ``VisionTransformer._pos_embed`` and ``VisionTransformerDistilled._pos_embed`` do, for both (the
        prefix is the class token, then the register or distillation tokens), with the resampling of ``pos_embed`` as
        a ``torch.fx`` leaf: plain ``torch.fx.symbolic_trace`` cannot trace timm's, which branches on sizes.
        """
        B, C = x.shape[0], x.shape[-1]
        prefix = [self.cls_token, self.reg_token, getattr(self, "dist_token", None)]
        prefix = [t.expand(B, -1, -1) for t in prefix if t is not None]  # (B, 1 or reg_tokens, C) each
        if self.pos_embed is None:
            return torch.cat([*prefix, x.view(B, -1, C)], dim=1)
        pos_embed = self.pos_embed  # (1, prefix + N, C), or (1, N, C) with no_embed_class
        if self.dynamic_img_size:
            num_prefix_tokens = 0 if self.no_embed_class else self.num_prefix_tokens
            grid = (x.shape[1], x.shape[2])
            pos_embed = resample_abs_pos_embed(pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens)
            x = x.view(B, -1, C)
        if self.no_embed_class:
            return self.pos_drop(torch.cat([*prefix, x + pos_embed], dim=1))
        return self.pos_drop(torch.cat([*prefix, x], dim=1) + pos_embed)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Tokens ``(B, prefix + N, C)`` of images ``x``, with their patch grid ``(height, width)``."""
        if self.patch_embed.dynamic_img_pad:
            height, width = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        else:
            height, width = image_patch_grid(x, self.patch_embed.patch_size)
        x = self._pos_embed(self.patch_embed(x))  # (B, prefix + N, C)
        return self.norm_pre(self.patch_drop(x)), height, width

    def _block(self, block: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.grad_checkpointing:
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

        No ``attn_mask``/``is_causal`` (every token attends to every token): they stay out of ``torch.fx`` traces.
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

        The intermediates are ``(B, C, height, width)`` for ``output_fmt='NCHW'``, ``(B, N, C)`` for ``'NLC'``; with
        ``return_prefix_tokens`` each is paired with its prefix tokens ``(B, prefix, C)``. Returns ``(final normalised
        tokens, intermediates)``, the intermediates alone, or the dict of ``output_dict=True``. ``attn_mask`` and
        ``is_causal`` must be left unset.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("iRPE models take no attn_mask and no is_causal")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, height, width = self._embed(x)
        intermediates = []
        for i, block in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = self._block(block, x, height, width)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]  # (B, prefix, C)
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]  # (B, N, C)
        if output_fmt == "NCHW":
            intermediates = [y.unflatten(1, (height, width)).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (self.norm(x), intermediates)


class DistilledVisionTransformer(VisionTransformer, VisionTransformerDistilled):
    """DeiT with a distillation token and head, timm's ``VisionTransformerDistilled`` with :class:`RPEBlock`.

    Takes the arguments of :class:`VisionTransformer`. As timm's, it returns ``(logits, logits_dist)`` only in
    training mode after ``set_distilled_training(True)``, and their mean otherwise.
    """

    def __init__(self, *args: Any, distilled: bool = True, **kwargs: Any) -> None:
        if distilled is not True:
            raise ValueError("DistilledVisionTransformer is always distilled; use VisionTransformer instead")
        super().__init__(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# iRPE in a timm ViT: add_irpe


@dataclass(frozen=True)
class IRPESpec:
    """The iRPE that ``main.py --irpe`` puts into a model: ``add_irpe(model, **asdict(spec))``.

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
        on = self.rpe_on
        if self.method not in ("euc", "quant", "cross", "product"):
            raise ValueError(f"unknown iRPE method {self.method!r}: use euc, quant, cross or product")
        if self.mode not in ("ctx", "contextual", "bias"):
            raise ValueError(f"unknown iRPE mode {self.mode!r}: use ctx (contextual) or bias")
        if not on or set(on) - set("qkv") or len(set(on)) != len(on):
            raise ValueError(f"iRPE on {on!r}: name where the encodings go with the letters q, k, v (e.g. k, qkv)")
        object.__setattr__(self, "mode", "bias" if self.mode == "bias" else "ctx")
        object.__setattr__(self, "rpe_on", "".join(w for w in "qkv" if w in on))
        irpe.get_rpe_config(**asdict(self))  # the rest: a positive ratio, no bias mode on values

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


# The timm classes add_irpe retrofits, and the class of this file each becomes (ours stay as they are).
_RETROFIT_CLASSES = {TimmVisionTransformer: VisionTransformer, VisionTransformerDistilled: DistilledVisionTransformer}
_RETROFIT_CLASSES |= {cls: cls for cls in _RETROFIT_CLASSES.values()}


def _retrofit_problems(model: nn.Module) -> list[str]:
    """What keeps :func:`add_irpe` from putting iRPE into ``model``; empty when it can."""
    if type(model) not in _RETROFIT_CLASSES:
        return [
            f"{type(model).__module__}.{type(model).__qualname__} is not timm's VisionTransformer or "
            "VisionTransformerDistilled (add_irpe covers ViT, DeiT, DeiT-III, ViTs with registers, DINOv2, CLIP- and "
            "SigLIP-style ViTs); windowed or hierarchical attention (Swin, MViT, ...) has no single patch grid, and "
            "models with attention of their own (EVA, BEiT, RoPE ViTs, ...) are not built on timm's Attention"
        ]
    problems = []
    if _uses_rpe(getattr(model, "rpe_config", None)):
        problems.append("the model has iRPE already (rpe_config is set): build it without an rpe_config instead")
    if type(model.patch_embed) is not PatchEmbed:
        stem = type(model.patch_embed).__name__
        problems.append(f"its patch embedding is {stem}, not timm's PatchEmbed (CNN stems are not supported)")
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


def add_irpe(model: nn.Module, *, attn_impl: AttnImpl = "auto", **rpe_args: Any) -> nn.Module:
    """Put iRPE into every block of a timm ViT, pretrained or not, in place; returns ``model``.

    Covers timm's ``VisionTransformer`` (class token or global pooling, register tokens, ``dynamic_img_size``,
    ``dynamic_img_pad``, qk-norm, layer scale, MAP pooling) and ``VisionTransformerDistilled`` built with timm's
    ``Block`` and ``Attention``, and timm's ``features_only=True`` wrapper of one. The model becomes this file's
    :class:`VisionTransformer` (or :class:`DistilledVisionTransformer`), its blocks and attentions ours: the same
    parameters under the same names, plus zero tables, so it computes what it did until training moves them (and its
    checkpoints load with ``strict=False``). The ``skip`` of iRPE is the model's prefix-token count.

    Args:
        model: the timm model (changed in place).
        attn_impl: the attention path of every block (see :class:`RPEAttention`).
        **rpe_args: ``ratio``, ``method``, ``mode``, ``shared_head`` and ``rpe_on`` of :func:`irpe.get_rpe_config`
            (by default contextual product iRPE on keys, ratio 1.9, shared by the heads); or ``**asdict(IRPESpec)``.

    Raises:
        ValueError: a model this cannot retrofit (with the reason; the model is left unchanged), or a bad setting.
    """
    target = model.model if isinstance(model, FeatureGetterNet) else model
    problems = _retrofit_problems(target)
    if problems:
        raise ValueError(f"add_irpe cannot put iRPE into this model: {'; '.join(problems)}")
    config = irpe.get_rpe_config(**rpe_args, skip=target.num_prefix_tokens)
    if not _uses_rpe(config):
        raise ValueError(f"iRPE settings {rpe_args} encode nothing: use mode 'ctx' or 'bias' and rpe_on 'k' or 'qkv'")
    for block in target.blocks:
        _check_attn_impl(attn_impl, config, block.attn.attn_drop.p)
    target.__class__ = _RETROFIT_CLASSES[type(target)]
    target.rpe_config = config
    for block in target.blocks:
        block.__class__ = RPEBlock
        block.attn.__class__ = RPEAttention
        block.attn.set_rpe(config, attn_impl=attn_impl)
    return model
