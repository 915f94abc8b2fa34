"""DDT-LLaMA for users (design.md sections 2 and 4): `DDTLlama` loaded from an export folder (text-to-image,
captioning, editing), the held-out world evaluation (proven with an oracle model) and the `ddt generate | caption |
edit | evaluate` entry points, on a tiny random DDT tokenizer and a micro Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddt_lightning.mllm.model as model_module
from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import World
from ddt_lightning.geneval import CATEGORIES, geneval_scores, geneval_suite, held_out_world
from ddt_lightning.images import save_png, to_uint8
from ddt_lightning.mllm.commands import main_caption, main_edit, main_evaluate, main_generate
from ddt_lightning.mllm.evaluate import evaluate_world
from ddt_lightning.mllm.generation import generate_image_tokens, sequence_log_likelihood
from ddt_lightning.mllm.lm import LMConfig
from ddt_lightning.mllm.model import DDTLlama
from ddt_lightning.mllm.sequences import TokenOrder, image_to_text, rewrite, text_to_image
from ddt_lightning.tokenizer import DDTTokenizer, TokenizerConfig

T, K, RES = 8, 64, 16


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An export folder in the exact layout: MLLMModule.save_pretrained (lm/) + the DDT tokenizer (ddt_tokenizer/).
    Returns it with the in-memory LM it was written from."""
    from ddt_lightning.modules.mllm import MLLMModule

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = TokenizerConfig.preset("micro", image_size=RES, num_tokens=T, codebook_size=K)
    ddt = DDTTokenizer(config)
    ddt.save_pretrained(root / "ddt_tokenizer")

    class Captions:  # the DataModule stand-in the module trains its BPE on
        def train_texts(self) -> list[str]:
            world = World(seed=0, resolution=8, supersample=1)
            return [world.sample(i).caption for i in range(100)] + [world.sample(i).edit_instruction for i in range(50)]

    module = MLLMModule(
        lm=LMConfig.preset("micro"), tokenizer_path=str(root / "ddt_tokenizer"), text_tokenizer_cache=None
    )
    module.vocab = module._make_vocab(Captions())
    module.setup("fit")
    module.configure_model()
    module.save_pretrained(root)
    return root, module.lm.eval()


@pytest.fixture(scope="module")
def model(export) -> DDTLlama:
    return DDTLlama.from_pretrained(export[0])


def world_images(n: int, resolution: int = RES, seed: int = 5) -> tuple[torch.Tensor, list]:
    samples = [World(seed=seed, resolution=resolution).sample(i) for i in range(n)]
    return torch.stack([uint8_to_tensor(s.image) for s in samples]), samples


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- the model
def test_from_pretrained_round_trip_and_clear_errors(export, model, tmp_path):
    from ddt_lightning.modules import mllm as module_file

    root, lm = export
    assert (model_module.LM_FOLDER, model_module.DDT_TOKENIZER_FOLDER, model_module.EXPORT_CONFIG) == (
        module_file.LM_FOLDER,
        module_file.DDT_TOKENIZER_FOLDER,
        module_file.EXPORT_CONFIG,
    )
    ids = torch.tensor([model.text_to_image_prompts(["a small red circle in the top left"])[0] + [70, 71, 72]])
    with torch.no_grad():
        torch.testing.assert_close(model.lm(input_ids=ids).logits, lm(input_ids=ids).logits)
    assert model.resolution == RES and model.num_tokens == T and model.order == TokenOrder()
    assert DDTLlama.from_pretrained(root / "lm").vocab.fingerprint() == model.vocab.fingerprint()  # lm/ itself

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        DDTLlama.from_pretrained(tmp_path / "nowhere")
    shutil.copytree(root / "lm", tmp_path / "lm")  # an export without its DDT tokenizer
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        DDTLlama.from_pretrained(tmp_path)
    assert DDTLlama.from_pretrained(tmp_path, tokenizer_path=root / "ddt_tokenizer").num_tokens == T


def test_prompts_are_the_training_formats_cut_before_their_loss_span(model):
    ids, vocab = model.vocab.ids, model.vocab
    text = vocab.encode_text(["a large blue square in the top right"])[0]
    assert model.text_to_image_prompts(["a large blue square in the top right"]) == [[ids.bos, *text, ids.boi]]
    assert model.text_to_image_prompts(None) == [[ids.bos, ids.null, ids.boi]]
    codes = torch.arange(T).unsqueeze(0)  # (1, T)
    visual = (codes[0] + vocab.visual_offset).tolist()
    assert model.caption_prompts(codes) == [[ids.bos, ids.boi, *visual, ids.eoi]]
    assert model.edit_prompts(codes, ["x"]) == [
        [ids.bos, ids.boi, *visual, ids.eoi, *vocab.encode_text(["x"])[0], ids.boi]
    ]
    assert model.edit_prompts(codes, None) == [[ids.bos, ids.boi, *visual, ids.eoi, ids.null, ids.boi]]


