"""timm's per-model checks, on our registered models: what timm's own ``tests/test_models.py`` asks of every model.

Forward (and with gradient checkpointing), backward (every parameter gets a gradient), the default cfgs
(``num_features``/``head_hidden_size``, ``forward_features``/``forward_head``, ``reset_classifier``, ``num_classes=0``,
classifier and first-conv names), ``features_only``, ``forward_intermediates`` and its features variant, and FX
forward/backward through timm's tracer settings. Written for this project (timm's file is not installed): the models
are built at a 32x32 input (a 2x2 patch grid, where timm uses 96 to 384 px), with random iRPE tables so that the
encodings take part (fresh ones are zero). Three models run by default; all nine with ``-m slow``.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import rpe_models
from tolerances import assert_close_reduction, network_reduction_length

DEFAULT_MODELS = [
    "deit_tiny_patch16_224_ctx_product_50_shared_k",
    "deit_small_patch16_224_ctx_product_50_shared_qkv",
    "deit_small_patch16_224_ctx_cross_56_shared_k",
]
MODELS = [
    name if name in DEFAULT_MODELS else pytest.param(name, marks=pytest.mark.slow) for name in rpe_models.MODEL_ZOO
]
IMG = 32  # input side: a 2x2 grid of 16-px patches plus the class token


def _create(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, img_size=IMG, ...)`` with random lookup tables."""
    torch.manual_seed(seed)
    model = timm.create_model(name, img_size=IMG, **kwargs)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lookup_table" in param_name:
                param.normal_()
    return model


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _assert_every_param_has_grad(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    num_params = sum(p.numel() for p in model.parameters())
    assert sum(p.grad.numel() for p in model.parameters()) == num_params


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a torchvision FX feature extractor returning its output, with timm's leaf modules/functions."""
    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


def _check_feature_maps(outputs, channels, reductions, batch: int) -> None:
    """timm's check of NCHW feature maps: channels, spatial size for the reduction, batch, finite."""
    assert len(outputs) == len(channels)
    for out, num_chs, reduction in zip(outputs, channels, reductions):
        assert out.shape[1] == num_chs and out.shape[0] == batch
        assert out.shape[2] <= math.ceil(IMG / reduction) + 1 and out.shape[3] <= math.ceil(IMG / reduction) + 1
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name: str) -> None:
    model = _create(name).eval()
    x = _images(1)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 1000) and not torch.isnan(out).any()
        model.set_grad_checkpointing()
        assert_close_reduction(model(x), out, network_reduction_length(model))  # the longest reduction x the layers


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name: str) -> None:
    assert timm.models.get_pretrained_cfg(name) is not None  # timm's backward test selects models by their cfg
    model = _create(name, num_classes=42).train()
    out = model(_images(2))
    out.mean().backward()
    _assert_every_param_has_grad(model)
    assert out.shape == (2, 42) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfgs(name: str) -> None:
    """timm's checks for ViT-like models ('non-standard': token outputs, no spatial pooling size)."""
    model = _create(name).eval()
    cfg, state_dict = model.pretrained_cfg, model.state_dict()
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == 3 and cfg["input_size"] == (3, 224, 224) and not cfg["fixed_input_size"]
    x = _images(1)
    with torch.no_grad():
        features = model.forward_features(x)  # (B, 1 + N, C)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, 1 + (IMG // 16) ** 2, model.num_features)
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model(x).shape == pre_logits.shape
        model.reset_classifier(0, "")  # no classifier, no pooling: every token
        assert_close_reduction(model(x), features, network_reduction_length(model))  # as above
        no_head = _create(name, num_classes=0).eval()
        assert no_head(x).shape == (1, no_head.num_features)
        no_pool = _create(name, num_classes=0, global_pool="").eval()
        assert no_pool(x).shape == features.shape
    for module in (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]:
        assert f"{module}.weight" in state_dict
    assert f"{cfg['first_conv']}.weight" in state_dict


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("feature_cls", ["getter", "fx"])
def test_model_forward_features(name: str, feature_cls: str) -> None:
    """``features_only=True``: timm's forward_intermediates-based extractor (its default for ViTs) and the FX one."""
    model = _create(name, features_only=True, feature_cls=feature_cls).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == 3 and reductions == [16, 16, 16]  # timm's ViT default: the last three blocks
    with torch.no_grad():
        outputs = model(_images(1))
    if feature_cls == "fx":  # FX returns the blocks' token outputs (B, 1 + N, C)
        assert [tuple(o.shape) for o in outputs] == [(1, 1 + (IMG // 16) ** 2, c) for c in channels]
    else:
        _check_feature_maps(outputs, channels, reductions, batch=1)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name: str) -> None:
    model = _create(name).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) == len(model.blocks) >= 3
    x = _images(1)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        _check_feature_maps(intermediates, channels, reductions, batch=1)
        n = network_reduction_length(model)  # the longest reduction times the layers
        assert_close_reduction(output, model.forward_features(x), n)
        # the other arguments of timm's forward_intermediates
        last = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True, norm=True)
        assert_close_reduction(last[0], output[:, 1:], n)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, return_prefix_tokens=True)
        (patches, prefix), *rest = early[1]
        assert not rest and patches.shape == intermediates[0].shape and prefix.shape == (1, 1, model.embed_dim)
        as_dict = model.forward_intermediates(x, indices=2, output_dict=True)
        assert len(as_dict["image_intermediates"]) == 2 and as_dict["image_features"].shape == output.shape
        model.set_grad_checkpointing()
        assert_close_reduction(model.forward_intermediates(x)[0], output, n)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates_features(name: str) -> None:
    model = _create(name, features_only=True, feature_cls="getter", out_indices=(0, 1, -1)).eval()
    with torch.no_grad():
        outputs = model(_images(1))
    _check_feature_maps(outputs, model.feature_info.channels(), model.feature_info.reduction(), batch=1)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_fx(name: str) -> None:
    model = _create(name).eval()
    x = _images(1)
    with torch.inference_mode():
        out = model(x)
        fx_out = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(fx_out, out)  # the graph calls the model's own modules and functions: the same numbers


