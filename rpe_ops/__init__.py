"""Compiled lookup operators of iRPE (Wu et al., "Rethinking and Improving Relative Position Encoding for Vision
Transformer", ICCV 2021).

Importing this package always succeeds. When the extension `rpe_ops/_C*.so` is built, importing it registers
`torch.ops.rpe_ops.rpe_index` and `torch.ops.rpe_ops.rpe_bucket_sum` (C++ schemas with CPU and, when built with
CUDA, CUDA kernels); this module then registers their fake kernels (for `torch.compile`) and their autograd, each
op's backward being the other op:

    rpe_index(input (B, H, Lq, nb), index (Lq, Lk))           -> (B, H, Lq, Lk),  out[b,h,i,j] = input[b,h,i,index[i,j]]
    rpe_bucket_sum(input (B, H, Lq, Lk), index (Lq, Lk), nb)  -> (B, H, Lq, nb),  out[b,h,i,k] = sum_{j: index[i,j]==k}
                                                                                                  input[b,h,i,j]

`serves(tensor)` says whether they run on a tensor (irpe.py's lookups call them where they do, and PyTorch code
otherwise); `with rpe_ops.disabled():` runs a block without any compiled code of this package, for comparisons and
debugging; `report()` (printed by `python -m irpe`) says which serves CPU and CUDA tensors, and why.

Build: `cd rpe_ops && python setup.py build_ext --inplace` (see rpe_ops/README.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "build_info",
    "cuda_capability_supported",
    "disabled",
    "has_attention_kernel",
    "has_cuda_kernels",
    "is_available",
    "is_disabled",
    "load_error",
    "register_attention_autograd",
    "report",
    "rpe_attention",
    "rpe_bucket_sum",
    "rpe_index",
    "serves",
]

BUILD_COMMAND = "cd rpe_ops && python setup.py build_ext --inplace  (or `make ops` from the repository root)"

_ext: Any = None
_attention_kernel = False
_load_error: str | None = None


def _load_extension() -> None:
    """Imports `rpe_ops._C` if it was built; records why not otherwise."""
    global _ext, _load_error
    if importlib.util.find_spec(f"{__name__}._C") is None:
        _load_error = f"the rpe_ops extension is not built; build it with: {BUILD_COMMAND}"
        return
    try:
        _ext = importlib.import_module(f"{__name__}._C")
    except (ImportError, OSError) as exc:
        _load_error = f"the rpe_ops extension failed to load ({exc}); rebuild it with: {BUILD_COMMAND}"
        return
    if not (hasattr(torch.ops.rpe_ops, "rpe_index") and hasattr(torch.ops.rpe_ops, "rpe_bucket_sum")):
        _ext = None
        _load_error = f"the rpe_ops extension loaded but did not register its ops; rebuild it with: {BUILD_COMMAND}"


def is_available() -> bool:
    """True when the compiled library is loaded and `torch.ops.rpe_ops.*` are registered."""
    return _ext is not None


def has_cuda_kernels() -> bool:
    """True when the loaded library holds CUDA kernels (it may without a visible GPU)."""
    return is_available() and bool(_ext.with_cuda)


def has_attention_kernel() -> bool:
    """True when the loaded library holds the fused CPU attention kernel (`rpe_ops::rpe_attention`) in its current
    form, which takes the encodings' weights, value terms included (a library built from an older schema, e.g. one
    that took per-row tables or had no value terms: rebuild it)."""
    return is_available() and _attention_kernel


# The argument names of the current schemas (rpe_attention_cpu.cpp); a library built from other sources is stale.
_ATTENTION_SCHEMA = (
    "q",
    "k",
    "v",
    "weights",
    "indices",
    "transposed",
    "value_weights",
    "value_indices",
    "scale",
    "attn_mask",
)
_ATTENTION_BACKWARD_SCHEMA = ("grad_out", "q", "k", "v", "lse", *_ATTENTION_SCHEMA[3:])


def _current_attention_schema() -> bool:
    schemas = {"rpe_attention": _ATTENTION_SCHEMA, "rpe_attention_backward": _ATTENTION_BACKWARD_SCHEMA}
    for name, expected in schemas.items():
        if not hasattr(torch.ops.rpe_ops, name):
            return False
        if tuple(a.name for a in getattr(torch.ops.rpe_ops, name).default._schema.arguments) != expected:
            return False
    return True


def load_error() -> str | None:
    """Why the compiled ops are unavailable (with the command that builds them), or None when they are loaded."""
    return _load_error


def build_info() -> dict[str, Any]:
    """How the loaded library was built: torch version it was compiled against, CUDA runtime and architectures."""
    if not is_available():
        return {"available": False, "error": _load_error}
    info: dict[str, Any] = {
        "available": True,
        "library": _ext.__file__,
        "torch_built": _ext.torch_version,
        "torch_runtime": torch.__version__,
        "cuda_kernels": bool(_ext.with_cuda),
        "cuda_runtime": None,
        "cuda_archs": [],
        # the variant of the CPU attention kernel's element-wise loops this process runs ("x86-64-v4", "x86-64-v3"
        # or "baseline"): the CPU's best, capped by ATEN_CPU_CAPABILITY like PyTorch's own kernels
        "cpu_isa": getattr(_ext, "cpu_isa", "baseline"),
        "cuda_ptx": None,  # the lowest architecture also compiled to PTX, e.g. "sm_90"
        "cuda_skipped": _CPU_ONLY_REASONS.get(getattr(_ext, "cpu_only_reason", 0)),  # why no CUDA kernels, or None
    }
    for item in filter(None, _ext.cuda_info.split(";")):
        key, _, value = item.partition("=")
        if key == "cuda_runtime":
            info["cuda_runtime"] = value
        elif key == "archs":
            info["cuda_archs"] = [f"sm_{int(a) // 10}" for a in value.split(",") if a.strip()]
        elif key == "ptx":
            info["cuda_ptx"] = f"sm_{value.strip()}"
    return info


# setup.py's reasons (its CPU_ONLY_REASONS) for leaving the CUDA kernels out, as compiled into the library.
_CPU_ONLY_REASONS = {
    1: "RPE_OPS_CUDA=0 was set at build time",
    2: "no CUDA toolkit (nvcc) was found at build time",
    3: "torch was a CPU-only build at build time",
    4: "the CUDA toolkit's major version differed from torch's at build time (set CUDA_HOME to a matching toolkit)",
}


def _arch_number(name: str) -> int:
    """ "sm_86" -> 86."""
    return int(name.removeprefix("sm_"))


def cuda_capability_supported(capability: tuple[int, int], info: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Whether the CUDA kernels of the loaded library can run on a GPU of compute capability ``capability`` (major,
    minor), and why (not).

    A kernel compiled for ``sm_XY`` runs on GPUs of the same major version and a minor version of at least ``Y``; PTX
    compiled for ``compute_XY`` is compiled by the driver for any GPU of capability ``X.Y`` or newer. A GPU outside
    both would fail at its first lookup with "no kernel image is available for execution on the device".

    Args:
        capability: ``torch.cuda.get_device_capability(device)``.
        info: :func:`build_info`'s dict (default: the loaded library's).
    """
    info = build_info() if info is None else info
    if not info.get("cuda_kernels"):
        return False, "rpe_ops was built without CUDA kernels"
    device = capability[0] * 10 + capability[1]
    archs = [_arch_number(a) for a in info.get("cuda_archs", [])]
    name = f"sm_{device}"
    if not archs:  # a toolkit that does not define __CUDA_ARCH_LIST__: the build's architectures are unknown
        return True, f"compiled CUDA kernels (built architectures unknown; {name} assumed)"
    if any(a // 10 == capability[0] and a % 10 <= capability[1] for a in archs):
        return True, f"compiled CUDA kernels ({name})"
    ptx = info.get("cuda_ptx")
    if ptx is not None and _arch_number(ptx) <= device:
        return True, f"compiled CUDA kernels ({name} through the {ptx} PTX)"
    built = ", ".join(info["cuda_archs"]) + (f" (PTX {ptx})" if ptx else "")
    return False, (
        f"rpe_ops' CUDA kernels were built for {built}, not for this GPU ({name}): rebuild them with "
        f'TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}" (`make ops`)'
    )


# True inside `with disabled():` (of this thread or task).
_DISABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("rpe_ops_disabled", default=False)
_SERVED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Runs a `with` block without any compiled code of this package: irpe's lookups and every attention path of
    irpe_attention take their PyTorch code (the backward of a fused attention run inside the block included). Blocks
    nest and are local to the thread or task that enters them."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def is_disabled() -> bool:
    """True inside a `with disabled():` block."""
    return _DISABLED.get()


def serves(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the compiled lookups run on a tensor of this device and dtype (on CUDA: the GPU's compute capability
    against the built architectures), and why (not). False inside `with disabled():`."""
    if _DISABLED.get():
        return False, "inside rpe_ops.disabled()"
    if _ext is None:
        return False, _load_error or "not built"
    if dtype not in _SERVED_DTYPES:
        return False, f"dtype {dtype} is not supported by the compiled ops"
    if device.type == "cpu":
        return True, "compiled CPU kernels"
    if device.type != "cuda":
        return False, f"no compiled kernels for device type {device.type!r}"
    if not has_cuda_kernels():
        return False, f"rpe_ops has no CUDA kernels: {build_info().get('cuda_skipped') or 'it was built without them'}"
    if not torch.cuda.is_available():
        return True, "compiled CUDA kernels"
    return _cuda_device_support(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_device_support(index: int) -> tuple[bool, str]:
    """:func:`cuda_capability_supported` for GPU `index`, once per device and process."""
    return cuda_capability_supported(torch.cuda.get_device_capability(index))


def report() -> str:
    """Which lookups serve CPU and CUDA tensors, and why: what `python -m irpe` prints."""
    lines = ["iRPE lookups: compiled rpe_ops where they serve the tensor, PyTorch otherwise"]
    if _ext is None:
        lines.append(f"rpe_ops: not available: {_load_error}")
    else:
        info = build_info()
        if info["cuda_kernels"]:
            archs = ", ".join(info["cuda_archs"]) or "architectures unknown"
            cuda = f"with CUDA kernels ({archs}{', PTX ' + info['cuda_ptx'] if info['cuda_ptx'] else ''})"
        else:
            cuda = f"without CUDA kernels ({info['cuda_skipped'] or 'not built'})"
        lines.append(f"rpe_ops: built {cuda}, at {os.path.dirname(_ext.__file__)}")
        lines.append(f"  CPU attention kernel: the {info['cpu_isa']} variant (ATEN_CPU_CAPABILITY caps it)")
    for device in ("cpu", "cuda"):
        supported, reason = serves(torch.device(device), torch.float32)
        serving = f"rpe_ops ({reason})" if supported else f"PyTorch fallback ({reason})"
        note = " (no CUDA device visible here)" if device == "cuda" and not torch.cuda.is_available() else ""
        lines.append(f"  {device:4s}: {serving}{note}")
    return "\n".join(lines)


def _require() -> None:
    if _ext is None:
        raise RuntimeError(f"rpe_ops: compiled operators unavailable: {_load_error}")


def rpe_index(input: Tensor, index: Tensor) -> Tensor:
    """Looks up `input[b, h, i, index[i, j]]`.

    Args:
        input: Table of shape (B, H, Lq, nb), float32/float64/float16/bfloat16, any strides.
        index: Bucket ids of shape (Lq, Lk), int64 or int32, values in [0, nb).

    Returns:
        Tensor of shape (B, H, Lq, Lk) with the dtype of `input`; differentiable w.r.t. `input`.
    """
    _require()
    return torch.ops.rpe_ops.rpe_index.default(input, index)


def rpe_bucket_sum(input: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    """Sums `input[b, h, i, j]` over the keys j that share the bucket `index[i, j]`.

    Args:
        input: Values of shape (B, H, Lq, Lk), float32/float64/float16/bfloat16 (half types accumulate in float32).
        index: Bucket ids of shape (Lq, Lk), int64 or int32, values in [0, num_buckets).
        num_buckets: Number of buckets nb (>= 0).

    Returns:
        Tensor of shape (B, H, Lq, nb) with the dtype of `input`; differentiable w.r.t. `input`.
    """
    _require()
    return torch.ops.rpe_ops.rpe_bucket_sum.default(input, index, num_buckets)


def rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weights: Sequence[Tensor],
    indices: Sequence[Tensor],
    transposed: Sequence[bool],
    scale: float,
    value_weights: Sequence[Tensor] = (),
    value_indices: Sequence[Tensor] = (),
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`P @ v + sum_u bucket_sum(P, value_indices[u]) @ value_weights[u]`, `P = softmax(scale * q @ k^T + bias +
    attn_mask)`, with the iRPE bias and the values terms computed inside one CPU kernel.

    Each logit term t has a per-row table: `scale * q[b,h] @ weights[t][h]` for a contextual weight `(Hw, d, nb)`,
    the row `weights[t][h]` for a bias weight `(Hw, nb)` (`Hw = 1`: shared by the heads). A term on keys adds
    `table[b,h,i,indices[t][i,j]]` to logit `(i, j)`; a transposed term (on queries) has its table from `k` and adds
    `table[b,h,j,indices[t][j,i]]`. A value term u adds `sum_j P[b,h,i,j] * value_weights[u][h, value_indices[u][i,j]]`
    to output row i (iRPE on values). Neither the tables nor any (B, H, Lq, Lk) tensor is ever allocated: the kernel
    computes one (b, h)'s tables in a small buffer and works on cache-sized blocks of its query rows, summing each
    block's probabilities into the value terms' buckets while it is in cache; the backward recomputes the blocks
    from the returned log-sum-exp and gives the weights' gradients directly.

    Args:
        q: Queries (B, H, Lq, d), float32 or float64 (cast half types first), CPU; any strides with a contiguous
            last dim are read in place.
        k: Keys (B, H, Lk, d); v: values (B, H, Lk, dv), same dtype.
        weights: One per logit term: `(Hw, d, nb_t)` (contextual) or `(Hw, nb_t)` (bias), `Hw` 1 or H, dtype of q.
        indices: Bucket ids (Lq, Lk) or, transposed, (Lk, Lq); int64 or int32, values in [0, nb_t).
        transposed: One flag per logit term.
        scale: Factor of `q @ k^T` and of the contextual tables.
        value_weights: One per value term: `(Hw, nb_u, dv)` (contextual; values have no bias mode), dtype of q.
        value_indices: Bucket ids (Lq, Lk) of each value term; int64 or int32, values in [0, nb_u).
        attn_mask: Optional additive mask added to the logits, dtype of q, `(B or 1, H or 1, Lq or 1, Lk)` (a key
            padding mask: `(B, 1, 1, Lk)`, 0 or -inf; nothing `Lq x Lk` is needed for it). A key at -inf gets
            probability exactly 0 and adds nothing to the value terms' bucket sums; a row whose keys are all at -inf
            gives a zero output row, lse -inf and zero gradients. A constant: it gets no gradient.

    Returns:
        `(out (B, H, Lq, dv), lse (B, H, Lq))`; `out` is differentiable w.r.t. `q, k, v` and all weights, `lse` (the
        rows' log-sum-exp, kept for backward) is not.
    """
    _require()
    flags = [int(bool(t)) for t in transposed]
    return torch.ops.rpe_ops.rpe_attention.default(
        q, k, v, list(weights), list(indices), flags, list(value_weights), list(value_indices), float(scale), attn_mask
    )


def _check_fake_args(op: str, input: Tensor, index: Tensor) -> None:
    torch._check(input.device == index.device, lambda: f"{op}: expected input and index on the same device")
    torch._check(input.dim() == 4, lambda: f"{op}: expected a 4-D input, got {input.dim()}-D")
    torch._check(index.dim() == 2, lambda: f"{op}: expected a 2-D index, got {index.dim()}-D")
    torch._check(input.shape[2] == index.shape[0], lambda: f"{op}: expected input.size(2) == index.size(0)")


def _rpe_index_fake(input: Tensor, index: Tensor) -> Tensor:
    _check_fake_args("rpe_ops::rpe_index", input, index)
    return input.new_empty((input.shape[0], input.shape[1], input.shape[2], index.shape[1]))


def _rpe_bucket_sum_fake(input: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    _check_fake_args("rpe_ops::rpe_bucket_sum", input, index)
    torch._check(
        input.shape[3] == index.shape[1], lambda: "rpe_ops::rpe_bucket_sum: expected input.size(3) == index.size(1)"
    )
    torch._check(num_buckets >= 0, lambda: f"rpe_ops::rpe_bucket_sum: expected num_buckets >= 0, got {num_buckets}")
    return input.new_empty((input.shape[0], input.shape[1], input.shape[2], num_buckets))


def _rpe_index_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, index = inputs
    ctx.save_for_backward(index)
    ctx.num_buckets = input.shape[3]


def _rpe_index_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
    (index,) = ctx.saved_tensors
    return torch.ops.rpe_ops.rpe_bucket_sum.default(grad, index, ctx.num_buckets), None


def _rpe_bucket_sum_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _rpe_bucket_sum_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
    (index,) = ctx.saved_tensors
    return torch.ops.rpe_ops.rpe_index.default(grad, index), None, None


def _rpe_attention_fake(q, k, v, weights, indices, transposed, value_weights, value_indices, scale, attn_mask=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "rpe_ops::rpe_attention: expected 4-D q, k, v")
    torch._check(
        len(weights) == len(indices) == len(transposed),
        lambda: "rpe_ops::rpe_attention: expected as many weights, indices and transposed flags",
    )
    torch._check(
        len(value_weights) == len(value_indices),
        lambda: "rpe_ops::rpe_attention: expected as many value weights as value indices",
    )
    # (B, Lq, H, dv) in memory, as the kernel (and PyTorch's fused attention) lays it out
    out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3])).permute(0, 2, 1, 3)
    return out, q.new_empty((q.shape[0], q.shape[1], q.shape[2]))


