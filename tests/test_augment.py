"""DeiT's training augmentation on the installed Pillow/timm: every AutoAugment/RandAugment op, and the whole
default training transform over thousands of images.

Pillow 13 made ``ImageOps.posterize(img, 0)`` raise; timm's ``PosterizeIncreasing`` asks for 0 bits at magnitude
10, which DeiT's ``rand-m9-mstd0.5-inc1`` reaches, so a default training run crashed within its first epoch.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

import datasets
import main

HPARAMS = dict(translate_const=100, img_mean=(124, 116, 104))
MODES = ("RGB", "L", "RGBA")


def _image(mode: str, size: tuple[int, int] = (40, 32), seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


def _policy_ops(name: str) -> list[timm_aa.AugmentOp]:
    """The AugmentOps of a timm policy string, as ``create_transform`` builds them (one of each name)."""
    if name.startswith("rand"):
        ops = timm_aa.rand_augment_transform(name, dict(HPARAMS)).ops
    else:
        ops = [op for sub in timm_aa.auto_augment_transform(name, dict(HPARAMS)).policy for op in sub]
    return list({op.name: op for op in ops}.values())


POLICIES = ("rand-m9-mstd0.5-inc1", "original", "v0")
CASES = [(p, op.name) for p in POLICIES for op in _policy_ops(p)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("policy", "op_name"), CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_every_policy_op_at_every_magnitude(policy, op_name, mode):
    """Each op, with probability 1, at magnitudes 0..10 and at the mstd extremes (0 and inf, i.e. uniform)."""
    img = _image(mode)
    for mstd in (0.0, 0.5, float("inf"), 100.0):
        for magnitude in range(11):
            op = timm_aa.AugmentOp(op_name, prob=1.0, magnitude=magnitude, hparams={**HPARAMS, "magnitude_std": mstd})
            out = datasets.make_augment_safe(op)(img)
            assert out.mode == img.mode and out.size == img.size, (op_name, magnitude, mstd)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op_name", ["Posterize", "PosterizeIncreasing"])
def test_posterize_keeping_zero_bits_gives_a_black_image(op_name, mode):
    """What Pillow < 13 returned for 0 bits (and TF's implementations give); alpha is kept."""
    magnitude = 10 if op_name == "PosterizeIncreasing" else 0
    img = _image(mode)
    op = datasets.make_augment_safe(timm_aa.AugmentOp(op_name, prob=1.0, magnitude=magnitude, hparams=HPARAMS))
    out = np.asarray(op(img))
    colour = out[..., :3] if mode == "RGBA" else out
    assert colour.max() == 0
    if mode == "RGBA":
        np.testing.assert_array_equal(out[..., 3], np.asarray(img)[..., 3])


@pytest.mark.parametrize("op_name", sorted(timm_aa.NAME_TO_OP))
def test_rgb_results_are_timms_own_where_timm_works(op_name):
    """On RGB images the wrapper changes nothing but the 0-bit posterize: same pixels as timm's op."""
    img = _image("RGB")
    for magnitude in range(11):
        op = timm_aa.AugmentOp(op_name, prob=1.0, magnitude=magnitude, hparams=HPARAMS)
        random.seed(magnitude)  # level_fn may negate at random
        level = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        if op_name.startswith("Posterize") and level[0] <= 0:
            continue
        expected = np.asarray(op.aug_fn(img, *level, **op.kwargs))
        random.seed(magnitude)
        np.testing.assert_array_equal(np.asarray(datasets.make_augment_safe(op)(img)), expected)


def test_grey_images_are_filled_with_the_grey_of_the_mean_colour():
    img = Image.new("L", (32, 32), 255)
    op = datasets.make_augment_safe(timm_aa.AugmentOp("TranslateXRel", prob=1.0, magnitude=10, hparams=HPARAMS))
    random.seed(0)
    out = np.asarray(op(img))
    assert set(np.unique(out)) == {round(sum(HPARAMS["img_mean"]) / 3), 255}


@pytest.mark.parametrize("op_name", ["AutoContrast", "Equalize", "Invert", "SolarizeIncreasing", "SolarizeAdd"])
def test_colour_ops_on_rgba_act_on_the_colour_bands(op_name):
    img = _image("RGBA")
    op = timm_aa.AugmentOp(op_name, prob=1.0, magnitude=7, hparams=HPARAMS)
    level = op.level_fn(7, op.hparams) if op.level_fn is not None else ()
    out = np.asarray(datasets.make_augment_safe(op)(img))
    np.testing.assert_array_equal(out[..., :3], np.asarray(op.aug_fn(img.convert("RGB"), *level, **op.kwargs)))
    np.testing.assert_array_equal(out[..., 3], np.asarray(img)[..., 3])


def test_wrapping_is_idempotent_and_picklable():
    import pickle

    t = datasets.build_transform(True, main.parse_args(["--data-path", "x"]))
    datasets.make_augment_safe(t)
    ra = next(x for x in t.transforms if hasattr(x, "ops"))
    assert all(isinstance(op.aug_fn, datasets.ModeSafeAugmentOp) for op in ra.ops)
    assert all(not isinstance(op.aug_fn.fn, datasets.ModeSafeAugmentOp) for op in ra.ops)
    pickle.loads(pickle.dumps(t))  # DataLoader workers receive the transform by pickling


def test_default_training_transform_over_2000_images(monkeypatch):
    """DeiT's defaults (colour jitter 0.4, rand-m9-mstd0.5-inc1, random erasing 0.25 pixel, bicubic), seeded; at
    64 px instead of 224 for speed (no op depends on the size).

    Counts the 0-bit posterizes it meets, so the test is known to reach the case that crashed.
    """
    args = main.parse_args(["--data-path", "x", "--input-size", "64"])
    assert (args.color_jitter, args.aa, args.reprob, args.remode, args.train_interpolation) == (
        0.4, "rand-m9-mstd0.5-inc1", 0.25, "pixel", "bicubic"
    )  # fmt: skip
    transform = datasets.build_transform(True, args)
    black = []

    def counting_black(img, *a, **k):
        black.append(img.size)
        return Image.new(img.mode, img.size)

    monkeypatch.setattr(datasets, "_black", counting_black)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for i in range(2000):
        w, h = (int(s) for s in rng.integers(24, 96, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        out = transform(img)
        assert out.shape == (3, 64, 64) and torch.isfinite(out).all(), i
    assert black, "no 0-bit posterize met: the seeded run no longer reaches the case it guards"
