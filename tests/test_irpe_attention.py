"""Tests of irpe_attention.py: every attention path computes the paper's attention (forward and gradients, float64
against the explicit formulation), what each path keeps for backward, how a path is chosen, and half precision."""

from __future__ import annotations

import contextlib
import copy
import importlib.util

import pytest
import torch

import irpe_attention
import rpe_ops
from rpe_cases import random_encodings
from tolerances import assert_close_reduction, reduction_tol

OPS = rpe_ops.serves(torch.device("cpu"), torch.float32)[0]  # compiled rpe_ops built and loaded
needs_ops = pytest.mark.skipif(not OPS, reason="rpe_ops is not built (make ops)")


ATTENTION_CONFIGS = [
    dict(method="product", skip=1, rpe_on="k"),
    dict(method="product", skip=0, rpe_on="q"),
    dict(method="cross", skip=1, rpe_on="qk", shared_head=False),
    dict(method="euc", mode="bias", skip=0, rpe_on="qk", shared_head=False),
    dict(method="quant", mode="bias", skip=2, rpe_on="k"),
    dict(method="product", skip=1, rpe_on="qkv"),
    dict(method="product", skip=1, rpe_on=""),
]


def _attention_inputs(config_args, dtype, device="cpu", B=2, H=3, d=8, height=4, width=3, seed=0, values_args=None):
    """q, k, v and the encodings of ``config_args`` (:func:`rpe_cases.random_encodings`)."""
    modules = random_encodings(config_args, d, H, dtype, device, values_args, seed)
    L = config_args.get("skip", 0) + height * width
    qkv = [torch.randn(B, H, L, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]
    return qkv, modules, (height, width)


def _attention_and_grads(impl, qkv, modules, grid, grad_dtype=None, torch_only_forward=False):
    """Output and the gradients of q, k, v and the encodings' parameters; the output's gradient is rounded to
    ``grad_dtype`` (default: the output's dtype), so that a float64 reference can take the one a half run takes."""
    with rpe_ops.disabled() if torch_only_forward else contextlib.nullcontext():
        out = irpe_attention.rpe_attention(*qkv, *modules, *grid, impl=impl)
    params = [p for m in modules if m is not None for p in m.parameters()]
    # randn of the shape, not normal_() of an empty_like: the paths return different memory layouts
    grad_out = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(3), device=out.device)
    grads = torch.autograd.grad(out, [*qkv, *params], grad_out.to(grad_dtype or out.dtype).to(out.dtype))
    return out, grads


def _float64(qkv, modules):
    """float64 copies of q, k, v (leaves that take gradients) and of the encodings: an exact reference's inputs."""
    qkv64 = [t.detach().double().requires_grad_() for t in qkv]
    return qkv64, [None if m is None else copy.deepcopy(m).double() for m in modules]


def _assert_close_to_float64_math(out, grads, qkv, modules, grid, grad_dtype=None):
    """``out`` and ``grads`` (of ``_attention_and_grads``) equal the explicit formulation's in float64 on the same
    inputs, within the rounding of their dtype: an output reduces the L keys of its row (and d for its logits); a
    table's gradient sums every (b, h, i, j) logit."""
    B, H, L, d = qkv[0].shape
    ref_out, ref_grads = _attention_and_grads("math", *_float64(qkv, modules), grid, grad_dtype=grad_dtype)
    assert_close_reduction(out, ref_out, max(L, d))
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert_close_reduction(g, ref, B * H * L * L, msg=f"gradient {i}")


def _assert_path_matches_math(impl, qkv, modules, grid):
    """``impl``'s output and gradients (inputs and encodings) equal the explicit formulation's in float64."""
    _assert_close_to_float64_math(*_attention_and_grads(impl, qkv, modules, grid), qkv, modules, grid)


needs_ops_kernel = pytest.mark.skipif(not OPS, reason="the compiled rpe_ops are not built")
FUSED_CPU_IMPLS = ["sdpa", pytest.param("ops", marks=needs_ops_kernel)]


@pytest.mark.parametrize("impl", FUSED_CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config_args", ATTENTION_CONFIGS, ids=lambda c: f"{c['method']}-{c.get('mode', 'ctx')}-{c['rpe_on']}"
)
def test_fused_cpu_paths_match_math(config_args, dtype, impl):
    qkv, modules, grid = _attention_inputs(config_args, dtype)
    _assert_path_matches_math(impl, qkv, modules, grid)


