"""What every DataModule here shares: the batch contract, bad-item skipping, and rank discovery.

Batch contract (all DataModules, all backends):

- `"image"`: float32 (B, 3, H, W) in [-1, 1], H = W = the DataModule's `resolution`;
- `"label"`: long (B,), the class index, -1 when the data has no classes;
- `"num_skipped"`: long scalar, how many items of this batch were dropped as bad images (or, for image-text data,
  pairs without a caption) - log it;
- optional extras: `"caption"` (list[str]: the world, Fashion-MNIST, `ImageTextDataModule`), `"index"` (long (B,))
  and, with `edits=True`, `"edit_source"`, `"edit_instruction"` (list[str]), `"edit_target"` for the built-in world.

Bad input is never a crash and never a silent drop: a dataset returns None for an item it cannot decode, after a
`BadImageWarning` naming the file and the reason; `SkipBadCollate` drops the Nones and counts them. A batch made
only of bad items comes out with B = 0 (image (0, 3, H, W)) rather than raising, so a LightningModule should skip
empty batches (`if batch["image"].shape[0] == 0: return None` in `training_step`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from ddt_lightning.data.images import BadImageError, load_rgb, warn_bad_image

if TYPE_CHECKING:  # Lightning stays out of the imports of dataset code (spawned workers import it)
    from lightning.pytorch import Trainer


def decode_item(
    source: str | bytes, label: int, name: str, transform: Callable[[Image.Image], torch.Tensor]
) -> dict[str, Any] | None:
    """Decode one image into `{"image", "label"}`, or warn (naming `name`) and return None if it is bad."""
    try:
        image = load_rgb(source)
    except BadImageError as error:
        warn_bad_image(BadImageError(name, error.reason))
        return None
    return {"image": transform(image), "label": label}


class SkipBadCollate:
    """`collate_fn` that drops None items (bad images), stacks the rest and adds `"num_skipped"`."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [item for item in items if item is not None]
        batch: dict[str, Any] = {}
        if good:
            for key in good[0]:
                values = [item[key] for item in good]
                if isinstance(values[0], torch.Tensor):
                    batch[key] = torch.stack(values)  # e.g. image: (B, 3, H, W)
                elif isinstance(values[0], int):
                    batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
                else:
                    batch[key] = values
        else:
            batch["image"] = torch.empty(0, 3, self.resolution, self.resolution)  # (0, 3, H, W)
            batch["label"] = torch.empty(0, dtype=torch.long)
        batch["num_skipped"] = torch.tensor(len(items) - len(good), dtype=torch.long)
        return batch


def rank_and_world_size(trainer: Trainer | None) -> tuple[int, int]:
    """(global rank, world size): from the attached Trainer, else torch.distributed, else RANK/WORLD_SIZE."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ResumableSampler(DistributedSampler):
    """Training sampler: shuffles as a function of (seed, epoch) - DistributedSampler's scheme, in one process
    too - and starts its first epoch `skip` samples in.

    A run resumed from a mid-epoch checkpoint therefore sees exactly the batches the uninterrupted run would have
    seen (Lightning calls `set_epoch` at each epoch start). Being a `DistributedSampler` already, Lightning does not
    replace it under DDP: each rank reads its own 1 / world_size of every epoch, all ranks the same number.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, seed: int, skip: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0  # only the epoch the run resumes in starts late
        return iter(indices[skip:])


def train_sampler(trainer: Trainer | None, dataset: Sized, batch_size: int, seed: int) -> ResumableSampler:
    """The training sampler, skipping the batches of the current epoch that a restored checkpoint already
    trained on (from the trainer's restored step and epoch counters)."""
    rank, world_size = rank_and_world_size(trainer)
    skip = 0
    if trainer is not None and trainer.global_step > 0:
        batches_per_epoch = (len(dataset) // world_size) // batch_size  # drop_last, per rank
        done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * batches_per_epoch
        skip = min(max(done, 0), batches_per_epoch) * batch_size
    return ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, skip=skip)


def map_style_loader(
    datamodule: Any, dataset: Sized, train: bool, collate_fn: Callable[[list], dict[str, Any]] | None = None
) -> DataLoader:
    """The DataLoader of every map-style DataModule here: the resumable seeded sampler for training (fixed order
    otherwise) and `SkipBadCollate`, so unreadable items are dropped, counted and never crash a batch."""
    batch_size = datamodule.batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=train_sampler(datamodule.trainer, dataset, batch_size, datamodule.seed) if train else None,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=datamodule.num_workers,
        persistent_workers=datamodule.num_workers > 0,
        collate_fn=collate_fn or SkipBadCollate(datamodule.resolution),
    )


def check_loader_args(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
