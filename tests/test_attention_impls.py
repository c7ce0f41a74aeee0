"""Every attention implementation of the iRPE models computes the same model: logits and all gradients."""

from __future__ import annotations

import pytest
import timm
import torch

import irpe
import irpe_attention
import rpe_models  # noqa: F401  (registers the models)
import rpe_vision_transformer as rvt
from tolerances import assert_close_reduction, network_reduction_length, reduction_tol

OPS_KERNEL = irpe_attention._compiled_usable("ops", torch.device("cpu"))[0]
SMALL = dict(img_size=32, depth=2, num_classes=5)


def _model(name: str, impl: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, attn_impl=impl, **SMALL, **kwargs).double()
    with torch.no_grad():  # non-zero tables, so the encodings matter
        for pname, p in model.named_parameters():
            if "lookup_table" in pname:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(pname)))
    return model


def _logits_and_grads(model, images):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "impl",
    ["sdpa", "auto", pytest.param("ops", marks=pytest.mark.skipif(not OPS_KERNEL, reason="rpe_ops not built"))],
)
@pytest.mark.parametrize(
    "name",
    [
        "deit_tiny_patch16_224_ctx_product_50_shared_k",
        "deit_small_patch16_224_ctx_product_50_shared_qk",
        "deit_small_patch16_224_ctx_cross_56_shared_k",
        "deit_small_patch16_224_ctx_product_50_shared_qkv",
    ],
)
def test_models_agree_across_attention_impls(name, impl):
    # float64: the paths differ only in rounding, so they must agree to near machine precision.
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _model(name, impl)
    ref_logits, ref_grads = _logits_and_grads(_model(name, "math"), images)
    logits, grads = _logits_and_grads(model, images)
    # n: the model's longest reduction (fc2's 4 * embed_dim inputs) times its layers; the tables' gradients also sum
    # every (b, h, i, j) logit of a layer.
    B, L, H = images.size(0), 1 + model.patch_embed.num_patches, model.blocks[0].attn.num_heads
    assert_close_reduction(logits, ref_logits, network_reduction_length(model, L))
    assert grads.keys() == ref_grads.keys()
    # Absolute tolerance from the largest gradient: some tables' gradients are analytically zero (in the last block
    # only the class token's row matters, and it uses the one extra bucket: a shift softmax ignores).
    scale = max(g.abs().max().item() for g in ref_grads.values())
    tol = reduction_tol(torch.float64, network_reduction_length(model, B * H * L * L), scale=scale)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], **tol, msg=key)


def test_flex_model_forward_matches_math_on_cpu():
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    name = "deit_small_patch16_224_ctx_product_50_shared_qk"
    with torch.no_grad():
        ref = _model(name, "math").eval()(images)
        model = _model(name, "flex").eval()
        out = model(images)
    assert_close_reduction(out, ref, network_reduction_length(model))  # the longest reduction times the layers


def test_attention_dropout_and_explicit_paths_and_unknown_impl():
    # without iRPE, every path is PyTorch's fused attention, dropout included
    attn = rvt.RPEAttention(16, num_heads=2, attn_drop=0.1, attn_impl="sdpa")
    assert attn.attn_impl == "sdpa"
    attn.train()(torch.randn(2, 5, 16)).sum().backward()
    # with iRPE, an explicit fused path cannot apply dropout, and flex cannot encode values: errors at build time
    config = irpe.get_rpe_config(1.9, "product", "ctx", skip=1, rpe_on="qkv")
    with pytest.raises(ValueError, match=r"attn_impl='sdpa' cannot apply attention dropout \(dropout_p=0.1\)"):
        rvt.RPEAttention(16, num_heads=2, attn_drop=0.1, attn_impl="sdpa", rpe_config=config)
    with pytest.raises(ValueError, match=r"attn_impl='flex' cannot encode values"):
        rvt.RPEAttention(16, num_heads=2, attn_impl="flex", rpe_config=config)
    # auto with dropout trains on the explicit formulation
    attn = rvt.RPEAttention(16, num_heads=2, attn_drop=0.1, rpe_config=config).train()
    attn(torch.randn(2, 10, 16), height=3, width=3).sum().backward()
    with pytest.raises(ValueError, match="unknown attn_impl='fused'"):
        rvt.RPEAttention(16, num_heads=2, attn_impl="fused")
    assert rvt.ATTN_IMPLS == ("auto", "math", "sdpa", "flex", "ops", "triton")