def _rpe_attention_backward_fake(
    grad_out, q, k, v, lse, weights, indices, transposed, value_weights, value_indices, scale, attn_mask=None
):
    # contiguous, as the kernel allocates them (empty_like would keep the strides of q, k, v views)
    return [t.new_empty(t.shape) for t in (q, k, v, *weights, *value_weights)]


def _rpe_attention_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, weights, indices, transposed, value_weights, value_indices, scale, attn_mask = inputs
    out, lse = output
    masks = () if attn_mask is None else (attn_mask,)
    ctx.save_for_backward(q, k, v, lse, *weights, *indices, *value_weights, *value_indices, *masks)
    ctx.transposed, ctx.num_values, ctx.scale = transposed, len(value_weights), scale
    ctx.mark_non_differentiable(lse)


def register_attention_autograd(namespace: str = "rpe_ops") -> None:
    """Registers the autograd of ``{namespace}::rpe_attention`` (its backward: ``{namespace}::rpe_attention_backward``).

    ``rpe_ops`` registers its own at import; ``tools/benchmark_kernel_ab.py`` calls this for another build of the
    library loaded under another namespace.
    """
    backward_op = getattr(torch.ops, namespace).rpe_attention_backward.default

    def backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Any, ...]:
        q, k, v, lse, *rest = ctx.saved_tensors
        n, nv = len(ctx.transposed), ctx.num_values
        weights, indices = rest[:n], rest[n : 2 * n]
        value_weights, value_indices = rest[2 * n : 2 * n + nv], rest[2 * n + nv : 2 * n + 2 * nv]
        masks = rest[2 * n + 2 * nv :]  # the attn_mask, if one was given
        dq, dk, dv, *dweights = backward_op(
            grad_out, q, k, v, lse, weights, indices, ctx.transposed, value_weights, value_indices, ctx.scale, *masks
        )
        # pytree reads a non-empty int list as one leaf but an empty list as a list: its "gradient" must match
        no_grad_flags = None if ctx.transposed else []
        return dq, dk, dv, dweights[:n], [None] * n, no_grad_flags, dweights[n:], [None] * nv, None, None

    torch.library.register_autograd(f"{namespace}::rpe_attention", backward, setup_context=_rpe_attention_setup_context)


