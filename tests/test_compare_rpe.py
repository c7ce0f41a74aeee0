"""tools/make_relational_dataset.py (labels checked against the drawn geometry) and tools/compare_rpe.py (its
variants and presets, commands, time accounting and table; the whole --quick comparison as a slow test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import compare_rpe  # noqa: E402
import make_relational_dataset as rel  # noqa: E402

from tolerances import reduction_tol  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("relational")
    counts = rel.make_dataset(root, train_per_class=12, val_per_class=4, image_size=48, seed=3)
    assert counts == {"train": 36, "val": 12}
    return root


def centroid(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    assert len(xs) > 10, "object not found"
    return np.array([xs.mean(), ys.mean()])


def test_labels_follow_the_drawn_geometry(dataset):
    for split in ("train", "val"):
        meta = json.loads((dataset / f"{split}.json").read_text())
        assert meta["classes"] == list(rel.CLASS_NAMES)
        assert sorted(p.name for p in (dataset / split).iterdir()) == list(rel.CLASS_NAMES)  # ImageFolder order
        for sample in meta["samples"]:
            path = dataset / sample["file"]
            assert path.parent.name == rel.CLASS_NAMES[sample["label"]]
            pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
            r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
            red = centroid(pixels, (r > 180) & (g < 80) & (b < 80))
            blue = centroid(pixels, (b > 180) & (r < 80) & (g < 80))
            # not rounding: the shapes are drawn on whole pixels, which moves a centroid by less than a pixel
            np.testing.assert_allclose(red, sample["a"], atol=1.0)
            np.testing.assert_allclose(blue, sample["b"], atol=1.0)
            dx, dy = blue - red  # B - A as drawn, y downwards
            assert rel.label_of_offset(dx, dy) == sample["label"]
            along, across = (
                (abs(dx), abs(dy)) if rel.CLASS_NAMES[sample["label"]] == "b_beside_a" else (abs(dy), abs(dx))
            )
            assert along >= 16 - 1.5 and across <= rel.MAX_CROSS_RATIO * along + 1.5  # min_sep = 48 / 3


def test_labels_survive_the_training_flip_and_absolute_position_does_not_tell_them(dataset):
    for dx, dy in ((20.0, 3.0), (-20.0, 3.0), (2.0, -18.0), (-2.0, 18.0)):
        assert rel.label_of_offset(dx, dy) == rel.label_of_offset(-dx, dy)  # horizontal flip
    samples = json.loads((dataset / "train.json").read_text())["samples"]
    beside = [s for s in samples if rel.CLASS_NAMES[s["label"]] == "b_beside_a"]
    assert {s["b"][0] > s["a"][0] for s in beside} == {True, False}  # both sides occur
    positions = np.array([s["a"] for s in samples])
    assert positions.std(axis=0).min() > 5  # A is all over the image, not at a fixed place


def test_dataset_is_reproducible_and_checks_its_arguments(tmp_path):
    a = rel.make_dataset(tmp_path / "a", 2, 1, 32, seed=7)
    rel.make_dataset(tmp_path / "b", 2, 1, 32, seed=7)
    assert a == {"train": 6, "val": 3}
    assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
    for kwargs, message in (
        ({"train_per_class": 0}, ">= 1"),
        ({"image_size": 8}, ">= 16"),
        ({"min_sep": 40}, "min-sep"),
    ):
        args = {"out": tmp_path / "c", "train_per_class": 1, "val_per_class": 1, "image_size": 48, **kwargs}
        with pytest.raises(ValueError, match=message):
            rel.make_dataset(**args)
    assert rel.main(["--out", str(tmp_path / "d"), "--image-size", "8"]) == 2


def test_variants_build_the_configured_irpe():
    import timm

    import rpe_models  # noqa: F401

    compare_rpe.register_variants()
    compare_rpe.register_variants()  # twice is a no-op
    for variant in compare_rpe.VARIANTS.values():
        assert timm.is_model(variant.model)
        model = timm.create_model(variant.model, img_size=32, num_classes=3, depth=1)  # one block is enough
        micro = variant.arch is not None
        assert model.patch_embed.patch_size == ((4, 4) if micro else (16, 16))
        assert (model.pos_embed is None) == variant.key.startswith("nopos")
        attn = model.blocks[0].attn
        if variant.key in ("plain", "plain_ours", "abs", "nopos"):
            assert all(getattr(attn, f"rpe_{w}", None) is None for w in "qkv")
            continue
        on = "".join(w for w in "qkv" if getattr(attn, f"rpe_{w}") is not None)
        assert on == ("qkv" if variant.key == "ctx_qkv" else "k")
        heads, head_dim = (2, 32) if micro else (3, 64)
        if "bias" in variant.key:
            assert attn.rpe_k.lookup_table_bias.shape == (heads, 50)  # one table per head, 49 + 1 skip buckets
        else:
            assert attn.rpe_k.lookup_table_weight.shape == (1, head_dim, 50)
        assert model(torch.zeros(1, 3, 32, 48)).shape == (1, 3)


def shuffle_patches(images: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """``images (B, C, H, W)`` with their ``patch x patch`` cells moved: cell ``i`` (row-major) goes to ``perm[i]``."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    cells = images.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)
    moved = torch.empty_like(cells)
    moved[:, perm] = cells
    return moved.reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_only_position_encodings_tell_a_shuffled_grid_from_the_original():
    """``nopos`` sees the patches as a set (the floor of the grid8 comparison); iRPE alone brings position back."""
    import timm

    compare_rpe.register_variants()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    perm = torch.randperm(64, generator=gen)
    shuffled = shuffle_patches(images, 4, perm)
    assert not torch.equal(shuffled, images) and torch.equal(shuffle_patches(images, 4, torch.arange(64)), images)
    outputs = {}
    for key in ("nopos", "abs", "nopos_bias_k", "nopos_ctx_k"):
        torch.manual_seed(1)
        model = timm.create_model(compare_rpe.VARIANTS[key].model, num_classes=3, depth=2).double().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lookup_table" in name:
                    param.normal_(generator=gen)  # tables as training leaves them: nonzero
            features = [model.forward_head(model.forward_features(x), pre_logits=True) for x in (images, shuffled)]
            outputs[key] = tuple(features)  # the class token after the final norm: (2, 64), entries of order 1
    # float64: only the order of the sums over the 65 tokens differs, an error of a few units in 1e-16 of the
    # features (of order 1); 1e-9 is far above it. Position changes them by 1e-4 (contextual terms: the initial
    # queries are small) to 1e-1, so 1e-6 separates the two by orders of magnitude on both sides.
    torch.testing.assert_close(*outputs["nopos"], rtol=0, atol=1e-9)
    for key in ("abs", "nopos_bias_k", "nopos_ctx_k"):
        assert (outputs[key][0] - outputs[key][1]).abs().max() > 1e-6, key


