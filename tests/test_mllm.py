"""DDT-LLaMA (design.md section 2): the vocabulary and its saved form, the four sequence formats and their loss
masks, the task mix, null-prompt dropout, the token order, the LightningModule (build, training, checkpoint, export)
and one `ddt fit` run of configs/mllm/tiny.yaml."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import World
from ddt_lightning.mllm.lm import LMConfig
from ddt_lightning.mllm.sequences import (
    IGNORE_INDEX,
    TASKS,
    SpecialIds,
    TaskMix,
    TokenOrder,
    build_batch,
    class_conditional,
    edit,
    image_to_text,
    null_prompts,
    rewrite,
    text_to_image,
)
from ddt_lightning.mllm.vocab import MultimodalVocab, train_text_tokenizer
from ddt_lightning.modules.mllm import MLLMModule
from ddt_lightning.tokenizer import DDTTokenizer, TokenizerConfig

REPO = Path(__file__).resolve().parents[1]
MICRO_LM = LMConfig.preset("micro")  # hidden 64, 2 layers
IDS = SpecialIds(pad=0, bos=1, eos=2, null=3, boi=4, eoi=5, visual_offset=100, num_codes=50)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    world = World(seed=0, resolution=8, supersample=1)
    return [world.image_and_caption(i)[1] for i in range(200)]


@pytest.fixture(scope="module")
def ddt_dir(tmp_path_factory) -> Path:
    """A tiny random DDT tokenizer export: 16x16 images, T = 8 tokens, K = 64 codes."""
    torch.manual_seed(0)
    config = TokenizerConfig.preset("micro")
    return DDTTokenizer(config).save_pretrained(tmp_path_factory.mktemp("ddt"))


class Captions:
    """The smallest DataModule stand-in the module's setup reads captions from."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def train_texts(self) -> list[str]:
        return self.texts


def world_batch(n: int = 4, edits: bool = True) -> dict:
    world = World(seed=1, resolution=16, supersample=1)
    samples = [world.sample(i) for i in range(n)]

    def images(arrays):
        return torch.stack([uint8_to_tensor(a) for a in arrays])  # (B, 3, 16, 16) in [-1, 1]

    batch = {"image": images([s.image for s in samples]), "caption": [s.caption for s in samples]}
    batch["label"] = torch.full((n,), -1)
    if edits:
        batch["edit_instruction"] = [s.edit_instruction for s in samples]
        batch["edit_target"] = images([s.edited_image for s in samples])
    return batch


def make_module(ddt_dir: Path, captions: list[str], **kwargs) -> MLLMModule:
    args = dict(lm=MICRO_LM, tokenizer_path=str(ddt_dir), text_tokenizer_cache=None, warmup_steps=2) | kwargs
    module = MLLMModule(**args)
    module.vocab = module._make_vocab(Captions(captions))
    module.setup("fit")  # loads the DDT tokenizer (the vocabulary is already there)
    module.configure_model()
    return module


# --------------------------------------------------------------------------------------------------- vocabulary
def test_bpe_is_deterministic_and_the_saved_vocab_reloads_with_auto_tokenizer(captions, tmp_path):
    first, second = train_text_tokenizer(captions, 400), train_text_tokenizer(captions, 400)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) <= 400 and first.decode(first(captions[0])["input_ids"]) == captions[0]

    vocab = MultimodalVocab(first, num_codes=100)
    vocab.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert auto(captions[:20], add_special_tokens=False)["input_ids"] == vocab.encode_text(captions[:20])
    named = {"pad": auto.pad_token_id, "bos": auto.bos_token_id, "eos": auto.eos_token_id}
    named |= {"null": auto.null_token_id, "boi": auto.boi_token_id, "eoi": auto.eoi_token_id}
    assert named == {"pad": 0, "bos": 1, "eos": 2, "null": 3, "boi": 4, "eoi": 5}
    assert auto.convert_tokens_to_ids(["<v0>", "<v99>"]) == [vocab.visual_offset, vocab.visual_offset + 99]
    assert len(auto) == vocab.visual_end
    ids = [vocab.ids.bos, vocab.ids.boi, vocab.visual_offset + 7, vocab.ids.eoi, *vocab.encode_text(["a red"])[0]]
    assert auto.decode(ids) == "<bos><boi><v7><eoi>a red"
    assert auto.decode(ids, skip_special_tokens=True) == "a red"
    reloaded = MultimodalVocab.from_pretrained(tmp_path)
    assert reloaded.fingerprint() == vocab.fingerprint() and reloaded.ids == vocab.ids
    assert MultimodalVocab.from_files(vocab.to_files()).fingerprint() == vocab.fingerprint()


def test_id_layout_visual_ids_above_text_and_padding_never_labelled(captions):
    vocab = MultimodalVocab(train_text_tokenizer(captions, 400), num_codes=100, pad_to_multiple_of=64)
    text_ids = {i for row in vocab.encode_text(captions) for i in row}
    assert max(text_ids) < vocab.visual_offset and vocab.visual_offset == len(train_text_tokenizer(captions, 400))
    assert max(vars(vocab.ids)[k] for k in ("pad", "bos", "eos", "null", "boi", "eoi")) < vocab.visual_offset
    assert vocab.vocab_size % 64 == 0 and vocab.visual_end <= vocab.vocab_size < vocab.visual_end + 64
    codes = torch.randint(0, 100, (3, 8))
    assert torch.equal(vocab.codes(vocab.visual_id(codes)), codes)
    span = vocab.image_span(8)  # what generation.py takes
    assert (span.boi_id, span.eoi_id, span.visual_range) == (4, 5, range(vocab.visual_offset, vocab.visual_end))
    # Every format's labels, with the extreme codes: real ids only, never the padding ids above visual_end.
    images = vocab.visual_id(torch.tensor([[0] * 8, [99] * 8, [50] * 8, [99] * 8, [0] * 8]))
    texts = vocab.encode_text(captions[:5])
    rewrites = [None] * 4 + texts[:1]  # the rewrite row's instruction and target caption
    seq = build_batch(vocab.ids, list(TASKS), images, texts, None, images.flip(0), rewrites, rewrites)
    labelled = seq.labels[seq.labels != IGNORE_INDEX]
    assert labelled.max() < vocab.visual_end and labelled.min() >= 0
    assert seq.input_ids.max() < vocab.visual_end


