"""The registered iRPE models and the VisionTransformer itself, against timm's own DeiT baselines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import DropPath

import irpe
import rpe_models
from rpe_vision_transformer import DistilledVisionTransformer, RPEAttention, VisionTransformer
from tolerances import assert_close_reduction, network_reduction_length, reduction_tol

REFERENCE_PARAMS = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "params.txt"
# Total parameters of the nine models at 224 with 1000 classes (the original's counts, reference/params.txt).
PARAMS = {
    "deit_tiny_patch16_224_ctx_product_50_shared_k": 5755816,
    "deit_small_patch16_224_ctx_euc_20_shared_k": 22113640,
    "deit_small_patch16_224_ctx_quant_51_shared_k": 22153576,
    "deit_small_patch16_224_ctx_cross_56_shared_k": 22176616,
    "deit_small_patch16_224_ctx_product_50_shared_k": 22089064,
    "deit_small_patch16_224_ctx_product_50_shared_qk": 22127464,
    "deit_small_patch16_224_ctx_product_50_shared_qkv": 22165864,
    "deit_base_patch16_224_ctx_product_50_shared_k": 86606056,
    "deit_base_patch16_224_ctx_product_50_shared_qkv": 86682856,
    "deit_tiny_patch16_224": 5717416,
    "deit_small_patch16_224": 22050664,
    "deit_base_patch16_224": 86567656,
}
IRPE_NAMES = list(rpe_models.MODEL_ZOO)
# timm's DeiT release models (tiny/small/base at 224, base at 384, plain and distilled): the plain baselines that our
# VisionTransformer (rpe_config=None) reproduces.
BASELINE_NAMES = [name for name in timm.list_models("deit_*") if name not in rpe_models.MODEL_ZOO]
SMALL_CFG = {"ratio": 1.9, "method": "product", "mode": "ctx", "shared_head": True, "skip": 1, "rpe_on": "qkv"}


def _small_model(**kwargs) -> VisionTransformer:
    """A two-block iRPE model that runs in milliseconds."""
    args = {"img_size": 32, "patch_size": 8, "num_classes": 5, "embed_dim": 32, "depth": 2, "num_heads": 2}
    args.setdefault("rpe_config", irpe.get_rpe_config(**SMALL_CFG))
    args.update(kwargs)
    return VisionTransformer(qkv_bias=True, **args)


def _baseline(name: str, **kwargs) -> VisionTransformer:
    """Our VisionTransformer without iRPE, built as timm's DeiT ``name``."""
    size = next(size for size in rpe_models.DEIT_ARCHS if f"_{size}_" in name)
    args = {"img_size": 384 if name.endswith("384") else 224, "distilled": "distilled" in name}
    return VisionTransformer(**{**rpe_models.DEIT_ARCHS[size], **args, **kwargs})


