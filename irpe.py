"""iRPE: image relative position encoding for vision transformers.

Implements the relative position encodings of

    Kan Wu, Houwen Peng, Minghao Chen, Jianlong Fu, Hongyang Chao.
    "Rethinking and Improving Relative Position Encoding for Vision Transformer". ICCV 2021.

A query token ``i`` and a key token ``j`` on a ``height x width`` patch grid have a 2D relative position
``(dr, dc) = pos(i) - pos(j)``. A *method* (euclidean, quantized euclidean, cross or product) maps it through the
piecewise index function ``g`` to a *bucket*; every bucket owns a learned encoding, either a scalar (``bias`` mode)
or a vector that interacts with the query, key or value (``contextual`` mode). Up to ``skip`` leading tokens (class
or distillation token) have no grid position and share one extra bucket.

This file is self-contained (torch only) and keeps the public API of the original ``irpe.py`` so that it can be
copied into other transformers: ``get_rpe_config`` + ``build_rpe`` give the q, k and v modules, each called as
``module(x, height, width)``. The two lookups, :func:`rpe_index` and its adjoint :func:`rpe_bucket_sum`, run on the
compiled ``rpe_ops`` where it is importable and serves the tensor (``rpe_ops.serves``; not inside ``with
rpe_ops.disabled():``), and on equivalent PyTorch code otherwise; ``python -m irpe`` says which serves CPU and CUDA
tensors. The memory-efficient attention paths (``rpe_attention``) live in ``irpe_attention.py``.
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

try:  # the compiled lookups (optional): without them the PyTorch code of this file serves every tensor
    import rpe_ops
except ImportError:
    rpe_ops = None


class METHOD(enum.IntEnum):
    """Mapping methods from a 2D relative position to a bucket (ids as in the original)."""

    EUCLIDEAN = 0
    QUANT = 1
    PRODUCT = 3
    CROSS = 4
    CROSS_ROWS = 41
    CROSS_COLS = 42


_METHOD_ALIASES = {"euc": METHOD.EUCLIDEAN, "quant": METHOD.QUANT, "cross": METHOD.CROSS, "product": METHOD.PRODUCT}
_MODE_ALIASES = {None: None, "bias": "bias", "contextual": "contextual", "ctx": "contextual"}

Mode = Literal["bias", "contextual"] | None


def piecewise_index(
    relative_position: torch.Tensor, alpha: float, beta: float, gamma: float, dtype: torch.dtype
) -> torch.Tensor:
    """The piecewise index function ``g`` of the paper (Eq. 18), elementwise.

    ``g(x) = round(x)`` when ``|x| <= alpha``; otherwise
    ``sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))``, cast to ``dtype``
    (so an integer ``dtype`` truncates a non-integer ``beta``). Rounding is half-to-even, as ``torch.round``.

    The arithmetic follows the original operation by operation, so the ids are bit-identical; it is written with
    ``torch.where`` rather than boolean-mask indexing so that shapes stay static (traceable by ``torch.compile``).

    Args:
        relative_position: relative positions or distances, any shape, integer or floating point.
        alpha: the half-width of the exact (linear) region.
        beta: the largest index magnitude.
        gamma: the distance mapped to ``beta`` by the logarithmic region.
        dtype: the output dtype.

    Returns:
        The bucket indices, same shape as ``relative_position``.
    """
    rp_abs = relative_position.abs()
    inside = rp_abs <= alpha
    # Far elements use the logarithmic branch; near ones get a harmless placeholder (log(1) = 0) that `where` drops.
    far_abs = torch.where(inside, torch.ones_like(rp_abs), rp_abs)
    log_part = (alpha + torch.log(far_abs / alpha) / math.log(gamma / alpha) * (beta - alpha)).round().clip(max=beta)
    far = (torch.sign(relative_position) * log_part).to(dtype)
    near = relative_position.round() if relative_position.is_floating_point() else relative_position
    return torch.where(inside, near.to(dtype), far)


def get_absolute_positions(height: int, width: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Row and column of every cell of a ``height x width`` grid, row-major: shape ``(height, width, 2)``."""
    rows = torch.arange(height, dtype=dtype, device=device).view(height, 1).expand(height, width)
    cols = torch.arange(width, dtype=dtype, device=device).view(1, width).expand(height, width)
    return torch.stack([rows, cols], dim=2)


