"""Tests of the compiled iRPE lookup operators `rpe_ops` against the pure-PyTorch reference (gather / scatter_add).

Every test but the import test needs the built extension (`cd rpe_ops && python setup.py build_ext --inplace`) and
is skipped, with that reason, without it. CUDA cases are marked `cuda` (skipped without a GPU by conftest).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

import rpe_ops
from tolerances import assert_close_reduction

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_ops = pytest.mark.skipif(not rpe_ops.is_available(), reason=f"rpe_ops unavailable: {rpe_ops.load_error()}")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not rpe_ops.has_cuda_kernels(), reason="rpe_ops built without CUDA kernels"),
        ],
    ),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int64, torch.int32]


# ----------------------------------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the formulas of irpe's fallback)


def ref_rpe_index(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    B, H, Lq, _ = table.shape
    return torch.gather(table, 3, index.long().expand(B, H, Lq, index.shape[1]))


def ref_rpe_bucket_sum(values: torch.Tensor, index: torch.Tensor, num_buckets: int) -> torch.Tensor:
    B, H, Lq, Lk = values.shape
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    out = torch.zeros(B, H, Lq, num_buckets, dtype=acc, device=values.device)
    return out.scatter_add_(3, index.long().expand(B, H, Lq, Lk), values.to(acc))


def make_index(Lq: int, Lk: int, nb: int, device: str, dtype: torch.dtype = torch.int64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, nb, (Lq, Lk), generator=g).to(device=device, dtype=dtype)


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _terms(q: torch.Tensor, k: torch.Tensor) -> int:
    """The longest reduction of an attention case: a weight's gradient sums over every (b, h, i, j)."""
    return q.size(0) * q.size(1) * q.size(2) * k.size(2)


def assert_bucket_sum_close(out: torch.Tensor, values: torch.Tensor, index: torch.Tensor, nb: int) -> None:
    """``out`` against the bucket sums of ``values`` in float64: each sums up to ``Lk`` values (accumulated in float32
    for half types, rounded once; tests/tolerances.py)."""
    assert_close_reduction(out, ref_rpe_bucket_sum(values.double(), index, nb), index.size(1))


# ----------------------------------------------------------------------------------------------------------------------
# Package


def test_package_imports_and_reports_state() -> None:
    assert callable(rpe_ops.rpe_index) and callable(rpe_ops.rpe_bucket_sum)
    if rpe_ops.is_available():
        assert rpe_ops.load_error() is None
        info = rpe_ops.build_info()
        assert info["available"] and info["torch_built"] == torch.__version__.split("+")[0]
        assert info["cuda_kernels"] == rpe_ops.has_cuda_kernels()
    else:
        assert "build_ext --inplace" in rpe_ops.load_error()
        assert not rpe_ops.has_cuda_kernels()


