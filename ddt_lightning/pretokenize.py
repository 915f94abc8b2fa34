"""`ddt pretokenize`: images -> DDT token ids with a frozen exported tokenizer, written once as WebDataset shards.

design.md section 2: the LLM reads image tokens from a frozen DDT tokenizer, on the fly for small runs or
pre-tokenized once into shards (the scale path, `TokenShardsDataModule` reads them back). For every split, the
DataModule's fixed-order loader (`eval_dataloader(split)`: no shuffling, no flips, no dropped tail) is encoded
batch by batch and written as tar shards of `batches_per_shard` batches:

    output/manifest.json             what made the shards (tokenizer digest, data config), K, T, per-split counts
    output/<split>/shard-000000.tar  WebDataset samples: `codes.npy` (T,) int32, `txt` caption, `json` extras
                                     (label, index, edit instruction and caption), `edit_codes.npy` (T,) for
                                     world edits

Resumable: a shard is written under a temporary name and renamed when complete, so after an interruption the
finished shards stay and the command restarts at the first missing one (skipping, without encoding, the batches
before it). Reusable: when `manifest.json` records the same key (the tokenizer's weights digest + the DataModule's
class and hyperparameters + the shard size) and every split is complete, the stage does nothing and says so; any
other content of `output` is replaced. Bad images were already skipped and counted by the DataModule
(`num_skipped`); the manifest keeps the count per split.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddt_lightning.tokenizer import CONFIG_NAME, WEIGHTS_NAME, DDTTokenizer, check_data_resolution

MANIFEST = "manifest.json"
FORMAT = "ddt-tokens/2"  # 2: world edits carry the edited scene's caption (`edit_caption` in `json`)


def tokenizer_digest(directory: str | Path) -> str:
    """SHA-256 of an exported DDT tokenizer's config and weights: what its token ids depend on."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"no DDT tokenizer export at {directory}: {name} is missing")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def datamodule_key(data: Any) -> dict[str, Any]:
    """The DataModule's class and hyperparameters (JSON-safe): which images, in which order; plus its
    `content_digest()` when it has one (generated data: the code that draws the images and captions)."""
    hparams = {k: v for k, v in dict(getattr(data, "hparams", {})).items() if k not in ("batch_size", "num_workers")}
    key = {"class": f"{type(data).__module__}.{type(data).__qualname__}", "hparams": json.loads(json.dumps(hparams))}
    if callable(getattr(data, "content_digest", None)):
        key["content"] = str(data.content_digest())
    return key


def read_manifest(output: str | Path) -> dict[str, Any] | None:
    path = Path(output) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _shard_path(split_dir: Path, index: int) -> Path:
    return split_dir / f"shard-{index:06d}.tar"


def _samples(split: str, start: int, batch: dict[str, Any], codes: np.ndarray, edit_codes: np.ndarray | None):
    """WebDataset samples of one encoded batch; keys number the split's items in loader order."""
    for row in range(codes.shape[0]):
        extras: dict[str, Any] = {"label": int(batch["label"][row])}
        if "index" in batch:
            extras["index"] = int(batch["index"][row])
        if "edit_instruction" in batch:
            extras["edit_instruction"] = batch["edit_instruction"][row]
        if "edit_caption" in batch:
            extras["edit_caption"] = batch["edit_caption"][row]
        sample = {"__key__": f"{split}-{start + row:09d}", "codes.npy": codes[row], "json": extras}
        if "caption" in batch:
            sample["txt"] = batch["caption"][row]
        if edit_codes is not None:
            sample["edit_codes.npy"] = edit_codes[row]
        yield sample


