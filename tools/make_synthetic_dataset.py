"""Writes a small, learnable synthetic image-classification dataset in the ImageNet folder layout.

``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg`` (class names ``n00000000``, ``n00000001``, ...), and with
``--tar`` also ``DIR/train.tar`` / ``DIR/val.tar`` holding the same class folders (what ``main.py --load-tar`` reads).

Each class has its own hue, stripe orientation and shape (circle / square / triangle / cross); every image draws
a random stripe frequency and phase, shape position and size, background, hue jitter and pixel noise, so images
are all different but a small ViT separates the classes within a few epochs at 32-64 px.

Example::

    python tools/make_synthetic_dataset.py --out outputs/demo/data --num-classes 10 \\
        --train-per-class 100 --val-per-class 30 --image-size 64 --tar
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")


def class_name(index: int) -> str:
    """ImageNet-like class folder name: ``n`` and 8 digits."""
    return f"n{index:08d}"


def make_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draws one RGB image of class ``label``.

    Args:
        label: Class index in ``[0, num_classes)``.
        num_classes: Number of classes (spreads hues and orientations evenly).
        size: Side of the square image in pixels.
        rng: Random generator for the per-image jitter.
    """
    hue = (label / num_classes + rng.uniform(-0.25, 0.25) / num_classes) % 1.0
    angle = math.pi * ((label * 3) % num_classes) / num_classes + rng.uniform(-0.15, 0.15)
    freq = rng.uniform(2.5, 4.5)
    phase = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.75, 1.0)), dtype=np.float32)
    bg = np.full(3, rng.uniform(0.05, 0.35), dtype=np.float32)
    pixels = bg * (1 - stripes[..., None]) + fg * stripes[..., None]

    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    shape = SHAPES[label % len(SHAPES)]
    r = rng.uniform(0.15, 0.25) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    h2, s2, v2 = (hue + 0.5) % 1.0, 0.6, 0.95
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h2, s2, v2))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)

    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_split(
    root: Path, split: str, num_classes: int, per_class: int, size: int, rng: np.random.Generator, fmt: str
) -> int:
    """Writes ``per_class`` images of every class under ``root/split/<class>/``; returns the number written."""
    count = 0
    for label in range(num_classes):
        folder = root / split / class_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make_image(label, num_classes, size, rng)
            path = folder / f"{split}_{label:03d}_{i:05d}.{fmt}"
            if fmt == "jpg":
                img.save(path, quality=92)
            else:
                img.save(path)
            count += 1
    return count


def write_tar(root: Path, split: str) -> Path:
    """Packs ``root/split/<class>/*`` into ``root/split.tar`` with members ``<class>/<file>``."""
    tar_path = root / f"{split}.tar"
    tmp = tar_path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tf:
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                tf.add(f, arcname=f"{class_dir.name}/{f.name}")
    tmp.replace(tar_path)
    return tar_path


def make_dataset(
    out: str | Path,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    tar: bool = False,
    seed: int = 0,
    fmt: str = "jpg",
) -> dict[str, int]:
    """Generates the dataset (see the module docstring) and returns the image counts per split.

    Raises:
        ValueError: for non-positive sizes or counts, or an unknown format.
    """
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("--num-classes, --train-per-class and --val-per-class must be >= 1")
    if image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {image_size}")
    if fmt not in ("jpg", "png"):
        raise ValueError(f"--format must be jpg or png, got {fmt!r}")
    root = Path(out)
    rng = np.random.default_rng(seed)
    counts = {
        "train": write_split(root, "train", num_classes, train_per_class, image_size, rng, fmt),
        "val": write_split(root, "val", num_classes, val_per_class, image_size, rng, fmt),
    }
    if tar:
        for split in ("train", "val"):
            write_tar(root, split)
    return counts


def dataset_parser(doc: str, train_per_class: int, val_per_class: int, image_size: int) -> argparse.ArgumentParser:
    """The options every dataset generator takes (output folder, images per class and split, size, seed), with the
    first paragraph of ``doc`` as description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train-per-class", type=int, default=train_per_class)
    parser.add_argument("--val-per-class", type=int, default=val_per_class)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def get_args_parser() -> argparse.ArgumentParser:
    parser = dataset_parser(__doc__, train_per_class=100, val_per_class=30, image_size=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--tar", action="store_true", help="also write train.tar and val.tar")
    parser.add_argument("--format", default="jpg", choices=("jpg", "png"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        counts = make_dataset(
            args.out,
            args.num_classes,
            args.train_per_class,
            args.val_per_class,
            args.image_size,
            tar=args.tar,
            seed=args.seed,
            fmt=args.format,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = " (+ train.tar, val.tar)" if args.tar else ""
    print(f"wrote {counts['train']} train / {counts['val']} val images, {args.num_classes} classes", end="")
    print(f" to {args.out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
