"""Masks on every attention path and ``RPEMultiheadAttention``: key padding and attention masks (bool and float) on
``rpe_attention``'s paths against the explicit formulation in float64 (forward and every gradient), masked keys
contributing nothing, rows with every key masked, the fused CPU kernel in each variant the CPU runs,
``RPEMultiheadAttention`` against ``nn.MultiheadAttention``, ``RPEAttention``'s ``attn_mask`` and the README's
DETR-style encoder layer."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import irpe
import irpe_attention
from irpe_attention import RPEMultiheadAttention
from tolerances import assert_close_reduction, reduction_tol

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS_KERNEL = irpe_attention._compiled_usable("ops", torch.device("cpu"))[0]
needs_ops = pytest.mark.skipif(not OPS_KERNEL, reason="rpe_ops' attention kernel is not built (make ops)")
FUSED = ["sdpa", pytest.param("ops", marks=needs_ops)]

B, H, D = 3, 2, 8  # batch, heads, head dim
GRID, SKIP = (3, 4), 1  # a non-square grid after a class token
L = SKIP + GRID[0] * GRID[1]


def _modules(rpe_on: str = "qkv", method: str = "product", mode: str = "ctx", skip: int = SKIP, dtype=torch.float64):
    """Per-head encodings with random (non-zero) tables, so that every table matters."""
    config = irpe.get_rpe_config(1.9, method, mode, shared_head=False, skip=skip, rpe_on=rpe_on)
    modules = irpe.build_rpe(config, D, H)
    generator = torch.Generator().manual_seed(len(rpe_on) + len(method))
    for module in modules:
        if module is not None:
            module.to(dtype)
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.5)
    return modules


def _qkv(dtype=torch.float64, length: int = L, batch: int = B, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, H, length, D, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


def _masks(kind: str, dtype=torch.float64) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(key_padding_mask, attn_mask)`` for the ``(B, H, L, L)`` logits of the tests.

    Padding: sample 0 misses one key in the middle of the grid, sample 1 its last five, sample 2 none. The attention
    masks mask about a quarter of the pairs, and every key of query 4 (a row with no key left).
    """
    generator = torch.Generator().manual_seed(5)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, 6] = True
    padding[1, -5:] = True
    pairs = torch.rand(L, L, generator=generator) < 0.25
    pairs[4] = True
    if kind == "padding-bool":
        return padding, None
    if kind == "padding-float":  # -inf at the padding, finite offsets elsewhere
        offsets = -torch.rand(B, L, generator=generator, dtype=dtype)
        return offsets.masked_fill(padding, float("-inf")), None
    if kind == "attn-bool":
        return None, pairs
    if kind == "attn-float":  # per sample and head, (B, H, L, L): finite values and -inf at the masked pairs
        values = torch.randn(B, H, L, L, generator=generator, dtype=dtype)
        return None, values.masked_fill(pairs, float("-inf"))
    if kind == "both":  # a bool padding mask and a float mask shared by the samples, broadcast over them (1, H, L, L)
        values = torch.randn(1, H, L, L, generator=generator, dtype=dtype)
        return padding, values.masked_fill(pairs, float("-inf"))
    if kind == "all-padded":  # every key of sample 2 masked: all its rows have no key left
        padding[2] = True
        return padding, None
    raise ValueError(kind)


MASK_KINDS = ["padding-bool", "padding-float", "attn-bool", "attn-float", "both", "all-padded"]


def _run(impl: str, qkv, modules, masks, grad: bool = True):
    """The output of ``impl`` and (``grad``) the gradients of q, k, v and every table for a fixed output gradient."""
    kpm, attn_mask = masks
    with torch.set_grad_enabled(grad):
        out = irpe_attention.rpe_attention(*qkv, *modules, *GRID, impl=impl, key_padding_mask=kpm, attn_mask=attn_mask)
    if not grad:
        return out, []
    tables = [p for m in modules if m is not None for p in m.parameters()]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return out, torch.autograd.grad(out, [*qkv, *tables], grad_out)


