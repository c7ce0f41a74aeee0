"""See what iRPE does: bucket maps, learned encodings and the attention of one query patch, as PNG files.

One subcommand per picture (``--help`` of a subcommand explains its picture): ``buckets`` (bucket ids of the key
patches of one query, per method, and the piecewise index ``g(x)``), ``encodings`` (every layer's and head's learned
encoding over the offset of a key from its query) and ``attention`` (one query patch's attention with and without the
iRPE term). Each is a function (``plot_bucket_maps``, ``plot_encodings``, ``plot_query_attention``) returning a
:class:`Picture` of the figure and the arrays it drew, all computed by the model's own modules: the encodings are
its iRPE modules' outputs on probe inputs, q, k and v its layers' own (forward hooks); models and checkpoints are
built and read as ``main.py`` does (``timm.create_model``, ``models.load_checkpoint`` / ``load_state_dict``).

Examples::

    python tools/visualize_rpe.py buckets --method all --ratio 1.9 --grid 9x13 --out buckets.png
    python tools/visualize_rpe.py encodings --checkpoint outputs/demo/checkpoint.pth --out encodings.png
    python tools/visualize_rpe.py attention --checkpoint outputs/demo/checkpoint.pth --layer 11 --query 1,1
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tools"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _cli import cli  # noqa: E402

import irpe  # noqa: E402
import models  # noqa: E402

METHODS: tuple[str, ...] = ("euc", "quant", "cross", "product")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NO_IRPE = "the model has no iRPE tables (no blocks[i].attn.rpe_q/rpe_k/rpe_v modules)"


class VisualizeError(ValueError):
    """A user error: printed as one ``error: ...`` line, exit code 2."""


@dataclass
class Picture:
    """A figure (closed after saving; its artists stay readable), the arrays it shows by panel title, the PNG path if
    one was written, and facts about the picture (grid, query...)."""

    figure: Any
    panels: dict[str, np.ndarray]
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _finish(fig: Any, out: str | Path | None, dpi: int, panels: dict[str, np.ndarray], **info: Any) -> Picture:
    """Saves ``fig`` as the PNG ``out`` (if given), closes it and returns its :class:`Picture`."""
    path = None if out is None else Path(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Picture(fig, panels, path, info)


def _key_grid_axes(ax: Any, height: int, width: int, query: tuple[int, int], colour: str, lw: float) -> None:
    """Frames the query patch; at most about five integer ticks per axis (tick labels cost most drawing time)."""
    ax.add_patch(plt.Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False, ec=colour, lw=lw))
    ax.set_xticks(range(0, width, max(1, math.ceil(width / 5))))
    ax.set_yticks(range(0, height, max(1, math.ceil(height / 5))))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key column", fontsize=8)
    ax.set_ylabel("key row", fontsize=8)


# ----------------------------------------------------------------------------------------------------------------
# Bucket maps and the piecewise index function.


@dataclass(frozen=True)
class BucketMap:
    """``ids (height, width)``: the bucket of each key patch for one query; ``num_buckets`` counts the skip bucket,
    the id of every pair with a skip token (``skip_bucket``; ``None`` without skip tokens)."""

    title: str
    ids: np.ndarray
    num_buckets: int
    skip_bucket: int | None


def bucket_maps(
    method: str, ratio: float, height: int, width: int, query: tuple[int, int], skip: int = 0
) -> list[BucketMap]:
    """The bucket id of every key patch for the query patch ``(row, col)``, from ``irpe.get_bucket_ids_2d``: a list of
    :class:`BucketMap` (cross: its row and its column table). ``alpha, beta, gamma = ratio * (1, 2, 8)``."""
    config = _single_config(method, ratio, skip)
    _check_query(query, height, width)
    tables = [("", config.method)]
    if config.method == irpe.METHOD.CROSS:
        tables = [(" (rows)", irpe.METHOD.CROSS_ROWS), (" (cols)", irpe.METHOD.CROSS_COLS)]
    maps = []
    for table, method_id in tables:
        ids, num_buckets = irpe.get_bucket_ids_2d(
            method_id, height, width, skip, config.alpha, config.beta, config.gamma
        )
        row = ids[skip + query[0] * width + query[1], skip:]  # (L,): the query's row, grid keys only
        skip_bucket = int(ids[0, 0]) if skip > 0 else None
        maps.append(BucketMap(method + table, row.view(height, width).numpy().copy(), num_buckets, skip_bucket))
    return maps


def plot_bucket_maps(
    methods: Sequence[str],
    ratio: float,
    height: int,
    width: int,
    query: tuple[int, int] | None = None,
    skip: int = 0,
    out: str | Path | None = None,
    dpi: int = 100,
) -> Picture:
    """One panel per method: for the query patch (red frame; default: the centre) the bucket id of every key patch
    of the grid, written in its cell; the cross method has a row table and a column table, so two panels. Last
    panel: the piecewise index function g(x) of irpe.piecewise_index (exact for |x| <= alpha, logarithmic up to
    gamma, clipped at beta), with alpha, beta, gamma = ratio * (1, 2, 8); dots are the integer x the ids use.
    Product and cross apply g to the row and column offsets, euc to the rounded distance, quant to the squared
    distance."""
    query = (height // 2, width // 2) if query is None else query
    maps = [m for method in methods for m in bucket_maps(method, ratio, height, width, query, skip)]
    n = len(maps) + 1
    size = (2.6 * max(1.0, width / height) * (n - 1) + 4.5, 3.4)
    fig, axes = plt.subplots(1, n, figsize=size, gridspec_kw={"width_ratios": [1] * (n - 1) + [1.5]})
    panels: dict[str, np.ndarray] = {}
    for ax, bmap in zip(axes, maps):
        im = ax.imshow(bmap.ids, cmap="viridis", interpolation="nearest")
        if height * width <= 196:
            mid = (bmap.ids.max() + bmap.ids.min()) / 2
            for (r, c), v in np.ndenumerate(bmap.ids):
                colour = "black" if v > mid else "white"
                ax.text(c, r, str(v), ha="center", va="center", fontsize=6 if width > 9 else 7, color=colour)
        note = f", skip bucket {bmap.skip_bucket}" if bmap.skip_bucket is not None else ""
        ax.set_title(f"{bmap.title}: {bmap.num_buckets} buckets{note}", fontsize=8)
        _key_grid_axes(ax, height, width, query, "red", 2)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar.ax.tick_params(labelsize=7)
        panels[bmap.title] = bmap.ids
    config = _single_config("product", ratio, 0)
    alpha, beta, gamma = config.alpha, config.beta, config.gamma
    x = torch.linspace(-1.5 * gamma, 1.5 * gamma, 801, dtype=torch.float64)
    x_int = torch.arange(-math.floor(1.5 * gamma), math.floor(1.5 * gamma) + 1)
    panels["g(x)"] = np.stack([x_int, irpe.piecewise_index(x_int, alpha, beta, gamma, torch.long)])  # as the ids
    ax = axes[-1]
    ax.plot(x.numpy(), irpe.piecewise_index(x, alpha, beta, gamma, torch.float64).numpy(), lw=1, label="g(x), real x")
    ax.plot(*panels["g(x)"], ".", ms=4, label="integer x (as ids)")
    for v, name, colour, line in ((alpha, "alpha", "grey", "--"), (gamma, "gamma", "black", "-.")):
        ax.axvline(v, color=colour, ls=line, lw=0.8, label=f"±{name} = {v:g}")
        ax.axvline(-v, color=colour, ls=line, lw=0.8)
    ax.axhline(beta, color="tab:red", ls=":", lw=0.8, label=f"±beta = {beta:g}")
    ax.axhline(-beta, color="tab:red", ls=":", lw=0.8)
    ax.set_title(f"piecewise index g(x), ratio {ratio:g}", fontsize=8)
    ax.set_xlabel("x: offset (product, cross), distance (euc),\nsquared distance (quant)", fontsize=7)
    ax.set_ylabel("g(x)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(True, alpha=0.3)
    q_text = f"query patch (row {query[0]}, col {query[1]}) of a {height}x{width} grid"
    fig.suptitle(f"iRPE bucket ids of every key patch for the {q_text} (red)", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.2, top=0.82, wspace=0.4)
    return _finish(fig, out, dpi, panels, query=query, grid=(height, width), skip=skip, maps=maps)


# ----------------------------------------------------------------------------------------------------------------
# The model's encodings over relative offsets, through its iRPE modules.


def rpe_attentions(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(block index, attention module)`` of every block whose attention holds an iRPE module."""
    attentions = [(index, getattr(block, "attn", None)) for index, block in enumerate(getattr(model, "blocks", ()))]
    return [(i, attn) for i, attn in attentions if any(getattr(attn, f"rpe_{w}", None) is not None for w in "qkv")]