def _fill_tables(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.copy_(torch.randn(p.shape, generator=generator))


def test_params_reference_table_is_ours() -> None:
    if not REFERENCE_PARAMS.is_file():
        pytest.skip("../shared/reference is absent")
    for line in REFERENCE_PARAMS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, total = line.split("\t")[:2]
            name = name.split(" ")[0].removeprefix("timm:")
            assert PARAMS[name] == int(total), name


@pytest.mark.parametrize(
    "name", IRPE_NAMES + ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
)
def test_param_count(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_registered_with_timm() -> None:
    assert set(timm.list_models(module="rpe_models")) == set(IRPE_NAMES)  # (tools may register variants of theirs)
    released = {name for name, entry in rpe_models.MODEL_ZOO.items() if entry.released}
    assert set(timm.list_pretrained("*ctx*")) == released
    for name in IRPE_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.url == (
            rpe_models.checkpoint_location(name, rpe_models.MODEL_ZOO_URL) if name in released else ""
        )
    # timm's own DeiT names are left alone
    assert timm.models.model_entrypoint("deit_tiny_patch16_224").__module__.startswith("timm.")


@pytest.mark.parametrize("name", IRPE_NAMES)
def test_build_forward_backward(name: str) -> None:
    """Each model at a 32x32 input (2x2 grid), cut to 2 blocks: a training step reaches every parameter.

    The full-size builds are checked on the meta device (test_param_count, test_baselines_match_timm_layout).
    """
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "num_classes": 3, "drop_path_rate": 0.1, "depth": 2}
    model = timm.create_model(name, **kwargs)
    drop_paths = [m for m in model.modules() if isinstance(m, DropPath)]
    # drop_path_rate reached the blocks (timm spaces the rates with a float32 linspace: 0.1 rounded to float32)
    assert [m.drop_prob for m in drop_paths][-1] == pytest.approx(0.1, rel=torch.finfo(torch.float32).eps)
    for m in drop_paths:
        m.drop_prob = 0.0  # a dropped branch would get no gradient: keep the step deterministic
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == 1
    assert all(o.shape == (2, 3) for o in outs)
    sum(o.square().sum() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name", IRPE_NAMES)
def test_zero_tables_equal_plain_deit(name: str) -> None:
    """Lookup tables start at zero, so a fresh iRPE model computes exactly its plain DeiT."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=4, depth=2).eval()  # 2 blocks: same iRPE, faster
    tables = {n: p for n, p in model.named_parameters() if "lookup_table" in n}
    assert tables and all(not p.any() for p in tables.values())
    plain = timm.create_model(
        f"deit_{rpe_models.MODEL_ZOO[name].size}_patch16_224", img_size=32, num_classes=4, depth=2
    )
    plain.eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in tables}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # the iRPE attention path and timm's sum in other orders: n is the longest reduction times the layers
        expected = plain(x)
        tol = reduction_tol(torch.float32, network_reduction_length(model), scale=expected.abs().max().item())
        torch.testing.assert_close(model(x), expected, **tol)
        _fill_tables(model)
        assert (model(x) - expected).abs().max() > 10 * tol["atol"]  # and the tables do act once trained


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_baseline_equals_timm_deit(name: str) -> None:
    """Without iRPE ours takes timm's DeiT state dict (the DeiT release's layout) strictly and agrees with it."""
    torch.manual_seed(0)
    theirs = timm.create_model(name, img_size=32, num_classes=6, depth=2).eval()
    ours = _baseline(name, img_size=32, num_classes=6, depth=2).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # other attention kernels: n is the longest reduction times the layers
        assert_close_reduction(ours(x), theirs(x), network_reduction_length(ours))


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baselines_match_timm_layout(name: str) -> None:
    """Full size, on the meta device: the same keys and shapes as timm's DeiT, i.e. as the DeiT release."""
    with torch.device("meta"):
        ours = _baseline(name).state_dict()
        theirs = timm.create_model(name).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, theirs[k].shape) for k in ours]
    assert set(ours) == set(theirs)


def test_distilled_train_and_eval_outputs() -> None:
    """timm's distilled DeiT: (logits, logits_dist) in training after set_distilled_training(True), else their mean."""
    config = irpe.get_rpe_config(**{**SMALL_CFG, "skip": 2})
    model = _small_model(depth=1, rpe_config=config, distilled=True)
    assert isinstance(model, DistilledVisionTransformer) and model.num_prefix_tokens == 2
    assert {"pos_embed", "cls_token", "dist_token"} <= model.no_weight_decay()
    _fill_tables(model)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert model(x).shape == (2, 5)
    model.set_distilled_training(True)
    logits, logits_dist = model(x)
    model.eval()
    with torch.no_grad():  # the same network, with and without autograd: n is the longest reduction times the layers
        assert_close_reduction(model(x), (logits + logits_dist).detach() / 2, network_reduction_length(model))
    with pytest.raises(ValueError, match="always distilled"):
        DistilledVisionTransformer(distilled=False)


def test_no_weight_decay_and_classifier_reset() -> None:
    model = _small_model()
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    assert not any("lookup_table" in name for name in model.no_weight_decay())  # the tables decay, as in iRPE
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    model.reset_classifier(0, "")  # no pooling: every token
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1 + 16, 32)