# float64 against float64: the longest reduction behind a compared value is a table's gradient, a sum over the
# B * H * L * L logits; reduction_tol scales float64's rounding of such a sum (1e-13 here): any mask ignored or
# misplaced moves the results by O(1).
N_REDUCE = B * H * L * L


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("impl", FUSED)
def test_fused_paths_with_masks_match_math(impl, mask_kind):
    modules, masks = _modules("qkv"), _masks(mask_kind)
    qkv = _qkv()
    ref_out, ref_grads = _run("math", qkv, modules, masks)
    out, grads = _run(impl, qkv, modules, masks)
    assert torch.isfinite(ref_out).all()
    assert_close_reduction(out, ref_out, N_REDUCE)
    for g, r in zip(grads, ref_grads):
        assert_close_reduction(g, r, N_REDUCE)
    for g in grads[3:]:  # every table learns, masked or not
        assert g.abs().max() > 0


@pytest.mark.parametrize(
    "method, mode, rpe_on", [("cross", "bias", "qk"), ("euc", "ctx", "kv"), ("quant", "ctx", "q")], ids="-".join
)
@pytest.mark.parametrize("impl", FUSED)
def test_fused_paths_with_masks_match_math_other_encodings(impl, method, mode, rpe_on):
    modules, masks = _modules(rpe_on, method, mode), _masks("both")
    qkv = _qkv(seed=1)
    ref_out, ref_grads = _run("math", qkv, modules, masks)
    out, grads = _run(impl, qkv, modules, masks)
    assert_close_reduction(out, ref_out, N_REDUCE)
    for g, r in zip(grads, ref_grads):
        assert_close_reduction(g, r, N_REDUCE)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_flex_forward_with_masks_matches_math(mask_kind):
    # FlexAttention runs eagerly on CPU, forward only (no backward there), and encodes no values.
    modules, masks = _modules("qk"), _masks(mask_kind)
    qkv = [t.detach() for t in _qkv()]
    ref, _ = _run("math", qkv, modules, masks, grad=False)
    out, _ = _run("flex", qkv, modules, masks, grad=False)
    assert_close_reduction(out, ref, N_REDUCE)


def test_sdpa_path_slices_its_masks_with_the_batch_and_the_rows(monkeypatch):
    # one sample per batch slice and blocks of 5 query rows: each slice and block must take its own part of a
    # per-sample (B, H, L, L) mask and of the broadcast (B, 1, 1, L) padding
    monkeypatch.setitem(irpe_attention._FUSED_CHUNK_BYTES, "cpu", 5 * H * L * 8)
    qkv = _qkv(seed=2)
    assert len(irpe_attention._batch_chunks(qkv[0])) == B
    assert len(irpe_attention._row_blocks(qkv[0], 1, L)) == 3
    kpm, _ = _masks("padding-bool")
    _, attn_mask = _masks("attn-float")
    modules = _modules("qkv")
    ref_out, ref_grads = _run("math", qkv, modules, (kpm, attn_mask))
    out, grads = _run("sdpa", qkv, modules, (kpm, attn_mask))
    assert_close_reduction(out, ref_out, N_REDUCE)
    for g, r in zip(grads, ref_grads):
        assert_close_reduction(g, r, N_REDUCE)


