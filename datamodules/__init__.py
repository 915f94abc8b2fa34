"""LightningDataModules shared by the tokenizer and the LLM stage (installed as `ddt_lightning.datamodules`).

- `WorldDataModule`: the built-in compositional world (images, captions, ground-truth scenes);
- `FashionMNISTDataModule`: Fashion-MNIST from the Debian package `dataset-fashion-mnist`;
- `TokenShardsDataModule`: DDT token ids (+ captions, edits) written by `ddt pretokenize`, for the LLM stage;
- `ImageFolderDataModule`: class-folder images from a folder, WebDataset shards or LitData chunks
  (`python -m ddt_lightning.datamodules.convert` makes the shards);
- `ImageTextDataModule`: image-caption pairs (image + `.txt`) from the same three backends, or class-folder images
  captioned by their class names (Tux Paint's captioned photos: `configs/data/tuxpaint.yaml`).

All yield the batch contract of `base.py`: `image` (B, 3, H, W) float32 in [-1, 1], `label` long (B,),
`num_skipped` long scalar; plus `caption` (list[str]) from the world, Fashion-MNIST (class names) and image-text
data. The exports are lazy: the converter's spawned LitData workers and DataLoader workers import submodules of
this package and should not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddt_lightning.datamodules.base import SkipBadCollate
    from ddt_lightning.datamodules.class_folder import scan_class_folder
    from ddt_lightning.datamodules.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNISTDataModule
    from ddt_lightning.datamodules.image_folder import ImageFolderDataModule
    from ddt_lightning.datamodules.image_text import ImageTextDataModule
    from ddt_lightning.datamodules.pair_folder import MissingCaptionWarning
    from ddt_lightning.datamodules.tokens import TokenShardsDataModule
    from ddt_lightning.datamodules.world import WorldDataModule

_EXPORTS = {
    "FASHION_MNIST_CLASSES": "fashion_mnist",
    "FashionMNISTDataModule": "fashion_mnist",
    "ImageFolderDataModule": "image_folder",
    "ImageTextDataModule": "image_text",
    "MissingCaptionWarning": "pair_folder",
    "SkipBadCollate": "base",
    "TokenShardsDataModule": "tokens",
    "WorldDataModule": "world",
    "scan_class_folder": "class_folder",
}
__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageTextDataModule",
    "MissingCaptionWarning",
    "SkipBadCollate",
    "TokenShardsDataModule",
    "WorldDataModule",
    "scan_class_folder",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ddt_lightning.datamodules.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ddt_lightning.datamodules' has no attribute {name!r}")
