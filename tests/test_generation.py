"""DDT-LLaMA sampling (design.md, section 2): image spans with a KV cache and batched classifier-free guidance
(Ho & Salimans 2022), captions without image ids, and the `generate` bench, on a tiny random `LlamaForCausalLM`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ddt_lightning.bench.generate import main as bench_generate_main
from ddt_lightning.mllm.generation import (
    ImageSpan,
    generate_image_tokens,
    generate_text,
    left_pad,
    sequence_log_likelihood,
)
from ddt_lightning.mllm.sequences import SpecialIds, image_to_text, text_to_image

TEXT_VOCAB, NUM_CODES, NUM_TOKENS = 50, 40, 6
BOS, EOS = 1, 2
SPAN = ImageSpan(
    boi_id=TEXT_VOCAB, eoi_id=TEXT_VOCAB + 1, visual_offset=TEXT_VOCAB + 2, num_codes=NUM_CODES, num_tokens=NUM_TOKENS
)
BOI, EOI, LO, HI = SPAN.boi_id, SPAN.eoi_id, SPAN.visual_offset, SPAN.visual_end
NULL = [BOS, BOI]
CAPTIONS = [[BOS, 7, 8, 9, 10, 11, BOI], [BOS, 12, BOI], [BOS, 20, 21, 22, 23, BOI]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TEXT_VOCAB + 2 + NUM_CODES,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # wide logit gaps, so that greedy comparisons are not decided by rounding
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


@contextlib.contextmanager
def forward_hook(model: torch.nn.Module, fn: Callable) -> Iterator[None]:
    handle = model.register_forward_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def naive_greedy(model: LlamaForCausalLM, cond: list[int], uncond: list[int], guidance: float) -> list[int]:
    """Reference: no cache, no padding, one prompt; the full sequence is recomputed at every step."""
    cond, uncond, codes = list(cond), list(uncond), []
    for _ in range(NUM_TOKENS):
        logits = model(input_ids=torch.tensor([cond]), use_cache=False).logits[0, -1, LO:HI]  # (K,)
        if guidance != 1:
            null = model(input_ids=torch.tensor([uncond]), use_cache=False).logits[0, -1, LO:HI]  # (K,)
            logits = null + guidance * (logits - null)
        code = int(logits.argmax())
        codes.append(code)
        cond.append(LO + code)
        uncond.append(LO + code)
    return codes


def test_image_span_validation_names_the_field() -> None:
    assert SPAN.visual_range == range(52, 92)
    with pytest.raises(ValueError, match="num_tokens"):
        ImageSpan(boi_id=0, eoi_id=1, visual_offset=2, num_codes=4, num_tokens=0)
    with pytest.raises(ValueError, match="num_codes"):
        ImageSpan(boi_id=0, eoi_id=1, visual_offset=2, num_codes=0, num_tokens=4)
    with pytest.raises(ValueError, match="visual_offset"):
        ImageSpan(boi_id=0, eoi_id=1, visual_offset=-1, num_codes=4, num_tokens=4)
    with pytest.raises(ValueError, match="eoi_id"):
        ImageSpan(boi_id=3, eoi_id=3, visual_offset=10, num_codes=4, num_tokens=4)
    with pytest.raises(ValueError, match="boi_id"):
        ImageSpan(boi_id=11, eoi_id=1, visual_offset=10, num_codes=4, num_tokens=4)
    with pytest.raises(TypeError, match="num_codes"):
        ImageSpan(boi_id=0, eoi_id=1, visual_offset=2, num_codes=4.0, num_tokens=4)  # type: ignore[arg-type]


def test_exactly_t_codes_in_range_even_when_text_logits_dominate(model: LlamaForCausalLM) -> None:
    def favour_text(module, args, kwargs, out):  # text, <boi> and <eoi> would win over any visual id
        out.logits[..., :LO] += 1e4
        return out

    with forward_hook(model, favour_text):
        codes = generate_image_tokens(
            model, CAPTIONS, [NULL], SPAN, guidance=3.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(0)
        )
    assert codes.shape == (len(CAPTIONS), NUM_TOKENS) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < NUM_CODES


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_kv_cache_equals_naive_recomputation(model: LlamaForCausalLM, guidance: float) -> None:
    for caption in CAPTIONS[:2]:
        codes = generate_image_tokens(model, [caption], [NULL], SPAN, guidance=guidance, temperature=0)
        assert codes[0].tolist() == naive_greedy(model, caption, NULL, guidance)


def test_guidance_one_is_the_conditional_model_alone(model: LlamaForCausalLM) -> None:
    rows = []

    def record(module, args, kwargs, out):
        rows.append(kwargs["input_ids"].shape[0])

    with forward_hook(model, record):
        with_null = generate_image_tokens(
            model, CAPTIONS, [NULL], SPAN, guidance=1.0, top_k=5, generator=torch.Generator().manual_seed(3)
        )
    assert rows == [len(CAPTIONS)] * NUM_TOKENS  # no unconditional half; T forwards (prefill + T - 1 steps)
    alone = generate_image_tokens(model, CAPTIONS, None, SPAN, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(with_null, alone)


def test_guided_logits_are_uncond_plus_s_times_difference(model: LlamaForCausalLM) -> None:
    guidance, batch = 4.0, len(CAPTIONS)
    logits = []

    def record(module, args, kwargs, out):
        logits.append(out.logits[:, -1].clone())  # (2B, V)

    with forward_hook(model, record):
        codes = generate_image_tokens(model, CAPTIONS, [NULL], SPAN, guidance=guidance, temperature=0)
    assert len(logits) == NUM_TOKENS and all(step.shape[0] == 2 * batch for step in logits)  # one batched forward
    for t, step in enumerate(logits):
        cond, uncond = step[:batch, LO:HI], step[batch:, LO:HI]  # (B, K) each
        expected = (uncond + guidance * (cond - uncond)).argmax(-1)
        assert torch.equal(codes[:, t], expected)
    unguided = generate_image_tokens(model, CAPTIONS, None, SPAN, temperature=0)
    assert not torch.equal(codes, unguided)  # s = 4 changes the picture on this model


def test_left_padded_batch_equals_each_prompt_alone(model: LlamaForCausalLM) -> None:
    positions = []

    def record(module, args, kwargs, out):
        positions.append(kwargs["position_ids"])

    with forward_hook(model, record):
        batched = generate_image_tokens(model, CAPTIONS, [NULL], SPAN, guidance=2.5, temperature=0)
    # RoPE only sees position differences, so equal codes would not catch a per-row shift: check the ids directly.
    # Rows: 3 captions (lengths 7, 3, 6), then 3 null prompts (length 2), all left-padded to 7.
    lengths = [len(c) for c in CAPTIONS] + [len(NULL)] * len(CAPTIONS)
    for row, n in enumerate(lengths):
        assert positions[0][row].tolist() == [0] * (7 - n) + list(range(n))
        assert [int(p[row, 0]) for p in positions[1:]] == list(range(n, n + NUM_TOKENS - 1))
    for i, caption in enumerate(CAPTIONS):
        alone = generate_image_tokens(model, [caption], [NULL], SPAN, guidance=2.5, temperature=0)
        assert batched[i].tolist() == alone[0].tolist() == naive_greedy(model, caption, NULL, 2.5)
    # The same batch given as a left-padded tensor with its mask, and B null rows instead of one.
    ids, mask = left_pad(CAPTIONS, pad_id=0)
    nulls = torch.tensor([NULL] * len(CAPTIONS))  # (B, 2), no padding: no mask needed
    as_tensor = generate_image_tokens(model, ids, nulls, SPAN, guidance=2.5, temperature=0, cond_mask=mask)
    assert torch.equal(as_tensor, batched)


def test_top_k_one_equals_greedy(model: LlamaForCausalLM) -> None:
    greedy = generate_image_tokens(model, CAPTIONS, [NULL], SPAN, guidance=2.0, temperature=0)
    gen = torch.Generator().manual_seed(5)
    top1 = generate_image_tokens(model, CAPTIONS, [NULL], SPAN, guidance=2.0, temperature=0.7, top_k=1, generator=gen)
    assert torch.equal(greedy, top1)


def test_seeded_generator_is_deterministic(model: LlamaForCausalLM) -> None:
    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate_image_tokens(
            model, CAPTIONS, [NULL], SPAN, guidance=3.0, temperature=1.5, top_p=0.95, generator=generator
        )

    first = sample(11)
    assert torch.equal(first, sample(11))
    assert not torch.equal(first, sample(12))


def test_editing_with_a_long_prompt(model: LlamaForCausalLM) -> None:
    # <bos> <boi> src... <eoi> instruction <boi>: 40 source codes, longer than the span generated.
    source = [LO + (7 * i) % NUM_CODES for i in range(40)]
    edits = [[BOS, BOI, *source, EOI, 30, 31, 32, BOI], [BOS, BOI, *source[:30], EOI, 33, BOI]]
    codes = generate_image_tokens(model, edits, [[BOS, BOI, *source, EOI, BOI]], SPAN, guidance=1.5, temperature=0)
    assert codes.shape == (2, NUM_TOKENS)
    assert codes[0].tolist() == naive_greedy(model, edits[0], [BOS, BOI, *source, EOI, BOI], 1.5)
    assert codes[1].tolist() == naive_greedy(model, edits[1], [BOS, BOI, *source, EOI, BOI], 1.5)


def test_prompt_and_sampling_validation(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="<boi>"):
        generate_image_tokens(model, [[BOS, 7]], None, SPAN)
    with pytest.raises(ValueError, match="uncond_ids"):
        generate_image_tokens(model, CAPTIONS, None, SPAN, guidance=2.0)
    with pytest.raises(ValueError, match="rows"):
        generate_image_tokens(model, CAPTIONS, [NULL, NULL], SPAN, guidance=2.0)
    with pytest.raises(ValueError, match="top_p"):
        generate_image_tokens(model, CAPTIONS, None, SPAN, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate_image_tokens(model, CAPTIONS, None, SPAN, temperature=-1.0)
    with pytest.raises(ValueError, match="left-padded"):
        generate_image_tokens(model, torch.tensor([[BOS, BOI, 0]]), None, SPAN, cond_mask=torch.tensor([[1, 1, 0]]))


def test_generate_text_never_emits_image_ids_and_stops_at_eos(model: LlamaForCausalLM) -> None:
    calls = []

    def tempt(module, args, kwargs, out):  # image ids would win everywhere; <eos> wins from the 4th new token
        out.logits[..., LO:HI] += 1e3
        out.logits[..., [BOI, EOI]] += 2e3
        if len(calls) >= 3:
            out.logits[..., EOS] += 1e4
        calls.append(1)
        return out

    prompts = [[BOS, BOI, *[LO + c for c in range(NUM_TOKENS)], EOI], [BOS, BOI, LO + 5, LO + 9, EOI]]
    with forward_hook(model, tempt):
        captions = generate_text(model, prompts, eos_id=EOS, max_new_tokens=10, span_or_visual_range=SPAN)
    assert [len(c) for c in captions] == [3, 3]  # cut before <eos>
    for caption in captions:
        assert all(0 <= i < TEXT_VOCAB and i != EOS for i in caption), caption

    calls.clear()
    with forward_hook(model, tempt):
        plain = generate_text(model, prompts, EOS, 2, range(LO, HI), forbid_ids=captions[0] + captions[1])
    assert [len(c) for c in plain] == [2, 2]  # max_new_tokens reached; a bare range still forbids visual ids
    assert all(not LO <= i < HI and i not in captions[0] + captions[1] for c in plain for i in c)
    with pytest.raises(ValueError, match="eos_id"):
        generate_text(model, prompts, EOS, 2, SPAN, forbid_ids=[EOS])


def test_beam_search_finds_the_caption_greedy_decoding_misses(model: LlamaForCausalLM) -> None:
    # A trap for greedy decoding: the likeliest first word (3) leads to an unsure continuation, the second (4) to a
    # sure <eos>. Beam search must return [4] (then <eos>), greedy [3, 5]; both must keep to the allowed ids.
    A, B, C = 3, 4, 5
    rows = {EOI: {A: 1.0, B: 0.8, C: -1.0, EOS: -2.0}, A: {A: 0.0, B: 0.0, C: 0.1, EOS: 0.0}, B: {EOS: 10.0}}

    def trap(module, args, kwargs, out):
        last = kwargs["input_ids"][:, -1].tolist()
        logits = torch.full_like(out.logits[:, -1], -1e4)  # only A, B, C and <eos> are ever possible
        for i, token in enumerate(last):
            logits[i, [A, B, C, EOS]] = 0.0
            for j, value in rows.get(token, {}).items():
                logits[i, j] = value
        out.logits[:, -1] = logits
        return out

    prompts = [[BOS, BOI, LO + 1, LO + 2, EOI], [BOS, BOI, LO + 3, EOI]]
    with forward_hook(model, trap):
        greedy = generate_text(model, prompts, EOS, 2, SPAN)
        beams = generate_text(model, prompts, EOS, 2, SPAN, num_beams=3)
        one_beam = generate_text(model, prompts, EOS, 2, SPAN, num_beams=1)
        ranked = generate_text(model, prompts, EOS, 2, SPAN, num_beams=3, num_return_sequences=3)
    assert greedy == one_beam == [[A, C], [A, C]]
    assert beams == [[B], [B]]
    # Every prompt's hypotheses, prompt after prompt, the best first; all distinct.
    assert len(ranked) == 6 and ranked[0] == ranked[3] == [B]
    assert all(len({tuple(r) for r in ranked[i : i + 3]}) == 3 for i in (0, 3))
    with pytest.raises(ValueError, match="num_beams"):
        generate_text(model, prompts, EOS, 2, SPAN, num_beams=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate_text(model, prompts, EOS, 2, SPAN, num_beams=2, num_return_sequences=3)


def test_sequence_log_likelihood_is_the_summed_loss_of_each_sequence_alone(model: LlamaForCausalLM) -> None:
    ids = SpecialIds(pad=0, bos=BOS, eos=EOS, null=3, boi=BOI, eoi=EOI, visual_offset=LO, num_codes=NUM_CODES)
    image = [LO + c for c in (4, 9, 1, 30, 2, 17)]
    examples = [
        text_to_image(ids, [7, 8, 9], image),  # log p(image <eoi> | caption)
        image_to_text(ids, image, [11, 12, 13, 14, 15]),  # log p(caption <eos> | image): a longer sequence
        text_to_image(ids, None, image),  # the null prompt
    ]
    scores = sequence_log_likelihood(model, examples, pad_id=0, batch_size=2)  # right padding inside a batch
    for (input_ids, labels), score in zip(examples, scores):
        with torch.inference_mode():
            loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss  # mean over span
        span = sum(label != -100 for label in labels) - (labels[0] != -100)
        assert score.item() == pytest.approx(-loss.item() * span, rel=1e-5)
    assert scores[0] != pytest.approx(scores[2].item())  # the caption conditions the image
    with pytest.raises(ValueError, match="batch_size"):
        sequence_log_likelihood(model, examples, pad_id=0, batch_size=0)


def test_bench_generate_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    sizes = {"batch-size": 2, "prompt-len": 5, "tokens": 4, "codes": 32, "text-vocab": 40, "hidden": 32, "layers": 1}
    sizes |= {"heads": 2, "top-k": 5, "repeats": 1}
    bench_generate_main([flag for key, value in sizes.items() for flag in (f"--{key}", str(value))])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["guidance_cost_ratio"] > 0 and result["guided_tokens_per_s"] > 0 and result["plain_tokens_per_s"] > 0
    assert result["codes_valid"] is True and result["plain_new_tokens"] == 4
    assert (result["batch_size"], result["num_tokens"], result["vocab_size"]) == (2, 4, 40 + 2 + 32)
    assert "bench generate" in captured.err