def quantize_values(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace every value by the rank of its distinct value: returns ``(ids like values, number of distinct)``."""
    unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return inverse.view_as(values).to(values.dtype), unique.numel()


def get_num_buckets(method: int, alpha: float, beta: float, gamma: float) -> int:
    """Number of buckets of a method, without the extra bucket of the skip tokens (it depends on ``beta`` alone)."""
    per_axis = 2 * int(beta) + 1
    return per_axis**2 if method == METHOD.PRODUCT else per_axis


def _bucket_ids_of_diff(method: int, diff: torch.Tensor, alpha: float, beta: float, gamma: float, dtype: torch.dtype):
    """Bucket id (before the ``+beta`` shift of non-product methods) of each relative position in ``diff (..., 2)``."""
    if method == METHOD.EUCLIDEAN:
        dis = diff.square().sum(-1).float().sqrt().round()
        return piecewise_index(dis, alpha, beta, gamma, dtype)
    if method == METHOD.QUANT:
        return piecewise_index(diff.square().sum(-1), alpha, beta, gamma, dtype)
    if method == METHOD.PRODUCT:
        beta_int = int(beta)
        rows = piecewise_index(diff[..., 0], alpha, beta, gamma, dtype) + beta_int  # in [0, 2 * beta_int]
        cols = piecewise_index(diff[..., 1], alpha, beta, gamma, dtype) + beta_int
        return rows * (2 * beta_int + 1) + cols
    if method == METHOD.CROSS_ROWS:
        return piecewise_index(diff[..., 0], alpha, beta, gamma, dtype)
    if method == METHOD.CROSS_COLS:
        return piecewise_index(diff[..., 1], alpha, beta, gamma, dtype)
    if method == METHOD.CROSS:
        raise ValueError("METHOD.CROSS has two tables: compute its ids with METHOD.CROSS_ROWS and METHOD.CROSS_COLS")
    raise ValueError(f"unknown method id {method!r}; expected one of {[int(m) for m in METHOD]}")


def get_bucket_ids_2d_without_skip(
    method: int,
    height: int,
    width: int,
    alpha: float,
    beta: float,
    gamma: float,
    dtype: torch.dtype = torch.long,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int, int]:
    """Bucket ids of all pairs of cells of a ``height x width`` grid.

    Returns:
        ``(bucket_ids, num_buckets, L)`` with ``L = height * width`` and ``bucket_ids (L, L)``, where entry
        ``[i, j]`` encodes ``pos(i) - pos(j)`` for row-major cells ``i`` (query) and ``j`` (key).
    """
    _check_grid(height, width)
    pos = get_absolute_positions(height, width, torch.long, device)
    L = height * width
    diff = pos.view(L, 1, 2) - pos.view(1, L, 2)  # (L, L, 2)
    bucket_ids = _bucket_ids_of_diff(method, diff, alpha, beta, gamma, dtype)
    if method != METHOD.PRODUCT:
        bucket_ids = bucket_ids + int(beta)
    return bucket_ids.to(dtype), get_num_buckets(method, alpha, beta, gamma), L


def get_bucket_ids_2d(
    method: int,
    height: int,
    width: int,
    skip: int,
    alpha: float,
    beta: float,
    gamma: float,
    dtype: torch.dtype = torch.long,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """Bucket ids for ``skip`` leading tokens followed by a ``height x width`` grid.

    Every pair involving one of the ``skip`` leading tokens uses one extra bucket, ``num_buckets - 1``.

    Returns:
        ``(bucket_ids (skip + L, skip + L), num_buckets)``; ``num_buckets`` includes the extra bucket when
        ``skip > 0``.
    """
    if skip < 0:
        raise ValueError(f"skip must be >= 0 (the number of leading tokens without a grid position), got {skip}")
    grid_ids, num_buckets, L = get_bucket_ids_2d_without_skip(method, height, width, alpha, beta, gamma, dtype, device)
    if skip == 0:
        return grid_ids.contiguous(), num_buckets
    bucket_ids = torch.full((skip + L, skip + L), num_buckets, dtype=dtype, device=grid_ids.device)
    bucket_ids[skip:, skip:] = grid_ids
    return bucket_ids, num_buckets + 1


def _check_grid(height: int, width: int) -> None:
    """A ``ValueError`` unless the grid is positive integers; under torch.compile/export a symbolic side
    (``torch.SymInt``) is checked with ``torch._check`` (a guard, or a runtime assertion of the exported program)."""
    message = f"the patch grid must be positive integers, got height={height!r}, width={width!r}"
    if any(isinstance(v, torch.SymInt) for v in (height, width)):
        for v in (height, width):
            torch._check(isinstance(v, (int, torch.SymInt)) and v >= 1, lambda: message)
        return
    integral = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (height, width))
    if not integral or height < 1 or width < 1:
        raise ValueError(message)


@dataclass(frozen=True)
class RPEConfig:
    """Configuration of one relative position encoding (on queries, keys or values).

    Attributes:
        shared_head: one table shared by all heads (True) or one per head.
        mode: ``'bias'`` (a scalar per bucket) or ``'contextual'`` (a vector per bucket).
        method: the bucketing method.
        alpha, beta, gamma: coefficients of the piecewise index function (``ratio * (1, 2, 8)``).
        num_buckets: number of buckets, including the extra bucket of the skip tokens when ``skip > 0``.
        skip: number of leading tokens without a grid position (the class token: 1).
    """

    shared_head: bool
    mode: Mode
    method: METHOD
    alpha: float
    beta: float
    gamma: float
    num_buckets: int
    skip: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("bias", "contextual", None):
            raise ValueError(f"unknown mode {self.mode!r}; expected one of 'bias', 'contextual' ('ctx') or None")
        if self.method not in set(METHOD):
            raise ValueError(f"unknown method {self.method!r}; expected one of {[m.name for m in METHOD]}")
        if not 0 < self.alpha <= self.beta <= self.gamma or self.gamma == self.alpha:
            raise ValueError(
                f"need 0 < alpha <= beta <= gamma and gamma > alpha, got {self.alpha}, {self.beta}, {self.gamma}"
            )
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")


@dataclass(frozen=True)
class RPEConfigs:
    """The encodings of one attention layer; ``None`` where there is none."""

    rpe_q: RPEConfig | None = None
    rpe_k: RPEConfig | None = None
    rpe_v: RPEConfig | None = None


def _parse_method(method: int | str) -> METHOD:
    if isinstance(method, str) and method.lower() in _METHOD_ALIASES:
        return _METHOD_ALIASES[method.lower()]
    if isinstance(method, str) and method.upper() in METHOD.__members__:
        return METHOD[method.upper()]
    if not isinstance(method, str) and method in set(METHOD):
        return METHOD(method)
    raise ValueError(
        f"unknown method {method!r}; expected one of {sorted(_METHOD_ALIASES)} or a METHOD "
        f"({', '.join(f'{m.name}={m.value}' for m in METHOD)})"
    )


def _parse_mode(mode: str | None) -> Mode:
    key = mode.lower() if isinstance(mode, str) else mode
    if key not in _MODE_ALIASES:
        raise ValueError(f"unknown mode {mode!r}; expected one of 'bias', 'contextual', 'ctx' or None")
    return _MODE_ALIASES[key]  # type: ignore[return-value]


def get_single_rpe_config(
    ratio: float = 1.9,
    method: int | str = METHOD.PRODUCT,
    mode: str | None = "contextual",
    shared_head: bool = True,
    skip: int = 0,
) -> RPEConfig:
    """Configuration of one encoding, ``alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio``; arguments as
    :func:`get_rpe_config` (``skip > 0`` adds one bucket)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"ratio must be a positive number, got {ratio!r}")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be a non-negative integer (number of leading tokens), got {skip!r}")
    method = _parse_method(method)
    alpha, beta, gamma = 1 * ratio, 2 * ratio, 8 * ratio
    num_buckets = get_num_buckets(method, alpha, beta, gamma) + (1 if skip > 0 else 0)
    return RPEConfig(
        shared_head=bool(shared_head),
        mode=_parse_mode(mode),
        method=method,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        num_buckets=num_buckets,
        skip=skip,
    )


