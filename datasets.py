"""Datasets and transforms of the training pipeline (DeiT's ``datasets.py``, rewritten).

Supported ``--data-set`` values:

* ``IMNET``: ImageFolder layout ``<data-path>/train/<class>/*`` and ``<data-path>/val/<class>/*``; with
  ``--load-tar``, ``<data-path>/train.tar`` and ``<data-path>/val.tar`` holding the same class folders, read in
  place through timm's tar scan (no extraction).
* ``CIFAR``: CIFAR-100 through torchvision, from ``<data-path>`` (not downloaded).
* ``INAT`` / ``INAT19``: iNaturalist 2018 / 2019 in DeiT's json layout (see :class:`INatDataset`); ``--inat-category``
  picks the taxonomy level used as the label (``name`` = species).

The number of classes always comes from the data (class folders, tar members, json categories).
Problems with the data raise ``utils.UserError`` with a message naming the path.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.readers.reader_image_in_tar import extract_tarinfos
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS  # the image files read, in folders and in tars alike

from utils import UserError

DATA_SETS: tuple[str, ...] = ("CIFAR", "IMNET", "INAT", "INAT19")
# Pillow modes with over 8 bits per sample (16-bit PNG/TIFF, 32-bit int or float TIFF): ``convert`` clips them at 255.
_WIDE_MODES: frozenset[str] = frozenset(("I;16", "I;16L", "I;16B", "I;16N", "I", "F"))

Transform = Callable[[Image.Image], Any]


def load_rgb(path: str, fileobj: Any = None) -> Image.Image:
    """Opens and decodes an image as RGB; images with more than 8 bits per sample are scaled (see :func:`to_8bit`).

    Raises:
        UserError: naming ``path`` when the file cannot be read or decoded, or has samples out of range.
    """
    try:
        with Image.open(fileobj if fileobj is not None else path) as img:
            return (to_8bit(img) if img.mode in _WIDE_MODES else img).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def to_8bit(img: Image.Image) -> Image.Image:
    """A greyscale (L) image of the samples of a 16-bit, 32-bit integer or float image, scaled with their range kept.

    Integer images are read as 16-bit, ``0..65535 -> 0..255`` (Pillow opens 16-bit PNGs and TIFFs as ``I;16`` or
    ``I``); float images must hold values in ``[0, 1]``, ``-> 0..255``. Values outside these ranges have no
    standard meaning and are refused rather than clipped or stretched per image.

    Raises:
        ValueError: samples outside the range of the mode.
    """
    samples = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        high, rule = 1.0, "float samples must lie in [0, 1]"
    else:
        high, rule = 65535.0, "integer samples must lie in 0..65535 (16 bits)"
    if samples.size and not (np.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= high):
        raise ValueError(
            f"{rule}, these range from {samples.min():g} to {samples.max():g}; convert the image to 8 bits per channel"
        )
    return Image.fromarray(np.rint(samples * (255 / high)).astype(np.uint8))


def _unlistable(e: OSError) -> None:
    raise UserError(f"cannot list folder {e.filename}: {e.strerror}")


def check_links(root: str) -> None:
    """Refuses the symbolic links under ``root`` that torchvision's folder walk would follow forever or skip silently.

    A link to a folder that holds the folder it is in (or one above it, up to ``root``) is a cycle: following it
    reads the same images, or other classes' images, again and again. A class folder that is a broken link, or a
    loop of links, would drop a class and shift the labels of the classes after it. Other links are followed.

    Raises:
        UserError: naming the link and its target, or a folder that cannot be listed.
    """
    chains = {root: (os.path.realpath(root),)}  # folder -> real paths of the folders from root down to it
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=_unlistable):
        chain = chains.pop(folder)
        for name in sorted(dirs):  # sorted: the first problem is the one reported
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if any(os.path.commonpath([real, c]) == real for c in chain):
                raise UserError(
                    f"symbolic link {path} -> {os.readlink(path)} leads to a folder that holds it (a cycle), so its "
                    "images would be read again and again: remove the link or point it elsewhere"
                )
            chains[path] = (*chain, real)
        for name in sorted(files) if folder == root else ():
            path = os.path.join(root, name)
            if not os.path.exists(path):  # follows links: False for a broken link and a loop of links
                raise UserError(f"class folder {path} -> {os.readlink(path)} cannot be resolved: fix or remove it")


def number_classes(classes: list[str], train_class_to_idx: dict[str, int] | None, where: str) -> dict[str, int]:
    """The sorted ``classes`` numbered in order, or as in the training split (a ``UserError`` if it lacks some)."""
    if train_class_to_idx is None:
        return {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(classes) - set(train_class_to_idx))
    if unknown:
        raise UserError(f"classes in {where} that the training split lacks: {', '.join(unknown[:10])}")
    return {c: train_class_to_idx[c] for c in classes}


class ImageFolder(tv_datasets.ImageFolder):
    """torchvision's ``ImageFolder`` over :func:`check_links`, with :func:`load_rgb` and a given class mapping.

    Args:
        root: Split folder with one sub-folder per class.
        transform: Image transform.
        class_to_idx: The training split's mapping, so that validation labels agree with it; None to build one.

    Raises:
        UserError: no class folder, a class folder without image files, a class that the training split lacks, or
            see :func:`check_links`.
    """

    def __init__(self, root: str, transform: Transform | None, class_to_idx: dict[str, int] | None = None) -> None:
        self.train_class_to_idx = class_to_idx
        check_links(root)
        try:
            super().__init__(root, transform=transform, loader=load_rgb)
        except FileNotFoundError as e:  # torchvision's errors for no class folder and for empty class folders
            raise UserError(f"{e} (expected {root}/<class>/<image>)") from None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        return classes, number_classes(classes, self.train_class_to_idx, directory)


# Leading bytes of compressed files: (format and its tool, file suffix).
_COMPRESSED: dict[bytes, tuple[str, str]] = {
    b"\x1f\x8b": ("gzip", "gz"), b"BZh": ("bzip2", "bz2"), b"\xfd7zXZ\x00": ("xz", "xz"), b"(\xb5/\xfd": ("zstd", "zst")
}  # fmt: skip


def _check_uncompressed(tar_path: str) -> None:
    """Raises a ``UserError`` saying how to decompress ``tar_path`` if it is a compressed file."""
    with open(tar_path, "rb") as f:
        head = f.read(6)
    for magic, (kind, suffix) in _COMPRESSED.items():
        if head.startswith(magic):
            raise UserError(
                f"{tar_path} is {kind}-compressed; --load-tar reads each image in place, which needs an uncompressed "
                f"tar: decompress it (mv {tar_path} {tar_path}.{suffix} && {kind} -d {tar_path}.{suffix})"
            )


class TarImageDataset(Dataset):
    """Images read in place from an uncompressed tar archive whose members sit in class folders (``<class>/<image>``).

    timm's ``extract_tarinfos`` scans the member headers once for :data:`IMG_EXTENSIONS` (without its cache, which
    is reused even after the tar changed); each sample is then read at its offset. Classes are numbered as folders.

    Args:
        tar_path: The ``.tar`` file.
        transform: Image transform.
        class_to_idx: The training split's mapping; None to build one from this archive.

    Raises:
        UserError: if the archive is missing, compressed or unreadable, holds no image, holds tar archives, has
            images outside class folders, or classes that the training split lacks.
    """

    def __init__(self, tar_path: str, transform: Transform | None, class_to_idx: dict[str, int] | None = None) -> None:
        if not os.path.isfile(tar_path):
            raise UserError(f"tar archive not found: {tar_path} (--load-tar reads <data-path>/train.tar and val.tar)")
        _check_uncompressed(tar_path)
        try:
            samples, targets, timm_idx, _ = extract_tarinfos(tar_path, cache_tarinfo=False, extensions=IMG_EXTENSIONS)
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"cannot read tar archive {tar_path}: {e}") from None
        except ValueError:  # timm unpacks an empty list of samples
            raise UserError(f"{tar_path} holds no image files ({'/'.join(IMG_EXTENSIONS)}) in class folders") from None
        nested = [child.name for _, _, child in samples if child is not None]
        if nested:  # timm reads tars inside the tar as more classes; the layout has none
            raise UserError(f"{tar_path} holds tar archives (e.g. {nested[0]}): extract them to <class>/<image>")
        names = {i: name for name, i in timm_idx.items()}
        loose = [ti.name for (ti, _, _), t in zip(samples, targets) if names[t] in ("", ".")]
        if loose:
            raise UserError(f"{tar_path} has images outside class folders (e.g. {loose[0]}); expected <class>/<image>")
        self.classes = sorted(timm_idx)
        self.class_to_idx = number_classes(self.classes, class_to_idx, tar_path)
        self.members = [ti for ti, _, _ in samples]
        self.targets = [self.class_to_idx[names[t]] for t in targets]
        self.tar_path = tar_path
        self.transform = transform
        self._pid = -1  # the process that opened self._tar: none yet

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict[str, Any]:
        """Without the open archive, which stays in its process (spawned DataLoader workers open their own)."""
        return {**self.__dict__, "_tar": None, "_pid": -1}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self._pid != os.getpid():  # one open archive per process: DataLoader workers must not share its offset
            self._tar, self._pid = tarfile.open(self.tar_path), os.getpid()  # noqa: SIM115 (open while in use)
        member = self.members[index]
        img = load_rgb(f"{self.tar_path}:{member.name}", fileobj=self._tar.extractfile(member))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class INatDataset(tv_datasets.DatasetFolder):
    """iNaturalist 2018/2019 in DeiT's json layout: torchvision's ``DatasetFolder`` with its classes and samples read
    from the json files. Labels are the sorted distinct values of ``category`` among the *training* annotations, as
    DeiT does; image paths are relative to ``root``.

    Args:
        root: Folder with ``train{year}.json``, ``val{year}.json``, ``categories.json`` and the images.
        train: Training or validation split.
        year: 2018 or 2019.
        category: Key of ``categories.json`` entries (``kingdom``, ..., ``genus``, ``name``).
        transform: Image transform.
    """

    def __init__(self, root: str, train: bool, year: int, category: str, transform: Transform | None) -> None:
        self.train, self.year, self.category = train, year, category
        try:
            super().__init__(root, load_rgb, transform=transform)
        except KeyError as e:
            raise UserError(f"iNaturalist json in {root} lacks key {e} (inat-category {category!r})") from None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        self.label_of = {c["id"]: c[self.category] for c in _read_json(os.path.join(directory, "categories.json"))}
        self._train_json = _read_json(os.path.join(directory, f"train{self.year}.json"))
        names = sorted({self.label_of[a["category_id"]] for a in self._train_json["annotations"]})
        return names, {n: i for i, n in enumerate(names)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *_: Any, **__: Any) -> list[tuple[str, int]]:
        data = self._train_json if self.train else _read_json(os.path.join(directory, f"val{self.year}.json"))
        del self._train_json  # not kept (nor pickled for DataLoader workers)
        labels = {a["image_id"]: class_to_idx[self.label_of[a["category_id"]]] for a in data["annotations"]}
        return [(os.path.join(directory, im["file_name"]), labels[im["id"]]) for im in data["images"]]


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"iNaturalist annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_dataset(
    is_train: bool, args: argparse.Namespace, class_to_idx: dict[str, int] | None = None
) -> tuple[Dataset, int]:
    """``(dataset, number of classes)`` of the training or validation split named by ``args.data_set``.

    Args:
        is_train: Training split (with training augmentation) or validation split.
        args: Parsed flags (``data_set``, ``data_path``, ``load_tar``, ``inat_category`` and the transform flags).
        class_to_idx: For the validation split of folder/tar data: the training mapping, so labels agree.
    """
    if not args.data_path:
        raise UserError("--data-path is required")
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data-path not found: {args.data_path}")
    transform = build_transform(is_train, args)
    split = "train" if is_train else "val"
    if args.data_set == "CIFAR":
        try:
            dataset = tv_datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise UserError(f"CIFAR-100 not found in {args.data_path}: {e}") from None
        return dataset, len(dataset.classes)
    if args.data_set == "IMNET":
        if args.load_tar:
            dataset = TarImageDataset(os.path.join(args.data_path, f"{split}.tar"), transform, class_to_idx)
        else:
            root = os.path.join(args.data_path, split)
            if not os.path.isdir(root):
                raise UserError(f"{split} split folder not found: {root} (expected {root}/<class>/<image>)")
            dataset = ImageFolder(root, transform, class_to_idx)
        return dataset, len(class_to_idx or dataset.class_to_idx)
    if args.data_set in ("INAT", "INAT19"):
        year = 2018 if args.data_set == "INAT" else 2019
        dataset = INatDataset(args.data_path, is_train, year, args.inat_category, transform)
        return dataset, len(dataset.classes)
    raise UserError(f"unknown --data-set {args.data_set!r}; choose from {', '.join(DATA_SETS)}")


# Ops of timm's ``auto_augment`` that change pixel values only (no geometry): ImageOps implements them for L and
# RGB images, so images with alpha get them on their colour bands, with the alpha band kept as it was.
_COLOUR_OPS = frozenset(
    ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
     "SolarizeIncreasing", "SolarizeAdd")
)  # fmt: skip


def _black(img: Image.Image, *_: Any, **__: Any) -> Image.Image:
    return Image.new(img.mode, img.size)


class ModeSafeAugmentOp:
    """timm's AutoAugment/RandAugment image function (``AugmentOp.aug_fn``) made safe on Pillow 13 for L, LA, RGB and
    RGBA images, each failure turned into what the op meant:

    * "keep 0 bits" (``PosterizeIncreasing`` at magnitude 10, reached by DeiT's ``rand-m9-mstd0.5-inc1``; ``v0``'s
      ``Posterize`` below 2.5) raises on Pillow 13: it gives the black image of older Pillow and of TF's versions;
    * geometric ops fill with the RGB mean, which Pillow refuses for L images: L gets the mean's grey;
    * ImageOps' point ops refuse images with alpha: those get the op on their colour bands.

    Args:
        name: timm's op name (``AugmentOp.name``).
        fn: timm's function for it (``AugmentOp.aug_fn``).
    """

    def __init__(self, name: str, fn: Callable[..., Image.Image]) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, img: Image.Image, *level: Any, **kwargs: Any) -> Image.Image:
        fn = self.fn
        if self.name.startswith("Posterize") and level and level[0] <= 0:
            fn = _black
        fill = kwargs.get("fillcolor")
        if img.mode in ("L", "LA") and isinstance(fill, tuple):
            kwargs = {**kwargs, "fillcolor": round(sum(fill[:3]) / len(fill[:3]))}
        if img.mode in ("LA", "RGBA") and self.name in _COLOUR_OPS:
            out = fn(img.convert(img.mode[:-1]), *level, **kwargs)
            out.putalpha(img.getchannel("A"))
            return out
        return fn(img, *level, **kwargs)


def make_augment_safe(transform: Any) -> Any:
    """Wraps, in place, every timm ``AugmentOp`` in ``transform`` (found through ``Compose.transforms``, ``ops`` and
    ``AutoAugment.policy``) in a :class:`ModeSafeAugmentOp`; timm's module stays untouched. Returns ``transform``."""
    if isinstance(transform, AugmentOp):
        if not isinstance(transform.aug_fn, ModeSafeAugmentOp):
            transform.aug_fn = ModeSafeAugmentOp(transform.name, transform.aug_fn)
    elif isinstance(transform, (list, tuple)):
        for t in transform:
            make_augment_safe(t)
    else:
        for attr in ("transforms", "ops", "policy"):
            make_augment_safe(getattr(transform, attr, ()))
    return transform


