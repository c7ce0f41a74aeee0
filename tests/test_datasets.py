"""Datasets (folders, tar archives, iNat json layout), transforms and the synthetic dataset generator."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import datasets
import main
from tools.make_synthetic_dataset import class_name, make_dataset
from utils import UserError


def _args(root: Path, **overrides) -> argparse.Namespace:
    args = main.parse_args(["--data-path", str(root), "--input-size", "32", "--device", "cpu"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    make_dataset(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=40, tar=True, seed=1)
    return root


def test_make_synthetic_dataset_writes_real_images_and_tars(synthetic):
    for split, per_class in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (synthetic / split).iterdir())
        assert classes == [class_name(i) for i in range(3)] == ["n00000000", "n00000001", "n00000002"]
        files = sorted((synthetic / split).glob("*/*.jpg"))
        assert len(files) == 3 * per_class
        with Image.open(files[0]) as img:
            assert img.format == "JPEG" and img.size == (40, 40)
        with tarfile.open(synthetic / f"{split}.tar") as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
        assert len(names) == 3 * per_class and all(n.split("/")[0] in classes for n in names)
    a = Image.open(next((synthetic / "train" / "n00000000").iterdir())).convert("RGB")
    b = Image.open(sorted((synthetic / "train" / "n00000000").iterdir())[1]).convert("RGB")
    assert a.tobytes() != b.tobytes(), "images of one class must differ"


def test_make_synthetic_dataset_cli_png(tmp_path):
    from tools.make_synthetic_dataset import main as gen_main

    assert gen_main(["--out", str(tmp_path), "--num-classes", "2", "--train-per-class", "1", "--val-per-class", "1",
                     "--image-size", "16", "--format", "png"]) == 0  # fmt: skip
    assert len(list(tmp_path.glob("*/*/*.png"))) == 4
    assert gen_main(["--out", str(tmp_path), "--num-classes", "0"]) == 2


@pytest.mark.parametrize("load_tar", [False, True])
def test_build_dataset_folder_and_tar(synthetic, load_tar):
    args = _args(synthetic, load_tar=load_tar)
    train, nb = datasets.build_dataset(True, args)
    val, nb_val = datasets.build_dataset(False, args, class_to_idx=train.class_to_idx)
    assert nb == nb_val == 3 and len(train) == 12 and len(val) == 6
    img, target = val[5]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and target == 2
    img, target = train[0]
    assert img.shape == (3, 32, 32) and 0 <= target < 3
    assert sorted(int(val[i][1]) for i in range(len(val))) == [0, 0, 1, 1, 2, 2]


def test_eval_transform_resizes_like_deit():
    args = argparse.Namespace(input_size=224)
    t = datasets.build_transform(False, args)
    out = t(Image.new("RGB", (300, 400)))
    assert out.shape == (3, 224, 224)
    assert t.transforms[0].size == 256  # 224 * 256 / 224


def test_missing_data_path_and_split(tmp_path):
    with pytest.raises(UserError, match="--data-path is required"):
        datasets.build_dataset(True, _args(tmp_path, data_path=None))
    with pytest.raises(UserError, match="--data-path not found"):
        datasets.build_dataset(True, _args(tmp_path / "nope"))
    with pytest.raises(UserError, match="train split folder not found"):
        datasets.build_dataset(True, _args(tmp_path))
    with pytest.raises(UserError, match="tar archive not found"):
        datasets.build_dataset(True, _args(tmp_path, load_tar=True))


def test_empty_class_folder_is_named(tmp_path):
    make_dataset(tmp_path, 2, 1, 1, 16)
    (tmp_path / "train" / "n_empty").mkdir()
    with pytest.raises(UserError, match="no valid file for the classes n_empty"):
        datasets.build_dataset(True, _args(tmp_path))


def test_tar_without_class_folders(tmp_path):
    img = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(img)
    with tarfile.open(tmp_path / "train.tar", "w") as tf:
        tf.add(img, arcname="a.jpg")
    with pytest.raises(UserError, match="outside class folders"):
        datasets.build_dataset(True, _args(tmp_path, load_tar=True))


def test_unreadable_image_names_the_file(tmp_path):
    make_dataset(tmp_path, 2, 1, 1, 16)
    bad = tmp_path / "val" / "n00000001" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    val, _ = datasets.build_dataset(False, _args(tmp_path))
    idx = [i for i, (p, _) in enumerate(val.samples) if p.endswith("broken.jpg")][0]
    with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
        val[idx]


def test_inat_json_layout(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.jpg")
    categories = [{"id": 0, "name": "sp0", "genus": "g"}, {"id": 1, "name": "sp1", "genus": "g"}]
    images = [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "a.jpg"}]
    ann = [{"image_id": 10, "category_id": 0}, {"image_id": 11, "category_id": 1}]
    (tmp_path / "categories.json").write_text(json.dumps(categories))
    for split in ("train", "val"):
        (tmp_path / f"{split}2019.json").write_text(json.dumps({"images": images, "annotations": ann}))
    ds, nb = datasets.build_dataset(False, _args(tmp_path, data_set="INAT19"))
    assert nb == 2 and [t for _, t in ds.samples] == [0, 1]
    _, nb_genus = datasets.build_dataset(True, _args(tmp_path, data_set="INAT19", inat_category="genus"))
    assert nb_genus == 1
