"""Image-text data: the three backends agree on (image, caption) pairs, bad images and missing captions are skipped,
counted and named, ranks split the data, class names and world edits as captions, Tux Paint, and `ddt fit`."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddt_lightning.data.images import BadImageWarning, uint8_to_tensor
from ddt_lightning.data.world import World
from ddt_lightning.datamodules import (
    FashionMNISTDataModule,
    ImageTextDataModule,
    MissingCaptionWarning,
    WorldDataModule,
)
from ddt_lightning.datamodules.convert import convert, main

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "configs" / "micro.yaml")
TUXPAINT_YAML = REPO / "configs" / "data" / "tuxpaint.yaml"
TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
PAIRS = {"exclude": ["*_mirror.png"], "caption_lines": "first", "val_fraction": 0.25}  # the folder's reading rules


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a flat image-text folder (nested like Tux Paint's) and its two conversions, made once per module
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """13 good pairs (PNG, RGBA PNG, JPEG, BMP; one caption with translation lines) in two folders, three bad
    items, one excluded mirror image and a sound file; returns the root and {bad path: reason}."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(13):
        folder = root / ("animals" if i % 2 else "things/small")
        folder.mkdir(parents=True, exist_ok=True)
        shape = (int(rng.integers(10, 24)), int(rng.integers(10, 24)))
        ext = ("png", "jpg", "png", "bmp")[i % 4]
        pixels = rng.integers(0, 256, (*shape, 4 if i % 4 == 2 else 3), np.uint8)
        if i % 4 == 2:  # a cut-out: RGBA with transparent corners
            pixels[:2, :2, 3] = 0
        Image.fromarray(pixels).save(folder / f"item{i:02d}.{ext}")
        (folder / f"item{i:02d}.txt").write_text(f"  A  thing number {i}.\nde.utf8=Ein Ding Nummer {i}.\n")
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "animals" / "item01_mirror.png")  # excluded, has no caption
    (root / "animals" / "item01_desc.ogg").write_bytes(b"OggS")  # ignored: not an image
    bad_dir = root / "bad"
    bad_dir.mkdir()
    Image.new("RGB", (12, 12), (5, 5, 5)).save(bad_dir / "no_caption.png")
    Image.new("RGB", (12, 12), (6, 6, 6)).save(bad_dir / "empty_caption.png")
    (bad_dir / "empty_caption.txt").write_text(" \n\n")
    (bad_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bad_dir / "corrupt.txt").write_text("A corrupt image.")
    bad = {
        str(bad_dir / "no_caption.png"): "no caption",
        str(bad_dir / "empty_caption.png"): "empty caption",
        str(bad_dir / "corrupt.png"): "not an image",
    }
    return root, bad


@pytest.fixture(scope="module")
def pair_shards(pair_tree, tmp_path_factory) -> dict[str, Path]:
    root, _ = pair_tree
    out = tmp_path_factory.mktemp("pair_shards")
    rules = {"layout": "pairs", "caption_lines": "first", "exclude": ["*_mirror.png"], "val_fraction": 0.25}
    convert(root, out / "webdataset", "webdataset", shard_size=3, progress=False, **rules)
    # fork: no re-import in the optimize worker (spawn, the CLI default, is covered in test_datamodules.py).
    convert(root, out / "litdata", "litdata", shard_size=3, start_method="fork", progress=False, **rules)
    return {"folder": root, "webdataset": out / "webdataset", "litdata": out / "litdata"}


def pairs_of(batches) -> list[tuple[str, str]]:
    """(hash of the image tensor, caption) of every item, in loader order."""
    out = []
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and len(batch["caption"]) == len(batch["image"])
        for image, caption in zip(batch["image"], batch["caption"]):
            out.append((hashlib.sha1(image.numpy().tobytes()).hexdigest(), caption))
    return out


def quietly(loader) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)  # MissingCaptionWarning is one too
        warnings.filterwarnings("ignore", message=".*ignored .* files with no image extension")
        return list(loader)


def module(root: Path, backend: str, **args) -> ImageTextDataModule:
    folder_only = PAIRS if backend == "folder" else {"val_fraction": 0.25}  # shards were made with the rules
    dm = ImageTextDataModule(str(root), backend=backend, **{"resolution": 8, "batch_size": 3, **folder_only, **args})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ignored .* files with no image extension")
        dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------------------------
