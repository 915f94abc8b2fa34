"""Listing a class-folder tree (ImageNet layout) and reading it as a map-style dataset; no Lightning here.

`scan_class_folder` is shared by the folder backend of `ImageFolderDataModule` and by the converter, so the
held-out validation split (when the tree has no `val/`) is the same set of files in every backend; `list_images`
and `hold_out` serve image-text folders too (`pair_folder.py`). It is Lightning-free because LitData's `optimize`
spawns worker processes that import the converter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ddt_lightning.data.images import ImageTransform
from ddt_lightning.datamodules.base import decode_item


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) that some Pillow plugin claims."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass
class ClassFolder:
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path, label)] in a fixed order
    val_source: str  # "val/" or a description of the held-out split
    ignored: list[str]  # files skipped because no image plugin claims their extension


def list_images(folder: Path, ignored: list[str], sidecars: frozenset[str] = frozenset()) -> list[Path]:
    """Image files under `folder` (recursive, sorted, hidden files and folders left out). Other files are added to
    `ignored`, except those whose extension is in `sidecars` (e.g. ".txt" captions beside the images)."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    ignored.extend(str(p) for p in files if p.suffix.lower() not in image_extensions() | sidecars)
    return [p for p in files if p.suffix.lower() in image_extensions()]


def hold_out(
    train: list[tuple[str, int]], val_fraction: float, seed: int, train_dir: Path
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], str]:
    """(train, val, val_source): a fixed `val_fraction` of `train` (a seeded permutation) held out as val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) to hold out val from {train_dir}, got {val_fraction}")
    n_val = max(1, round(val_fraction * len(train)))
    if n_val >= len(train):
        raise ValueError(f"{train_dir}: {len(train)} images are too few to hold out {n_val} for validation")
    held_out = set(np.random.default_rng(seed).permutation(len(train))[:n_val].tolist())
    val = [entry for i, entry in enumerate(train) if i in held_out]
    train = [entry for i, entry in enumerate(train) if i not in held_out]
    return train, val, f"held-out {val_fraction} of {train_dir.name}/ (seed {seed})"


def _list_split(split_dir: Path, classes: list[str], ignored: list[str]) -> list[tuple[str, int]]:
    entries: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a val/ tree may lack some classes
        images = list_images(class_dir, ignored)
        if not images:
            raise ValueError(f"class folder {class_dir} holds no image files")
        entries.extend((str(p), label) for p in images)
    return entries


def scan_class_folder(root: str | Path, val_fraction: float = 0.05, seed: int = 0) -> ClassFolder:
    """List `root/train/<class>/*` (and `root/val/<class>/*`, else a held-out fraction of train)."""
    root = Path(root)
    train_dir = root / "train"
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist")
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir} not found: expected the layout root/train/<class>/<image>")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{train_dir} holds no class folders")
    ignored: list[str] = []
    train = _list_split(train_dir, classes, ignored)
    val_dir = root / "val"
    if val_dir.is_dir():
        unknown = sorted(p.name for p in val_dir.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise ValueError(f"{val_dir} has class folders that train/ lacks: {unknown}")
        val, val_source = _list_split(val_dir, classes, ignored), "val/"
    else:
        train, val, val_source = hold_out(train, val_fraction, seed, train_dir)
    return ClassFolder(classes, {"train": train, "val": val}, val_source, ignored)


class FileImages(Dataset):
    """Map-style dataset over (path, label) pairs; a bad file gives None (see `SkipBadCollate`)."""

    def __init__(self, entries: list[tuple[str, int]], transform: ImageTransform) -> None:
        self.entries = entries
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, label = self.entries[index]
        return decode_item(path, label, path, self.transform)