def test_unbuilt_package_imports_and_explains(tmp_path: Path) -> None:
    """A copy of the package without the compiled library imports, reports why, and its wrappers raise."""
    pkg = tmp_path / "rpe_ops"
    pkg.mkdir()
    shutil.copy(REPO_ROOT / "rpe_ops" / "__init__.py", pkg / "__init__.py")
    script = textwrap.dedent(
        """
        import torch, rpe_ops
        assert not rpe_ops.is_available() and not rpe_ops.has_cuda_kernels()
        assert "not built" in rpe_ops.load_error() and "build_ext --inplace" in rpe_ops.load_error()
        assert rpe_ops.build_info()["available"] is False
        try:
            rpe_ops.rpe_index(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, dtype=torch.long))
        except RuntimeError as exc:
            assert "build_ext --inplace" in str(exc)
        else:
            raise AssertionError("expected a RuntimeError")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Agreement with the reference


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("nb", [5, 1500])
def test_rpe_index_matches_reference(device: str, dtype: torch.dtype, index_dtype: torch.dtype, nb: int) -> None:
    table = randn(2, 3, 7, nb, dtype=dtype, device=device)
    index = make_index(7, 9, nb, device, index_dtype)
    out = rpe_ops.rpe_index(table, index)
    assert out.dtype == dtype and out.shape == (2, 3, 7, 9) and out.is_contiguous()
    torch.testing.assert_close(out, ref_rpe_index(table, index), rtol=0, atol=0)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("nb", [5, 1500])
def test_rpe_bucket_sum_matches_reference(device: str, dtype: torch.dtype, index_dtype: torch.dtype, nb: int) -> None:
    values = randn(2, 3, 7, 9, dtype=dtype, device=device)
    index = make_index(7, 9, nb, device, index_dtype)
    out = rpe_ops.rpe_bucket_sum(values, index, nb)
    assert out.dtype == dtype and out.shape == (2, 3, 7, nb) and out.is_contiguous()
    assert_bucket_sum_close(out, values, index, nb)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deit_shape_matches_reference(device: str, dtype: torch.dtype) -> None:
    """Many rows (several threads / blocks), long rows with repeated buckets, as in DeiT-S."""
    B, H, L, nb = 3, 6, 197, 50
    index = make_index(L, L, nb, device)
    table = randn(B, H, L, nb, dtype=dtype, device=device)
    torch.testing.assert_close(rpe_ops.rpe_index(table, index), ref_rpe_index(table, index), rtol=0, atol=0)
    values = randn(B, H, L, L, dtype=dtype, device=device)
    assert_bucket_sum_close(rpe_ops.rpe_bucket_sum(values, index, nb), values, index, nb)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(device: str, dtype: torch.dtype) -> None:
    nb = 6
    index = make_index(5, 8, nb, device)
    table = randn(2, 3, 5, nb, dtype=dtype, device=device).requires_grad_()
    values = randn(2, 3, 5, 8, dtype=dtype, device=device, seed=2).requires_grad_()
    grad_y, grad_s = randn(2, 3, 5, 8, dtype=dtype, device=device, seed=3), randn(2, 3, 5, nb, device=device, seed=4)
    (g_table,) = torch.autograd.grad(rpe_ops.rpe_index(table, index), table, grad_y)
    (g_values,) = torch.autograd.grad(rpe_ops.rpe_bucket_sum(values, index, nb), values, grad_s.to(dtype))
    assert_bucket_sum_close(g_table, grad_y, index, nb)
    torch.testing.assert_close(g_values, ref_rpe_index(grad_s.to(dtype), index), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Strides and shapes


def _tables(B: int, H: int, Lq: int, nb: int, device: str) -> dict[str, torch.Tensor]:
    return {
        "transposed_bh": randn(H, B, Lq, nb, device=device).transpose(0, 1),
        "transposed_last": randn(B, H, nb, Lq, device=device).transpose(2, 3),
        "sliced_last_step2": randn(B, H, Lq, 2 * nb, device=device)[..., ::2],
        "sliced_rows": randn(B, H, Lq + 3, nb + 4, device=device)[:, :, 1 : Lq + 1, 2 : nb + 2],
        "expanded_batch": randn(1, H, Lq, nb, device=device).expand(B, H, Lq, nb),
        "expanded_all": randn(1, 1, 1, 1, device=device).expand(B, H, Lq, nb),
    }


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout",
    ["transposed_bh", "transposed_last", "sliced_last_step2", "sliced_rows", "expanded_batch", "expanded_all"],
)
def test_non_contiguous_inputs(device: str, layout: str) -> None:
    B, H, Lq, Lk, nb = 2, 3, 6, 6, 4
    # A transposed (non-contiguous) index too.
    index = make_index(Lk, Lq, nb, device).t()
    table = _tables(B, H, Lq, nb, device)[layout]
    torch.testing.assert_close(rpe_ops.rpe_index(table, index), ref_rpe_index(table, index), rtol=0, atol=0)
    values = _tables(B, H, Lq, Lk, device)[layout]
    assert_bucket_sum_close(rpe_ops.rpe_bucket_sum(values, index, nb), values, index, nb)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("B", "H", "Lq", "Lk", "nb"),
    [
        (0, 2, 3, 4, 5),
        (2, 0, 3, 4, 5),
        (2, 2, 0, 4, 5),
        (2, 2, 3, 0, 5),
        (2, 2, 3, 0, 0),
        (2, 2, 3, 4, 1),
        (1, 1, 1, 1, 1),
    ],
)
def test_empty_and_tiny_shapes(device: str, B: int, H: int, Lq: int, Lk: int, nb: int) -> None:
    index = make_index(Lq, Lk, max(nb, 1), device)
    table = randn(B, H, Lq, nb, device=device)
    out = rpe_ops.rpe_index(table, index)
    assert out.shape == (B, H, Lq, Lk)
    torch.testing.assert_close(out, ref_rpe_index(table, index), rtol=0, atol=0)
    values = randn(B, H, Lq, Lk, device=device)
    summed = rpe_ops.rpe_bucket_sum(values, index, nb)
    assert summed.shape == (B, H, Lq, nb)
    assert_bucket_sum_close(summed, values, index, nb)


# ----------------------------------------------------------------------------------------------------------------------
# Caller errors (every TORCH_CHECK)

_F, _L = torch.float32, torch.int64
ERROR_CASES = [
    # (name, input shape, input dtype, index shape, index dtype, num_buckets or None for rpe_index, message)
    ("int_input", (1, 2, 3, 4), torch.int32, (3, 5), _L, None, "expected input of dtype float32, float64, float16"),
    ("float_index", (1, 2, 3, 4), _F, (3, 5), _F, None, "expected index of dtype int64 or int32, got Float"),
    ("int16_index", (1, 2, 3, 4), _F, (3, 5), torch.int16, 4, "expected index of dtype int64 or int32"),
    ("3d_input", (2, 3, 4), _F, (3, 5), _L, None, r"expected a 4-D input \(B, H, L_query, ...\), got 3-D"),
    ("1d_index", (1, 2, 3, 4), _F, (3,), _L, None, r"expected a 2-D index \(L_query, L_key\), got 1-D"),
    ("lq_mismatch", (1, 2, 3, 4), _F, (4, 5), _L, None, r"expected input.size\(2\) == index.size\(0\)"),
    ("lq_mismatch_sum", (1, 2, 3, 5), _F, (4, 5), _L, 4, r"expected input.size\(2\) == index.size\(0\)"),
    ("lk_mismatch_sum", (1, 2, 3, 5), _F, (3, 6), _L, 4, r"expected input.size\(3\) == index.size\(1\)"),
    ("negative_buckets", (1, 2, 3, 5), _F, (3, 5), _L, -1, "expected num_buckets >= 0, got -1"),
]


@needs_ops
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(case: tuple) -> None:
    _, shape, dtype, index_shape, index_dtype, nb, message = case
    inp = torch.zeros(shape, dtype=dtype)
    index = torch.zeros(index_shape, dtype=index_dtype)
    with pytest.raises(RuntimeError, match=message):
        if nb is None:
            rpe_ops.rpe_index(inp, index)
        else:
            rpe_ops.rpe_bucket_sum(inp, index, nb)


@needs_ops
@pytest.mark.parametrize("bad_id", [-1, 4, 2**40])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_out_of_range_ids_raise(bad_id: int, index_dtype: torch.dtype) -> None:
    if index_dtype == torch.int32 and bad_id > 2**31:
        pytest.skip("does not fit in int32")
    index = torch.zeros(3, 5, dtype=torch.int64)
    index[1, 2] = bad_id
    index = index.to(index_dtype)
    msg = rf"bucket ids must lie in \[0, 4\), got ids from {min(bad_id, 0)} to {max(bad_id, 0)}"
    with pytest.raises(RuntimeError, match=msg):
        rpe_ops.rpe_index(torch.zeros(1, 2, 3, 4), index)
    with pytest.raises(RuntimeError, match=msg):
        rpe_ops.rpe_bucket_sum(torch.zeros(1, 2, 3, 5), index, 4)


@needs_ops
def test_wrong_device_raises() -> None:
    """CPU input with an index elsewhere (the meta device stands in for a GPU on CPU-only machines)."""
    with pytest.raises(RuntimeError, match="expected input and index on the same device"):
        rpe_ops.rpe_index(torch.zeros(1, 2, 3, 4), torch.zeros(3, 5, dtype=torch.int64, device="meta"))
    with pytest.raises(RuntimeError, match="expected input and index on the same device"):
        rpe_ops.rpe_bucket_sum(torch.zeros(1, 2, 3, 5), torch.zeros(3, 5, dtype=torch.int64, device="meta"), 4)


@needs_ops
@pytest.mark.cuda
def test_wrong_device_raises_cuda() -> None:
    table, index = torch.zeros(1, 2, 3, 4, device="cuda"), torch.zeros(3, 5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"expected input and index on the same device, got input on cuda:0"):
        rpe_ops.rpe_index(table, index)
    with pytest.raises(RuntimeError, match=r"expected input and index on the same device, got input on cpu"):
        rpe_ops.rpe_bucket_sum(torch.zeros(1, 2, 3, 5), index.cuda(), 4)


@needs_ops
@pytest.mark.cuda
@pytest.mark.parametrize("op", ["rpe_index", "rpe_bucket_sum"])
def test_out_of_range_ids_raise_cuda(op: str) -> None:
    """On CUDA the ids are checked on the device: a device-side assert, run in a child process (it ends the context)."""
    script = textwrap.dedent(
        f"""
        import torch, rpe_ops
        index = torch.zeros(3, 5, dtype=torch.int64, device="cuda")
        index[1, 2] = 4
        if "{op}" == "rpe_index":
            out = rpe_ops.rpe_index(torch.zeros(1, 2, 3, 4, device="cuda"), index)
        else:
            out = rpe_ops.rpe_bucket_sum(torch.zeros(1, 2, 3, 5, device="cuda"), index, 4)
        try:
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("RAISED", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert "RAISED" in proc.stdout and "device-side assert" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# torch.library / autograd / compile


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    index = make_index(5, 7, 4, device)
    for requires_grad in (False, True):
        table = randn(2, 3, 5, 4, device=device).requires_grad_(requires_grad)
        values = randn(2, 3, 5, 7, device=device).requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.rpe_ops.rpe_index.default, (table, index))
        torch.library.opcheck(torch.ops.rpe_ops.rpe_bucket_sum.default, (values, index, 4))


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device: str) -> None:
    nb = 4
    index = make_index(5, 6, nb, device)
    table = randn(2, 2, 5, nb, dtype=torch.float64, device=device).requires_grad_()
    values = randn(2, 2, 5, 6, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: rpe_ops.rpe_index(t, index), (table,))
    assert torch.autograd.gradgradcheck(lambda t: rpe_ops.rpe_index(t, index), (table,))
    assert torch.autograd.gradcheck(lambda v: rpe_ops.rpe_bucket_sum(v, index, nb), (values,))
    assert torch.autograd.gradgradcheck(lambda v: rpe_ops.rpe_bucket_sum(v, index, nb), (values,))


