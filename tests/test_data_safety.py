"""Data readers that lose nothing and label nothing wrongly: link cycles, wide images, one extension list for folders
and tars, compressed or odd tars. Every problem is a one-line ``UserError``."""

from __future__ import annotations

import argparse
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
import main
from tools.make_synthetic_dataset import make_dataset
from utils import UserError


def _args(root: Path, **overrides) -> argparse.Namespace:
    args = main.parse_args(["--data-path", str(root), "--input-size", "32", "--device", "cpu"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def _train(root: Path, **overrides):
    return datasets.build_dataset(True, _args(root, **overrides))[0]


# ------------------------------------------------------------------------------------------------------------------
# 6. Symbolic link cycles in class folders are errors naming the link; other links are followed.


@pytest.mark.parametrize("target", ["..", ".", "../..", "sub/.."])
def test_link_cycle_in_a_class_folder_is_named(tmp_path: Path, target: str) -> None:
    make_dataset(tmp_path, 3, 16, 1, 16)
    class_dir = tmp_path / "train" / "n00000000"
    (class_dir / "sub").mkdir()
    link = class_dir / "sub" / "loop" if target == "sub/.." else class_dir / "loop"
    os.symlink(".." if target == "sub/.." else target, link)
    with pytest.raises(UserError, match="a cycle") as info:
        _train(tmp_path)
    assert f"{link} -> " in str(info.value)


def test_cycle_through_two_links_is_named(tmp_path: Path) -> None:
    make_dataset(tmp_path, 2, 4, 1, 16)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(tmp_path / "train" / "n00000000", outside / "back")
    os.symlink(outside, tmp_path / "train" / "n00000000" / "more")
    class_dir = tmp_path / "train" / "n00000000"
    with pytest.raises(UserError, match=f"symbolic link {class_dir / 'more' / 'back'} -> {class_dir} .*a cycle"):
        _train(tmp_path)


def test_links_without_a_cycle_are_followed(tmp_path: Path) -> None:
    """A class folder that is a link, and a link inside a class to more images elsewhere: counted once each."""
    make_dataset(tmp_path / "a", 2, 4, 1, 16)
    make_dataset(tmp_path / "b", 1, 3, 1, 16)
    train = tmp_path / "a" / "train"
    os.rename(train / "n00000001", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", train / "n00000001")
    os.symlink(tmp_path / "b" / "train" / "n00000000", train / "n00000000" / "extra")
    dataset = _train(tmp_path / "a")
    assert sorted(t for _, t in dataset.samples) == [0] * 7 + [1] * 4
    assert all(os.path.isfile(p) for p, _ in dataset.samples)


# ------------------------------------------------------------------------------------------------------------------
# 7. Images with more than 8 bits per sample keep their range.


def _gradient(high: float, dtype: type) -> np.ndarray:
    return np.linspace(0, high, 32 * 32).reshape(32, 32).astype(dtype)


@pytest.mark.parametrize(
    ("kind", "make", "expected_mode"),
    [
        ("16-bit PNG", lambda p: Image.fromarray(_gradient(65535, np.uint16)).save(p.with_suffix(".png")), "I;16"),
        ("16-bit TIFF", lambda p: Image.fromarray(_gradient(65535, np.uint16)).save(p.with_suffix(".tif")), "I;16"),
        ("32-bit int TIFF", lambda p: Image.fromarray(_gradient(65535, np.int32)).save(p.with_suffix(".tif")), "I"),
        ("float TIFF", lambda p: Image.fromarray(_gradient(1.0, np.float32)).save(p.with_suffix(".tif")), "F"),
    ],
)
def test_wide_images_are_scaled_to_8_bits(tmp_path: Path, kind: str, make, expected_mode: str) -> None:
    make(tmp_path / "img")
    path = next(tmp_path.glob("img.*"))
    with Image.open(path) as img:
        assert img.mode == expected_mode, kind
    rgb = np.asarray(datasets.load_rgb(str(path))).astype(np.int64)
    expected = np.rint(np.linspace(0, 255, 32 * 32).reshape(32, 32))
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 0] - expected).max() <= 1, kind
    assert (rgb == 255).mean() < 0.01 and rgb.max() == 255 and rgb.min() == 0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.full((8, 8), 3.5, np.float32), r"float samples must lie in \[0, 1\].*3\.5"),
        (np.full((8, 8), np.nan, np.float32), r"float samples must lie in \[0, 1\]"),
        (np.full((8, 8), -5, np.int32), "integer samples must lie in 0..65535"),
    ],
)
def test_wide_images_out_of_range_are_refused(tmp_path: Path, values: np.ndarray, expected: str) -> None:
    path = tmp_path / "img.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(UserError, match=f"cannot read image {path}: {expected}"):
        datasets.load_rgb(str(path))


def test_wide_images_in_a_folder_dataset(tmp_path: Path) -> None:
    for c, value in (("a", 1000), ("b", 60000)):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(np.full((40, 40), value, np.uint16)).save(tmp_path / "train" / c / "x.png")
    dataset = datasets.ImageFolder(str(tmp_path / "train"), None)
    assert [int(np.asarray(dataset[i][0])[0, 0, 0]) for i in range(2)] == [round(1000 / 257), round(60000 / 257)]


