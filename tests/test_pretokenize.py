"""`ddt pretokenize` and `TokenShardsDataModule`: ids equal the tokenizer's, shards resume, reuse and round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddt_lightning import pretokenize as pt
from ddt_lightning.datamodules import TokenShardsDataModule, WorldDataModule
from ddt_lightning.datamodules.tokens import TokenShards
from ddt_lightning.tokenizer import DDTTokenizer, TokenizerConfig

SIZES = {"train": 20, "val": 6, "test": 5}


def tiny_tokenizer(seed: int) -> DDTTokenizer:
    torch.manual_seed(seed)
    config = TokenizerConfig.preset("micro")
    return DDTTokenizer(config).eval()


@pytest.fixture(scope="module")
def ddt_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer(0).save_pretrained(tmp_path_factory.mktemp("ddt"))


def world(edits: bool = True) -> WorldDataModule:
    return WorldDataModule(
        resolution=16,
        train_size=SIZES["train"],
        val_size=SIZES["val"],
        test_size=SIZES["test"],
        batch_size=4,
        cache_dir=None,
        edits=edits,
    )


@pytest.fixture(scope="module")
def shards(ddt_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tokens") / "world"
    manifest = pt.pretokenize(world(), str(ddt_dir), str(out), batches_per_shard=2, progress=False)
    return out, manifest


def test_manifest_counts_every_item_of_every_split(shards):
    out, manifest = shards
    assert manifest["complete"] and manifest["num_tokens"] == 8 and manifest["num_codes"] == 64
    for split, size in SIZES.items():
        counts = manifest["splits"][split]
        assert counts["items"] == size and counts["skipped"] == 0
        assert counts["shards"] == len(list((out / split).glob("shard-*.tar"))) == -(-size // 8)  # 2 batches of 4
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / pt.MANIFEST).read_text()) == manifest


def test_shard_ids_equal_the_tokenizers_codes_in_loader_order(shards, ddt_dir):
    out, _ = shards
    dm = TokenShardsDataModule(str(out), batch_size=4)
    dm.setup("test")
    tokenizer = DDTTokenizer.from_pretrained(ddt_dir).eval()
    source = world()
    batch = next(iter(source.eval_dataloader("test")))
    got = next(iter(dm.test_dataloader()))
    assert torch.equal(got["codes"], tokenizer.encode(batch["image"]))
    assert torch.equal(got["edit_target_codes"], tokenizer.encode(batch["edit_target"]))
    assert got["caption"] == batch["caption"] and got["edit_instruction"] == batch["edit_instruction"]
    assert got["edit_caption"] == batch["edit_caption"]
    assert torch.equal(got["index"], batch["index"]) and got["codes"].dtype == torch.long


def test_train_split_is_complete_and_texts_include_instructions(shards):
    out, _ = shards
    dm = TokenShardsDataModule(str(out), batch_size=4)
    dm.setup("fit")
    assert sorted(dm.datasets["train"].extras[i]["index"] for i in range(SIZES["train"])) == list(range(20))
    texts = dm.train_texts()
    assert len(texts) == 2 * SIZES["train"] and texts[:20] == dm.datasets["train"].captions
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert len(seen) == 20 and sorted(seen.tolist()) == list(range(20))  # shuffled, drop_last: 5 batches of 4


def test_same_key_is_reused_without_rewriting(shards, ddt_dir, capsys):
    out, manifest = shards
    stamp = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    again = pt.pretokenize(world(), str(ddt_dir), str(out), batches_per_shard=2, progress=False)
    assert again == manifest and "reusing" in capsys.readouterr().err
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == stamp


def test_a_changed_world_replaces_the_shards(ddt_dir, tmp_path, monkeypatch, capsys):
    # The same config but other code drawing the world (say, captions in another order): stale shards must go.
    out = tmp_path / "tokens"
    first = pt.pretokenize(world(edits=False), str(ddt_dir), str(out), splits=["val"], progress=False)
    assert first["key"]["data"]["content"] == WorldDataModule.content_digest()
    monkeypatch.setattr(WorldDataModule, "content_digest", staticmethod(lambda: "another world"))
    second = pt.pretokenize(world(edits=False), str(ddt_dir), str(out), splits=["val"], progress=False)
    assert "replacing" in capsys.readouterr().err and second["key"]["data"]["content"] == "another world"


def test_interrupted_run_resumes_at_the_first_missing_shard(ddt_dir, shards, tmp_path, monkeypatch):
    reference, _ = shards
    out = tmp_path / "tokens"
    real_encode, calls = DDTTokenizer.encode, {"n": 0}

    def failing_encode(self, images):
        calls["n"] += 1
        if calls["n"] == 7:  # train: batch 0-1 (shard 0), batch 2 (shard 1) are encoded (2 calls each), then fail
            raise KeyboardInterrupt
        return real_encode(self, images)

    monkeypatch.setattr(DDTTokenizer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(world(), str(ddt_dir), str(out), batches_per_shard=2, progress=False)
    assert not json.loads((out / pt.MANIFEST).read_text())["complete"]
    assert [p.name for p in sorted((out / "train").glob("shard-*.tar"))] == ["shard-000000.tar"]

    calls["n"] = -1000  # no more failures; count the encodes of the resumed run
    manifest = pt.pretokenize(world(), str(ddt_dir), str(out), batches_per_shard=2, progress=False)
    train_batches = -(-SIZES["train"] // 4) - 2  # shard 0 (2 batches) is not encoded again
    other_batches = sum(-(-SIZES[s] // 4) for s in ("val", "test"))
    assert calls["n"] + 1000 == 2 * (train_batches + other_batches)  # image + edit target per batch
    assert manifest["complete"] and manifest["splits"]["train"]["items"] == SIZES["train"]
    for split in SIZES:
        ours, theirs = TokenShards(out / split), TokenShards(reference / split)
        assert (ours.codes == theirs.codes).all() and (ours.edit_codes == theirs.edit_codes).all()


def test_another_tokenizer_replaces_the_shards(ddt_dir, tmp_path, capsys):
    other = tiny_tokenizer(1).save_pretrained(tmp_path / "other")
    out = tmp_path / "tokens"
    pt.pretokenize(world(edits=False), str(other), str(out), splits=["val"], progress=False)
    (out / "val" / "stale.txt").write_text("left by the other run")
    old = TokenShards(out / "val").codes
    manifest = pt.pretokenize(world(edits=False), str(ddt_dir), str(out), splits=["val"], progress=False)
    assert "replacing" in capsys.readouterr().err and not (out / "val" / "stale.txt").exists()
    new = TokenShards(out / "val")
    assert manifest["key"]["tokenizer"] == pt.tokenizer_digest(ddt_dir) and new.edit_codes is None
    batch = next(iter(world(edits=False).eval_dataloader("val")))
    assert torch.equal(
        torch.from_numpy(new.codes[:4]).long(), DDTTokenizer.from_pretrained(ddt_dir).encode(batch["image"])
    )
    assert not (new.codes == old).all()


def test_bad_arguments_fail_clearly(ddt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        pt.pretokenize(world(), str(tmp_path / "nowhere"), str(tmp_path / "out"), progress=False)
    with pytest.raises(TypeError, match="eval_dataloader"):
        pt.pretokenize(object(), str(ddt_dir), str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="batches_per_shard"):
        pt.pretokenize(world(), str(ddt_dir), str(tmp_path / "out"), batches_per_shard=0)
    wrong = world()
    wrong.resolution = 32  # the tokenizer is 16 px: named before anything is written
    with pytest.raises(ValueError, match=r"data resolution 32 .*image_size is 16"):
        pt.pretokenize(wrong, str(ddt_dir), str(tmp_path / "wrong"), progress=False)
    assert not (tmp_path / "wrong").exists()
    # ... and before tokens of another config in the output folder are replaced: they survive the error.
    older = tmp_path / "older"
    older.mkdir()
    (older / pt.MANIFEST).write_text(json.dumps({"key": {"other": True}, "complete": True}))
    with pytest.raises(ValueError, match=r"data resolution 32 .*image_size is 16"):
        pt.pretokenize(wrong, str(ddt_dir), str(older), progress=False)
    assert json.loads((older / pt.MANIFEST).read_text())["key"] == {"other": True}
    with pytest.raises(FileNotFoundError, match="ddt pretokenize"):
        _ = TokenShardsDataModule(str(tmp_path / "none")).manifest