def build_transform(is_train: bool, args: argparse.Namespace) -> Transform:
    """DeiT's transforms.

    Training: timm's ``create_transform`` (random-resized crop, flip, RandAugment, colour jitter, random erasing).
    Evaluation: resize the short side to ``input_size * 256 / 224``, centre crop, normalize with ImageNet stats.
    At 32 px and below (CIFAR-like inputs) DeiT swaps the random-resized crop for a padded random crop and skips
    the eval resize; here the images are also resized to ``input_size`` first so other image sizes work too.
    """
    size = int(args.input_size)
    small = size <= 32
    bicubic = transforms.InterpolationMode.BICUBIC
    if is_train:
        transform = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=args.color_jitter or None,
            auto_augment=None if str(args.aa).lower() in ("", "none") else args.aa,
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
        )
        make_augment_safe(transform)
        if small:  # DeiT's padded random crop in place of the random-resized crop
            crop = [transforms.Resize(size, interpolation=bicubic), transforms.RandomCrop(size, padding=4)]
            transform.transforms[0] = transforms.Compose(crop)
        return transform
    resize = size if small else int(256 / 224 * size)
    steps = [transforms.Resize(resize, interpolation=bicubic), transforms.CenterCrop(size), transforms.ToTensor()]
    return transforms.Compose([*steps, transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