def test_a_loaded_tokenizer_keeps_its_ids_and_gets_the_missing_tokens_appended(captions, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    from ddt_lightning.mllm.vocab import load_text_tokenizer

    text = load_text_tokenizer(tmp_path)
    vocab = MultimodalVocab(text, num_codes=16)
    size = len(text)
    assert (vocab.ids.bos, vocab.ids.eos) == (0, 1)  # its own
    assert sorted([vocab.ids.pad, vocab.ids.null, vocab.ids.boi, vocab.ids.eoi]) == list(range(size, size + 4))
    assert vocab.visual_offset == size + 4 and vocab.encode_text(captions[:3]) == text(captions[:3])["input_ids"]
    with pytest.raises(ValueError, match="already has visual tokens"):
        MultimodalVocab(vocab.tokenizer, num_codes=16)


# ------------------------------------------------------------------------------------------------------ formats
def test_each_format_has_exactly_its_ids_and_loss_span():
    cap, img, tgt, ins = [10, 11, 12], [100, 101, 102], [140, 141, 142], [20, 21]
    x = IGNORE_INDEX
    ids, labels = text_to_image(IDS, cap, img)
    assert ids == [1, 10, 11, 12, 4, 100, 101, 102, 5] and labels == [x, x, x, x, x, 100, 101, 102, 5]
    ids, labels = text_to_image(IDS, None, img)  # null prompt
    assert ids == [1, 3, 4, 100, 101, 102, 5] and labels == [x, x, x, 100, 101, 102, 5]
    assert class_conditional(IDS, [30], img) == text_to_image(IDS, [30], img)
    ids, labels = image_to_text(IDS, img, cap)
    assert ids == [1, 4, 100, 101, 102, 5, 10, 11, 12, 2] and labels == [x] * 6 + [10, 11, 12, 2]
    ids, labels = edit(IDS, img, ins, tgt)
    assert ids == [1, 4, 100, 101, 102, 5, 20, 21, 4, 140, 141, 142, 5]
    assert labels == [x] * 9 + [140, 141, 142, 5]
    assert edit(IDS, img, None, tgt)[0] == [1, 4, 100, 101, 102, 5, 3, 4, 140, 141, 142, 5]

    # A batch: right padding with <pad>, -100 labels and a zero attention mask; null ignored for i2t.
    images, targets = torch.tensor([img, img]), torch.tensor([tgt, tgt])
    seq = build_batch(IDS, ["i2t", "t2i"], images, [cap, cap], [True, True], targets)
    assert seq.input_ids.tolist() == [[1, 4, 100, 101, 102, 5, 10, 11, 12, 2], [1, 3, 4, 100, 101, 102, 5, 0, 0, 0]]
    assert seq.labels[1].tolist() == [x, x, x, 100, 101, 102, 5, x, x, x]
    assert seq.attention_mask.tolist() == [[1] * 10, [1] * 7 + [0] * 3]
    assert seq.task.tolist() == [TASKS.index("i2t"), TASKS.index("t2i")]
    with pytest.raises(ValueError, match="edit_targets"):
        build_batch(IDS, ["edit"], images[:1], [ins], None, None)


def test_caption_first_edits_state_the_target_then_draw_it():
    img, tgt, ins, cap = [100, 101, 102], [140, 141, 142], [20, 21], [10, 11]
    x = IGNORE_INDEX
    ids, labels = edit(IDS, img, ins, tgt, cap)
    assert ids == [1, 4, 100, 101, 102, 5, 20, 21, 2, 10, 11, 4, 140, 141, 142, 5]  # ... instruction <eos> caption
    assert labels == [x] * 9 + [10, 11, 4, 140, 141, 142, 5]  # the caption, <boi> and the image are predicted
    assert edit(IDS, img, None, tgt, cap) == edit(IDS, img, None, tgt)  # a null instruction drops the caption too
    images, targets = torch.tensor([img, img]), torch.tensor([tgt, tgt])
    seq = build_batch(IDS, ["edit", "edit"], images, [ins, ins], [False, True], targets, edit_captions=[cap, cap])
    assert seq.input_ids[0].tolist() == ids and seq.input_ids[1].tolist()[:12] == edit(IDS, img, None, tgt)[0]
    seq = build_batch(IDS, ["edit", "t2i"], images, [ins, cap], None, targets, edit_captions=[cap, None])
    assert seq.input_ids[0].tolist() == ids and seq.input_ids[1].tolist()[:8] == text_to_image(IDS, cap, img)[0]
    with pytest.raises(ValueError, match="edit captions"):
        build_batch(IDS, ["edit", "edit"], images, [ins, ins], None, targets, edit_captions=[cap])


def test_rewrite_edits_a_caption_in_words_and_scores_only_the_new_caption():
    cap, ins, new, img = [10, 11, 12], [20, 21], [10, 13], [100, 101, 102]
    x = IGNORE_INDEX
    ids, labels = rewrite(IDS, cap, ins, new)
    assert ids == [1, 10, 11, 12, 2, 20, 21, 2, 10, 13, 2]  # <bos> caption <eos> instruction <eos> new <eos>
    assert labels == [x] * 8 + [10, 13, 2]
    images = torch.tensor([img, img])  # rewrite rows carry no image: theirs is never read
    seq = build_batch(IDS, ["rewrite", "i2t"], images, [cap, cap], [True, True], None, [new, None], [ins, None])
    assert seq.input_ids[0].tolist() == ids and seq.labels[0].tolist() == labels  # null dropout: not a rewrite's
    assert seq.input_ids[1].tolist()[:10] == image_to_text(IDS, img, cap)[0]
    with pytest.raises(ValueError, match="instruction and edit caption"):
        build_batch(IDS, ["rewrite"], images[:1], [cap], None, None, [new], None)
    with pytest.raises(ValueError, match="1 instructions"):
        build_batch(IDS, ["rewrite", "t2i"], images, [cap, cap], None, None, [new, None], [ins])


def test_the_chain_module_trains_rewrites_of_the_world_captions(ddt_dir, captions, tmp_path):
    tasks = {"t2i": 1.0, "i2t": 1.0, "rewrite": 1.0}
    module = make_module(ddt_dir, captions, tasks=tasks, edit_format="chain", condition_text_loss=0.5)
    batch = world_batch()
    world = World(seed=1, resolution=16, supersample=1)
    batch["edit_caption"] = [world.sample(i).edited_scene.caption() for i in range(4)]
    seq = module.sequences(batch, ["rewrite", "rewrite", "t2i", "i2t"], [True] * 4, torch.Generator())
    vocab, ids = module.vocab, module.vocab.ids
    for row in range(2):
        tokens = [t for t in seq.input_ids[row].tolist() if t != ids.pad]
        first, second = tokens.index(ids.eos), tokens.index(ids.eos, tokens.index(ids.eos) + 1)
        assert vocab.decode_text([tokens[1:first]])[0] == batch["caption"][row]
        assert vocab.decode_text([tokens[first + 1 : second]])[0] == batch["edit_instruction"][row]
        assert vocab.decode_text([tokens[second + 1 : -1]])[0] == batch["edit_caption"][row]
        labelled = seq.labels[row][seq.labels[row] != IGNORE_INDEX].tolist()
        assert labelled == tokens[second + 1 :]  # only the new caption and its <eos>
        assert not module.condition_images(seq)[row].any()  # no image in a rewrite
        assert module.condition_text(seq)[row].sum() == second - 2  # its caption and instruction, unscored so far
    # The loss span of a rewrite-only batch: the new captions' tokens and their <eos>, nothing else.
    only = module.sequences(batch, ["rewrite"] * 4, None, torch.Generator())
    _, mask = module.token_nll(only)
    cut = module.hparams.max_text_tokens
    assert mask.sum() == sum(len(vocab.encode_text([c], cut)[0]) + 1 for c in batch["edit_caption"])
    with pytest.raises(ValueError, match="rewrite"):
        MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), tasks={"t2i": 1, "i2t": 1}, edit_format="chain")
    del batch["edit_caption"]
    with pytest.raises(ValueError, match="edit_caption"):
        module.sequences(batch, ["rewrite"] * 4, None, torch.Generator())
    module.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "lm" / "ddt_llm.json").read_text())["edit_format"] == "chain"