class TinyRPEAttention(nn.Module):
    """Contextual RPE on keys (rpe_index) and on values (rpe_bucket_sum), as irpe uses them."""

    def __init__(self, index: torch.Tensor, num_buckets: int, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.register_buffer("index", index, persistent=False)
        self.w_k = nn.Parameter(torch.randn(heads, dim, num_buckets) * 0.1)
        self.w_v = nn.Parameter(torch.randn(heads, num_buckets, dim) * 0.1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = q @ k.transpose(-2, -1) + rpe_ops.rpe_index(q @ self.w_k, self.index)
        attn = attn.softmax(dim=-1)
        return attn @ v + rpe_ops.rpe_bucket_sum(attn, self.index, self.num_buckets) @ self.w_v


def _compile_check(backend: str) -> None:
    torch.manual_seed(0)
    L, nb = 10, 6
    module = TinyRPEAttention(make_index(L, L, nb, "cpu"), nb)
    q, k, v = (torch.randn(3, 2, L, 8, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    out_eager, out_compiled = module(q, k, v), compiled(q, k, v)
    # the same float32 function in another order of operations (inductor fuses the softmax): rows of L keys, weight
    # gradients of 3 * 2 * L * L terms (tests/tolerances.py)
    assert_close_reduction(out_compiled, out_eager.double(), L)
    params = (q, k, v, module.w_k, module.w_v)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), params)
    grads_compiled = torch.autograd.grad(out_compiled.square().sum(), params)
    for a, b in zip(grads_compiled, grads_eager):
        assert_close_reduction(a, b.double(), 3 * 2 * L * L)


@needs_ops
def test_torch_compile_fullgraph() -> None:
    _compile_check("aot_eager")


@needs_ops
@pytest.mark.slow
def test_torch_compile_fullgraph_inductor() -> None:
    _compile_check("inductor")


# ----------------------------------------------------------------------------------------------------------------------
# rpe_attention: the fused CPU attention kernel


def _reference_attention(q, k, v, weights, indices, transposed, scale, value_weights=(), value_indices=()):
    """softmax(scale q k^T + bias) @ v (+ the value terms' bucket sums of the probabilities @ their weights) with the
    tables, the bias and the bucket sums built explicitly (the op's definition)."""
    B, H = q.shape[:2]
    logits = scale * q @ k.transpose(-2, -1)
    for weight, index, tr in zip(weights, indices, transposed):
        x = k if tr else q
        if weight.dim() == 3:  # contextual (Hw, d, nb): scale * x @ W per head
            table = scale * x @ weight
        else:  # bias (Hw, nb): the head's row on every row
            table = weight[None, :, None, :].expand(B, H, x.size(2), weight.size(-1))
        rows, cols = index.shape
        gathered = table.gather(3, index.reshape(1, 1, rows, cols).expand(B, H, rows, cols))
        logits = logits + (gathered.transpose(2, 3) if tr else gathered)
    probs = logits.softmax(-1)
    out = probs @ v
    for weight, index in zip(value_weights, value_indices):  # (Hw, nb, dv), (Lq, Lk)
        sums = ref_rpe_bucket_sum(probs, index, weight.size(1))  # (B, H, Lq, nb)
        out = out + sums @ weight
    return out, logits.logsumexp(-1)


def _attention_case(Lq: int = 7, Lk: int = 9, nb: int = 5, dtype=torch.float64, requires_grad: bool = False):
    """Queries and keys of different lengths and every kind of term: contextual and bias, on keys and transposed,
    per head and shared by the heads."""
    B, H, d, dv = 2, 3, 4, 6
    q = randn(B, H, Lq, d, dtype=dtype, seed=1)
    k, v = randn(B, H, Lk, d, dtype=dtype, seed=2), randn(B, H, Lk, dv, dtype=dtype, seed=3)
    weights = [
        randn(H, d, nb, dtype=dtype, seed=4),  # contextual, on keys, per head
        randn(1, d, nb + 2, dtype=dtype, seed=5),  # contextual, transposed, shared
        randn(1, nb, dtype=dtype, seed=6),  # bias, on keys, shared
        randn(H, nb + 1, dtype=dtype, seed=7),  # bias, transposed, per head
    ]
    indices = [
        make_index(Lq, Lk, nb, "cpu"),
        make_index(Lk, Lq, nb + 2, "cpu"),
        make_index(Lq, Lk, nb, "cpu"),
        make_index(Lk, Lq, nb + 1, "cpu"),
    ]
    if requires_grad:
        q, k, v, *weights = (t.requires_grad_() for t in (q, k, v, *weights))
    return q, k, v, weights, indices, [False, True, False, True], 0.7


def _value_terms(v: torch.Tensor, Lq: int, nb: int = 5, requires_grad: bool = False):
    """Two terms on values: a per-head weight (H, nb, dv) and one shared by the heads (1, nb + 3, dv), with bucket ids
    (Lq, Lk)."""
    H, Lk, dv = v.size(1), v.size(2), v.size(3)
    weights = [randn(H, nb, dv, dtype=v.dtype, seed=11), randn(1, nb + 3, dv, dtype=v.dtype, seed=12)]
    indices = [make_index(Lq, Lk, nb, "cpu", seed=13), make_index(Lq, Lk, nb + 3, "cpu", seed=14)]
    if requires_grad:
        weights = [w.requires_grad_() for w in weights]
    return weights, indices


@needs_ops
@pytest.mark.parametrize("with_values", [False, True], ids=["qk-terms", "qk-and-value-terms"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# (Lq, Lk, nb): nb >= 8 gives float32 terms on keys their windows (and passes of their own); 300 x 300 takes two
# blocks of queries, and both larger shapes end in a partial chunk of 8 keys.
@pytest.mark.parametrize("shape", [(7, 9, 5), (37, 300, 12), (300, 300, 12)], ids=lambda s: "x".join(map(str, s)))
def test_rpe_attention_matches_its_definition(dtype, with_values, shape) -> None:
    Lq, Lk, nb = shape
    q, k, v, weights, indices, transposed, scale = _attention_case(Lq, Lk, nb, dtype=dtype, requires_grad=True)
    value_weights, value_indices = _value_terms(v, q.size(2), requires_grad=True) if with_values else ([], [])
    out, lse = rpe_ops.rpe_attention(q, k, v, weights, indices, transposed, scale, value_weights, value_indices)
    # The definition in float64 (for float32 inputs too, through casts: its gradients reach the float32 leaves
    # rounded once), so that a float32 tolerance bounds the kernel's own rounding.
    wide = [t.double() for t in (q, k, v, *weights, *value_weights)]
    nw = len(weights)
    ref, ref_lse = _reference_attention(
        *wide[:3], wide[3 : 3 + nw], indices, transposed, scale, wide[3 + nw :], value_indices
    )
    # rows reduce over the Lk keys; the weights' gradients over every (b, h, i, j) (tests/tolerances.py)
    B, H = q.shape[:2]
    assert_close_reduction(out, ref, Lk)
    assert_close_reduction(lse, ref_lse, Lk)
    leaves = [q, k, v, *weights, *value_weights]
    grad = randn(*out.shape, dtype=dtype)
    for t, (g, r) in enumerate(
        zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad.double()))
    ):
        assert_close_reduction(g, r, Lk if t < 3 else B * H * Lq * Lk)


@needs_ops
def test_rpe_attention_reads_strided_inputs_in_place() -> None:
    # q, k, v as the models make them (views of one (B, L, 3, H, d) tensor): the kernel's raw-pointer products must
    # follow the strides.
    B, H, L, d, nb = 2, 3, 11, 4, 5
    qkv = randn(B, L, 3, H, d, dtype=torch.float64, seed=8).permute(2, 0, 3, 1, 4)
    q, k, v = (t.requires_grad_() for t in qkv.unbind(0))
    weights = [randn(*shape, dtype=torch.float64, seed=9).requires_grad_() for shape in ((H, d, nb), (1, nb))]
    indices = [make_index(L, L, nb, "cpu"), make_index(L, L, nb, "cpu")]
    vw, vi = [randn(1, nb, d, dtype=torch.float64, seed=10).requires_grad_()], [make_index(L, L, nb, "cpu", seed=3)]
    out, lse = rpe_ops.rpe_attention(q, k, v, weights, indices, [False, True], 0.5, vw, vi)
    ref, _ = _reference_attention(q, k, v, weights, indices, [False, True], 0.5, vw, vi)
    assert_close_reduction(out, ref.double(), _terms(q, k))
    leaves = [q, k, v, *weights, *vw]
    for g, r in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        assert_close_reduction(g, r.double(), _terms(q, k))
    # The fake kernels must give the real ones' layouts for such views too: inductor compiles against them.
    torch.library.opcheck(torch.ops.rpe_ops.rpe_attention.default, (q, k, v, weights, indices, [0, 1], vw, vi, 0.5))
    q, k, v, *weights = (t.detach() for t in (q, k, v, *weights))
    vw = [w.detach() for w in vw]
    args = (out.detach().contiguous(), q, k, v, lse, weights, indices, [0, 1], vw, vi, 0.5)
    for op, op_args in (
        (torch.ops.rpe_ops.rpe_attention.default, (q, k, v, weights, indices, [0, 1], vw, vi, 0.5)),
        (torch.ops.rpe_ops.rpe_attention_backward.default, args),
    ):
        real = op(*op_args)
        with FakeTensorMode() as mode:
            fake = op(*pytree.tree_map_only(torch.Tensor, mode.from_tensor, op_args))
        assert [t.stride() for t in fake] == [t.stride() for t in real], op


@needs_ops
@pytest.mark.parametrize("with_values", [False, True], ids=["qk-terms", "qk-and-value-terms"])
def test_rpe_attention_gradcheck_and_opcheck(with_values) -> None:
    q, k, v, weights, indices, transposed, scale = _attention_case(Lq=4, Lk=5, nb=3, requires_grad=True)
    value_weights, value_indices = _value_terms(v, 4, nb=2, requires_grad=True) if with_values else ([], [])
    n = len(weights)

    def fn(q, k, v, *all_weights):
        weights, value_weights = all_weights[:n], all_weights[n:]
        return rpe_ops.rpe_attention(q, k, v, weights, indices, transposed, scale, value_weights, value_indices)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, *weights, *value_weights))
    flags = [int(t) for t in transposed]
    args = (q, k, v, weights, indices, flags, value_weights, value_indices, scale)
    torch.library.opcheck(torch.ops.rpe_ops.rpe_attention.default, args)