@pytest.mark.parametrize("name", MODELS)
def test_model_backward_fx(name: str) -> None:
    model = _fx_model(_create(name, num_classes=42).train())
    out = torch.cat(tuple(model(_images(2)).values()))
    out.mean().backward()
    _assert_every_param_has_grad(model)
    assert out.shape == (2, 42) and not torch.isnan(out).any()


def test_model_forward_torchscript_is_refused_clearly() -> None:
    """timm's ViT scripts; ours cannot (irpe's modules are Python), and says so instead of a TorchScript trace."""
    model = _create(DEFAULT_MODELS[0]).eval()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile the iRPE attention.*torch\.export"):
        torch.jit.script(model)


def test_pretrained_cfgs_and_group_matcher() -> None:
    released = {name for name, entry in rpe_models.MODEL_ZOO.items() if entry.released}
    assert set(timm.list_pretrained("*ctx*")) == released
    model = _create(DEFAULT_MODELS[0])
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + len(model.blocks) + 1  # stem, a group per block (final norm with the last), head
    rpe_groups = [i for i, names in groups.items() if any("rpe_k" in n for n in names)]
    assert len(rpe_groups) == len(model.blocks)  # every block's tables in its block's group (layer-wise LR decay)


def test_pretrained_backbone_and_features(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrained=True`` with ``num_classes=0`` or ``features_only=True`` loads the checkpoint's backbone."""
    name = DEFAULT_MODELS[0]
    source = _create(name, depth=2)
    (tmp_path / "zoo").mkdir()
    torch.save({"model": source.state_dict()}, tmp_path / "zoo" / f"{name}.pth")
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", str(tmp_path / "zoo"))
    backbone = timm.create_model(name, pretrained=True, img_size=IMG, depth=2, num_classes=0).eval()
    assert backbone.num_classes == 0 and backbone.pretrained_cfg["file"] == str(tmp_path / "zoo" / f"{name}.pth")
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert backbone.state_dict().keys() == expected.keys()
    for key, value in backbone.state_dict().items():  # loaded weights: exact copies
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    features = timm.create_model(name, pretrained=True, img_size=IMG, depth=2, features_only=True, out_indices=(-1,))
    x = _images(1)
    with torch.no_grad():
        (feature_map,) = features.eval()(x)
        (expected_map,) = source.eval().forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert feature_map.shape == (1, source.embed_dim, IMG // 16, IMG // 16)
    torch.testing.assert_close(feature_map, expected_map, rtol=0, atol=0)  # the same weights through the same code