def test_length_groups_split_by_length_and_keep_every_token():
    img, tgt = [100, 101, 102], [140, 141, 142]
    tasks = ["edit", "t2i", "i2t", "edit", "t2i"]
    texts = [[20, 21], [10], [10, 11, 12, 13], [20], [10, 11]]
    seq = build_batch(IDS, tasks, torch.tensor([img] * 5), texts, None, torch.tensor([tgt] * 5))
    lengths = seq.attention_mask.sum(1).tolist()
    assert lengths == [13, 7, 11, 12, 8]
    assert [len(g) for g in seq.length_groups(1)] == [5]
    groups = seq.length_groups(2)
    # Sorted lengths 7 8 11 12 13: the least padded area is 2 x 8 + 3 x 13 = 55 (one pass: 5 x 13 = 65; the other
    # cuts 59, 59, 61).
    assert [sorted(g.attention_mask.sum(1).tolist()) for g in groups] == [[7, 8], [11, 12, 13]]
    assert [g.input_ids.shape[1] for g in groups] == [8, 13]
    assert sorted(t for g in groups for t in g.task.tolist()) == sorted(seq.task.tolist())
    # Every row keeps its tokens, labels and mask exactly (trimming removes padding only).
    for g in groups:
        for row in range(len(g)):
            match = [r for r in range(5) if torch.equal(seq.input_ids[r, : g.input_ids.shape[1]], g.input_ids[row])]
            assert match and torch.equal(seq.labels[match[0], : g.labels.shape[1]], g.labels[row])
            assert seq.input_ids[match[0], g.input_ids.shape[1] :].eq(IDS.pad).all()
    assert sum(len(g) for g in seq.length_groups(5)) == 5 and len(seq.length_groups(5)) <= 5
    same = build_batch(IDS, ["t2i"] * 3, torch.tensor([img] * 3), [[10]] * 3)
    assert len(same.length_groups(4)) == 1  # no cut saves a padded token
    with pytest.raises(ValueError, match="groups"):
        seq.length_groups(0)


