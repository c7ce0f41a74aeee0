"""tools/visualize_rpe.py: every picture for every method and mode on tiny models, with the drawn arrays checked
against the iRPE modules' own tables and bucket ids, and the command line's errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import visualize_rpe as vr  # noqa: E402

import irpe  # noqa: E402
from rpe_vision_transformer import VisionTransformer  # noqa: E402
from tolerances import assert_close_reduction, reduction_tol  # noqa: E402

GRID = (3, 5)  # non-square patch grid of the tiny models (12 x 20 px, patch 4)
PATCH = 4

# (method, mode, rpe_on, shared_head, distilled): every method in both modes, every rpe_on, shared and per-head
# tables, one and two skip tokens (the distilled model has a class and a distillation token).
CASES = [
    ("euc", "bias", "k", False, False),
    ("euc", "ctx", "qkv", True, False),
    ("quant", "bias", "q", False, True),
    ("quant", "ctx", "v", False, False),
    ("cross", "bias", "qk", True, False),
    ("cross", "ctx", "k", False, True),
    ("product", "bias", "k", False, False),
    ("product", "ctx", "qk", True, False),
]
IDS = [f"{m}-{mode}-{on}-{'shared' if s else 'heads'}{'-distilled' if d else ''}" for m, mode, on, s, d in CASES]


def tiny_model(method: str, mode: str, rpe_on: str, shared_head: bool, distilled: bool) -> VisionTransformer:
    """A 2-block, 2-head iRPE ViT on a 3x5 grid with random (not zero) lookup tables."""
    config = irpe.get_rpe_config(
        ratio=1.9, method=method, mode=mode, shared_head=shared_head, skip=2 if distilled else 1, rpe_on=rpe_on
    )
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=(GRID[0] * PATCH, GRID[1] * PATCH),
        patch_size=PATCH,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
        rpe_config=config,
        distilled=distilled,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lookup_table" in name:
                param.normal_()
    return model.eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=torch.Generator().manual_seed(1))


def drawn_images(picture: vr.Picture) -> list[np.ndarray]:
    """The arrays of every image artist of the figure, in axes order."""
    return [np.asarray(im.get_array()) for ax in picture.figure.axes for im in ax.images]


# ------------------------------------------------------------------------------------------------------------------
# Reference values computed pair by pair from the modules, independently of the tool's offset maps.


def reference_offset_maps(model: VisionTransformer, which: str, mean: dict[int, torch.Tensor] | None) -> np.ndarray:
    """``(layers, heads, 2h-1, 2w-1)``: for every (query, key) pair of the grid, the module's table entry at its
    bucket, placed at ``pos(key) - pos(query)``; every pair with the same offset must agree."""
    height, width = GRID
    out = []
    for block in model.blocks:
        attn = block.attn
        rpe = getattr(attn, f"rpe_{which}")
        tables = [rpe.rp_rows, rpe.rp_cols] if isinstance(rpe, irpe.iRPE_Cross) else [rpe]
        skip = tables[0].rpe_config.skip
        Hm = tables[0].num_heads
        heads = mean[0].size(0) if mean is not None and which != "v" and tables[0].mode != "bias" else Hm
        maps = np.full((heads, 2 * height - 1, 2 * width - 1), np.nan)
        for i in range(height * width):
            for j in range(height * width):
                (qr, qc), (kr, kc) = divmod(i, width), divmod(j, width)
                value = 0
                for t in tables:
                    ids = t.get_bucket_ids(height, width, skip, torch.device("cpu"))
                    # the encoding on queries is looked up for the key's row (then transposed onto the logits)
                    b = int(ids[skip + j, skip + i] if which == "q" else ids[skip + i, skip + j])
                    if t.mode == "bias":
                        value = value + t.lookup_table_bias.detach()[:, b]  # (Hm,)
                    elif t.transposed:
                        value = value + t.lookup_table_weight.detach()[:, :, b]  # (Hm, d)
                    else:
                        value = value + t.lookup_table_weight.detach()[:, b, :]  # (Hm, d)
                if value.dim() == 2:
                    if mean is not None and which != "v":
                        idx = list(model.blocks).index(block)
                        value = (mean[idx] * attn.scale * value).sum(-1)  # (H,) with (Hm=1, d) broadcast
                    else:
                        value = value.norm(dim=-1)
                cell = (kr - qr + height - 1, kc - qc + width - 1)
                if not np.isnan(maps[(0, *cell)]):  # the same buckets, the same table entries: the same numbers
                    np.testing.assert_array_equal(maps[(slice(None), *cell)], value.numpy())
                maps[(slice(None), *cell)] = value.numpy()
        out.append(maps)
    return np.stack(out)


def mean_from_qkv_hooks(model: VisionTransformer, x: torch.Tensor, which: str) -> dict[int, torch.Tensor]:
    """Mean query (key for ``which='q'``) of the grid tokens, from forward hooks on every ``attn.qkv`` Linear."""
    outputs = {}
    handles = [
        block.attn.qkv.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach()))
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    result = {}
    for i, out in outputs.items():
        attn = model.blocks[i].attn
        B, L, _ = out.shape
        qkv = out.view(B, L, 3, attn.num_heads, attn.head_dim)
        skip = L - GRID[0] * GRID[1]
        result[i] = qkv[:, skip:, 1 if which == "q" else 0].mean(dim=(0, 1))  # (H, d)
    return result


# ------------------------------------------------------------------------------------------------------------------
# Bucket maps.


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("method", vr.METHODS)
def test_bucket_maps_are_the_rows_of_the_modules_ids(method, skip):
    height, width, query = 5, 7, (1, 5)
    maps = vr.bucket_maps(method, 1.9, height, width, query, skip)
    config = irpe.get_rpe_config(ratio=1.9, method=method, mode="bias", skip=skip, rpe_on="k").rpe_k
    module = irpe.build_rpe(irpe.RPEConfigs(rpe_k=config), head_dim=4, num_heads=1)[1]
    tables = [module.rp_rows, module.rp_cols] if method == "cross" else [module]
    assert len(maps) == len(tables)
    for bmap, table in zip(maps, tables):
        ids = table.get_bucket_ids(height, width, skip, torch.device("cpu"))
        for r in range(height):
            for c in range(width):
                assert bmap.ids[r, c] == ids[skip + query[0] * width + query[1], skip + r * width + c]
        assert bmap.num_buckets == table.num_buckets
        assert bmap.skip_bucket == (table.num_buckets - 1 if skip else None)


def test_bucket_picture_of_all_methods(tmp_path):
    out = tmp_path / "buckets.png"
    pic = vr.plot_bucket_maps(list(vr.METHODS), 1.9, 4, 6, (2, 1), skip=1, out=out, dpi=40)
    assert out.is_file() and out.stat().st_size > 1000
    titles = ["euc", "quant", "cross (rows)", "cross (cols)", "product"]
    assert list(pic.panels) == [*titles, "g(x)"]
    maps = [m for method in vr.METHODS for m in vr.bucket_maps(method, 1.9, 4, 6, (2, 1), 1)]
    drawn = drawn_images(pic)
    assert len(drawn) == len(titles)
    for array, bmap in zip(drawn, maps):
        np.testing.assert_array_equal(array, bmap.ids)
    x, g = pic.panels["g(x)"]
    config = irpe.get_single_rpe_config(ratio=1.9)
    expected = irpe.piecewise_index(torch.from_numpy(x), config.alpha, config.beta, config.gamma, torch.long)
    np.testing.assert_array_equal(g, expected.numpy())
    (g_axes,) = [ax for ax in pic.figure.axes if ax.get_title().startswith("piecewise index")]
    line_y = g_axes.lines[1].get_ydata()  # the integer points of g(x), as drawn
    np.testing.assert_array_equal(line_y, g)


# ------------------------------------------------------------------------------------------------------------------
# Learned encodings and attention, every case.


@pytest.mark.parametrize(("method", "mode", "rpe_on", "shared", "distilled"), CASES, ids=IDS)
def test_encoding_pictures_equal_the_modules_tables(tmp_path, method, mode, rpe_on, shared, distilled):
    model = tiny_model(method, mode, rpe_on, shared, distilled)
    x = images()
    for which in rpe_on:
        for with_images in (False, True) if mode == "ctx" else (False,):
            out = tmp_path / f"enc_{which}_{with_images}.png"
            pic = vr.plot_encodings(model, which=which, images=x if with_images else None, out=out, dpi=30)
            assert out.is_file()
            enc = pic.info["encodings"]
            expected_kind = "bias" if mode == "bias" else ("projection" if with_images and which != "v" else "norm")
            assert enc.kind == expected_kind and enc.layers == [0, 1] and enc.grid == GRID
            mean = mean_from_qkv_hooks(model, x, which) if enc.kind == "projection" else None
            reference = reference_offset_maps(model, which, mean)
            heads = 2 if enc.kind == "projection" or not shared else 1
            assert enc.maps.shape == (2, heads, 2 * GRID[0] - 1, 2 * GRID[1] - 1)
            # a norm or a projection reduces d; the mean vectors average the B * 15 grid tokens
            n = max(model.blocks[0].attn.head_dim, x.size(0) * GRID[0] * GRID[1])
            assert_close_reduction(torch.from_numpy(enc.maps), torch.from_numpy(reference), n)
            drawn = drawn_images(pic)
            assert len(drawn) == len(pic.panels) == 2 * heads
            np.testing.assert_array_equal(np.stack(drawn), enc.maps.reshape(-1, *enc.maps.shape[2:]))  # as drawn
            assert len(pic.figure.axes) == 2 * heads + 2  # one colour bar per layer


@pytest.mark.parametrize(("method", "mode", "rpe_on", "shared", "distilled"), CASES, ids=IDS)
def test_attention_picture_matches_the_layer(tmp_path, method, mode, rpe_on, shared, distilled):
    model = tiny_model(method, mode, rpe_on, shared, distilled)
    x = images(1)
    layer, head, query = 1, 1, (2, 3)
    captured = {}
    hook = model.blocks[layer].attn.proj.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    out = tmp_path / "attention.png"
    pic = vr.plot_query_attention(model, x, layer, head, query, out=out, dpi=30)
    assert out.is_file()
    assert list(pic.panels) == ["with iRPE", "without iRPE", "iRPE term", "image"]
    assert len(drawn_images(pic)) == 4
    qa = pic.info["attention"]
    skip = 2 if distilled else 1
    assert qa.skip == skip and qa.grid == GRID and qa.query == skip + query[0] * GRID[1] + query[1]
    # q, k, v and the iRPE terms are those of the layer: the tool's output is the layer's (before its projection)
    B, L, C = captured["x"].shape
    layer_out = captured["x"].view(B, L, 2, C // 2).transpose(1, 2)  # (B, H, L, d)
    # the tool's explicit attention against the layer's own path: an output reduces the L keys of its row (and d)
    assert_close_reduction(qa.out, layer_out, max(L, C // 2))
    torch.testing.assert_close(qa.probs_plain, qa.logits.softmax(-1), rtol=0, atol=0)  # the same op on the same input
    if "q" not in rpe_on and "k" not in rpe_on:
        assert torch.count_nonzero(qa.term) == 0
        torch.testing.assert_close(qa.probs, qa.probs_plain, rtol=0, atol=0)  # a zero term adds exactly nothing
    row = qa.probs[0, head, qa.query]
    # a probability row sums to 1, up to the rounding of its softmax and of this sum, both over the L keys
    total = pic.panels["with iRPE"].sum() + float(row[:skip].sum())
    assert total == pytest.approx(1.0, abs=reduction_tol(torch.float32, L)["atol"])
    # the panels hold the tool's numbers, as they are
    np.testing.assert_array_equal(pic.panels["with iRPE"].ravel(), row[skip:].numpy())
    np.testing.assert_array_equal(pic.panels["iRPE term"].ravel(), qa.term[0, head, qa.query, skip:].numpy())
    if mode == "bias" and rpe_on == "k":  # the bias term of a key is the bias map at its offset: the same entry
        bias = vr.encoding_maps(model, *GRID, "k").maps[layer, head]
        r0, c0 = GRID[0] - 1 - query[0], GRID[1] - 1 - query[1]
        np.testing.assert_array_equal(pic.panels["iRPE term"], bias[r0 : r0 + GRID[0], c0 : c0 + GRID[1]])


def test_a_model_without_irpe_is_refused():
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=2)
    for call in (lambda: vr.plot_encodings(model), lambda: vr.query_attention(model, torch.randn(1, 3, 8, 8), 0, 0)):
        with pytest.raises(vr.VisualizeError, match="no iRPE tables"):
            call()


# ------------------------------------------------------------------------------------------------------------------
# Command line.


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = vr.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def zoo_checkpoint(tmp_path_factory) -> Path:
    """A main.py-style checkpoint of the registered tiny iRPE model at 48 px (a 3x3 grid), random tables."""
    import timm

    import rpe_models  # noqa: F401

    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=48, num_classes=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lookup_table" in n:
                p.normal_(std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": {"model": name, "input_size": 48}}, path)
    return path


def test_cli_draws_the_three_pictures(tmp_path, zoo_checkpoint, capsys):
    data = tmp_path / "data" / "val" / "a"
    data.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((48, 48, 3), 60 * i, dtype=np.uint8)).save(data / f"{i}.png")
    commands = {
        "b.png": ["buckets", "--method", "product", "--grid", "3x4", "--query", "0,3", "--skip", "1"],
        "e.png": ["encodings", "--checkpoint", str(zoo_checkpoint), "--data-path", str(tmp_path / "data")],
        "a.png": ["attention", "--checkpoint", str(zoo_checkpoint), "--layer", "2", "--query", "1,0",
                  "--image-size", "32x64"],
    }  # fmt: skip
    for name, argv in commands.items():
        rc, out, err = run_main([*argv, "--out", str(tmp_path / name)], capsys)
        assert rc == 0, err
        assert (tmp_path / name).is_file() and out.strip() == f"wrote {tmp_path / name}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["buckets", "--method", "polar"], "unknown method 'polar'"),
        (["buckets", "--grid", "3xq"], "argument --grid: expected HxW"),
        (["buckets", "--grid", "3x4", "--query", "3,0"], "outside the 3x4 grid"),
        (["buckets", "--ratio", "-1"], "ratio must be a positive number"),
        (["buckets", "--frobnicate"], "unrecognized arguments"),
        (["buckets", "--dpi", "5"], "argument --dpi: must be an integer in [10, 600]"),
        (["encodings"], "pass --checkpoint PATH or --model NAME"),
        (["encodings", "--checkpoint", "/nonexistent.pth"], "no checkpoint file"),
        (["attention", "--model", "deit_tiny_patch16_224"], "has no iRPE tables"),
        (["attention", "--model", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--image-size", "50x48"],
         "image size 50x48 is not a multiple of the patch size 16x16"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    rc, out, err = run_main([*argv, "--out", str(tmp_path / "x.png")], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "x.png").exists()


def test_cli_refuses_a_checkpoint_without_irpe_tables(tmp_path):
    """A subprocess, as a user runs it: exactly one error line, exit code 2, no traceback."""
    path = tmp_path / "plain.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}, "args": {"model": "deit_tiny"}}, path)
    cmd = [sys.executable, "tools/visualize_rpe.py", "encodings", "--checkpoint", str(path)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {path} has no iRPE tables "
                                                  "(no blocks.*.attn.rpe_*.lookup_table_* entries)"]  # fmt: skip


def test_help_explains_every_picture(capsys):
    for command, words in (("buckets", "g(x)"), ("encodings", "mean query"), ("attention", "without it")):
        with pytest.raises(SystemExit) as info:
            vr.main([command, "--help"])
        assert info.value.code == 0
        assert words in " ".join(capsys.readouterr().out.split())
