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
``module(x, height, width)``. The two lookup primitives, :func:`rpe_index` and its adjoint
:func:`rpe_bucket_sum`, run on the compiled ``rpe_ops`` extension when it is built and supports the tensor, and on
an equivalent pure-PyTorch path otherwise; ``IRPE_BACKEND=auto|torch|ops`` forces a choice and
``python -m irpe`` reports which backend serves CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import numbers
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

__all__ = [
    "METHOD",
    "RPEConfig",
    "RPEConfigs",
    "build_rpe",
    "backend_report",
    "get_absolute_positions",
    "get_bucket_ids_2d",
    "get_bucket_ids_2d_without_skip",
    "get_backend",
    "get_num_buckets",
    "get_rpe_config",
    "get_single_rpe_config",
    "iRPE",
    "iRPE_Cross",
    "piecewise_index",
    "quantize_values",
    "rpe_attention",
    "rpe_bucket_sum",
    "rpe_index",
    "resolve_attn_impl",
    "set_backend",
]


class METHOD(enum.IntEnum):
    """Mapping methods from a 2D relative position to a bucket (ids as in the original)."""

    EUCLIDEAN = 0
    QUANT = 1
    PRODUCT = 3
    CROSS = 4
    CROSS_ROWS = 41
    CROSS_COLS = 42


_METHOD_ALIASES: dict[str, METHOD] = {
    "euc": METHOD.EUCLIDEAN,
    "quant": METHOD.QUANT,
    "cross": METHOD.CROSS,
    "product": METHOD.PRODUCT,
}
_MODE_ALIASES: dict[str | None, str | None] = {
    None: None,
    "bias": "bias",
    "contextual": "contextual",
    "ctx": "contextual",
}

Mode = Literal["bias", "contextual"] | None


# ----------------------------------------------------------------------------------------------------------------
# Bucket ids: pure functions of the grid and the method's coefficients.
# ----------------------------------------------------------------------------------------------------------------


def _no_grad(fn):
    """``torch.no_grad()`` around ``fn``, except while torch.compile/export traces it: bucket ids take no gradient,
    and a grad-mode switch inside an exported program is a subgraph of its own that ``torch.export.load`` rejects."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@_no_grad
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
    """Number of buckets of a method, without the extra bucket of the skip tokens."""
    del alpha, gamma  # part of the original signature; the count depends on beta alone
    beta_int = int(beta)
    if method == METHOD.PRODUCT:
        return (2 * beta_int + 1) ** 2
    return 2 * beta_int + 1


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


@_no_grad
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


@_no_grad
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


# ----------------------------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------------------------


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
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
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
    if isinstance(method, str):
        key = method.lower()
        if key in _METHOD_ALIASES:
            return _METHOD_ALIASES[key]
        if key.upper() in METHOD.__members__:
            return METHOD[key.upper()]
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(_METHOD_ALIASES)} or a METHOD")
    try:
        return METHOD(method)
    except ValueError:
        raise ValueError(
            f"unknown method {method!r}; expected one of {sorted(_METHOD_ALIASES)} or a METHOD "
            f"({', '.join(f'{m.name}={m.value}' for m in METHOD)})"
        ) from None


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
    """Configuration of one encoding: ``alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio``.

    Args:
        ratio: scale of the piecewise index function; sets the number of buckets.
        method: a :class:`METHOD` or one of ``'euc'``, ``'quant'``, ``'cross'``, ``'product'``.
        mode: ``'bias'``, ``'contextual'`` (or ``'ctx'``) or ``None`` (no encoding).
        shared_head: share the table across heads.
        skip: number of leading tokens without a grid position; ``> 0`` adds one bucket.
    """
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


# ----------------------------------------------------------------------------------------------------------------
# The two lookup primitives and their backends.
# ----------------------------------------------------------------------------------------------------------------

_BACKENDS = ("auto", "torch", "ops")
_OPS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_backend: str = "auto"


def _validate_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown iRPE backend {name!r} (from IRPE_BACKEND or set_backend); expected one of {_BACKENDS}"
        )
    return name


def _load_rpe_ops():
    """Import the compiled extension; returns ``(module or None, reason it is unusable or None)``."""
    try:
        import rpe_ops  # noqa: PLC0415  (optional, next to this file or installed)
    except ImportError as err:
        return None, f"the rpe_ops package is not importable ({err})"
    if not getattr(rpe_ops, "is_available", lambda: False)():
        reason = getattr(rpe_ops, "load_error", lambda: None)() or "the rpe_ops extension is not built"
        return None, reason
    return rpe_ops, None


_rpe_ops, _rpe_ops_error = _load_rpe_ops()
_BUILD_HINT = "build it with `make ops` (or `cd rpe_ops && python setup.py build_ext --inplace`)"


def set_backend(name: str) -> str:
    """Choose the lookup backend: ``'auto'`` (the compiled ops where they support the tensor), ``'torch'`` or
    ``'ops'`` (the compiled ops or an error). Returns the previous choice. ``IRPE_BACKEND`` sets the default."""
    global _backend
    previous, _backend = _backend, _validate_backend(name)
    if name == "ops" and _rpe_ops is None:
        _backend = previous
        raise RuntimeError(
            f"IRPE_BACKEND=ops but the compiled rpe_ops are unavailable: {_rpe_ops_error}; {_BUILD_HINT}"
        )
    return previous


def get_backend() -> str:
    """The current backend choice (``'auto'``, ``'torch'`` or ``'ops'``)."""
    return _backend


def _ops_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the compiled ops can serve a tensor of this device and dtype, and why not."""
    if _rpe_ops is None:
        return False, _rpe_ops_error or "not built"
    if dtype not in _OPS_DTYPES:
        return False, f"dtype {dtype} is not supported by the compiled ops"
    if device.type == "cpu":
        return True, "compiled CPU kernels"
    if device.type == "cuda":
        if _rpe_ops.has_cuda_kernels():
            return True, "compiled CUDA kernels"
        return False, "rpe_ops was built without CUDA kernels (rebuild where nvcc is found, RPE_OPS_CUDA=1)"
    return False, f"no compiled kernels for device type {device.type!r}"