def pair_encodings(
    attn: nn.Module, which: str, height: int, width: int, skip: int, mean: torch.Tensor | None = None
) -> tuple[str, torch.Tensor]:
    """What the layer's encoding on ``which`` gives each (query, key) pair of the grid, from the module's ``forward``.

    Bias mode: the bias. Contextual: with ``mean`` (``(H, d)``; q and k only) the logit of the scaled ``mean`` as
    every query (key, for the encoding on queries), else the norm of each pair's bucket vector, read through basis
    vectors (q, k) or one-hot attention (v). A cross module sums its row and column tables in its own ``forward``.

    Returns:
        ``(kind, (heads, L, L))``: kind ``'bias'``, ``'projection'`` or ``'norm'``; rows are queries, columns keys.
    """
    rpe = getattr(attn, f"rpe_{which}")
    length, d = skip + height * width, attn.head_dim
    with torch.no_grad():
        if getattr(rpe, "rp_rows", rpe).mode == "bias":
            kind, values = "bias", rpe(torch.zeros(1, 1, length, d), height, width)[0]  # (Hm, L, L)
        elif mean is not None and which != "v":
            probe = (mean.float() * attn.scale)[None, :, None, :].expand(1, -1, length, -1)  # (1, H, L, d)
            kind, values = "projection", rpe(probe, height, width)[0]  # (H, L, L)
        elif which == "v":  # attention one-hot on key n: the bucket vector of (query i, key n) for every i
            onehot = torch.eye(length).view(length, 1, 1, length).repeat(1, 1, length, 1)  # (n, 1, i, L)
            kind, values = "norm", rpe(onehot, height, width).norm(dim=-1).permute(1, 2, 0)  # (Hm, i, n)
        else:  # basis vector c as every row: channel c of each pair's bucket vector
            basis = torch.eye(d).view(d, 1, 1, d).expand(d, 1, length, d)
            kind, values = "norm", rpe(basis, height, width).norm(dim=0)  # (d, Hm, L, L) -> (Hm, L, L)
    if which == "q":  # looked up for the key's row, transposed onto the logits
        values = values.transpose(1, 2)
    return kind, values[:, skip:, skip:].float()


