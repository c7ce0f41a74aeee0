"""Datasets and transforms of the training pipeline (DeiT's ``datasets.py``, rewritten).

Supported ``--data-set`` values:

* ``IMNET``: ImageFolder layout ``<data-path>/train/<class>/*`` and ``<data-path>/val/<class>/*``; with
  ``--load-tar``, ``<data-path>/train.tar`` and ``<data-path>/val.tar`` holding the same class folders, read in
  place through timm's tar reader (no extraction).
* ``CIFAR``: CIFAR-100 through torchvision, from ``<data-path>`` (not downloaded).
* ``INAT`` / ``INAT19``: iNaturalist 2018 / 2019 in DeiT's json layout: ``<data-path>/train{year}.json``,
  ``<data-path>/val{year}.json`` and ``<data-path>/categories.json``, image paths relative to ``<data-path>``;
  ``--inat-category`` picks the taxonomy level used as the label (``name`` = species).

The number of classes always comes from the data (class folders, tar members, json categories).
Problems with the data raise ``utils.UserError`` with a message naming the path.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_in_tar import ReaderImageInTar, extract_tarinfos
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from utils import UserError

DATA_SETS: tuple[str, ...] = ("CIFAR", "IMNET", "INAT", "INAT19")
# The image files read, in folders and in tar archives alike (timm's tar reader is given this list).
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow modes with more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer or float TIFF), which
# ``convert("RGB")`` clips to 255 instead of scaling.
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
    samples = np.asarray(img)
    if img.mode == "F":
        if samples.size and not (np.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= 1):
            raise ValueError(
                f"float samples must lie in [0, 1], these range from {samples.min():g} to {samples.max():g}; "
                "convert the image to 8 bits per channel"
            )
        scaled = samples.astype(np.float64) * 255
    else:
        if samples.size and not (samples.min() >= 0 and samples.max() <= 65535):
            raise ValueError(
                f"integer samples must lie in 0..65535 (16 bits), these range from {samples.min()} to "
                f"{samples.max()}; convert the image to 8 bits per channel"
            )
        scaled = samples.astype(np.float64) * (255 / 65535)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise UserError(
            f"{what} not found: {path} (expected <data-path>/train/<class>/* and <data-path>/val/<class>/*)"
        )


def _link_text(path: str) -> str:
    """``path -> target`` for a symbolic link, ``path`` otherwise."""
    try:
        return f"{path} -> {os.readlink(path)}"
    except OSError:
        return path


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder, following symbolic links.

    Raises:
        UserError: a link that cannot be resolved (it points to itself, or into a loop of links).
    """
    try:
        return entry.is_dir()
    except OSError as e:
        raise UserError(
            f"symbolic link {_link_text(entry.path)} cannot be resolved ({e.strerror}): fix or remove it"
        ) from None


def _contains(folder: str, path: str) -> bool:
    """Whether the real path ``folder`` is ``path`` or one of its parents."""
    return os.path.commonpath([folder, path]) == folder


def folder_classes(root: str) -> list[str]:
    """Sorted class folder names under ``root`` (links to folders count; hidden names do not).

    Raises:
        UserError: when ``root`` has no class folder, or a class entry is a broken link or a link to a folder that
            holds ``root`` (which would make the class hold every class).
    """
    real_root = os.path.realpath(root)
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):  # sorted: the first problem is the one reported
        if entry.name.startswith("."):
            continue
        is_dir = _is_dir(entry)
        if not is_dir and entry.is_symlink() and not os.path.exists(entry.path):
            raise UserError(f"class folder {_link_text(entry.path)} is a broken symbolic link: fix or remove it")
        if not is_dir:
            continue
        if _contains(os.path.realpath(entry.path), real_root):
            raise UserError(
                f"class folder {_link_text(entry.path)} links to a folder that holds {root} itself (a cycle): "
                "make it point to that class's own images"
            )
        classes.append(entry.name)
    if not classes:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    return sorted(classes)


def image_files(class_dir: str) -> list[str]:
    """The image files under ``class_dir``, following links, in torchvision's order (folder by folder, sorted).

    Raises:
        UserError: a link to a folder that holds the folder it is in, or one of that folder's parents (a cycle:
            following it would read the same images, or other classes' images, again and again), naming the link;
            a link that cannot be resolved; a folder that cannot be listed.
    """
    found: list[tuple[str, list[str]]] = []

    def visit(folder: str, chain: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"cannot list folder {folder}: {e.strerror}") from None
        files = []
        for entry in entries:
            if not _is_dir(entry):
                if _is_image_file(entry.name):
                    files.append(entry.name)
                continue
            real = os.path.realpath(entry.path)
            if any(_contains(real, c) for c in chain):
                raise UserError(
                    f"symbolic link {_link_text(entry.path)} leads back to a folder that holds it (a cycle), so the "
                    f"class folder {class_dir} would hold its own images (or other classes') again and again: "
                    "remove the link or point it elsewhere"
                )
            visit(entry.path, (*chain, real))
        found.append((folder, sorted(files)))

    visit(class_dir, (os.path.realpath(class_dir),))
    return [os.path.join(folder, name) for folder, names in sorted(found) for name in names]