@pytest.mark.parametrize("impl", FUSED_CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_cpu_paths_half_precision(dtype, impl):
    args = dict(method="product", skip=1, rpe_on="qk")
    qkv, modules, grid = _attention_inputs(args, torch.float32)
    half_qkv = [t.detach().to(dtype).requires_grad_() for t in qkv]
    for m in modules:
        if m is not None:
            m.to(dtype)
    out, grads = _attention_and_grads(impl, half_qkv, modules, grid)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # against float64 on the same (rounded) inputs: float32 accumulation, the result rounded to the half type
    _assert_close_to_float64_math(out, grads, half_qkv, modules, grid, grad_dtype=dtype)


@pytest.mark.parametrize("config_args", ATTENTION_CONFIGS[:5], ids=lambda c: f"{c['method']}-{c['rpe_on']}")
def test_flex_path_forward_matches_math_on_cpu(config_args):
    # FlexAttention has no CPU backward; its gradients are checked by the CUDA test below.
    qkv, modules, grid = _attention_inputs(config_args, torch.float32)
    with pytest.raises(ValueError, match="FlexAttention has no backward on CPU"):
        irpe_attention.rpe_attention(*qkv, *modules, *grid, impl="flex")
    qkv = [t.detach() for t in qkv]
    with torch.no_grad():
        ref = irpe_attention.rpe_attention(*_float64(qkv, modules)[0], *_float64(qkv, modules)[1], *grid, impl="math")
        out = irpe_attention.rpe_attention(*qkv, *modules, *grid, impl="flex")
    L, d = qkv[0].shape[-2:]
    assert_close_reduction(out, ref, max(L, d))  # an output reduces the L keys of its row (and d for its logits)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("config_args", ATTENTION_CONFIGS[:5], ids=lambda c: f"{c['method']}-{c['rpe_on']}")
def test_fused_paths_match_math_on_cuda(config_args, impl):
    qkv, modules, grid = _attention_inputs(config_args, torch.float32, device="cuda", B=2, H=2, d=16, height=7, width=5)
    _assert_path_matches_math(impl, qkv, modules, grid)


TRITON = importlib.util.find_spec("triton") is not None


def test_attention_impl_resolution():
    resolve = irpe_attention.resolve_attn_impl
    assert resolve("auto", has_rpe_v=False, dropout_p=0.0) == "sdpa"  # no device given
    cpu, meta, cuda = torch.device("cpu"), torch.device("meta"), torch.device("cuda")
    # auto: the fused CPU kernel where it is built, PyTorch's fused attention elsewhere; with values too
    for has_rpe_v in (False, True):
        assert resolve("auto", has_rpe_v, 0.0, cpu) == ("ops" if OPS else "sdpa")
        assert resolve("auto", has_rpe_v, 0.0, meta) == "sdpa"
        # CUDA: the Triton kernel where Triton imports (tests/test_triton_attention.py covers the other case)
        assert resolve("auto", has_rpe_v, 0.0, cuda) == ("triton" if TRITON else "sdpa")
        assert resolve("sdpa", has_rpe_v, 0.0, cpu) == "sdpa"
        assert resolve("math", has_rpe_v, 0.3, cpu) == "math"
        with pytest.raises(ValueError, match=r"attn_impl='ops' cannot run: it is a CPU kernel and the tensors are on"):
            resolve("ops", has_rpe_v, 0.0, meta)
        # rpe_ops.disabled(): no compiled code on any path, so auto never takes the kernel and 'ops' is refused
        with rpe_ops.disabled():
            assert resolve("auto", has_rpe_v, 0.0, cpu) == "sdpa"
            with pytest.raises(ValueError, match=r"attn_impl='ops' cannot run: inside rpe_ops.disabled\(\)"):
                resolve("ops", has_rpe_v, 0.0, cpu)
    assert resolve("flex", has_rpe_v=False, dropout_p=0.0) == "flex"
    # An explicit path runs as asked or raises: flex cannot encode values, no fused path applies dropout.
    with pytest.raises(ValueError, match=r"attn_impl='flex' cannot encode values.*use attn_impl='auto' or 'sdpa'"):
        resolve("flex", has_rpe_v=True, dropout_p=0.0)
    for impl in ("sdpa", "flex", "ops"):
        with pytest.raises(ValueError, match=rf"attn_impl='{impl}' cannot apply attention dropout \(dropout_p=0.1\)"):
            resolve(impl, has_rpe_v=False, dropout_p=0.1, device=cpu)
    # auto with dropout: the explicit formulation, which keeps the mask for backward
    assert resolve("auto", has_rpe_v=True, dropout_p=0.1, device=cpu) == "math"
    with pytest.raises(ValueError, match=r"unknown attention implementation 'fast'; expected one of \('auto'"):
        resolve("fast", False, 0.0)


@pytest.mark.parametrize("impl", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("rpe_on", ["k", "qkv"])
def test_disabled_rpe_ops_run_no_compiled_code_on_any_path(monkeypatch, impl, rpe_on):
    # Inside rpe_ops.disabled() every path stays off rpe_ops, the backward of a forward run in the block too: the ops'
    # entry points are replaced by ones that fail, and the numbers still equal the default run's.
    qkv, modules, grid = _attention_inputs(dict(method="product", skip=1, rpe_on=rpe_on), torch.float64)
    ref_out, ref_grads = _attention_and_grads(impl, qkv, modules, grid)

    def fail(*args, **kwargs):
        raise AssertionError("compiled rpe_ops called inside rpe_ops.disabled()")

    for name in ("rpe_index", "rpe_bucket_sum", "rpe_attention"):
        monkeypatch.setattr(rpe_ops, name, fail)
    monkeypatch.setattr(torch.ops, "rpe_ops", None, raising=False)
    for whole_step in (True, False):  # forward and backward in the block, or the forward only
        with rpe_ops.disabled() if whole_step else contextlib.nullcontext():
            out, grads = _attention_and_grads(impl, qkv, modules, grid, torch_only_forward=True)
        # float64, the PyTorch lookups against the default ones: an output reduces a row's L keys (and d); a
        # table's gradient sums every (b, h, i, j) logit
        B, H, L, d = qkv[0].shape
        assert_close_reduction(out, ref_out, max(L, d))
        for g, ref in zip(grads, ref_grads):
            assert_close_reduction(g, ref, B * H * L * L)


@pytest.mark.parametrize("rpe_on", ["k", "qkv", "v"])
def test_fused_paths_keep_no_square_tensor_for_backward(rpe_on):
    # What autograd saves between forward and backward: the math path keeps (B, H, L, L) probabilities and more,
    # the fused paths only q, k, v, the output (and the ops kernel the rows' log-sum-exp) and the weights, with
    # encodings on values too.
    args = dict(method="product", skip=1, rpe_on=rpe_on)
    qkv, modules, grid = _attention_inputs(args, torch.float32, height=9, width=9)
    L = qkv[0].size(2)
    for impl, expect_square in (("math", True), ("sdpa", False)) + ((("ops", False),) if OPS else ()):
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            irpe_attention.rpe_attention(*qkv, *modules, *grid, impl=impl)
        has_square = any(len(s) == 4 and s[-2:] == (L, L) for s in shapes)
        assert has_square == expect_square, (impl, shapes)


@pytest.mark.parametrize("rpe_on", ["qk", "qkv"])
@pytest.mark.parametrize("impl", FUSED_CPU_IMPLS)
def test_compile_fullgraph_through_fused_attention(impl, rpe_on):
    torch._dynamo.reset()
    qkv, modules, grid = _attention_inputs(dict(method="product", skip=1, rpe_on=rpe_on), torch.float32)

    def step(q, k, v):
        return irpe_attention.rpe_attention(q, k, v, *modules, *grid, impl=impl)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*qkv)
    B, H, L, d = qkv[0].shape
    assert_close_reduction(out, step(*qkv), max(L, d))  # an output reduces the L keys of its row (and d)
    grads = torch.autograd.grad(out.square().sum(), qkv)
    ref = torch.autograd.grad(step(*qkv).square().sum(), qkv)
    for g, r in zip(grads, ref):
        assert_close_reduction(g, r, L * d)  # a logit's gradient reduces over d, then q's, k's, v's over L rows


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 12 * 12 * 8 * 2])  # one sample per slice; two (float64) per slice
def test_sdpa_path_batch_slices_match_math(monkeypatch, chunk_bytes):
    monkeypatch.setitem(irpe_attention._FUSED_CHUNK_BYTES, "cpu", chunk_bytes)
    args = dict(method="cross", skip=0, rpe_on="qk", shared_head=False)
    qkv, modules, grid = _attention_inputs(args, torch.float64, B=5, height=4, width=3)
    assert len(irpe_attention._batch_chunks(qkv[0])) == (5 if chunk_bytes == 1 else 3)
    _assert_path_matches_math("sdpa", qkv, modules, grid)


