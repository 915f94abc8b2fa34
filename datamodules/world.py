"""`WorldDataModule`: the built-in compositional world (design.md section 5) as rendered, in-memory splits.

Train, val and test come from three different seed streams, `World(seed=3 * seed + split_id)` with split ids 0, 1
and 2: the map (seed, split) -> stream seed is one-to-one, so held-out images are never trained on, for any seed.
Each split is rendered once into a uint8 array (progress bar; about 20 s for 50k 32x32 images on one core) and
served from memory. With `cache_dir` set the arrays are written there, keyed by every generation parameter and a
hash of the world's source code, so reruns load in well under a second and a change of the world invalidates them.

Batches: `image` (B, 3, R, R) in [-1, 1], `label` all -1 (no classes), `caption` list[str], `index` long (B,) -
the sample's index in its split, so that `dm.world(split).sample(index)` recovers the ground-truth scene and edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ddt_lightning.data import world as world_module
from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import World
from ddt_lightning.datamodules.base import check_loader_args, map_style_loader

Split = Literal["train", "val", "test"]
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_CACHE_DIR = "~/.cache/ddt_lightning/world"


class WorldImages(Dataset):
    """Rendered world images and captions of one split, served from a (possibly memory-mapped) array."""

    def __init__(self, images: np.ndarray, captions: list[str]) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images = images  # (N, R, R, 3) uint8
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": uint8_to_tensor(self.images[index]),  # (3, R, R)
            "label": -1,
            "caption": self.captions[index],
            "index": index,
        }


class WorldDataModule(LightningDataModule):
    """Procedurally rendered scenes with captions; disjoint train/val/test streams; cached on disk."""

    def __init__(
        self,
        resolution: int = 32,
        train_size: int = 50_000,
        val_size: int = 256,
        test_size: int = 1024,
        max_objects: int = 3,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = DEFAULT_CACHE_DIR,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        check_loader_args(batch_size, num_workers)
        World(seed=seed, resolution=resolution, max_objects=max_objects)  # validates resolution and max_objects
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.sizes: dict[str, int] = {"train": train_size, "val": val_size, "test": test_size}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.datasets: dict[str, WorldImages] = {}

    # -- generation and cache ------------------------------------------------------------------------------------

    def world(self, split: Split) -> World:
        """The World that generates `split` (sample i of the split is `world(split).sample(i)`)."""
        return World(
            seed=3 * self.seed + SPLIT_IDS[split], resolution=self.resolution, max_objects=self.hparams.max_objects
        )

    def cache_path(self, split: Split) -> Path | None:
        if self.cache_dir is None:
            return None
        world = self.world(split)
        key = {
            "world_source": hashlib.sha256(Path(world_module.__file__).read_bytes()).hexdigest(),
            "seed": world.seed,
            "resolution": world.resolution,
            "max_objects": world.max_objects,
            "supersample": world.supersample,
            "size": self.sizes[split],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{split}-{self.sizes[split]}-{self.resolution}px-{digest}"

    def _render(self, split: Split) -> tuple[np.ndarray, list[str]]:
        return self.world(split).render_range(0, self.sizes[split])

    def _write_cache(self, split: Split, path: Path) -> None:
        images, captions = self._render(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        np.save(tmp / "images.npy", images)
        (tmp / "captions.json").write_text(json.dumps(captions))
        try:
            os.replace(tmp, path)  # atomic: readers see a complete entry or none
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, split: Split) -> WorldImages:
        path = self.cache_path(split)
        if path is None:
            return WorldImages(*self._render(split))
        if not (path / "captions.json").exists():
            self._write_cache(split, path)
        images = np.load(path / "images.npy", mmap_mode="r")  # shared by DataLoader workers via the page cache
        return WorldImages(images, json.loads((path / "captions.json").read_text()))

    def prepare_data(self) -> None:
        # Runs on one process per node: render and cache here so that the other ranks only load.
        for split in SPLIT_IDS:
            path = self.cache_path(split)  # type: ignore[arg-type]
            if path is not None and not (path / "captions.json").exists():
                self._write_cache(split, path)  # type: ignore[arg-type]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage or "", tuple(SPLIT_IDS)):
            if split not in self.datasets:
                self.datasets[split] = self._load(split)  # type: ignore[arg-type]

    # -- loaders -------------------------------------------------------------------------------------------------

    def _loader(self, split: Split, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return map_style_loader(self, self.datasets[split], train)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