def test_task_mix_honours_ratios_and_names_bad_keys():
    mix = TaskMix({"t2i": 6, "i2t": 3, "edit": 1, "class": 0})
    assert mix.active == ("t2i", "i2t", "edit")
    draws = mix.draw(20_000, torch.Generator().manual_seed(0))
    for task, expected in (("t2i", 0.6), ("i2t", 0.3), ("edit", 0.1), ("class", 0.0)):
        assert abs(draws.count(task) / len(draws) - expected) < 0.015, task
    assert mix.draw(50, torch.Generator().manual_seed(3)) == mix.draw(50, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"tasks\['txt2img'\]: unknown task"):
        TaskMix({"t2i": 1, "txt2img": 1})
    with pytest.raises(ValueError, match=r"tasks\['i2t'\]: the ratio must be a non-negative"):
        TaskMix({"t2i": 1, "i2t": -0.5})
    with pytest.raises(ValueError, match="sum to more than 0"):
        TaskMix({"t2i": 0, "i2t": 0})
    with pytest.raises(ValueError, match=r"tasks\['edit'\]"):
        MLLMModule(num_codes=8, num_tokens=4, tokens="pretokenized", tasks={"t2i": 1, "edit": "x"})


def test_null_prompt_dropout_rate_and_tasks():
    tasks = ["t2i", "i2t", "edit", "class"] * 5_000
    null = null_prompts(tasks, 0.1, torch.Generator().manual_seed(0))
    for task in ("t2i", "edit", "class"):
        rate = sum(n for t, n in zip(tasks, null) if t == task) / 5_000
        assert abs(rate - 0.1) < 0.015, task
    assert not any(n for t, n in zip(tasks, null) if t == "i2t")
    assert not any(null_prompts(tasks, 0.0, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------------------- token order
def test_token_order_modes_and_inverse():
    codes = torch.arange(24).view(3, 8) * 10  # (B, T)
    ordered, perm = TokenOrder("timestep").apply(codes)
    assert torch.equal(ordered, codes)
    ordered, _ = TokenOrder("reversed").apply(codes)
    assert torch.equal(ordered, codes.flip(1))
    fixed = TokenOrder("shuffled", "fixed", seed=5)
    ordered, perm = fixed.apply(codes, torch.Generator().manual_seed(0))
    assert (perm == perm[0]).all() and not torch.equal(perm[0], torch.arange(8))  # one permutation for all
    assert torch.equal(fixed.apply(codes, torch.Generator().manual_seed(9))[0], ordered)  # the seed alone decides
    assert not torch.equal(TokenOrder("shuffled", "fixed", seed=6).fixed_permutation(8), perm[0])
    rand = TokenOrder("shuffled", "random")
    r_ordered, r_perm = rand.apply(codes, torch.Generator().manual_seed(0))
    assert len({tuple(p) for p in r_perm.tolist()}) == 3  # one per sequence
    assert torch.equal(rand.invert(r_ordered, r_perm), codes)
    for order in (TokenOrder("timestep"), TokenOrder("reversed"), fixed):
        assert torch.equal(order.invert(order.apply(codes)[0]), codes)  # generated codes need no permutation
    with pytest.raises(ValueError, match="needs the permutation"):
        rand.invert(r_ordered)
    with pytest.raises(ValueError, match=r"token_order\.mode"):
        TokenOrder("zigzag")


def test_the_module_applies_the_token_order_once(ddt_dir, captions, monkeypatch):
    module = make_module(ddt_dir, captions, tasks={"edit": 1}, token_order=TokenOrder("reversed"))
    batch = world_batch()
    calls = []
    apply = TokenOrder.apply
    monkeypatch.setattr(TokenOrder, "apply", lambda self, *a, **k: calls.append(1) or apply(self, *a, **k))
    seq = module.sequences(batch, ["edit"] * 4, None, torch.Generator())
    assert len(calls) == 1  # source and target images in one call
    codes = module.ddt.encode(batch["image"]).flip(1) + module.vocab.visual_offset  # (B, T) reversed
    assert torch.equal(seq.input_ids[:, 2:10], codes)


# ------------------------------------------------------------------------------------------------------ module
def test_length_groups_give_the_loss_and_gradients_of_one_padded_pass(ddt_dir, captions):
    batch = world_batch(8)
    grads, losses = [], []
    for groups in (1, 2):
        torch.manual_seed(0)
        module = make_module(ddt_dir, captions, tasks={"t2i": 1, "i2t": 1, "edit": 1}, length_groups=groups)
        tasks = ["edit", "t2i", "i2t", "t2i", "edit", "i2t", "t2i", "t2i"]
        seq = module.sequences(batch, tasks, None, torch.Generator())
        assert len(seq.length_groups(groups)) == groups
        module._step_generator = lambda: torch.Generator().manual_seed(0)
        module.mix.draw = lambda n, generator=None, tasks=tasks: tasks  # the mixed-length rows above
        module.log = lambda *a, **k: None
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.lm.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_on_the_fly_tokens_refuse_data_of_another_resolution(ddt_dir):
    # The DDT tokenizer is 16 px: a 32-px DataModule fails at setup, naming both sizes and the folder; with
    # pre-tokenized shards the data's resolution is not the LM's business.
    from types import SimpleNamespace

    module = MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), text_tokenizer_cache=None)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=32))
    with pytest.raises(
        ValueError, match=rf"data resolution 32 does not fit the DDT tokenizer at {ddt_dir}: its image_size is 16"
    ):
        module.setup("fit")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=16))
    with pytest.raises(ValueError, match="no captions"):  # past the resolution check, to the next requirement
        module.setup("fit")


