"""Sampling from DDT-LLaMA: image spans with classifier-free guidance, and captions (design.md, section 2).

DDT-LLaMA is a Hugging Face causal LM whose vocabulary is text tokens, special tokens and K visual codes (visual
id = `visual_offset` + code). Generation follows section 2 of design.md:

- **Image spans** (`generate_image_tokens`, text-to-image and editing): the prompt ends with `<boi>`; the loop emits
  exactly T codes with a KV cache, sampling only from the visual slice `[visual_offset, visual_offset + K)` of the
  logits, and the caller appends `<eoi>`. Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion
  Guidance", 2022, arXiv 2207.12598) is applied to next-token logits, `uncond + s * (cond - uncond)`, with the
  null prompts batched beside the conditional ones so that each step is one forward of 2B rows; `s = 1` skips the
  unconditional half. Temperature, top-k and top-p are transformers' own logits warpers, in transformers' order.
- **Captions** (`generate_text`, image-to-text): `model.generate` with a logits processor that forbids visual ids,
  `<boi>` and `<eoi>`; greedy by default, beam search with `num_beams` (all beams with `num_return_sequences`); rows
  are cut at `<eos>`.
- **Scores** (`sequence_log_likelihood`): the log-likelihood of a training-format sequence's loss span, for
  reranking (`DDTLlama.caption` picks among its beams by both directions of the LM).

Prompts of different lengths are left-padded with an attention mask; position ids are passed explicitly (the
number of real tokens before each one, as `GenerationMixin` does), so that a padded row computes what it would
alone. The functions take plain ids and an `ImageSpan`, not a tokenizer object, so that any vocabulary layout
with a contiguous visual slice can use them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ddt_lightning.mllm.sequences import IGNORE_INDEX, Example, pad_batch

# A batch of prompts: a (B, L) LongTensor (with an optional (B, L) mask for left padding) or one list of ids per row.
Prompts = torch.Tensor | Sequence[Sequence[int]]


@dataclass(frozen=True)
class ImageSpan:
    """Where images live in the vocabulary: `<boi> v_1 ... v_T <eoi>` with v = visual_offset + code, code in [0, K)."""

    boi_id: int
    eoi_id: int
    visual_offset: int
    num_codes: int  # K
    num_tokens: int  # T, visual tokens per image

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ImageSpan.{field.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"ImageSpan.{field.name} must be >= 0, got {value}")
        if self.num_codes < 1:
            raise ValueError(f"ImageSpan.num_codes must be >= 1, got {self.num_codes}")
        if self.num_tokens < 1:
            raise ValueError(f"ImageSpan.num_tokens must be >= 1, got {self.num_tokens}")
        if self.boi_id == self.eoi_id:
            raise ValueError(f"ImageSpan.eoi_id must differ from boi_id, both are {self.boi_id}")
        for name in ("boi_id", "eoi_id"):
            if getattr(self, name) in self.visual_range:
                raise ValueError(f"ImageSpan.{name} = {getattr(self, name)} lies in the visual ids {self.visual_range}")

    @property
    def visual_end(self) -> int:
        """One past the last visual id."""
        return self.visual_offset + self.num_codes

    @property
    def visual_range(self) -> range:
        return range(self.visual_offset, self.visual_end)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------


def left_pad(
    prompts: Prompts,
    mask: torch.Tensor | None = None,
    length: int | None = None,
    pad_id: int = 0,
    name: str = "prompts",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a batch of prompts to `length` (default: the longest row): (B, L) ids and (B, L) bool mask.

    A tensor is taken as already left-padded by `mask` (all real when `mask` is None); lists are padded here.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty (B, L) tensor, got shape {tuple(prompts.shape)}")
        ids = prompts.long()
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        elif mask.shape != ids.shape:
            raise ValueError(f"{name} mask has shape {tuple(mask.shape)}, ids have {tuple(ids.shape)}")
        mask = mask.to(device=ids.device, dtype=torch.bool)
    else:
        if mask is not None:
            raise ValueError(f"{name}: a mask goes with a tensor of ids; lists of ids are padded here")
        rows = [list(row) for row in prompts]
        if not rows or any(len(row) == 0 for row in rows):
            raise ValueError(f"{name} must hold at least one row and no empty row")
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = True
    if not bool(mask[:, -1].all()):
        raise ValueError(f"{name} must be left-padded: the last column of the mask has a padded position")
    if length is not None and length > ids.shape[1]:
        extra = length - ids.shape[1]
        ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], dim=1)  # (B, length)
        mask = torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1)  # (B, length)
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token = number of real tokens before it (0 on padding), as `GenerationMixin` computes it."""
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # (B, L)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Image spans: KV-cached sampling with batched classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------------


