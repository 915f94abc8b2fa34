"""`TokenShardsDataModule`: DDT token ids written by `ddt pretokenize`, for the LLM stage (design.md section 2).

The shards (`output/<split>/shard-*.tar`, WebDataset samples with `codes.npy`, `txt`, `json` and, for world edits,
`edit_codes.npy`; see `ddt_lightning/pretokenize.py`) are small - T int32 ids per image: 1.28 M ImageNet images at
T = 256 are 1.3 GB - so they are read once with `webdataset` into arrays and served map-style. That keeps the
training order seeded, DDP-sharded and exactly resumable mid-epoch (`ResumableSampler`), as for every other
DataModule here.

Batches: `codes` long (B, T) in the DDT tokenizer's own order, `caption` list[str] (when the data had captions),
`label` long (B,), `index` long (B,) (world data), `edit_instruction` list[str], `edit_caption` list[str] and
`edit_target_codes` long (B, T) (world edits), `num_skipped` (always 0: bad images were skipped, and counted in
the manifest, when tokenizing).
`MLLMModule(tokens="pretokenized")` reads them; `num_codes` / `num_tokens` come from the manifest
(`TokenShardsDataModule.manifest`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ddt_lightning.datamodules.base import check_loader_args, map_style_loader

Split = Literal["train", "val", "test"]


class TokenShards(Dataset):
    """All samples of one split's shards, in key order, held as arrays."""

    def __init__(self, split_dir: Path) -> None:
        import webdataset as wds

        shards = sorted(split_dir.glob("shard-*.tar"))
        if not shards:
            raise FileNotFoundError(f"{split_dir} holds no shard-*.tar: run `ddt pretokenize` first")
        samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode())
        samples.sort(key=lambda sample: sample["__key__"])
        self.codes = np.stack([s["codes.npy"] for s in samples])  # (N, T) int32
        edits = [s.get("edit_codes.npy") for s in samples]
        self.edit_codes = np.stack(edits) if edits and edits[0] is not None else None  # (N, T) or None
        self.captions = [s["txt"] for s in samples] if samples and "txt" in samples[0] else None
        self.extras = [s["json"] for s in samples]

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        extras = self.extras[index]
        item: dict[str, Any] = {"codes": torch.from_numpy(self.codes[index]).long(), "label": extras["label"]}
        if "index" in extras:
            item["index"] = extras["index"]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        if self.edit_codes is not None:
            item["edit_instruction"] = extras["edit_instruction"]
            item["edit_target_codes"] = torch.from_numpy(self.edit_codes[index]).long()
            if "edit_caption" in extras:  # shards of format ddt-tokens/2 on
                item["edit_caption"] = extras["edit_caption"]
        return item


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)  # codes: (B, T)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
        else:
            batch[key] = values
    batch["num_skipped"] = torch.tensor(0, dtype=torch.long)
    return batch


class TokenShardsDataModule(LightningDataModule):
    """Pre-tokenized DDT codes (+ captions, edits) from `ddt pretokenize`'s output folder."""

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        """
        Args:
            root: the folder `ddt pretokenize` wrote (with `manifest.json`).
            batch_size, num_workers: DataLoader settings (per rank).
            seed: the training order's seed.
        """
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        self.root = Path(root)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.datasets: dict[str, TokenShards] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `ddt pretokenize` to write {self.root}")
        manifest = json.loads(path.read_text())
        if not manifest.get("complete"):
            raise RuntimeError(f"{self.root} is incomplete (interrupted `ddt pretokenize`): run it again to resume")
        return manifest

    def train_texts(self) -> list[str]:
        """Captions and edit instructions of the train split (what the LLM's text tokenizer is trained on)."""
        train = self._dataset("train")
        texts = list(train.captions or [])
        if train.edit_codes is not None:
            texts += [extras["edit_instruction"] for extras in train.extras]
        return texts

    def _dataset(self, split: Split) -> TokenShards:
        if split not in self.datasets:
            if split not in self.manifest["splits"]:
                raise ValueError(f"{self.root} has no {split!r} split (it has {sorted(self.manifest['splits'])})")
            self.datasets[split] = TokenShards(self.root / split)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage or "", ("train", "val", "test")):
            self._dataset(split)  # type: ignore[arg-type]

    def _loader(self, split: Split, train: bool) -> DataLoader:
        return map_style_loader(self, self._dataset(split), train, collate_fn=collate_tokens)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