def test_text_to_image_size_range_seed_and_guidance(model):
    prompts = ["a large red circle in the top left", "a small green square in the bottom right"]
    options = dict(decode_steps=2, batch_size=1)
    first = model.text_to_image(prompts, generator=gen(1), **options)
    assert first.shape == (2, 3, RES, RES) and first.min() >= -1 and first.max() <= 1
    torch.testing.assert_close(model.text_to_image(prompts, generator=gen(1), **options), first, rtol=0, atol=0)
    assert not torch.equal(model.text_to_image(prompts, generator=gen(2), **options), first)

    rows = []
    handle = model.lm.register_forward_hook(lambda m, a, k, out: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        guided = model.generate_codes(model.text_to_image_prompts(prompts), model.text_to_image_prompts(None), 3.0)
        assert set(rows) == {4} and guided.shape == (2, T)  # conditional and null rows in one forward
        rows.clear()
        codes = model.generate_codes(model.text_to_image_prompts(prompts), None, 1.0, generator=gen(3))
        assert set(rows) == {2}  # guidance 1: the conditional rows alone
    finally:
        handle.remove()
    cond, temperature = model.text_to_image_prompts(prompts), model_module.DEFAULT_IMAGE_TEMPERATURE
    alone = generate_image_tokens(model.lm, cond, None, model.span, temperature=temperature, generator=gen(3))
    assert torch.equal(codes, alone)  # timestep order: no permutation


def test_text_to_image_keeps_the_drawing_read_back_best(model, monkeypatch):
    # Each prompt is drawn N times; the image kept maximises log p(prompt <eos> | DDT codes of the drawing) +
    # log p(the drawn codes | prompt), recomputed here one unpadded sequence at a time with the LM's own loss.
    prompts = ["a large red circle in the top left", "a small green square in the bottom right", "a blue diamond"]
    drawings, asked = [], []
    scenes, _ = world_images(8, seed=6)  # the tiny test decoder draws about the same image from any codes: a

    def draw(codes, *args, **kwargs):  # stand-in draws one of 8 world scenes per codes, so the drawings differ
        asked.append(codes)
        drawings.append(scenes[codes.sum(1) % 8])
        return drawings[-1]

    monkeypatch.setattr(model, "decode", draw)
    kept = model.text_to_image(prompts, temperature=1.0, decode_steps=1, generator=gen(4), candidates=3, batch_size=2)
    drawn, codes = torch.cat(drawings), torch.cat(asked)  # (3 * 3, ...): prompt after prompt, 3 drawings each
    assert drawn.shape[0] == 9 and kept.shape == (3, 3, RES, RES)
    ids = model.vocab.ids

    def log_p(input_ids: list[int], labels: list[int]) -> float:
        with torch.inference_mode():
            loss = model.lm(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        return -loss.item() * sum(label != -100 for label in labels)

    reread, rows = model._visual_rows(model.encode(drawn), None), model._visual_rows(codes, None)
    picks = []
    for i, text in enumerate(model._text(prompts)):
        score = [
            log_p(*image_to_text(ids, reread[3 * i + j], text)) + log_p(*text_to_image(ids, text, rows[3 * i + j]))
            for j in range(3)
        ]
        picks.append(int(np.argmax(score)))
        assert torch.equal(kept[i], drawn[3 * i + picks[-1]])
    assert any(not torch.equal(drawn[3 * i], drawn[3 * i + 1]) for i in range(3))  # the drawings differ
    assert picks != [0, 0, 0]  # the check chose: not always the first drawing
    once = model.text_to_image(prompts, decode_steps=1, generator=gen(4), candidates=1)  # the plain drawing
    cond, null = model.text_to_image_prompts(prompts), model.text_to_image_prompts(None)
    codes = model.generate_codes(cond, null, generator=gen(4))
    assert torch.equal(once, scenes[codes.sum(1) % 8])
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="candidates"):
            model.text_to_image(prompts, candidates=bad)


@pytest.mark.parametrize("order", [TokenOrder("reversed"), TokenOrder("shuffled", seed=4)])
def test_generated_codes_are_put_back_into_ddt_order_before_decoding(model, monkeypatch, order):
    ordered = model.__class__(model.lm, model.vocab, model.ddt, order)
    known = torch.arange(2 * T).view(2, T) % K  # what the LM "generates", in its own order
    monkeypatch.setattr(model_module, "generate_image_tokens", lambda *a, **k: known.clone())
    received = []
    decode = model.ddt.decode
    monkeypatch.setattr(model.ddt, "decode", lambda codes, **k: received.append(codes.clone()) or decode(codes, **k))
    ordered.text_to_image(["a", "b"], decode_steps=1, candidates=1)
    expected = known.flip(1) if order.mode == "reversed" else order.invert(known)
    assert torch.equal(received[0], expected) and not torch.equal(expected, known)
    # and the sources of edits / captions enter prompts in the trained order
    codes = torch.arange(T).unsqueeze(0)
    prompt = ordered.caption_prompts(codes)[0]
    assert prompt[2 : 2 + T] == (order.apply(codes)[0][0] + model.vocab.visual_offset).tolist()

    random = model.__class__(model.lm, model.vocab, model.ddt, TokenOrder("shuffled", shuffle="random"))
    with pytest.raises(ValueError, match="random"):
        random.text_to_image(["a"])
    with pytest.raises(ValueError, match="random"):
        random.edit(torch.zeros(1, 3, RES, RES), "x")


def test_caption_is_text_only_even_when_non_text_ids_dominate(model, monkeypatch):
    vocab, ids = model.vocab, model.vocab.ids
    specials = [ids.boi, ids.eoi, ids.null, ids.pad, ids.bos]

    def tempt(module, args, kwargs, out):  # every non-text id would win, and <eos> only from the 5th token on
        out.logits[..., vocab.visual_offset :] += 100.0
        out.logits[..., specials] += 100.0
        out.logits[..., ids.eos] += 200.0 if len(rows_seen) >= 4 else -100.0  # forward 5 emits the 5th token
        rows_seen.append(1)
        return out

    rows_seen: list[int] = []
    decoded = []
    decode_text = vocab.decode_text
    monkeypatch.setattr(vocab, "decode_text", lambda rows: decoded.append(rows) or decode_text(rows))
    images, _ = world_images(2)
    handle = model.lm.register_forward_hook(tempt, with_kwargs=True)
    try:
        captions = model.caption(images, max_new_tokens=12)
    finally:
        handle.remove()
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    new_ids = [i for row in decoded[0] for i in row]
    assert new_ids and all(i < vocab.visual_offset and i not in specials for i in new_ids)
    assert all(len(row) == 4 for row in decoded[0])  # cut at <eos>
    assert not any("<v" in c or "<boi>" in c for c in captions)


def test_reranked_captions_maximise_both_directions_of_the_lm(model, monkeypatch):
    # The chosen caption of each image is the hypothesis c maximising log p(c <eos> | image) + w log p(image | c),
    # recomputed here one unpadded sequence at a time with the LM's own loss; w = 0 keeps beam search's top beam.
    vocab, ids, lm = model.vocab, model.vocab.ids, model.lm
    images, _ = world_images(6)
    codes = model.ddt.encode(images)
    seen = []
    generate = model_module.generate_text
    monkeypatch.setattr(model_module, "generate_text", lambda *a, **k: seen.append(generate(*a, **k)) or seen[-1])

    def log_p(input_ids: list[int], labels: list[int]) -> float:
        with torch.inference_mode():
            loss = lm(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        return -loss.item() * (sum(label != -100 for label in labels) - (labels[0] != -100))

    chosen = {w: model.caption_codes(codes, num_beams=4, rerank=w) for w in (0.0, 1.0, 100.0)}
    hypotheses = seen[1]  # the same beams for every weight > 0 (beam search is deterministic)
    assert len(seen[0]) == 6 and len(hypotheses) == 24 and seen[2] == hypotheses
    assert chosen[0.0] == vocab.decode_text(seen[0]) == vocab.decode_text(hypotheses[::4])  # the top beams
    rows = model._visual_rows(codes, None)
    for w in (1.0, 100.0):
        expected = []
        for i, row in enumerate(rows):
            beams = hypotheses[4 * i : 4 * i + 4]
            score = [log_p(*image_to_text(ids, row, c)) + w * log_p(*text_to_image(ids, c, row)) for c in beams]
            expected.append(beams[int(np.argmax(score))])
        assert chosen[w] == vocab.decode_text(expected)
    assert chosen[100.0] != chosen[0.0]  # the check can tell: reranking changed some caption
    with pytest.raises(ValueError, match="rerank"):
        model.caption_codes(codes, rerank=-1.0)


def test_edit_uses_the_instruction_and_the_null_instruction(model, monkeypatch):
    images, samples = world_images(3)
    calls = []
    monkeypatch.setattr(
        model_module,
        "generate_image_tokens",
        lambda lm, cond, uncond, span, **k: (
            calls.append((cond, uncond)) or generate_image_tokens(lm, cond, uncond, span, **k)
        ),
    )
    edited = model.edit(images, [s.edit_instruction for s in samples], guidance=2.0, decode_steps=2, generator=gen(0))
    assert edited.shape == (3, 3, RES, RES) and edited.min() >= -1 and edited.max() <= 1
    cond, uncond = calls[0]
    sources = model.ddt.encode(images)
    assert cond == model.edit_prompts(sources, [s.edit_instruction for s in samples])
    assert uncond == model.edit_prompts(sources, None) and all(row[-2] == model.vocab.ids.null for row in uncond)
    assert model.edit(images[:1], "make it blue", decode_steps=1).shape == (1, 3, RES, RES)
    with pytest.raises(ValueError, match="2 instructions for 3 images"):
        model.edit(images, ["a", "b"])
    with pytest.raises(ValueError, match=f"\\(B, 3, {RES}, {RES}\\)"):
        model.caption(torch.zeros(1, 3, 8, 8))


def test_a_caption_first_model_writes_the_target_caption_then_draws_it(export, model, tmp_path, monkeypatch):
    root = tmp_path / "caption_first"
    shutil.copytree(export[0], root)
    config_file = root / "lm" / "ddt_llm.json"
    config = json.loads(config_file.read_text())
    assert "edit_format" in config and model.edit_format == "direct"
    del config["edit_format"]  # an export from before the option loads as direct
    config_file.write_text(json.dumps(config))
    assert DDTLlama.from_pretrained(root).edit_format == "direct"
    config_file.write_text(json.dumps(config | {"edit_format": "caption_first"}))
    first = DDTLlama.from_pretrained(root)
    ids, vocab = first.vocab.ids, first.vocab

    images, samples = world_images(3)
    instructions = [s.edit_instruction for s in samples]
    sources = first.ddt.encode(images)
    prompts = first.edit_prompts(sources, instructions)
    assert [p[:-1] for p in prompts] == [p[:-1] for p in model.edit_prompts(sources, instructions)]
    assert all(row[-1] == ids.eos for row in prompts)  # ... instruction <eos>: the caption comes next
    calls = []
    monkeypatch.setattr(
        model_module,
        "generate_image_tokens",
        lambda lm, cond, uncond, span, **k: (
            calls.append((cond, uncond)) or generate_image_tokens(lm, cond, uncond, span, **k)
        ),
    )
    edited = first.edit(images, instructions, guidance=2.0, decode_steps=1, generator=gen(0))
    assert edited.shape == (3, 3, RES, RES)
    cond, uncond = calls[0]
    captions = first.edit_captions(images, instructions)
    for row, prompt in enumerate(prompts):
        written = cond[row][len(prompt) : -1]
        assert cond[row][: len(prompt)] == prompt and cond[row][-1] == ids.boi
        assert all(i < vocab.visual_offset and i not in (ids.boi, ids.eoi, ids.null, ids.pad, ids.eos) for i in written)
        assert vocab.decode_text([written])[0] == captions[row]
    assert any(len(row) > len(p) + 1 for row, p in zip(cond, prompts))  # the random LM did write something
    assert uncond == model.edit_prompts(sources, None)  # the null prompt of both formats
    with pytest.raises(ValueError, match="caption_first"):
        model.edit_captions(images, instructions)
    with pytest.raises(ValueError, match="edit_format"):
        DDTLlama(first.lm, vocab, first.ddt, edit_format="captions")


def chain_model(export, root: Path) -> DDTLlama:
    """The tiny export, loaded as a chain model (it edits by captioning, rewriting and drawing)."""
    shutil.copytree(export[0], root)
    config_file = root / "lm" / "ddt_llm.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"edit_format": "chain"}))
    return DDTLlama.from_pretrained(root)


def test_a_chain_model_captions_rewrites_and_draws(export, model, tmp_path, monkeypatch):
    chain = chain_model(export, tmp_path / "chain")
    ids, vocab = chain.vocab.ids, chain.vocab
    images, samples = world_images(3)
    instructions = [s.edit_instruction for s in samples]
    captions = chain.caption(images)
    prompts = chain.rewrite_prompts(captions, instructions)
    for prompt, caption, instruction in zip(prompts, captions, instructions):  # <bos> caption <eos> instruction <eos>
        text = chain._text([caption])[0] + [ids.eos] + chain._text([instruction])[0]
        assert prompt == [ids.bos, *text, ids.eos]
    rewrites = chain.rewrite(captions, instructions, sources=chain.ddt.encode(images))  # checked against the source
    assert chain.edit_captions(images, instructions) == rewrites
    calls = []

    def spy(lm, cond, uncond, span, **k):
        codes = generate_image_tokens(lm, cond, uncond, span, **k)
        calls.append((cond, uncond, codes))
        return codes

    monkeypatch.setattr(model_module, "generate_image_tokens", spy)
    options = dict(guidance=2.0, decode_steps=1, candidates=1)
    edited = chain.edit(images, instructions, generator=gen(0), **options)
    cond, uncond, codes = calls[0]
    assert cond == chain.text_to_image_prompts(rewrites) and uncond == chain.text_to_image_prompts(None)
    drawn = chain.text_to_image(rewrites, generator=gen(0), **options)
    assert torch.equal(calls[1][2], codes) and torch.equal(edited, drawn)  # the drawing of the rewrite, draw for draw
    model.edit(images, instructions, generator=gen(0), **options)
    assert calls[2][0] == model.edit_prompts(chain.ddt.encode(images), instructions)  # the direct format differs
    assert not torch.equal(calls[2][2], codes)
    # By default the chain draws each rewrite DEFAULT_DRAW_CANDIDATES times and keeps the one read back best.
    n = model_module.DEFAULT_DRAW_CANDIDATES
    edited = chain.edit(images, instructions, guidance=2.0, decode_steps=1, generator=gen(0))
    assert calls[3][0] == [row for row in chain.text_to_image_prompts(rewrites) for _ in range(n)]
    drawn = chain.text_to_image(rewrites, guidance=2.0, decode_steps=1, generator=gen(0))
    assert torch.equal(edited, drawn)
    with pytest.raises(ValueError, match="candidates"):
        model.edit(images, instructions, candidates=2)  # a direct edit has no caption to read back
    with pytest.raises(ValueError, match="2 instructions"):
        chain.rewrite(captions, instructions[:2])
    assert all(i < vocab.visual_offset for row in chain._text(rewrites) for i in row)


def test_a_rewrite_is_the_best_beam_that_changes_the_caption(export, tmp_path, monkeypatch):
    chain = chain_model(export, tmp_path / "chain")
    samples = world_images(3)[1]
    captions, instructions = [s.caption for s in samples], [s.edit_instruction for s in samples]
    beams, generate_text = [], model_module.generate_text

    def spy(*args, **kwargs):
        beams.append((kwargs["num_return_sequences"], generate_text(*args, **kwargs)))
        return beams[-1][1]

    monkeypatch.setattr(model_module, "generate_text", spy)
    rewrites = chain.rewrite(captions, instructions)
    [(count, out)] = beams  # one beam search for the three
    assert count == 2 and len(out) == 6 and all(out[2 * i] != out[2 * i + 1] for i in range(3))
    assert rewrites == chain.vocab.decode_text(out[0::2])  # the random LM never copies: its best beams
    # Where the best beam is the unchanged caption, the next one is the rewrite; the copy is never returned.
    sources = chain._text(captions)
    forced = [sources[0], [7, 8], [9], sources[1], sources[2], sources[0]]
    monkeypatch.setattr(model_module, "generate_text", lambda *a, **k: forced)
    assert chain.rewrite(captions, instructions) == chain.vocab.decode_text([[7, 8], [9], sources[0]])


# ------------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_world_on_the_tiny_model(model):
    scores = evaluate_world(
        model, num_prompts=6, num_captions=3, num_edits=3, decode_steps=2, max_new_tokens=8, progress=False
    )
    categories = {c for p in geneval_suite(0, 6, RES) for c in p.categories}
    expected = {"geneval_overall", "caption_accuracy", "edit_success", "edit_l1"}
    expected |= {f"geneval/{c}" for c in categories} | {f"ceiling/geneval/{c}" for c in categories}
    expected |= {"ceiling/geneval_overall", "ceiling/edit_success", "ceiling/edit_l1"}
    expected |= {f"caption/{a}" for a in ("parsed", "count", "shape", "colour", "size", "quadrant")}
    expected |= {f"{p}read/{a}" for p in ("", "ceiling/") for a in ("shape", "colour", "size", "quadrant")}
    assert set(scores) == expected
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    assert json.loads(json.dumps(scores)) == dict(scores)
    grids = scores.grids()
    assert set(grids) == {"t2i", "edit", "caption"} and grids["t2i"].shape[0] == 3 * (RES + 1) + 1
    assert len(scores.captions) == 3 and len(scores.instructions) == 3


class Oracle:
    """A stand-in DDTLlama that draws the held-out ground truth: the wiring of the evaluation is what is tested."""

    resolution = 32
    reads_back_edits = False  # a direct model: its edits are drawn once

    def __init__(self, seed: int, shift: int = 0) -> None:
        world = held_out_world(seed, self.resolution)
        self.samples = [world.sample(i) for i in range(40)]
        self.shift = shift  # > 0: answer with another sample's ground truth (a wrong model)

    def _find(self, image: torch.Tensor):
        array = to_uint8(image).permute(1, 2, 0).numpy()
        index = next(i for i, s in enumerate(self.samples) if np.array_equal(s.image, array))
        return self.samples[index + self.shift]

    def text_to_image(self, prompts, **options) -> torch.Tensor:
        index = {s.caption: i for i, s in reversed(list(enumerate(self.samples)))}
        return torch.stack([uint8_to_tensor(self.samples[index[p] + self.shift].image) for p in prompts])

    def caption(self, images, **options) -> list[str]:
        return [self._find(image).caption for image in images]

    def edit(self, images, instructions, **options) -> torch.Tensor:
        return torch.stack([uint8_to_tensor(self._find(image).edited_image) for image in images])

    def reconstruct(self, images, **options) -> torch.Tensor:
        return images


def test_an_oracle_scores_one_and_a_wrong_model_does_not():
    options = dict(num_prompts=24, num_captions=12, num_edits=12, progress=False)
    scores = evaluate_world(Oracle(seed=1), seed=1, **options)
    assert {f"geneval/{c}" for c in CATEGORIES} <= set(scores)  # 24 prompts test every category
    for key, value in scores.items():
        assert value == (0.0 if key.endswith("edit_l1") else 1.0), (key, value)
    wrong = evaluate_world(Oracle(seed=1, shift=1), seed=1, **options)
    prompts = geneval_suite(1, 24, Oracle.resolution)
    shifted = [Oracle(seed=1).samples[i + 1].image for i in range(24)]
    assert wrong["geneval_overall"] == geneval_scores(shifted, prompts)["overall"]  # the checker's own aggregate
    assert wrong["geneval_overall"] < 0.9 and wrong["caption_accuracy"] < 0.5 and wrong["edit_success"] < 0.5
    assert wrong["edit_l1"] > 0.01 and wrong["ceiling/edit_success"] == 1.0
    # Another scene's objects: each attribute agrees only by chance (4 shapes, 6 colours, 2 sizes, 4 quadrants).
    assert wrong["read/shape"] < 0.6 and wrong["read/colour"] < 0.5 and wrong["read/quadrant"] < 0.6
    assert wrong["ceiling/read/shape"] == 1.0


# -------------------------------------------------------------------------------------------------------- commands
def test_ddt_generate_caption_edit_evaluate(export, tmp_path, capsys):
    root = str(export[0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle in the top left\n\na small blue square in the bottom right\n")
    out = tmp_path / "generated"
    argv = ["--model", root, "--prompts", str(prompts), "--prompt", "a small cyan diamond in the top right"]
    assert main_generate([*argv, "--output", str(out), "--decode_steps", "2", "--seed", "3"]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["0000.png", "0001.png", "0002.png"]
    index = json.loads((out / "prompts.json").read_text())
    assert [row["prompt"] for row in index["items"]] == [
        "a small cyan diamond in the top right",  # --prompt first, then the file's non-empty lines
        "a large red circle in the top left",
        "a small blue square in the bottom right",
    ]
    assert index["seed"] == 3 and (out / "prompts.txt").read_text().count("\n") == 3 and (out / "grid.png").is_file()

    folder = tmp_path / "sources"
    for i, image in enumerate(world_images(2)[1]):
        save_png(image.image, folder / f"{i}.png")
    capsys.readouterr()
    assert main_caption(["--model", root, "--images", str(folder), "--max_new_tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(folder / "0.png") + "\t")

    edited = tmp_path / "edited"
    argv = ["--model", root, "--images", str(folder / "0.png"), str(folder / "1.png"), "--instruction", "remove it"]
    assert main_edit([*argv, "--output", str(edited), "--decode_steps", "1"]) == 0
    assert len(list(edited.glob("0*.png"))) == 2 and len(json.loads((edited / "edits.json").read_text())["items"]) == 2

    argv = ["--model", root, "--num_prompts", "2", "--num_captions", "1", "--num_edits", "1", "--decode_steps", "1"]
    assert main_evaluate([*argv, "--ceilings", "false", "--output", str(tmp_path / "eval")]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"geneval_overall", "caption_accuracy", "edit_success", "edit_l1"} <= set(scores)
    assert json.loads((tmp_path / "eval" / "scores.json").read_text()) == scores


def test_commands_fail_with_clear_errors(export, tmp_path, capsys):
    root = str(export[0])

    def error(main, argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert str(tmp_path / "missing") in error(main_generate, ["--model", str(tmp_path / "missing"), "--prompt", "a"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "empty" in error(main_generate, ["--model", root, "--prompts", str(empty)])
    assert "no prompts" in error(main_generate, ["--model", root])
    assert f"{tmp_path / 'nope.png'} not found" in error(
        main_caption, ["--model", root, "--images", str(tmp_path / "nope.png")]
    )
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert "bad.png" in error(main_edit, ["--model", root, "--images", str(bad), "--instruction", "x"])
    two = [
        "--model",
        root,
        "--images",
        str(bad),
        str(bad),
        "--instruction",
        "x",
        "--instruction",
        "y",
        "--instruction",
        "z",
    ]
    assert "3 instructions for 2 images" in error(main_edit, two)


def test_mlflow_logging(export, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--model", str(export[0]), "--prompt", "a large red circle in the top left", "--decode_steps", "1"]
    assert main_generate([*argv, "--output", str(tmp_path / "out"), "--tracking_uri", uri]) == 0
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddt-llm").experiment_id])
    assert run.data.params["command"] == "generate"
    assert "prompts.json" in {f.path for f in client.list_artifacts(run.info.run_id)}
    assert [f.path for f in client.list_artifacts(run.info.run_id, "images/generate")] == [
        "images/generate/grid_step0000000.png"
    ]


def test_the_model_and_the_evaluation_do_not_import_lightning():
    code = "import sys, ddt_lightning.mllm.model, ddt_lightning.mllm.evaluate; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_entry_point_decodes_with_the_main_jobs_decoder_guidance(monkeypatch):
    # `ddt evaluate` once defaulted to guidance 1 while the pipeline decoded at 2: the same export scored 0.497 vs
    # 0.566 GenEval-style. The default of every path must be the main job's (configs/pipeline.yaml).
    import inspect

    import yaml

    from ddt_lightning.callbacks import GenerationSamples
    from ddt_lightning.pipeline import run_pipeline

    job = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "pipeline.yaml").read_text())
    expected = job["decode_guidance"]
    assert model_module.DEFAULT_DECODE_GUIDANCE == expected and job["decode_steps"] == model_module.DEFAULT_DECODE_STEPS
    defaults = {
        "evaluate_world": inspect.signature(evaluate_world).parameters["decode_guidance"].default,
        "run_pipeline": inspect.signature(run_pipeline).parameters["decode_guidance"].default,
        "DDTLlama.text_to_image": inspect.signature(DDTLlama.text_to_image).parameters["decode_guidance"].default,
        "DDTLlama.edit": inspect.signature(DDTLlama.edit).parameters["decode_guidance"].default,
        "DDTLlama.reconstruct": inspect.signature(DDTLlama.reconstruct).parameters["guidance"].default,
        "GenerationSamples": inspect.signature(GenerationSamples).parameters["decode_guidance"].default,
    }
    seen = {}
    import ddt_lightning.mllm.commands as commands

    monkeypatch.setattr(commands, "_load_model", lambda parser, args: seen.update(args) or sys.exit(0))
    with pytest.raises(SystemExit):
        main_evaluate(["--model", "x"])
    defaults["ddt evaluate"] = seen["decode_guidance"]
    assert defaults == dict.fromkeys(defaults, expected)


def test_every_entry_point_decodes_generated_tokens_in_the_same_steps(export, monkeypatch):
    import inspect

    from ddt_lightning.callbacks import GenerationSamples
    from ddt_lightning.pipeline import run_pipeline

    expected = model_module.DEFAULT_DECODE_STEPS
    defaults = {
        "DDTLlama": inspect.signature(DDTLlama).parameters["decode_steps"].default,
        "DDTLlama.from_pretrained (an export without decode_steps)": DDTLlama.from_pretrained(export[0]).decode_steps,
        "run_pipeline": inspect.signature(run_pipeline).parameters["decode_steps"].default,
        "GenerationSamples": inspect.signature(GenerationSamples).parameters["decode_steps"].default,
    }
    assert defaults == dict.fromkeys(defaults, expected)
    # The API and the evaluation, left at their defaults, hand the decoder those steps.
    seen = []
    model = DDTLlama.from_pretrained(export[0])
    monkeypatch.setattr(model.ddt, "decode", lambda codes, steps, guidance, generator: seen.append(steps) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model.text_to_image(["a large red circle in the top left"])
    with pytest.raises(ZeroDivisionError):
        evaluate_world(model, num_prompts=1, num_captions=0, num_edits=0, progress=False)
    assert seen == [expected, expected]


COMMANDS = {  # each entry-point command with what it needs besides --model to reach the model loader
    "ddt evaluate": (main_evaluate, []),
    "ddt caption": (main_caption, []),
    "ddt generate": (main_generate, ["--prompt", "a small red circle in the top left"]),
    "ddt edit": (main_edit, ["--images", "x.png", "--instruction", "remove the red circle"]),
}


def command_arguments(monkeypatch, names: list[str], extra: list[str] = ()) -> dict[str, dict]:
    """The parsed arguments each named command hands to the model loader, which stops it there ({} if it stopped
    before: refused while parsing)."""
    import ddt_lightning.mllm.commands as commands

    seen, out = {}, {}
    monkeypatch.setattr(commands, "_image_paths", lambda parser, images: [Path("x.png")])
    monkeypatch.setattr(commands, "_load_model", lambda parser, args: seen.update(args) or sys.exit(0))
    for name in names:
        main, args = COMMANDS[name]
        seen.clear()
        with pytest.raises(SystemExit):
            main(["--model", "x", *args, *extra])
        out[name] = dict(seen)
    return out


def test_every_caption_entry_point_uses_the_same_beams_and_reranking(monkeypatch):
    # As with the decoder's guidance: a caption figure from the API, a command or the pipeline must mean the same.
    import inspect

    from ddt_lightning.pipeline import run_pipeline

    expected = {"beams": model_module.DEFAULT_CAPTION_BEAMS, "rerank": model_module.DEFAULT_CAPTION_RERANK}
    assert expected["beams"] > 1 and expected["rerank"] > 0  # reranked beams (README, "Sampling")

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    defaults = {
        "DDTLlama.caption": {
            "beams": default(DDTLlama.caption, "num_beams"),
            "rerank": default(DDTLlama.caption, "rerank"),
        },
        "DDTLlama.caption_codes": {
            "beams": default(DDTLlama.caption_codes, "num_beams"),
            "rerank": default(DDTLlama.caption_codes, "rerank"),
        },
        "evaluate_world": {
            "beams": default(evaluate_world, "caption_beams"),
            "rerank": default(evaluate_world, "caption_rerank"),
        },
        "run_pipeline": {
            "beams": default(run_pipeline, "caption_beams"),
            "rerank": default(run_pipeline, "caption_rerank"),
        },
    }
    for name, args in command_arguments(monkeypatch, ["ddt evaluate", "ddt caption"]).items():
        defaults[name] = {"beams": args["num_beams"], "rerank": args["rerank"]}
    assert defaults == dict.fromkeys(defaults, expected)
    seen = {}

    # ... and the evaluation hands its settings to the model.
    class Recorder(Oracle):
        def caption(self, images, **options):
            seen["caption_options"] = options
            return super().caption(images, **options)

        def edit(self, images, instructions, **options):
            seen["edit_candidates"] = options["candidates"]
            return super().edit(images, instructions, **options)

    options = dict(num_prompts=0, num_captions=2, num_edits=2, ceilings=False, progress=False)
    evaluate_world(Recorder(seed=1), seed=1, caption_beams=3, caption_rerank=0.5, candidates=3, **options)
    assert seen["caption_options"]["num_beams"] == 3 and seen["caption_options"]["rerank"] == 0.5
    assert seen["edit_candidates"] == 1  # a direct model draws its edits once ...

    class ChainRecorder(Recorder):
        reads_back_edits = True

    evaluate_world(ChainRecorder(seed=1), seed=1, candidates=3, **options)
    assert seen["edit_candidates"] == 3  # ... a chain model reads back as many as asked


def test_every_image_entry_point_samples_at_the_same_temperature(monkeypatch):
    import inspect

    from ddt_lightning.pipeline import run_pipeline

    expected = model_module.DEFAULT_IMAGE_TEMPERATURE
    assert 0.0 < expected < 1.0  # below the LM's own distribution (README, "Sampling")
    defaults = {
        name: inspect.signature(fn).parameters["temperature"].default
        for name, fn in (
            ("DDTLlama.generate_codes", DDTLlama.generate_codes),
            ("DDTLlama.text_to_image", DDTLlama.text_to_image),
            ("DDTLlama.edit", DDTLlama.edit),
            ("evaluate_world", evaluate_world),
            ("run_pipeline", run_pipeline),
        )
    }
    for name, args in command_arguments(monkeypatch, ["ddt evaluate", "ddt generate", "ddt edit"]).items():
        defaults[name] = args["temperature"]
    assert defaults == dict.fromkeys(defaults, expected)


def test_every_drawing_entry_point_reads_back_the_same_number_of_candidates(monkeypatch):
    import inspect

    from ddt_lightning.pipeline import run_pipeline

    expected = model_module.DEFAULT_DRAW_CANDIDATES
    assert expected > 1  # drawings checked by reading them back (README)
    defaults = {
        name: inspect.signature(fn).parameters["candidates"].default
        for name, fn in (
            ("DDTLlama.text_to_image", DDTLlama.text_to_image),
            ("evaluate_world", evaluate_world),
            ("run_pipeline", run_pipeline),
        )
    }
    for name, args in command_arguments(monkeypatch, ["ddt evaluate", "ddt generate"]).items():
        defaults[name] = args["candidates"]
    assert defaults == dict.fromkeys(defaults, expected)
    # Edits leave it to the model (a chain model's default; one drawing for the formats without a caption).
    assert command_arguments(monkeypatch, ["ddt edit"])["ddt edit"]["candidates"] is None
    assert inspect.signature(DDTLlama.edit).parameters["candidates"].default is None
    # A count below 1 is refused while parsing, before the model is loaded.
    assert command_arguments(monkeypatch, ["ddt generate"], ["--candidates", "0"]) == {"ddt generate": {}}


def test_a_rewrite_checked_against_the_source_maximises_both_likelihoods(export, tmp_path, monkeypatch):
    chain = chain_model(export, tmp_path / "chain")
    images, samples = world_images(3)
    captions, instructions = [s.caption for s in samples], [s.edit_instruction for s in samples]
    sources = chain.ddt.encode(images)
    ids, texts, orders = chain.vocab.ids, chain._text(captions), chain._text(instructions)
    per = model_module.DEFAULT_CAPTION_BEAMS
    # Beams of our making: each row's unchanged caption among them, first in row 0; the rest short text rows.
    beams = []
    for row in range(3):
        made = [[5 + row, 6 + j % 5, 7 + j] for j in range(per - 1)]
        beams += [texts[row], *made] if row == 0 else [*made[:3], texts[row], *made[3:]]
    asked = []
    monkeypatch.setattr(model_module, "generate_text", lambda *a, **k: asked.append(k["num_return_sequences"]) or beams)
    rows = chain._visual_rows(sources, None)

    def expected(weight: float) -> list[str]:
        forward = sequence_log_likelihood(
            chain.lm, [rewrite(ids, texts[i // per], orders[i // per], b) for i, b in enumerate(beams)], ids.pad
        )
        backward = sequence_log_likelihood(
            chain.lm, [text_to_image(ids, b, rows[i // per]) for i, b in enumerate(beams)], ids.pad
        )
        score = (forward + weight * backward).view(3, per)
        best = []
        for row in range(3):
            changed = [j for j in range(per) if beams[row * per + j] != texts[row]]
            best.append(beams[row * per + max(changed, key=lambda j: score[row, j].item())])
        return chain.vocab.decode_text(best)

    for weight in (0.1, 1.0, 100.0):
        got = chain.rewrite(captions, instructions, sources=sources, source_weight=weight)
        assert got == expected(weight)
        assert all(g != c for g, c in zip(got, captions))  # never the copy, however likely it makes the source
    # The source's term does choose: on these beams it changes the pick of beam search's own score.
    assert expected(0.0) != expected(100.0)
    # The default weight is the one the edits use.
    default = model_module.DEFAULT_REWRITE_SOURCE_WEIGHT
    assert chain.rewrite(captions, instructions, sources=sources) == expected(default)
    assert set(asked) == {per}  # every beam is scored
    with pytest.raises(ValueError, match="source_weight"):
        chain.rewrite(captions, instructions, sources=sources, source_weight=-1.0)
    with pytest.raises(ValueError, match="source_weight"):
        chain.rewrite(captions, instructions, sources=sources, source_weight=float("nan"))
    with pytest.raises(ValueError, match="sources must be DDT codes"):
        chain.rewrite(captions, instructions, sources=sources[:2])


def test_every_entry_point_checks_rewrites_with_the_main_jobs_weight(export, tmp_path, monkeypatch):
    import inspect

    import yaml

    import ddt_lightning.mllm.commands as commands
    from ddt_lightning.pipeline import run_pipeline

    expected = model_module.DEFAULT_REWRITE_SOURCE_WEIGHT
    job = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "pipeline.yaml").read_text())
    defaults = {
        "configs/pipeline.yaml": job["rewrite_source_weight"],
        "run_pipeline": inspect.signature(run_pipeline).parameters["rewrite_source_weight"].default,
        "evaluate_world": inspect.signature(evaluate_world).parameters["rewrite_source_weight"].default,
        "DDTLlama.edit": inspect.signature(DDTLlama.edit).parameters["rewrite_source_weight"].default,
        "DDTLlama.edit_captions": inspect.signature(DDTLlama.edit_captions).parameters["rewrite_source_weight"].default,
        "DDTLlama.rewrite": inspect.signature(DDTLlama.rewrite).parameters["source_weight"].default,
    }
    seen = {}
    monkeypatch.setattr(commands, "_load_model", lambda parser, args: seen.update(args) or sys.exit(0))
    source = tmp_path / "source.png"
    save_png(world_images(1)[1][0].image, source)
    edit_argv = ["--model", "x", "--images", str(source), "--instruction", "make it red"]
    for name, main, argv in (("ddt evaluate", main_evaluate, ["--model", "x"]), ("ddt edit", main_edit, edit_argv)):
        seen.clear()
        with pytest.raises(SystemExit):
            main(argv)
        defaults[name] = seen["rewrite_source_weight"]
    assert defaults == dict.fromkeys(defaults, expected)
    # A chain model's edit and its rewrites hand the weight on to `rewrite`, with the sources' codes.
    chain = chain_model(export, tmp_path / "chain")
    images, samples = world_images(2)
    instructions = [s.edit_instruction for s in samples]
    calls, rewrite_of = [], chain.rewrite

    def spy(captions, instructions, batch_size=32, sources=None, source_weight=expected):
        calls.append((sources, source_weight))
        return rewrite_of(captions, instructions, batch_size, sources, source_weight)

    monkeypatch.setattr(chain, "rewrite", spy)
    chain.edit(images, instructions, decode_steps=1, candidates=1, rewrite_source_weight=0.7)
    chain.edit_captions(images, instructions, rewrite_source_weight=0.0)
    assert [weight for _, weight in calls] == [0.7, 0.0]
    assert all(torch.equal(codes, chain.ddt.encode(images)) for codes, _ in calls)