def test_runs_of_a_preset_share_one_recipe_and_go_through_main_py(tmp_path):
    for preset in compare_rpe.PRESETS.values():
        recipe = preset.main_flags()
        commands = {
            key: compare_rpe.main_command(
                compare_rpe.VARIANTS[key], tmp_path / "data", tmp_path / key, 1, preset.budget, recipe
            )
            for key in preset.variants
        }
        for key, cmd in commands.items():
            registered = compare_rpe.VARIANTS[key].rpe is not None
            assert cmd[: 4 if registered else 2] == (
                [sys.executable, "-c", compare_rpe.LAUNCHER, "main.py"] if registered else [sys.executable, "main.py"]
            )
            for flag, value in recipe.items():
                assert cmd[cmd.index(flag) + 1] == value

        def flags(cmd: list[str]) -> list[str]:
            rest = cmd[cmd.index("main.py") + 1 :]
            i = rest.index("--model")
            j = rest.index("--output_dir")
            return rest[:i] + rest[i + 2 : j] + rest[j + 2 :]

        assert len({tuple(flags(c)) for c in commands.values()}) == 1  # everything but model and output folder
    grid8 = compare_rpe.PRESETS[compare_rpe.DEFAULT_PRESET]
    assert grid8.name == "grid8" and grid8.budget.input_size == 32  # main.py's small-image transform: no crop-out
    assert "plain" in compare_rpe.PRESETS["deit3x3"].variants and "nopos_ctx_k" in grid8.variants
    assert grid8.main_flags()["--batch-size"] == "64" and compare_rpe.RECIPE["--batch-size"] == "32"