def test_the_caption_first_module_trains_on_the_edited_scenes_caption(ddt_dir, captions, tmp_path):
    module = make_module(ddt_dir, captions, tasks={"edit": 1.0}, edit_format="caption_first")
    batch = world_batch()
    world = World(seed=1, resolution=16, supersample=1)
    batch["edit_caption"] = [world.sample(i).edited_scene.caption() for i in range(4)]
    seq = module.sequences(batch, ["edit"] * 4, [False, False, False, True], torch.Generator())
    vocab, ids = module.vocab, module.vocab.ids
    for row in range(3):
        tokens = seq.input_ids[row].tolist()
        start = tokens.index(ids.eos) + 1  # the caption follows the instruction's <eos> and is labelled
        end = tokens.index(ids.boi, start)
        assert vocab.decode_text([tokens[start:end]])[0] == batch["edit_caption"][row]
        assert seq.labels[row, start:end].tolist() == tokens[start:end]
    assert ids.eos not in seq.input_ids[3].tolist()  # the null row: no caption
    del batch["edit_caption"]
    with pytest.raises(ValueError, match="edit_caption"):
        module.sequences(batch, ["edit"] * 4, None, torch.Generator())
    with pytest.raises(ValueError, match="edit_format"):
        MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), edit_format="caption-first")
    module.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "lm" / "ddt_llm.json").read_text())["edit_format"] == "caption_first"


def test_module_builds_once_trains_checkpoints_and_exports(ddt_dir, captions, tmp_path):
    module = make_module(ddt_dir, captions, tasks={"t2i": 2, "i2t": 1, "edit": 1}, lr=3e-3)
    lm = module.lm
    module.configure_model()
    assert module.lm is lm  # idempotent
    assert not any(k.startswith("ddt") for k in module.state_dict())  # the frozen DDT tokenizer is not state
    assert lm.get_input_embeddings().weight.shape[0] == module.vocab.vocab_size
    with pytest.raises(ValueError, match="exclusive"):
        MLLMModule(lm=MICRO_LM, pretrained="x", tokenizer_path=str(ddt_dir))

    # The module's loss is Hugging Face's (mean over label tokens).
    batch = world_batch()
    seq = module.sequences(batch, ["t2i", "i2t", "edit", "t2i"], [True, False, False, False], torch.Generator())
    nll, mask = module.token_nll(seq)
    hf = lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask, labels=seq.labels).loss
    torch.testing.assert_close(nll.sum() / mask.sum(), hf)

    # Overfit one fixed batch with the real optimizer, schedule and training_step.
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=25,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(module, DataLoader([batch] * 25, batch_size=None))
    assert losses[-1] < 0.6 * losses[0], losses
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.lm.parameters()}

    # A checkpoint carries the vocabulary: load_from_checkpoint rebuilds the same id space and LM.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = MLLMModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.vocab.fingerprint() == module.vocab.fingerprint()
    module.eval()
    with torch.no_grad():
        expected = module.lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits
        torch.testing.assert_close(
            restored.lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits, expected
        )

    # Export: Auto* classes load the folder offline and compute the same logits; pretokenized codes agree.
    folder = module.save_pretrained(tmp_path / "export")
    assert folder == tmp_path / "export" / "lm"
    auto_lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    auto_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(auto_lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits, expected)
    assert auto_tok(batch["caption"], add_special_tokens=False)["input_ids"] == module.vocab.encode_text(
        batch["caption"]
    )
    config = json.loads((folder / "ddt_llm.json").read_text())
    assert config["token_order"] == {"mode": "timestep", "shuffle": "fixed", "seed": 0} and config["num_tokens"] == 8

    pre = MLLMModule(lm=MICRO_LM, tokens="pretokenized", num_codes=64, num_tokens=8, text_tokenizer_cache=None)
    pre.vocab = module.vocab
    codes = module.ddt.encode(batch["image"])
    pre_seq = pre.sequences({"codes": codes, "caption": batch["caption"]}, ["t2i"] * 4, None, torch.Generator())
    assert torch.equal(pre_seq.input_ids, module.sequences(batch, ["t2i"] * 4, None, torch.Generator()).input_ids)
    with pytest.raises(ValueError, match="needs batch fields \\['edit_instruction'\\]"):
        module.sequences({k: v for k, v in batch.items() if k != "edit_instruction"}, ["edit"] * 4, None, None)


def test_ddt_fit_runs_the_tiny_llm_config(ddt_dir, tmp_path, monkeypatch):
    from ddt_lightning.cli import DDTCLI

    monkeypatch.chdir(tmp_path)
    overrides = {
        "--trainer.max_steps": "3",
        "--trainer.val_check_interval": "3",
        "--trainer.log_every_n_steps": "1",
        "--trainer.enable_model_summary": "false",
        "--model.init_args.tokenizer_path": str(ddt_dir),
        "--model.init_args.lm": json.dumps(vars(MICRO_LM)),
        "--model.init_args.text_tokenizer_cache": str(tmp_path / "bpe"),
        "--model.init_args.tasks": json.dumps({"t2i": 1, "i2t": 1, "edit": 1}),
        "--data.init_args.resolution": "16",
        "--data.init_args.train_size": "32",
        "--data.init_args.val_size": "8",
        "--data.init_args.test_size": "8",
        "--data.init_args.batch_size": "8",
        "--data.init_args.cache_dir": "null",
        "--export_dir": "export",
        # The weight EMA from step 1: the LM only exists after the module's setup, later than the callbacks' setup.
        "--trainer.callbacks+": json.dumps(
            {"class_path": "ddt_lightning.callbacks.WeightEMA", "init_args": {"decay": 0.5, "start_step": 1}}
        ),
    }
    args = ["fit", "--config", str(REPO / "configs" / "mllm" / "tiny.yaml")]
    cli = DDTCLI(args=args + [item for pair in overrides.items() for item in pair])
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    expected = {"train/loss", "val/loss", "val/loss_t2i", "val/loss_i2t", "val/loss_edit", "val/loss_image"}
    assert expected | {"val/perplexity_text"} <= set(metrics)
    assert torch.isclose(metrics["val/perplexity_text"], metrics["val/loss_i2t"].exp(), rtol=1e-4)
    assert AutoModelForCausalLM.from_pretrained("export/lm", local_files_only=True).config.vocab_size % 64 == 0
    assert len(list((tmp_path / "bpe").iterdir())) == 1  # the trained BPE was cached
    # The EMA averaged the LM (steps 1 and 2) and the export holds the average.
    ema = next(c for c in cli.trainer.callbacks if type(c).__name__ == "WeightEMA")
    assert int(ema._average_model.n_averaged) == 2
    average = dict(ema._average_model.module.lm.named_parameters())
    exported = AutoModelForCausalLM.from_pretrained("export/lm", local_files_only=True).state_dict()
    assert len(average) == len(list(cli.model.lm.parameters())) > 0
    for name, value in average.items():
        assert torch.equal(exported[name], value), name