@pytest.mark.parametrize(
    "dtype, itemsize", [(torch.float64, 8), (torch.float32, 4), (torch.bfloat16, 4), (torch.float16, 4)]
)
def test_work_chunks_count_the_bytes_of_the_work_dtype(monkeypatch, dtype, itemsize):
    # half types are recomputed in float32, so their work tensors take 4 bytes per logit, float64 ones 8
    B, H, L = 6, 2, 5
    monkeypatch.setitem(irpe_attention._FUSED_CHUNK_BYTES, "cpu", 2 * H * L * L * itemsize)
    q = torch.zeros(B, H, L, 4, dtype=dtype)
    assert irpe_attention._batch_chunks(q) == [(0, 2), (2, 4), (4, 6)]
    monkeypatch.setitem(irpe_attention._FUSED_CHUNK_BYTES, "cpu", 2 * H * L * itemsize)
    assert irpe_attention._row_blocks(q, 1, L) == [(0, 2), (2, 4), (4, 5)]


# Encodings on values on the fused paths: every method, contextual (alone or beside bias encodings on queries and
# keys, bias having no values mode), shared and per head, skip tokens, square and non-square grids.
VALUES_CASES = [
    (dict(method="product", skip=1, rpe_on="v"), None, (4, 3)),
    (dict(method="product", skip=1, rpe_on="kv", shared_head=False), None, (3, 5)),
    (dict(method="product", skip=1, rpe_on="qkv"), None, (4, 4)),
    (dict(method="euc", skip=0, rpe_on="qkv", shared_head=False), None, (4, 3)),
    (dict(method="quant", skip=2, rpe_on="kv"), None, (2, 5)),
    (dict(method="cross", skip=1, rpe_on="qkv"), None, (4, 3)),
    (dict(method="cross", skip=0, rpe_on="v", shared_head=False), None, (3, 3)),
    (dict(method="euc", mode="bias", skip=1, rpe_on="qk"), dict(method="euc", skip=1, rpe_on="v"), (4, 3)),
    (
        dict(method="cross", mode="bias", skip=0, rpe_on="k", shared_head=False),
        dict(method="cross", skip=0, rpe_on="v", shared_head=False),
        (3, 4),
    ),
    (
        dict(method="quant", mode="bias", skip=2, rpe_on="qk"),
        dict(method="quant", skip=2, rpe_on="v", shared_head=False),
        (3, 2),
    ),
    (dict(method="product", mode="bias", skip=1, rpe_on="q"), dict(method="product", skip=1, rpe_on="v"), (5, 3)),
]


