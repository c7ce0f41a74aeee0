"""Float tolerances derived from the numbers: the dtype and the length of the reductions behind a result.

A value computed in floating point differs from its exact (float64 reference) value by the rounding of the
reductions that produce it. Summing ``n`` terms of scale ``s`` with unit roundoff ``u = eps / 2`` errs by at most
``(n - 1) u sum|x_i|`` in any order, and by about ``u s sqrt(n)`` for the error's random walk when the additions'
order is fixed but arbitrary (BLAS kernels blocked differently on AVX2 and AVX-512, Intel and AMD, or the compiled
kernel's own order). The tolerances below take the random-walk size with a safety factor of ``SAFETY``:

    rtol = SAFETY * (eps(out) + eps(acc) * sqrt(n)),    atol = rtol * scale

where ``out`` is the result's dtype (one final rounding), ``acc`` the dtype the reduction accumulates in (float32
for half types) and ``scale`` the largest magnitude of the reference (so that elements near zero, whose relative
error is unbounded after cancellation, are judged against the tensor's size). A defect (a wrong bucket, a term
left out, a mask ignored) moves results by a large fraction of ``scale``: orders of magnitude above these bounds for
the reduction lengths the tests use (``n`` up to ~10^6 keeps float32's bound near 1e-3).
"""

from __future__ import annotations

import math

import torch

# Headroom over the random-walk estimate: covers the few chained reductions (a matmul, a softmax, a second matmul)
# behind one value and the polynomial exp of the CPU kernel (relative error ~2 eps).
SAFETY = 8.0

_HALF = (torch.float16, torch.bfloat16)


def reduction_tol(
    dtype: torch.dtype, n: int, *, scale: float = 1.0, accumulate: torch.dtype | None = None
) -> dict[str, float]:
    """``rtol`` and ``atol`` for a ``dtype`` result whose elements each reduce ``n`` terms, against a float64 reference
    (or another implementation of the same function) of largest magnitude ``scale``.

    Args:
        dtype: the compared result's dtype.
        n: the length of the longest reduction behind an element (e.g. the keys of a softmax row, or every term of a
            weight's gradient: ``B * H * L * L``).
        scale: the reference's largest magnitude (at least 1 is used where the values are O(1) by construction).
        accumulate: the accumulation dtype; default: float32 for half types, else ``dtype``.
    """
    acc = accumulate or (torch.float32 if dtype in _HALF else dtype)
    rtol = SAFETY * (torch.finfo(dtype).eps + torch.finfo(acc).eps * math.sqrt(max(n, 1)))
    return {"rtol": rtol, "atol": rtol * scale}


def assert_close_reduction(
    actual: torch.Tensor,
    expected: torch.Tensor,
    n: int,
    *,
    accumulate: torch.dtype | None = None,
    msg: str | None = None,
) -> None:
    """``torch.testing.assert_close`` with :func:`reduction_tol` for ``actual``'s dtype, ``n`` and the largest magnitude
    of ``expected`` (compared in ``expected``'s dtype, usually float64)."""
    scale = max(expected.detach().abs().max().item(), torch.finfo(torch.float64).tiny) if expected.numel() else 1.0
    tol = reduction_tol(actual.dtype, n, scale=scale, accumulate=accumulate)
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(), **tol, msg=msg)


def network_reduction_length(model: torch.nn.Module, *reductions: int) -> int:
    """``n`` for the outputs (or gradients) of a whole network: its longest single reduction times its layer count.

    Each layer adds its own rounding to the error it receives and, in a normalised network, passes that error on at
    about its size, so the layers' errors add up: the longest reduction times the number of layers covers them. (The
    product of the reduction lengths along the path would bound a worst case no real run approaches.)

    Args:
        model: the network; its layers are its ``nn.Linear`` and ``nn.Conv*`` modules (a ViT block has four: qkv,
            proj, fc1, fc2), each reducing over its input features (times the kernel size for a convolution).
        reductions: reductions behind the compared values that no layer shows: the keys of a softmax row, the ``B * L``
            tokens of a weight's gradient, the ``B * H * L * L`` logits of a lookup table's gradient.
    """
    lengths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    lengths += [m.in_channels // m.groups * math.prod(m.kernel_size) for m in convs]
    if not lengths:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv layer: count its reductions by hand")
    return max([*lengths, *reductions]) * len(lengths)