def test_a_resumed_run_continues_exactly(ddt_dir, captions, tmp_path):
    batches = [world_batch(4), world_batch(4)]  # an epoch of 2 steps, so the interruption is at an epoch's end
    for batch, seed in zip(batches, (1, 2)):
        batch["image"] = batch["image"].roll(seed, dims=-1)  # different images: different DDT codes per batch

    def fit(steps: int, ckpt_path: Path | None = None) -> tuple[MLLMModule, L.Trainer]:
        torch.manual_seed(0)
        module = make_module(ddt_dir, captions, tasks={"t2i": 1, "i2t": 1, "edit": 1}, lr=3e-3)
        # The checkpoint a real interruption leaves: written by ModelCheckpoint during training, at step 2.
        every_2 = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=steps,
            logger=False,
            callbacks=[every_2] if ckpt_path is None else [],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        return module, trainer

    reference, _ = fit(4)
    step2 = tmp_path / "step=2.ckpt"
    checkpoint = torch.load(step2, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert {"tokenizer.json", "tokenizer_config.json", "ddt_vocab.json"} <= set(checkpoint["mllm_vocab"]["files"])
    resumed, trainer = fit(4, step2)
    assert trainer.global_step == 4
    state, expected = resumed.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


def test_generation_samples_log_reconstructions_over_samples_and_leave_training_alone(ddt_dir, captions, tmp_path):
    from PIL import Image

    from ddt_lightning.callbacks import GenerationSamples
    from ddt_lightning.images import make_grid
    from ddt_lightning.tracking import MLflowLogger

    train, held_out = [world_batch(4), world_batch(4, edits=True)], world_batch(3)
    held_out["caption"] = ["small red circle", "large blue square", "small green triangle"]

    def fit(callbacks: list, logger=False) -> MLLMModule:
        torch.manual_seed(0)
        module = make_module(ddt_dir, captions, tasks={"t2i": 1, "i2t": 1}, lr=3e-3)
        trainer = L.Trainer(
            max_steps=4,
            logger=logger,
            callbacks=callbacks,
            val_check_interval=2,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(train, batch_size=None), DataLoader([held_out], batch_size=None))
        return module

    samples = GenerationSamples(num_samples=2, guidance=2.0, decode_steps=2, seed=5)
    logger = MLflowLogger(experiment_name="samples", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with_samples, without = fit([samples], logger), fit([])
    for key, value in without.lm.state_dict().items():  # sampling left the LM and its training unchanged
        assert torch.equal(with_samples.lm.state_dict()[key], value), key

    # Row 1: the DDT tokenizer's reconstruction of the held-out images, from the callback's seeded generator.
    ddt = with_samples.ddt
    expected = ddt.decode(ddt.encode(held_out["image"][:2]), steps=2, generator=torch.Generator().manual_seed(5))
    grid = samples.last_samples["grid"]
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3)  # 2 rows (reconstruction, sample) x 2 examples of 16 px
    assert (grid[:18] == make_grid(expected, nrow=2)[:18]).all()
    assert samples.last_samples["captions"] == held_out["caption"][:2]
    assert all(isinstance(text, str) for text in samples.last_samples["generated_captions"])

    # Both validations logged the grid and the caption table to the run.
    client = logger.experiment
    root = Path(client.download_artifacts(logger.run_id, "images/val", str(tmp_path / "artifacts")))
    assert sorted(p.name for p in root.iterdir()) == [
        "samples_step0000002.png",
        "samples_step0000002.txt",
        "samples_step0000004.png",
        "samples_step0000004.txt",
    ]
    assert (np.asarray(Image.open(root / "samples_step0000004.png")) == grid).all()
    lines = (root / "samples_step0000004.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == held_out["caption"][:2]

    # Without a DDT tokenizer to decode with, the callback fails at setup, naming the key.
    pretokenized = MLLMModule(lm=MICRO_LM, tokens="pretokenized", num_codes=64, num_tokens=8)
    with pytest.raises(ValueError, match=r"model\.init_args\.tokenizer_path"):
        samples.setup(L.Trainer(logger=False), pretokenized, "fit")


def test_generation_samples_say_when_the_validation_data_has_no_captions():
    from types import SimpleNamespace

    from ddt_lightning.callbacks import GenerationSamples

    samples, trainer = GenerationSamples(), SimpleNamespace(is_global_zero=True, sanity_checking=False)
    batch = {"codes": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"no 'caption' \(it has \['codes'\]\)"):
        samples.on_validation_batch_end(trainer, None, None, batch, 0)
    samples.on_validation_epoch_end(trainer, None)  # nothing held out: nothing sampled, nothing logged
    assert samples.last_samples is None


def test_image_loss_weight_scales_the_visual_labels_of_the_objective(ddt_dir, captions):
    batch = world_batch(6)
    tasks = ["t2i", "i2t", "edit", "i2t", "t2i", "edit"]
    losses = {}
    for weight in (1.0, 0.25):
        torch.manual_seed(0)
        module = make_module(
            ddt_dir, captions, tasks={"t2i": 1, "i2t": 1, "edit": 1}, image_loss_weight=weight, p_null=0.0
        )
        module._step_generator = lambda: torch.Generator().manual_seed(0)
        module.mix.draw = lambda n, generator=None: tasks
        logged = {}
        module.log = lambda key, value, logged=logged, **k: logged.__setitem__(key, value)
        losses[weight] = module.training_step(batch, 0).detach()
        # The same objective computed here from the per-token NLL, with the weights built from the labels alone.
        generator = torch.Generator().manual_seed(0)
        seq = module.sequences(batch, tasks, null_prompts(tasks, 0.0, generator), generator)
        nll, mask = module.token_nll(seq)
        targets = torch.nn.functional.pad(seq.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        visual = (targets >= module.vocab.visual_offset) & (targets < module.vocab.visual_end)
        w = mask.float() * torch.where(visual, weight, 1.0)
        torch.testing.assert_close(losses[weight], (nll * w).sum() / w.sum(), rtol=1e-5, atol=1e-6)
        # The logged per-part NLLs stay unweighted: the image part is the plain mean over visual labels.
        torch.testing.assert_close(logged["train/loss_image"], nll[visual].mean(), rtol=1e-5, atol=1e-6)
        assert 0 < visual.sum() < mask.sum()  # both kinds of labels are in the batch
    # Same weights and data, only the visual labels' weight changed: the objectives differ.
    assert not torch.isclose(losses[1.0], losses[0.25])
    with pytest.raises(ValueError, match="image_loss_weight"):
        MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), image_loss_weight=0.0)


def test_condition_losses_score_the_condition_images_and_texts_and_nothing_else(ddt_dir, captions):
    batch = world_batch(6)
    tasks = ["t2i", "i2t", "edit", "i2t", "t2i", "edit"]
    torch.manual_seed(0)
    module = make_module(
        ddt_dir,
        captions,
        tasks={"t2i": 1, "i2t": 1, "edit": 1},
        condition_image_loss=0.5,
        condition_text_loss=0.25,
        p_null=0.0,
    )
    module._step_generator = lambda: torch.Generator().manual_seed(0)
    module.mix.draw = lambda n, generator=None: tasks
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, value)
    loss = module.training_step(batch, 0).detach()
    generator = torch.Generator().manual_seed(0)
    seq = module.sequences(batch, tasks, null_prompts(tasks, 0.0, generator), generator)
    # The condition images: the i2t image and the edit source, all T of their visual ids, nothing in t2i rows.
    images, texts = module.condition_images(seq), module.condition_text(seq)  # (B, L) each
    t = module.num_tokens
    assert images.sum(1).tolist() == [0, t, t, t, 0, t]
    for row in (1, 2):  # right after <bos> <boi>
        assert images[row, 2 : 2 + t].all()
    # The condition texts: the t2i captions (right after <bos>) and the edit instructions (after the source).
    ids = module.vocab.encode_text([batch["caption"][0], batch["edit_instruction"][2]], module.hparams.max_text_tokens)
    assert texts.sum(1).tolist() == [len(ids[0]), 0, len(ids[1]), 0, texts[4].sum().item(), texts[5].sum().item()]
    assert seq.input_ids[0, texts[0]].tolist() == ids[0] and seq.input_ids[2, texts[2]].tolist() == ids[1]
    assert not (images & texts).any() and (seq.labels[images | texts] == IGNORE_INDEX).all()  # unscored before
    # The objective: the formats' labels weigh 1, the condition images 0.5 and texts 0.25, on the next-token NLL.
    nll, _ = module.token_nll(seq, torch.where(images | texts, seq.input_ids, seq.labels))
    shift = lambda m: torch.nn.functional.pad(m[:, 1:], (0, 1), value=False)  # noqa: E731
    scored, image, text = shift(seq.labels != IGNORE_INDEX), shift(images), shift(texts)
    weight = scored.float() + 0.5 * image.float() + 0.25 * text.float()
    torch.testing.assert_close(loss, (nll * weight).sum() / weight.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["train/loss_condition_image"], nll[image].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["train/loss_condition_text"], nll[text].mean(), rtol=1e-5, atol=1e-6)
    # The per-task NLLs are those of the formats' labels alone (i2t: the captions).
    i2t = scored & (seq.task == 1)[:, None]
    torch.testing.assert_close(logged["train/loss_i2t"], nll[i2t].mean(), rtol=1e-5, atol=1e-6)
    for key in ("condition_image_loss", "condition_text_loss"):
        with pytest.raises(ValueError, match=key):
            MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), **{key: -1.0})


