"""Tracing and export of the iRPE models: torch.jit.trace, torch.fx, torch.export (dynamic batch and grid, saved and
loaded) on every attention path, and ONNX through the dynamo exporter, each checked against the eager model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import timm
import torch
from torch.export import Dim

import irpe
import irpe_attention
import rpe_models  # noqa: F401  (registers the models)
import rpe_ops
from tolerances import assert_close_reduction, network_reduction_length

NAME = "deit_tiny_patch16_224_ctx_product_50_shared_k"
QKV = "deit_small_patch16_224_ctx_product_50_shared_qkv"  # iRPE on values: the 'math' path whatever was asked
CROSS = "deit_small_patch16_224_ctx_cross_56_shared_k"  # two tables per encoding
SHAPES = [(2, 3, 32, 48), (3, 3, 64, 32), (1, 3, 32, 32)]  # batch and patch grids other than the traced one


def _ops_usable() -> bool:
    try:
        irpe_attention.resolve_attn_impl("ops", has_rpe_v=False, dropout_p=0.0, device=torch.device("cpu"))
    except ValueError:
        return False
    return True


_NEEDS_OPS = pytest.mark.skipif(not _ops_usable(), reason="rpe_ops (the fused CPU attention) is not built")
IMPLS = ["math", "sdpa", pytest.param("ops", marks=_NEEDS_OPS), "auto"]


def _fresh(name: str = NAME, attn_impl: str = "auto", depth: int = 2) -> torch.nn.Module:
    """A model that has never run a forward (no cached bucket ids), with random iRPE tables, in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, depth=depth, num_classes=3, attn_impl=attn_impl).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lookup_table" in param_name:
                param.normal_()
    return model


def _inputs() -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(shape, generator=generator) for shape in SHAPES)


def _dynamic_shapes(patch: int = 16) -> dict[str, dict[int, Dim]]:
    """Batch, height and width all dynamic; sides are multiples of the patch (the grid checks say so), grids >= 2."""
    return {
        "x": {
            0: Dim("batch", min=1, max=64),
            2: patch * Dim("grid_h", min=2, max=32),
            3: patch * Dim("grid_w", min=2, max=32),
        }
    }


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_jit_trace(attn_impl: str) -> None:
    """A trace (sanity-checked by torch.jit.trace) computes what the model does, for any batch at the traced grid."""
    model = _fresh(attn_impl=attn_impl)
    x = torch.randn(2, 3, 32, 48)
    with pytest.warns(torch.jit.TracerWarning):  # the grid is read as Python ints: the trace is for this grid
        traced = torch.jit.trace(model, x)
    with torch.no_grad():  # the trace replays the model's own kernels: bit for bit the same numbers
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        x3 = torch.randn(3, 3, 32, 48)
        torch.testing.assert_close(traced(x3), model(x3), rtol=0, atol=0)


def test_fx_symbolic_trace() -> None:
    """Plain torch.fx.symbolic_trace: the grid and the iRPE attention are leaves, so any grid runs, and checks."""
    model = _fresh(CROSS)
    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():  # the graph calls the model's own modules and functions: bit for bit the same numbers
        for x in _inputs():
            torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="multiple of the patch size"):
            graph_module(torch.randn(1, 3, 40, 30))


@pytest.mark.parametrize(
    ("name", "attn_impl"),
    [pytest.param(NAME, impl, marks=[_NEEDS_OPS] if impl == "ops" else []) for impl in ("math", "sdpa", "ops", "auto")]
    + [pytest.param(QKV, "auto", marks=pytest.mark.slow), pytest.param(CROSS, "auto", marks=pytest.mark.slow)],
)
def test_export_dynamic_save_load(name: str, attn_impl: str, tmp_path) -> None:
    """torch.export of a model that never ran eagerly, dynamic in batch, height and width; saved, loaded and run.

    Exporting leaves the eager model as it was: no traced tensor in its bucket-id caches, and its clear errors.
    """
    model = _fresh(name, attn_impl=attn_impl, depth=1)
    calls = irpe._shared_bucket_ids.cache_info()[:2]  # (hits, misses)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 48),), dynamic_shapes=_dynamic_shapes())
    assert irpe._shared_bucket_ids.cache_info()[:2] == calls  # the export computed its ids in the graph
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        for x in _inputs():
            # the exported graph may fuse or reorder the reductions: n is the longest times the model's layers
            assert_close_reduction(loaded(x), model(x), network_reduction_length(model))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 40, 32))


def test_export_asks_for_multiples_of_the_patch() -> None:
    """A plain dynamic side would admit sizes the patches do not tile: export says how to declare it."""
    model = _fresh(depth=1)
    dynamic = {"x": {2: Dim("height", min=32, max=512)}}
    with pytest.raises(torch._dynamo.exc.UserError, match=r"height = 16\*"):
        torch.export.export(model, (torch.randn(1, 3, 32, 48),), dynamic_shapes=dynamic)


def test_export_flex_dynamic_batch() -> None:
    """FlexAttention exports with a dynamic batch (no grad on CPU, where it has no backward); PyTorch can neither
    make its grid dynamic nor serialize it, so the program is run in memory."""
    model = _fresh(attn_impl="flex", depth=1)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 32, 48),), dynamic_shapes={"x": {0: Dim("batch")}})
        for batch in (2, 3):
            x = torch.randn(batch, 3, 32, 48)
            assert_close_reduction(program.module()(x), model(x), network_reduction_length(model))  # as above


def test_onnx_dynamo_export(tmp_path) -> None:
    """ONNX through torch.export, checked with onnxruntime: the explicit path with PyTorch lookups (the compiled
    rpe_ops and the fused sdpa path have no ONNX translation)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _fresh(attn_impl="math", depth=1)
    path = tmp_path / "model.onnx"
    with rpe_ops.disabled():
        example = (torch.randn(2, 3, 32, 48),)
        # optimize=False: the graph as exported (the optimiser only folds it; 5 s less on 2 cores)
        torch.onnx.export(model, example, path, dynamo=True, dynamic_shapes=_dynamic_shapes(), optimize=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        for x in _inputs():
            (out,) = session.run(None, {input_name: x.numpy()})
            # onnxruntime's own kernels and summation order: n is the longest reduction times the model's layers
            assert_close_reduction(torch.from_numpy(out), model(x), network_reduction_length(model))