# Backends agree; bad input is skipped, counted and named
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_three_backends_yield_the_same_pairs_in_the_same_order(pair_shards, split):
    seen = {name: pairs_of(quietly(module(root, name).eval_dataloader(split))) for name, root in pair_shards.items()}
    assert seen["webdataset"] == seen["folder"] and seen["litdata"] == seen["folder"]
    assert len(seen["folder"]) == {"train": 9, "val": 4}[split]  # 12 + 4 listed; the 3 bad ones fell in train
    for _, caption in seen["folder"]:  # first line only, whitespace collapsed
        assert re.fullmatch(r"A thing number \d+\.", caption), caption


def test_all_good_pairs_are_read_once(pair_shards):
    dm = module(pair_shards["folder"], "folder")
    captions = [c for split in ("train", "val") for _, c in pairs_of(quietly(dm.eval_dataloader(split)))]
    assert sorted(captions) == sorted(f"A thing number {i}." for i in range(13))
    listed = [p for split in dm._scan().splits.values() for p, _ in split]
    assert len(listed) == 16 and not any("_mirror" in p for p in listed)  # 13 good + 3 bad; mirror excluded
    assert all(label == -1 for split in dm._scan().splits.values() for _, label in split) and dm.classes == []


def test_bad_images_and_missing_captions_are_skipped_counted_and_named(pair_tree, pair_shards, tmp_path, capsys):
    root, bad = pair_tree
    dm = module(root, "folder")
    with pytest.warns(BadImageWarning) as record:
        batches = list(dm.eval_dataloader("train")) + list(dm.eval_dataloader("val"))
    assert sum(int(b["num_skipped"]) for b in batches) == len(bad)
    assert sum(len(b["image"]) for b in batches) == 13
    messages = {str(w.message): w.category for w in record}
    for path, reason in bad.items():
        (message, category), *_ = [(m, c) for m, c in messages.items() if path in m]
        assert reason in message
        assert category is (BadImageWarning if reason == "not an image" else MissingCaptionWarning)
    assert str(Path(next(iter(bad))).with_suffix(".txt")) in " ".join(messages)  # names the caption file too
    # The converter drops the same three up front and lists them with their reasons.
    assert json.loads((pair_shards["webdataset"] / "classes.json").read_text())["skipped"] == 3
    rules = ["--layout", "pairs", "--caption-lines", "first", "--exclude", "*_mirror.png", "--val-fraction", "0.25"]
    assert main([str(root), str(tmp_path / "wds"), "--format", "webdataset", *rules]) == 0
    printed = capsys.readouterr().out
    assert "skipped 3 bad files" in printed
    assert all(re.search(re.escape(path) + ".*" + reason, printed) for path, reason in bad.items())
    import tarfile

    with tarfile.open(next((tmp_path / "wds" / "train").glob("*.tar"))) as tar:
        assert {name.split(".", 1)[1] for name in tar.getnames()} >= {"txt", "path.txt"}
        assert not any(name.endswith(".cls") for name in tar.getnames())


def test_caption_lines_all_keeps_the_whole_text(pair_tree, tmp_path):
    (tmp_path / "a.png").write_bytes((pair_tree[0] / "animals" / "item01.jpg").read_bytes())
    (tmp_path / "a.txt").write_text("A cat\non a  mat.\n")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfA dog.")  # a UTF-8 byte-order mark is not part of the caption
    dm = ImageTextDataModule(str(tmp_path), resolution=8, batch_size=2, val_fraction=0.5)
    dm.setup("fit")
    captions = {c for split in ("train", "val") for _, c in pairs_of(dm.eval_dataloader(split))}
    assert captions == {"A cat on a mat.", "A dog."}