def _encode_split(
    tokenizer: DDTTokenizer, loader, split: str, split_dir: Path, batches_per_shard: int, progress: bool
) -> dict[str, int]:
    import webdataset as wds

    split_dir.mkdir(parents=True, exist_ok=True)
    done = 0
    while _shard_path(split_dir, done).is_file():
        done += 1
    skip_batches = done * batches_per_shard
    counts = {"items": 0, "skipped": 0, "shards": done}
    if done:
        # Items of the finished shards: counted from their tar members, not re-encoded.
        for index in range(done):
            counts["items"] += sum(1 for _ in wds.WebDataset(str(_shard_path(split_dir, index)), shardshuffle=False))
    writer, shard_index, position = None, done, counts["items"]
    bar = tqdm(loader, desc=f"pretokenize {split}", unit="batch", disable=not progress, file=sys.stderr)
    for batch_index, batch in enumerate(bar):
        if batch_index < skip_batches:
            continue  # already in a finished shard
        counts["skipped"] += int(batch["num_skipped"])
        if writer is None:
            tmp = _shard_path(split_dir, shard_index).with_suffix(".tar.tmp")
            writer = wds.TarWriter(str(tmp))
        if batch["image"].shape[0]:
            codes = tokenizer.encode(batch["image"]).to(torch.int32).numpy()  # (B, T)
            edit_codes = None
            if "edit_target" in batch:
                edit_codes = tokenizer.encode(batch["edit_target"]).to(torch.int32).numpy()  # (B, T)
            for sample in _samples(split, position, batch, codes, edit_codes):
                writer.write(sample)
            position += codes.shape[0]
        if (batch_index + 1) % batches_per_shard == 0:
            writer.close()
            tmp.rename(_shard_path(split_dir, shard_index))  # atomic: a shard exists only when complete
            writer, shard_index = None, shard_index + 1
    if writer is not None:
        writer.close()
        tmp.rename(_shard_path(split_dir, shard_index))
        shard_index += 1
    counts["items"], counts["shards"] = position, shard_index
    return counts


def pretokenize(
    data: Any,
    tokenizer: str,
    output: str,
    splits: list[str] | None = None,
    batches_per_shard: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode the images of `data` (a DataModule with `eval_dataloader(split)`) with the exported DDT tokenizer at
    `tokenizer` and write WebDataset shards under `output` (see the module docstring). Returns the manifest.

    Args:
        data: the DataModule whose images (and world edit targets) to encode.
        tokenizer: an exported DDT tokenizer folder (`DDTTokenizer.save_pretrained`).
        output: the shard folder; reused when it already holds the same key, replaced otherwise.
        splits: which splits (default: train, val, test - those the DataModule has).
        batches_per_shard: shard size in DataModule batches.
        progress: show a progress bar per split.
    """
    if batches_per_shard < 1:
        raise ValueError(f"batches_per_shard must be >= 1, got {batches_per_shard}")
    if not hasattr(data, "eval_dataloader"):
        raise TypeError(
            f"{type(data).__name__} has no eval_dataloader(split): pretokenize needs every item of a split once, "
            "in a fixed order"
        )
    splits = list(splits or ("train", "val", "test"))
    out = Path(output)
    key = {
        "format": FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "data": datamodule_key(data),
        "splits": splits,
        "batch_size": int(data.batch_size),
        "batches_per_shard": batches_per_shard,
    }
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("key") == key and manifest.get("complete"):
        print(f"pretokenize: reusing {out} (same tokenizer and data; {_summary(manifest)})", file=sys.stderr)
        return manifest
    ddt = DDTTokenizer.from_pretrained(tokenizer).eval()
    # Before anything on disk changes: a wrong resolution must not cost the shards already there.
    check_data_resolution(
        data, ddt.config.image_size, f"the DDT tokenizer at {tokenizer}", "set data.init_args.resolution"
    )
    if manifest is not None and manifest.get("key") != key:
        print(f"pretokenize: {out} holds tokens of another tokenizer or data config: replacing them", file=sys.stderr)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # Written first (incomplete): a rerun with the same key resumes the shards instead of replacing them.
    manifest = {"key": key, "complete": False, "num_codes": ddt.config.codebook_size}
    manifest |= {"num_tokens": ddt.config.num_tokens, "image_size": ddt.config.image_size, "splits": {}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if hasattr(data, "prepare_data"):
        data.prepare_data()
    with torch.inference_mode():
        for split in splits:
            loader = data.eval_dataloader(split)
            manifest["splits"][split] = _encode_split(ddt, loader, split, out / split, batches_per_shard, progress)
    manifest["complete"] = True
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print(f"pretokenize: wrote {out} ({_summary(manifest)})", file=sys.stderr)
    return manifest


def _summary(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{s}: {c['items']} images in {c['shards']} shards" for s, c in manifest["splits"].items())


def main(args: list[str] | None = None) -> dict[str, Any]:
    """`ddt pretokenize --config CONFIG [--data ... --tokenizer DIR --output DIR]` (jsonargparse, like `ddt fit`)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(prog="ddt pretokenize", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with the keys below")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True, help="the images to encode")
    parser.add_function_arguments(pretokenize, skip={"data"})
    config = parser.parse_args(args)
    init = parser.instantiate_classes(config)
    kwargs = {k: init[k] for k in ("data", "tokenizer", "output", "splits", "batches_per_shard", "progress")}
    return pretokenize(**kwargs)
