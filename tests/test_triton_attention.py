"""Tests of the Triton attention kernel (rpe_ops/triton_attention.py): its numbers against the paper's explicit
formulation in float64, forward and every gradient, on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
by conftest.py before Triton is imported on machines without a GPU); what it keeps for backward; how
``irpe_attention`` chooses it; the default GPU recipe (float16 autocast and a ``GradScaler``) through it on CPU; that
the kernels compile for the GPU (no GPU needed); and, marked ``cuda``, the compiled kernels at DeiT-S shapes."""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import irpe
import irpe_attention
import rpe_ops
from rpe_cases import random_encodings
from tolerances import assert_close_reduction

triton = pytest.importorskip("triton", reason="Triton is not installed (the kernel's tests need it)")
from rpe_ops import triton_attention  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# CPU tensors run the kernels in Triton's interpreter, which is chosen per process (conftest.py: without a GPU).
interpreter = pytest.mark.skipif(
    not triton_attention.triton_usable(torch.device("cpu"))[0],
    reason=f"Triton's interpreter is off: {triton_attention.triton_usable(torch.device('cpu'))[1]}",
)


def _modules(config_args, head_dim, num_heads, values_args=None, seed=0):
    """The encodings of ``config_args`` in float64 with random tables (:func:`rpe_cases.random_encodings`)."""
    return random_encodings(config_args, head_dim, num_heads, torch.float64, values_args=values_args, seed=seed)


def _terms(modules, q, k, grid):
    rpe_q, rpe_k, rpe_v = modules
    terms = rpe_k.fused_terms(q, *grid) if rpe_k is not None else []
    if rpe_q is not None:
        terms += rpe_q.fused_terms(k, *grid, is_query=True)
    return terms, (rpe_v.fused_terms(q, *grid) if rpe_v is not None else [])


def _reference(qkv, modules, grid, scale, key_padding_mask=None):
    """The paper's formulation in float64 through the modules' own ``forward`` (``irpe_attention``'s math path, whose
    masked keys get probability 0 and whose rows with every key masked give zeros)."""
    with rpe_ops.disabled():
        return irpe_attention.rpe_attention(
            *qkv, *modules, *grid, scale=scale, impl="math", key_padding_mask=key_padding_mask
        )


def _run(qkv, modules, fn, grad_out):
    out = fn(qkv, modules)
    params = [p for m in modules if m is not None for p in m.parameters()]
    return out, torch.autograd.grad(out, [*qkv, *params], grad_out.to(out.dtype))


def _check_against_float64(
    config_args, dtype, grid=(4, 3), values_args=None, B=2, H=2, d=16, key_padding_mask=None, device="cpu"
):
    """The kernel's output and gradients (q, k, v and every table) in ``dtype`` against the float64 formulation
    evaluated on the same (rounded) inputs."""
    modules = _modules(config_args, d, H, values_args)
    L = config_args.get("skip", 0) + grid[0] * grid[1]
    scale = d**-0.5
    gen = torch.Generator().manual_seed(1)
    qkv = [torch.randn(B, H, L, d, generator=gen, dtype=torch.float64).to(dtype).double() for _ in range(3)]
    grad_out = torch.randn(B, H, L, d, generator=gen, dtype=torch.float64)
    mask = None if key_padding_mask is None else key_padding_mask.to(device)
    ref_qkv = [t.to(device).requires_grad_() for t in qkv]
    ref_modules = [None if m is None else m.to(device) for m in modules]
    reference = lambda x, m: _reference(x, m, grid, scale, mask)  # noqa: E731
    ref_out, ref_grads = _run(ref_qkv, ref_modules, reference, grad_out.to(device))

    def kernel(x, m):
        terms, value_terms = _terms(m, x[0], x[1], grid)
        return triton_attention.triton_rpe_attention(*x, scale, terms, value_terms, key_padding_mask=mask)

    low_qkv = [t.to(device=device, dtype=dtype).requires_grad_() for t in qkv]
    low_modules = [None if m is None else copy.deepcopy(m).to(dtype) for m in ref_modules]
    out, grads = _run(low_qkv, low_modules, kernel, grad_out.to(device))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Tolerances (tests/tolerances.py): a softmax row and dq/dk/dv reduce over the L keys (or query rows); a table's
    # gradient over every (b, h, i, j) that falls in its buckets, B * H * L * L at most. The kernel accumulates in
    # float32, and in half types rounds the probabilities and dS to the half type before their products with v, q
    # and k, as flash attention does: one rounding of the half type per term, covered by eps(dtype).
    assert_close_reduction(out, ref_out, L, msg="output")
    names = ["dq", "dk", "dv"] + [n for m in modules if m is not None for n, _ in m.named_parameters()]
    for name, g, ref in zip(names, grads, ref_grads):
        n = L if name in ("dq", "dk", "dv") else B * H * L * L
        assert_close_reduction(g, ref, n, msg=name)