@pytest.mark.parametrize("impl", ["math", "sdpa", "flex", pytest.param("ops", marks=needs_ops), "plain"])
def test_rows_with_every_key_masked_give_zeros(impl):
    # what nn.MultiheadAttention gives through PyTorch's fused attention: a zero output row and zero gradients
    modules = _modules("qk") if impl == "flex" else [None, None, None] if impl == "plain" else _modules("qkv")
    masks = _masks("all-padded")
    qkv = _qkv()
    if impl == "flex":
        qkv = [t.detach() for t in qkv]
    out, grads = _run("auto" if impl == "plain" else impl, qkv, modules, masks, grad=impl != "flex")
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[:2].abs().amax(dim=(0, 1, 3)).min() > 0  # every other row attends to something
    for g in grads[:3]:  # q, k, v of the fully masked sample get nothing
        assert torch.isfinite(g).all() and torch.equal(g[2], torch.zeros_like(g[2]))
    # query 4's keys are all masked by the attention mask, in every sample
    out, grads = _run("auto" if impl == "plain" else impl, qkv, modules, _masks("attn-bool"), grad=impl != "flex")
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    if grads:
        assert torch.equal(grads[0][:, :, 4], torch.zeros_like(grads[0][:, :, 4]))


@pytest.mark.parametrize(
    "impl, dtype",
    [
        ("math", torch.float64),
        ("sdpa", torch.float64),
        ("flex", torch.float64),
        pytest.param("ops", torch.float64, marks=needs_ops),
        pytest.param("ops", torch.float32, marks=needs_ops),
    ],
)
def test_masked_keys_contribute_nothing(impl, dtype):
    # Masked keys given other keys and huge values: a probability of even 1e-38 at a masked key (an exponential
    # clamped rather than zero) would move the output by 1e-2 through values of 1e36; an exact zero moves nothing.
    modules = _modules("qk" if impl == "flex" else "qkv", dtype=dtype)
    kpm, _ = _masks("padding-bool")
    q, k, v = (t.detach() for t in _qkv(dtype))
    k2, v2 = k.clone(), v.clone()
    padded = kpm[:, None, :, None].expand_as(k)  # (B, H, L, D)
    k2[padded] = torch.randn(int(padded.sum()), dtype=dtype) * 10
    v2[padded] = 1e36
    ref, _ = _run(impl, [q, k, v], modules, (kpm, None), grad=False)
    out, _ = _run(impl, [q, k2, v2], modules, (kpm, None), grad=False)
    torch.testing.assert_close(out, ref, **reduction_tol(dtype, L, scale=ref.abs().max().item()))


@pytest.mark.parametrize("impl", ["math", "sdpa", pytest.param("ops", marks=needs_ops)])
def test_values_bucket_sums_skip_masked_keys(impl):
    # An independent reference for the encoding on values: with q = k = 0 and v = 0 every unmasked key gets the same
    # probability, so query i's output is the mean of W_v[h, bucket(i, j)] over its unmasked keys j.
    modules = _modules("v")
    kpm, _ = _masks("padding-bool")
    qkv = [torch.zeros(B, H, L, D, dtype=torch.float64) for _ in range(3)]
    out, _ = _run(impl, qkv, modules, (kpm, None), grad=False)
    ids = modules[2].get_bucket_ids(*GRID, SKIP, torch.device("cpu"))  # (L, L)
    weight = modules[2].lookup_table_weight.detach()  # (H, nb, D)
    keep = (~kpm).double()  # (B, L)
    per_key = weight[:, ids]  # (H, L, L, D): W_v[h, bucket(i, j)]
    expected = torch.einsum("hijd,bj->bhid", per_key, keep) / keep.sum(1)[:, None, None, None]
    assert_close_reduction(out, expected, L)


def _variant_case(dtype=torch.float32):
    """A 20 x 20 grid after a class token (two blocks of queries), q, k and v encoded, a padded batch: the kernel's
    output and gradients (q, k, v, tables), and the inputs that gave them."""
    grid, batch = (20, 20), 2
    length = 1 + grid[0] * grid[1]
    modules = _modules("qkv", dtype=dtype)
    qkv = _qkv(dtype, length=length, batch=batch, seed=4)
    kpm = torch.zeros(batch, length, dtype=torch.bool)
    kpm[0, -150:] = True  # the last rows of the first sample's grid
    kpm[1, 1:60:7] = True
    tables = [p for m in modules if m is not None for p in m.parameters()]
    out = irpe_attention.rpe_attention(*qkv, *modules, *grid, impl="ops", key_padding_mask=kpm)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    results = [out.detach(), *torch.autograd.grad(out, [*qkv, *tables], grad_out)]
    return results, (qkv, modules, grid, kpm, grad_out)