@needs_ops
def test_rpe_attention_with_value_terms_only() -> None:
    # rpe_on='v': no logit term, only bucket sums of the probabilities; opcheck covers the fake kernel's arity.
    q, k, v = (randn(2, 3, L, 4, dtype=torch.float64, seed=s).requires_grad_() for L, s in ((6, 1), (6, 2), (6, 3)))
    value_weights, value_indices = _value_terms(v, 6, requires_grad=True)
    out, _ = rpe_ops.rpe_attention(q, k, v, [], [], [], 0.5, value_weights, value_indices)
    ref, _ = _reference_attention(q, k, v, [], [], [], 0.5, value_weights, value_indices)
    assert_close_reduction(out, ref.double(), _terms(q, k))
    leaves = (q, k, v, *value_weights)
    for g, r in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        assert_close_reduction(g, r.double(), _terms(q, k))
    torch.library.opcheck(
        torch.ops.rpe_ops.rpe_attention.default, (q, k, v, [], [], [], value_weights, value_indices, 0.5)
    )


@needs_ops
def test_stale_attention_schema_is_not_used(monkeypatch) -> None:
    # A library built before the value terms existed has another schema: has_attention_kernel() must then be False
    # (irpe reports "rebuild"), never call the op with the wrong arguments.
    assert rpe_ops._current_attention_schema()
    monkeypatch.setattr(rpe_ops, "_ATTENTION_SCHEMA", ("q", "k", "v", "weights", "indices", "transposed", "scale"))
    assert not rpe_ops._current_attention_schema()
    import irpe_attention  # noqa: PLC0415

    monkeypatch.setattr(rpe_ops, "_attention_kernel", False)
    usable, why = irpe_attention._compiled_usable("ops", torch.device("cpu"))
    assert not usable and "rebuild" in why