def offset_pairs(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid indices ``(2h-1, 2w-1)`` of a query and a key for every offset ``(key - query)``: entry ``[dr + h - 1,
    dc + w - 1]`` is a pair ``dr`` rows and ``dc`` columns apart."""
    dr, dc = torch.arange(1 - height, height).view(-1, 1), torch.arange(1 - width, width).view(1, -1)
    row, col = (-dr).clamp(min=0), (-dc).clamp(min=0)  # the query, so that the key lies in the grid too
    return row * width + col, (row + dr) * width + col + dc


@dataclass(frozen=True)
class EncodingMaps:
    """The encodings on ``which`` of the iRPE ``layers`` (block indices) as ``maps (layers, heads, 2h-1, 2w-1)`` over
    the offsets of a ``grid``; ``kind``: ``'bias'``, ``'norm'`` or ``'projection'`` (see :func:`pair_encodings`)."""

    which: str
    kind: str
    layers: list[int]
    maps: np.ndarray
    grid: tuple[int, int]


def encoding_maps(
    model: nn.Module, height: int, width: int, which: str | None = None, images: torch.Tensor | None = None
) -> EncodingMaps:
    """The encodings on ``which`` (default: ``'k'`` if present, else the first the model has) of every iRPE layer
    over the offsets of a ``height x width`` grid; with ``images`` the contextual ones on q and k are projected on the
    mean query (mean key for ``'q'``) of their grid tokens."""
    layers = rpe_attentions(model)
    if not layers:
        raise VisualizeError(NO_IRPE)
    present = [w for w in "kqv" if getattr(layers[0][1], f"rpe_{w}") is not None]
    which = which or present[0]
    if which not in present:
        raise VisualizeError(f"the model has no iRPE encoding on {which!r}; it has: {', '.join(sorted(present))}")
    skip = model.num_prefix_tokens
    qkv = layer_qkv(model, images, [i for i, _ in layers]) if images is not None else {}
    query, key = offset_pairs(height, width)
    maps, kind = [], "bias"
    for index, attn in layers:
        q, k, _ = qkv.get(index, (None, None, None))
        mean = None if q is None else (k if which == "q" else q)[:, :, skip:].mean(dim=(0, 2))  # (H, d)
        kind, pairs = pair_encodings(attn, which, height, width, skip, mean)
        maps.append(pairs[:, query, key].numpy())  # (heads, 2h-1, 2w-1)
    return EncodingMaps(which, kind, [i for i, _ in layers], np.stack(maps), (height, width))


def layer_qkv(model: nn.Module, images: torch.Tensor, layers: Sequence[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """Block index -> ``q, k, v (B, H, L, d)`` of its attention on ``images`` as the layer computes them (forward
    hooks): q and k as its ``q_norm`` / ``k_norm`` return them, v the last third of its ``qkv`` projection."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index in layers:
        for name in ("qkv", "q_norm", "k_norm"):

            def keep(module, args, out, key=(index, name)):
                seen[key] = out

            handles.append(getattr(model.blocks[index].attn, name).register_forward_hook(keep))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    result = {}
    for index in layers:
        attn = model.blocks[index].attn
        v = seen[index, "qkv"].unflatten(-1, (3, attn.num_heads, attn.head_dim))[:, :, 2].transpose(1, 2)
        result[index] = (seen[index, "q_norm"], seen[index, "k_norm"], v)
    return result


def plot_encodings(
    model: nn.Module,
    grid: tuple[int, int] | None = None,
    which: str | None = None,
    images: torch.Tensor | None = None,
    out: str | Path | None = None,
    title: str = "",
    dpi: int = 80,
) -> Picture:
    """Rows are the iRPE layers, columns the heads (one column for a table shared by the heads, except for the
    projection, which differs per head through the query). Each map is over the offset of a key from its query (key
    row - query row down, key column - query column across; the + marks the query itself): bias mode draws the
    learned bias; contextual mode the norm of the bucket's vector or, with images (--data-path), its dot product
    with the mean query of those images times the logit scale, i.e. the mean logit the encoding adds (for the
    encoding on queries: with the mean key). The colour scale is shared within a layer, with its colour bar. Tables
    start at zero: an untrained model draws zeros. The grid is the images' or else the model's."""
    if grid is None and images is not None:
        grid = _image_grid(model, images.shape[-2], images.shape[-1])
    height, width = grid if grid is not None else tuple(model.patch_embed.grid_size)
    enc = encoding_maps(model, height, width, which, images)
    n_layers, n_heads = enc.maps.shape[:2]
    fig_w = max(6.0, 1.6 * n_heads * max((2 * width - 1) / (2 * height - 1), 0.6) + 1.4)
    fig_h = 1.4 * n_layers + 1.5
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.25 / fig_h, top=1 - 1.2 / fig_h, hspace=0.15, wspace=0.1)
    extent = (-(width - 1) - 0.5, width - 1 + 0.5, height - 1 + 0.5, -(height - 1) - 0.5)
    diverging = enc.kind in ("bias", "projection")
    panels = {}
    for row, layer in enumerate(enc.layers):
        vmax = float(np.abs(enc.maps[row]).max()) or 1.0
        colours = {"cmap": "RdBu_r" if diverging else "viridis", "vmin": -vmax if diverging else 0.0, "vmax": vmax}
        for col, ax in enumerate(axes[row]):
            im = ax.imshow(enc.maps[row, col], extent=extent, interpolation="nearest", **colours)
            ax.plot(0, 0, "+", color="black", ms=5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {col}" if n_heads > 1 else "shared head", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            panels[f"layer {layer} head {col}"] = enc.maps[row, col]
        fig.colorbar(im, ax=list(axes[row]), fraction=0.04, pad=0.02)
    what = {
        "bias": "bias per offset",
        "norm": "norm of the bucket vector",
        "projection": "mean logit added (projection on the mean query x scale)",
    }[enc.kind]
    fig.suptitle(
        f"{title}\niRPE on {enc.which}: {what}\nmaps over the key - query offset (+: the query itself), "
        f"{height}x{width} grid; colour scale per layer",
        fontsize=8,
    )
    return _finish(fig, out, dpi, panels, encodings=enc, grid=(height, width))


# ----------------------------------------------------------------------------------------------------------------
# Attention of one query patch.


@dataclass(frozen=True)
class QueryAttention:
    """Attention of the query token ``query`` (``skip + row * width + col``) in ``layer``, ``head``: ``logits`` (scaled
    ``q k^T``), the iRPE logit ``term`` (zero without encodings on q and k), ``probs`` and ``probs_plain`` (softmax
    with and without it), all ``(B, H, L, L)``, and ``out (B, H, L, d)``: ``probs @ v`` plus the values' encoding."""

    layer: int
    head: int
    query: int
    grid: tuple[int, int]
    skip: int
    logits: torch.Tensor
    term: torch.Tensor
    probs: torch.Tensor
    probs_plain: torch.Tensor
    out: torch.Tensor


def query_attention(
    model: nn.Module, image: torch.Tensor, layer: int, head: int, query: tuple[int, int] | None = None
) -> QueryAttention:
    """Attention of the query patch ``(row, col)`` (default: the centre) at ``blocks[layer]`` (negative: from the
    end), head ``head``, on ``image (1, 3, H_img, W_img)``, with the layer's q, k, v (:func:`layer_qkv`) and its
    modules' terms added as ``irpe_attention.rpe_attention`` adds them on its explicit path."""
    if not rpe_attentions(model):
        raise VisualizeError(NO_IRPE)
    if not -len(model.blocks) <= layer < len(model.blocks):
        raise VisualizeError(f"--layer {layer} is out of range: the model has {len(model.blocks)} blocks")
    layer = layer % len(model.blocks)
    attn = model.blocks[layer].attn
    if not 0 <= head < attn.num_heads:
        raise VisualizeError(f"--head {head} is out of range: the attention has {attn.num_heads} heads")
    height, width = _image_grid(model, image.shape[-2], image.shape[-1])
    query = (height // 2, width // 2) if query is None else query
    _check_query(query, height, width)
    q, k, v = layer_qkv(model, image, [layer])[layer]  # (B, H, L, d)
    skip = q.size(2) - height * width
    with torch.no_grad():
        logits = torch.matmul(q * attn.scale, k.transpose(-2, -1))  # (B, H, L, L)
        term = torch.zeros_like(logits)
        if attn.rpe_k is not None:
            term = term + attn.rpe_k(q * attn.scale, height, width)
        if attn.rpe_q is not None:
            term = term + attn.rpe_q(k * attn.scale, height, width).transpose(2, 3)
        probs = (logits + term).softmax(dim=-1)
        out = torch.matmul(probs, v)  # (B, H, L, d)
        if attn.rpe_v is not None:
            out = out + attn.rpe_v(probs, height, width)
    index = skip + query[0] * width + query[1]
    return QueryAttention(layer, head, index, (height, width), skip, logits, term, probs, logits.softmax(-1), out)


def plot_query_attention(
    model: nn.Module,
    image: torch.Tensor,
    layer: int = -1,
    head: int = 0,
    query: tuple[int, int] | None = None,
    out: str | Path | None = None,
    title: str = "",
    dpi: int = 100,
    mean_std: tuple[Sequence[float], Sequence[float]] = IMAGENET_MEAN_STD,
) -> Picture:
    """Four panels: the image with the query patch (yellow); the query's attention over the key patches with the
    iRPE term (what the model computes); the same softmax without it; and the iRPE term itself, the logit it adds
    before the softmax (rpe_k(q) + rpe_q(k)^T). Titles give the attention mass on the class token(s). q, k and v are
    the layer's own, from forward hooks."""
    qa = query_attention(model, image, layer, head, query)
    height, width = qa.grid
    rows = {"with iRPE": qa.probs, "without iRPE": qa.probs_plain, "iRPE term": qa.term}
    panels = {name: t[0, head, qa.query, qa.skip :].reshape(height, width).float().numpy() for name, t in rows.items()}
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in mean_std)
    panels["image"] = (image[0].float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (H_img, W_img, 3)
    fig, axes = plt.subplots(1, 4, figsize=(4 * 2.9 * max(1.0, width / height) + 1, 3.4))
    ph, pw = image.shape[-2] // height, image.shape[-1] // width
    r, c = divmod(qa.query - qa.skip, width)
    axes[0].imshow(panels["image"], interpolation="nearest")
    axes[0].add_patch(plt.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="yellow", lw=2))
    axes[0].set_title(f"image, query patch ({r}, {c})", fontsize=9)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    vmax = max(panels["with iRPE"].max(), panels["without iRPE"].max())
    lim = float(np.abs(panels["iRPE term"]).max()) or 1.0
    attn = model.blocks[qa.layer].attn
    on = "".join(w for w in "qk" if getattr(attn, f"rpe_{w}") is not None) or "v only: none"
    for ax, name in zip(axes[1:], rows):
        if name == "iRPE term":
            im = ax.imshow(panels[name], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"iRPE logit term (encodings on {on})", fontsize=9)
        else:
            im = ax.imshow(panels[name], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            mass = float(rows[name][0, head, qa.query, : qa.skip].sum())
            ax.set_title(f"attention {name}" + (f"; class token(s) {mass:.2f}" if qa.skip else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
        _key_grid_axes(ax, height, width, (r, c), "cyan", 1.5)
    v_note = "; the encoding on values adds to the output, not to these weights" if attn.rpe_v is not None else ""
    fig.suptitle(f"{title}\nlayer {qa.layer}, head {head}, {height}x{width} grid{v_note}", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.95, bottom=0.14, top=0.78, wspace=0.35)
    return _finish(fig, out, dpi, panels, attention=qa, grid=(height, width))


# ----------------------------------------------------------------------------------------------------------------
# Inputs: checks, the model and its checkpoint, images; the command line.


def _single_config(method: str, ratio: float, skip: int) -> irpe.RPEConfig:
    try:
        return irpe.get_single_rpe_config(ratio=ratio, method=method, mode="bias", skip=skip)
    except ValueError as e:
        raise VisualizeError(str(e)) from None


def _check_query(query: tuple[int, int], height: int, width: int) -> None:
    if not (0 <= query[0] < height and 0 <= query[1] < width):
        raise VisualizeError(f"query patch {query[0]},{query[1]} is outside the {height}x{width} grid")


def _image_grid(model: nn.Module, img_h: int, img_w: int) -> tuple[int, int]:
    ph, pw = model.patch_embed.patch_size
    if img_h % ph or img_w % pw:
        raise VisualizeError(f"the image size {img_h}x{img_w} is not a multiple of the patch size {ph}x{pw}")
    return img_h // ph, img_w // pw


def parse_size(text: str) -> tuple[int, int]:
    """argparse type of a grid or image size: ``'9x13'`` -> ``(9, 13)``, ``'7'`` -> ``(7, 7)``; positive."""
    values = text.lower().split("x")
    if not all(v.isdigit() and int(v) > 0 for v in values) or len(values) > 2:
        raise argparse.ArgumentTypeError(f"expected HxW (positive) or N, got {text!r}")
    return int(values[0]), int(values[-1])


def parse_query(text: str) -> tuple[int, int]:
    """argparse type of a query patch: ``'1,5'`` -> ``(1, 5)`` (row and column, from 0)."""
    values = text.split(",")
    if len(values) != 2 or not all(v.strip().isdigit() for v in values):
        raise argparse.ArgumentTypeError(f"expected ROW,COL (from 0), got {text!r}")
    return int(values[0]), int(values[1])


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type of an integer in ``[low, high]`` (no upper bound for ``None``)."""

    def parse(text: str) -> int:
        value = int(text) if text.lstrip("-").isdigit() else None
        if value is None or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text}")
        return value

    return parse


def load_model(
    name: str | None = None, checkpoint: str | None = None, pretrained: bool = False
) -> tuple[nn.Module, str]:
    """A registered model (the iRPE zoo, ``tools/compare_rpe.py``'s variants, timm's) in eval mode, and a title.

    A ``main.py`` checkpoint names its model and input size in ``args`` (others need ``name``; 224 px); its weights
    load through ``models`` as ``main.py``'s do (wrapper prefixes removed, ``pos_embed`` resampled to the model).
    """
    state, ckpt_args = None, {}
    if checkpoint:
        if not models.is_url(checkpoint) and not Path(checkpoint).is_file():
            raise VisualizeError(f"no checkpoint file at {checkpoint}")
        ckpt = models.load_checkpoint(checkpoint)
        state = models.checkpoint_state_dict(ckpt, checkpoint)
        if not any(".rpe_" in k and ".lookup_table" in k for k in state):
            raise VisualizeError(f"{checkpoint} has no iRPE tables (no blocks.*.attn.rpe_*.lookup_table_* entries)")
        ckpt_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    import compare_rpe
    import timm

    import rpe_models  # noqa: F401  (registers the iRPE zoo models)

    compare_rpe.register_variants()  # the variants of the comparison, for their checkpoints
    name = name or ckpt_args.get("model")
    if not name:
        raise VisualizeError(f"{checkpoint} does not name its model (no args.model): pass --model NAME")
    if not timm.is_model(name):
        raise VisualizeError(f"unknown model {name!r} (see rpe_models.MODEL_ZOO or timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=pretrained, img_size=int(ckpt_args.get("input_size", 224)))
    except Exception as e:  # noqa: BLE001  (download errors, bad sizes: all are the user's to fix)
        raise VisualizeError(f"cannot build {name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not rpe_attentions(model):
        raise VisualizeError(f"{name} has no iRPE tables (it is not an iRPE model)")
    if state is not None:
        models.load_state_dict(model, state, checkpoint, name=name, adapt=True)
    where = f"{Path(checkpoint).name}: " if checkpoint else ("pretrained " if pretrained else "untrained ")
    return model.eval(), where + name


def image_tensor(path: str | None, img_size: tuple[int, int], mean_std: tuple, seed: int = 0) -> torch.Tensor:
    """An image file (or, for ``None``, a generated relational image) as ``(1, 3, H, W)``, resized, normalised."""
    from PIL import Image

    if path is None:
        import make_relational_dataset as rel

        side, rng = max(img_size), np.random.default_rng(seed)
        a, b, r = rel.sample_geometry(0, side, side / 3, rng)
        img = rel.draw_image(a, b, r, side, rng)
    else:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as e:
            raise VisualizeError(f"cannot read the image {path}: {e}") from None
    bicubic = transforms.InterpolationMode.BICUBIC
    resize_normalise = transforms.Compose(
        [transforms.Resize(img_size, bicubic), transforms.ToTensor(), transforms.Normalize(*mean_std)]
    )
    return resize_normalise(img).unsqueeze(0)  # (1, 3, H, W)


def load_images(data_path: str, num_images: int, img_size: tuple[int, int], mean_std: tuple) -> torch.Tensor:
    """Up to ``num_images`` images spread over the sorted files under ``data_path`` (its ``val/`` if present),
    resized to ``img_size`` and normalised: ``(B, 3, H, W)``."""
    root = Path(data_path) / "val" if (Path(data_path) / "val").is_dir() else Path(data_path)
    if not root.is_dir():
        raise VisualizeError(f"--data-path {data_path} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VisualizeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    chosen = files[:: max(1, len(files) // num_images)][:num_images]
    return torch.cat([image_tensor(str(p), img_size, mean_std) for p in chosen])


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error: ...`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


def get_args_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="visualize_rpe.py", description=__doc__.split("\n\nExamples")[0], formatter_class=formatter)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{buckets,encodings,attention}", parser_class=_Parser
    )
    b = sub.add_parser("buckets", help="bucket ids for one query, per method, and g(x)")
    b.add_argument("--method", default="all", help="euc, quant, cross, product or all (default: all)")
    b.add_argument("--ratio", type=float, default=1.9, help="alpha, beta, gamma = ratio * (1, 2, 8) (default 1.9)")
    b.add_argument("--grid", type=parse_size, default=(14, 14), help="patch grid HxW (default 14x14)")
    b.add_argument("--skip", type=int_in(0), default=0, help="leading tokens without position (their bucket id)")
    model = _Parser(add_help=False)
    g = model.add_argument_group("model (one of --checkpoint or --model)")
    g.add_argument("--checkpoint", default=None, help="main.py checkpoint (names its model and input size)")
    g.add_argument("--model", default=None, help="registered model name (iRPE zoo or compare_rpe.py variants)")
    g.add_argument("--pretrained", action="store_true", help="with --model: the released weights (downloads)")
    g.add_argument(
        "--image-size", type=parse_size, default=None, help="input size HxW in pixels (default: the model's)"
    )
    e = sub.add_parser("encodings", parents=[model], help="learned encodings over relative offsets")
    e.add_argument("--on", default=None, choices=("q", "k", "v"), help="which encoding (default: k if present)")
    e.add_argument("--grid", type=parse_size, default=None, help="patch grid HxW of the maps (default: the model's)")
    e.add_argument("--data-path", default=None, help="images (a folder; its val/ if present) for the mean query")
    e.add_argument("--num-images", type=int_in(1), default=32, help="images read from --data-path (default 32)")
    a = sub.add_parser("attention", parents=[model], help="attention of one query patch, with and without iRPE")
    a.add_argument("--image", default=None, help="image file (default: a generated relational image)")
    a.add_argument("--layer", type=int, default=-1, help="block index (default: the last)")
    a.add_argument("--head", type=int, default=0, help="head index (default 0)")
    for p, picture in ((b, plot_bucket_maps), (e, plot_encodings), (a, plot_query_attention)):
        p.description = picture.__doc__  # what the picture shows
        p.add_argument("--out", default=f"rpe_{p.prog.split()[-1]}.png", help="output PNG")
        p.add_argument("--dpi", type=int_in(10, 600), default=100 if p is b else 80, help="PNG resolution")
        if p is not e:
            p.add_argument("--query", type=parse_query, default=None, help="query patch ROW,COL (default: the centre)")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Draws the picture of one parsed command line; returns the PNG path."""
    if args.command == "buckets":
        methods = list(METHODS) if args.method.lower() == "all" else [args.method.lower()]
        return plot_bucket_maps(methods, args.ratio, *args.grid, args.query, args.skip, args.out, args.dpi).path
    if not args.checkpoint and not args.model:
        raise VisualizeError("pass --checkpoint PATH or --model NAME")
    model, title = load_model(args.model, args.checkpoint, args.pretrained)
    patch = model.patch_embed
    img_size = args.image_size or tuple(g * p for g, p in zip(patch.grid_size, patch.patch_size))
    _image_grid(model, *img_size)
    cfg = model.pretrained_cfg or {}
    mean_std = (tuple(cfg.get("mean", IMAGENET_MEAN_STD[0])), tuple(cfg.get("std", IMAGENET_MEAN_STD[1])))
    if args.command == "encodings":
        images = load_images(args.data_path, args.num_images, img_size, mean_std) if args.data_path else None
        title += f", mean query of {images.size(0)} images" if images is not None else ""
        return plot_encodings(model, args.grid, args.on, images, args.out, title, args.dpi).path
    image = image_tensor(args.image, img_size, mean_std)
    title += f", {Path(args.image).name if args.image else 'generated image'}"
    return plot_query_attention(
        model, image, args.layer, args.head, args.query, args.out, title, args.dpi, mean_std
    ).path


@cli(VisualizeError, models.CheckpointError)
def main(argv: Sequence[str] | None = None) -> int:
    print(f"wrote {run(get_args_parser().parse_args(argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