def _start_variant_case(capability: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Starts _variant_case's kernel in a new process with ``ATEN_CPU_CAPABILITY=capability`` (the kernel picks its
    variant once per process); :func:`_variant_case_results` waits for its results. (This module imports no timm: a
    light process.)"""
    path = tmp_path / f"{capability}.pt"
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, "tests")
        from test_irpe_masks import _variant_case
        torch.save(_variant_case()[0], {str(path)!r})
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, path


def _variant_case_results(started: tuple[subprocess.Popen, Path]) -> list[torch.Tensor]:
    process, path = started
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return torch.load(path)


@needs_ops
def test_ops_kernel_with_padding_in_every_variant(tmp_path):
    # The CPU's best variant of the element-wise loops (x86-64-v4, v3 or baseline), then each lower variant the CPU
    # runs (ATEN_CPU_CAPABILITY; the masks' additions are element-wise loops of every variant), against the float64
    # math path.
    import rpe_ops  # noqa: PLC0415

    levels = {"x86-64-v4": ["avx2", "default"], "x86-64-v3": ["default"]}.get(rpe_ops.build_info()["cpu_isa"], [])
    lower = [_start_variant_case(level, tmp_path) for level in levels]
    results, (qkv, modules, grid, kpm, grad_out) = _variant_case()
    wide = [t.detach().double().requires_grad_() for t in qkv]
    wide_modules = [None if m is None else copy.deepcopy(m).double() for m in modules]
    ref = irpe_attention.rpe_attention(*wide, *wide_modules, *grid, impl="math", key_padding_mask=kpm)
    tables = [p for m in wide_modules if m is not None for p in m.parameters()]
    ref_results = [ref.detach(), *torch.autograd.grad(ref, [*wide, *tables], grad_out.double())]
    length = qkv[0].size(2)
    n = 2 * H * length * length  # a table's gradient sums over every logit
    for got, want in zip(results, ref_results):
        assert_close_reduction(got, want, n)
    for started in lower:
        for got, want in zip(_variant_case_results(started), ref_results):
            assert_close_reduction(got, want, n)


@needs_ops
def test_ops_kernel_mask_argument_checks_and_opcheck():
    q, k, v = (t.detach() for t in _qkv())
    weight = torch.randn(H, D, 5, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (L, L))
    mask = torch.zeros(B, 1, 1, L, dtype=torch.float64)
    mask[1, ..., -3:] = float("-inf")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), [weight], [index], [0], [], [], 0.5, mask)
    torch.library.opcheck(torch.ops.rpe_ops.rpe_attention.default, args)
    import rpe_ops  # noqa: PLC0415

    with pytest.raises(RuntimeError, match=r"additive attn_mask of the dtype of q \(Double\), got Bool"):
        rpe_ops.rpe_attention(q, k, v, [weight], [index], [False], 0.5, attn_mask=mask.isinf())
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \(B or 1, H or 1, Lq or 1, Lk\)"):
        rpe_ops.rpe_attention(q, k, v, [weight], [index], [False], 0.5, attn_mask=mask[:, 0])
    with pytest.raises(RuntimeError, match=r"attn_mask of shape"):
        rpe_ops.rpe_attention(q, k, v, [weight], [index], [False], 0.5, attn_mask=mask.expand(B, 1, 2, L))


def test_mask_errors():
    q, k, v = (t.detach() for t in _qkv())
    modules = _modules("k")
    bad = [
        (dict(key_padding_mask=torch.zeros(B, L - 1, dtype=torch.bool)), r"key_padding_mask must have shape"),
        (dict(key_padding_mask=torch.zeros(B, L, dtype=torch.int64)), r"key_padding_mask must be bool"),
        (dict(attn_mask=torch.zeros(L, L + 1, dtype=torch.bool)), r"attn_mask must have shape"),
        (dict(attn_mask=torch.zeros(B * H, L, L)), r"\(batch \* heads, queries, keys\) reshapes to the latter"),
        (dict(attn_mask=torch.zeros(B, 2 * H, L, L)), r"attn_mask must have shape"),
    ]
    for kwargs, message in bad:
        for impl in ("math", "sdpa"):
            with pytest.raises(ValueError, match=message):
                irpe_attention.rpe_attention(q, k, v, *modules, *GRID, impl=impl, **kwargs)
    with pytest.raises(ValueError, match="queries and keys must have one length"):
        irpe_attention.rpe_attention(q, k[:, :, 1:], v[:, :, 1:], *modules, *GRID)


# ----------------------------------------------------------------------------------------------------------------
# RPEMultiheadAttention


E, HEADS = 16, 4
HW = (3, 4)
S = HW[0] * HW[1]  # skip 0, as DETR's encoder


def _mha_pair(batch_first: bool, rpe_on: str = "qkv", **kwargs) -> tuple[nn.MultiheadAttention, RPEMultiheadAttention]:
    """nn.MultiheadAttention and an RPEMultiheadAttention with its weights (zero tables), float64."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # non-zero biases too
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    config = irpe.get_rpe_config(1.9, "product", "ctx", skip=0, rpe_on=rpe_on)
    rpe = RPEMultiheadAttention(E, HEADS, batch_first=batch_first, dtype=torch.float64, rpe_config=config, **kwargs)
    result = rpe.load_state_dict(mha.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in rpe.state_dict() if "lookup_table" in k)
    assert result.missing_keys and not result.unexpected_keys
    return mha, rpe