def test_codebook_init_gives_visual_rows_the_codebook_geometry_and_leaves_text_rows(ddt_dir, captions):
    modules = {}
    for init in ("random", "codebook"):
        torch.manual_seed(0)
        modules[init] = make_module(ddt_dir, captions, visual_embedding_init=init)
    codebook = modules["codebook"].frozen_ddt().quantizer.lookup(torch.arange(modules["codebook"].num_codes))
    gram = codebook @ codebook.T  # (K, K)
    visual = slice(modules["codebook"].vocab.visual_offset, modules["codebook"].vocab.visual_end)
    for name in ("get_input_embeddings", "get_output_embeddings"):
        random_w = getattr(modules["random"].lm, name)().weight
        init_w = getattr(modules["codebook"].lm, name)().weight
        rows = init_w[visual]
        scale = rows.norm(dim=1).mean() / codebook.norm(dim=1).mean()
        # Inner products of the codes are kept up to one scale (an isometry times a constant) ...
        torch.testing.assert_close(rows @ rows.T, gram * scale**2, rtol=1e-4, atol=1e-5)
        # ... at the size of the LM's own init, and the text rows are the LM's own init, untouched.
        torch.testing.assert_close(rows.norm(dim=1).mean(), random_w[visual].norm(dim=1).mean())
        assert not torch.allclose(rows, random_w[visual])
        torch.testing.assert_close(init_w[: visual.start], random_w[: visual.start], rtol=0, atol=0)
    with pytest.raises(ValueError, match="tokenizer_path"):
        MLLMModule(lm=MICRO_LM, tokens="pretokenized", num_codes=64, num_tokens=8, visual_embedding_init="codebook")
    with pytest.raises(ValueError, match="visual_embedding_init"):
        MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), visual_embedding_init="kmeans")