# A covering subset for the default suite: every method, bias and contextual, shared and per-head tables, q/k/v
# subsets, skip 0-2, square and non-square grids, L below, at and across the interpreter's 16 x 16 tiles (L = 13..35),
# head dims 16 and 32, float32 and float16. The full cross-product is the slow test below.
CASES = [
    (dict(method="product", skip=1, rpe_on="k"), None, (4, 3), torch.float32, 16),
    (dict(method="product", skip=1, rpe_on="qkv"), None, (5, 4), torch.float16, 32),
    (dict(method="cross", skip=0, rpe_on="qkv", shared_head=False), None, (5, 4), torch.float32, 16),
    (
        dict(method="euc", mode="bias", skip=1, rpe_on="qk"),
        dict(method="euc", skip=1, rpe_on="v"),
        (6, 5),
        torch.float32,
        16,
    ),
    (dict(method="quant", mode="bias", skip=2, rpe_on="qk", shared_head=False), None, (5, 5), torch.float16, 32),
    (dict(method="product", skip=0, rpe_on="q", shared_head=False), None, (7, 5), torch.float32, 16),
    (dict(method="euc", skip=1, rpe_on="v", shared_head=False), None, (3, 5), torch.float16, 16),
    (
        dict(method="cross", mode="bias", skip=1, rpe_on="k"),
        dict(method="cross", skip=1, rpe_on="v", shared_head=False),
        (3, 4),
        torch.float32,
        16,
    ),
    (dict(method="quant", skip=2, rpe_on="kv"), None, (2, 5), torch.float32, 16),
]


def _case_id(case) -> str:
    args, values_args, (height, width), dtype, d = case
    mode = args.get("mode", "ctx") + ("+ctx-v" if values_args else "")
    heads = "shared" if args.get("shared_head", True) else "per-head"
    L = args["skip"] + height * width
    return f"{args['method']}-{mode}-{args['rpe_on']}-{heads}-skip{args['skip']}-{height}x{width}-L{L}-{dtype}-d{d}"


@interpreter
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_math_in_float64(case):
    args, values_args, grid, dtype, d = case
    _check_against_float64(args, dtype, grid=grid, values_args=values_args, d=d)


def _all_cases():
    methods, modes, rpe_ons = ["euc", "quant", "cross", "product"], ["bias", "ctx"], ["q", "k", "v", "qk", "kv", "qkv"]
    dtypes = [torch.float32, torch.float16]
    for method, mode, shared, rpe_on, skip, dtype in itertools.product(
        methods, modes, [True, False], rpe_ons, [0, 1], dtypes
    ):
        args = dict(method=method, skip=skip, rpe_on=rpe_on, shared_head=shared)
        values_args = None
        if mode == "bias":
            args["mode"] = "bias"
            if "v" in rpe_on:  # bias has no values mode: a contextual encoding on values beside it
                args["rpe_on"] = rpe_on.replace("v", "") or "k"
                values_args = dict(method=method, skip=skip, rpe_on="v", shared_head=shared)
        grid = (5, 3) if skip else (4, 6)  # L = 16 (one full tile) or 24 (a partial second tile)
        yield pytest.param((args, values_args, grid, dtype, 16), id=_case_id((args, values_args, grid, dtype, 16)))


@interpreter
@pytest.mark.slow
@pytest.mark.parametrize("case", list(_all_cases()))
def test_kernel_matches_math_every_combination(case):
    args, values_args, grid, dtype, d = case
    _check_against_float64(args, dtype, grid=grid, values_args=values_args, d=d)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_padding_mask(dtype):
    # Sample 0: the class token and three patches masked; sample 1: every key masked (zero output, zero gradients).
    mask = torch.zeros(2, 1 + 4 * 5, dtype=torch.bool)
    mask[0, [0, 3, 7, 20]] = True
    mask[1] = True
    args = dict(method="cross", skip=1, rpe_on="qkv", shared_head=False)
    _check_against_float64(args, dtype, grid=(4, 5), key_padding_mask=mask)