def _values_case_id(case) -> str:
    args, values_args, (height, width) = case
    mode = args.get("mode", "ctx") + ("+ctx-v" if values_args else "")
    heads = "shared" if args.get("shared_head", True) else "per-head"
    return f"{args['method']}-{mode}-{args['rpe_on']}-{heads}-skip{args['skip']}-{height}x{width}"


VALUES_IMPLS = [
    pytest.param("sdpa", "cpu", id="sdpa-cpu"),
    pytest.param("ops", "cpu", marks=needs_ops_kernel, id="ops-cpu"),
    pytest.param("sdpa", "cuda", marks=pytest.mark.cuda, id="sdpa-cuda"),
    pytest.param("auto", "cuda", marks=pytest.mark.cuda, id="auto-cuda"),
]


@pytest.mark.parametrize("impl, device", VALUES_IMPLS)
@pytest.mark.parametrize("case", VALUES_CASES, ids=_values_case_id)
def test_fused_values_paths_match_math(case, impl, device):
    # float64 on either device: the paths differ from the explicit formulation only in rounding.
    args, values_args, (height, width) = case
    qkv, modules, grid = _attention_inputs(
        args, torch.float64, device=device, height=height, width=width, values_args=values_args
    )
    assert modules[2] is not None
    _assert_path_matches_math(impl, qkv, modules, grid)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize(
    "chunk_bytes, blocks",
    [(2 * 3 * 17 * 17 * 8, 1), (5 * 3 * 17 * 8, 4), (16 * 3 * 17 * 8, 2), (1, 17)],
    ids=["2-samples-all-rows", "1-sample-5-rows", "1-sample-16-rows", "1-row"],
)
def test_sdpa_values_path_row_blocks_match_math(monkeypatch, device, chunk_bytes, blocks):
    # L = 17 (class token + 4x4 grid), H = 3; the chunk size counts float64 bytes of (b, H, rows, L) work tensors:
    # slices of 2 samples take all rows, single samples blocks of 5 or 16 rows (a short last block) or of one row.
    monkeypatch.setitem(irpe_attention._FUSED_CHUNK_BYTES, device, chunk_bytes)
    qkv, modules, grid = _attention_inputs(
        dict(method="product", skip=1, rpe_on="qkv", shared_head=False),
        torch.float64,
        device=device,
        B=3,
        height=4,
        width=4,
    )
    q = qkv[0]
    b0, b1 = irpe_attention._batch_chunks(q)[0]
    assert len(irpe_attention._row_blocks(q, b1 - b0, q.size(2))) == blocks
    _assert_path_matches_math("sdpa", qkv, modules, grid)