def _mha_masks(mask_dtype: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch (sample 1 misses its last row of the grid) and an attention mask in nn.MultiheadAttention's
    forms: bool (L, S), or float (batch * heads, L, S)."""
    generator = torch.Generator().manual_seed(7)
    padding = torch.zeros(batch, S, dtype=torch.bool)
    padding[1, -HW[1] :] = True
    pairs = torch.rand(S, S, generator=generator) < 0.2
    pairs.fill_diagonal_(False)  # every query keeps a key
    if mask_dtype == "bool":
        return padding, pairs
    offsets = torch.randn(batch * HEADS, S, S, generator=generator, dtype=torch.float64)
    float_padding = torch.zeros(batch, S, dtype=torch.float64).masked_fill(padding, float("-inf"))
    return float_padding, offsets.masked_fill(pairs, float("-inf"))


# float64: the outputs reduce over the keys (S) and the channels (E); rounding ~1e-15 of either
MHA_N = max(S, E)


@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_rpe_multihead_attention_with_zero_tables_equals_mha(batch_first, need_weights, mask_dtype):
    mha, rpe = _mha_pair(batch_first)
    kpm, attn_mask = _mha_masks(mask_dtype)
    x = torch.randn(2, S, E, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x = x if batch_first else x.transpose(0, 1)
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)
    ref, ref_weights = mha(x, x, x, **kwargs)
    out, weights = rpe(x, x, x, hw=HW, **kwargs)
    assert out.shape == ref.shape
    assert_close_reduction(out, ref, MHA_N)
    if need_weights:
        assert_close_reduction(weights, ref_weights, MHA_N)
    else:
        assert weights is None
    grads = torch.autograd.grad(out.square().sum(), [rpe.in_proj_weight, rpe.out_proj.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [mha.in_proj_weight, mha.out_proj.weight])
    for g, r in zip(grads, ref_grads):
        assert_close_reduction(g, r, 2 * S * S)


def test_rpe_multihead_attention_separate_inputs_per_head_weights_and_unbatched():
    # DETR's call: query and key one tensor (features + position), value another; per-head weights; one sample
    mha, rpe = _mha_pair(batch_first=False, rpe_on="k")
    kpm, attn_mask = _mha_masks("bool")
    generator = torch.Generator().manual_seed(9)
    src, pos = (torch.randn(S, 2, E, dtype=torch.float64, generator=generator) for _ in range(2))
    q = src + pos
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)
    ref, ref_weights = mha(q, q, src, **kwargs)
    out, weights = rpe(q, q, src, hw=HW, **kwargs)
    assert weights.shape == (2, HEADS, S, S)
    assert_close_reduction(out, ref, MHA_N)
    assert_close_reduction(weights, ref_weights, MHA_N)
    ref, ref_weights = mha(q[:, 1], q[:, 1], src[:, 1], key_padding_mask=kpm[1])
    out, weights = rpe(q[:, 1], q[:, 1], src[:, 1], key_padding_mask=kpm[1], hw=HW)
    assert out.shape == (S, E) and weights.shape == (S, S)
    assert_close_reduction(out, ref, MHA_N)
    assert_close_reduction(weights, ref_weights, MHA_N)


@pytest.mark.parametrize("attn_impl", ["auto", "math", *FUSED])
def test_rpe_multihead_attention_paths_agree_with_random_tables(attn_impl):
    # need_weights=True takes the explicit path; need_weights=False takes attn_impl: both compute the same function
    _, rpe = _mha_pair(batch_first=True)
    rpe.attn_impl = attn_impl
    with torch.no_grad():
        for name, p in rpe.named_parameters():
            if "lookup_table" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    kpm, attn_mask = _mha_masks("float")
    x = torch.randn(2, S, E, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    ref, weights = rpe(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, hw=HW)
    out, none = rpe(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False, hw=HW)
    assert none is None
    assert_close_reduction(out, ref, 2 * HEADS * S * S)
    assert torch.equal(weights[1, :, -HW[1] :], torch.zeros(S, HW[1], dtype=torch.float64))  # padded keys
    leaves = [rpe.in_proj_weight, *(p for n, p in rpe.named_parameters() if "lookup_table" in n)]
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for g, r in zip(grads, ref_grads):
        assert g.abs().max() > 0
        assert_close_reduction(g, r, 2 * HEADS * S * S)


@pytest.mark.parametrize("attn_impl", ["auto", pytest.param("sdpa", marks=pytest.mark.slow)])
def test_rpe_multihead_attention_compiles_with_a_padding_mask(attn_impl):
    # fullgraph through the masks' preparation and the fused path ('auto': the kernel's fake and autograd
    # registrations where it is built)
    torch._dynamo.reset()
    _, rpe = _mha_pair(batch_first=False, rpe_on="qkv")
    rpe.attn_impl = attn_impl
    kpm, _ = _mha_masks("bool")
    x = torch.randn(S, 2, E, dtype=torch.float64, requires_grad=True)

    def step(x, kpm):
        return rpe(x, x, x, key_padding_mask=kpm, need_weights=False, hw=HW)[0]

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, kpm)
    ref = step(x, kpm)
    assert_close_reduction(out, ref, MHA_N)
    grad, ref_grad = (torch.autograd.grad(y.square().sum(), x)[0] for y in (out, ref))
    assert_close_reduction(grad, ref_grad, 2 * HEADS * S * S)


def test_rpe_multihead_attention_row_with_every_key_masked():
    # zero weights and a zero attention output (the output is out_proj's bias), on both of its paths: what
    # nn.MultiheadAttention gives through its fused attention (need_weights=False while training)
    mha, rpe = _mha_pair(batch_first=True)
    padding = torch.zeros(2, S, dtype=torch.bool)
    padding[1] = True
    x = torch.randn(2, S, E, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    ref, _ = mha.train()(x, x, x, key_padding_mask=padding, need_weights=False)
    for need_weights in (True, False):
        out, weights = rpe(x, x, x, key_padding_mask=padding, need_weights=need_weights, hw=HW)
        assert_close_reduction(out, ref, MHA_N)
        assert torch.equal(out[1], rpe.out_proj.bias.detach().expand(S, E))
        if need_weights:
            assert torch.equal(weights[1], torch.zeros(S, S, dtype=torch.float64))


def test_rpe_multihead_attention_without_encodings_takes_any_lengths():
    mha, _ = _mha_pair(batch_first=True)
    plain = RPEMultiheadAttention(E, HEADS, batch_first=True, dtype=torch.float64)
    plain.load_state_dict(mha.state_dict())  # no tables: strict loading
    generator = torch.Generator().manual_seed(12)
    query, memory = torch.randn(2, 5, E, dtype=torch.float64, generator=generator), torch.randn(2, S, E).double()
    for need_weights in (True, False):
        ref, ref_weights = mha(query, memory, memory, need_weights=need_weights)
        out, weights = plain(query, memory, memory, need_weights=need_weights)
        assert_close_reduction(out, ref, MHA_N)
        if need_weights:
            assert_close_reduction(weights, ref_weights, MHA_N)


def test_rpe_multihead_attention_user_errors():
    config = irpe.get_rpe_config(1.9, "product", "ctx", skip=0, rpe_on="k")
    for kwargs, message in [
        (dict(add_bias_kv=True), "add_bias_kv or add_zero_attn"),
        (dict(add_zero_attn=True), "add_bias_kv or add_zero_attn"),
        (dict(kdim=8), r"kdim=8"),
        (dict(attn_impl="fast"), "unknown attention implementation"),
        (dict(dropout=0.1, attn_impl="sdpa"), "cannot apply attention dropout"),
    ]:
        with pytest.raises(ValueError, match=message):
            RPEMultiheadAttention(E, HEADS, rpe_config=config, **kwargs)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        RPEMultiheadAttention(10, 4)
    rpe = RPEMultiheadAttention(E, HEADS, batch_first=True, rpe_config=config)
    x, memory = torch.randn(2, S, E), torch.randn(2, S + 1, E)
    for need_weights in (True, False):
        with pytest.raises(ValueError, match="lengths must be equal|must have one length"):
            rpe(x, memory, memory, need_weights=need_weights, hw=HW)
    with pytest.raises(ValueError, match="is_causal is a hint"):
        rpe(x, x, x, is_causal=True, hw=HW)
    with pytest.raises(ValueError, match=r"3-D attn_mask must have shape \(batch \* num_heads, L, S\)"):
        rpe(x, x, x, attn_mask=torch.zeros(2, S, S, dtype=torch.bool), hw=HW)
    with pytest.raises(ValueError, match="do not match a 3x3 patch grid"):
        rpe(x, x, x, hw=(3, 3))
    with pytest.raises(ValueError, match="must all be 3-D"):
        rpe(x, x[0], x, hw=HW)


# ----------------------------------------------------------------------------------------------------------------
# RPEAttention (timm's Attention with iRPE) takes timm's attn_mask


@pytest.mark.parametrize("attn_impl", ["math", *FUSED])
def test_rpe_attention_layer_takes_timms_attn_mask(attn_impl):
    # timm's (F.scaled_dot_product_attention's) convention: a bool True takes part. Zero tables: timm's Attention.
    from timm.layers import Attention  # noqa: PLC0415  (here: the kernel tests' processes import this module)

    import rpe_vision_transformer as rvt  # noqa: PLC0415

    torch.manual_seed(0)
    dim = H * D
    config = irpe.get_rpe_config(1.9, "product", "ctx", skip=SKIP, rpe_on="qkv")
    layer = rvt.RPEAttention(dim, num_heads=H, qkv_bias=True, rpe_config=config, attn_impl=attn_impl).double()
    timm_layer = Attention(dim, num_heads=H, qkv_bias=True).double()
    timm_layer.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(B, L, dim, dtype=torch.float64)
    kpm, pairs = _masks("padding-bool")[0], _masks("attn-bool")[1]
    allowed = ~(kpm[:, None, None, :] | pairs[None, None])  # (B, 1, L, L), True: takes part
    allowed[:, :, 4, 0] = True  # every query keeps a key (timm's explicit path gives NaN otherwise)
    out = layer(x, attn_mask=allowed, height=GRID[0], width=GRID[1])
    assert_close_reduction(out, timm_layer(x, attn_mask=allowed), dim)
    float_mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():  # random tables: the float mask equals the bool one, on this path as on 'math'
        for name, p in layer.named_parameters():
            if "lookup_table" in name:
                p.normal_()
    out = layer(x, attn_mask=float_mask, height=GRID[0], width=GRID[1])
    layer.attn_impl = "math"
    assert_close_reduction(out, layer(x, attn_mask=allowed, height=GRID[0], width=GRID[1]), N_REDUCE)
    with pytest.raises(ValueError, match="no is_causal"):
        layer(x, is_causal=True, height=GRID[0], width=GRID[1])


# ----------------------------------------------------------------------------------------------------------------
# The README's DETR-style example, as written there


def _readme_detr_example():
    import torch
    from torch import nn

    import irpe
    from irpe_attention import RPEMultiheadAttention

    class EncoderLayer(nn.Module):
        """DETR's post-norm encoder layer with iRPE (contextual, product method) on the keys of its self-attention."""

        def __init__(self, d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1):
            super().__init__()
            rpe_config = irpe.get_rpe_config(ratio=1.9, method="product", mode="ctx", skip=0, rpe_on="k")
            self.self_attn = RPEMultiheadAttention(d_model, nhead, dropout=dropout, rpe_config=rpe_config)
            self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
            self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.dropout = nn.Dropout(dropout)

        def forward(self, src, pos, key_padding_mask, hw):
            # src, pos: (H * W, batch, d_model), sequence-first as in DETR; key_padding_mask: (batch, H * W)
            q = k = src + pos
            attn = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False, hw=hw)[0]
            src = self.norm1(src + self.dropout(attn))
            return self.norm2(src + self.dropout(self.linear2(self.dropout(self.linear1(src).relu()))))

    # Two images whose feature maps are 5 x 7 and 4 x 6, padded to the batch's 5 x 7 (DETR's NestedTensor).
    features = torch.randn(2, 256, 5, 7)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)  # True at padding
    mask[1, 4:, :] = True
    mask[1, :, 6:] = True
    hw = features.shape[-2:]  # the padded grid: iRPE's positions are those of the padded map
    src = features.flatten(2).permute(2, 0, 1)  # (35, 2, 256)
    pos = torch.zeros_like(src)  # DETR's sine position embedding goes here
    layer = EncoderLayer()
    out = layer(src, pos, mask.flatten(1), hw)  # (35, 2, 256)
    return layer, (src, pos, mask.flatten(1), hw), out


def test_readme_detr_example_runs_and_ignores_the_padding():
    torch.manual_seed(0)
    layer, (src, pos, padding, hw), out = _readme_detr_example()
    assert out.shape == (35, 2, 256) and torch.isfinite(out).all()
    out.square().mean().backward()  # training mode (attention dropout: the explicit path); the table learns
    assert layer.self_attn.rpe_k.lookup_table_weight.grad.abs().max() > 0
    layer.eval()  # inference: the fused path; what lies under the padding does not reach the image's tokens
    with torch.no_grad():
        ref = layer(src, pos, padding, hw)
        noisy = src.clone()
        noisy[padding.t()] = torch.randn(int(padding.sum()), 256) * 100
        out = layer(noisy, pos, padding, hw)
    valid = ~padding.t()  # (35, 2)
    assert_close_reduction(out[valid], ref[valid], 2048)
