"""`DDTLlama`: the trained DDT-LLaMA as a user-facing model, from its export folder (design.md sections 2 and 4).

    model = DDTLlama.from_pretrained("outputs/llm-tiny")
    images = model.text_to_image(["a large red circle in the top left"], guidance=3.0)   # (B, 3, H, W) in [-1, 1]
    texts = model.caption(images)                                                        # list[str]
    edited = model.edit(images, ["make the red circle blue"])                           # (B, 3, H, W) in [-1, 1]

Export layout (written by `MLLMModule.save_pretrained` and the export step that owns the DDT tokenizer):

    export_dir/lm/             AutoModelForCausalLM + AutoTokenizer (offline); ddt_vocab.json (the id layout);
                               ddt_llm.json (format, token order, T, K, the DDT tokenizer's relative path)
    export_dir/ddt_tokenizer/  the frozen DDT tokenizer (`DDTTokenizer.save_pretrained`)

Every prompt is the training sequence of its task (`sequences.py`) cut before its loss span, so generation sees
exactly what training conditioned on: text-to-image `<bos> caption <boi>`, null `<bos> <null> <boi>`; captioning
`<bos> <boi> v.. <eoi>`; editing `<bos> <boi> src.. <eoi> instruction <boi>`, null `... <eoi> <null> <boi>` (the
instruction dropped, the source kept: the module's null-prompt dropout of edits); a `chain` model edits in three
such steps, captioning, the rewrite `<bos> caption <eos> instruction <eos>` and text-to-image. Visual tokens enter
prompts in the trained `TokenOrder` and generated codes are put back into DDT's order (`TokenOrder.invert`) before DDT
decoding; a `shuffled` order with `shuffle: random` cannot be inverted, so such a model can caption but not draw.

Sampling (`generation.py`): KV cache, exactly T visual codes per image, batched classifier-free guidance on logits;
captions forbid every id that is not text. Everything is batched and, given a `torch.Generator`, deterministic (the
generator drives the LM's draws and the DDT decoder's noise, batch after batch). Pure PyTorch and transformers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from ddt_lightning.mllm.generation import ImageSpan, generate_image_tokens, generate_text, sequence_log_likelihood
from ddt_lightning.mllm.sequences import (
    EDIT_FORMATS,
    IGNORE_INDEX,
    Example,
    TokenOrder,
    edit,
    image_to_text,
    rewrite,
    text_to_image,
)
from ddt_lightning.mllm.vocab import MultimodalVocab
from ddt_lightning.tokenizer import CONFIG_NAME, DDTTokenizer

# The export's names; `MLLMModule` (a Lightning module, not imported here) writes the same ones.
LM_FOLDER = "lm"
DDT_TOKENIZER_FOLDER = "ddt_tokenizer"
EXPORT_CONFIG = "ddt_llm.json"
EXPORT_FORMAT = "ddt-llm/1"
# The DDT decoder's Euler steps and its own guidance when it draws the LM's tokens, by default everywhere (the API,
# the commands, the evaluation, the pipeline, GenerationSamples; a test keeps them equal). One step without guidance:
# the decoder's x0 estimate from all T tokens at t = 1, which its pure-noise training (p_pure_noise) makes a one-step
# autoencoder. Since the decoder-only phase grew to 1,900 steps it scores the main job's export as 4 steps at guidance
# 2 did (held-out worlds 1 / 2: GenEval-style 0.810 / 0.819 vs 0.820 / 0.811, edits 0.434 / 0.418 vs 0.438 / 0.398)
# at an eighth of the decoder's passes; with the decoders before it, 4 steps were far better (README, "Sampling").
DEFAULT_DECODE_STEPS = 1
DEFAULT_DECODE_GUIDANCE = 1.0
# The temperature of the image tokens (text-to-image and edits) by default, everywhere (the API, the commands, the
# evaluation, the pipeline): the held-out scores rise as it falls from 1 (README, "Sampling").
DEFAULT_IMAGE_TEMPERATURE = 0.25
# Captions are decoded by beam search over this many hypotheses by every entry point (the API, `ddt caption`,
# `ddt evaluate`, the pipeline), so their figures agree; 1 is greedy decoding.
DEFAULT_CAPTION_BEAMS = 8
# ... and the beams are reranked by log p(caption | image) + DEFAULT_CAPTION_RERANK * log p(image | caption), the same
# LM read in its text-to-image direction (0: beam search's own pick). README, "Captions checked by drawing them".
DEFAULT_CAPTION_RERANK = 1.0
# Text-to-image (and a chain model's drawing of its rewrites) draws this many images per prompt and keeps the one
# maximising log p(prompt | the drawing's DDT codes, encoded again) + log p(codes | prompt): the LM reads its drawing
# back (README, "Drawings checked by reading them back"); 1 draws once.
DEFAULT_DRAW_CANDIDATES = 4
# A chain edit's rewrite is the beam c' (of DEFAULT_CAPTION_BEAMS, the copy of the caption excluded) maximising
# log p(c' | caption, instruction) + DEFAULT_REWRITE_SOURCE_WEIGHT * log p(source image | c'): of the rewrites the
# instruction allows, the one that keeps most of the source - an edit changes what it is asked to and nothing else.
# README, "Rewrites checked against the source".
DEFAULT_REWRITE_SOURCE_WEIGHT = 0.1
DEFAULT_MAX_TEXT_TOKENS = 64  # MLLMModule's `max_text_tokens` default: captions and instructions are cut to this


def prompt_of(example: Example) -> list[int]:
    """The prompt of a training sequence: its input ids before the first labelled position (the loss span)."""
    ids, labels = example
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    return ids[:start]


def _chunks(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _bar(chunks: list[slice], desc: str, progress: bool) -> Iterator[slice]:
    return iter(tqdm(chunks, desc=desc, file=sys.stderr, disable=not progress or len(chunks) == 0, unit="batch"))


class DDTLlama:
    """DDT-LLaMA for inference: the causal LM, its multimodal vocabulary, the token order and the DDT tokenizer.

    Args:
        lm: a Hugging Face causal LM over `vocab` (its logits may be wider: padded ids are never sampled).
        vocab: the multimodal vocabulary the LM was trained with.
        ddt: the frozen DDT tokenizer whose codes the LM models (K = its codebook size, T = its tokens).
        token_order: the order the visual tokens had in training sequences (`ddt_llm.json`).
        max_text_tokens: captions and instructions are cut to this many tokens, as in training.
        decode_steps: default Euler steps of the DDT decoder.
        edit_format: the edit sequences the LM was trained on (`mllm.sequences.EDIT_FORMATS`; `ddt_llm.json`).
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        vocab: MultimodalVocab,
        ddt: DDTTokenizer,
        token_order: TokenOrder | None = None,
        max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS,
        decode_steps: int = DEFAULT_DECODE_STEPS,
        edit_format: str = "direct",
    ) -> None:
        if edit_format not in EDIT_FORMATS:
            raise ValueError(f"edit_format must be one of {EDIT_FORMATS}, got {edit_format!r}")
        if vocab.num_codes != ddt.config.codebook_size:
            raise ValueError(
                f"the vocabulary has K = {vocab.num_codes} visual tokens, the DDT tokenizer "
                f"{ddt.config.codebook_size} codes: the LM was trained on another tokenizer's codes"
            )
        width = self._logits_width(lm)
        if width < vocab.visual_end:
            raise ValueError(f"the LM has {width} output ids, the vocabulary's visual ids reach {vocab.visual_end}")
        if max_text_tokens < 1 or decode_steps < 1:
            raise ValueError(f"max_text_tokens and decode_steps must be >= 1, got {max_text_tokens}, {decode_steps}")
        self.lm = lm.eval()
        self.vocab = vocab
        self.ddt = ddt.requires_grad_(False).eval()
        self.order = token_order or TokenOrder()
        self.max_text_tokens = max_text_tokens
        self.decode_steps = decode_steps
        self.edit_format = edit_format
        self.logits_width = width
        self.span: ImageSpan = vocab.image_span(ddt.config.num_tokens)

    @staticmethod
    def _logits_width(lm: PreTrainedModel) -> int:
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        return int(head.weight.shape[0]) if head is not None else int(lm.config.vocab_size)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DDTLlama:
        """Load an export folder (or its `lm/` folder itself), offline.

        The DDT tokenizer comes from `tokenizer_path` if given, else from the path `ddt_llm.json` records (relative
        to `lm/`: `../ddt_tokenizer`). `ddt_llm.json` may also carry `max_text_tokens` and `decode_steps`.
        """
        root = Path(export_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"no DDT-LLaMA export at {root}: the folder does not exist")
        lm_dir = root if (root / EXPORT_CONFIG).is_file() else root / LM_FOLDER
        config_file = lm_dir / EXPORT_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no DDT-LLaMA export at {root}: {root / LM_FOLDER / EXPORT_CONFIG} is missing "
                "(write one with `ddt fit --config configs/mllm/tiny.yaml --export_dir DIR`)"
            )
        config = json.loads(config_file.read_text())
        if config.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{config_file}: unknown format {config.get('format')!r}, expected {EXPORT_FORMAT}")
        order = TokenOrder(**config["token_order"])

        ddt_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
        if ddt_dir is None:
            ddt_dir = (lm_dir / config.get("ddt_tokenizer", f"../{DDT_TOKENIZER_FOLDER}")).resolve()
        if not (ddt_dir / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"no DDT tokenizer at {ddt_dir} ({CONFIG_NAME} is missing): copy the tokenizer export the LM was "
                f"trained with there (DDTTokenizer.save_pretrained), or pass tokenizer_path"
            )
        ddt = DDTTokenizer.from_pretrained(ddt_dir)
        for key, value in (("num_tokens", ddt.config.num_tokens), ("num_codes", ddt.config.codebook_size)):
            if config[key] != value:
                raise ValueError(f"{config_file} says {key} = {config[key]}, the DDT tokenizer at {ddt_dir} {value}")

        vocab = MultimodalVocab.from_pretrained(lm_dir)
        lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True, dtype=dtype)
        model = cls(
            lm,
            vocab,
            ddt,
            order,
            max_text_tokens=int(config.get("max_text_tokens", DEFAULT_MAX_TEXT_TOKENS)),
            decode_steps=int(config.get("decode_steps", DEFAULT_DECODE_STEPS)),
            edit_format=config.get("edit_format", "direct"),  # exports before the option are direct
        )
        return model.to(device)

    def to(self, device: str | torch.device) -> DDTLlama:
        self.lm.to(device)
        self.ddt.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def resolution(self) -> int:
        """Image size in pixels the DDT tokenizer encodes and decodes."""
        return self.ddt.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.span.num_tokens

    def __repr__(self) -> str:
        return (
            f"DDTLlama({type(self.lm).__name__}, {self.vocab!r}, T = {self.num_tokens}, {self.resolution} px, "
            f"token order {self.order.to_dict()})"
        )

    @property
    def reads_back_edits(self) -> bool:
        """Whether `edit` takes `candidates` > 1: a chain model's edits are drawings of its rewrites, read back
        against them; the other formats have no caption stating their target."""
        return self.edit_format == "chain"

    # ------------------------------------------------------------------------------------------------ prompts
    def _text(self, texts: Sequence[str]) -> list[list[int]]:
        return self.vocab.encode_text(texts, self.max_text_tokens)

    def _visual_rows(self, codes: torch.Tensor, generator: torch.Generator | None) -> list[list[int]]:
        """Codes (B, T) in DDT's order -> visual ids in the trained token order, one list per row."""
        ordered, _ = self.order.apply(codes, generator)  # a random order draws a permutation, as in training
        return self.vocab.visual_id(ordered).tolist()

    def text_to_image_prompts(self, captions: Sequence[str] | None) -> list[list[int]]:
        """`<bos> caption <boi>` per caption; None gives the one null prompt `<bos> <null> <boi>`."""
        ids = self.vocab.ids
        if captions is None:
            return [prompt_of(text_to_image(ids, None, []))]
        return [prompt_of(text_to_image(ids, text, [])) for text in self._text(captions)]

    def caption_prompts(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> list[list[int]]:
        """`<bos> <boi> v.. <eoi>` per image of codes (B, T) in DDT's order."""
        return self._caption_prompts(self._visual_rows(codes, generator))

    def _caption_prompts(self, rows: list[list[int]]) -> list[list[int]]:
        """`<bos> <boi> v.. <eoi>` per row of visual ids, already in the trained token order."""
        return [prompt_of(image_to_text(self.vocab.ids, row, [])) for row in rows]

    def edit_prompts(
        self, codes: torch.Tensor, instructions: Sequence[str] | None, generator: torch.Generator | None = None
    ) -> list[list[int]]:
        """`<bos> <boi> src.. <eoi> instruction <boi>` per source (B, T); instructions None: `<null>` for each.
        caption_first: `<bos> <boi> src.. <eoi> instruction <eos>` (the LM writes the target's caption next); the
        null prompt is the same in both formats."""
        rows = self._visual_rows(codes, generator)
        texts = self._text(instructions) if instructions is not None else [None] * len(rows)
        caption = [] if self.edit_format == "caption_first" else None
        return [prompt_of(edit(self.vocab.ids, row, text, [], caption)) for row, text in zip(rows, texts)]

    def rewrite_prompts(self, captions: Sequence[str], instructions: Sequence[str]) -> list[list[int]]:
        """`<bos> caption <eos> instruction <eos>` per (caption, instruction): the chain edit's middle step."""
        pairs = zip(self._text(captions), self._text(instructions))
        return [prompt_of(rewrite(self.vocab.ids, caption, text, [])) for caption, text in pairs]

    @torch.inference_mode()
    def rewrite(
        self,
        captions: Sequence[str],
        instructions: Sequence[str],
        batch_size: int = 32,
        sources: torch.Tensor | None = None,
        source_weight: float = DEFAULT_REWRITE_SOURCE_WEIGHT,
    ) -> list[str]:
        """A scene's caption rewritten under an edit instruction, in words (chain models, whose LM learned the
        `rewrite` task), by beam search.

        An instruction always changes the scene, so the unchanged caption is never a rewrite; yet copying is what
        the LM does best, and beam search ranks the copy first for 13 % of held-out true captions (the main job's
        export; most of them recolourings): skipping it lifts the rewrites from 0.516 to 0.547 exact (README,
        "Editing through words"). Without `sources` (or with `source_weight` 0) the rewrite is the most likely beam
        that changes the caption. With the source images' DDT codes `sources` (B, T), it is the changing beam c'
        maximising log p(c' | caption, instruction) + source_weight * log p(source | c') (the first of equals):
        the LM's text-to-image direction prefers, among the rewrites the instruction allows, the one that keeps
        the rest of the source - the misses of the plain rewrite are attributes copied from the wrong clause,
        which make the source unlikely (README, "Rewrites checked against the source")."""
        if len(captions) != len(instructions):
            raise ValueError(f"{len(captions)} captions but {len(instructions)} instructions")
        source_weight = float(source_weight)
        if not source_weight >= 0.0:  # also NaN
            raise ValueError(f"source_weight must be >= 0 (0: the likeliest changing beam), got {source_weight}")
        if sources is not None and (sources.ndim != 2 or sources.shape[0] != len(captions)):
            raise ValueError(
                f"sources must be DDT codes (B, T) for the {len(captions)} captions, got {tuple(sources.shape)}"
            )
        check = sources is not None and source_weight > 0
        per = DEFAULT_CAPTION_BEAMS if check else 2  # the copy is at most one beam: two always hold a change
        texts: list[list[int]] = []
        for part in _chunks(len(captions), batch_size):
            source_texts = self._text(captions[part])
            prompts = self.rewrite_prompts(captions[part], instructions[part])
            beams = self._continue_with_text(prompts, stop_id=self.vocab.ids.eos, num_return_sequences=per)
            copies = torch.tensor([beam == source_texts[i // per] for i, beam in enumerate(beams)])
            if check:
                ids, images = self.vocab.ids, self._visual_rows(sources[part], None)
                prompt_texts = [(source_texts[i], t) for i, t in enumerate(self._text(instructions[part]))]
                forward = [rewrite(ids, *prompt_texts[i // per], beam) for i, beam in enumerate(beams)]
                backward = [
                    text_to_image(ids, beam[: self.max_text_tokens], images[i // per]) for i, beam in enumerate(beams)
                ]
                score = self._channel_scores(forward, backward, source_weight)
            else:  # beam search's own order
                score = -torch.arange(len(beams), dtype=torch.float32)
            score = score.masked_fill(copies, -float("inf")).view(-1, per)
            texts += [beams[row * per + int(j)] for row, j in enumerate(score.argmax(1).tolist())]
        return self.vocab.decode_text(texts)

    # -------------------------------------------------------------------------------------------------- codes
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, r, r):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, {r}, {r}) tensor (the DDT tokenizer's size), got {shape}")
        if images.is_floating_point() and images.numel() and float(images.abs().max()) > 1.0 + 1e-3:
            raise ValueError("images must be in [-1, 1] (ddt_lightning.data.images.uint8_to_tensor)")
        return images.to(self.device, torch.float32)

    def _check_sampling(self) -> None:
        if self.order.is_random:
            raise ValueError(
                "this model was trained with token_order shuffle = random: its generated codes cannot be put back "
                "into DDT's order (the permutation is never seen), so it cannot generate images; use a timestep, "
                "reversed or fixed-shuffle model"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> DDT codes (B, T) in DDT's own order."""
        return self.ddt.encode(self._check_images(images))

    def decode(
        self,
        codes: torch.Tensor,
        steps: int | None = None,
        guidance: float = DEFAULT_DECODE_GUIDANCE,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDT codes (B, T) in DDT's order -> images (B, 3, R, R) in [-1, 1] (the DDT decoder's Euler sampler)."""
        return self.ddt.decode(
            codes.to(self.device), steps=steps or self.decode_steps, guidance=guidance, generator=generator
        )

    def reconstruct(
        self,
        images: torch.Tensor,
        steps: int | None = None,
        guidance: float = DEFAULT_DECODE_GUIDANCE,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """encode -> decode: the best an LM that emits the right codes can draw (evaluation ceilings)."""
        return self.decode(self.encode(images), steps, guidance, generator)

    def generate_codes(
        self,
        cond: list[list[int]],
        uncond: list[list[int]] | None,
        guidance: float = 3.0,
        temperature: float = DEFAULT_IMAGE_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One image span per prompt (each ending with `<boi>`): codes (B, T) put back into DDT's order."""
        self._check_sampling()
        ordered = generate_image_tokens(
            self.lm,
            cond,
            uncond if float(guidance) != 1.0 else None,
            self.span,
            guidance=guidance,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )  # (B, T) codes in the LM's order
        return self.order.invert(ordered)  # (B, T) in DDT's order, for the decoder

    # ------------------------------------------------------------------------------------------------- tasks
    @torch.inference_mode()
    def text_to_image(
        self,
        prompts: Sequence[str],
        guidance: float = 3.0,
        temperature: float = DEFAULT_IMAGE_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        decode_steps: int | None = None,
        decode_guidance: float = DEFAULT_DECODE_GUIDANCE,
        generator: torch.Generator | None = None,
        batch_size: int = 16,
        progress: bool = False,
        candidates: int = DEFAULT_DRAW_CANDIDATES,
    ) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] for captions, with guidance `s` against the null prompt (s = 1: none).

        With `candidates` N > 1, each prompt is drawn N times and the image kept maximises log p(prompt <eos> |
        the drawing's DDT codes) + log p(codes | prompt): the LM reads its drawing back as a caption (the drawing
        encoded again, so what the decoder drew is checked, not only what the LM asked for), and scores the codes
        it asked for - the noisy-channel check the captions get, turned around. It costs N drawings and two
        forward passes per drawing."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("text_to_image needs at least one prompt")
        if not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
        self._check_sampling()
        null = self.text_to_image_prompts(None)
        images = []
        for part in _bar(_chunks(len(prompts), batch_size), "text-to-image", progress):
            cond = [row for row in self.text_to_image_prompts(prompts[part]) for _ in range(candidates)]
            codes = self.generate_codes(cond, null, guidance, temperature, top_k, top_p, generator)
            drawn = self.decode(codes, decode_steps, decode_guidance, generator)  # (b * N, 3, R, R)
            images.append(drawn if candidates == 1 else self._read_back_best(prompts[part], codes, drawn, candidates))
        return torch.cat(images)  # (B, 3, R, R)

    def _read_back_best(
        self, prompts: Sequence[str], codes: torch.Tensor, drawn: torch.Tensor, per_prompt: int
    ) -> torch.Tensor:
        """Of each prompt's `per_prompt` drawings (consecutive rows of `codes` and `drawn`), the one maximising
        log p(prompt <eos> | the drawing's codes, encoded again) + log p(codes | prompt) (the first of equals)."""
        ids, texts = self.vocab.ids, self._text(prompts)
        reread = self._visual_rows(self.ddt.encode(drawn), None)
        asked = self._visual_rows(codes, None)
        forward = [image_to_text(ids, row, texts[i // per_prompt]) for i, row in enumerate(reread)]
        backward = [text_to_image(ids, texts[i // per_prompt], row) for i, row in enumerate(asked)]
        return drawn[self._channel_best(forward, backward, 1.0, per_prompt).to(drawn.device)]

    @torch.inference_mode()
    def caption(
        self,
        images: torch.Tensor,
        max_new_tokens: int = DEFAULT_MAX_TEXT_TOKENS,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 32,
        progress: bool = False,
        num_beams: int = DEFAULT_CAPTION_BEAMS,
        rerank: float = DEFAULT_CAPTION_RERANK,
    ) -> list[str]:
        """A caption per image (B, 3, R, R) in [-1, 1]: beam search over `num_beams` hypotheses (1: greedy), or
        sampling with `do_sample` (beam sampling with `num_beams` > 1). Only text ids can be emitted.

        With `rerank` > 0 and more than one beam, the caption is the hypothesis c of the `num_beams` returned that
        maximises log p(c | image) + rerank * log p(image | c): the LM scores how well each caption would draw the
        image's tokens, a check that beam search alone (which reads only the first term) cannot make. It costs one
        forward pass per hypothesis."""
        images = self._check_images(images)
        captions: list[str] = []
        for part in _bar(_chunks(images.shape[0], batch_size), "captions", progress):
            codes = self.ddt.encode(images[part])
            captions += self.caption_codes(
                codes, max_new_tokens, do_sample, temperature, top_k, top_p, generator, num_beams, rerank
            )
        return captions

    @torch.inference_mode()
    def caption_codes(
        self,
        codes: torch.Tensor,
        max_new_tokens: int = DEFAULT_MAX_TEXT_TOKENS,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        num_beams: int = DEFAULT_CAPTION_BEAMS,
        rerank: float = DEFAULT_CAPTION_RERANK,
    ) -> list[str]:
        """`caption` from DDT codes (B, T) in DDT's order (pre-tokenized images), in one batch."""
        rerank = float(rerank)
        if not rerank >= 0.0:  # also NaN
            raise ValueError(f"rerank must be >= 0 (0: beam search's own choice), got {rerank}")
        ids = self.vocab.ids
        # Every id from <v0> to the end of the logits is visual or padding; the specials are not text either.
        non_text = range(self.vocab.visual_offset, self.logits_width)
        specials = (ids.boi, ids.eoi, ids.null, ids.pad, ids.bos)
        rows = self._visual_rows(codes, generator)  # the image's ids, as its caption prompt and its t2i target
        prompts = self._caption_prompts(rows)
        returned = num_beams if rerank > 0 and num_beams > 1 else 1
        seeded = do_sample and generator is not None
        with torch.random.fork_rng(devices=[], enabled=seeded):
            if seeded:  # model.generate draws from the global RNG: seed it from `generator`, then restore it
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            texts = generate_text(
                self.lm,
                prompts,
                ids.eos,
                max_new_tokens,
                non_text,
                forbid_ids=specials,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_beams=num_beams,
                num_return_sequences=returned,
            )
        if returned > 1:
            texts = self._rerank_captions(rows, texts, returned, rerank)
        return self.vocab.decode_text(texts)

    def _rerank_captions(
        self, images: list[list[int]], hypotheses: list[list[int]], per_image: int, weight: float
    ) -> list[list[int]]:
        """The hypothesis c of each image v maximising log p(c <eos> | v) + weight * log p(v | c); `hypotheses` holds
        `per_image` rows per image, best beam first (which wins ties). Both terms are the LM's own likelihoods of
        its training formats (image-to-text and text-to-image), scored in padded batches."""
        ids = self.vocab.ids
        # The t2i prompt holds the caption as training did: cut to max_text_tokens (a longer one is scored cut).
        captions = [row[: self.max_text_tokens] for row in hypotheses]
        forward = [image_to_text(ids, images[i // per_image], c) for i, c in enumerate(hypotheses)]
        backward = [text_to_image(ids, c, images[i // per_image]) for i, c in enumerate(captions)]
        return [hypotheses[i] for i in self._channel_best(forward, backward, weight, per_image).tolist()]

    def _channel_scores(self, forward: list[Example], backward: list[Example], weight: float) -> torch.Tensor:
        """The LM's log-likelihood of each `forward` sequence + `weight` x that of its `backward` one: (N,) on the
        CPU (the noisy-channel score of Yee et al. 2019)."""
        score = sequence_log_likelihood(self.lm, forward, self.vocab.ids.pad)
        return score + weight * sequence_log_likelihood(self.lm, backward, self.vocab.ids.pad)

    def _channel_best(
        self, forward: list[Example], backward: list[Example], weight: float, per_group: int
    ) -> torch.Tensor:
        """Noisy-channel choice shared by the captions' and the drawings' checks: of each group of `per_group`
        consecutive candidates, the row index maximising `_channel_scores` (the first of equals): (groups,) long
        on the CPU."""
        score = self._channel_scores(forward, backward, weight)  # (groups * per_group,)
        groups = score.numel() // per_group
        return score.view(groups, per_group).argmax(1) + torch.arange(groups) * per_group  # argmax: first of equals

    @torch.inference_mode()
    def edit(
        self,
        images: torch.Tensor,
        instructions: str | Sequence[str],
        guidance: float = 3.0,
        temperature: float = DEFAULT_IMAGE_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        decode_steps: int | None = None,
        decode_guidance: float = DEFAULT_DECODE_GUIDANCE,
        generator: torch.Generator | None = None,
        batch_size: int = 16,
        progress: bool = False,
        candidates: int | None = None,
        rewrite_source_weight: float = DEFAULT_REWRITE_SOURCE_WEIGHT,
    ) -> torch.Tensor:
        """Edited images (B, 3, R, R) in [-1, 1] of sources (B, 3, R, R) and instructions (one, or one per image);
        guidance `s` on the instruction (the null prompt keeps the source and drops the instruction).

        A `chain` model edits through words: it captions each source (`caption`'s defaults: reranked beams), rewrites
        the caption under the instruction (`rewrite`) and draws the rewrite (`text_to_image`: guidance `s`
        against the null prompt, `candidates` drawings read back against the rewrite; None: DEFAULT_DRAW_CANDIDATES);
        `edit_captions` gives the rewrites; `rewrite_source_weight` is the rewrite's check against the source
        (`rewrite`'s `source_weight`; 0: none). The other formats draw once (no caption states their target: None or
        1) and have no rewrite."""
        images = self._check_images(images)
        b = images.shape[0]
        instructions = [instructions] * b if isinstance(instructions, str) else list(instructions)
        if len(instructions) != b:
            raise ValueError(f"{len(instructions)} instructions for {b} images (give one, or one per image)")
        if candidates is None:
            candidates = DEFAULT_DRAW_CANDIDATES if self.reads_back_edits else 1
        if candidates != 1 and not self.reads_back_edits:
            raise ValueError(
                f"candidates {candidates}: only a chain model reads its edits back (against its rewrite); this one "
                f"edits {self.edit_format} - pass candidates=1"
            )
        self._check_sampling()
        out = []
        for part in _bar(_chunks(b, batch_size), "edits", progress):
            sources = self.ddt.encode(images[part])  # (b, T) in DDT's order
            if self.edit_format == "chain":
                captions = self.caption_codes(sources, generator=generator)
                targets = self.rewrite(
                    captions, instructions[part], sources=sources, source_weight=rewrite_source_weight
                )
                drawn = self.text_to_image(
                    targets,
                    guidance=guidance,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    decode_steps=decode_steps,
                    decode_guidance=decode_guidance,
                    generator=generator,
                    batch_size=len(targets),
                    candidates=candidates,
                )
                out.append(drawn)
                continue
            cond = self.edit_prompts(sources, instructions[part], generator)
            if self.edit_format == "caption_first":  # the target's caption first (beam search), then its image
                captions = self._continue_with_text(cond, stop_id=self.vocab.ids.boi)
                cond = [prompt + caption + [self.vocab.ids.boi] for prompt, caption in zip(cond, captions)]
            uncond = self.edit_prompts(sources, None, generator) if float(guidance) != 1.0 else None
            codes = self.generate_codes(cond, uncond, guidance, temperature, top_k, top_p, generator)
            out.append(self.decode(codes, decode_steps, decode_guidance, generator))
        return torch.cat(out)  # (B, 3, R, R)

    def edit_captions(
        self,
        images: torch.Tensor,
        instructions: str | Sequence[str],
        batch_size: int = 32,
        rewrite_source_weight: float = DEFAULT_REWRITE_SOURCE_WEIGHT,
    ) -> list[str]:
        """caption_first and chain models: the caption each edit writes for its target before drawing it (beam
        search), to see whether a failed edit misread the scene or the instruction, or drew the right caption wrong."""
        if self.edit_format not in ("caption_first", "chain"):
            raise ValueError(f"edit_captions needs a caption_first or chain model; this one edits {self.edit_format}")
        images = self._check_images(images)
        instructions = [instructions] * images.shape[0] if isinstance(instructions, str) else list(instructions)
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{len(instructions)} instructions for {images.shape[0]} images")
        if self.edit_format == "chain":
            captions: list[str] = []
            sources = self.ddt.encode(images)  # once: the captions and the rewrite's check read the same codes
            for part in _chunks(images.shape[0], batch_size):
                captions += self.caption_codes(sources[part])
            return self.rewrite(captions, instructions, batch_size, sources, rewrite_source_weight)
        written: list[list[int]] = []
        for part in _chunks(images.shape[0], batch_size):
            prompts = self.edit_prompts(self.ddt.encode(images[part]), instructions[part])
            written += self._continue_with_text(prompts, stop_id=self.vocab.ids.boi)
        return self.vocab.decode_text(written)

    @torch.inference_mode()
    def _continue_with_text(
        self, prompts: list[list[int]], stop_id: int, num_return_sequences: int = 1
    ) -> list[list[int]]:
        """Text ids continuing each prompt until `stop_id` (excluded), by beam search; no visual or special ids.
        `num_return_sequences` > 1: that many best beams per prompt, prompt after prompt."""
        ids = self.vocab.ids
        specials = tuple(i for i in (ids.boi, ids.eoi, ids.null, ids.pad, ids.bos, ids.eos) if i != stop_id)
        return generate_text(
            self.lm,
            prompts,
            stop_id,
            self.max_text_tokens,
            range(self.vocab.visual_offset, self.logits_width),
            forbid_ids=specials,
            num_beams=DEFAULT_CAPTION_BEAMS,
            num_return_sequences=num_return_sequences,
        )
