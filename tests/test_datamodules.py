"""DataModules: batch contract, bad-file skipping, converter, backend agreement, rank splits, world, Fashion-MNIST."""

from __future__ import annotations

import hashlib
import importlib
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from ddt_lightning.data.images import BadImageWarning, ImageTransform
from ddt_lightning.data.world import World
from ddt_lightning.datamodules import (
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SkipBadCollate,
    WorldDataModule,
    streaming,
)
from ddt_lightning.datamodules.class_folder import FileImages, scan_class_folder
from ddt_lightning.datamodules.convert import convert, main
from ddt_lightning.datamodules.streaming import WebDatasetImages

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny class-folder tree with bad files, and its two conversions (made once per module)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory) -> tuple[Path, list[str]]:
    """root/{train,val}/{cat,dog}/ with PNG, JPEG and BMP images of random sizes, plus five bad files."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (int(rng.integers(12, 30)), int(rng.integers(12, 30)), 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{('png', 'jpg', 'bmp')[i % 3]}")
    good = io_bytes(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG")
    bad = {
        "train/cat/corrupt.png": good[:60] + b"\x00" * 50 + good[110:],
        "train/cat/notes.jpg": b"a text file with an image extension\n",
        "train/dog/empty.png": b"",
        "train/dog/truncated.jpg": io_bytes(Image.new("RGB", (40, 40), (9, 9, 9)), "JPEG")[:200],
        "val/dog/broken.png": good[:50],
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root, sorted(str(root / name) for name in bad)


def io_bytes(image: Image.Image, image_format: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data_shards(data_tree, tmp_path_factory) -> dict[str, Path]:
    root, _ = data_tree
    out = tmp_path_factory.mktemp("shards")
    # Shards of 5: train = 5 + 5 + 2 images, so two ranks get unequal shares unless the reader evens them out.
    convert(root, out / "webdataset", "webdataset", shard_size=5, progress=False)
    # fork: no re-import in the optimize worker (the CLI default, spawn, is covered by the slow test below).
    convert(root, out / "litdata", "litdata", shard_size=5, start_method="fork", progress=False)
    return {"folder": root, "webdataset": out / "webdataset", "litdata": out / "litdata"}


def digest(batches) -> list[tuple[str, int]]:
    """(hash of the image tensor, label) of every image, in loader order."""
    out = []
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
        for image, label in zip(batch["image"], batch["label"]):
            out.append((hashlib.sha1(image.numpy().tobytes()).hexdigest(), int(label)))
    return out


def quietly(loader) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        return list(loader)


# ---------------------------------------------------------------------------------------------------------------
# Folder backend and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_folder_batches_skip_count_and_name_bad_files(data_tree):
    root, bad = data_tree
    dm = ImageFolderDataModule(str(root), resolution=16, batch_size=4)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2 and dm.resolution == 16
    with pytest.warns(BadImageWarning) as record:
        batches = list(dm.eval_dataloader("train")) + list(dm.val_dataloader())
    assert sum(int(b["num_skipped"]) for b in batches) == len(bad)
    assert sum(len(b["image"]) for b in batches) == 16  # 12 train + 4 val good images
    messages = " ".join(str(w.message) for w in record)
    assert all(path in messages for path in bad)
    batch = batches[0]
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["num_skipped"].dtype == torch.long and batch["num_skipped"].ndim == 0
    assert set(torch.cat([b["label"] for b in batches]).tolist()) == {0, 1}


def test_a_batch_of_only_bad_files_does_not_crash(data_tree):
    _, bad = data_tree
    loader = DataLoader(
        FileImages([(p, 0) for p in bad], ImageTransform(8)), batch_size=2, collate_fn=SkipBadCollate(8)
    )
    batches = quietly(loader)
    assert [b["image"].shape for b in batches] == [(0, 3, 8, 8)] * 3
    assert [int(b["num_skipped"]) for b in batches] == [2, 2, 1]
    assert batches[0]["label"].shape == (0,)


def test_missing_root_and_empty_class_folder_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        ImageFolderDataModule(str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "tree" / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tree" / "train" / "empty_class"))):
        ImageFolderDataModule(str(tmp_path / "tree")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"classes\.json"):
        ImageFolderDataModule(str(tmp_path), backend="webdataset").setup("fit")


def test_held_out_val_is_fixed_and_disjoint(data_tree, tmp_path):
    root, _ = data_tree
    (tmp_path / "train").symlink_to(root / "train")  # a tree without val/
    a, b = scan_class_folder(tmp_path, 0.25, seed=0), scan_class_folder(tmp_path, 0.25, seed=0)
    assert a.splits == b.splits and a.val_source.startswith("held-out")
    assert not set(a.splits["train"]) & set(a.splits["val"])
    assert len(a.splits["val"]) == round(0.25 * 16)  # 12 good + 4 bad files in train/
    assert scan_class_folder(tmp_path, 0.25, seed=1).splits["val"] != a.splits["val"]


# ---------------------------------------------------------------------------------------------------------------
# Converter and backend agreement
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_three_backends_yield_the_same_images_in_the_same_order(data_shards, split):
    seen = {}
    for backend, root in data_shards.items():
        dm = ImageFolderDataModule(str(root), backend=backend, resolution=16, batch_size=3)
        dm.setup("fit")
        assert dm.classes == ["cat", "dog"]
        seen[backend] = digest(quietly(dm.eval_dataloader(split)))
    assert len(seen["folder"]) == {"train": 12, "val": 4}[split]
    assert seen["webdataset"] == seen["folder"]
    assert seen["litdata"] == seen["folder"]


def test_converter_cli_lists_bad_files_and_is_deterministic(data_tree, tmp_path, capsys):
    root, bad = data_tree
    assert main([str(root), str(tmp_path / "a"), "--format", "webdataset", "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {len(bad)} bad files" in printed and all(path in printed for path in bad)
    convert(root, tmp_path / "b", "webdataset", shard_size=4, progress=False)
    shards = sorted((tmp_path / "a").rglob("*.tar"))
    assert len(shards) == 3 + 1  # 12 train images in shards of 4, 4 val images
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "b" / shard.relative_to(tmp_path / "a")).read_bytes()
    # BMP is re-encoded as PNG; PNG and JPEG keep their bytes.
    import tarfile

    with tarfile.open(shards[0]) as tar:
        suffixes = {name.split(".", 1)[1] for name in tar.getnames()}
    assert suffixes == {"png", "jpg", "cls", "path.txt"}
    with pytest.raises(FileExistsError, match="not empty"):
        convert(root, tmp_path / "a", "webdataset", progress=False)


@pytest.mark.slow
def test_litdata_conversion_with_spawned_workers(data_tree, data_shards, tmp_path):
    root, _ = data_tree
    convert(root, tmp_path / "lit", "litdata", shard_size=5, progress=False)  # litdata's default start method
    assert not (tmp_path / ".litdata_optimize").exists() and not (tmp_path / "lit" / ".litdata_optimize").exists()
    for split in ("train", "val"):
        spawned = ImageFolderDataModule(str(tmp_path / "lit"), backend="litdata", resolution=8).eval_dataloader(split)
        forked = ImageFolderDataModule(str(data_shards["litdata"]), backend="litdata", resolution=8)
        assert digest(quietly(spawned)) == digest(quietly(forked.eval_dataloader(split)))


# ---------------------------------------------------------------------------------------------------------------
# Distributed splits, simulated through each library's own rank detection (no processes)
# ---------------------------------------------------------------------------------------------------------------


def _per_rank(data_shards, backend: str, split: str, monkeypatch) -> list[list[list[str]]]:
    runs = []
    for rank in (0, 1):
        # webdataset (and our fallback) read RANK/WORLD_SIZE; litdata reads WORLD_SIZE/GLOBAL_RANK.
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dm = ImageFolderDataModule(str(data_shards[backend]), backend=backend, resolution=8, batch_size=2)
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        batches = [[h for h, _ in digest([b])] for b in quietly(loader)]
        assert len(batches) == len(loader)
        runs.append(batches)
    return runs


@pytest.mark.parametrize("backend", ["webdataset", "litdata"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_two_ranks_get_disjoint_data_and_equal_batch_counts(data_shards, backend, split, monkeypatch):
    rank0, rank1 = _per_rank(data_shards, backend, split, monkeypatch)
    assert len(rank0) == len(rank1) > 0
    if split == "train":
        assert all(len(b) == 2 for b in rank0 + rank1)  # drop_last for training
    else:  # 4 val images: 2 per rank, none repeated, none lost
        assert sorted(h for b in rank0 + rank1 for h in b) == sorted({h for b in rank0 + rank1 for h in b})
        assert sum(len(b) for b in rank0 + rank1) == 4
    assert not {h for b in rank0 for h in b} & {h for b in rank1 for h in b}


def test_webdataset_split_by_rank_and_worker(data_tree, tmp_path, monkeypatch):
    """2 ranks x 2 workers, workers faked through get_worker_info: readers disjoint, equal counts, every epoch."""
    convert(data_tree[0], tmp_path, "webdataset", shard_size=2, progress=False)
    split_dir = tmp_path / "train"  # 12 images in 6 shards of 2
    assignments = []
    for epoch in (0, 1):
        counts, owners = [], {}
        for rank in (0, 1):
            for worker in (0, 1):
                monkeypatch.setattr(streaming, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=2))
                dataset = WebDatasetImages(
                    split_dir, ImageTransform(8), 2, num_workers=2, rank=rank, world_size=2, shuffle=True, seed=0
                )
                dataset.set_epoch(epoch)
                batches = quietly(dataset)
                counts.append(len(batches))
                for key in digest(batches):
                    assert owners.setdefault(key, (rank, worker)) == (rank, worker), "two readers got one image"
        assert counts == [2, 2, 2, 2]  # 12 images / 4 readers = 3 each -> ceil(3 / 2) = 2 batches
        assert len(dataset) == 4  # batches per rank, as the DataLoader will report it
        assignments.append(owners)
    assert assignments[0] != assignments[1]  # the shard order is reshuffled every epoch
    # The loader hands the epoch (from the Trainer, here a stand-in) to the dataset before each pass.
    monkeypatch.setattr(streaming, "get_worker_info", lambda: None)
    dataset = WebDatasetImages(split_dir, ImageTransform(8), 2, num_workers=0, shuffle=True)
    loader = streaming.EpochDataLoader(dataset, num_workers=0, epoch_source=lambda: 7)
    assert len(quietly(loader)) == len(loader) == 6 and dataset.epoch == 7
    with pytest.raises(ValueError, match="shard-size"):  # training needs a shard per reader: 6 < 2 x 4
        WebDatasetImages(split_dir, ImageTransform(8), 2, num_workers=4, rank=0, world_size=2, shuffle=True)
    # Evaluation strides over samples instead, so it has no such limit.
    assert len(WebDatasetImages(split_dir, ImageTransform(8), 1, num_workers=4, rank=0, world_size=2)) == 4


# ---------------------------------------------------------------------------------------------------------------
# World and Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------


def test_world_module_splits_contract_and_cache(tmp_path, monkeypatch):
    args = {"train_size": 48, "val_size": 16, "test_size": 16, "batch_size": 8, "cache_dir": str(tmp_path)}
    dm = WorldDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert (batch["label"] == -1).all() and int(batch["num_skipped"]) == 0
    for index, caption in zip(batch["index"].tolist(), batch["caption"]):
        assert caption == dm.world("val").sample(index).caption
    assert len(list(dm.train_dataloader())) == 6
    splits = {
        s: {digest([b])[i][0] for b in dm._loader(s, train=False) for i in range(len(b["image"]))} for s in dm.sizes
    }
    assert [len(v) for v in splits.values()] == [48, 16, 16]
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]
    # A second module with the same parameters loads the cache and renders nothing.
    monkeypatch.setattr(World, "render_range", lambda *a, **k: pytest.fail("rendered despite the cache"))
    again = WorldDataModule(**args)
    again.setup("fit")
    assert np.array_equal(again.datasets["train"].images, dm.datasets["train"].images)
    assert WorldDataModule(**{**args, "seed": 1}).cache_path("train") != dm.cache_path("train")


def test_world_module_without_cache(tmp_path):
    dm = WorldDataModule(train_size=8, val_size=4, test_size=4, batch_size=4, cache_dir=None)
    dm.setup("validate")
    image, caption = World(seed=1).image_and_caption(2)  # val stream = seed 3 * 0 + 1
    assert dm.datasets["val"].captions[2] == caption
    assert np.array_equal(dm.datasets["val"].images[2], image)


@pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_reads_the_real_files():
    dm = FashionMNISTDataModule(resolution=32, val_size=500, batch_size=250)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 60_000 and len(dm.datasets["val"]) == 500 and len(dm.datasets["test"]) == 10_000
    assert np.bincount(dm.datasets["train"].labels).tolist() == [6000] * 10
    assert len(dm.classes) == dm.num_classes == 10 and dm.classes[9] == "Ankle boot"
    images = torch.cat([b["image"] for b in dm.val_dataloader()])
    labels = torch.cat([b["label"] for b in dm.val_dataloader()])
    assert images.shape == (500, 3, 32, 32) and labels.min() >= 0 and labels.max() <= 9
    assert torch.equal(images[:, 0], images[:, 1])  # grey -> RGB
    pixels = (images + 1) / 2  # Fashion-MNIST: mean 0.286, std 0.353 in [0, 1]
    assert 0.25 < pixels.mean() < 0.32 and 0.30 < pixels.std() < 0.40
    assert (images.amin(dim=(1, 2, 3)) == -1).all()  # black background in every image


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["world.yaml", "fashion_mnist.yaml", "imagefolder.yaml"])
def test_data_configs_instantiate(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("# ddt fit --config configs/main.yaml --config configs/data/" + name)
    spec = yaml.safe_load(text)["data"]
    module_name, class_name = spec["class_path"].rsplit(".", 1)
    dm = getattr(importlib.import_module(module_name), class_name)(**spec["init_args"])
    assert dm.resolution == spec["init_args"]["resolution"]
    assert dict(dm.hparams) == {**dict(dm.hparams), **spec["init_args"]}