@interpreter
def test_forward_saves_nothing_square_per_batch_and_head():
    # L = 50 (class token + 7 x 7, four 16-row tiles): what autograd keeps is q, k, v, the output, the (B, H, L)
    # log-sum-exp, the weights and the int32 bucket ids (terms, L, L), which have no batch or head dimension.
    modules = [m.float() for m in _modules(dict(method="product", skip=1, rpe_on="qkv", shared_head=False), 16, 2)]
    B, H, L, d = 1, 2, 50, 16
    qkv = [torch.randn(B, H, L, d, requires_grad=True) for _ in range(3)]
    terms, value_terms = _terms(modules, qkv[0], qkv[1], (7, 7))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = triton_attention.triton_rpe_attention(*qkv, d**-0.5, terms, value_terms)
    assert out.shape == (B, H, L, d) and saved
    for shape, dtype in saved:
        if sum(size == L for size in shape) >= 2:  # only the ids: (terms, L, L) int32, no batch or head dimension
            assert len(shape) == 3 and shape[0] <= len(terms) + len(value_terms), shape
            assert dtype == torch.int32, (shape, dtype)


@interpreter
def test_deterministic_algorithms_alert_as_pytorch_does():
    # The kernels add with float atomics (values terms' bucket sums, dq, the tables' gradients): under
    # torch.use_deterministic_algorithms(True) they raise, with warn_only=True they warn, as PyTorch's own kernels.
    modules = [m.float() for m in _modules(dict(method="product", skip=1, rpe_on="qkv", shared_head=False), 16, 2)]
    qkv = [torch.randn(1, 2, 10, 16, requires_grad=True) for _ in range(3)]
    terms, value_terms = _terms(modules, qkv[0], qkv[1], (3, 3))
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="float atomics"):
            triton_attention.triton_rpe_attention(*qkv, 0.25, terms, value_terms)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="float atomics"):
            out = triton_attention.triton_rpe_attention(*qkv, 0.25, terms, value_terms)
        with pytest.warns(UserWarning, match="backward"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@interpreter
def test_rpe_attention_takes_the_kernel_and_says_where_it_cannot_run(monkeypatch):
    resolve = irpe_attention.resolve_attn_impl
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    for has_rpe_v in (False, True):
        assert resolve("auto", has_rpe_v, 0.0, cuda) == "triton"
        with rpe_ops.disabled():
            assert resolve("auto", has_rpe_v, 0.0, cuda) == "sdpa"  # no compiled code inside rpe_ops.disabled()
        assert resolve("auto", has_rpe_v, 0.1, cuda) == "math"  # dropout
        assert resolve("triton", has_rpe_v, 0.0, cpu) == "triton"  # in the interpreter
        assert resolve("triton", has_rpe_v, 0.0, None) == "triton"  # device unknown (a model being built)
    with pytest.raises(ValueError, match=r"attn_impl='triton' cannot run: the Triton kernel runs on CUDA tensors"):
        resolve("triton", False, 0.0, meta)
    with rpe_ops.disabled(), pytest.raises(ValueError, match=r"attn_impl='triton' cannot run: inside rpe_ops"):
        resolve("triton", False, 0.0, cuda)
    with pytest.raises(ValueError, match=r"attn_impl='triton' cannot apply attention dropout"):
        resolve("triton", False, 0.1, cuda)

    # rpe_attention(impl='triton') on CPU tensors runs the interpreted kernel, and equals the explicit formulation
    modules = [None if m is None else m.float() for m in _modules(dict(method="product", skip=1, rpe_on="qkv"), 16, 2)]
    qkv = [torch.randn(1, 2, 13, 16) for _ in range(3)]
    calls = []
    kernel = triton_attention.triton_rpe_attention
    monkeypatch.setattr(triton_attention, "triton_rpe_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = irpe_attention.rpe_attention(*qkv, *modules, 4, 3, impl="triton")
    assert calls == [1]
    torch.testing.assert_close(out, irpe_attention.rpe_attention(*qkv, *modules, 4, 3, impl="math"))

    # a process that imported Triton without TRITON_INTERPRET=1 (compiled kernels): CPU tensors are refused
    monkeypatch.setattr(triton_attention, "interpreting", lambda: False)
    monkeypatch.setattr(triton_attention, "_fwd_kernel", object())
    with pytest.raises(ValueError, match=r"attn_impl='triton' cannot run: CPU tensors run only in Triton's interp"):
        irpe_attention.rpe_attention(*qkv, *modules, 4, 3, impl="triton")
    monkeypatch.setattr(triton_attention, "triton", None)
    monkeypatch.setattr(triton_attention, "_TRITON_ERROR", "Triton is not installed (test)")
    assert resolve("auto", True, 0.0, cuda) == "sdpa"
    with pytest.raises(ValueError, match=r"attn_impl='triton' cannot run: Triton is not installed \(test\)"):
        resolve("triton", True, 0.0, None)


@interpreter
def test_argument_errors():
    modules = _modules(dict(method="product", skip=1, rpe_on="kv"), 16, 2)
    q = torch.randn(1, 2, 13, 16)
    terms, value_terms = _terms([None if m is None else m.float() for m in modules], q, q, (4, 3))
    attention = triton_attention.triton_rpe_attention
    with pytest.raises(ValueError, match=r"q, k, v must all be \(B, H, L, head_dim\) of one shape"):
        attention(q, q[:, :, :5], q, 0.25, terms, value_terms)
    with pytest.raises(ValueError, match=r"must share one dtype of float16, bfloat16 or float32, got torch.float64"):
        attention(q.double(), q.double(), q.double(), 0.25, terms, value_terms)
    with pytest.raises(ValueError, match=r"bucket ids \(13, 13\) do not match L=12"):
        attention(q[:, :, :12], q[:, :, :12], q[:, :, :12], 0.25, terms, value_terms)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(B, L\) = \(1, 13\) with True for a masked"):
        attention(q, q, q, 0.25, terms, value_terms, key_padding_mask=torch.zeros(1, 13))


@interpreter
def test_fp16_autocast_recipe_trains_a_tiny_model_through_the_kernel(monkeypatch):
    # main.py's CUDA default (float16 autocast and a GradScaler) on CPU tensors: the qkv model cut to 2 blocks of 2
    # heads of 32 at 48 px (a 3 x 3 grid plus the class token, L = 10) through the interpreted kernel, every block's
    # attention on it, three steps of SGD on one batch: finite losses, a loss that goes down, every parameter updated.
    import timm

    import rpe_models  # noqa: F401  (registers the iRPE models)

    calls = []
    kernel = triton_attention.triton_rpe_attention
    monkeypatch.setattr(
        triton_attention, "triton_rpe_attention", lambda *a, **k: calls.append(a[0].dtype) or kernel(*a, **k)
    )
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_small_patch16_224_ctx_product_50_shared_qkv",
        img_size=48,
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_classes=2,
        attn_impl="triton",
    )
    for name, p in model.named_parameters():
        if "rpe" in name:  # tables start at zero; random ones make every term count
            nn.init.normal_(p, std=0.02)
    images, labels = torch.randn(2, 3, 48, 48), torch.tensor([0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert calls == [torch.float16] * 3 * 2  # three steps, two blocks, q in float16 under autocast
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert scaler.get_scale() == 2.0**10  # no step skipped for inf/NaN gradients
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged


def test_main_cuda_defaults_take_fp16_amp_and_the_kernel():
    # What main.py resolves on a GPU: float16 autocast with loss scaling, and iRPE attention on the Triton kernel.
    import main

    args = main.get_args_parser().parse_args([])
    assert main.resolve_amp_dtype(args, torch.device("cuda")) == torch.float16
    assert args.attn_impl == "auto"
    assert irpe_attention.resolve_attn_impl(args.attn_impl, True, 0.0, torch.device("cuda")) == "triton"


# ----------------------------------------------------------------------------------------------------------------
# The compiled kernels (a GPU).
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "config_args, values_args",
    [
        (dict(method="product", skip=1, rpe_on="k"), None),
        (dict(method="product", skip=1, rpe_on="qkv"), None),
        (
            dict(method="cross", mode="bias", skip=1, rpe_on="qk", shared_head=False),
            dict(method="cross", skip=1, rpe_on="v"),
        ),
    ],
    ids=["product-k", "product-qkv", "cross-bias-qk+ctx-v"],
)
def test_compiled_kernel_matches_math_at_deit_small_shapes(config_args, values_args, dtype):
    # DeiT-S: L = 197 (class token + 14 x 14), 6 heads of 64; several 64 x 64 tiles and a partial one.
    _check_against_float64(config_args, dtype, grid=(14, 14), values_args=values_args, B=2, H=6, d=64, device="cuda")


@pytest.mark.cuda
def test_compiled_kernel_key_padding_mask():
    mask = torch.zeros(2, 1 + 14 * 14, dtype=torch.bool)
    mask[0, 100:] = True
    mask[1] = True
    args = dict(method="product", skip=1, rpe_on="qkv")
    _check_against_float64(args, torch.bfloat16, grid=(14, 14), H=6, d=64, key_padding_mask=mask, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "model",
    [
        "deit_small_patch16_224_ctx_product_50_shared_qkv",
        "deit_small_patch16_224_ctx_cross_56_shared_k",
        "deit_small_patch16_224_ctx_euc_20_shared_k",
        "deit_small_patch16_224_ctx_quant_51_shared_k",
    ],
)
@pytest.mark.parametrize("img_size", [224, 384])
def test_cuda_lookups_match_the_torch_backend_on_the_zoo_ids(model, img_size):
    # rpe_ops' CUDA kernels (the lookups of the sdpa path on CUDA) against PyTorch's gather and scatter_add on the
    # zoo models' own bucket ids: index exactly, bucket sums to float32 rounding over the L keys of a row.
    import rpe_models

    served, why = rpe_ops.serves(torch.device("cuda"), torch.float32)
    if not served:
        pytest.fail(f"rpe_ops' CUDA kernels are not loaded: {why}")
    side = img_size // 16
    module = irpe.build_rpe(rpe_models.rpe_config_of(model), 64, 6)[1]
    for part in [module.rp_rows, module.rp_cols] if isinstance(module, irpe.iRPE_Cross) else [module]:
        index = part.get_bucket_ids(side, side, part.rpe_config.skip, torch.device("cuda"))
        L, nb = index.size(0), part.num_buckets
        gen = torch.Generator("cuda").manual_seed(0)
        table = torch.randn(8, 6, L, nb, device="cuda", generator=gen)
        probs = torch.randn(8, 6, L, L, device="cuda", generator=gen).softmax(-1)
        looked_up, sums = irpe.rpe_index(table, index), irpe.rpe_bucket_sum(probs, index, nb)  # the compiled ops
        with rpe_ops.disabled():
            torch.testing.assert_close(looked_up, irpe.rpe_index(table, index), rtol=0, atol=0)
            assert_close_reduction(sums, irpe.rpe_bucket_sum(probs.double(), index, nb), L)


# ----------------------------------------------------------------------------------------------------------------
# The compiled kernels, built for a GPU without one: Triton's compiler down to ptxas (bundled with Triton). The
# interpreter runs the kernels' Python, not their compilation, so this is what catches a kernel the GPU cannot build.
# It runs in a child process: this one may have Triton in interpreter mode.
# ----------------------------------------------------------------------------------------------------------------

_COMPILE = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rpe_ops import triton_attention as ta

arch, dtype, head_dim = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = ta._launch_config(torch.device("cuda"), head_dim)
warps = dict(num_warps=config.pop("num_warps"), num_stages=config.pop("num_stages"))
consts = dict(NUM_K=2, NUM_Q=1, NUM_V=1, HAS_MASK=True, **config)
float32_ptrs = {"OUT", "LSE", "SV", "TK", "TQ", "DQ", "DK", "DV", "DELTA", "GV", "DTK", "DTQ"}
for kernel in (ta._fwd_kernel, ta._bwd_kernel):
    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "DO"):
            signature[name] = "*" + dtype
        elif name in float32_ptrs:
            signature[name] = "*fp32"
        elif name in ("IK", "IQT", "IV"):
            signature[name] = "*i32"
        else:
            signature[name] = {"MASK": "*u8", "scale": "fp32"}.get(name, "i32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=warps)
    assert len(compiled.asm["cubin"]) > 0
    print(kernel.fn.__name__, "sm_%d" % arch, dtype, head_dim, "shared memory", compiled.metadata.shared)
"""


def _compile_for_gpu(arch: int, dtype: str, head_dim: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE, str(arch), dtype, str(head_dim)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(f"sm_{arch} {dtype} {head_dim}") == 2, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_kernels_compile_for_each_gpu_dtype_and_head_dim(arch, dtype, head_dim):
    _compile_for_gpu(arch, dtype, head_dim)
