"""Listing a class-folder tree (ImageNet layout) and reading it as a map-style dataset; no Lightning here.

`scan_class_folder` is shared by the folder backend of `ImageFolderDataModule` and by the converter, so the
held-out validation split (when the tree has no `val/`) is the same set of files in every backend. It is
Lightning-free because LitData's `optimize` spawns worker processes that import the converter.
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


def _list_split(split_dir: Path, classes: list[str], ignored: list[str]) -> list[tuple[str, int]]:
    entries: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a val/ tree may lack some classes
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in image_extensions()]
        ignored.extend(str(p) for p in files if p.suffix.lower() not in image_extensions())
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
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when {val_dir} is absent, got {val_fraction}")
        n_val = max(1, round(val_fraction * len(train)))
        if n_val >= len(train):
            raise ValueError(f"{train_dir}: {len(train)} images are too few to hold out {n_val} for validation")
        held_out = set(np.random.default_rng(seed).permutation(len(train))[:n_val].tolist())
        val = [entry for i, entry in enumerate(train) if i in held_out]
        train = [entry for i, entry in enumerate(train) if i not in held_out]
        val_source = f"held-out {val_fraction} of train/ (seed {seed})"
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