def _register_python_parts() -> None:
    """Fake kernels and autograd for the C++ ops (rpe_index and rpe_bucket_sum are each other's backward)."""
    torch.library.register_fake("rpe_ops::rpe_index")(_rpe_index_fake)
    torch.library.register_fake("rpe_ops::rpe_bucket_sum")(_rpe_bucket_sum_fake)
    torch.library.register_autograd("rpe_ops::rpe_index", _rpe_index_backward, setup_context=_rpe_index_setup_context)
    torch.library.register_autograd(
        "rpe_ops::rpe_bucket_sum", _rpe_bucket_sum_backward, setup_context=_rpe_bucket_sum_setup_context
    )
    global _attention_kernel
    _attention_kernel = _current_attention_schema()  # read once: a plain bool keeps has_attention_kernel() traceable
    if _attention_kernel:
        torch.library.register_fake("rpe_ops::rpe_attention")(_rpe_attention_fake)
        torch.library.register_fake("rpe_ops::rpe_attention_backward")(_rpe_attention_backward_fake)
        register_attention_autograd("rpe_ops")


_load_extension()
if _ext is not None:
    try:
        _register_python_parts()
    except Exception as exc:  # e.g. a second copy of the package registered them first: keep the import working
        _ext = None
        _load_error = f"registering the fake kernels and autograd of rpe_ops failed ({exc}); {BUILD_COMMAND}"