def get_rpe_config(
    ratio: float = 1.9,
    method: int | str = METHOD.PRODUCT,
    mode: str | None = "contextual",
    shared_head: bool = True,
    skip: int = 0,
    rpe_on: str = "k",
) -> RPEConfigs:
    """Configuration of the encodings of an attention layer.

    Args:
        ratio: scale of the piecewise index function (``alpha, beta, gamma = ratio * (1, 2, 8)``).
        method: a :class:`METHOD` or one of ``'euc'``, ``'quant'``, ``'cross'``, ``'product'``.
        mode: ``'bias'``, ``'contextual'`` (or ``'ctx'``), or ``None`` for no encoding at all.
        shared_head: share each table across heads.
        skip: number of leading tokens without a grid position (1 for a class token).
        rpe_on: where to add encodings: any combination of ``'q'``, ``'k'`` and ``'v'``.

    Raises:
        ValueError: for an unknown method or mode, letters other than q/k/v in ``rpe_on``, bias mode on values,
            a non-positive ratio or a negative skip.
    """
    if not isinstance(rpe_on, str) or set(rpe_on) - set("qkv"):
        raise ValueError(f"rpe_on must combine the letters 'q', 'k' and 'v' (e.g. 'k', 'qkv'), got {rpe_on!r}")
    single = get_single_rpe_config(ratio=ratio, method=method, mode=mode, shared_head=shared_head, skip=skip)
    if single.mode == "bias" and "v" in rpe_on:
        raise ValueError(
            f"bias mode has no encoding on values (rpe_on={rpe_on!r}); use mode='contextual' or drop 'v' from rpe_on"
        )
    if single.mode is None:
        return RPEConfigs()
    return RPEConfigs(
        rpe_q=single if "q" in rpe_on else None,
        rpe_k=single if "k" in rpe_on else None,
        rpe_v=single if "v" in rpe_on else None,
    )


