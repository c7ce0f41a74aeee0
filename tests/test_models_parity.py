"""Parity of our models with the original implementation's reference vectors (tests/data/models, see its README)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import irpe
import rpe_models
from rpe_vision_transformer import RPEAttention, VisionTransformer
from tolerances import assert_close_reduction, network_reduction_length, reduction_tol

MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
REFERENCE_FILES = sorted(p.name for p in MODELS_DIR.glob("*.pt"))
TINY_K = "deit_tiny_patch16_224_ctx_product_50_shared_k"


def _load(name: str) -> dict:
    return torch.load(MODELS_DIR / name, map_location="cpu", weights_only=True)


def _reference_input(ref: dict) -> torch.Tensor:
    """The input was drawn with ``torch.randn`` from a recorded seed; it is regenerated instead of stored."""
    generator = torch.Generator().manual_seed(ref["seeds"]["input"])
    x = torch.randn(ref["input_shape"], generator=generator)
    # a float64 sum of x.numel() terms, in another order on another machine: its partial sums are below sum |x|
    atol = reduction_tol(torch.float64, x.numel(), scale=x.double().abs().sum().item())["atol"]
    assert x.double().sum().item() == pytest.approx(ref["input_sum"], abs=atol), "torch.randn changed: store inputs"
    return x


def _build(ref: dict) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The reference layer/model and how to call it."""
    kwargs = {k: v for k, v in ref["model_kwargs"].items() if k != "class_name"}
    config = irpe.get_rpe_config(**ref["rpe_config_args"])
    if ref["level"] == "model":
        assert kwargs.pop("norm_layer") == "LayerNorm(eps=1e-6)"
        model = VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), rpe_config=config, **kwargs)
        return model, model
    height, width = kwargs.pop("grid_height"), kwargs.pop("grid_width")
    kwargs.pop("note")
    layer = RPEAttention(rpe_config=config, **kwargs)
    return layer, partial(layer, height=height, width=width)


def test_reference_files_present() -> None:
    assert len(REFERENCE_FILES) == 15


@pytest.mark.parametrize("file_name", REFERENCE_FILES)
def test_matches_reference(file_name: str) -> None:
    ref = _load(file_name)
    module, call = _build(ref)
    module.load_state_dict(ref["state_dict"], strict=True)
    module.eval()
    x = _reference_input(ref).requires_grad_(True)

    out = call(x)
    # The original's float32 results from another machine. n: the longest reduction (fc2's inputs, a row's L keys)
    # times the layers; for gradients at least the B * H * L * L logits a table's gradient sums, times the layers.
    B, L = x.size(0), (x.size(1) if ref["level"] == "attention" else 1 + module.patch_embed.num_patches)
    heads = ref["model_kwargs"]["num_heads"]
    assert_close_reduction(out, ref["output"], network_reduction_length(module, L))

    (out * ref["grad_weights"]).sum().backward()
    params = dict(module.named_parameters())
    tables = {name for name in params if "lookup_table" in name}
    assert tables == set(ref["grads"]), "the reference covers every lookup table"
    # Absolute tolerance from the largest gradient: in a model's last block the tables' gradients are analytically
    # zero (only the class token's row reaches the logits, and it uses the one extra bucket: a shift softmax ignores).
    pairs = [(params[name].grad, grad, name) for name, grad in ref["grads"].items()]
    pairs.append((x.grad, ref["input_grad"], "input"))
    scale = max(expected.abs().max().item() for _, expected, _ in pairs)
    tol = reduction_tol(torch.float32, network_reduction_length(module, B * heads * L * L), scale=scale)
    for actual, expected, name in pairs:
        torch.testing.assert_close(actual, expected, **tol, msg=name)


def _read_keys(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def test_state_dict_keys_match_released_checkpoint() -> None:
    expected = _read_keys(MODELS_DIR / "keys_deit_tiny_ctx_product_50_shared_k.txt")
    assert len(expected) == 164
    with torch.device("meta"):
        model = rpe_models.create_irpe_deit(TINY_K)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected


def test_full_size_reference_logits(shared_reference: Path) -> None:
    ref = torch.load(shared_reference / "models" / f"full_{TINY_K}.pt", map_location="cpu", weights_only=True)
    model = rpe_models.create_irpe_deit(TINY_K)
    model.load_state_dict(ref["model"], strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(ref["input"])
    # float32 logits from another machine: n is the longest reduction (fc2's 768 inputs) times the 50 layers
    assert_close_reduction(logits, ref["logits"], network_reduction_length(model))
