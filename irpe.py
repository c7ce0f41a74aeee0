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
an equivalent pure-PyTorch path otherwise. The backend is an argument (``backend='auto'|'torch'|'ops'``); ``None``
takes the innermost ``with use_backend(name):`` block's, else ``IRPE_BACKEND`` (``auto`` when unset).
``python -m irpe`` reports which backend serves CPU and CUDA. The memory-efficient attention paths that consume
these modules (``rpe_attention``) live in ``irpe_attention.py``, which needs only this file.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import math
import numbers
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

__all__ = [
    "ENV_BACKEND",
    "FusedTerm",
    "METHOD",
    "RPEConfig",
    "RPEConfigs",
    "backend_report",
    "BUILD_HINT",
    "build_rpe",
    "compiled_ops",
    "default_backend",
    "encode_values",
    "get_absolute_positions",
    "get_bucket_ids_2d",
    "get_bucket_ids_2d_without_skip",
    "get_num_buckets",
    "get_rpe_config",
    "get_single_rpe_config",
    "iRPE",
    "iRPE_Cross",
    "ops_support",
    "per_row_table",
    "piecewise_index",
    "quantize_values",
    "resolve_backend",
    "rpe_bucket_sum",
    "rpe_index",
    "use_backend",
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
BUILD_HINT = "build it with `make ops` (or `cd rpe_ops && python setup.py build_ext --inplace`)"


def _validate_backend(name: str, source: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"unknown iRPE backend {name!r} (from {source}); expected one of {_BACKENDS}")
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

# The process-wide default, read once: IRPE_BACKEND=auto|torch|ops (unset: auto). A bad value fails the import with
# the reason (``python -m irpe`` turns it into one error line).
try:
    ENV_BACKEND: str = _validate_backend(
        os.environ.get("IRPE_BACKEND", "auto").strip().lower() or "auto",
        f"IRPE_BACKEND={os.environ.get('IRPE_BACKEND')!r}",
    )
except ValueError as _err:
    if __name__ != "__main__":
        raise
    raise SystemExit(f"error: {_err}") from None  # `python -m irpe`: one line, exit code 1
# The backend of the innermost ``use_backend`` block of this thread or task; None outside any.
_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("irpe_backend", default=None)


def compiled_ops():
    """The compiled ``rpe_ops`` package, or ``None``, and why it is unusable (``None`` when it is usable)."""
    return _rpe_ops, _rpe_ops_error


def default_backend() -> str:
    """The backend a lookup with ``backend=None`` uses: the innermost :func:`use_backend` block's, else
    ``IRPE_BACKEND`` (``'auto'`` when unset)."""
    override = _backend_override.get()
    return ENV_BACKEND if override is None else override


def resolve_backend(backend: str | None) -> str:
    """``backend`` checked (``'auto'``, ``'torch'`` or ``'ops'``), or :func:`default_backend` for ``None``.

    Raises:
        ValueError: an unknown name.
        RuntimeError: ``'ops'`` while the compiled extension is unavailable (with the reason and the build command).
    """
    name = default_backend() if backend is None else _validate_backend(backend, "the backend argument")
    if name == "ops" and _rpe_ops is None:
        raise RuntimeError(
            f"IRPE_BACKEND=ops cannot serve: the compiled rpe_ops are unavailable ({_rpe_ops_error}); {BUILD_HINT}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the lookups (and the attention paths of ``irpe_attention``) of a ``with`` block on one backend.

    ``'torch'`` runs no compiled code at all, ``'ops'`` the compiled extension or an error, ``'auto'`` the extension
    where it supports the tensor. Blocks nest and are local to the thread or task that enters them.

    Raises:
        ValueError, RuntimeError: as :func:`resolve_backend`.
    """
    token = _backend_override.set(resolve_backend(name))
    try:
        yield name
    finally:
        _backend_override.reset(token)


def ops_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the compiled ops can serve a tensor of this device and dtype, and why (not)."""
    if _rpe_ops is None:
        return False, _rpe_ops_error or "not built"
    if dtype not in _OPS_DTYPES:
        return False, f"dtype {dtype} is not supported by the compiled ops"
    if device.type == "cpu":
        return True, "compiled CPU kernels"
    if device.type == "cuda":
        if not _rpe_ops.has_cuda_kernels():
            why = _rpe_ops.build_info().get("cuda_skipped") or "it was built without them"
            return False, f"rpe_ops has no CUDA kernels: {why}"
        if not torch.cuda.is_available():
            return True, "compiled CUDA kernels"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_device_support(index)
    return False, f"no compiled kernels for device type {device.type!r}"


@functools.cache
def _cuda_device_support(index: int) -> tuple[bool, str]:
    """Whether the built CUDA kernels run on GPU ``index`` (its compute capability against the built architectures
    and PTX), once per device and process."""
    return _rpe_ops.cuda_capability_supported(torch.cuda.get_device_capability(index))


def _use_ops(tensor: torch.Tensor, backend: str | None) -> bool:
    name = resolve_backend(backend)
    if name == "torch":
        return False
    supported, reason = ops_support(tensor.device, tensor.dtype)
    if name == "ops" and not supported:
        raise RuntimeError(
            f"IRPE_BACKEND=ops cannot serve a {tensor.dtype} tensor on {tensor.device}: {reason}; {BUILD_HINT}, "
            f"or use the 'auto' backend to fall back to PyTorch"
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


def rpe_index(table: torch.Tensor, index: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Gather per-row bucket values: ``out[b, h, i, j] = table[b, h, i, index[i, j]]``.

    Its backward is :func:`rpe_bucket_sum`.

    Args:
        table: ``(B, H, Lq, num_buckets)``; any strides (an expanded bias table is fine).
        index: ``(Lq, Lk)`` int64 or int32 bucket ids in ``[0, num_buckets)``.
        backend: ``'auto'``, ``'torch'`` or ``'ops'``; ``None``: :func:`default_backend`.

    Returns:
        ``(B, H, Lq, Lk)``, dtype of ``table``.
    """
    _check_lookup_shapes("rpe_index", table, index)
    if _use_ops(table, backend):
        return torch.ops.rpe_ops.rpe_index(table, index)
    B, H, Lq, _ = table.shape
    return torch.gather(table, 3, index.long().expand(B, H, Lq, index.size(1)))


def rpe_bucket_sum(
    values: torch.Tensor, index: torch.Tensor, num_buckets: int, backend: str | None = None
) -> torch.Tensor:
    """Sum each row's values per bucket: ``out[b, h, i, k] = sum_{j : index[i, j] = k} values[b, h, i, j]``.

    The adjoint of :func:`rpe_index` (and its backward). Contextual encodings on values use it to compute
    ``sum_j attn[i, j] * table[index[i, j]]`` as ``rpe_bucket_sum(attn) @ table``, without an ``(L, L, d)`` tensor.

    Args:
        values: ``(B, H, Lq, Lk)``.
        index: ``(Lq, Lk)`` int64 or int32 bucket ids in ``[0, num_buckets)``.
        num_buckets: size of the last output dimension.
        backend: as :func:`rpe_index`.

    Returns:
        ``(B, H, Lq, num_buckets)``, dtype of ``values``.
    """
    _check_lookup_shapes("rpe_bucket_sum", values, index)
    if values.size(3) != index.size(1):
        raise ValueError(f"rpe_bucket_sum: values have Lk={values.size(3)} columns but the index has {index.size(1)}")
    if _use_ops(values, backend):
        return torch.ops.rpe_ops.rpe_bucket_sum(values, index, num_buckets)
    B, H, Lq, Lk = values.shape
    # Half types accumulate in float32, as the compiled kernels do: a row sums up to Lk values per bucket.
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    out = values.new_zeros(B, H, Lq, num_buckets, dtype=acc)
    return out.scatter_add(3, index.long().expand(B, H, Lq, Lk), values.to(acc)).to(values.dtype)


def encode_values(
    probs: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """What a contextual encoding on values adds to ``probs @ v``: ``out[b,h,i] = sum_j probs[b,h,i,j] *
    weight[h, index[i, j]]``, computed as ``rpe_bucket_sum(probs) @ weight`` without an ``(L, L, d)`` tensor.

    Args:
        probs: attention probabilities ``(B, H, Lq, Lk)`` (or a block of their rows, with the index's rows).
        index: ``(Lq, Lk)`` bucket ids.
        weight: ``(Hm, nb, d)``, ``Hm`` = 1 (shared by the heads) or ``H``.
        backend: as :func:`rpe_index`.

    Returns:
        ``(B, H, Lq, d)``.
    """
    return torch.matmul(rpe_bucket_sum(probs, index, weight.size(1), backend), weight.to(probs.dtype))


def backend_report(backend: str | None = None) -> str:
    """A human-readable account of which lookup backend serves CPU and CUDA tensors, and why."""
    name = default_backend() if backend is None else _validate_backend(backend, "the backend argument")
    lines = [f"iRPE lookup backend: {name} (set IRPE_BACKEND=auto|torch|ops to change)"]
    if _rpe_ops is None:
        lines.append(f"rpe_ops: not available: {_rpe_ops_error}; {BUILD_HINT}")
    else:
        info = _rpe_ops.build_info()
        if info["cuda_kernels"]:
            archs = ", ".join(info["cuda_archs"]) or "architectures unknown"
            cuda = f"with CUDA kernels ({archs}{', PTX ' + info['cuda_ptx'] if info['cuda_ptx'] else ''})"
        else:
            cuda = f"without CUDA kernels ({info['cuda_skipped'] or 'not built'})"
        lines.append(f"rpe_ops: built {cuda}, at {os.path.dirname(_rpe_ops.__file__)}")
        lines.append(f"  CPU attention kernel: the {info['cpu_isa']} variant (ATEN_CPU_CAPABILITY caps it)")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            note = " (no CUDA device visible here)"
        else:
            note = ""
        supported, reason = ops_support(torch.device(device), torch.float32)
        if name == "torch":
            serving = "PyTorch (forced by IRPE_BACKEND=torch)"
        elif supported:
            serving = f"rpe_ops ({reason})"
        elif name == "ops":
            serving = f"error: IRPE_BACKEND=ops but {reason}"
        else:
            serving = f"PyTorch fallback ({reason})"
        lines.append(f"  {device:4s}: {serving}{note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------


def autocast_disabled(device_type: str):
    """Autocast off for ``device_type`` (the fused path manages its dtypes itself); a no-op where autocast does not
    exist (the meta device) or is off already (no autocast region, which torch.export.load would reject)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


_CACHE_SIZE = 8  # distinct (grid, skip, device, dtype) keys kept per module: enough for multi-resolution eval


@functools.lru_cache(maxsize=16)
def _shared_bucket_ids(
    method: int, height: int, width: int, skip: int, alpha: float, beta: float, gamma: float, device: torch.device
) -> tuple[torch.Tensor, int]:
    """``get_bucket_ids_2d`` (int64) memoised for the whole process: the encodings of every layer with one config
    (in the zoo's models those on queries, keys and values too) then hold one ids tensor, not one each, and the
    fused CPU kernel brings the ids of a call's terms to its int32 form once. The tensor is shared: never write to
    it. Built outside inference mode, so that a model trained after another was evaluated can save the ids for
    backward."""
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

    Bucket ids are cached per module in a small LRU keyed by grid, skip, device and dtype; the cache is not part of
    the ``state_dict`` and is emptied when the module moves (``.to()``, ``.cuda()``...). Modules with the same method
    and coefficients share the cached tensors.
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
        """Cached bucket ids ``(skip + height * width, skip + height * width)`` (int64) on ``device``, shared with the
        modules of the same method and coefficients (read-only).

        While tracing (``torch.jit.trace``, ``torch.compile``, ``torch.export``) the ids are computed, not cached: they
        are part of the traced computation, the same in every trace, and never a traced tensor left in the cache.
        """
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        key = (height, width, skip, torch.device(device), torch.long)
        ids = None if tracing else self._bucket_cache.get(key)
        if ids is None:
            config = self.rpe_config
            args = (self.method, height, width, skip, config.alpha, config.beta, config.gamma)
            if tracing:
                ids, num_buckets = get_bucket_ids_2d(*args, torch.long, device)
            else:
                ids, num_buckets = _shared_bucket_ids(*args, torch.device(device))
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

    def forward(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None, *, backend: str | None = None
    ) -> torch.Tensor:
        """Encoding for ``x``; see the class docstring for shapes. ``backend``: of the lookups (:func:`rpe_index`)."""
        length = x.size(2)
        height, width, skip = self.resolve_grid(length, height, width)
        if not self.transposed and x.size(3) != length:
            raise ValueError(f"the values encoding takes attention (B, H, L, L), got {tuple(x.shape)}")
        index = self.get_bucket_ids(height, width, skip, x.device)  # (L, L)
        if self.transposed:
            return rpe_index(self.lookup_table(x), index, backend)  # (B, H, L, L); bias: (1, Hm, L, L)
        return encode_values(x, index, self.lookup_table_weight, backend)

    def fused_terms(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None, *, is_query: bool = False
    ) -> list[FusedTerm]:
        """This encoding for the fused attention paths of ``irpe_attention.rpe_attention``: its weight and bucket ids.

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
        return per_row_table(weight, self.mode == "bias", x)


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

    def forward(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None, *, backend: str | None = None
    ) -> torch.Tensor:
        """Sum of the row and the column encodings; shapes as :class:`iRPE`."""
        rows = self.rp_rows(x, height=height, width=width, backend=backend)
        return rows + self.rp_cols(x, height=height, width=width, backend=backend)

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


if __name__ == "__main__":
    print(backend_report())
    if ENV_BACKEND == "ops" and _rpe_ops is None:  # forced but unusable: a script checking the set-up must see it fail
        raise SystemExit(f"error: IRPE_BACKEND=ops but the compiled rpe_ops are unavailable; {BUILD_HINT}")