# ------------------------------------------------------------------------------------------------------------------
# 8. One extension list for folders and tars; compressed or odd tars are user errors.


def _write_images(root: Path, ext: str, per_class: int = 2) -> None:
    for c in ("n0", "n1"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(root / c / f"{i}{ext}")


def _tar(folder: Path, tar_path: Path, mode: str = "w") -> None:
    with tarfile.open(tar_path, mode) as tf:
        for c in sorted(p.name for p in folder.iterdir()):
            tf.add(folder / c, arcname=c)


@pytest.mark.parametrize("ext", datasets.IMG_EXTENSIONS)
def test_folder_and_tar_read_the_same_images(tmp_path: Path, ext: str) -> None:
    _write_images(tmp_path / "train", ext)
    (tmp_path / "train" / "n1" / "notes.txt").write_text("not an image")
    _tar(tmp_path / "train", tmp_path / "train.tar")
    folder = datasets.ImageFolder(str(tmp_path / "train"), None)
    tar = datasets.TarImageDataset(str(tmp_path / "train.tar"), None)
    assert folder.class_to_idx == tar.class_to_idx == {"n0": 0, "n1": 1}
    assert len(folder) == len(tar) == 4
    for dataset in (folder, tar):
        images, labels = zip(*(dataset[i] for i in range(4)))
        assert sorted(labels) == [0, 0, 1, 1] and all(img.size == (16, 16) for img in images)


def test_mixed_extensions_tar_keeps_every_class(tmp_path: Path) -> None:
    _write_images(tmp_path / "src" / "a", ".jpg")
    _write_images(tmp_path / "src" / "b", ".bmp")
    os.rename(tmp_path / "src" / "b" / "n1", tmp_path / "src" / "a" / "n_bmp")
    _tar(tmp_path / "src" / "a", tmp_path / "train.tar")
    dataset = _train(tmp_path, load_tar=True)
    assert dataset.classes == ["n0", "n1", "n_bmp"] and len(dataset) == 6
    assert sorted(dataset.targets) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("mode", "kind"), [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_compressed_tar_is_refused(tmp_path: Path, mode: str, kind: str) -> None:
    _write_images(tmp_path / "src", ".jpg")
    _tar(tmp_path / "src", tmp_path / "train.tar", mode)
    with pytest.raises(UserError, match=f"{tmp_path / 'train.tar'} is {kind}-compressed.*decompress it"):
        _train(tmp_path, load_tar=True)


@pytest.mark.parametrize("content", ["unsupported images", "nested tar", "not a tar"])
def test_tar_without_readable_images(tmp_path: Path, content: str) -> None:
    tar_path = tmp_path / "train.tar"
    if content == "not a tar":
        tar_path.write_bytes(b"plain text, " * 100)
        expected = "cannot read tar archive"
    elif content == "unsupported images":
        (tmp_path / "src" / "n0").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "src" / "n0" / "a.gif")
        _tar(tmp_path / "src", tar_path)
        expected = "holds no image files \\(.jpg/.jpeg/.png"
    else:
        _write_images(tmp_path / "src", ".jpg")
        _tar(tmp_path / "src", tmp_path / "n2.tar")
        os.rename(tmp_path / "n2.tar", tmp_path / "src" / "n0" / "n2.tar")
        _tar(tmp_path / "src", tar_path)
        expected = "holds tar archives \\(e.g. n0/n2.tar\\)"
    with pytest.raises(UserError, match=expected):
        _train(tmp_path, load_tar=True)


# ------------------------------------------------------------------------------------------------------------------
# 9. Class folders that are broken links, loops of links or links to the split: one-line errors.


@pytest.mark.parametrize("link", ["to itself", "to the split", "pair loop", "broken"])
def test_bad_class_folder_link(tmp_path: Path, capsys: pytest.CaptureFixture, link: str) -> None:
    make_dataset(tmp_path, 2, 2, 1, 16)
    train = tmp_path / "train"
    if link == "to itself":
        os.symlink("n_self", train / "n_self")
        expected = "n_self -> n_self cannot be resolved"
    elif link == "to the split":
        os.symlink(".", train / "n_dot")
        expected = r"symbolic link .*n_dot -> \. leads to a folder that holds it \(a cycle\)"
    elif link == "pair loop":
        os.symlink("n_b", train / "n_a")
        os.symlink("n_a", train / "n_b")
        expected = "n_a -> n_b cannot be resolved"
    else:
        os.symlink(tmp_path / "unmounted", train / "n_gone")
        expected = "class folder .*n_gone -> .* cannot be resolved"
    with pytest.raises(UserError, match=expected):
        _train(tmp_path)
    argv = ["--model", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--data-path", str(tmp_path), "--device",
            "cpu", "--input-size", "32", "--num_workers", "0", "--epochs", "1"]  # fmt: skip
    assert main.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