@needs_ops
def test_rpe_attention_empty_and_termless() -> None:
    q, k, v = (randn(*shape).requires_grad_() for shape in ((2, 1, 3, 4), (2, 1, 5, 4), (2, 1, 5, 2)))
    out, _ = rpe_ops.rpe_attention(q, k, v, [], [], [], 0.5)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert_close_reduction(out, ref.double(), _terms(q, k))
    for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert_close_reduction(g, r.double(), _terms(q, k))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = rpe_ops.rpe_attention(q[:0], k[:0], v[:0], [], [], [], 0.5)
    assert out.shape == (0, 1, 3, 2) and lse.shape == (0, 1, 3)


@needs_ops
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(q=a["q"].half()), "expected q, k, v of one dtype"),
        (lambda a: a.update(q=a["q"].half(), k=a["k"].half(), v=a["v"].half()), "expected float32 or float64"),
        (lambda a: a.update(k=a["k"][:, :, :, :3]), r"expected q \(B, H, Lq, d\) and k \(B, H, Lk, d\)"),
        (lambda a: a.update(v=a["v"][:, :, :4]), r"expected v \(B, H, Lk, dv\)"),
        (lambda a: a.update(transposed=[0]), "expected as many weights, indices and transposed flags"),
        (
            lambda a: a["weights"].__setitem__(0, a["weights"][0][:2]),
            r"term 0: expected a weight of shape \(Hw, nb\) \(bias\) or \(Hw, 4, nb\) \(contextual\) with Hw = 1 or 3",
        ),
        (lambda a: a["weights"].__setitem__(1, a["weights"][1][:, :3]), r"term 1: expected a weight of shape"),
        (lambda a: a["weights"].__setitem__(2, a["weights"][2][0]), r"term 2: expected a weight of shape"),
        (lambda a: a["weights"].__setitem__(3, a["weights"][3].float()), "term 3: expected a Double weight"),
        (lambda a: a["indices"].__setitem__(1, a["indices"][1].t()), r"term 1: expected bucket ids of shape \(9, 7\)"),
        (lambda a: a["indices"].__setitem__(0, a["indices"][0] + 5), r"bucket ids must lie in \[0, 5\)"),
        (lambda a: a["indices"].__setitem__(0, a["indices"][0].float()), "expected int64 or int32 bucket ids"),
        (lambda a: a.update(value_indices=a["value_indices"][:1]), "expected as many value weights as value indices"),
        (
            lambda a: a["value_weights"].__setitem__(0, a["value_weights"][0][:, :, :4]),
            r"value term 0: expected a weight of shape \(Hw, nb, 6\) with Hw = 1 or 3",
        ),
        (lambda a: a["value_weights"].__setitem__(1, a["value_weights"][1][0]), r"value term 1: expected a weight"),
        (lambda a: a["value_weights"].__setitem__(0, a["value_weights"][0][:2]), r"value term 0: expected a weight"),
        (lambda a: a["value_weights"].__setitem__(1, a["value_weights"][1].float()), "value term 1: expected a Double"),
        (
            lambda a: a["value_indices"].__setitem__(0, a["value_indices"][0].t()),
            r"value term 0: expected bucket ids of shape \(7, 9\)",
        ),
        (lambda a: a["value_indices"].__setitem__(1, a["value_indices"][1] + 8), r"bucket ids must lie in \[0, 8\)"),
        (lambda a: a["value_indices"].__setitem__(0, a["value_indices"][0].float()), "value term 0: expected int64"),
    ],
)
def test_rpe_attention_errors(mutate, message) -> None:
    q, k, v, weights, indices, transposed, scale = _attention_case()
    value_weights, value_indices = _value_terms(v, q.size(2))
    args = dict(q=q, k=k, v=v, weights=weights, indices=indices, transposed=[int(t) for t in transposed])
    args.update(value_weights=value_weights, value_indices=value_indices)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rpe_ops.rpe_attention(**args, scale=scale)
    grad_out = torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype)  # the backward checks the same arguments
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rpe_ops.rpe_attention_backward(grad_out, lse=q.new_zeros(q.shape[:3]), **args, scale=scale)