def test_wrong_keys_and_layouts_fail_naming_them(pair_shards, tmp_path):
    with pytest.raises(ValueError, match="captions"):
        ImageTextDataModule(str(tmp_path), captions="alt_text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="caption_lines"):
        ImageTextDataModule(str(tmp_path), caption_lines="last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exclude"):
        ImageTextDataModule(str(tmp_path), backend="webdataset", exclude=["*.png"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        ImageTextDataModule(str(tmp_path / "nowhere")).setup("fit")
    with pytest.raises(ValueError, match="class_names"):  # pairs have no classes to caption with
        module(pair_shards["webdataset"], "webdataset", captions="class_names")


# ---------------------------------------------------------------------------------------------------------------
# Distributed: two ranks, simulated through each library's own rank detection
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["folder", "webdataset", "litdata"])
def test_two_ranks_get_disjoint_halves(pair_shards, backend, monkeypatch):
    dm = module(pair_shards[backend], backend)
    whole = {split: pairs_of(quietly(dm.eval_dataloader(split))) for split in ("train", "val")}  # one process
    # Folder val: Lightning gives the val loader a DistributedSampler of its own, so only train is split here.
    splits = ("train", "val") if backend != "folder" else ("train",)
    runs = {}
    for split in splits:
        for rank in (0, 1):
            monkeypatch.setenv("WORLD_SIZE", "2")  # webdataset and our fallback read RANK, litdata GLOBAL_RANK
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("GLOBAL_RANK", str(rank))
            dm = module(pair_shards[backend], backend, batch_size=2)
            loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
            batches = quietly(loader)
            assert len(batches) == len(loader) > 0
            runs[split, rank] = pairs_of(batches)
        assert not set(runs[split, 0]) & set(runs[split, 1])
    if backend == "folder":
        # 12 listed train items (9 good) -> 6 indices a rank; together they cover the split exactly.
        assert sorted(runs["train", 0] + runs["train", 1]) == sorted(whole["train"])
    else:
        # Shards: equal counts and a fixed budget in training (a reader may cycle or drop a tail), exact in eval.
        assert len(runs["train", 0]) == len(runs["train", 1])
        assert set(runs["train", 0]) | set(runs["train", 1]) <= set(whole["train"])
        assert sorted(runs["val", 0] + runs["val", 1]) == sorted(whole["val"])


# ---------------------------------------------------------------------------------------------------------------
# Class names as captions, world edits
# ---------------------------------------------------------------------------------------------------------------


def test_class_names_become_captions_in_every_backend(tmp_path):
    for split, per_class in (("train", 3), ("val", 1)):
        for name in ("golden_retriever", "tabby_cat"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (10, 10), (i * 40, 9, 9)).save(tmp_path / "tree" / split / name / f"{i}.png")
    convert(tmp_path / "tree", tmp_path / "wds", "webdataset", shard_size=2, progress=False)
    seen = {}
    for backend, root in (("folder", tmp_path / "tree"), ("webdataset", tmp_path / "wds")):
        dm = ImageTextDataModule(str(root), backend=backend, captions="class_names", resolution=8, batch_size=4)
        dm.setup("fit")
        batches = list(dm.eval_dataloader("train"))
        seen[backend] = pairs_of(batches)
        labels = torch.cat([b["label"] for b in batches]).tolist()
        assert [c for _, c in seen[backend]] == [("golden retriever", "tabby cat")[label] for label in labels]
    assert seen["folder"] == seen["webdataset"] and len(seen["folder"]) == 6
    with pytest.raises(ValueError, match="captions: class_names"):  # class shards hold no caption text
        ImageTextDataModule(str(tmp_path / "wds"), backend="webdataset").setup("fit")


@pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_batches_carry_class_names():
    dm = FashionMNISTDataModule(val_size=16, batch_size=16)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["caption"] == [dm.classes[label] for label in batch["label"].tolist()]


def test_world_edit_triples_match_the_world(tmp_path, monkeypatch):
    args = {"resolution": 16, "train_size": 8, "val_size": 6, "test_size": 4, "batch_size": 6}
    dm = WorldDataModule(**args, cache_dir=str(tmp_path), edits=True)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["edit_target"].shape == batch["edit_source"].shape == (6, 3, 16, 16)
    assert torch.equal(batch["edit_source"], batch["image"]) and batch["edit_target"].min() >= -1
    world = dm.world("val")
    for row, index in enumerate(batch["index"].tolist()):
        sample = world.sample(index)
        assert batch["caption"][row] == sample.caption and batch["edit_instruction"][row] == sample.edit_instruction
        assert torch.equal(batch["image"][row], uint8_to_tensor(sample.image))
        assert torch.equal(batch["edit_target"][row], uint8_to_tensor(sample.edited_image))
        assert batch["edit_caption"][row] == sample.edited_scene.caption()  # the caption_first edit format's
    assert not torch.equal(batch["edit_target"], batch["image"])
    # Cached apart from image-only entries, and reloaded without rendering.
    assert WorldDataModule(**args, cache_dir=str(tmp_path)).cache_path("val") != dm.cache_path("val")
    monkeypatch.setattr(World, "sample", lambda *a, **k: pytest.fail("rendered despite the cache"))
    again = WorldDataModule(**args, cache_dir=str(tmp_path), edits=True)
    again.setup("validate")
    reloaded = next(iter(again.val_dataloader()))
    assert (
        torch.equal(reloaded["edit_target"], batch["edit_target"]) and reloaded["edit_caption"] == batch["edit_caption"]
    )
    plain = next(iter(WorldDataModule(**args, cache_dir=None).val_dataloader()))
    assert "edit_target" not in plain and torch.equal(plain["image"], batch["image"])


# ---------------------------------------------------------------------------------------------------------------
# Tux Paint (real captions) and the config
# ---------------------------------------------------------------------------------------------------------------


def tuxpaint_module() -> ImageTextDataModule:
    text = TUXPAINT_YAML.read_text()
    assert text.startswith("# ddt fit --config configs/main.yaml --config configs/data/tuxpaint.yaml")
    spec = yaml.safe_load(text)["data"]
    assert spec["class_path"] == "ddt_lightning.datamodules.ImageTextDataModule"
    dm = ImageTextDataModule(**spec["init_args"])
    assert dict(dm.hparams) == {**dict(dm.hparams), **spec["init_args"]}
    return dm


def test_tuxpaint_config_instantiates_without_the_package():
    assert tuxpaint_module().root == TUXPAINT_ROOT  # nothing is read before setup


@pytest.mark.skipif(
    not TUXPAINT_ROOT.is_dir(),
    reason="Debian package tuxpaint-stamps-default not installed (apt-get install tuxpaint-stamps-default)",
)
def test_tuxpaint_stamps_are_captioned_photos():
    dm = tuxpaint_module()
    with pytest.warns(UserWarning, match="ignored .* files with no image extension"):  # sounds, SVGs, .dat
        dm.setup("fit")
    listing = dm._scan().splits
    # The package ships 796 PNGs, 11 of them mirror alternates; machines with more of Tux Paint installed also have
    # 6 uncaptioned Tux cartoons in the same tree (802 PNGs). Expectations follow what is on disk.
    pngs = {p for p in TUXPAINT_ROOT.rglob("*.png") if not p.name.endswith("_mirror.png")}
    assert len(pngs) >= 785
    listed = [Path(p) for split in listing.values() for p, _ in split]
    assert set(listed) == pngs and len(listed) == len(pngs)
    assert len(listing["val"]) == round(0.1 * len(pngs))  # hold_out rounds
    assert not {p for p, _ in listing["train"]} & {p for p, _ in listing["val"]}
    uncaptioned = {p.name for p in listed if not p.with_suffix(".txt").exists()}
    assert uncaptioned <= {f"tux-{n}.png" for n in ("drat", "kiss1", "kiss2", "yay2", "yes1", "yes2")}
    assert len(pngs) - len(uncaptioned) == 785  # every stamp photo has its caption
    batches = quietly(dm.val_dataloader())
    images = torch.cat([b["image"] for b in batches])
    captions = [c for b in batches for c in b["caption"]]
    skipped = sum(int(b["num_skipped"]) for b in batches)
    assert images.shape[1:] == (3, 32, 32) and len(captions) + skipped == len(listing["val"])
    assert all(c and "utf8=" not in c and "\n" not in c for c in captions)  # the English line alone
    assert sum(c.isascii() for c in captions) >= 0.9 * len(captions)
    # Cut-outs composited on white and padded with white: the corners are white in nearly every image.
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 3, 4)
    assert (corners > 0.95).all(dim=1).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer trains on it through the real CLI
# ---------------------------------------------------------------------------------------------------------------


def test_ddt_fit_trains_the_tokenizer_on_image_text_pairs(pair_tree, tmp_path, monkeypatch):
    from ddt_lightning.cli import DDTCLI

    monkeypatch.chdir(tmp_path)
    data = {
        "class_path": "ddt_lightning.datamodules.ImageTextDataModule",
        "init_args": {"root": str(pair_tree[0]), "resolution": 16, "batch_size": 4, **PAIRS},
    }
    steps = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        warnings.filterwarnings("ignore", message=".*ignored .* files with no image extension")
        cli = DDTCLI(args=["fit", "--config", MICRO, "--data", json.dumps(data), *steps, "--trainer.logger", "false"])
    assert type(cli.datamodule) is ImageTextDataModule and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/psnr_onestep" in cli.trainer.callback_metrics  # validated on held-out pairs