def logits_warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """transformers' temperature, top-k and top-p warpers, in the order `GenerationMixin` applies them."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample (0 means greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


@torch.inference_mode()
def generate_image_tokens(
    model: nn.Module,
    cond_ids: Prompts,
    uncond_ids: Prompts | None,
    span: ImageSpan,
    guidance: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cond_mask: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one image span per prompt: (B, T) codes in [0, K) (not vocabulary ids; add `visual_offset` for those).

    Args:
        model: a causal LM called as `model(input_ids=, attention_mask=, position_ids=, past_key_values=,
            use_cache=True, logits_to_keep=1)` (any `transformers` `*ForCausalLM`); its train/eval mode is left as is.
        cond_ids: B conditional prompts, each ending with `<boi>`; a (B, L) tensor left-padded by `cond_mask`,
            or lists of ids of any lengths.
        uncond_ids: the null prompts (also ending with `<boi>`), B rows or one row shared by all; unused (may be
            None) when `guidance == 1`.
        span: the vocabulary layout and the number T of tokens to emit.
        guidance: the scale s of `uncond + s * (cond - uncond)`, on the visual logits.
        temperature: 0 is greedy (argmax); otherwise the warpers and a multinomial draw from `generator`.
        top_k, top_p: transformers' `TopKLogitsWarper` / `TopPLogitsWarper` over the K visual logits.
        progress: a tqdm bar over the T steps on stderr.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0
    warpers = LogitsProcessorList() if greedy else logits_warpers(temperature, top_k, top_p)
    guided = float(guidance) != 1.0
    device = _device(model)

    cond, cond_real = left_pad(cond_ids, cond_mask, pad_id=span.boi_id, name="cond_ids")
    batch = cond.shape[0]
    if guided:
        if uncond_ids is None:
            raise ValueError(f"uncond_ids is required when guidance != 1 (got guidance = {guidance})")
        uncond, uncond_real = left_pad(uncond_ids, uncond_mask, pad_id=span.boi_id, name="uncond_ids")
        if uncond.shape[0] == 1:
            uncond, uncond_real = uncond.expand(batch, -1), uncond_real.expand(batch, -1)
        if uncond.shape[0] != batch:
            raise ValueError(f"uncond_ids has {uncond.shape[0]} rows, cond_ids has {batch} (or give one null prompt)")
        width = max(cond.shape[1], uncond.shape[1])
        cond, cond_real = left_pad(cond, cond_real, length=width, pad_id=span.boi_id, name="cond_ids")
        uncond, uncond_real = left_pad(uncond, uncond_real, length=width, pad_id=span.boi_id, name="uncond_ids")
        ids, real = torch.cat([cond, uncond]), torch.cat([cond_real, uncond_real])  # (2B, L): cond rows, then null
    else:
        ids, real = cond, cond_real  # (B, L)
    if not bool((ids[:, -1] == span.boi_id).all()):
        raise ValueError(f"every prompt must end with <boi> (id {span.boi_id}) before its image span")
    ids, real = ids.to(device), real.to(device)
    rows, prompt_len = ids.shape
    steps = span.num_tokens

    # Everything the loop needs is allocated once: the key mask of the whole run (sliced per step, a view) and the
    # positions of the T - 1 generated tokens fed back. Without padding the mask is dropped (plain causal attention).
    padded = not bool(real.all())
    key_mask = torch.ones(rows, prompt_len + steps - 1, dtype=torch.bool, device=device)  # (R, L + T - 1)
    key_mask[:, :prompt_len] = real
    fed_positions = real.sum(-1, keepdim=True) + torch.arange(steps - 1, device=device)  # (R, T - 1)
    codes = torch.empty(batch, steps, dtype=torch.long, device=device)  # (B, T)
    lo, hi = span.visual_offset, span.visual_end

    cache = DynamicCache(config=model.config) if hasattr(model, "config") else DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=key_mask[:, :prompt_len] if padded else None,
        position_ids=positions_from_mask(real),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if out.logits.shape[-1] < hi:
        raise ValueError(f"the model has {out.logits.shape[-1]} logits; ImageSpan's visual ids reach {hi}")
    for t in tqdm(range(steps), desc="image tokens", file=sys.stderr, disable=not progress, leave=False):
        logits = out.logits[:, -1, lo:hi].float()  # (R, K): only visual ids can be drawn
        if guided:  # Ho & Salimans eq. 6 with s = 1 + w, on logits
            logits = logits[batch:] + guidance * (logits[:batch] - logits[batch:])  # (B, K)
        if greedy:
            code = logits.argmax(-1)  # (B,)
        else:
            probs = warpers(codes[:, :t], logits).softmax(-1)  # (B, K)
            code = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        codes[:, t] = code
        if t + 1 == steps:
            break  # the T-th code needs no forward: the caller appends <eoi>
        fed = (code + lo).unsqueeze(1)  # (B, 1) vocabulary ids
        out = model(
            input_ids=fed.repeat(2, 1) if guided else fed,  # (R, 1)
            attention_mask=key_mask[:, : prompt_len + t + 1] if padded else None,
            position_ids=fed_positions[:, t : t + 1],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return codes


# ---------------------------------------------------------------------------------------------------------------------
# Text: captions with model.generate, image tokens forbidden
# ---------------------------------------------------------------------------------------------------------------------


class ForbidIdsLogitsProcessor(LogitsProcessor):
    """Sets the logits of a contiguous id range and of a few single ids to -inf (here: visual ids, <boi>, <eoi>)."""

    def __init__(self, forbidden: range, extra_ids: Sequence[int] = ()) -> None:
        self.forbidden = forbidden
        self.extra_ids = tuple(int(i) for i in extra_ids)
        self._mask: torch.Tensor | None = None  # (V,) bool, built once for the scores' width and device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            mask[self.forbidden.start : self.forbidden.stop] = True
            mask[list(self.extra_ids)] = True
            self._mask = mask
        return scores.masked_fill(self._mask, -float("inf"))  # (B, V)


@torch.inference_mode()
def generate_text(
    model: nn.Module,
    prompt_ids: Prompts,
    eos_id: int,
    max_new_tokens: int,
    span_or_visual_range: ImageSpan | range,
    prompt_mask: torch.Tensor | None = None,
    forbid_ids: Sequence[int] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    num_return_sequences: int = 1,
) -> list[list[int]]:
    """Continue each prompt with text (captioning: `<bos> <boi> v... <eoi>`): the new ids per row, cut before `<eos>`.

    Uses `model.generate` (greedy unless `do_sample`, beam search with `num_beams` > 1: the most likely caption of
    `num_beams` hypotheses rather than the greedy one; seed sampling with `torch.manual_seed`). Visual ids can never be
    emitted, nor `<boi>`/`<eoi>` when an `ImageSpan` is given (a bare `range` forbids just that id range), nor
    `forbid_ids` (for example `<pad>`, `<null>` and the embedding rows that only pad the vocabulary).
    `num_return_sequences` > 1 returns that many continuations per prompt (the best beams first, at most
    `num_beams` of them unless sampling), prompt after prompt: row `i * num_return_sequences + j`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(span_or_visual_range, ImageSpan):
        span = span_or_visual_range
        forbid = ForbidIdsLogitsProcessor(span.visual_range, (span.boi_id, span.eoi_id, *forbid_ids))
    elif isinstance(span_or_visual_range, range) and span_or_visual_range.step == 1:
        forbid = ForbidIdsLogitsProcessor(span_or_visual_range, forbid_ids)
    else:
        raise TypeError(f"span_or_visual_range must be an ImageSpan or a range with step 1, got {span_or_visual_range}")
    if eos_id in forbid.forbidden or eos_id in forbid.extra_ids:
        raise ValueError(f"eos_id {eos_id} is one of the forbidden ids")
    if do_sample:
        logits_warpers(temperature, top_k, top_p)  # validates the arguments with our messages
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
    if not do_sample and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) > num_beams ({num_beams}) without sampling")
    ids, real = left_pad(prompt_ids, prompt_mask, pad_id=eos_id, name="prompt_ids")
    device = _device(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
        # Explicit values: fields left None would take transformers' defaults (top_k = 50).
        **({"temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0} if do_sample else {}),
    )
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=real.to(device).long(),
        generation_config=config,
        logits_processor=LogitsProcessorList([forbid]),
    )  # (B, L + new)
    result = []
    for row in out[:, ids.shape[1] :].tolist():
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result


@torch.inference_mode()
def sequence_log_likelihood(
    model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """log p(labelled ids | what precedes them) of each training-format sequence, summed over its loss span: (N,)
    float32 on the CPU. For example `text_to_image(ids, caption, image)` scores log p(image | caption) and
    `image_to_text(ids, image, caption)` log p(caption <eos> | image). Right-padded batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, out = _device(model), []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        batch = pad_batch(part, ["t2i"] * len(part), pad_id)  # the task label is not used here
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels[:, 1:].to(device)  # (b, L - 1): position i predicts id i + 1
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        out.append(-nll.sum(dim=1).cpu())  # ignored positions contribute 0
    return torch.cat(out) if out else torch.zeros(0)
