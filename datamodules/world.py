"""`WorldDataModule`: the built-in compositional world (design.md section 5) as rendered, in-memory splits.

Train, val and test come from three different seed streams, `World(seed=3 * seed + split_id)` with split ids 0, 1
and 2: the map (seed, split) -> stream seed is one-to-one, so held-out images are never trained on, for any seed.
Each split is rendered once into a uint8 array (progress bar; about 20 s for 50k 32x32 images on one core) and
served from memory. With `cache_dir` set the arrays are written there, keyed by every generation parameter and a
hash of the world's source code, so reruns load in well under a second and a change of the world invalidates them.

Batches: `image` (B, 3, R, R) in [-1, 1], `label` all -1 (no classes), `caption` list[str], `index` long (B,) -
the sample's index in its split, so that `dm.world(split).sample(index)` recovers the ground-truth scene and edit.
With `edits=True` they also carry the edit triple of design.md section 2 (`<boi> src <eoi> instruction <boi> tgt
<eoi>`): `edit_source` (= `image`), `edit_instruction` list[str] and `edit_target` (B, 3, R, R) in [-1, 1], the
edited image - exactly `world(split).sample(index)`'s `edit_instruction` and `edited_image` - and `edit_caption`
list[str], the edited scene's caption (the caption_first edit format). Edits render every scene twice (about 2x the
time) and are cached in their own entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ddt_lightning.data import world as world_module
from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import World
from ddt_lightning.datamodules.base import check_loader_args, map_style_loader

Split = Literal["train", "val", "test"]
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_CACHE_DIR = "~/.cache/ddt_lightning/world"


@dataclass
class Edits:
    """The edits of a split: edited images (N, R, R, 3) uint8, their instructions and the edited images' captions."""

    targets: np.ndarray
    instructions: list[str]
    captions: list[str]


class WorldImages(Dataset):
    """Rendered world images and captions (and edits) of one split, served from (possibly memory-mapped) arrays."""

    def __init__(self, images: np.ndarray, captions: list[str], edits: Edits | None = None) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        sizes = (len(edits.targets), len(edits.instructions), len(edits.captions)) if edits is not None else ()
        if any(size != len(images) for size in sizes):
            raise ValueError(
                f"{len(images)} images but {len(edits.targets)} edit targets, {len(edits.instructions)} edits, "
                f"{len(edits.captions)} edit captions"
            )
        self.images = images  # (N, R, R, 3) uint8
        self.captions = captions
        self.edits = edits

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = uint8_to_tensor(self.images[index])  # (3, R, R)
        item = {"image": image, "label": -1, "caption": self.captions[index], "index": index}
        if self.edits is None:
            return item
        return {
            **item,
            "edit_source": image,
            "edit_instruction": self.edits.instructions[index],
            "edit_target": uint8_to_tensor(self.edits.targets[index]),  # (3, R, R)
            "edit_caption": self.edits.captions[index],  # the edited scene's caption
        }


def render_with_edits(world: World, size: int, progress: bool = True) -> tuple[np.ndarray, list[str], Edits]:
    """Samples 0..size-1 of `world` with their edits: images, captions, and the edited images, instructions and
    captions (`Scene.caption()` of the edited scene, without a template)."""
    r = world.resolution
    images, targets = np.empty((2, size, r, r, 3), dtype=np.uint8)  # each (N, R, R, 3)
    captions: list[str] = []
    instructions: list[str] = []
    edit_captions: list[str] = []
    desc = f"rendering world with edits (seed {world.seed}, {r}px)"
    for i in tqdm(range(size), desc=desc, disable=not progress, mininterval=1.0, unit="img"):
        sample = world.sample(i)
        images[i], targets[i] = sample.image, sample.edited_image
        captions.append(sample.caption)
        instructions.append(sample.edit_instruction)
        edit_captions.append(sample.edited_scene.caption())
    return images, captions, Edits(targets, instructions, edit_captions)


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
        edits: bool = False,
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

    @staticmethod
    def content_digest() -> str:
        """The digest of the code that draws the world (images, captions, edits): a part of every key under which
        its samples are stored (this cache, and `ddt pretokenize`'s shards), so that a changed world is redrawn."""
        return hashlib.sha256(Path(world_module.__file__).read_bytes()).hexdigest()

    def cache_path(self, split: Split) -> Path | None:
        if self.cache_dir is None:
            return None
        world = self.world(split)
        key = {
            "world_source": self.content_digest(),
            "seed": world.seed,
            "resolution": world.resolution,
            "max_objects": world.max_objects,
            "supersample": world.supersample,
            "size": self.sizes[split],
        }
        if self.hparams.edits:  # only then: the entries of image-only runs keep their names
            key["edits"] = 2  # 2: with the edited images' captions (entries of 1, `True`, lack them)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{split}-{self.sizes[split]}-{self.resolution}px-{digest}"

    def _render(self, split: Split) -> WorldImages:
        if self.hparams.edits:
            return WorldImages(*render_with_edits(self.world(split), self.sizes[split]))
        return WorldImages(*self.world(split).render_range(0, self.sizes[split]))

    def _write_cache(self, split: Split, path: Path) -> None:
        data = self._render(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        np.save(tmp / "images.npy", data.images)
        if data.edits is not None:
            np.save(tmp / "edit_targets.npy", data.edits.targets)
            (tmp / "edit_instructions.json").write_text(json.dumps(data.edits.instructions))
            (tmp / "edit_captions.json").write_text(json.dumps(data.edits.captions))
        (tmp / "captions.json").write_text(json.dumps(data.captions))
        try:
            os.replace(tmp, path)  # atomic: readers see a complete entry or none
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, split: Split) -> WorldImages:
        path = self.cache_path(split)
        if path is None:
            return self._render(split)
        if not (path / "captions.json").exists():
            self._write_cache(split, path)
        # Memory maps: shared by DataLoader workers via the page cache.
        images = np.load(path / "images.npy", mmap_mode="r")
        edits = None
        if self.hparams.edits:
            instructions = json.loads((path / "edit_instructions.json").read_text())
            captions = json.loads((path / "edit_captions.json").read_text())
            edits = Edits(np.load(path / "edit_targets.npy", mmap_mode="r"), instructions, captions)
        return WorldImages(images, json.loads((path / "captions.json").read_text()), edits)

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

    def eval_dataloader(self, split: Split) -> DataLoader:
        """`split` in a fixed order without a dropped tail (e.g. to tokenize a whole split once)."""
        return self._loader(split, train=False)