def _product_case(height: int, width: int, requires_grad: bool = False, skip: int = 1):
    """float32 terms with iRPE-S's ids (product method, ratio 1.9: 50 buckets) on a height x width grid after skip
    leading tokens: contextual on keys, a bias on keys (its lookups read the weight itself), contextual transposed, one
    on keys with random ids (few of its chunks of 8 keys fit a window of 8 buckets), a transposed bias with random ids,
    and one on values. On x86 CPUs with AVX2 the float32 kernels read the product ids through their windows; on
    square grids of 20 x 20 and more the bucket sums of the terms on keys and values go through the ids' factors."""
    import irpe

    ids, nb = irpe.get_bucket_ids_2d(irpe.METHOD.PRODUCT, height, width, skip=skip, alpha=1.9, beta=3.8, gamma=15.2)
    B, H, d, L = 2, 3, 8, ids.size(0)
    q, k, v = (randn(B, H, L, d, seed=seed) for seed in (21, 22, 23))
    weights = [randn(1, d, nb, seed=24), randn(H, nb, seed=25), randn(1, d, nb, seed=26), randn(H, d, 60, seed=27)]
    weights.append(randn(H, 20, seed=31))
    indices = [ids, ids, ids, make_index(L, L, 60, "cpu", seed=28), make_index(L, L, 20, "cpu", seed=32)]
    value_weights, value_indices = [randn(1, nb, d, seed=29)], [ids]
    if requires_grad:
        q, k, v, *weights = (t.requires_grad_() for t in (q, k, v, *weights))
        value_weights = [w.requires_grad_() for w in value_weights]
    return q, k, v, weights, indices, [False, False, True, False, True], value_weights, value_indices