def _caption_of_row(module: MLLMModule, seq, row: int) -> str:
    """The text between <bos> and <boi> (t2i) of one row."""
    tokens = seq.input_ids[row].tolist()
    ids = module.vocab.ids
    return module.vocab.decode_text([tokens[tokens.index(ids.bos) + 1 : tokens.index(ids.boi)]])[0]


def test_shuffle_phrases_reorders_the_objects_of_training_t2i_captions_only(ddt_dir, captions):
    from ddt_lightning.data.world import split_caption

    module = make_module(ddt_dir, captions, tasks={"t2i": 1.0, "i2t": 1.0}, shuffle_phrases=1.0)
    batch = world_batch(8, edits=False)
    tasks = ["t2i"] * 6 + ["i2t"] * 2
    module.train()
    seen_new_order = False
    for seed in range(4):
        seq = module.sequences(batch, tasks, None, torch.Generator().manual_seed(seed))
        again = module.sequences(batch, tasks, None, torch.Generator().manual_seed(seed))
        assert torch.equal(seq.input_ids, again.input_ids)  # a function of the step's generator
        for row in range(6):
            drawn, given = split_caption(_caption_of_row(module, seq, row)), split_caption(batch["caption"][row])
            assert (drawn.prefix, sorted(drawn.phrases)) == (given.prefix, sorted(given.phrases))  # same objects
            seen_new_order |= drawn.phrases != given.phrases
    assert seen_new_order
    # Captioning targets and evaluation keep the data's order.
    plain = module.sequences(batch, ["i2t"] * 8, None, torch.Generator().manual_seed(0))
    assert torch.equal(seq.input_ids[6:], plain.input_ids[6:])
    module.eval()
    kept = module.sequences(batch, tasks, None, torch.Generator().manual_seed(0))
    assert [_caption_of_row(module, kept, r) for r in range(6)] == batch["caption"][:6]
    module.train()
    batch["caption"][0] = "a dog on a sofa"
    with pytest.raises(ValueError, match=r"shuffle_phrases.*'a dog on a sofa'"):
        module.sequences(batch, tasks, None, torch.Generator())
    with pytest.raises(ValueError, match="shuffle_phrases must be in"):
        MLLMModule(lm=MICRO_LM, tokenizer_path=str(ddt_dir), shuffle_phrases=1.5)


def test_rewrite_in_place_keeps_the_source_order_with_one_phrase_replaced(ddt_dir, captions):
    from ddt_lightning.modules.mllm import in_place_target

    red, blue = "a large red circle in the top left", "a small blue square in the bottom left"
    green = "a small green triangle in the bottom right"
    source = f"{red}, {blue} and {green}"
    moved = "a large red circle in the bottom right"  # reading order puts it last
    assert in_place_target(source, f"{blue}, {green} and {moved}") == f"{moved}, {blue} and {green}"
    recoloured = "a large cyan circle in the top left"
    target = f"an image of {recoloured}, {blue} and {green}"
    assert in_place_target(source, target) == target  # the target's template, the same order here
    assert in_place_target(source, f"{red} and {green}") == f"{red} and {green}"  # a removal as it is
    added = f"{red}, {blue}, {green} and a small red square in the top right"
    assert in_place_target(source, added) == added  # an addition too
    # In the module: the rewrite rows' targets, the in-place form of the world's edited captions.
    module = make_module(
        ddt_dir, captions, tasks={"t2i": 1, "i2t": 1, "rewrite": 1}, edit_format="chain", rewrite_in_place=True
    )
    batch = world_batch(8)
    world = World(seed=1, resolution=16, supersample=1)
    batch["edit_caption"] = [world.sample(i).edited_scene.caption() for i in range(8)]
    module.train()
    seq = module.sequences(batch, ["rewrite"] * 8, None, torch.Generator())
    vocab, eos = module.vocab, module.vocab.ids.eos
    changed = 0
    for row in range(8):
        tokens = seq.input_ids[row].tolist()
        second = tokens.index(eos, tokens.index(eos) + 1)
        written = vocab.decode_text([tokens[second + 1 : tokens.index(eos, second + 1)]])[0]
        assert written == in_place_target(batch["caption"][row], batch["edit_caption"][row])
        changed += written != batch["edit_caption"][row]
    assert changed > 0  # some of the eight edits moved an object past another
