"""See what iRPE does: bucket maps, learned encodings and the attention of one query patch, as PNG files.

Three pictures, one subcommand each (``--help`` of a subcommand explains its picture):

* ``buckets``: for one query patch of a ``height x width`` grid, the bucket id of every key patch under each method
  (``irpe.get_bucket_ids_2d``), and the piecewise index function ``g(x)`` with ``alpha``, ``beta``, ``gamma``.
* ``encodings``: for every layer (rows) and head (columns) of a model, its learned encoding as a map over the
  offset of the key from the query: the bias in bias mode; in contextual mode the norm of each bucket's vector, or
  with ``--data-path`` its projection on the mean query of a batch of images (the mean logit it adds).
* ``attention``: the attention of one query patch over the key patches of an image, with and without the iRPE
  term, and the term itself.

Every picture is a small pure function (``plot_bucket_maps``, ``plot_encodings``, ``plot_query_attention``) that
takes a model or a configuration and returns a :class:`Picture` holding the figure and the arrays it drew, so
that tests compare them with the iRPE modules. The tables and ids always come from the model's own iRPE modules
(``lookup_table_bias`` / ``lookup_table_weight`` and ``get_bucket_ids``); the attention terms are the modules'
outputs, combined as in ``irpe_attention.rpe_attention``'s explicit path.

Examples::

    python tools/visualize_rpe.py buckets --method all --ratio 1.9 --grid 9x13 --out buckets.png
    python tools/visualize_rpe.py encodings --checkpoint outputs/demo/checkpoint.pth --out encodings.png
    python tools/visualize_rpe.py attention --checkpoint outputs/demo/checkpoint.pth --layer 11 --head 0 \\
        --query 1,1 --out attention.png
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tools"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import irpe  # noqa: E402

METHODS: tuple[str, ...] = ("euc", "quant", "cross", "product")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class VisualizeError(ValueError):
    """A user error: printed as one ``error: ...`` line, exit code 2."""


@dataclass
class Picture:
    """A drawn figure and the arrays it shows (keyed by panel), for tests and further use.

    Attributes:
        figure: the matplotlib figure (closed after saving; its artists stay readable).
        panels: panel title -> the array drawn in it.
        path: where the PNG was written, if it was.
        info: extra facts about the picture (grid, query, skip...).
    """

    figure: Any
    panels: dict[str, np.ndarray]
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: str | Path | None, dpi: int) -> Path | None:
    plt = _pyplot()
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Bucket maps and the piecewise index function.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketMap:
    """Bucket ids of the key patches of one query.

    Attributes:
        title: panel title (method, and for cross the table).
        ids: ``(height, width)`` bucket id of each key patch (grid tokens only).
        num_buckets: buckets of the table, including the skip bucket when ``skip > 0``.
        skip_bucket: the id shared by every pair involving a skip token, or ``None`` without skip tokens.
    """

    title: str
    ids: np.ndarray
    num_buckets: int
    skip_bucket: int | None


def bucket_maps(
    method: str, ratio: float, height: int, width: int, query: tuple[int, int], skip: int = 0
) -> list[BucketMap]:
    """The bucket id of every key patch for the query patch ``query = (row, col)``, from ``irpe.get_bucket_ids_2d``.

    Args:
        method: ``'euc'``, ``'quant'``, ``'cross'`` or ``'product'``; cross gives two maps (its row and column
            tables).
        ratio: ``alpha, beta, gamma = ratio * (1, 2, 8)``.
        height, width: the patch grid.
        query: row and column of the query patch.
        skip: leading tokens without a grid position (their pairs share one extra bucket).

    Raises:
        VisualizeError: unknown method, bad ratio or skip, or a query outside the grid.
    """
    config = _single_config(method, ratio, skip)
    _check_query(query, height, width)
    if config.method == irpe.METHOD.CROSS:
        tables = [("rows", irpe.METHOD.CROSS_ROWS), ("cols", irpe.METHOD.CROSS_COLS)]
    else:
        tables = [("", config.method)]
    maps = []
    for table, method_id in tables:
        ids, num_buckets = irpe.get_bucket_ids_2d(
            method_id, height, width, skip, config.alpha, config.beta, config.gamma
        )  # (skip + L, skip + L)
        row = ids[skip + query[0] * width + query[1], skip:]  # (L,): the query's row, grid keys only
        title = f"{method} ({table})" if table else method
        skip_bucket = int(ids[0, 0]) if skip > 0 else None
        maps.append(BucketMap(title, row.view(height, width).numpy().copy(), num_buckets, skip_bucket))
    return maps


def piecewise_curve(ratio: float, num: int = 801) -> dict[str, np.ndarray]:
    """``g(x)`` of ``irpe.piecewise_index`` for ``alpha, beta, gamma = ratio * (1, 2, 8)``.

    Returns:
        ``x`` (dense, float), ``g`` (``g(x)`` in float, as a real-valued curve), ``x_int`` and ``g_int`` (at the
        integers, with the integer dtype the bucket ids use), and ``alpha``, ``beta``, ``gamma`` (0-d arrays).
    """
    config = _single_config("product", ratio, 0)
    alpha, beta, gamma = config.alpha, config.beta, config.gamma
    limit = 1.5 * gamma
    x = torch.linspace(-limit, limit, num, dtype=torch.float64)
    g = irpe.piecewise_index(x, alpha, beta, gamma, torch.float64)
    x_int = torch.arange(-math.floor(limit), math.floor(limit) + 1)
    g_int = irpe.piecewise_index(x_int, alpha, beta, gamma, torch.long)
    return {
        "x": x.numpy(),
        "g": g.numpy(),
        "x_int": x_int.numpy(),
        "g_int": g_int.numpy(),
        "alpha": np.array(alpha),
        "beta": np.array(beta),
        "gamma": np.array(gamma),
    }


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
    """One panel of bucket ids per method (cross: one per table) side by side, then ``g(x)``.

    Args:
        methods: methods to draw (see :func:`bucket_maps`).
        ratio: ``alpha, beta, gamma = ratio * (1, 2, 8)``.
        height, width: the patch grid.
        query: the query patch; the centre ``(height // 2, width // 2)`` by default.
        skip: skip tokens (noted in the titles: their bucket id).
        out: PNG path, or ``None`` to only build the figure.
        dpi: resolution of the PNG.

    Returns:
        A :class:`Picture` whose panels are the ``(height, width)`` id maps and ``'g(x)'`` (``(2, n)``: ``x``,
        ``g(x)`` at the integers).
    """
    _check_grid(height, width)
    query = (height // 2, width // 2) if query is None else query
    maps = [m for method in methods for m in bucket_maps(method, ratio, height, width, query, skip)]
    curve = piecewise_curve(ratio)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = len(maps) + 1
    cell = 2.6 * max(1.0, width / height)
    fig, axes = plt.subplots(
        1, n, figsize=(cell * (n - 1) + 4.5, 3.4), gridspec_kw={"width_ratios": [1] * (n - 1) + [1.5]}
    )
    axes = np.atleast_1d(axes)
    panels: dict[str, np.ndarray] = {}
    annotate = height * width <= 196
    for ax, bmap in zip(axes, maps):
        im = ax.imshow(bmap.ids, cmap="viridis", interpolation="nearest")
        if annotate:
            mid = (bmap.ids.max() + bmap.ids.min()) / 2
            for (r, c), v in np.ndenumerate(bmap.ids):
                colour = "black" if v > mid else "white"
                ax.text(c, r, str(v), ha="center", va="center", fontsize=6 if width > 9 else 7, color=colour)
        ax.add_patch(plt.Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False, ec="red", lw=2))
        note = f", skip bucket {bmap.skip_bucket}" if bmap.skip_bucket is not None else ""
        ax.set_title(f"{bmap.title}: {bmap.num_buckets} buckets{note}", fontsize=8)
        _few_ticks(ax, height, width)
        ax.set_xlabel("key column", fontsize=8)
        ax.set_ylabel("key row", fontsize=8)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar.ax.tick_params(labelsize=7)
        panels[bmap.title] = bmap.ids
    ax = axes[-1]
    alpha, beta, gamma = (float(curve[k]) for k in ("alpha", "beta", "gamma"))
    ax.plot(curve["x"], curve["g"], lw=1, label="g(x), real x")
    ax.plot(curve["x_int"], curve["g_int"], ".", ms=4, label="integer x (as ids)")
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
    panels["g(x)"] = np.stack([curve["x_int"], curve["g_int"]])
    q_text = f"query patch (row {query[0]}, col {query[1]}) of a {height}x{width} grid"
    fig.suptitle(f"iRPE bucket ids of every key patch for the {q_text} (red)", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.2, top=0.82, wspace=0.4)
    path = _save(fig, out, dpi)
    return Picture(fig, panels, path, {"query": query, "grid": (height, width), "skip": skip, "maps": maps})


# ----------------------------------------------------------------------------------------------------------------
# The model's iRPE modules and their encodings over relative offsets.
# ----------------------------------------------------------------------------------------------------------------


def rpe_attentions(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(block index, attention module)`` of every block whose attention holds an iRPE module."""
    found = []
    for index, block in enumerate(getattr(model, "blocks", ())):
        attn = getattr(block, "attn", None)
        if attn is not None and any(getattr(attn, f"rpe_{w}", None) is not None for w in "qkv"):
            found.append((index, attn))
    return found


def _single_tables(rpe: nn.Module) -> list[irpe.iRPE]:
    """The single-table modules of an encoding: itself, or the row and column tables of ``iRPE_Cross``."""
    return [rpe.rp_rows, rpe.rp_cols] if isinstance(rpe, irpe.iRPE_Cross) else [rpe]


def offset_bucket_ids(table: irpe.iRPE, height: int, width: int, which: str) -> np.ndarray:
    """The bucket id of each offset ``(key - query)`` of a ``height x width`` grid, from the module's own ids.

    Entry ``[dr + height - 1, dc + width - 1]`` is the bucket of a key ``dr`` rows and ``dc`` columns away from its
    query. The module's ids ``[a, b]`` encode ``pos(a) - pos(b)`` with ``a`` the row it is looked up for: the query
    for encodings on keys and values, the key for the encoding on queries (transposed onto the logits).

    Args:
        table: a single-table :class:`irpe.iRPE`.
        height, width: the patch grid.
        which: ``'q'``, ``'k'`` or ``'v'``: which encoding the module is.

    Returns:
        ``(2 * height - 1, 2 * width - 1)`` int64.
    """
    skip = table.rpe_config.skip
    ids = table.get_bucket_ids(height, width, skip, torch.device("cpu"))[skip:, skip:]  # (L, L), grid tokens
    L = height * width
    rows, cols = torch.arange(L) // width, torch.arange(L) % width
    sign = 1 if which == "q" else -1  # key - query = +(pos(a) - pos(b)) for q, -(pos(a) - pos(b)) for k, v
    dr = sign * (rows.view(L, 1) - rows.view(1, L)) + height - 1  # (L, L)
    dc = sign * (cols.view(L, 1) - cols.view(1, L)) + width - 1
    out = torch.full((2 * height - 1, 2 * width - 1), -1, dtype=torch.long)
    out[dr.flatten(), dc.flatten()] = ids.flatten()
    return out.numpy()


def offset_vectors(rpe: nn.Module, height: int, width: int, which: str) -> torch.Tensor:
    """The encoding of every offset ``(key - query)``: the bucket's table entry (cross: the sum of both tables).

    Returns:
        bias mode: ``(Hm, 2h-1, 2w-1)``; contextual: ``(Hm, d, 2h-1, 2w-1)``, with ``Hm`` the heads of the table
        (1 when shared).
    """
    total = None
    for table in _single_tables(rpe):
        ids = torch.from_numpy(offset_bucket_ids(table, height, width, which))  # (Oh, Ow)
        if table.mode == "bias":
            vec = table.lookup_table_bias.detach()[:, ids]  # (Hm, nb) -> (Hm, Oh, Ow)
        elif table.transposed:
            vec = table.lookup_table_weight.detach()[:, :, ids]  # (Hm, d, nb) -> (Hm, d, Oh, Ow)
        else:
            vec = table.lookup_table_weight.detach()[:, ids, :].permute(0, 3, 1, 2)  # (Hm, nb, d) -> (Hm, d, Oh, Ow)
        total = vec if total is None else total + vec
    return total.float()


@dataclass(frozen=True)
class EncodingMaps:
    """The encodings of one of q/k/v in every iRPE layer, as maps over offsets.

    Attributes:
        which: ``'q'``, ``'k'`` or ``'v'``.
        kind: ``'bias'``, ``'norm'`` (contextual: vector norm) or ``'projection'`` (contextual: dot product with the
            scaled mean query, or mean key for the encoding on queries).
        layers: block index of each row.
        maps: ``(layers, heads, 2h-1, 2w-1)``.
        grid: the ``(height, width)`` patch grid.
    """

    which: str
    kind: str
    layers: list[int]
    maps: np.ndarray
    grid: tuple[int, int]


def encoding_maps(
    model: nn.Module,
    height: int,
    width: int,
    which: str | None = None,
    mean_vectors: dict[int, torch.Tensor] | None = None,
) -> EncodingMaps:
    """The learned encodings of every iRPE layer over the offsets of a ``height x width`` grid.

    Args:
        model: a model whose ``blocks[i].attn`` hold ``rpe_q``/``rpe_k``/``rpe_v`` (see
            :class:`rpe_vision_transformer.RPEAttention`).
        height, width: the patch grid.
        which: ``'q'``, ``'k'`` or ``'v'``; default: ``'k'`` if the model has it, else the first it has.
        mean_vectors: block index -> ``(num_heads, head_dim)`` mean query (mean key for ``which='q'``); contextual
            q/k encodings are then projected on it (times the logit scale: the mean logit they add). Ignored for
            bias mode and for values.

    Raises:
        VisualizeError: the model has no iRPE module (for ``which``).
    """
    layers = rpe_attentions(model)
    if not layers:
        raise VisualizeError("the model has no iRPE tables (no blocks[i].attn.rpe_q/rpe_k/rpe_v modules)")
    present = [w for w in "kqv" if getattr(layers[0][1], f"rpe_{w}") is not None]
    which = which or present[0]
    if which not in present:
        raise VisualizeError(f"the model has no iRPE encoding on {which!r}; it has: {', '.join(sorted(present))}")
    _check_grid(height, width)
    maps, indices, kind = [], [], "bias"
    for index, attn in layers:
        rpe = getattr(attn, f"rpe_{which}")
        vec = offset_vectors(rpe, height, width, which)  # (Hm, Oh, Ow) or (Hm, d, Oh, Ow)
        if vec.dim() == 3:
            kind, values = "bias", vec
        elif mean_vectors is not None and which != "v":
            kind = "projection"
            mean = mean_vectors[index].float() * attn.scale  # (H, d)
            values = torch.einsum("hd,hdxy->hxy", mean, vec.expand(mean.size(0), *vec.shape[1:]))  # (H, Oh, Ow)
        else:
            kind, values = "norm", vec.norm(dim=1)  # (Hm, Oh, Ow)
        maps.append(values.numpy())
        indices.append(index)
    return EncodingMaps(which, kind, indices, np.stack(maps), (height, width))


def mean_query_vectors(model: nn.Module, images: torch.Tensor, which: str = "k") -> dict[int, torch.Tensor]:
    """Mean query (``which='k'``) or key (``'q'``) of the grid tokens of every iRPE layer over a batch of images.

    Args:
        model: see :func:`encoding_maps`.
        images: ``(B, 3, H_img, W_img)``, normalised as the model expects.
        which: the encoding the vectors are for.

    Returns:
        block index -> ``(num_heads, head_dim)``.
    """
    captured = _capture_attention_inputs(model, images, [i for i, _ in rpe_attentions(model)])
    out = {}
    for index, (attn, x, height, width) in captured.items():
        q, k, _ = _split_qkv(attn, x)  # (B, H, L, d)
        skip = x.size(1) - height * width
        vectors = k if which == "q" else q
        out[index] = vectors[:, :, skip:].mean(dim=(0, 2))  # (H, d)
    return out


def plot_encodings(
    model: nn.Module,
    grid: tuple[int, int] | None = None,
    which: str | None = None,
    images: torch.Tensor | None = None,
    out: str | Path | None = None,
    title: str = "",
    dpi: int = 80,
) -> Picture:
    """Rows = iRPE layers, columns = heads: each encoding as a map over the offset of the key from the query.

    The colour scale is shared within a row (one colour bar per layer). Bias mode draws the bias; contextual mode
    the norm of the bucket vector, or with ``images`` its projection on the scaled mean query of those images.

    Args:
        model: see :func:`encoding_maps`.
        grid: the patch grid; default: the one the model was built for.
        which: ``'q'``, ``'k'`` or ``'v'`` (see :func:`encoding_maps`).
        images: ``(B, 3, H_img, W_img)`` for the projection (their grid is used when ``grid`` is ``None``).
        out: PNG path, or ``None``.
        title: first line of the figure title.
        dpi: PNG resolution.

    Returns:
        A :class:`Picture` with one panel per layer and head (``'layer i head h'``: ``(2h-1, 2w-1)``) and the
        :class:`EncodingMaps` in ``info['encodings']``.
    """
    if not rpe_attentions(model):
        raise VisualizeError("the model has no iRPE tables (no blocks[i].attn.rpe_q/rpe_k/rpe_v modules)")
    if grid is None and images is not None:
        grid = _image_grid(model, images.shape[-2], images.shape[-1])
    height, width = grid if grid is not None else _model_grid(model)
    mean_vectors = None
    if images is not None:
        present = [w for w in "kqv" if getattr(rpe_attentions(model)[0][1], f"rpe_{w}") is not None]
        mean_vectors = mean_query_vectors(model, images, which or present[0])
    enc = encoding_maps(model, height, width, which, mean_vectors)
    plt = _pyplot()
    n_layers, n_heads = enc.maps.shape[:2]
    aspect = (2 * width - 1) / (2 * height - 1)
    fig_w = max(6.0, 1.6 * n_heads * max(aspect, 0.6) + 1.4)
    fig_h = 1.4 * n_layers + 1.5
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.25 / fig_h, top=1 - 1.2 / fig_h, hspace=0.15, wspace=0.1)
    extent = (-(width - 1) - 0.5, width - 1 + 0.5, height - 1 + 0.5, -(height - 1) - 0.5)
    diverging = enc.kind in ("bias", "projection")
    panels = {}
    for row, layer in enumerate(enc.layers):
        values = enc.maps[row]
        vmax = float(np.abs(values).max()) or 1.0
        vmin = -vmax if diverging else 0.0
        im = None
        for col in range(n_heads):
            ax = axes[row, col]
            im = ax.imshow(
                values[col],
                cmap="RdBu_r" if diverging else "viridis",
                vmin=vmin,
                vmax=vmax,
                extent=extent,
                interpolation="nearest",
            )
            ax.plot(0, 0, "+", color="black", ms=5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {col}" if n_heads > 1 else "shared head", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            panels[f"layer {layer} head {col}"] = values[col]
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
    path = _save(fig, out, dpi)
    return Picture(fig, panels, path, {"encodings": enc, "grid": (height, width)})


# ----------------------------------------------------------------------------------------------------------------
# Attention of one query patch.
# ----------------------------------------------------------------------------------------------------------------


def _capture_attention_inputs(
    model: nn.Module, images: torch.Tensor, layers: Sequence[int]
) -> dict[int, tuple[nn.Module, torch.Tensor, int, int]]:
    """Runs ``model(images)`` and returns, per block index, ``(attn, x (B, L, C), height, width)`` its attention
    was called with (forward pre-hooks)."""
    captured: dict[int, tuple[nn.Module, torch.Tensor, int, int]] = {}
    handles = []
    for index in layers:
        attn = model.blocks[index].attn

        def hook(module, args, kwargs, index=index):
            x = args[0]
            height = kwargs.get("height", args[1] if len(args) > 1 else None)
            width = kwargs.get("width", args[2] if len(args) > 2 else None)
            captured[index] = (module, x.detach(), height, width)

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return captured


def _split_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, L, d)`` of the attention module, as its ``forward`` splits them (and normalises q and k,
    where timm's ``Attention`` has ``q_norm`` / ``k_norm``)."""
    B, L, C = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
        k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
    return q, k, v


@dataclass(frozen=True)
class QueryAttention:
    """Attention of one query token in one layer and head.

    Attributes:
        layer, head: where.
        query: the query's token index (``skip + row * width + col``).
        grid: the patch grid; ``skip`` the leading tokens.
        logits: ``(B, H, L, L)`` scaled ``q k^T``, without iRPE.
        term: ``(B, H, L, L)`` the iRPE logit term (keys' and queries' encodings; zero without them).
        probs, probs_plain: ``(B, H, L, L)`` softmax with and without the term.
        out: ``(B, H, L, d)`` the attention output, ``probs @ v`` plus the values' encoding.
    """

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
    """Attention of the query patch ``query = (row, col)`` at ``blocks[layer]``, head ``head``, on ``image``.

    q, k and v come from the layer's own ``qkv`` applied to the input its attention receives (a forward pre-hook);
    the iRPE term is the sum of its modules' outputs, ``rpe_k(q * scale)`` and ``rpe_q(k * scale)^T``, as
    ``irpe_attention.rpe_attention`` adds them on its explicit path.

    Args:
        model: see :func:`encoding_maps`.
        image: ``(1, 3, H_img, W_img)`` (or a batch: the first image is drawn).
        layer: block index (negative counts from the end).
        head: head index.
        query: row and column of the query patch; the centre by default.

    Raises:
        VisualizeError: layer, head or query out of range, or a model without iRPE.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not rpe_attentions(model):
        raise VisualizeError("the model has no iRPE tables (no blocks[i].attn.rpe_q/rpe_k/rpe_v modules)")
    if not -len(blocks) <= layer < len(blocks):
        raise VisualizeError(f"--layer {layer} is out of range: the model has {len(blocks)} blocks")
    layer = layer % len(blocks)
    attn = blocks[layer].attn
    if not 0 <= head < attn.num_heads:
        raise VisualizeError(f"--head {head} is out of range: the attention has {attn.num_heads} heads")
    _, x, height, width = _capture_attention_inputs(model, image, [layer])[layer]
    query = (height // 2, width // 2) if query is None else query
    _check_query(query, height, width)
    skip = x.size(1) - height * width
    q, k, v = _split_qkv(attn, x)  # (B, H, L, d)
    with torch.no_grad():
        qs = q * attn.scale
        logits = torch.matmul(qs, k.transpose(-2, -1))  # (B, H, L, L)
        term = torch.zeros_like(logits)
        if attn.rpe_k is not None:
            term = term + attn.rpe_k(qs, height, width)
        if attn.rpe_q is not None:
            term = term + attn.rpe_q(k * attn.scale, height, width).transpose(2, 3)
        probs = (logits + term).softmax(dim=-1)
        probs_plain = logits.softmax(dim=-1)
        out = torch.matmul(probs, v)  # (B, H, L, d)
        if attn.rpe_v is not None:
            out = out + attn.rpe_v(probs, height, width)
    index = skip + query[0] * width + query[1]
    return QueryAttention(layer, head, index, (height, width), skip, logits, term, probs, probs_plain, out)


def plot_query_attention(
    model: nn.Module,
    image: torch.Tensor,
    layer: int = -1,
    head: int = 0,
    query: tuple[int, int] | None = None,
    out: str | Path | None = None,
    title: str = "",
    dpi: int = 100,
    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Picture:
    """Four panels: the image with the query patch, its attention over the key patches with iRPE, without it, and
    the iRPE logit term (what it adds to ``q k^T / sqrt(d)`` before the softmax).

    Args:
        model: see :func:`encoding_maps`.
        image: ``(1, 3, H_img, W_img)``, normalised with ``mean_std``.
        layer, head, query: see :func:`query_attention`.
        out: PNG path, or ``None``.
        title: first line of the figure title.
        dpi: PNG resolution.
        mean_std: normalisation of ``image`` (to draw it); ImageNet's by default.

    Returns:
        A :class:`Picture` with panels ``'with iRPE'``, ``'without iRPE'``, ``'iRPE term'`` (``(height, width)``,
        grid keys) and ``'image'``; the :class:`QueryAttention` in ``info['attention']``.
    """
    qa = query_attention(model, image, layer, head, query)
    height, width = qa.grid
    keys = slice(qa.skip, None)

    def row(t: torch.Tensor) -> np.ndarray:
        return t[0, head, qa.query, keys].reshape(height, width).float().numpy()  # (height, width)

    panels = {
        "with iRPE": row(qa.probs),
        "without iRPE": row(qa.probs_plain),
        "iRPE term": row(qa.term),
    }
    mean, std = mean_std or ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = image[0].float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    panels["image"] = pixels.clamp(0, 1).permute(1, 2, 0).numpy()  # (H_img, W_img, 3)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(4 * 2.9 * max(1.0, width / height) + 1, 3.4))
    ph, pw = image.shape[-2] // height, image.shape[-1] // width
    r, c = divmod(qa.query - qa.skip, width)
    axes[0].imshow(panels["image"], interpolation="nearest")
    axes[0].add_patch(plt.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="yellow", lw=2))
    axes[0].set_title(f"image, query patch ({r}, {c})", fontsize=9)
    skip_with = float(qa.probs[0, head, qa.query, : qa.skip].sum())
    skip_plain = float(qa.probs_plain[0, head, qa.query, : qa.skip].sum())
    vmax = max(panels["with iRPE"].max(), panels["without iRPE"].max())
    for ax, name, skip_mass in ((axes[1], "with iRPE", skip_with), (axes[2], "without iRPE", skip_plain)):
        im = ax.imshow(panels[name], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        extra = f"; class token(s) {skip_mass:.2f}" if qa.skip else ""
        ax.set_title(f"attention {name}{extra}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    term = panels["iRPE term"]
    lim = float(np.abs(term).max()) or 1.0
    im = axes[3].imshow(term, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    on = "".join(w for w in "qk" if getattr(model.blocks[qa.layer].attn, f"rpe_{w}") is not None)
    axes[3].set_title(f"iRPE logit term (encodings on {on or 'v only: none'})", fontsize=9)
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    for ax in axes[1:]:
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="cyan", lw=1.5))
        _few_ticks(ax, height, width)
        ax.set_xlabel("key column", fontsize=8)
        ax.set_ylabel("key row", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    v_note = ""
    if model.blocks[qa.layer].attn.rpe_v is not None:
        v_note = "; the encoding on values adds to the output, not to these weights"
    fig.suptitle(f"{title}\nlayer {qa.layer}, head {head}, {height}x{width} grid{v_note}", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.95, bottom=0.14, top=0.78, wspace=0.35)
    path = _save(fig, out, dpi)
    return Picture(fig, panels, path, {"attention": qa, "grid": (height, width)})


# ----------------------------------------------------------------------------------------------------------------
# Inputs: models, checkpoints, images; argument parsing.
# ----------------------------------------------------------------------------------------------------------------


def _few_ticks(ax: Any, height: int, width: int) -> None:
    """At most about five integer ticks per axis (tick labels are most of the drawing time)."""
    ax.set_xticks(range(0, width, max(1, math.ceil(width / 5))))
    ax.set_yticks(range(0, height, max(1, math.ceil(height / 5))))
    ax.tick_params(labelsize=7)


def _single_config(method: str, ratio: float, skip: int) -> irpe.RPEConfig:
    if str(method).lower() not in METHODS:
        raise VisualizeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or all")
    try:
        return irpe.get_single_rpe_config(ratio=ratio, method=method, mode="bias", skip=skip)
    except ValueError as e:
        raise VisualizeError(str(e)) from None


def _check_grid(height: int, width: int) -> None:
    if not (isinstance(height, int) and isinstance(width, int)) or height < 1 or width < 1:
        raise VisualizeError(f"the grid must be positive integers, got {height}x{width}")


def _check_query(query: tuple[int, int], height: int, width: int) -> None:
    if not (0 <= query[0] < height and 0 <= query[1] < width):
        raise VisualizeError(f"query patch {query[0]},{query[1]} is outside the {height}x{width} grid")


def _model_grid(model: nn.Module) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise VisualizeError("cannot tell the model's patch grid; pass --grid HxW")
    return int(grid[0]), int(grid[1])


def _patch_size(model: nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))


def _image_grid(model: nn.Module, img_h: int, img_w: int) -> tuple[int, int]:
    ph, pw = _patch_size(model)
    if img_h % ph or img_w % pw:
        raise VisualizeError(f"the image size {img_h}x{img_w} is not a multiple of the patch size {ph}x{pw}")
    return img_h // ph, img_w // pw


def parse_pair(text: str, what: str, sep: str = "x") -> tuple[int, int]:
    """``'9x13'`` (or one number for a square) -> ``(9, 13)``; ``sep=','`` for ``'row,col'``.

    Raises:
        VisualizeError: not one or two integers (>= 1 for sizes, >= 0 for a query).
    """
    parts = str(text).lower().split(sep)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if sep == "x" and len(values) == 1:
        values = values * 2
    low = 0 if sep == "," else 1
    if len(values) != 2 or min(values) < low:
        form = "ROW,COL (from 0)" if sep == "," else "HxW (positive) or N"
        raise VisualizeError(f"{what} must be {form}, got {text!r}")
    return values[0], values[1]


def load_model(
    model_name: str | None = None, checkpoint: str | None = None, pretrained: bool = False
) -> tuple[nn.Module, str]:
    """Builds a registered model (zoo iRPE models, ``tools/compare_rpe.py`` variants, timm's) and loads weights.

    A checkpoint of ``main.py`` names its model and input size in ``args``; other checkpoints need ``model_name``.
    The model is built for that input size (224 without one); it runs on any multiple of its patch size.

    Returns:
        ``(model in eval mode, a description for titles)``.

    Raises:
        VisualizeError: no model named, unknown name, unreadable checkpoint, checkpoint without iRPE tables, or one
            that does not fit the model.
    """
    state, ckpt_args = None, {}
    if checkpoint:
        state, ckpt_args = _read_checkpoint(checkpoint)
    import compare_rpe
    import timm

    import rpe_models  # noqa: F401  (registers the iRPE zoo models)

    compare_rpe.register_variants()  # the tiny variants of the comparison, for their checkpoints
    name = model_name or ckpt_args.get("model")
    if not name:
        raise VisualizeError(f"{checkpoint} does not name its model (no args.model): pass --model NAME")
    if not timm.is_model(name):
        raise VisualizeError(f"unknown model {name!r} (see rpe_models.MODEL_ZOO or timm.list_models())")
    size = int(ckpt_args.get("input_size", 224))
    kwargs: dict[str, Any] = {"img_size": size}
    if state is not None and "head.weight" in state:
        kwargs["num_classes"] = int(state["head.weight"].shape[0])
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001  (download errors, bad sizes: all are the user's to fix)
        raise VisualizeError(f"cannot build {name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not rpe_attentions(model):
        raise VisualizeError(f"{name} has no iRPE tables (it is not an iRPE model)")
    if state is not None:
        state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
        state = _fit_pos_embed(model, state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:300]
            raise VisualizeError(f"{checkpoint} does not fit {name}: {first}") from None
    model.eval()
    where = f"{Path(checkpoint).name}: " if checkpoint else ("pretrained " if pretrained else "untrained ")
    return model, f"{where}{name}"


def _fit_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resamples a square checkpoint's ``pos_embed`` to the model's grid (as ``models.adapt_state_dict``)."""
    import models

    return models.adapt_state_dict(model, state) if hasattr(model, "patch_grid") else state


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, main.py args or {})`` of a checkpoint file; errors for unreadable files or no iRPE tables."""
    if not Path(path).is_file():
        raise VisualizeError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip, pickle, EOF errors: all mean an unreadable file)
        raise VisualizeError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VisualizeError(f"{path} holds no state dict (expected {{'model': state_dict}})")
    if not any(".rpe_" in k and k.rsplit(".", 1)[-1].startswith("lookup_table") for k in state):
        raise VisualizeError(f"{path} has no iRPE tables (no blocks.*.attn.rpe_*.lookup_table_* entries)")
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    return state, args


def load_images(
    data_path: str, num_images: int, img_size: tuple[int, int], mean_std: tuple
) -> tuple[torch.Tensor, int]:
    """Up to ``num_images`` images found under ``data_path`` (its ``val/`` if present), spread over the sorted
    files, resized to ``img_size`` and normalised: ``((B, 3, H, W), number found)``."""
    root = Path(data_path)
    if (root / "val").is_dir():
        root = root / "val"
    if not root.is_dir():
        raise VisualizeError(f"--data-path {data_path} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VisualizeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    step = max(1, len(files) // num_images)
    chosen = files[::step][:num_images]
    return torch.cat([image_tensor(str(p), img_size, mean_std) for p in chosen]), len(files)


def image_tensor(path: str | None, img_size: tuple[int, int], mean_std: tuple, seed: int = 0) -> torch.Tensor:
    """An image file (or, for ``None``, a generated relational image) as ``(1, 3, H, W)``, resized, normalised."""
    from PIL import Image

    if path is None:
        import make_relational_dataset as rel

        side = max(img_size)
        rng = np.random.default_rng(seed)
        a, b, r = rel.sample_geometry(0, side, side / 3, rng)
        img = rel.draw_image(a, b, r, side, rng)
    else:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as e:
            raise VisualizeError(f"cannot read the image {path}: {e}") from None
    img = img.resize((img_size[1], img_size[0]), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in mean_std)
    return ((pixels - mean) / std).unsqueeze(0)


def _mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


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

    p = sub.add_parser(
        "buckets",
        help="bucket id of every key patch for one query, per method, and g(x)",
        description="One panel per method: for the query patch (red frame) the bucket id of every key patch of the "
        "grid, written in its cell; the cross method has a row table and a column table, so two panels. Last panel: "
        "the piecewise index function g(x) of irpe.piecewise_index (exact for |x| <= alpha, logarithmic up to gamma, "
        "clipped at beta), with alpha, beta, gamma = ratio * (1, 2, 8); dots are the integer x the ids use. Product "
        "and cross apply g to the row and column offsets, euc to the rounded distance, quant to the squared distance.",
    )
    p.add_argument("--method", default="all", help="euc, quant, cross, product or all (default: all)")
    p.add_argument("--ratio", type=float, default=1.9, help="alpha, beta, gamma = ratio * (1, 2, 8) (default 1.9)")
    p.add_argument("--grid", default="14x14", help="patch grid HxW (default 14x14)")
    p.add_argument("--query", default=None, help="query patch ROW,COL from 0 (default: the centre)")
    p.add_argument("--skip", type=int, default=0, help="leading tokens without position (shown as their bucket id)")
    p.add_argument("--out", default="rpe_buckets.png", help="output PNG")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")

    common = _Parser(add_help=False)
    g = common.add_argument_group("model (one of --checkpoint or --model)")
    g.add_argument("--checkpoint", default=None, help="main.py checkpoint (names its model and input size)")
    g.add_argument("--model", default=None, help="registered model name (iRPE zoo or compare_rpe.py variants)")
    g.add_argument("--pretrained", action="store_true", help="with --model: the released weights (downloads)")
    g.add_argument("--image-size", default=None, help="input size HxW in pixels (default: the model's)")
    g.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")

    p = sub.add_parser(
        "encodings",
        parents=[common],
        help="learned encodings of every layer and head over relative offsets",
        description="Rows are the iRPE layers, columns the heads (one column for a table shared by the heads, "
        "except for the projection, which differs per head through the query). Each map "
        "is over the offset of a key from its query (key row - query row down, key column - query column across; "
        "the + marks the query itself): bias mode draws the learned bias; contextual mode the norm of the bucket's "
        "vector or, with --data-path, its dot product with the mean query of those images times the logit scale, "
        "i.e. the mean logit the encoding adds (for the encoding on queries: with the mean key). The colour scale "
        "is shared within a layer, with its colour bar. Tables start at zero: an untrained model draws zeros.",
    )
    p.add_argument("--on", default=None, choices=("q", "k", "v"), help="which encoding (default: k if present)")
    p.add_argument("--grid", default=None, help="patch grid HxW of the maps (default: the model's)")
    p.add_argument("--data-path", default=None, help="images (a folder; its val/ if present) for the mean query")
    p.add_argument("--num-images", type=int, default=32, help="images read from --data-path (default 32)")
    p.add_argument("--out", default="rpe_encodings.png", help="output PNG")

    p = sub.add_parser(
        "attention",
        parents=[common],
        help="attention of one query patch, with and without the iRPE term",
        description="Four panels: the image with the query patch (yellow); the query's attention over the key "
        "patches with the iRPE term (what the model computes); the same softmax without it; and the iRPE term "
        "itself, the logit it adds before the softmax (rpe_k(q) + rpe_q(k)^T). Titles give the attention mass on "
        "the class token(s). q and k are the layer's own, from a forward hook.",
    )
    p.add_argument("--image", default=None, help="image file (default: a generated relational image)")
    p.add_argument("--layer", type=int, default=-1, help="block index (default: the last)")
    p.add_argument("--head", type=int, default=0, help="head index (default 0)")
    p.add_argument("--query", default=None, help="query patch ROW,COL from 0 (default: the centre)")
    p.add_argument("--out", default="rpe_attention.png", help="output PNG")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Draws the picture of one parsed command line; returns the PNG path."""
    if args.command == "buckets":
        height, width = parse_pair(args.grid, "--grid")
        query = parse_pair(args.query, "--query", ",") if args.query else None
        method = str(args.method).lower()
        methods = list(METHODS) if method == "all" else [method]
        if args.skip < 0:
            raise VisualizeError(f"--skip must be >= 0, got {args.skip}")
        return plot_bucket_maps(methods, args.ratio, height, width, query, args.skip, args.out, _dpi(args.dpi)).path
    if not args.checkpoint and not args.model:
        raise VisualizeError("pass --checkpoint PATH or --model NAME")
    img_size = parse_pair(args.image_size, "--image-size") if args.image_size else None
    model, desc = load_model(args.model, args.checkpoint, args.pretrained)
    img_size = img_size or tuple(int(g * p) for g, p in zip(_model_grid(model), _patch_size(model)))
    _image_grid(model, *img_size)
    mean_std = _mean_std(model)
    if args.command == "encodings":
        grid = parse_pair(args.grid, "--grid") if args.grid else None
        images = None
        if args.data_path:
            if args.num_images < 1:
                raise VisualizeError(f"--num-images must be >= 1, got {args.num_images}")
            images, _ = load_images(args.data_path, args.num_images, img_size, mean_std)
            desc += f", mean query of {images.size(0)} images"
        return plot_encodings(model, grid, args.on, images, args.out, desc, _dpi(args.dpi)).path
    query = parse_pair(args.query, "--query", ",") if args.query else None
    image = image_tensor(args.image, img_size, mean_std)
    desc += f", {Path(args.image).name if args.image else 'generated image'}"
    return plot_query_attention(
        model, image, args.layer, args.head, query, args.out, desc, _dpi(args.dpi), mean_std=mean_std
    ).path


def _dpi(value: int) -> int:
    if not 10 <= value <= 600:
        raise VisualizeError(f"--dpi must be in [10, 600], got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        path = run(args)
    except VisualizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
