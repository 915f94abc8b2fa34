"""Convert a class-folder tree or a folder of image-text pairs into WebDataset tar shards or a LitData dataset.

    python -m ddt_lightning.datamodules.convert SRC DST --format webdataset|litdata [--shard-size N]
    python -m ddt_lightning.datamodules.convert SRC DST --format ... --layout pairs [--caption-lines first]
        [--exclude '*_mirror.png']

`--layout classes` (default): SRC has the layout `SRC/train/<class>/<image>` (and optionally
`SRC/val/<class>/<image>`; without it the held-out split is made here by `scan_class_folder`, exactly as the folder
backend would); `ImageFolderDataModule(root=DST, backend=...)` reads the result. `--layout pairs`: SRC is an
image-text folder (images beside `.txt` captions, listed by `scan_pair_folder`, see `pair_folder.py`); each sample
also stores its cleaned caption (WebDataset `txt` member, LitData `caption` field) and
`ImageTextDataModule(root=DST, backend=...)` reads it. DST gets `classes.json` and one folder per split in the
layout `streaming.py` reads.

Every file is decoded once first (`load_rgb`): bad files (corrupt, truncated, empty, not an image) and, for pairs,
images without a caption (no `.txt`, empty, not UTF-8) are skipped and listed at the end with their reasons.
Images are stored as their original encoded bytes when they are JPEG, PNG or WebP; anything else (BMP, TIFF,
GIF, ...) is re-encoded as PNG from its decoded RGB image. The output order is the sorted order of the files
(samples, shards and chunks), so converting twice gives the same data.

LitData's `optimize` runs its workers with the `spawn` start method by default (so the item function lives at
module level) and keeps temporary folders under /tmp unless told otherwise: here they go under DST and are removed.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from ddt_lightning.data.images import BadImageError, load_rgb
from ddt_lightning.datamodules.class_folder import scan_class_folder
from ddt_lightning.datamodules.pair_folder import (
    CaptionLines,
    Captions,
    caption_path,
    check_caption_lines,
    read_caption_file,
    scan_pair_folder,
)
from ddt_lightning.datamodules.streaming import CLASSES_FILE, SHARD_INDEX

Format = Literal["webdataset", "litdata"]
Layout = Literal["classes", "pairs"]
KEPT_FORMATS: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # Pillow format -> stored extension


@dataclass
class Checked:
    path: str
    label: int
    ext: str = ""  # the stored extension ("png" when re-encoded)
    reencode: bool = False
    error: str = ""  # non-empty for a bad file
    caption: str | None = None  # pairs: the cleaned caption


@dataclass
class ConvertReport:
    output: str
    counts: dict[str, int] = field(default_factory=dict)  # split -> images written
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def check_file(entry: tuple[str, int], caption_lines: CaptionLines | None = None) -> Checked:
    """Decode one file fully; decide whether its bytes can be kept as they are. With `caption_lines` (pairs), also
    read its caption; a missing or empty one makes the pair bad."""
    path, label = entry
    caption = None
    if caption_lines is not None:
        caption, reason = Captions(caption_lines).find(read_caption_file(path), label)
        if caption is None:
            return Checked(path, label, error=f"{reason} ({caption_path(path).name})")
    try:
        data = Path(path).read_bytes()
        load_rgb(data)
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
    except (BadImageError, OSError) as error:
        return Checked(path, label, error=error.reason if isinstance(error, BadImageError) else str(error))
    ext = KEPT_FORMATS.get(image_format)
    return Checked(path, label, ext=ext or "png", reencode=ext is None, caption=caption)


def encoded_bytes(path: str, reencode: bool) -> bytes:
    if not reencode:
        return Path(path).read_bytes()
    buffer = io.BytesIO()
    load_rgb(path).save(buffer, format="PNG")
    return buffer.getvalue()


def litdata_item(entry: tuple[str, int, str, bool, str | None]) -> dict[str, object]:
    """LitData `optimize` item function (module level: its workers are spawned)."""
    path, label, name, reencode, caption = entry
    item: dict[str, object] = {"image": encoded_bytes(path, reencode), "label": label, "path": name}
    return item if caption is None else {**item, "caption": caption}


def _check_all(
    entries: list[tuple[str, int]], split: str, num_workers: int, caption_lines: CaptionLines | None, progress: bool
) -> list[Checked]:
    bar = {"total": len(entries), "desc": f"checking {split}", "unit": "img", "disable": not progress}
    check = functools.partial(check_file, caption_lines=caption_lines)
    if num_workers <= 1:
        return [check(entry) for entry in tqdm(entries, **bar)]
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        # imap keeps the input order, so the output stays deterministic.
        return list(tqdm(pool.imap(check, entries, chunksize=64), **bar))


def _write_webdataset(good: list[Checked], split_dir: Path, src: Path, shard_size: int, progress: bool) -> None:
    shards: list[dict[str, object]] = []
    writer: wds.TarWriter | None = None
    for i, item in enumerate(tqdm(good, desc=f"writing {split_dir.name}", unit="img", disable=not progress)):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            name = f"shard-{len(shards):06d}.tar"
            writer = wds.TarWriter(str(split_dir / name), encoder=False, mtime=0.0)  # fixed mtime: same bytes
            shards.append({"file": name, "num_samples": 0})
        assert writer is not None
        sample = {"__key__": f"{i:09d}", item.ext: encoded_bytes(item.path, item.reencode)}
        # Pairs carry their caption (`txt`), class-folder images their label (`cls`).
        sample.update({"txt": item.caption.encode()} if item.caption is not None else {"cls": str(item.label).encode()})
        writer.write({**sample, "path.txt": str(Path(item.path).relative_to(src)).encode()})
        shards[-1]["num_samples"] = int(shards[-1]["num_samples"]) + 1  # type: ignore[call-overload]
    if writer is not None:
        writer.close()
    (split_dir / SHARD_INDEX).write_text(json.dumps({"shards": shards, "num_samples": len(good)}, indent=1))


@contextmanager
def _litdata_temp_dirs(dst: Path) -> Iterator[None]:
    """Point LitData's optimize caches (default: under /tmp) into DST, and remove them afterwards."""
    tmp = dst / ".litdata_optimize"
    names = {"DATA_OPTIMIZER_CACHE_FOLDER": tmp / "chunks", "DATA_OPTIMIZER_DATA_CACHE_FOLDER": tmp / "data"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(path) for name, path in names.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(tmp, ignore_errors=True)


def _write_litdata(
    good: list[Checked],
    split_dir: Path,
    src: Path,
    shard_size: int,
    num_workers: int,
    start_method: str | None,
    progress: bool,
) -> None:
    from litdata import optimize  # heavy import, only for this format

    inputs = [(c.path, c.label, str(Path(c.path).relative_to(src)), c.reencode, c.caption) for c in good]
    with _litdata_temp_dirs(split_dir.parent):
        optimize(
            fn=litdata_item,
            inputs=inputs,
            output_dir=str(split_dir),
            chunk_size=shard_size,
            num_workers=max(1, num_workers),
            reorder_files=False,  # keep the sorted input order ...
            keep_data_ordered=True,  # ... and give each worker a contiguous slice: deterministic output
            start_method=start_method,
            verbose=progress,
        )


def convert(
    src: str | Path,
    dst: str | Path,
    format: Format,
    shard_size: int = 1000,
    val_fraction: float = 0.05,
    seed: int = 0,
    num_workers: int = 1,
    start_method: str | None = None,
    progress: bool = True,
    layout: Layout = "classes",
    caption_lines: CaptionLines = "all",
    exclude: Sequence[str] = (),
) -> ConvertReport:
    """Convert the class-folder tree (or, with `layout="pairs"`, the image-text folder) `src` into `dst` (see the
    module docstring); return counts and skipped files."""
    if format not in ("webdataset", "litdata"):
        raise ValueError(f"format must be 'webdataset' or 'litdata', got {format!r}")
    if layout not in ("classes", "pairs"):
        raise ValueError(f"layout must be 'classes' or 'pairs', got {layout!r}")
    check_caption_lines(caption_lines)
    if exclude and layout != "pairs":
        raise ValueError("exclude applies to --layout pairs only")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    pairs = layout == "pairs"
    folder = scan_pair_folder(src, val_fraction, seed, exclude) if pairs else scan_class_folder(src, val_fraction, seed)
    report = ConvertReport(output=str(dst))
    for split in folder.splits:
        split_dir = dst / split
        if split_dir.exists() and any(split_dir.iterdir()):
            raise FileExistsError(f"{split_dir} exists and is not empty; remove it or choose another DST")
    for split, entries in folder.splits.items():
        checked = _check_all(entries, split, num_workers, caption_lines if pairs else None, progress)
        good = [c for c in checked if not c.error]
        report.skipped.extend((c.path, c.error) for c in checked if c.error)
        if not good:
            raise ValueError(f"{src} ({split}): no readable image among {len(entries)} files")
        split_dir = dst / split
        split_dir.mkdir(parents=True, exist_ok=True)
        if format == "webdataset":
            _write_webdataset(good, split_dir, src, shard_size, progress)
        else:
            _write_litdata(good, split_dir, src, shard_size, num_workers, start_method, progress)
        report.counts[split] = len(good)
    meta = {
        "classes": folder.classes,
        "layout": layout,
        "format": format,
        "splits": report.counts,
        "val_source": folder.val_source,
        "source": str(src),
        "skipped": len(report.skipped),
    }
    (dst / CLASSES_FILE).write_text(json.dumps(meta, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddt_lightning.datamodules.convert",
        description="Convert SRC/train/<class>/<image> (and SRC/val/...), or a folder of image + .txt pairs "
        "(--layout pairs), into WebDataset or LitData shards.",
    )
    parser.add_argument("src", help="class-folder root holding train/ (and optionally val/), or an image-text folder")
    parser.add_argument("dst", help="output root (gets classes.json, train/, val/)")
    parser.add_argument("--format", required=True, choices=["webdataset", "litdata"])
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard / litdata chunk")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held out from train when SRC has no val/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--num-workers", type=int, default=1, help="processes for checking and litdata writing")
    parser.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default=None)
    parser.add_argument(
        "--layout", choices=["classes", "pairs"], default="classes", help="SRC/train/<class>/... or image + .txt pairs"
    )
    parser.add_argument(
        "--caption-lines", choices=["all", "first"], default="all", help="pairs: the whole .txt, or its first line"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="pairs: skip files matching (repeatable)"
    )
    args = parser.parse_args(argv)
    report = convert(
        args.src,
        args.dst,
        args.format,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        num_workers=args.num_workers,
        start_method=args.start_method,
        layout=args.layout,
        caption_lines=args.caption_lines,
        exclude=args.exclude,
    )
    written = ", ".join(f"{split}: {n}" for split, n in report.counts.items())
    print(f"wrote {args.format} to {report.output} ({written} images)")
    print(f"skipped {len(report.skipped)} bad files")
    for path, reason in report.skipped:
        print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
