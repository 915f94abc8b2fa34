"""Readers for the two shard formats that `convert.py` writes: WebDataset tar shards and LitData chunks.

Layout (written by `python -m ddt_lightning.datamodules.convert`), for each split `train` and `val`:

- `root/classes.json`: `{"classes": [...], "format": ..., "splits": {"train": N, "val": M}, "val_source": ...}`
- webdataset: `root/<split>/shard-000000.tar ...` and `root/<split>/shards.json`
  (`{"shards": [{"file": ..., "num_samples": n}, ...], "num_samples": N}`); a sample holds the encoded image
  (`png`/`jpg`/`webp`...), `cls` (the label as text) and `path.txt` (the source file, for error messages);
- litdata: `root/<split>/index.json` and chunks (LitData `optimize` output); an item is
  `{"image": bytes, "label": int, "path": str}`.

Converted image-text pairs (`--layout pairs`) add the caption: a `txt` member (UTF-8) instead of `cls`, and a
`"caption"` field in LitData items; `classes.json` then says `"layout": "pairs"` and lists no classes.

Images stay encoded bytes and are decoded with PIL (`load_rgb`) by the same `ImageTransform` as the folder backend.

**WebDataset under DDP.** Training splits shards first by rank, then by DataLoader worker
(`shards[rank::W][worker::K]`, the split of webdataset's `split_by_node` + `split_by_worker`, with the rank given
explicitly because worker processes do not see the process group). Shard sizes differ, so the streams would end at
different times, and a rank that runs out while the others still call collectives hangs DDP. Hence every reader
yields the *same* number of samples, `budget = N // (W * K)` (N from `shards.json`): a reader with more data stops
early (the shard order is reshuffled each epoch, identically on every rank, so a different tail is dropped each
time), one with less cycles over its own shards again. Ranks stay disjoint within an epoch and all yield exactly
`K * ceil(budget / B)` batches (`floor` with `drop_last`); batches are assembled inside the workers, so
`len(loader)` is exact. Training needs at least `W * K` shards (the error says how to re-convert). Evaluation
(val/test, no shuffle) instead reads every shard and keeps every (W * K)-th sample: exact, in order, no shard-count
limit, at most W * K - 1 samples left out; its smaller size makes the repeated reading cheap.

**LitData under DDP.** `StreamingDataset` detects the rank itself (torch.distributed, or `WORLD_SIZE` /
`GLOBAL_RANK`), splits chunks over ranks and workers and, in a distributed run, drops the tail so every rank gets
the same number of items (`drop_last`). Its cache folders go under `cache_dir`, never /tmp.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddt_lightning.data.images import ImageTransform
from ddt_lightning.datamodules.base import SkipBadCollate, decode_item

CLASSES_FILE = "classes.json"
SHARD_INDEX = "shards.json"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # the extensions the converter keeps; anything else is re-encoded


def read_classes(root: str | Path) -> dict[str, Any]:
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a webdataset/litdata root is made by "
            "`python -m ddt_lightning.datamodules.convert SRC DST --format ...`"
        )
    return json.loads(path.read_text())


def _warn_tar_error(error: Exception) -> bool:
    """webdataset handler: report a broken tar member or shard and go on (the budget keeps ranks in step)."""
    warnings.warn(f"webdataset: skipping unreadable data ({error!r})", stacklevel=2)
    return True


# ---------------------------------------------------------------------------------------------------------------
# WebDataset
# ---------------------------------------------------------------------------------------------------------------


class WebDatasetImages(IterableDataset):
    """Tar shards of one split, split by rank then worker; yields collated batches of equal count on every rank."""

    def __init__(
        self,
        split_dir: str | Path,
        transform: ImageTransform,
        batch_size: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        split_dir = Path(split_dir)
        index_path = split_dir / SHARD_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: is {split_dir} a webdataset split written by convert?")
        index = json.loads(index_path.read_text())
        self.urls = [str(split_dir / shard["file"]) for shard in index["shards"]]
        self.num_samples = int(index["num_samples"])
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.transform = transform
        self.batch_size = batch_size
        self.workers = max(1, num_workers)  # the main process counts as one worker when num_workers = 0
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.collate = SkipBadCollate(transform.resolution)
        slots = world_size * self.workers
        if shuffle and len(self.urls) < slots:
            raise ValueError(
                f"{split_dir}: {len(self.urls)} shards cannot feed world_size x num_workers = {slots} readers; "
                f"re-convert with a smaller --shard-size (at most {max(1, self.num_samples // slots)}) "
                "or lower num_workers"
            )
        if self.samples_per_worker() == 0:
            raise ValueError(
                f"{split_dir}: {self.num_samples} samples cannot give each of world_size x num_workers = {slots} "
                "readers one: lower num_workers"
            )
        if self.batches_per_worker() == 0:
            raise ValueError(
                f"{split_dir}: {self.samples_per_worker()} samples per reader ({self.num_samples} over {slots} "
                f"readers) make no full batch of batch_size = {batch_size}: lower batch_size or num_workers"
            )

    def samples_per_worker(self) -> int:
        return self.num_samples // (self.world_size * self.workers)

    def batches_per_worker(self) -> int:
        n, b = self.samples_per_worker(), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __len__(self) -> int:
        """Batches on this rank (the same on every rank)."""
        return self.workers * self.batches_per_worker()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self, worker: int) -> list[str]:
        """Training: this reader's shards (a partition of a per-epoch permutation). Evaluation: all shards."""
        if not self.shuffle:
            return list(self.urls)
        # The same permutation on every rank, so that the split below stays a partition.
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order][self.rank :: self.world_size][worker :: self.workers]

    def _one_pass(self, worker: int) -> Iterator[dict[str, Any]]:
        stages: list[Any] = [
            wds.SimpleShardList(self.my_shards(worker)),
            wds.tarfile_to_samples(handler=_warn_tar_error),
        ]
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
            yield from wds.DataPipeline(*stages)
        else:
            # Evaluation reads every shard and strides over samples: exact, ordered, and no shard-count limit.
            slots, slot = self.world_size * self.workers, self.rank * self.workers + worker
            yield from itertools.islice(wds.DataPipeline(*stages), slot, None, slots)

    def _samples(self, worker: int) -> Iterator[dict[str, Any]]:
        """Raw samples of this reader, cycled if short, exactly `samples_per_worker()` of them."""
        budget, produced = self.samples_per_worker(), 0
        while produced < budget:
            produced_this_pass = 0
            for sample in self._one_pass(worker):
                yield sample
                produced += 1
                produced_this_pass += 1
                if produced == budget:
                    return
            if produced_this_pass == 0:
                raise RuntimeError(f"webdataset shards {self.my_shards(worker)} yielded no samples")

    @staticmethod
    def sample_name(sample: dict[str, Any]) -> str:
        """`shard#key (source path)`, for warnings about a sample."""
        name = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        return name + f" ({sample['path.txt'].decode()})" if "path.txt" in sample else name

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        label = int(sample["cls"]) if "cls" in sample else -1
        return decode_item(sample[key] if key else b"", label, self.sample_name(sample), self.transform)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"built for {self.workers} workers but the DataLoader runs {info.num_workers}")
        items: list[dict[str, Any] | None] = []
        for sample in self._samples(worker):
            items.append(self._decode(sample))
            if len(items) == self.batch_size:
                yield self.collate(items)
                items = []
        if items and not self.drop_last:
            yield self.collate(items)


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before each pass (Lightning only tells samplers)."""

    def __init__(
        self, dataset: WebDatasetImages, num_workers: int, epoch_source: Callable[[], int] | None = None
    ) -> None:
        # batch_size=None: the dataset yields whole batches, assembled in the workers.
        super().__init__(dataset, batch_size=None, num_workers=num_workers)
        self.epoch_source = epoch_source
        self._passes = 0

    def __iter__(self) -> Any:
        epoch = self.epoch_source() if self.epoch_source is not None else self._passes
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self._passes += 1
        return super().__iter__()


# ---------------------------------------------------------------------------------------------------------------
# LitData
# ---------------------------------------------------------------------------------------------------------------


class LitDataDecode:
    """`StreamingDataset(transform=...)`: a stored item -> `{"image", "label"}`, or None if the image is bad."""

    def __init__(self, transform: ImageTransform, split_dir: str) -> None:
        self.transform = transform
        self.split_dir = split_dir

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        name = f"{self.split_dir} item {item.get('path', '?')}"
        return decode_item(item["image"], int(item["label"]), name, self.transform)


def litdata_images(
    split_dir: str | Path,
    transform: ImageTransform,
    cache_dir: str | Path,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    decode: LitDataDecode | None = None,
) -> Any:
    """A `litdata.StreamingDataset` over a converted split, decoding with `decode` (default `LitDataDecode`)."""
    from litdata import StreamingDataset  # imported here: only the litdata backend pays for it

    split_dir = Path(split_dir)
    if not (split_dir / "index.json").is_file():
        raise FileNotFoundError(
            f"{split_dir / 'index.json'} not found: is {split_dir} a litdata split written by convert?"
        )
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return StreamingDataset(
        input_dir=str(split_dir),
        cache_dir=str(cache_dir),
        shuffle=shuffle,
        drop_last=drop_last or None,  # None: litdata turns it on by itself in a distributed run
        seed=seed,
        transform=decode or LitDataDecode(transform, str(split_dir)),
    )