def test_non_square_image() -> None:
    """A 64x48 image is an 8x6 grid: the iRPE bucket ids follow it (not a guessed square)."""
    torch.manual_seed(0)
    model = _small_model(img_size=(64, 48)).eval()
    assert model.patch_grid == (8, 6) and model.pos_embed.shape == (1, 1 + 48, 32)
    _fill_tables(model)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5)
        # the same tokens on the transposed grid give other encodings: the grid is really used
        tokens = torch.randn(2, 1 + 48, 32)
        attn = model.blocks[0].attn
        wide, tall = attn(tokens, height=8, width=6), attn(tokens, height=6, width=8)
        # apart by far more than rounding: n is the longest reduction (the 49 keys of a row) times qkv and proj
        tol = reduction_tol(torch.float32, network_reduction_length(attn, 1 + 48), scale=wide.abs().max().item())
        assert (wide - tall).abs().max() > 10 * tol["atol"]
    with pytest.raises(ValueError, match="patch grid"):
        attn(tokens, height=7, width=7)  # 49 tokens would leave no class token: an error, not a guess


def test_other_resolution_resamples_pos_embed() -> None:
    torch.manual_seed(0)
    model = _small_model().eval()
    _fill_tables(model)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 40)).shape == (2, 5)  # 6x5 grid, pos_embed resampled from 4x4
        x = torch.randn(1, 3, 32, 32)
        # the cached ids of the first grid serve again (a BLAS may sum in another order for another alignment)
        assert_close_reduction(model(x), model(x), network_reduction_length(model))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))


def test_user_errors() -> None:
    with pytest.raises(ValueError, match="skip"):
        _small_model(rpe_config=irpe.get_rpe_config(**{**SMALL_CFG, "skip": 0}))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        RPEAttention(dim=10, num_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        RPEAttention(dim=8, num_heads=2, attn_impl="flash")
    with pytest.raises(ValueError, match="rpe_config"):
        rpe_models.create_irpe_deit(IRPE_NAMES[0], rpe_config=None)
    # a distilled model has two prefix tokens: skip=1 is refused when it is built, not at its first forward
    with pytest.raises(ValueError, match=r"skip=1, but the model has 2 prefix token"):
        _small_model(distilled=True)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        _small_model(patch_drop_rate=0.1)
    with pytest.raises(ValueError, match="attn_mask"):
        _small_model().forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(17, 17))


def test_state_dict_has_no_bucket_caches() -> None:
    model = _small_model()
    model(torch.randn(1, 3, 32, 32))
    assert all("lookup_table" in k or "rpe" not in k for k in model.state_dict())


def test_compile_matches_eager() -> None:
    torch.manual_seed(0)
    model = _small_model(depth=1).eval()
    _fill_tables(model)
    x = torch.randn(2, 3, 32, 32)
    start = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True)  # no graph break: bucket ids and lookups trace
    with torch.no_grad():  # inductor fuses and reorders: n is the longest reduction times the layers
        assert_close_reduction(compiled(x), model(x), network_reduction_length(model))
    assert time.perf_counter() - start < 120


@pytest.mark.parametrize("attn_impl", ["auto", "math"])
def test_compiled_training_step_matches_eager(attn_impl) -> None:
    # What `main.py --compile` runs: inductor over forward and backward, through the fused kernel's fake
    # implementations (their output layouts must be the real ones') on CPU when rpe_ops is built.
    torch.manual_seed(0)
    model = _small_model(depth=1, attn_impl=attn_impl, rpe_config=irpe.get_rpe_config(**{**SMALL_CFG, "rpe_on": "qk"}))
    _fill_tables(model)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref_out, ref_grads), (out, compiled_grads) = grads
    # inductor fuses and reorders: n is the longest reduction times the layers, for gradients with the B * H * L * L
    # logits a table's gradient sums. Their absolute tolerance is from the largest gradient: rpe_k's is analytically
    # zero (one block: only the class token's row matters, and it uses the one extra bucket: a shift softmax ignores).
    B, L, H = x.size(0), 1 + model.patch_embed.num_patches, model.blocks[0].attn.num_heads
    assert_close_reduction(out, ref_out, network_reduction_length(model))
    scale = max(r.abs().max().item() for r in ref_grads)
    tol = reduction_tol(torch.float32, network_reduction_length(model, B * H * L * L), scale=scale)
    for (name, _), g, r in zip(model.named_parameters(), compiled_grads, ref_grads):
        torch.testing.assert_close(g, r, **tol, msg=name)
