"""Tests of irpe.py: exact parity with the original's vectors, properties of the bucket ids, both lookup backends,
the module cache, and every user error."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import irpe
import rpe_ops
from irpe import METHOD
from tolerances import assert_close_reduction, network_reduction_length

DATA = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]

OPS = rpe_ops.serves(torch.device("cpu"), torch.float32)[0]  # compiled rpe_ops built and loaded

needs_ops = pytest.mark.skipif(not OPS, reason="rpe_ops is not built (make ops)")


def _lookups(name: str):
    """A context for the lookups named ``name``: ``'torch'`` forces the PyTorch code, ``'ops'`` leaves the compiled
    rpe_ops to serve."""
    return rpe_ops.disabled() if name == "torch" else contextlib.nullcontext()


@pytest.fixture
def backend(request):
    """Run a test on the lookups named by the parameter ('ops': skipped where rpe_ops is not built)."""
    name = request.param
    if name == "ops" and not OPS:
        pytest.skip("rpe_ops is not built")
    with _lookups(name):
        yield name


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original implementation
# ---------------------------------------------------------------------------------------------------------------


def _bucket_cases() -> list[dict]:
    return torch.load(DATA / "buckets.pt", weights_only=True)


def test_bucket_ids_match_original_exactly():
    cases = _bucket_cases()
    assert len(cases) == 450
    for case in cases:
        ids, num_buckets = irpe.get_bucket_ids_2d(
            case["method_id"], case["height"], case["width"], case["skip"], case["alpha"], case["beta"], case["gamma"]
        )
        where = f"{case['method']} ratio={case['ratio']} skip={case['skip']} grid={case['height']}x{case['width']}"
        assert num_buckets == case["num_buckets"], where
        assert ids.dtype == torch.long
        assert torch.equal(ids, case["bucket_ids"]), where
        assert (
            irpe.get_num_buckets(case["method_id"], case["alpha"], case["beta"], case["gamma"])
            == case["num_buckets_without_skip"]
        )


def test_config_num_buckets_match_original():
    names = {METHOD.EUCLIDEAN: "euc", METHOD.QUANT: "quant", METHOD.PRODUCT: "product"}
    for case in _bucket_cases():
        method = case["method_id"]
        name = names.get(method, "cross")
        config = irpe.get_rpe_config(case["ratio"], name, "ctx", skip=case["skip"])
        assert config.rpe_k.num_buckets == case["num_buckets_config"]
        assert (config.rpe_k.alpha, config.rpe_k.beta, config.rpe_k.gamma) == (
            case["alpha"],
            case["beta"],
            case["gamma"],
        )


@pytest.mark.parametrize("dtype", [torch.int32, torch.long])
def test_bucket_ids_dtype_is_the_requested_one(dtype):
    # The original returned int64 for 'quant' when asked for int32 (and its compiled op then failed).
    for method in (METHOD.EUCLIDEAN, METHOD.QUANT, METHOD.PRODUCT, METHOD.CROSS_ROWS):
        ids, _ = irpe.get_bucket_ids_2d(method, 5, 4, 1, 1.9, 3.8, 15.2, dtype=dtype)
        assert ids.dtype == dtype
        assert torch.equal(ids.long(), irpe.get_bucket_ids_2d(method, 5, 4, 1, 1.9, 3.8, 15.2)[0])


def test_piecewise_index_matches_original_exactly():
    ref = torch.load(DATA / "piecewise.pt", weights_only=True)
    x_float, x_long = ref["input_float32"], ref["input_long"]
    assert len(ref["cases"]) == 8
    for case in ref["cases"]:
        a, b, g = case["alpha"], case["beta"], case["gamma"]
        out = irpe.piecewise_index(x_float, a, b, g, torch.long)
        assert torch.equal(out, case["out_float_in_long_out"])
        assert torch.equal(irpe.piecewise_index(x_long, a, b, g, torch.long), case["out_long_in_long_out"])
        out32 = irpe.piecewise_index(x_long.int(), a, b, g, torch.int32)
        assert out32.dtype == torch.int32 and torch.equal(out32, case["out_int32_in_int32_out"])
        assert torch.equal(irpe.piecewise_index(x_float, a, b, g, torch.float32), case["out_float_in_float32_out"])


def test_piecewise_index_rounds_half_to_even_and_clips_at_int_beta():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 1000.0, -1000.0])
    out = irpe.piecewise_index(x, 3.0, 5.5, 10.0, torch.long)
    assert out.tolist() == [0, 2, 2, -2, 5, -5]


def _module_cases() -> list[dict]:
    return torch.load(DATA / "irpe_modules.pt", weights_only=True)


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
@pytest.mark.parametrize("case_id", range(28))
def test_modules_match_original(case_id, backend):
    case = _module_cases()[case_id]
    config = irpe.get_rpe_config(**case["rpe_config_args"])
    rpe_q, rpe_k, rpe_v = irpe.build_rpe(config, head_dim=case["head_dim"], num_heads=case["num_heads_attention"])
    module = {"q": rpe_q, "k": rpe_k, "v": rpe_v}[case["which"]]
    assert type(module).__name__ == case["module_class"].split(".")[-1]
    assert module.num_buckets == case["num_buckets"]
    module.load_state_dict(case["state_dict"])
    x = case["input"].clone().requires_grad_(case["input_grad"] is not None)  # (B, H, L, d), or (B, H, L, L) for v
    out = module(x, height=case["height"], width=case["width"])
    # The original's float32 results from another machine. An output reduces x's last dim (a query's d, or the keys
    # of a probability row); a table's gradient sums every (b, h, i, j) logit.
    B, H, L = x.shape[:3]
    assert_close_reduction(out, case["output"], x.size(-1))
    (out * case["grad_weights"]).sum().backward()
    for name, param in module.named_parameters():
        assert_close_reduction(param.grad, case["grads"][name], B * H * L * L, msg=name)
    if case["input_grad"] is not None:
        assert_close_reduction(x.grad, case["input_grad"], B * H * L * L)


def _reference_attention(x, qkv: nn.Linear, proj: nn.Linear, num_heads, rpe, height, width):
    """The paper's attention with iRPE, written out (the order of the original RPEAttention)."""
    B, N, C = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    scale = (C // num_heads) ** -0.5
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    rpe_q, rpe_k, rpe_v = rpe
    if rpe_k is not None:
        attn = attn + rpe_k(q, height, width)
    if rpe_q is not None:
        attn = attn + rpe_q(k * scale, height, width).transpose(2, 3)
    attn = attn.softmax(dim=-1)
    out = attn @ v
    if rpe_v is not None:
        out = out + rpe_v(attn, height, width)
    return proj(out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
@pytest.mark.parametrize(
    "name", ["extra_skip0_bias_quant_qk_nonshared_attention", "extra_skip0_ctx_product_qkv_shared_attention"]
)
def test_attention_level_vectors_skip0(name, backend):
    ref = torch.load(DATA / "attention" / f"{name}.pt", weights_only=True)
    kw = ref["model_kwargs"]
    dim, heads = kw["dim"], kw["num_heads"]
    layer = nn.Module()
    layer.qkv, layer.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    layer.rpe_q, layer.rpe_k, layer.rpe_v = irpe.build_rpe(
        irpe.get_rpe_config(**ref["rpe_config_args"]), dim // heads, heads
    )
    layer.load_state_dict(ref["state_dict"])
    x = ref["input"].clone().requires_grad_()
    rpe = (layer.rpe_q, layer.rpe_k, layer.rpe_v)
    out = _reference_attention(x, layer.qkv, layer.proj, heads, rpe, kw["grid_height"], kw["grid_width"])
    # The original's float32 results from another machine. n: the longest reduction (dim, or the L keys of a row)
    # times the two linear layers; gradients also sum every (b, h, i, j) logit.
    B, L = x.shape[:2]
    assert_close_reduction(out, ref["output"], network_reduction_length(layer, L))
    (out * ref["grad_weights"]).sum().backward()
    params = dict(layer.named_parameters())
    assert set(ref["grads"]) <= set(params)
    n_grad = network_reduction_length(layer, B * heads * L * L)
    for key, grad in ref["grads"].items():
        assert_close_reduction(params[key].grad, grad, n_grad, msg=key)
    assert_close_reduction(x.grad, ref["input_grad"], n_grad)


# ---------------------------------------------------------------------------------------------------------------
# Properties of the bucket ids
# ---------------------------------------------------------------------------------------------------------------

GRIDS = [(1, 1), (1, 7), (7, 1), (2, 3), (14, 14), (24, 10)]
METHODS = [METHOD.EUCLIDEAN, METHOD.QUANT, METHOD.PRODUCT, METHOD.CROSS_ROWS, METHOD.CROSS_COLS]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("skip", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.5, 1.9, 20])
def test_bucket_id_properties(grid, method, skip, ratio):
    height, width = grid
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    ids, num_buckets = irpe.get_bucket_ids_2d(method, height, width, skip, alpha, beta, gamma)
    L = skip + height * width
    assert ids.shape == (L, L)
    assert num_buckets == irpe.get_num_buckets(method, alpha, beta, gamma) + (skip > 0)
    assert ids.min() >= 0 and ids.max() < num_buckets
    if skip:
        extra = num_buckets - 1
        assert (ids[:skip] == extra).all() and (ids[:, :skip] == extra).all()
        assert not (ids[skip:, skip:] == extra).any()  # the extra bucket is used by skip pairs only
    grid_ids = ids[skip:, skip:]
    # The zero offset sits in the middle bucket. Distance methods give an offset and its opposite the same bucket;
    # signed methods mirror them around the middle.
    center = (num_buckets - (skip > 0) - 1) // 2
    assert (grid_ids.diagonal() == center).all()
    if method in (METHOD.EUCLIDEAN, METHOD.QUANT):
        assert torch.equal(grid_ids, grid_ids.T) and (grid_ids >= center).all()
    else:
        assert torch.equal(grid_ids + grid_ids.T, torch.full_like(grid_ids, 2 * center))


@pytest.mark.parametrize("grid", GRIDS)
def test_cross_is_rows_plus_cols(grid):
    height, width = grid
    config = irpe.get_rpe_config(1.9, "cross", "ctx", skip=1, rpe_on="k")
    _, rpe_k, _ = irpe.build_rpe(config, head_dim=4, num_heads=2)
    assert isinstance(rpe_k, irpe.iRPE_Cross)
    for part in (rpe_k.rp_rows, rpe_k.rp_cols):
        nn.init.normal_(part.lookup_table_weight)
    x = torch.randn(2, 2, 1 + height * width, 4)
    expected = rpe_k.rp_rows(x, height, width) + rpe_k.rp_cols(x, height, width)
    assert_close_reduction(rpe_k(x, height, width), expected, x.size(-1))  # each table's term reduces over d
    rows, _ = irpe.get_bucket_ids_2d(METHOD.CROSS_ROWS, height, width, 1, 1.9, 3.8, 15.2)
    cols, _ = irpe.get_bucket_ids_2d(METHOD.CROSS_COLS, height, width, 1, 1.9, 3.8, 15.2)
    # Row offsets do not depend on the column, and vice versa.
    r = torch.arange(height).repeat_interleave(width)
    c = torch.arange(width).repeat(height)
    same_row = r[:, None] == r[None, :]
    same_col = c[:, None] == c[None, :]
    assert (rows[1:, 1:][same_row] == 3).all() and (cols[1:, 1:][same_col] == 3).all()


def test_product_ids_decompose_into_rows_and_cols():
    ids, nb = irpe.get_bucket_ids_2d(METHOD.PRODUCT, 9, 6, 0, 1.9, 3.8, 15.2)
    rows, _ = irpe.get_bucket_ids_2d(METHOD.CROSS_ROWS, 9, 6, 0, 1.9, 3.8, 15.2)
    cols, side = irpe.get_bucket_ids_2d(METHOD.CROSS_COLS, 9, 6, 0, 1.9, 3.8, 15.2)
    assert nb == side * side
    assert torch.equal(ids, rows * side + cols)


def test_quantize_values():
    values = torch.tensor([[5, 2, 5], [9, 2, 0]])
    ids, count = irpe.quantize_values(values)
    assert count == 4
    assert ids.tolist() == [[2, 1, 2], [3, 1, 0]]
    assert ids.dtype == values.dtype


def test_absolute_positions():
    pos = irpe.get_absolute_positions(2, 3, torch.long, "cpu")
    assert pos.shape == (2, 3, 2)
    assert pos[1, 2].tolist() == [1, 2] and pos[0, 1].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# The lookup primitives: semantics, adjointness, both backends
# ---------------------------------------------------------------------------------------------------------------


def _random_case(B=2, H=3, Lq=7, Lk=5, nb=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(B, H, Lq, nb, generator=g, dtype=dtype)
    index = torch.randint(0, nb, (Lq, Lk), generator=g)
    values = torch.randn(B, H, Lq, Lk, generator=g, dtype=dtype)
    return table, index, values


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_rpe_index_semantics(backend, index_dtype):
    table, index, _ = _random_case()
    out = irpe.rpe_index(table, index.to(index_dtype))
    B, H, Lq, _ = table.shape
    for i in range(Lq):
        for j in range(index.size(1)):
            assert torch.equal(out[:, :, i, j], table[:, :, i, index[i, j]])


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
def test_rpe_bucket_sum_is_the_adjoint(backend):
    table, index, values = _random_case()
    nb = table.size(-1)
    sums = irpe.rpe_bucket_sum(values, index, nb)
    # <rpe_index(T), V> == <T, bucket_sum(V)>
    lhs = (irpe.rpe_index(table, index) * values).sum()
    rhs = (table * sums).sum()
    assert_close_reduction(lhs, rhs, values.numel())  # float64 sums over every (b, h, i, j)
    onehot = nn.functional.one_hot(index, nb).to(values.dtype)  # (Lq, Lk, nb)
    assert_close_reduction(sums, torch.einsum("bhij,ijk->bhik", values, onehot), index.size(1))  # a row's Lk keys


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
def test_lookups_gradcheck(backend):
    table, index, values = _random_case(B=1, H=2, Lq=4, Lk=3, nb=3)
    table.requires_grad_()
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: irpe.rpe_index(t, index), (table,))
    assert torch.autograd.gradcheck(lambda v: irpe.rpe_bucket_sum(v, index, 3), (values,))
    assert torch.autograd.gradgradcheck(lambda t: irpe.rpe_index(t, index), (table,))


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rpe_on", ["q", "k", "v"])
@pytest.mark.parametrize("mode", ["ctx", "bias"])
@pytest.mark.parametrize("method", ["euc", "quant", "cross", "product"])
def test_backends_agree(dtype, rpe_on, mode, method):
    if mode == "bias" and rpe_on == "v":
        pytest.skip("no bias mode on values")
    config = irpe.get_rpe_config(1.9, method, mode, shared_head=False, skip=1, rpe_on=rpe_on)
    module = [m for m in irpe.build_rpe(config, head_dim=8, num_heads=3) if m is not None][0].to(dtype)
    for p in module.parameters():
        nn.init.normal_(p)
    L = 1 + 5 * 4
    x = torch.randn(2, 3, L, L if rpe_on == "v" else 8, dtype=dtype, requires_grad=True)
    results = []
    for name in ("torch", "ops"):
        with _lookups(name):
            out = module(x, height=5, width=4)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), [x, *module.parameters()], allow_unused=True)
        results.append((out, grads))
    (out_t, grads_t), (out_o, grads_o) = results
    # An output reduces x's last dim (d, or the L keys for values); a table's gradient sums every (b, h, i, j).
    assert_close_reduction(out_o, out_t, x.size(-1))
    for g_o, g_t in zip(grads_o, grads_t):
        if g_t is None:
            assert g_o is None
        else:
            assert_close_reduction(g_o, g_t, 2 * 3 * L * L)


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
def test_values_path_equals_materialised_table(backend):
    config = irpe.get_rpe_config(1.9, "product", "ctx", shared_head=False, skip=1, rpe_on="v")
    _, _, rpe_v = irpe.build_rpe(config, head_dim=8, num_heads=2)
    nn.init.normal_(rpe_v.lookup_table_weight)
    L = 1 + 4 * 4
    attn = torch.softmax(torch.randn(3, 2, L, L), dim=-1)
    ids, _ = irpe.get_bucket_ids_2d(METHOD.PRODUCT, 4, 4, 1, 1.9, 3.8, 15.2)
    table = rpe_v.lookup_table_weight[:, ids]  # (H, L, L, d): what the original materialises
    expected = torch.einsum("bhij,hijd->bhid", attn, table)
    assert_close_reduction(rpe_v(attn, 4, 4), expected, L)  # a row's L keys


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
def test_bias_mode_has_batch_dim_one_and_gradients(backend):
    config = irpe.get_rpe_config(1.9, "euc", "bias", shared_head=True, skip=1, rpe_on="k")
    _, rpe_k, _ = irpe.build_rpe(config, head_dim=8, num_heads=4)
    nn.init.normal_(rpe_k.lookup_table_bias)
    out = rpe_k(torch.randn(5, 4, 10, 8), 3, 3)
    assert out.shape == (1, 1, 10, 10)
    out.sum().backward()
    counts = torch.bincount(rpe_k.get_bucket_ids(3, 3, 1, torch.device("cpu")).flatten(), minlength=rpe_k.num_buckets)
    # sums of ones: exact in float32 (far below 2**24)
    torch.testing.assert_close(rpe_k.lookup_table_bias.grad[0], counts.float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "ops"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bucket_sum_accumulates_half_types_in_float32(backend, dtype, device):
    # 1000 ones into one bucket: accumulating in bfloat16 (as CUDA's scatter_add atomics would) stalls at 256.
    # Both backends accumulate in float32 and round once.
    values = torch.ones(1, 1, 1, 1000, dtype=dtype, device=device)
    index = torch.zeros(1, 1000, dtype=torch.long, device=device)
    served, why = rpe_ops.serves(values.device, dtype)
    assert served == (backend == "ops"), why
    sums = irpe.rpe_bucket_sum(values, index, 2)
    assert sums.dtype == dtype
    assert sums[0, 0, 0].tolist() == [1000.0, 0.0]
    values = torch.full((1, 1, 1, 3000), 1.0 + 2**-7, dtype=dtype, device=device)  # exact in both half types
    expected = torch.tensor(3000 * (1.0 + 2**-7)).to(dtype)
    assert irpe.rpe_bucket_sum(values, index.new_zeros(1, 3000), 1).item() == expected.item()


# ---------------------------------------------------------------------------------------------------------------
# Modules: grid handling and the bucket-id cache
# ---------------------------------------------------------------------------------------------------------------


def _module(rpe_on="k", skip=1, method="product", mode="ctx"):
    config = irpe.get_rpe_config(1.9, method, mode, shared_head=True, skip=skip, rpe_on=rpe_on)
    return [m for m in irpe.build_rpe(config, head_dim=8, num_heads=2) if m is not None][0]


def test_square_grid_is_inferred_for_the_configured_skip():
    module = _module(skip=1)
    out = module(torch.randn(1, 2, 1 + 36, 8))
    assert out.shape == (1, 2, 37, 37)
    assert (
        module.get_bucket_ids(6, 6, 1, torch.device("cpu"))
        is irpe._shared_bucket_ids(METHOD.PRODUCT, 6, 6, 1, 1.9, 3.8, 15.2, torch.device("cpu"))[0]
    )


@pytest.mark.parametrize("length", [29, 30, 1 + 35])
def test_non_square_without_grid_is_an_error(length):
    module = _module(skip=1)
    with pytest.raises(ValueError, match="not a perfect square; pass height= and width="):
        module(torch.randn(1, 2, length, 8))


def test_non_square_grids_and_changing_resolution():
    module = _module(skip=1)
    nn.init.normal_(module.lookup_table_weight)
    for height, width in [(7, 4), (4, 7), (6, 8), (1, 1), (24, 10), (7, 4)]:
        x = torch.randn(2, 2, 1 + height * width, 8)
        out = module(x, height=height, width=width)
        ids, _ = irpe.get_bucket_ids_2d(METHOD.PRODUCT, height, width, 1, 1.9, 3.8, 15.2)
        table = x @ module.lookup_table_weight
        assert_close_reduction(out, torch.gather(table, 3, ids.expand(2, 2, -1, -1)), x.size(-1))  # q . r over d


def test_grid_that_does_not_match_the_length_is_an_error():
    module = _module(skip=1)
    # 56x32 image, 16px patches: 3x2 grid; 29 tokens would be a 7x4 grid plus a class token.
    with pytest.raises(ValueError, match="do not match a 5x5 patch grid"):
        module(torch.randn(1, 2, 29, 8), height=5, width=5)
    with pytest.raises(ValueError, match="after skip=1 leading token"):
        module(torch.randn(1, 2, 28, 8), height=7, width=4)  # no class token, but the config has one
    with pytest.raises(ValueError, match="after skip=1 leading token"):
        module(torch.randn(1, 2, 30, 8), height=7, width=4)  # two leading tokens, but the config has one
    with pytest.raises(ValueError, match="pass both height and width"):
        module(torch.randn(1, 2, 29, 8), height=7)
    with pytest.raises(ValueError, match="positive integers"):
        module(torch.randn(1, 2, 29, 8), height=0, width=4)
    skip0 = _module(skip=0)
    with pytest.raises(ValueError, match="after skip=0 leading token"):
        skip0(torch.randn(1, 2, 29, 8), height=7, width=4)


def test_bucket_ids_are_cached_not_persistent_and_follow_to():
    module = _module(skip=1)
    ids = module.get_bucket_ids(3, 3, 1, torch.device("cpu"))
    module(torch.randn(1, 2, 1 + 9, 8))
    assert module.get_bucket_ids(3, 3, 1, torch.device("cpu")) is ids  # computed once per grid, not per call
    assert module.get_bucket_ids(4, 4, 1, torch.device("cpu")).shape == (17, 17)
    assert set(module.state_dict()) == {"lookup_table_weight"}
    module.double()
    assert module(torch.randn(1, 2, 1 + 9, 8, dtype=torch.float64)).dtype == torch.float64
    module.to("meta")  # the ids of the device the module runs on
    assert module(torch.randn(1, 2, 1 + 9, 8, device="meta", dtype=torch.float64)).device.type == "meta"


def test_modules_with_one_config_share_their_ids_outside_inference_mode():
    # Every layer's encodings on queries, keys and values with one config hold one ids tensor (the fused CPU kernel
    # then prepares it once per call); another method gets its own. Ids first built under inference_mode are normal
    # tensors: a model trained afterwards saves them for backward.
    device = torch.device("cpu")
    with torch.inference_mode():
        first = _module("k").get_bucket_ids(5, 6, 1, device)
    assert not first.is_inference()
    for rpe_on in ("q", "k", "v"):
        assert _module(rpe_on).get_bucket_ids(5, 6, 1, device) is first
    assert _module("k", method="euc").get_bucket_ids(5, 6, 1, device) is not first
    assert _module("k").get_bucket_ids(6, 5, 1, device) is not first
    module = _module("k")
    x = torch.randn(1, 2, 31, 8, requires_grad=True)
    module(x, height=5, width=6).sum().backward()
    assert x.grad is not None


def test_two_leading_tokens_share_the_extra_bucket():
    # A distilled model has a class and a distillation token: both use the one extra bucket.
    module = _module(skip=2)
    assert module.num_buckets == _module(skip=1).num_buckets
    out = module(torch.randn(1, 2, 2 + 9, 8), height=3, width=3)
    assert out.shape == (1, 2, 11, 11)
    ids = module.get_bucket_ids(3, 3, 2, torch.device("cpu"))
    assert (ids[:2] == module.num_buckets - 1).all()


def test_modules_start_at_zero_and_repr():
    for rpe_on in "qkv":
        module = _module(rpe_on=rpe_on)
        assert all((p == 0).all() for p in module.parameters())
    text = repr(_module())
    assert "method=PRODUCT" in text and "num_buckets=50" in text


def test_build_rpe_shapes_and_none():
    assert irpe.build_rpe(None, 8, 2) == [None, None, None]
    config = irpe.get_rpe_config(1.9, "product", "ctx", shared_head=False, skip=1, rpe_on="qkv")
    q, k, v = irpe.build_rpe(config, head_dim=16, num_heads=3)
    assert q.lookup_table_weight.shape == (3, 16, 50)
    assert k.lookup_table_weight.shape == (3, 16, 50)
    assert v.lookup_table_weight.shape == (3, 50, 16)
    bias = irpe.get_rpe_config(2.0, "quant", "bias", shared_head=True, skip=0, rpe_on="qk")
    q, k, v = irpe.build_rpe(bias, head_dim=16, num_heads=3)
    assert q.lookup_table_bias.shape == (1, 9) and v is None
    assert irpe.build_rpe(irpe.get_rpe_config(mode=None, rpe_on="qkv"), 8, 2) == [None, None, None]


def test_config_objects():
    config = irpe.get_rpe_config(ratio=20, method=METHOD.EUCLIDEAN, mode="contextual", skip=1, rpe_on="kv")
    assert config.rpe_q is None and config.rpe_k == config.rpe_v
    k = config.rpe_k
    assert (k.alpha, k.beta, k.gamma, k.num_buckets, k.method, k.mode, k.shared_head) == (
        20,
        40,
        160,
        82,
        METHOD.EUCLIDEAN,
        "contextual",
        True,
    )
    with pytest.raises(AttributeError):
        k.alpha = 3  # frozen
    for alias, method in [("euc", 0), ("QUANT", 1), ("cross", 4), ("product", 3), (3, 3)]:
        assert irpe.get_rpe_config(method=alias).rpe_k.method == method


@pytest.mark.parametrize("torch_compile_backend", ["eager", "inductor"])
def test_compile_fullgraph_through_modules(torch_compile_backend):
    torch._dynamo.reset()
    config = irpe.get_rpe_config(1.9, "product", "ctx", skip=1, rpe_on="kv")
    _, rpe_k, rpe_v = irpe.build_rpe(config, head_dim=8, num_heads=2)
    nn.init.normal_(rpe_k.lookup_table_weight)
    nn.init.normal_(rpe_v.lookup_table_weight)

    def step(q, attn):
        return rpe_k(q, 3, 3).square().sum() + rpe_v(attn, 3, 3).square().sum()

    q = torch.randn(2, 2, 10, 8)
    attn = torch.softmax(torch.randn(2, 2, 10, 10), -1)
    compiled = torch.compile(step, fullgraph=True, backend=torch_compile_backend)
    for _ in range(2):  # the longest reduction: the sums over every (b, h, i, j) of a term
        assert_close_reduction(compiled(q, attn), step(q, attn), attn.numel())


# ---------------------------------------------------------------------------------------------------------------
# User errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="hamming"), r"unknown method 'hamming'; expected one of \['cross', 'euc', 'product', 'quant'\]"),
        (dict(method=7), r"unknown method 7; expected one of"),
        (dict(mode="additive"), r"unknown mode 'additive'; expected one of 'bias', 'contextual', 'ctx' or None"),
        (dict(rpe_on="kx"), r"rpe_on must combine the letters 'q', 'k' and 'v' .* got 'kx'"),
        (dict(rpe_on=["k"]), r"rpe_on must combine the letters"),
        (dict(mode="bias", rpe_on="qkv"), r"bias mode has no encoding on values \(rpe_on='qkv'\)"),
        (dict(ratio=0), r"ratio must be a positive number, got 0"),
        (dict(ratio=-1.9), r"ratio must be a positive number, got -1.9"),
        (dict(ratio="1.9"), r"ratio must be a positive number, got '1.9'"),
        (dict(skip=-1), r"skip must be a non-negative integer .* got -1"),
        (dict(skip=1.5), r"skip must be a non-negative integer .* got 1.5"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        irpe.get_rpe_config(**kwargs)


def test_module_and_function_errors():
    config = irpe.get_rpe_config(1.9, "product", "ctx", skip=1).rpe_k
    with pytest.raises(ValueError, match="bias mode has no encoding on values"):
        irpe.iRPE(8, 1, mode="bias", method=METHOD.PRODUCT, transposed=False, num_buckets=50, rpe_config=config)
    with pytest.raises(ValueError, match="use iRPE_Cross for METHOD.CROSS"):
        irpe.iRPE(8, 1, mode="contextual", method=METHOD.CROSS, num_buckets=50, rpe_config=config)
    with pytest.raises(ValueError, match="needs mode 'bias' or 'contextual'"):
        irpe.iRPE(8, 1, mode=None, method=METHOD.PRODUCT, num_buckets=50, rpe_config=config)
    with pytest.raises(ValueError, match="iRPE_Cross implements METHOD.CROSS"):
        irpe.iRPE_Cross(METHOD.PRODUCT, head_dim=8, num_heads=1, mode="contextual", num_buckets=50, rpe_config=config)
    with pytest.raises(ValueError, match="skip must be >= 0"):
        irpe.get_bucket_ids_2d(METHOD.PRODUCT, 3, 3, -1, 1.9, 3.8, 15.2)
    with pytest.raises(ValueError, match="METHOD.CROSS has two tables"):
        irpe.get_bucket_ids_2d(METHOD.CROSS, 3, 3, 0, 1.9, 3.8, 15.2)
    with pytest.raises(ValueError, match="unknown method id 9"):
        irpe.get_bucket_ids_2d(9, 3, 3, 0, 1.9, 3.8, 15.2)
    with pytest.raises(ValueError, match="the values encoding takes attention"):
        _module(rpe_on="v")(torch.randn(1, 2, 10, 8), 3, 3)
    table, index, values = _random_case()
    with pytest.raises(ValueError, match="input has Lq=7 rows but the index has 6"):
        irpe.rpe_index(table, index[:6])
    with pytest.raises(ValueError, match="expected a 4D input"):
        irpe.rpe_index(table[0], index)
    with pytest.raises(ValueError, match="the index must be int64 or int32"):
        irpe.rpe_index(table, index.float())
    with pytest.raises(ValueError, match="values have Lk=5 columns but the index has 4"):
        irpe.rpe_bucket_sum(values, index[:, :4], 4)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, timeout=120
    )


def test_irpe_works_without_rpe_ops():
    # rpe_ops made unimportable (None in sys.modules), as where irpe.py is copied into a project without it
    code = "import sys, runpy; sys.modules['rpe_ops'] = None; runpy.run_module('irpe', run_name='__main__')\n"
    code += (
        "import irpe, torch; print(irpe.rpe_index(torch.zeros(1, 1, 2, 3), torch.zeros(2, 2, dtype=torch.long)).shape)"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "rpe_ops is not importable: PyTorch serves every lookup",
        "torch.Size([1, 1, 2, 2])",
    ]


def test_python_m_irpe_reports_the_backend():
    result = subprocess.run([sys.executable, "-m", "irpe"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "iRPE lookups: compiled rpe_ops where they serve the tensor, PyTorch otherwise" in result.stdout
    lines = result.stdout.splitlines()
    cpu = next(line for line in lines if line.strip().startswith("cpu"))
    assert ("rpe_ops (compiled CPU kernels)" in cpu) == OPS
    assert any(line.strip().startswith("cuda") for line in lines)