@pytest.mark.parametrize("impl", FUSED_CPU_IMPLS)
def test_fused_values_paths_half_precision(impl):
    # bfloat16 through the values paths: computed in float32 (the kernel) or recomputed in float32 (sdpa's blocks).
    qkv, modules, grid = _attention_inputs(dict(method="product", skip=1, rpe_on="qkv"), torch.float32)
    half_qkv = [t.detach().to(torch.bfloat16).requires_grad_() for t in qkv]
    for m in modules:
        m.to(torch.bfloat16)
    out, grads = _attention_and_grads(impl, half_qkv, modules, grid)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    # against float64 on the same (rounded) inputs: float32 accumulation, the result rounded to bfloat16
    _assert_close_to_float64_math(out, grads, half_qkv, modules, grid, grad_dtype=torch.bfloat16)


@needs_ops_kernel
@pytest.mark.parametrize(
    "config_args",
    [
        dict(method="product", skip=1, rpe_on="qk"),
        dict(method="cross", mode="bias", skip=0, rpe_on="qk"),
        dict(method="product", skip=1, rpe_on="qkv"),
        dict(method="cross", skip=0, rpe_on="v", shared_head=False),
    ],
    ids=["product-ctx-qk", "cross-bias-qk", "product-ctx-qkv", "cross-ctx-v"],
)
def test_ops_kernel_row_blocks_match_math(config_args):
    # L = 290: the kernel's blocks of query rows (65536 logits) split every (b, h) into two, the last one short.
    qkv, modules, grid = _attention_inputs(config_args, torch.float64, B=1, H=2, d=4, height=17, width=17)
    assert qkv[0].size(2) ** 2 > 65536
    _assert_path_matches_math("ops", qkv, modules, grid)


@needs_ops_kernel
def test_ops_kernel_float32_softmax_handles_large_logits():
    # Logits ~1e3 apart: the kernel's exp must subtract the row maximum and flush far-away keys to ~0. The softmax
    # saturates, so float32 gradients lose digits on any path: the kernel must be as close to float64 as math is.
    qkv, modules, grid = _attention_inputs(dict(method="product", skip=1, rpe_on="k"), torch.float32)
    qkv = [(t * 30).detach().requires_grad_() for t in qkv]
    exact_out, exact_grads = _attention_and_grads(
        "math", [t.double() for t in qkv], [m.double() if m else m for m in modules], grid
    )
    for m in modules:
        if m is not None:
            m.float()
    results = {impl: _attention_and_grads(impl, qkv, modules, grid) for impl in ("math", "ops")}
    assert torch.isfinite(results["ops"][0]).all()
    # The logits' rounding (u |z|, |z| up to ~4e3) is amplified by the softmax where two keys nearly tie, on any path:
    # no bound from the reductions alone holds, so the kernel's error is held to math's (a factor 4 for another
    # summation order), plus the reductions' own bound for where math happens to be exact: an output reduces a row's
    # L keys (and d), a gradient sums every (b, h, i, j) logit.
    B, H, L, d = qkv[0].shape
    lengths = [max(L, d)] + [B * H * L * L] * len(exact_grads)
    values = {impl: [out, *grads] for impl, (out, grads) in results.items()}
    for i, (n, exact) in enumerate(zip(lengths, [exact_out, *exact_grads])):
        err = {impl: (v[i].double() - exact).abs().max().item() for impl, v in values.items()}
        slack = reduction_tol(torch.float32, n, scale=exact.abs().max().item())["atol"]
        assert err["ops"] <= 4 * err["math"] + slack, ("output" if i == 0 else f"gradient {i - 1}", err, slack)