def _product_case_results(height: int, width: int, skip: int = 1) -> list[torch.Tensor]:
    """Output, lse and every gradient of the kernel on _product_case."""
    q, k, v, weights, indices, transposed, vw, vi = _product_case(height, width, requires_grad=True, skip=skip)
    out, lse = rpe_ops.rpe_attention(q, k, v, weights, indices, transposed, 0.35, vw, vi)
    grad = randn(*out.shape, seed=30)
    return [out, lse, *torch.autograd.grad(out, (q, k, v, *weights, *vw), grad)]


# square and oblong grids, one and two leading tokens; 17 x 17 and larger take several blocks of queries
PRODUCT_GRIDS = [(5, 5, 1), (4, 7, 1), (14, 14, 1), (17, 17, 1), (20, 20, 1), (24, 24, 2), (20, 23, 1)]


def _check_product_case(height: int, width: int, skip: int) -> None:
    """The kernel's float32 output, lse and every gradient on _product_case against the definition in float64.

    Tolerances (tests/tolerances.py) from the reductions behind each value: a row's softmax, output and the
    gradients of q, k, v sum over the L keys; a weight's gradient sums over every (b, h, i, j), B * H * L * L terms.
    """
    q, k, v, weights, indices, transposed, vw, vi = _product_case(height, width, requires_grad=True, skip=skip)
    out, lse = rpe_ops.rpe_attention(q, k, v, weights, indices, transposed, 0.35, vw, vi)
    wide = [t.double() for t in (q, k, v, *weights, *vw)]
    nw = len(weights)
    ref, ref_lse = _reference_attention(*wide[:3], wide[3 : 3 + nw], indices, transposed, 0.35, wide[3 + nw :], vi)
    B, H, L, _ = q.shape
    assert_close_reduction(out, ref, L, msg=f"output at {height}x{width}")
    assert_close_reduction(lse, ref_lse, L, msg=f"lse at {height}x{width}")
    grad = randn(*out.shape, seed=30)
    leaves = (q, k, v, *weights, *vw)
    names = ["q", "k", "v", *(f"weight {t}" for t in range(nw)), "value weight"]
    for name, g, r in zip(
        names, torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad.double())
    ):
        n = L if name in ("q", "k", "v") else B * H * L * L
        assert_close_reduction(g, r, n, msg=f"gradient of {name} at {height}x{width}")


