"""`ImageFolderDataModule`: class-folder images (ImageNet layout) from a folder, WebDataset shards or LitData.

design.md section 3. The folder layout is `root/train/<class>/<image>` and, optionally, `root/val/<class>/<image>`;
classes are the sorted folder names of `train/` and the label is the class's index. Without `val/`, val is a
held-out `val_fraction` of train chosen by a fixed permutation (`seed`), and test = val. The `webdataset` and
`litdata` backends read what `convert.py` wrote from such a tree (`root/classes.json`, `root/train`,
`root/val`; the held-out split, if any, was made by the converter with the same function). Every backend decodes
with `load_rgb` and applies the same `ImageTransform`, so they yield the same images.

Distributed: folder -> a map-style dataset (Lightning adds a DistributedSampler); webdataset -> split by rank and
worker with an equal sample budget per worker; litdata -> StreamingDataset / StreamingDataLoader (see
`streaming.py` for how each keeps the batch count equal on every rank). Bad files are skipped, counted
(`num_skipped`) and named in a `BadImageWarning`; a missing root or an empty class folder raises, naming the path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ddt_lightning.data.images import ImageTransform
from ddt_lightning.datamodules.base import SkipBadCollate, check_loader_args, map_style_loader, rank_and_world_size
from ddt_lightning.datamodules.class_folder import ClassFolder, FileImages, scan_class_folder
from ddt_lightning.datamodules.streaming import (
    EpochDataLoader,
    LitDataDecode,
    WebDatasetImages,
    litdata_images,
    read_classes,
)

Backend = Literal["folder", "webdataset", "litdata"]


class ImageFolderDataModule(LightningDataModule):
    """Class-folder images from a plain folder, WebDataset tar shards or a LitData optimized dataset."""

    def __init__(
        self,
        root: str,
        backend: Backend = "folder",
        resolution: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        random_flip: bool = False,
        val_fraction: float = 0.05,
        shuffle_buffer: int = 1000,
        litdata_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        if backend not in ("folder", "webdataset", "litdata"):
            raise ValueError(f"backend must be 'folder', 'webdataset' or 'litdata', got {backend!r}")
        self.root = Path(root).expanduser()
        self.backend = backend
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_transform = ImageTransform(resolution, random_flip=random_flip)
        self.eval_transform = ImageTransform(resolution)
        # litdata writes cache folders; keep them beside the data rather than in /tmp (design.md section 6).
        self.litdata_cache_dir = Path(litdata_cache_dir).expanduser() if litdata_cache_dir else self.root / ".cache"
        self._folder: ClassFolder | None = None
        self._classes: list[str] | None = None

    # -- classes and listing -------------------------------------------------------------------------------------

    def _list(self) -> ClassFolder:
        """The folder backend's listing (`ImageTextDataModule` lists image-text folders instead)."""
        return scan_class_folder(self.root, self.hparams.val_fraction, self.seed)

    def _scan(self) -> ClassFolder:
        if self._folder is None:
            self._folder = self._list()
            if self._folder.ignored:
                shown = ", ".join(self._folder.ignored[:5])
                warnings.warn(
                    f"{self.root}: ignored {len(self._folder.ignored)} files with no image extension ({shown} ...)",
                    stacklevel=2,
                )
        return self._folder

    @property
    def classes(self) -> list[str]:
        """Class names; the label of an image is the index of its class here."""
        if self._classes is None:
            if self.backend == "folder":
                self._classes = self._scan().classes
            else:
                if not self.root.is_dir():
                    raise FileNotFoundError(f"{self.backend} root {self.root} does not exist")
                self._classes = list(read_classes(self.root)["classes"])
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        _ = self.classes  # fail early, naming the path, when the root is missing or malformed

    # -- readers (one per backend; `ImageTextDataModule` overrides them with captioned ones) ----------------------

    def _file_dataset(self, entries: list[tuple[str, int]], transform: ImageTransform) -> Dataset:
        return FileImages(entries, transform)

    def _webdataset_reader(self) -> Callable[..., WebDatasetImages]:
        """The WebDataset reader: `WebDatasetImages`, or a subclass (partially applied to its extra arguments)."""
        return WebDatasetImages

    def _litdata_decode(self, split_dir: Path, transform: ImageTransform) -> LitDataDecode:
        return LitDataDecode(transform, str(split_dir))

    # -- loaders -------------------------------------------------------------------------------------------------

    def _loader(self, split: str, train: bool) -> DataLoader:
        transform = self.train_transform if train else self.eval_transform
        collate = SkipBadCollate(self.resolution)
        if self.backend == "folder":
            return map_style_loader(self, self._file_dataset(self._scan().splits[split], transform), train)
        split_dir = self.root / split
        if self.backend == "webdataset":
            rank, world_size = rank_and_world_size(self.trainer)
            dataset = self._webdataset_reader()(
                split_dir,
                transform,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                rank=rank,
                world_size=world_size,
                shuffle=train,
                drop_last=train,
                seed=self.seed,
                shuffle_buffer=self.hparams.shuffle_buffer,
            )
            trainer = self.trainer
            epoch_source = (lambda: trainer.current_epoch) if trainer is not None else None
            return EpochDataLoader(dataset, num_workers=self.num_workers, epoch_source=epoch_source)
        dataset = litdata_images(
            split_dir,
            transform,
            self.litdata_cache_dir / split,
            shuffle=train,
            drop_last=train,
            seed=self.seed,
            decode=self._litdata_decode(split_dir, transform),
        )
        from litdata import StreamingDataLoader  # imported here: only the litdata backend pays for it

        return StreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate, drop_last=train
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def eval_dataloader(self, split: Literal["train", "val"]) -> DataLoader:
        """`split` in a fixed order, without flips or a dropped tail (e.g. to tokenize a whole split once)."""
        return self._loader(split, train=False)