def test_run_all_measures_each_runs_cpu_time(tmp_path):
    burn = "import time\nwhile time.process_time() < 0.6: pass"
    runs = [
        compare_rpe.Run("burn", 0, tmp_path / "burn", [sys.executable, "-c", burn]),
        compare_rpe.Run("sleep", 0, tmp_path / "sleep", [sys.executable, "-c", "import time; time.sleep(0.6)"]),
        compare_rpe.Run("fail", 0, tmp_path / "fail", [sys.executable, "-c", "raise SystemExit(3)"]),
    ]
    compare_rpe.run_all(runs, jobs=2, threads=1)
    burner, sleeper, failing = runs
    assert [r.returncode for r in runs] == [0, 0, 3]
    assert burner.cpu_seconds >= 0.6 and sleeper.seconds >= 0.6
    assert sleeper.cpu_seconds < burner.cpu_seconds - 0.4  # each run is charged its own CPU time only
    note = compare_rpe.time_note(120.0, runs, own_cpu_seconds=6.0, jobs=2, threads=1)
    cpu = sum(r.cpu_seconds for r in runs)
    assert note.startswith(f"2.0 min wall-clock, {(cpu + 6) / 60:.1f} min CPU")
    assert note.endswith(f"on 2 idle cores about {(6 + cpu / 2) / 60:.1f} min")


def test_table_reports_mean_and_spread(tmp_path):
    runs = []
    for variant, accs in (("plain", (40.0, 50.0)), ("ctx_k", (60.0, 64.0))):
        for seed, acc in enumerate(accs):
            run = compare_rpe.Run(variant, seed, tmp_path / variant / str(seed), [], 0, 1.0)
            run.out_dir.mkdir(parents=True)
            lines = [{"epoch": 0, "test_acc1": acc + 5, "train_loss": 1.0, "n_parameters": 5_000_000},
                     {"epoch": 1, "test_acc1": acc, "train_loss": 0.9, "n_parameters": 5_000_000}]  # fmt: skip
            (run.out_dir / "log.txt").write_text("".join(json.dumps(x) + "\n" for x in lines))
            runs.append(run)
    variants = [compare_rpe.VARIANTS["plain"], compare_rpe.VARIANTS["ctx_k"]]
    rows = compare_rpe.summarize(runs, variants)
    assert rows[0]["top1"] == [40.0, 50.0] and rows[0]["top1_mean"] == 45.0
    std_tol = reduction_tol(torch.float64, 2)["rtol"]  # float64 sums of the two runs, in numpy's order and ours
    assert rows[0]["top1_std"] == pytest.approx(np.std([40, 50], ddof=1), rel=std_tol) and rows[0]["best_mean"] == 50.0
    table = compare_rpe.format_table(rows)
    assert rows[0]["epochs_mean"] == 47.5
    assert rows[0]["epochs_std"] == pytest.approx(np.std([42.5, 52.5], ddof=1), rel=std_tol)
    assert "| plain | `deit_tiny_patch16_224` | 5.00 | 45.0 ± 7.1 | 40.0, 50.0 | 50.0 | 47.5 ± 7.1 |" in table
    assert compare_rpe.plot_curves(runs, variants, tmp_path / "curves.png").is_file()


def test_bad_arguments_are_one_error_line(capsys):
    assert compare_rpe.main(["--seeds", "3", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "two different --seeds" in err[0]
    assert compare_rpe.main(["--train-per-class", "5", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer training images than one batch (64)" in err[0] and "at least 22" in err[0]


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path):
    out = tmp_path / "compare"
    cmd = [sys.executable, "tools/compare_rpe.py", "--quick", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == compare_rpe.DEFAULT_PRESET
    quick = compare_rpe.PRESETS[compare_rpe.DEFAULT_PRESET].quick_variants
    assert [row["variant"] for row in results["rows"]] == list(quick)
    for row in results["rows"]:
        assert len(row["top1"]) == 2 and all(0 <= v <= 100 for v in row["top1"])
        for seed in row["seeds"]:
            args = (out / "runs" / row["variant"] / f"seed{seed}" / "args.yaml").read_text()
            assert f"model: {row['model']}" in args  # main.py wrote it: the run went through main.py
    assert (out / "curves.png").is_file()
    assert "| variant |" in result.stdout and "top-1 final" in (out / "results.md").read_text()