def build_image_folder(root: str, transform: Transform | None, class_to_idx: dict[str, int] | None) -> Dataset:
    """An ``ImageFolder`` over ``root`` whose images fail with a ``UserError`` naming the file.

    Args:
        root: Split folder with one sub-folder per class.
        transform: Image transform.
        class_to_idx: The training split's mapping, so that validation labels agree with it; None to build one.
    """
    classes = folder_classes(root)
    if class_to_idx is not None:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise UserError(f"classes in {root} that the training split lacks: {', '.join(unknown[:10])}")

    mapping = {c: i for i, c in enumerate(classes)} if class_to_idx is None else {c: class_to_idx[c] for c in classes}
    return _ImageFolder(root, classes, mapping, transform)


class _ImageFolder(tv_datasets.ImageFolder):
    """``ImageFolder`` with a given class mapping, a folder walk that refuses link cycles (:func:`image_files`) and
    a loader whose errors name the file (picklable for workers)."""

    def __init__(self, root: str, classes: list[str], class_to_idx: dict[str, int], transform: Transform | None):
        self._given = (classes, class_to_idx)
        super().__init__(root, transform=transform, loader=load_rgb, is_valid_file=_is_image_file)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given

    @staticmethod
    def make_dataset(
        directory: str,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """``(path, class index)`` of the :data:`IMG_EXTENSIONS` files of every class (the other arguments of
        torchvision's signature are not used).

        Raises:
            UserError: a class folder without image files, or see :func:`image_files`.
        """
        samples, empty = [], []
        for name in sorted(class_to_idx):
            files = image_files(os.path.join(directory, name))
            if not files:
                empty.append(name)
            samples += [(path, class_to_idx[name]) for path in files]
        if empty:
            shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
            raise UserError(
                f"{len(empty)} empty class folder(s) in {directory} (no {'/'.join(IMG_EXTENSIONS)} file): {shown}"
            )
        return samples


def _is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------------------
# Tar archives


class _TarReader(ReaderImageInTar):
    """timm's ``ReaderImageInTar`` for one uncompressed tar, scanning for :data:`IMG_EXTENSIONS`.

    timm's constructor scans for timm's own extensions (``.png/.jpg/.jpeg``) and, for tars over 10 GB, keeps the
    scan in a ``_<name>_tarinfos.pickle`` beside the tar that it reuses even after the tar changed; this one passes
    the extensions and scans every time (the layout check scans the archive anyway).
    """

    def __init__(self, tar_path: str, class_to_idx: dict[str, int]) -> None:
        Reader.__init__(self)
        self.root = tar_path
        self.samples, self.targets, self.class_name_to_idx, tarfiles = extract_tarinfos(
            tar_path, class_name_to_idx=dict(class_to_idx), cache_tarinfo=False, extensions=IMG_EXTENSIONS
        )
        self.class_idx_to_name = {v: k for k, v in self.class_name_to_idx.items()}
        self.root_is_tar = True
        self.tar_state = tarfiles[0][1]
        self.cache_tarfiles = True


class TarImageDataset(Dataset):
    """Images read in place from an uncompressed tar archive whose members sit in class folders (``<class>/<image>``).

    Uses timm's ``ReaderImageInTar`` (one scan of the member headers, then random access per sample), given the
    extensions of the folder reader, :data:`IMG_EXTENSIONS`.

    Args:
        tar_path: The ``.tar`` file.
        transform: Image transform.
        class_to_idx: The training split's mapping; None to build one from this archive.
    """

    def __init__(self, tar_path: str, transform: Transform | None, class_to_idx: dict[str, int] | None = None) -> None:
        if not os.path.isfile(tar_path):
            raise UserError(f"tar archive not found: {tar_path} (--load-tar reads <data-path>/train.tar and val.tar)")
        names, count = _scan_tar(tar_path)
        if class_to_idx is not None:
            unknown = sorted(set(names) - set(class_to_idx))
            if unknown:
                raise UserError(f"classes in {tar_path} that the training split lacks: {', '.join(unknown[:10])}")
        mapping = class_to_idx if class_to_idx is not None else {c: i for i, c in enumerate(names)}
        self.reader = _TarReader(tar_path, mapping)
        if len(self.reader) != count:  # both scans use IMG_EXTENSIONS and the same label rule
            raise RuntimeError(f"timm's tar reader found {len(self.reader)} images in {tar_path}, the scan {count}")
        self.tar_path = tar_path
        self.transform = transform
        self.classes = names
        self.class_to_idx = mapping

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        fileobj, target = self.reader[index]
        name = f"{self.tar_path}:{self.reader.samples[index][0].name}"
        img = load_rgb(name, fileobj=fileobj)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(target)


# Leading bytes of compressed files: (magic, format, file suffix, tool).
_COMPRESSED: tuple[tuple[bytes, str, str, str], ...] = (
    (b"\x1f\x8b", "gzip", "gz", "gzip"),
    (b"BZh", "bzip2", "bz2", "bzip2"),
    (b"\xfd7zXZ\x00", "xz", "xz", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zst", "zstd"),
)


def _check_uncompressed(tar_path: str) -> None:
    """Raises a ``UserError`` saying how to decompress ``tar_path`` if it is a compressed file."""
    with open(tar_path, "rb") as f:
        head = f.read(6)
    for magic, kind, suffix, tool in _COMPRESSED:
        if head.startswith(magic):
            raise UserError(
                f"{tar_path} is {kind}-compressed; --load-tar reads each image in place, which needs an uncompressed "
                f"tar: decompress it (mv {tar_path} {tar_path}.{suffix} && {tool} -d {tar_path}.{suffix})"
            )


def _scan_tar(tar_path: str) -> tuple[list[str], int]:
    """Sorted class names (the folder holding each image) of an uncompressed tar archive, and its number of images.

    Images are the members with an :data:`IMG_EXTENSIONS` name, as for folders (and for the tar reader).

    Raises:
        UserError: if the archive is compressed or unreadable, holds no image (other files are named), holds tar
            archives, or has images outside class folders.
    """
    import tarfile

    _check_uncompressed(tar_path)
    classes: set[str] = set()
    loose: list[str] = []
    others: list[str] = []
    count = 0
    try:
        with tarfile.open(tar_path, mode="r|") as tf:  # the tar reader's own mode: uncompressed, streamed
            for ti in tf:
                if not ti.isfile():
                    continue
                if ti.name.lower().endswith(".tar"):  # timm would read these as more classes; the layout has none
                    raise UserError(
                        f"{tar_path} holds tar archives (e.g. {ti.name}), which --load-tar does not read: extract "
                        "them so that the images are members <class>/<image>"
                    )
                if not _is_image_file(ti.name):
                    others.append(ti.name)
                    continue
                count += 1
                folder = os.path.basename(os.path.dirname(os.path.normpath(ti.name)))
                if folder in ("", "."):
                    loose.append(ti.name)
                else:
                    classes.add(folder)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read tar archive {tar_path}: {e}") from None
    if loose:
        raise UserError(
            f"{tar_path} has images outside class folders (e.g. {loose[0]}); expected members <class>/<image>"
        )
    if not classes:
        found = f"; it holds {len(others)} other file(s), e.g. {others[0]}" if others else ""
        raise UserError(f"{tar_path} holds no image files ({'/'.join(IMG_EXTENSIONS)}) in class folders{found}")
    return sorted(classes), count


# ----------------------------------------------------------------------------------------------------------------
# iNaturalist (DeiT json layout)


class INatDataset(Dataset):
    """iNaturalist 2018/2019 in DeiT's json layout, labelled at the taxonomy level ``category``.

    Labels are the sorted distinct values of ``category`` among the *training* annotations, as DeiT does.

    Args:
        root: Folder with ``train{year}.json``, ``val{year}.json``, ``categories.json`` and the images.
        train: Training or validation split.
        year: 2018 or 2019.
        category: Key of ``categories.json`` entries (``kingdom``, ..., ``genus``, ``name``).
        transform: Image transform.
    """

    def __init__(self, root: str, train: bool, year: int, category: str, transform: Transform | None) -> None:
        self.root = root
        self.transform = transform
        split = "train" if train else "val"
        data = _read_json(os.path.join(root, f"{split}{year}.json"))
        train_data = data if train else _read_json(os.path.join(root, f"train{year}.json"))
        categories = {c["id"]: c for c in _read_json(os.path.join(root, "categories.json"))}
        try:
            names = sorted({categories[a["category_id"]][category] for a in train_data["annotations"]})
            self.class_to_idx = {n: i for i, n in enumerate(names)}
            labels = {a["image_id"]: a["category_id"] for a in data["annotations"]}
            self.samples = [
                (os.path.join(root, im["file_name"]), self.class_to_idx[categories[labels[im["id"]]][category]])
                for im in data["images"]
            ]
        except KeyError as e:
            raise UserError(f"iNaturalist json in {root} lacks key {e} (inat-category {category!r})") from None
        self.classes = names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        img = load_rgb(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"iNaturalist annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def build_dataset(
    is_train: bool, args: argparse.Namespace, class_to_idx: dict[str, int] | None = None
) -> tuple[Dataset, int]:
    """Builds the training or validation dataset named by ``args.data_set`` and returns it with its class count.

    Args:
        is_train: Training split (with training augmentation) or validation split.
        args: Parsed flags (``data_set``, ``data_path``, ``load_tar``, ``inat_category`` and the transform flags).
        class_to_idx: For the validation split of folder/tar data: the training mapping, so labels agree.

    Returns:
        ``(dataset, nb_classes)``.
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
            _check_dir(root, f"{split} split folder")
            dataset = build_image_folder(root, transform, class_to_idx)
        nb_classes = len(class_to_idx) if class_to_idx is not None else len(dataset.class_to_idx)
        return dataset, nb_classes
    if args.data_set in ("INAT", "INAT19"):
        year = 2018 if args.data_set == "INAT" else 2019
        dataset = INatDataset(args.data_path, is_train, year, args.inat_category, transform)
        return dataset, len(dataset.classes)
    raise UserError(f"unknown --data-set {args.data_set!r}; choose from {', '.join(DATA_SETS)}")


# ----------------------------------------------------------------------------------------------------------------
# timm's AutoAugment / RandAugment ops on current Pillow

# Ops of timm's ``auto_augment`` that change pixel values only (no geometry): ImageOps implements them for L and
# RGB images, so images with alpha get them on their colour bands, with the alpha band kept as it was.
_COLOUR_OPS = frozenset(
    ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
     "SolarizeIncreasing", "SolarizeAdd")
)  # fmt: skip


def _black(img: Image.Image, *_: Any, **__: Any) -> Image.Image:
    return Image.new(img.mode, img.size)


class ModeSafeAugmentOp:
    """One image function of timm's AutoAugment/RandAugment (``AugmentOp.aug_fn``), safe on Pillow 13 and any of
    the modes L, LA, RGB and RGBA.

    Three things break timm's functions on current Pillow, and each is turned into what the op meant:

    * "Keep 0 bits" (``PosterizeIncreasing`` at magnitude 10, which DeiT's ``rand-m9-mstd0.5-inc1`` reaches; ``v0``'s
      ``Posterize`` at magnitudes below 2.5): Pillow before 13 gave a black image, Pillow 13 raises ``ValueError``.
      The black image is what the TPU and research implementations give, so it is kept.
    * Geometric ops fill with the RGB mean colour, which Pillow refuses for L images: L gets the mean's grey.
    * ImageOps' point ops refuse images with alpha: they get the op on their colour bands.

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def make_augment_safe(transform: Any) -> Any:
    """Wraps, in place, every timm ``AugmentOp`` inside ``transform`` in a :class:`ModeSafeAugmentOp`.

    Walks ``Compose.transforms``, ``RandAugment.ops``/``AugMixAugment.ops`` and ``AutoAugment.policy``; site-packages
    stay untouched, and only the transforms this project builds are changed. Returns ``transform``.
    """
    from timm.data.auto_augment import AugmentOp

    if isinstance(transform, AugmentOp):
        if not isinstance(transform.aug_fn, ModeSafeAugmentOp):
            transform.aug_fn = ModeSafeAugmentOp(transform.name, transform.aug_fn)
        return transform
    if isinstance(transform, (list, tuple)):
        for t in transform:
            make_augment_safe(t)
        return transform
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
    if is_train:
        aa = args.aa if args.aa and str(args.aa).lower() != "none" else None
        transform = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=args.color_jitter if args.color_jitter else None,
            auto_augment=aa,
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
        )
        make_augment_safe(transform)
        if small:
            transform.transforms[0] = transforms.Compose(
                [
                    transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                    transforms.RandomCrop(size, padding=4),
                ]
            )
        return transform
    steps: list[Any] = []
    resize = size if small else int(256 / 224 * size)
    steps.append(transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC))
    steps.append(transforms.CenterCrop(size))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)
