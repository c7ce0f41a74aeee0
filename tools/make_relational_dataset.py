"""Writes a synthetic dataset whose label is the relative arrangement of two objects, in the ImageNet folder layout.

Every image holds a red disc ``A`` and a blue square ``B`` at random absolute positions on a noisy grey background;
the class says where ``B`` is relative to ``A``: ``b_above_a``, ``b_below_a`` or ``b_beside_a`` (left or right).
Left and right share a class because ``main.py``'s training transform (DeiT's) flips images horizontally, which
would swap them; above and below survive the flip. The offset ``B - A`` (centre to centre) is at least
``--min-sep`` pixels along the class's axis and at most half as long across it, so the label is unambiguous and
the objects never overlap. Colours, sizes and noise are jittered; nothing about a single object, nor its absolute
position, tells the class.

``DIR/train/<class>/*.png`` and ``DIR/val/<class>/*.png`` (what ``main.py --data-path DIR`` reads), plus
``DIR/train.json`` / ``DIR/val.json`` with each image's label and object centres ``[x, y]`` in pixels.

Example::

    python tools/make_relational_dataset.py --out outputs/relational --train-per-class 150 --val-per-class 50 \\
        --image-size 48
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from _cli import cli
from make_synthetic_dataset import dataset_parser
from PIL import Image, ImageDraw

# (class name, unit direction of B - A as (dx, dy) in image coordinates, y downwards; "beside" draws the sign of
# dx at random). Sorted as ImageFolder sorts, so the index is main.py's label.
CLASSES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("b_above_a", (0, -1)),
    ("b_below_a", (0, 1)),
    ("b_beside_a", (1, 0)),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in CLASSES)
MAX_CROSS_RATIO = 0.5  # |offset across the class's axis| <= this * |offset along it|


@dataclass(frozen=True)
class Sample:
    """Geometry of one generated image.

    Attributes:
        file: path relative to the dataset root.
        label: class index into :data:`CLASS_NAMES`.
        a: centre ``[x, y]`` of the red disc, pixels.
        b: centre ``[x, y]`` of the blue square, pixels.
        radius: half-size of both objects, pixels.
    """

    file: str
    label: int
    a: tuple[float, float]
    b: tuple[float, float]
    radius: float


def label_of_offset(dx: float, dy: float) -> int:
    """The class of an offset ``B - A = (dx, dy)`` (image coordinates, ``y`` down): its dominant direction."""
    if abs(dx) >= abs(dy):
        return CLASS_NAMES.index("b_beside_a")
    return CLASS_NAMES.index("b_below_a" if dy > 0 else "b_above_a")


def sample_geometry(
    label: int,
    size: int,
    min_sep: float,
    rng: np.random.Generator,
    max_sep: float | None = None,
    radius: tuple[float, float] = (0.22, 0.32),
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Object centres ``a, b`` and half-size ``r`` for class ``label`` on a ``size x size`` image.

    The offset along the class's axis is in ``[min_sep, max_sep]`` (at most what fits), across it at most
    :data:`MAX_CROSS_RATIO` times that; both objects lie inside the image.

    Args:
        label: class index.
        size: image side, pixels.
        min_sep: least offset along the class's axis, pixels.
        rng: random generator.
        max_sep: largest offset along the axis (default: what fits in the image).
        radius: range of the objects' half-size as fractions of ``min_sep`` (below 0.5: they never overlap).
    """
    ux, uy = CLASSES[label][1]
    if ux:
        ux = int(rng.choice((-1, 1)))
    r = rng.uniform(*radius) * min_sep
    low, high = r + 1, size - r - 1  # centres keep the whole object inside
    along = rng.uniform(min_sep, max(min_sep, min(high - low, max_sep or math.inf)))
    across = rng.uniform(-MAX_CROSS_RATIO, MAX_CROSS_RATIO) * along
    across = float(np.clip(across, -(high - low), high - low))
    dx, dy = (along * ux + across * uy, along * uy + across * ux)
    # A anywhere that leaves room for B = A + (dx, dy) inside [low, high]^2.
    ax = rng.uniform(max(low, low - dx), min(high, high - dx))
    ay = rng.uniform(max(low, low - dy), min(high, high - dy))
    return (float(ax), float(ay)), (float(ax + dx), float(ay + dy)), float(r)


def draw_image(a: tuple[float, float], b: tuple[float, float], r: float, size: int, rng: np.random.Generator):
    """RGB image with a red disc at ``a`` and a blue square at ``b`` (half-size ``r``) on a noisy grey background."""
    grey = rng.uniform(90, 160)
    pixels = np.full((size, size, 3), grey, dtype=np.float32)
    img = Image.fromarray(np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    red = (int(rng.uniform(210, 255)), int(rng.uniform(0, 40)), int(rng.uniform(0, 40)))
    blue = (int(rng.uniform(0, 40)), int(rng.uniform(0, 40)), int(rng.uniform(210, 255)))
    draw.ellipse([a[0] - r, a[1] - r, a[0] + r, a[1] + r], fill=red)
    draw.rectangle([b[0] - r, b[1] - r, b[0] + r, b[1] + r], fill=blue)
    return img


def write_split(root: Path, split: str, per_class: int, size: int, min_sep: float, rng: np.random.Generator):
    """Writes ``per_class`` PNGs of every class under ``root/split/<class>/`` and ``root/split.json``."""
    samples = []
    for label, name in enumerate(CLASS_NAMES):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a, b, r = sample_geometry(label, size, min_sep, rng)
            path = folder / f"{split}_{label}_{i:05d}.png"
            draw_image(a, b, r, size, rng).save(path)
            samples.append(Sample(str(path.relative_to(root)), label, a, b, r))
    (root / f"{split}.json").write_text(
        json.dumps({"classes": list(CLASS_NAMES), "samples": [asdict(s) for s in samples]}), encoding="utf-8"
    )
    return samples


def make_dataset(
    out: str | Path,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    min_sep: float | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Generates the dataset (see the module docstring); returns the image count per split.

    Args:
        out: dataset root.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        image_size: side of the square images, pixels.
        min_sep: least centre offset along the class's axis, pixels (default: a third of ``image_size``).
        seed: random seed (the same seed gives the same files).

    Raises:
        ValueError: for non-positive counts, an image under 16 px, or a separation that does not fit.
    """
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("--train-per-class and --val-per-class must be >= 1")
    if image_size < 16:
        raise ValueError(f"--image-size must be >= 16, got {image_size}")
    min_sep = image_size / 3 if min_sep is None else float(min_sep)
    if not 4 <= min_sep <= 0.6 * image_size:
        raise ValueError(f"--min-sep must be in [4, {0.6 * image_size:g}] px for {image_size} px images, got {min_sep}")
    root = Path(out)
    rng = np.random.default_rng(seed)
    train = write_split(root, "train", train_per_class, image_size, min_sep, rng)
    val = write_split(root, "val", val_per_class, image_size, min_sep, rng)
    return {"train": len(train), "val": len(val)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = dataset_parser(__doc__, train_per_class=150, val_per_class=50, image_size=48)
    parser.add_argument("--min-sep", type=float, default=None, help="px along the class axis (default: size / 3)")
    return parser


@cli(ValueError)
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    counts = make_dataset(args.out, args.train_per_class, args.val_per_class, args.image_size, args.min_sep, args.seed)
    print(f"wrote {counts['train']} train / {counts['val']} val images, {len(CLASS_NAMES)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