def _compiled(tensor: torch.Tensor) -> bool:
    """Whether the compiled ``rpe_ops`` serve ``tensor``: built and importable, for its device, dtype and GPU, and
    not inside ``with rpe_ops.disabled():``."""
    return rpe_ops is not None and rpe_ops.serves(tensor.device, tensor.dtype)[0]


def _check_lookup_shapes(name: str, tensor: torch.Tensor, index: torch.Tensor) -> None:
    if tensor.dim() != 4 or index.dim() != 2:
        raise ValueError(
            f"{name}: expected a 4D input (B, H, Lq, *) and a 2D index (Lq, Lk), got "
            f"{tuple(tensor.shape)} and {tuple(index.shape)}"
        )
    if tensor.size(2) != index.size(0):
        raise ValueError(f"{name}: input has Lq={tensor.size(2)} rows but the index has {index.size(0)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: the index must be int64 or int32, got {index.dtype}")


def rpe_index(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather per-row bucket values: ``out[b, h, i, j] = table[b, h, i, index[i, j]]``.

    Its backward is :func:`rpe_bucket_sum`.

    Args:
        table: ``(B, H, Lq, num_buckets)``; any strides (an expanded bias table is fine).
        index: ``(Lq, Lk)`` int64 or int32 bucket ids in ``[0, num_buckets)``.

    Returns:
        ``(B, H, Lq, Lk)``, dtype of ``table``.
    """
    _check_lookup_shapes("rpe_index", table, index)
    if _compiled(table):
        return torch.ops.rpe_ops.rpe_index(table, index)
    B, H, Lq, _ = table.shape
    return torch.gather(table, 3, index.long().expand(B, H, Lq, index.size(1)))


def rpe_bucket_sum(values: torch.Tensor, index: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Sum each row's values per bucket: ``out[b, h, i, k] = sum_{j : index[i, j] = k} values[b, h, i, j]``.

    The adjoint of :func:`rpe_index` (and its backward). Contextual encodings on values use it to compute
    ``sum_j attn[i, j] * table[index[i, j]]`` as ``rpe_bucket_sum(attn) @ table``, without an ``(L, L, d)`` tensor.

    Args:
        values: ``(B, H, Lq, Lk)``.
        index: ``(Lq, Lk)`` int64 or int32 bucket ids in ``[0, num_buckets)``.
        num_buckets: size of the last output dimension.

    Returns:
        ``(B, H, Lq, num_buckets)``, dtype of ``values``.
    """
    _check_lookup_shapes("rpe_bucket_sum", values, index)
    if values.size(3) != index.size(1):
        raise ValueError(f"rpe_bucket_sum: values have Lk={values.size(3)} columns but the index has {index.size(1)}")
    if _compiled(values):
        return torch.ops.rpe_ops.rpe_bucket_sum(values, index, num_buckets)
    B, H, Lq, Lk = values.shape
    # Half types accumulate in float32, as the compiled kernels do: a row sums up to Lk values per bucket.
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    out = values.new_zeros(B, H, Lq, num_buckets, dtype=acc)
    return out.scatter_add(3, index.long().expand(B, H, Lq, Lk), values.to(acc)).to(values.dtype)


def encode_values(probs: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What a contextual encoding on values adds to ``probs @ v``: ``out[b,h,i] = sum_j probs[b,h,i,j] *
    weight[h, index[i, j]]``, computed as ``rpe_bucket_sum(probs) @ weight`` without an ``(L, L, d)`` tensor.

    Shapes: ``probs (B, H, Lq, Lk)`` (or a block of rows, with the index's rows), ``index (Lq, Lk)``, ``weight
    (Hm, nb, d)`` (``Hm``: 1, shared by the heads, or ``H``) -> ``(B, H, Lq, d)``.
    """
    return torch.matmul(rpe_bucket_sum(probs, index, weight.size(1)), weight.to(probs.dtype))


class FusedTerm(NamedTuple):
    """One table of an encoding, as the fused attention paths consume it.

    ``weight`` is the module's parameter, ``index`` its bucket ids ``(L, L)``. On queries or keys the weight is
    contextual ``(Hm, d, nb)`` or bias ``(Hm, nb)``, and a query term (``rpe_q``) is looked up with the keys and
    transposed onto the logits; on values (``rpe_v``, always contextual) it is ``(Hm, nb, d)``, with both flags False.
    """

    weight: torch.Tensor
    index: torch.Tensor
    is_bias: bool
    is_query: bool


def per_row_table(weight: torch.Tensor, is_bias: bool, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The values every row looks its buckets up in, for ``x * scale`` (``(B, H, L, d)``).

    Contextual: ``x @ (W * scale)`` ``(B, H, L, nb)``, the scale applied to the small weight so that autograd keeps
    ``x`` rather than a scaled copy; bias: the ``(Hm, nb)`` row repeated, ``(1, Hm, L, nb)`` (a stride-0 view).
    """
    if is_bias:
        Hm, nb = weight.shape
        return weight.to(x.dtype).view(1, Hm, 1, nb).expand(1, Hm, x.size(2), nb)
    weight = weight.to(x.dtype)
    return torch.matmul(x, weight * scale if scale != 1.0 else weight)  # (B, H, L, d) @ (Hm, d, nb)


@functools.lru_cache(maxsize=16)
def _shared_bucket_ids(
    method: int, height: int, width: int, skip: int, alpha: float, beta: float, gamma: float, device: torch.device
) -> tuple[torch.Tensor, int]:
    """:func:`get_bucket_ids_2d` (int64) memoised for the process: the encodings of every layer with one config (on
    queries, keys and values too) hold one ids tensor, which the fused kernels then prepare once per call. Built
    outside inference mode, so that a model trained after it was evaluated can save the ids for backward."""
    with torch.inference_mode(False):
        return get_bucket_ids_2d(method, height, width, skip, alpha, beta, gamma, torch.long, device)


class iRPE(nn.Module):
    """One relative position encoding: on queries or keys (``transposed=True``) or on values.

    Shapes, with ``L = skip + height * width``:

    * keys (``transposed``): ``x = q * scale (B, H, L, d)`` -> ``(B, H, L, L)`` to add to the attention logits;
    * queries (``transposed``): ``x = k * scale (B, H, L, d)`` -> ``(B, H, L, L)``, to be transposed(2, 3) by the
      caller;
    * bias mode (``transposed``): ``x`` only gives the length -> ``(1, Hm, L, L)``;
    * values (not ``transposed``): ``x = attn (B, H, L, L)`` -> ``(B, H, L, d)`` to add to ``attn @ v``.

    Bucket ids are no state of the module (nothing in the ``state_dict``, nothing for ``.to()`` to move): one cache
    keyed by config, grid and device serves every module (:func:`_shared_bucket_ids`)."""

    def __init__(
        self,
        head_dim: int,
        num_heads: int = 8,
        mode: Mode = None,
        method: int | None = None,
        transposed: bool = True,
        num_buckets: int | None = None,
        initializer=None,
        rpe_config: RPEConfig | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("bias", "contextual"):
            raise ValueError(f"iRPE needs mode 'bias' or 'contextual', got {mode!r}")
        if method is None or method == METHOD.CROSS:
            raise ValueError(f"iRPE needs a single-table METHOD (use iRPE_Cross for METHOD.CROSS), got {method!r}")
        if rpe_config is None or num_buckets is None:
            raise ValueError("iRPE needs rpe_config (alpha, beta, gamma) and num_buckets; build it with build_rpe()")
        if mode == "bias" and not transposed:
            raise ValueError("bias mode has no encoding on values (transposed=False); use mode='contextual'")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.mode = mode
        self.method = METHOD(method)
        self.transposed = transposed
        self.num_buckets = num_buckets
        self.rpe_config = rpe_config
        if mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        elif transposed:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, head_dim, num_buckets))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, num_buckets, head_dim))
        if initializer is not None:
            with torch.no_grad():
                initializer(self.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The learned table: ``lookup_table_bias`` ``(Hm, nb)`` or ``lookup_table_weight``."""
        return self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight

    def extra_repr(self) -> str:
        where = "q/k" if self.transposed else "v"
        return (
            f"method={self.method.name}, mode={self.mode}, on={where}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, num_buckets={self.num_buckets}, alpha={self.rpe_config.alpha:g}, "
            f"beta={self.rpe_config.beta:g}, gamma={self.rpe_config.gamma:g}"
        )

    def resolve_grid(self, length: int, height: int | None, width: int | None) -> tuple[int, int, int]:
        """The ``(height, width, skip)`` of ``length`` tokens: the configured ``skip`` leading tokens, then the given
        grid or, without one, a square grid. Anything else is an error rather than a silent guess."""
        skip = self.rpe_config.skip
        if height is None and width is None:
            side = math.isqrt(max(length - skip, 0))
            if length - skip < 1 or side * side != length - skip:
                raise ValueError(
                    f"cannot infer the patch grid: {length} tokens minus skip={skip} is not a perfect square; "
                    f"pass height= and width= (the patch grid) explicitly"
                )
            return side, side, skip
        if height is None or width is None:
            raise ValueError(f"pass both height and width (got height={height}, width={width})")
        _check_grid(height, width)
        if length - height * width != skip:
            raise ValueError(
                f"{length} tokens do not match a {height}x{width} patch grid after skip={skip} leading token(s) "
                f"(configured skip); check the height/width passed to the iRPE module, or the skip of its config"
            )
        return height, width, skip

    def get_bucket_ids(self, height: int, width: int, skip: int, device: torch.device) -> torch.Tensor:
        """Bucket ids ``(L, L)``, ``L = skip + height * width`` (int64, read-only) on ``device``; while torch.jit.trace,
        torch.compile or torch.export trace the module, computed in the graph (the grid may be symbolic), not cached."""
        config = self.rpe_config
        args = (self.method, height, width, skip, config.alpha, config.beta, config.gamma)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            ids, num_buckets = get_bucket_ids_2d(*args, torch.long, device)
        else:
            ids, num_buckets = _shared_bucket_ids(*args, torch.device(device))
        if num_buckets != self.num_buckets:
            raise ValueError(
                f"the grid gives {num_buckets} buckets but this module has {self.num_buckets}: skip={skip} "
                f"does not match the configured skip={config.skip}"
            )
        return ids

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Encoding for ``x``; see the class docstring for shapes."""
        length = x.size(2)
        height, width, skip = self.resolve_grid(length, height, width)
        if not self.transposed and x.size(3) != length:
            raise ValueError(f"the values encoding takes attention (B, H, L, L), got {tuple(x.shape)}")
        index = self.get_bucket_ids(height, width, skip, x.device)  # (L, L)
        if self.transposed:  # per-row bucket values (B, H, L, nb) (bias: (1, Hm, L, nb)), looked up
            return rpe_index(per_row_table(self.weight, self.mode == "bias", x), index)  # (B, H, L, L)
        return encode_values(x, index, self.weight)

    def fused_terms(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None, *, is_query: bool = False
    ) -> list[FusedTerm]:
        """This encoding's weight and bucket ids for the fused paths of ``irpe_attention.rpe_attention``, for ``x``
        ``(B, H, L, d)`` (the keys for the encoding on queries, ``is_query``; the queries otherwise)."""
        if not self.transposed and is_query:
            raise ValueError("the values encoding is not one on queries: call fused_terms() with is_query=False")
        index = self.get_bucket_ids(*self.resolve_grid(x.size(2), height, width), x.device)
        return [FusedTerm(self.weight, index, self.mode == "bias", is_query)]


class iRPE_Cross(nn.Module):
    """The cross method: one table indexed by the row offset plus one indexed by the column offset."""

    def __init__(self, method: int, **kwargs) -> None:
        super().__init__()
        if method != METHOD.CROSS:
            raise ValueError(f"iRPE_Cross implements METHOD.CROSS, got {method!r}")
        self.rp_rows = iRPE(**kwargs, method=METHOD.CROSS_ROWS)
        self.rp_cols = iRPE(**kwargs, method=METHOD.CROSS_COLS)

    @property
    def num_buckets(self) -> int:
        return self.rp_rows.num_buckets

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Sum of the row and the column encodings; shapes as :class:`iRPE`."""
        return self.rp_rows(x, height=height, width=width) + self.rp_cols(x, height=height, width=width)

    def fused_terms(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None, *, is_query: bool = False
    ) -> list[FusedTerm]:
        """The row and the column tables; see :meth:`iRPE.fused_terms`."""
        rows = self.rp_rows.fused_terms(x, height, width, is_query=is_query)
        return rows + self.rp_cols.fused_terms(x, height, width, is_query=is_query)


def build_rpe(config: RPEConfigs | None, head_dim: int, num_heads: int) -> list[iRPE | iRPE_Cross | None]:
    """Build the encoding modules of one attention layer.

    Args:
        config: from :func:`get_rpe_config`, or ``None``.
        head_dim: channels per head.
        num_heads: heads of the attention (a shared-head table has one).

    Returns:
        ``[rpe_q, rpe_k, rpe_v]``, ``None`` where unused.
    """
    if config is None:
        return [None, None, None]

    def build_one(rpe: RPEConfig | None, transposed: bool) -> iRPE | iRPE_Cross | None:
        if rpe is None or rpe.mode is None:
            return None
        cls = iRPE_Cross if rpe.method == METHOD.CROSS else iRPE
        return cls(
            head_dim=head_dim,
            num_heads=1 if rpe.shared_head else num_heads,
            mode=rpe.mode,
            method=rpe.method,
            transposed=transposed,
            num_buckets=rpe.num_buckets,
            rpe_config=rpe,
        )

    return [build_one(config.rpe_q, True), build_one(config.rpe_k, True), build_one(config.rpe_v, False)]


if __name__ == "__main__":  # which lookups serve CPU and CUDA tensors, and why
    print(rpe_ops.report() if rpe_ops is not None else "rpe_ops is not importable: PyTorch serves every lookup")