# The kernel's element-wise loops run in the variant of PyTorch's CPU capability (rpe_attention_cpu.cpp, cpu_isa):
# ATEN_CPU_CAPABILITY picks it, so each variant the CPU supports is tested, in a process of its own (the choice is
# made once per process). The test's id names the variant that ran; those the CPU lacks are skipped with that reason.
ISA_LEVELS = [("avx512", "x86-64-v4"), ("avx2", "x86-64-v3"), ("default", "baseline")]


def _best_isa() -> str:
    return rpe_ops.build_info().get("cpu_isa", "baseline") if rpe_ops.is_available() else "baseline"


@needs_ops
@pytest.mark.parametrize("capability,isa", ISA_LEVELS, ids=[level for _, level in ISA_LEVELS])
def test_rpe_attention_on_product_ids_matches_its_definition(capability, isa) -> None:
    levels = [level for _, level in ISA_LEVELS]
    if levels.index(isa) < levels.index(_best_isa()):
        pytest.skip(f"this process runs at most the {_best_isa()} variant (the CPU's best, or ATEN_CPU_CAPABILITY's)")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, "tests")
        import rpe_ops
        from test_rpe_ops import PRODUCT_GRIDS, _check_product_case
        assert rpe_ops.build_info()["cpu_isa"] == {isa!r}, rpe_ops.build_info()
        for grid in PRODUCT_GRIDS:
            _check_product_case(*grid)
        print("ran", rpe_ops.build_info()["cpu_isa"])
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ran", isa]


@needs_ops
def test_rpe_attention_terms_sharing_ids_match_terms_with_their_own() -> None:
    # _product_case passes one ids tensor to three logit terms (one transposed) and the value term: the kernel brings
    # it to its int32 form and transposed offsets once. Copies per term (int32 for some) must give the same
    # results, bit for bit.
    shared = _product_case_results(4, 7)
    q, k, v, weights, indices, transposed, vw, vi = _product_case(4, 7, requires_grad=True)
    assert all(index is vi[0] for index in indices[:3])
    indices = [indices[0].clone(), indices[1].int(), indices[2].clone(), *indices[3:]]
    out, lse = rpe_ops.rpe_attention(q, k, v, weights, indices, transposed, 0.35, vw, [vi[0].int()])
    grads = torch.autograd.grad(out, (q, k, v, *weights, *vw), randn(*out.shape, seed=30))
    for got, want in zip([out, lse, *grads], shared):
        assert torch.equal(got, want)
