"""Image-text pairs: listing a folder of images with `.txt` captions, and captioned readers for every backend.

design.md sections 2-3: the pairs behind text-to-image, image-to-text and class-conditional training. No
Lightning here (LitData's `optimize` spawns workers that import the converter, which imports this file).

- **Folder layout.** `root/train/**` (and optionally `root/val/**`), or a flat `root/**` whose held-out val split
  is `hold_out`'s seeded `val_fraction` (the same function and files as the class-folder backend). Every image
  (`class_folder.list_images`: any extension a Pillow plugin claims, recursive, sorted) pairs with the `.txt` of
  the same stem beside it (`a/b/cat.png` -> `a/b/cat.txt`). `exclude` drops files by glob on the path relative
  to root (Tux Paint's `*_mirror.png` alternates, for example).
- **Caption text** (`clean_caption`): UTF-8, whitespace runs collapsed to one space; `lines="first"` keeps only
  the first line (Tux Paint puts the English caption there and its translations on `lang.utf8=...` lines).
- **Class names as captions** (`Captions.classes` set): the caption is the item's class folder name with
  underscores turned into spaces, for class-folder data (ImageNet-style, design.md section 2).
- **Missing captions** are treated like bad images: the item is dropped (None, so `SkipBadCollate` counts it in
  `num_skipped`) after a `MissingCaptionWarning` naming the image, the caption file and the reason (no caption
  file, empty caption, not UTF-8). The converter drops such pairs up front and lists them.

Readers: `FilePairs` (folder), `WebDatasetPairs` (caption from the `txt` member, else the `caption` key of the
`json` member, as img2dataset writes them) and `LitDataPairDecode` (the `caption` field the converter stores) -
each the image reader of `class_folder.py` / `streaming.py` plus the caption, so they yield the same pairs.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ddt_lightning.data.images import DEFAULT_BACKGROUND, BadImageWarning, ImageTransform
from ddt_lightning.datamodules.class_folder import ClassFolder, FileImages, hold_out, list_images
from ddt_lightning.datamodules.streaming import LitDataDecode, WebDatasetImages

CaptionLines = Literal["all", "first"]
CAPTION_SUFFIX = ".txt"


class MissingCaptionWarning(BadImageWarning):
    """A pair skipped for want of a caption (a `BadImageWarning`, so one filter covers every skipped item)."""


def caption_path(image_path: str | Path) -> Path:
    """The caption file of an image: the same stem with `.txt`, beside it."""
    return Path(image_path).with_suffix(CAPTION_SUFFIX)


def clean_caption(text: str, lines: CaptionLines = "all") -> str:
    """The caption in `text`: only its first line when `lines="first"`; whitespace runs collapsed, ends stripped."""
    if lines == "first":
        text = text.split("\n", 1)[0]
    return " ".join(text.split())


def class_caption(class_name: str) -> str:
    """A class folder name as a caption: `golden_retriever` -> `golden retriever`."""
    return " ".join(class_name.replace("_", " ").split())


def check_caption_lines(lines: str) -> None:
    if lines not in ("all", "first"):
        raise ValueError(f"caption_lines must be 'all' or 'first', got {lines!r}")


@dataclass(frozen=True)
class Captions:
    """Where an item's caption comes from: its own text, cleaned with `lines`, or - with `classes` set - the name
    of its class (`classes[label]`)."""

    lines: CaptionLines = "all"
    classes: tuple[str, ...] | None = None

    def find(self, text: str | bytes | None, label: int) -> tuple[str | None, str]:
        """(caption, "") or (None, why there is none)."""
        if self.classes is not None:
            return class_caption(self.classes[label]), ""
        if text is None:
            return None, "no caption"
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError:
                return None, "caption is not UTF-8"
        caption = clean_caption(text, self.lines)
        return (caption, "") if caption else (None, "empty caption")

    def resolve(self, text: str | bytes | None, label: int, name: str) -> str | None:
        """The caption, or None after a `MissingCaptionWarning` naming `name` and the reason."""
        caption, reason = self.find(text, label)
        if caption is None:
            warnings.warn(f"skipping {name}: {reason}", MissingCaptionWarning, stacklevel=2)
        return caption

    def attach(self, item: dict[str, Any] | None, text: str | bytes | None, name: str) -> dict[str, Any] | None:
        """`item` (a decoded image, or None if it was bad) with its `caption`, or None when it has none."""
        if item is None:
            return None
        caption = self.resolve(text, item["label"], name)
        return None if caption is None else {**item, "caption": caption}


def read_caption_file(image_path: str | Path) -> bytes | None:
    """The raw bytes of an image's caption file, None if there is none."""
    try:
        return caption_path(image_path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _excluded(relative: Path, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(relative.as_posix(), pattern) for pattern in exclude)


def scan_pair_folder(
    root: str | Path, val_fraction: float = 0.05, seed: int = 0, exclude: Sequence[str] = ()
) -> ClassFolder:
    """List the images of an image-text folder (see the module docstring) into train and val, label -1.

    Caption files are not opened here (a missing one is found, reported and skipped when the pair is read), so
    listing a large folder costs one directory walk."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image-text root {root} does not exist")
    train_dir, val_dir = root / "train", root / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise FileNotFoundError(f"{root} has val/ but no train/: expected root/train/** (and root/val/**) or root/**")
    if not train_dir.is_dir():
        train_dir = root  # a flat folder: everything is train, val is held out
    ignored: list[str] = []

    def listing(folder: Path) -> list[tuple[str, int]]:
        images = list_images(folder, ignored, sidecars=frozenset({CAPTION_SUFFIX}))
        entries = [(str(p), -1) for p in images if not _excluded(p.relative_to(root), exclude)]
        if not entries:
            raise ValueError(f"{folder} holds no image files (after exclude={list(exclude)})")
        return entries

    train = listing(train_dir)
    if train_dir is not root and val_dir.is_dir():
        val, val_source = listing(val_dir), "val/"
    else:
        train, val, val_source = hold_out(train, val_fraction, seed, train_dir)
    return ClassFolder([], {"train": train, "val": val}, val_source, ignored)


class PadToSquare(ImageTransform):
    """`ImageTransform` that first pads the image to a square of `DEFAULT_BACKGROUND` (the colour `load_rgb`
    composites transparency onto), so that a cut-out keeps its whole outline instead of losing its ends to the
    centre crop."""

    def resize_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width != height:
            side = max(width, height)
            canvas = Image.new("RGB", (side, side), DEFAULT_BACKGROUND)
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
        return super().resize_crop(image)


# ---------------------------------------------------------------------------------------------------------------
# Captioned readers: the image readers of the three backends plus `Captions.attach`
# ---------------------------------------------------------------------------------------------------------------


class FilePairs(FileImages):
    """Map-style dataset over (image path, label) with captions; a bad image or missing caption gives None."""

    def __init__(self, entries: list[tuple[str, int]], transform: ImageTransform, captions: Captions) -> None:
        super().__init__(entries, transform)
        self.captions = captions

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.entries[index][0]
        text = read_caption_file(path) if self.captions.classes is None else None
        return self.captions.attach(super().__getitem__(index), text, f"{path} (caption {caption_path(path)})")


def webdataset_caption_text(sample: dict[str, Any]) -> bytes | str | None:
    """A WebDataset sample's caption text: its `txt` member, else the `caption` of its `json` member."""
    if "txt" in sample:
        return sample["txt"]
    try:
        return json.loads(sample["json"]).get("caption") if "json" in sample else None
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        return None


class WebDatasetPairs(WebDatasetImages):
    """`WebDatasetImages` whose items also carry a `caption`; the same sharding, budget and batch counts."""

    def __init__(self, *args: Any, captions: Captions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captions = captions

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        return self.captions.attach(super()._decode(sample), webdataset_caption_text(sample), self.sample_name(sample))


class LitDataPairDecode(LitDataDecode):
    """`LitDataDecode` that adds the stored `caption` (or the class name) to the item."""

    def __init__(self, transform: ImageTransform, split_dir: str, captions: Captions) -> None:
        super().__init__(transform, split_dir)
        self.captions = captions

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        name = f"{self.split_dir} item {item.get('path', '?')}"
        return self.captions.attach(super().__call__(item), item.get("caption"), name)
