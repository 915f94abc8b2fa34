"""`ImageTextDataModule`: image-text pairs from a folder, WebDataset shards or LitData, shared by both stages.

design.md sections 2-3. The tokenizer trains on `image` alone; the LLM stage reads `caption` too. Batches follow
`base.py`'s contract plus `"caption"`: list[str] (an all-skipped batch, B = 0, has no caption: skip it on
`image.shape[0] == 0` first, as the contract says).

Two sources of captions (`captions`):

- `txt`: real captions. Folder backend: `root/train/**` (+ `root/val/**`) or a flat `root/**`, each image beside a
  `.txt` of the same stem (layout, cleaning, `caption_lines` and `exclude`: `pair_folder.py`). webdataset /
  litdata backends: what `python -m ddt_lightning.datamodules.convert SRC DST --layout pairs --format ...` wrote.
- `class_names`: class-folder data (ImageNet layout, or its class-folder conversion), the caption being the class
  folder name with underscores as spaces (design.md section 2: class-conditional = the class name as caption).

Everything else - backends, the held-out val split (`val_fraction`, `seed`), DDP sharding, equal batch counts
per rank, bad-image skipping - is `ImageFolderDataModule`'s, whose readers this class swaps for captioned ones.
A missing or empty caption skips the pair like a bad image: counted in `num_skipped`, named in a
`MissingCaptionWarning`. `pad_to_square` pads to a square of the composite background (white) before the shared
resize-and-centre-crop, so cut-out photos (Tux Paint, `configs/data/tuxpaint.yaml`) keep their whole outline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from ddt_lightning.data.images import ImageTransform
from ddt_lightning.datamodules.class_folder import ClassFolder
from ddt_lightning.datamodules.image_folder import Backend, ImageFolderDataModule
from ddt_lightning.datamodules.pair_folder import (
    CaptionLines,
    Captions,
    FilePairs,
    LitDataPairDecode,
    PadToSquare,
    WebDatasetPairs,
    check_caption_lines,
    scan_pair_folder,
)
from ddt_lightning.datamodules.streaming import LitDataDecode, WebDatasetImages, read_classes

CaptionSource = Literal["txt", "class_names"]


class ImageTextDataModule(ImageFolderDataModule):
    """Image-caption pairs (or class-folder images captioned by class name) from a folder, WebDataset or LitData."""

    def __init__(
        self,
        root: str,
        backend: Backend = "folder",
        captions: CaptionSource = "txt",
        caption_lines: CaptionLines = "all",
        exclude: list[str] | None = None,
        pad_to_square: bool = False,
        resolution: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        random_flip: bool = False,
        val_fraction: float = 0.05,
        shuffle_buffer: int = 1000,
        litdata_cache_dir: str | None = None,
    ) -> None:
        # The parent calls save_hyperparameters() first; Lightning collects this __init__'s arguments too.
        super().__init__(
            root,
            backend=backend,
            resolution=resolution,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            random_flip=random_flip,
            val_fraction=val_fraction,
            shuffle_buffer=shuffle_buffer,
            litdata_cache_dir=litdata_cache_dir,
        )
        if captions not in ("txt", "class_names"):
            raise ValueError(f"captions must be 'txt' or 'class_names', got {captions!r}")
        check_caption_lines(caption_lines)
        if exclude and (backend != "folder" or captions != "txt"):
            raise ValueError(
                "exclude applies to image-text folders (backend: folder, captions: txt); for shards pass "
                "--exclude to the converter"
            )
        self.exclude = tuple(exclude or ())
        if pad_to_square:
            self.train_transform = PadToSquare(resolution, random_flip=random_flip)
            self.eval_transform = PadToSquare(resolution)

    @property
    def captions(self) -> Captions:
        classes = tuple(self.classes) if self.hparams.captions == "class_names" else None
        return Captions(self.hparams.caption_lines, classes)

    def _list(self) -> ClassFolder:
        if self.hparams.captions == "class_names":
            return super()._list()
        return scan_pair_folder(self.root, self.hparams.val_fraction, self.seed, self.exclude)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.hparams.captions == "class_names" and not self.classes:
            raise ValueError(f"captions: class_names, but {self.root} has no classes (image-text pairs: captions: txt)")
        if self.hparams.captions == "txt" and self.backend != "folder":
            layout = read_classes(self.root).get("layout", "classes")
            if layout != "pairs":
                raise ValueError(
                    f"captions: txt, but {self.root} holds {layout} shards without captions: use "
                    "captions: class_names, or convert image-text pairs with --layout pairs"
                )

    # -- captioned readers -----------------------------------------------------------------------------------------

    def _file_dataset(self, entries: list[tuple[str, int]], transform: ImageTransform) -> Dataset:
        return FilePairs(entries, transform, self.captions)

    def _webdataset_reader(self) -> Callable[..., WebDatasetImages]:
        return functools.partial(WebDatasetPairs, captions=self.captions)

    def _litdata_decode(self, split_dir: Path, transform: ImageTransform) -> LitDataDecode:
        return LitDataPairDecode(transform, str(split_dir), self.captions)