def _use_ops(tensor: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    supported, reason = _ops_support(tensor.device, tensor.dtype)
    if _backend == "ops" and not supported:
        raise RuntimeError(
            f"IRPE_BACKEND=ops cannot serve a {tensor.dtype} tensor on {tensor.device}: {reason}; {_BUILD_HINT}, "
            f"or set IRPE_BACKEND=auto to fall back to PyTorch"
        )
    return supported


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
    if _use_ops(table):
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
    if _use_ops(values):
        return torch.ops.rpe_ops.rpe_bucket_sum(values, index, num_buckets)
    B, H, Lq, Lk = values.shape
    # Half types accumulate in float32, as the compiled kernels do: a row sums up to Lk values per bucket.
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    out = values.new_zeros(B, H, Lq, num_buckets, dtype=acc)
    return out.scatter_add(3, index.long().expand(B, H, Lq, Lk), values.to(acc)).to(values.dtype)


def backend_report() -> str:
    """A human-readable account of which lookup backend serves CPU and CUDA tensors, and why."""
    lines = [f"iRPE lookup backend: {_backend} (set IRPE_BACKEND=auto|torch|ops to change)"]
    if _rpe_ops is None:
        lines.append(f"rpe_ops: not available: {_rpe_ops_error}; {_BUILD_HINT}")
    else:
        cuda_kernels = "with" if _rpe_ops.has_cuda_kernels() else "without"
        lines.append(f"rpe_ops: built {cuda_kernels} CUDA kernels ({os.path.dirname(_rpe_ops.__file__)})")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            note = " (no CUDA device visible here)"
        else:
            note = ""
        supported, reason = _ops_support(torch.device(device), torch.float32)
        if _backend == "torch":
            serving = "PyTorch (forced by IRPE_BACKEND=torch)"
        elif supported:
            serving = f"rpe_ops ({reason})"
        elif _backend == "ops":
            serving = f"error: IRPE_BACKEND=ops but {reason}"
        else:
            serving = f"PyTorch fallback ({reason})"
        lines.append(f"  {device:4s}: {serving}{note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------


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


def _per_row_table(weight: torch.Tensor, is_bias: bool, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The values every row looks its buckets up in, for ``x * scale`` (``(B, H, L, d)``).

    Contextual: ``x @ (W * scale)`` ``(B, H, L, nb)``, the scale applied to the small weight so that autograd keeps
    ``x`` rather than a scaled copy; bias: the ``(Hm, nb)`` row repeated, ``(1, Hm, L, nb)`` (a stride-0 view).
    """
    if is_bias:
        Hm, nb = weight.shape
        return weight.to(x.dtype).view(1, Hm, 1, nb).expand(1, Hm, x.size(2), nb)
    weight = weight.to(x.dtype)
    return torch.matmul(x, weight * scale if scale != 1.0 else weight)  # (B, H, L, d) @ (Hm, d, nb)


_CACHE_SIZE = 8  # distinct (grid, skip, device, dtype) keys kept per module: enough for multi-resolution eval


class iRPE(nn.Module):
    """One relative position encoding: on queries or keys (``transposed=True``) or on values.

    Shapes, with ``L = skip + height * width``:

    * keys (``transposed``): ``x = q * scale (B, H, L, d)`` -> ``(B, H, L, L)`` to add to the attention logits;
    * queries (``transposed``): ``x = k * scale (B, H, L, d)`` -> ``(B, H, L, L)``, to be transposed(2, 3) by the
      caller;
    * bias mode (``transposed``): ``x`` only gives the length -> ``(1, Hm, L, L)``;
    * values (not ``transposed``): ``x = attn (B, H, L, L)`` -> ``(B, H, L, d)`` to add to ``attn @ v``.

    Bucket ids are cached per module in a small LRU keyed by grid, skip, device and dtype; the cache is not part of
    the ``state_dict`` and is emptied when the module moves (``.to()``, ``.cuda()``...).
    """

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
        self._bucket_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        if mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        elif transposed:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, head_dim, num_buckets))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, num_buckets, head_dim))
        if initializer is not None:
            with torch.no_grad():
                initializer(self.lookup_table_bias if mode == "bias" else self.lookup_table_weight)

    def extra_repr(self) -> str:
        where = "q/k" if self.transposed else "v"
        return (
            f"method={self.method.name}, mode={self.mode}, on={where}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, num_buckets={self.num_buckets}, alpha={self.rpe_config.alpha:g}, "
            f"beta={self.rpe_config.beta:g}, gamma={self.rpe_config.gamma:g}"
        )

    def _apply(self, fn, recurse: bool = True):
        self._bucket_cache.clear()  # cached ids live on the old device: rebuild lazily on the new one
        return super()._apply(fn, recurse)

    def resolve_grid(self, length: int, height: int | None, width: int | None) -> tuple[int, int, int]:
        """The ``(height, width, skip)`` of a sequence of ``length`` tokens.

        With an explicit grid, ``length - height * width`` must equal the configured ``skip``; without one, the
        configured ``skip`` leading tokens are followed by a square grid. Anything else is an error rather than a
        silent guess.
        """
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
        """Cached bucket ids ``(skip + height * width, skip + height * width)`` (int64) on ``device``.

        While tracing (``torch.jit.trace``, ``torch.compile``, ``torch.export``) the ids are computed, not cached: they
        are part of the traced computation, the same in every trace, and never a traced tensor left in the cache.
        """
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        key = (height, width, skip, torch.device(device), torch.long)
        ids = None if tracing else self._bucket_cache.get(key)
        if ids is None:
            config = self.rpe_config
            ids, num_buckets = get_bucket_ids_2d(
                self.method, height, width, skip, config.alpha, config.beta, config.gamma, torch.long, device
            )
            if num_buckets != self.num_buckets:
                raise ValueError(
                    f"the grid gives {num_buckets} buckets but this module has {self.num_buckets}: skip={skip} "
                    f"does not match the configured skip={config.skip}"
                )
            if not tracing:
                self._bucket_cache[key] = ids
                if len(self._bucket_cache) > _CACHE_SIZE:
                    self._bucket_cache.popitem(last=False)
        return ids

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Encoding for ``x``; see the class docstring for shapes."""
        length = x.size(2)
        height, width, skip = self.resolve_grid(length, height, width)
        if not self.transposed and x.size(3) != length:
            raise ValueError(f"the values encoding takes attention (B, H, L, L), got {tuple(x.shape)}")
        index = self.get_bucket_ids(height, width, skip, x.device)  # (L, L)
        if self.transposed:
            return rpe_index(self.lookup_table(x), index)  # (B, H, L, L); bias: (1, Hm, L, L)
        # sum_j attn[i, j] * W[index[i, j]] = (bucket sums of attn) @ W: (B, H, L, nb) @ (Hm, nb, d) -> (B, H, L, d)
        return torch.matmul(rpe_bucket_sum(x, index, self.num_buckets), self.lookup_table_weight)

    def fused_terms(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None, *, is_query: bool = False
    ) -> list[FusedTerm]:
        """This encoding for the fused attention paths of :func:`rpe_attention`: its weight and bucket ids.

        Args:
            x: the queries (keys for an encoding on queries) ``(B, H, L, d)``; gives the length and device.
            height, width: the patch grid.
            is_query: whether this is the encoding on queries (looked up with the keys, transposed); False for the
                encoding on values, whose term is ``(Hm, nb, d)``.
        """
        if not self.transposed and is_query:
            raise ValueError("the values encoding is not one on queries: call fused_terms() with is_query=False")
        height, width, skip = self.resolve_grid(x.size(2), height, width)
        index = self.get_bucket_ids(height, width, skip, x.device)
        weight = self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight
        return [FusedTerm(weight, index, self.mode == "bias", is_query)]

    def lookup_table(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row bucket values ``(B, H, L, num_buckets)`` before the lookup (contextual: ``x @ W``)."""
        weight = self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight
        return _per_row_table(weight, self.mode == "bias", x)


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


# The default choice; an unusable IRPE_BACKEND=ops is reported by `python -m irpe` and raised at the first lookup.
try:
    _backend = _validate_backend(os.environ.get("IRPE_BACKEND", "auto").strip().lower() or "auto")
except ValueError as _err:
    if __name__ != "__main__":
        raise
    raise SystemExit(f"error: {_err}") from None  # `python -m irpe`: one line, exit code 1


# ----------------------------------------------------------------------------------------------------------------
# Attention with iRPE: the paper's formulation and fused, memory-efficient paths.
# ----------------------------------------------------------------------------------------------------------------

ATTN_IMPLS = ("auto", "math", "sdpa", "flex", "ops")


def _autocast_disabled(device_type: str):
    """Autocast off for ``device_type`` (the fused path manages its dtypes itself); a no-op where autocast does not
    exist (the meta device) or is off already (no autocast region, which torch.export.load would reject)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _term_table(term: FusedTerm, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row bucket values of a term of :func:`rpe_attention` (a query term is looked up with the keys)."""
    return _per_row_table(term.weight, term.is_bias, k if term.is_query else q, scale)


def _bias_rows(terms: Sequence[FusedTerm], tables: Sequence[torch.Tensor], i0: int, i1: int) -> torch.Tensor | None:
    """Rows ``i0:i1`` of the additive logit bias of all terms, ``(b|1, H|1, i1 - i0, Lk)``, from the terms' per-row
    tables (:func:`_term_table`); ``None`` without terms."""
    bias = None
    for term, table in zip(terms, tables):
        if term.is_query:  # looked up with the keys: (b, H, Lk, rows), transposed onto the logits
            part = rpe_index(table, term.index[:, i0:i1].contiguous()).transpose(2, 3)
        else:
            part = rpe_index(table[:, :, i0:i1], term.index[i0:i1])
        bias = part if bias is None else bias + part
    return bias


def _fused_bias(terms: Sequence[FusedTerm], q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The additive logit bias ``(b|1, H|1, L, L)`` of all terms for the batch slice ``q, k``."""
    return _bias_rows(terms, [_term_table(term, q, k, scale) for term in terms], 0, q.size(2))


# Work tensors of the sdpa path (a batch slice, or a block of its query rows, of the (B, H, L, L) logits) hold about
# this many bytes: this bounds the memory of the temporaries (and keeps them closer to the caches) while keeping the
# kernels large.
_FUSED_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are recomputed in float32 (softmax and its backward are sensitive to rounding)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_bytes(device: torch.device) -> int:
    return _FUSED_CHUNK_BYTES.get(device.type, 256 << 20)


def _batch_chunks(q: torch.Tensor) -> list[tuple[int, int]]:
    B, H, L, _ = q.shape
    if torch.compiler.is_compiling():
        return [(0, B)]  # one slice: a loop over a symbolic batch would fix it to the traced size
    per_sample = H * L * L * 4
    step = max(1, _chunk_bytes(q.device) // max(per_sample, 1))
    return [(start, min(start + step, B)) for start in range(0, B, step)]


def _row_blocks(q: torch.Tensor, batch: int, num_keys: int) -> list[tuple[int, int]]:
    """Blocks ``(i0, i1)`` of query rows whose ``(batch, H, i1 - i0, num_keys)`` work tensors fit the chunk size: all
    rows at once unless a single sample's logits exceed it (large L)."""
    H, L = q.size(1), q.size(2)
    rows = max(1, _chunk_bytes(q.device) // max(batch * H * num_keys * 4, 1))
    return [(start, min(start + rows, L)) for start in range(0, L, rows)]


def _table_backward(
    term: FusedTerm, grad_table: torch.Tensor, x: torch.Tensor, scale: float, grad_weight: torch.Tensor
) -> torch.Tensor | None:
    """Back through :func:`_term_table`: adds the weight's gradient to ``grad_weight`` and returns ``x``'s (``None``
    for a bias term, whose table does not depend on ``x``).

    Args:
        grad_table: gradient of the term's table, ``(b, H, L, nb)`` (or anything that sums to the bias' shape).
        x: the tensor the table was looked up with (``k`` for a query term, ``q`` otherwise), ``(b, H, L, d)``.
    """
    if term.is_bias:
        Hm, nb = term.weight.shape
        grad_weight += grad_table.sum_to_size(1, Hm, 1, nb).view(Hm, nb)
        return None
    dx = torch.matmul(grad_table, (term.weight * scale).transpose(-2, -1))  # (b, H, L, d)
    grad_w = torch.matmul(x.transpose(-2, -1), grad_table).mul_(scale)  # (b, H, d, nb)
    grad_weight += grad_w.sum(0).sum_to_size(term.weight.shape)
    return dx


def _values_term(value_terms: Sequence[FusedTerm], probs: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """``sum_u bucket_sum(P, index_u) @ W_u`` for rows ``i0:i1`` of the probabilities, ``probs (b, H, rows, Lk)``:
    what the encodings on values add to the attention's output, ``(b, H, rows, d)``."""
    out = None
    for term in value_terms:
        sums = rpe_bucket_sum(probs, term.index[i0:i1], term.weight.size(1))  # (b, H, rows, nb)
        part = torch.matmul(sums, term.weight)  # (Hm, nb, d) -> (b, H, rows, d)
        out = part if out is None else out.add_(part)
    return out


class _RPEBiasAttention(torch.autograd.Function):
    """Attention with the iRPE terms, fused and memory-efficient: ``P @ v + sum_u bucket_sum(P, index_u) @ W_u`` with
    ``P = softmax(q k^T * scale + bias)``, ``bias`` from the terms on queries and keys, ``W_u`` the encodings on values.

    The forward runs PyTorch's fused ``scaled_dot_product_attention`` with the bias as a constant mask, batch slice
    by batch slice, for ``P @ v``. With encodings on values it then recomputes ``P`` block by block of query rows
    (softmax of complete rows, so each block is exact on its own) and adds its bucket sums times ``W_u``. Nothing
    beyond ``q, k, v`` and the output is kept for backward: the backward recomputes the tables (``q @ W``, small),
    the bias and the probabilities block by block (as flash attention does), and gives the encodings' gradients
    through bucket sums of the logits' gradient (q/k terms) and of the probabilities (values terms). No
    ``(B, H, L, L)`` tensor lives from forward to backward, and the temporaries of either pass are bounded by the
    block size (``_FUSED_CHUNK_BYTES``; the forward's mask holds one batch slice).

    This is plain PyTorch: its numbers are tested on CPU tensors, and on CUDA it serves ``impl='auto'``.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, kinds: tuple[tuple[bool, bool], ...], num_values: int, *tensors):
        n = len(kinds)
        weights, indices = tensors[:n], tensors[n : 2 * n]
        value_weights, value_indices = tensors[2 * n : 2 * n + num_values], tensors[2 * n + num_values :]
        work = _work_dtype(q.dtype)
        terms = [FusedTerm(w.to(work), i, *kind) for w, i, kind in zip(weights, indices, kinds)]
        value_terms = [FusedTerm(w.to(work), i, False, False) for w, i in zip(value_weights, value_indices)]
        outs = []
        with _autocast_disabled(q.device.type), torch.no_grad():
            for b0, b1 in _batch_chunks(q):
                qc, kc = q[b0:b1], k[b0:b1]
                qw, kw = qc.to(work), kc.to(work)
                tables = [_term_table(term, qw, kw, scale) for term in terms]
                bias = _bias_rows(terms, tables, 0, q.size(2))
                mask = None if bias is None else bias.to(q.dtype)
                out = nn.functional.scaled_dot_product_attention(qc, kc, v[b0:b1], attn_mask=mask, scale=scale)
                if value_terms:
                    out = out.to(work)
                    for i0, i1 in _row_blocks(q, b1 - b0, k.size(2)):
                        logits = torch.matmul(qw[:, :, i0:i1], kw.transpose(-2, -1)).mul_(scale)  # (b, H, rows, L)
                        if bias is not None:
                            logits += bias[:, :, i0:i1]
                        out[:, :, i0:i1] += _values_term(value_terms, torch.softmax(logits, dim=-1), i0, i1)
                    out = out.to(q.dtype)
                outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        ctx.save_for_backward(q, k, v, out, *tensors)
        ctx.scale, ctx.kinds, ctx.num_values = scale, kinds, num_values
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, *saved = ctx.saved_tensors
        n, nv = len(ctx.kinds), ctx.num_values
        work = _work_dtype(q.dtype)
        terms = [FusedTerm(w.to(work), i, *kind) for w, i, kind in zip(saved[:n], saved[n : 2 * n], ctx.kinds)]
        value_terms = [
            FusedTerm(w.to(work), i, False, False) for w, i in zip(saved[2 * n : 2 * n + nv], saved[2 * n + nv :])
        ]
        scale = ctx.scale
        grads_qkv = []
        grad_weights = [torch.zeros_like(term.weight) for term in terms]
        grad_value_weights = [torch.zeros_like(term.weight) for term in value_terms]
        with _autocast_disabled(q.device.type):
            for b0, b1 in _batch_chunks(q):
                qc, kc, vc = (t[b0:b1].to(work) for t in (q, k, v))
                oc, gc = out[b0:b1].to(work), grad_out[b0:b1].to(work)
                tables = [_term_table(term, qc, kc, scale) for term in terms]  # (b|1, H|Hm, L, nb), small
                dq = torch.empty_like(qc)
                dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
                query_grad_tables: dict[int, torch.Tensor] = {}  # query terms: summed over the row blocks
                for i0, i1 in _row_blocks(q, b1 - b0, k.size(2)):
                    qb, gb = qc[:, :, i0:i1], gc[:, :, i0:i1]
                    logits = torch.matmul(qb, kc.transpose(-2, -1)).mul_(scale)  # (b, H, rows, L)
                    bias = _bias_rows(terms, tables, i0, i1)
                    probs = torch.softmax(logits if bias is None else logits.add_(bias), dim=-1)
                    del logits, bias
                    # rowsum(P * dP) = dO . O, O including the values terms (their dP is dO . W_u[bucket])
                    delta = (gb * oc[:, :, i0:i1]).sum(-1, keepdim=True)  # (b, H, rows, 1)
                    grad_probs = torch.matmul(gb, vc.transpose(-2, -1))  # (b, H, rows, L)
                    for term, grad_weight in zip(value_terms, grad_value_weights):
                        index = term.index[i0:i1]
                        grad_probs += rpe_index(torch.matmul(gb, term.weight.transpose(-2, -1)), index)
                        sums = rpe_bucket_sum(probs, index, term.weight.size(1))  # (b, H, rows, nb)
                        grad_weight += torch.matmul(sums.transpose(-2, -1), gb).sum(0).sum_to_size(grad_weight.shape)
                    grad_logits = grad_probs.sub_(delta).mul_(probs)  # (b, H, rows, L)
                    dv += torch.matmul(probs.transpose(-2, -1), gb)
                    del probs
                    dq[:, :, i0:i1] = torch.matmul(grad_logits, kc).mul_(scale)
                    dk += torch.matmul(grad_logits.transpose(-2, -1), qb).mul_(scale)
                    for t, (term, grad_weight) in enumerate(zip(terms, grad_weights)):
                        nb = term.weight.size(-1)
                        if term.is_query:  # the table's rows are the keys: its gradient sums over the row blocks
                            g = grad_logits.transpose(2, 3)
                            if term.is_bias:
                                g = g.sum_to_size(1, term.weight.size(0), *g.shape[2:])
                            grad_table = rpe_bucket_sum(g, term.index[:, i0:i1].contiguous(), nb)  # (b|1, H|Hm, L, nb)
                            if t in query_grad_tables:
                                query_grad_tables[t] += grad_table
                            else:
                                query_grad_tables[t] = grad_table
                            continue
                        g = grad_logits
                        if term.is_bias:  # the table is the bias row repeated over batch (and heads when shared)
                            g = g.sum_to_size(1, term.weight.size(0), *g.shape[2:])
                        grad_table = rpe_bucket_sum(g, term.index[i0:i1], nb)  # (b|1, H|Hm, rows, nb)
                        dx = _table_backward(term, grad_table, qb, scale, grad_weight)
                        if dx is not None:
                            dq[:, :, i0:i1] += dx
                for t, grad_table in query_grad_tables.items():
                    dx = _table_backward(terms[t], grad_table, kc, scale, grad_weights[t])
                    if dx is not None:
                        dk += dx
                grads_qkv.append((dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)))
        grad_q, grad_k, grad_v = grads_qkv[0] if len(grads_qkv) == 1 else (torch.cat(g) for g in zip(*grads_qkv))
        grad_weights = [g.to(w.dtype) for g, w in zip(grad_weights, saved[:n])]
        grad_value_weights = [g.to(w.dtype) for g, w in zip(grad_value_weights, saved[2 * n : 2 * n + nv])]
        no_grads = [None] * n, [None] * nv
        return grad_q, grad_k, grad_v, None, None, None, *grad_weights, *no_grads[0], *grad_value_weights, *no_grads[1]


def _flex_attention_fn(device: torch.device):
    """FlexAttention, compiled once per process on CUDA (it is only fast compiled); eager elsewhere."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - torch < 2.5
        raise ValueError(f"attn_impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5): {err}") from None
    if device.type != "cuda":
        return flex_attention
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


_compiled_flex = None


def _flex_rpe_attention(q, k, v, scale: float, terms: Sequence[FusedTerm]) -> torch.Tensor:
    """FlexAttention whose ``score_mod`` adds ``table[b, h, i, index[i, j]]``: no ``L x L`` bias ever exists."""
    tables = [_term_table(term, q, k, scale) for term in terms]  # (B|1, H|1, L, nb), differentiable

    def pick(table: torch.Tensor, b, h):
        return table[b if table.size(0) > 1 else 0, h if table.size(1) > 1 else 0]

    def score_mod(score, b, h, q_idx, kv_idx):
        for term, table in zip(terms, tables):
            if term.is_query:
                score = score + pick(table, b, h)[kv_idx, term.index[kv_idx, q_idx]]
            else:
                score = score + pick(table, b, h)[q_idx, term.index[q_idx, kv_idx]]
        return score

    return _flex_attention_fn(q.device)(q, k, v, score_mod=score_mod, scale=scale)


def _ops_attention_usable(device: torch.device | None) -> tuple[bool, str]:
    """Whether the fused CPU kernel of ``rpe_ops`` can run attention on ``device``, and why not."""
    if device is not None and device.type != "cpu":
        return False, f"it is a CPU kernel and the tensors are on {device}"
    if _rpe_ops is None:
        return False, f"the compiled rpe_ops are unavailable ({_rpe_ops_error}); {_BUILD_HINT}"
    if not _rpe_ops.has_attention_kernel():
        return False, f"the loaded rpe_ops predate the current attention kernel; rebuild them: {_BUILD_HINT}"
    return True, ""


def resolve_attn_impl(impl: str, has_rpe_v: bool, dropout_p: float, device: torch.device | None = None) -> str:
    """The path :func:`rpe_attention` takes: ``'math'``, ``'sdpa'``, ``'flex'`` or ``'ops'``.

    ``'auto'`` takes the fastest exact path: on CPU the fused ``rpe_ops`` kernel (``'ops'``) when it is built and the
    lookup backend is not forced to PyTorch (``IRPE_BACKEND=torch``), ``'sdpa'`` elsewhere (CUDA included). Both
    serve encodings on values too, without keeping the probabilities: ``'ops'`` sums each block of probabilities
    into the values' buckets inside the kernel, ``'sdpa'`` recomputes the probabilities block by block of query rows
    for them. FlexAttention cannot give those sums, so ``'flex'`` with an encoding on values runs ``'sdpa'``.
    Attention dropout needs its mask in backward: it runs the paper's explicit formulation (``'math'``) whatever was
    asked.

    Raises:
        ValueError: for an unknown ``impl``, or ``'ops'`` where the kernel cannot run (with the reason).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTN_IMPLS}")
    if impl == "math" or dropout_p > 0:
        return "math"
    if impl == "ops":
        usable, why = _ops_attention_usable(device)
        if not usable:
            raise ValueError(f"attn_impl='ops' cannot run: {why}; use attn_impl='auto' or 'sdpa'")
        return "ops"
    if impl == "auto":
        fused_cpu = device is not None and _backend != "torch" and _ops_attention_usable(device)[0]
        return "ops" if fused_cpu else "sdpa"
    if impl == "flex" and has_rpe_v:
        return "sdpa"
    return impl


def _ops_rpe_attention(
    q, k, v, scale: float, terms: Sequence[FusedTerm], value_terms: Sequence[FusedTerm] = ()
) -> torch.Tensor:
    """The fused CPU kernel of ``rpe_ops``: it takes the encodings' weights (values' included) and computes their
    tables itself, one ``(b, h)`` at a time, so nothing beyond ``q, k, v``, the output and the rows' ``(B, H, L)``
    log-sum-exps is kept for backward, and no ``(B, H, L, nb)`` table is allocated either. Half types run in float32
    (as PyTorch's CPU attention accumulates); autograd goes through the op's registered backward."""
    dtype = q.dtype
    work = _work_dtype(dtype)
    with _autocast_disabled(q.device.type):
        out, _ = _rpe_ops.rpe_attention(
            q.to(work),
            k.to(work),
            v.to(work),
            [term.weight.to(work) for term in terms],
            [term.index for term in terms],
            [term.is_query for term in terms],
            scale,
            [term.weight.to(work) for term in value_terms],
            [term.index for term in value_terms],
        )
    return out.to(dtype)


def rpe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpe_q: iRPE | iRPE_Cross | None = None,
    rpe_k: iRPE | iRPE_Cross | None = None,
    rpe_v: iRPE | iRPE_Cross | None = None,
    height: int | None = None,
    width: int | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with iRPE, in the order of the paper.

    ``attn = (q * scale) @ k^T + rpe_k(q * scale) + rpe_q(k * scale)^T``, softmax, dropout, ``out = attn @ v +
    rpe_v(attn)``. Every implementation computes the same function (up to float rounding); see
    :func:`resolve_attn_impl` for which one runs.

    Args:
        q, k, v: ``(B, H, L, head_dim)``, not scaled.
        rpe_q, rpe_k, rpe_v: the modules from :func:`build_rpe` (``None`` where unused).
        height, width: the patch grid; ``L - height * width`` leading tokens are the configured skip tokens.
        scale: logit scale, ``head_dim ** -0.5`` by default.
        dropout_p: attention dropout probability (pass 0 in eval mode).
        impl: ``'auto'``, ``'math'`` (explicit probabilities), ``'sdpa'`` (fused forward, recomputing backward;
            values terms from probabilities recomputed block by block), ``'flex'`` (FlexAttention with a
            ``score_mod``; compiled on CUDA; with an encoding on values it runs ``'sdpa'``) or ``'ops'`` (the fused
            CPU kernel of ``rpe_ops``, values terms included).

    Returns:
        ``(B, H, L, head_dim)``.
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    path = resolve_attn_impl(impl, rpe_v is not None, dropout_p, q.device)
    if path == "math":
        q = q * scale
        attn = torch.matmul(q, k.transpose(-2, -1))  # (B, H, L, L)
        if rpe_k is not None:
            attn = attn + rpe_k(q, height, width)
        if rpe_q is not None:
            attn = attn + rpe_q(k * scale, height, width).transpose(2, 3)
        attn = nn.functional.dropout(attn.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
        out = torch.matmul(attn, v)
        if rpe_v is not None:
            out = out + rpe_v(attn, height, width)
        return out
    if rpe_q is None and rpe_k is None and rpe_v is None:
        return nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    terms = rpe_k.fused_terms(q, height, width) if rpe_k is not None else []
    if rpe_q is not None:
        terms += rpe_q.fused_terms(k, height, width, is_query=True)
    value_terms = rpe_v.fused_terms(q, height, width) if rpe_v is not None else []
    if path == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                "attn_impl='flex': FlexAttention has no backward on CPU in PyTorch; train with attn_impl='sdpa' "
                "(or 'auto') on CPU, or run flex on CUDA"
            )
        return _flex_rpe_attention(q, k, v, scale, terms)
    if path == "ops":
        return _ops_rpe_attention(q, k, v, scale, terms, value_terms)
    kinds = tuple((term.is_bias, term.is_query) for term in terms)
    weights, indices = [term.weight for term in terms], [term.index for term in terms]
    value_weights, value_indices = [term.weight for term in value_terms], [term.index for term in value_terms]
    return _RPEBiasAttention.apply(
        q, k, v, scale, kinds, len(value_terms), *weights, *indices, *value_weights, *value_indices
    )


if __name__ == "__main__":
    print(backend_report())
    if _backend == "ops" and _rpe_ops is None:  # forced but unusable: a script checking the set-up must see it fail
        raise SystemExit(f"error: IRPE_BACKEND=ops but the compiled rpe_ops are unavailable; {_BUILD_HINT}")
