"""LightningModule that trains DDT-LLaMA (design.md section 2; DDT paper, arXiv 2504.14666, section 4).

It only wires: batch -> DDT codes (a frozen `DDTTokenizer` on the fly, or pre-tokenized `codes`) -> the configured
`TokenOrder` (applied here, once) -> sequences of the drawn tasks (`sequences.py`) -> next-token loss of a Hugging
Face causal LM (`lm.py`) over the multimodal vocabulary (`vocab.py`).

Lifecycle: `setup()` gets the text tokenizer (loaded from `text_tokenizer_path`, or trained on the DataModule's
captions, deterministic and cached) and the DDT tokenizer; `configure_model()` builds the LM (idempotent), so a
sharding strategy (FSDP2) can wrap it. Checkpoints carry the multimodal vocabulary's files and hash (a resumed run
gets the exact id space back) next to the LM and optimizer state; the DDT tokenizer is not a submodule, so it is
neither in `state_dict` nor in the optimizer.

Batch fields read: `image` (B, 3, H, W) in [-1, 1] (on the fly) or `codes` (B, T) long in DDT's own order
(pretokenized); `caption: list[str]` (t2i, i2t); `label` (B,) with `class_names` (class); `edit_instruction:
list[str]` and `edit_target` (B, 3, H, W) or `edit_target_codes` (B, T) (edit).

Metrics: `train/loss` (the objective: mean over label tokens as Hugging Face's loss, visual labels weighted by
`image_loss_weight`), `train/loss_<task>`, `train/loss_image`;
validation runs every active task on every sample (no null dropout) and logs `val/loss`, `val/loss_<task>`,
`val/loss_image` (per visual token, `<eoi>` excluded) and `val/perplexity_text` = exp of the mean NLL of the i2t
text span (caption tokens and `<eos>`).

Export (`save_pretrained(dir)`):

    dir/lm/            AutoModelForCausalLM.from_pretrained + AutoTokenizer.from_pretrained (offline)
        config.json, generation_config.json, model.safetensors      the LM
        tokenizer.json, tokenizer_config.json, ddt_vocab.json        the multimodal vocabulary and its id layout
        ddt_llm.json                                                 token order, T, K: what sampling needs
    dir/ddt_tokenizer/ the frozen DDT tokenizer (DDTTokenizer.save_pretrained), written by the export step that
                       owns it, not by this module
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from ddt_lightning.data.world import CaptionParts, split_caption
from ddt_lightning.mllm.lm import LMConfig, build_causal_lm
from ddt_lightning.mllm.sequences import (
    EDIT_FORMATS,
    IGNORE_INDEX,
    TASKS,
    SequenceBatch,
    TaskMix,
    TokenOrder,
    build_batch,
    null_prompts,
)
from ddt_lightning.mllm.vocab import VOCAB_FILE, MultimodalVocab, load_text_tokenizer, train_text_tokenizer
from ddt_lightning.modules.optim import adamw_warmup_cosine
from ddt_lightning.tokenizer import CONFIG_NAME, DDTTokenizer, check_data_resolution

# The typed config objects in `hyper_parameters` may be unpickled by `torch.load(weights_only=True)` (Lightning's
# default for `fit(ckpt_path=...)`, and the CLI's hyperparameter read of `--ckpt_path`).
torch.serialization.add_safe_globals([LMConfig, TokenOrder])

DEFAULT_TEXT_CACHE = "~/.cache/ddt_lightning/text_tokenizers"
LM_FOLDER = "lm"
DDT_TOKENIZER_FOLDER = "ddt_tokenizer"
EXPORT_CONFIG = "ddt_llm.json"
CHECKPOINT_KEY = "mllm_vocab"
# Batch fields each task needs (besides the image or its codes).
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "t2i": ("caption",),
    "i2t": ("caption",),
    "class": ("label",),
    "edit": ("edit_instruction",),
    "rewrite": ("caption", "edit_instruction", "edit_caption"),
}


class TokenNLL(Metric):
    """Sums of token NLLs and token counts per key, summed across ranks: exact token-weighted means."""

    full_state_update = False

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names
        self.add_state("nll", torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, count: torch.Tensor) -> None:  # (K,), (K,)
        self.nll += nll.double()
        self.count += count.double()

    def compute(self) -> dict[str, float]:
        means = (self.nll / self.count.clamp(min=1)).tolist()
        return {k: m for k, m, c in zip(self.names, means, self.count.tolist()) if c > 0}


def next_positions(x: torch.Tensor, fill: int | bool) -> torch.Tensor:
    """(B, L) -> (B, L): position i holds x[:, i + 1] (what its logits predict), the last position `fill`."""
    return F.pad(x[:, 1:], (0, 1), value=fill)


class MLLMModule(L.LightningModule):
    def __init__(
        self,
        lm: LMConfig | None = None,
        pretrained: str | None = None,
        tokens: Literal["on_the_fly", "pretokenized"] = "on_the_fly",
        tokenizer_path: str | None = None,
        num_codes: int | None = None,
        num_tokens: int | None = None,
        text_tokenizer_path: str | None = None,
        text_vocab_size: int = 512,
        text_min_frequency: int = 2,
        text_tokenizer_cache: str | None = DEFAULT_TEXT_CACHE,
        max_text_tokens: int = 64,
        pad_vocab_to_multiple_of: int = 64,
        tasks: dict[str, float] | None = None,
        p_null: float = 0.1,
        token_order: TokenOrder | None = None,
        class_names: list[str] | None = None,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        grad_clip_norm: float | None = 1.0,
        length_groups: int = 2,
        image_loss_weight: float = 1.0,
        condition_image_loss: float = 0.0,
        condition_text_loss: float = 0.0,
        visual_embedding_init: Literal["random", "codebook"] = "random",
        edit_format: Literal["direct", "caption_first", "chain"] = "direct",
        shuffle_phrases: float = 0.0,
        rewrite_in_place: bool = False,
        seed: int = 0,
    ) -> None:
        """
        Args:
            lm: the Llama to build from scratch (default: the `tiny` preset); exclusive with `pretrained`.
            pretrained: a local Hugging Face causal-LM folder to start from (its tokenizer: `text_tokenizer_path`).
            tokens: `on_the_fly` encodes `image` with the frozen DDT tokenizer at `tokenizer_path`; `pretokenized`
                reads `codes` (B, T) from the batch.
            tokenizer_path: a DDT tokenizer export (`DDTTokenizer.save_pretrained`); gives K and T.
            num_codes, num_tokens: K and T when there is no `tokenizer_path` (pretokenized); checked against it if
                both are given.
            text_tokenizer_path: a local Hugging Face tokenizer (or a saved multimodal vocabulary) to use instead
                of training a byte-level BPE with `text_vocab_size` ids on the DataModule's captions.
            text_tokenizer_cache: where trained text tokenizers are kept, keyed by a hash of the captions and
                settings (None: train at every setup).
            max_text_tokens: captions and instructions are cut to this many tokens.
            pad_vocab_to_multiple_of: the LM's vocabulary is rounded up to a multiple of this (1: no padding).
            tasks: task -> ratio of training sequences, over `t2i`, `i2t`, `edit`, `class` (default t2i only).
            p_null: null-prompt dropout of the text condition of t2i, class and edit (guidance).
            token_order: order of the visual tokens in sequences (`mode`, `shuffle`, `seed`).
            class_names: label -> name for the class task (else the DataModule's `class_names`).
            length_groups: a training batch goes through the LM in at most this many groups of rows of similar
                length (`SequenceBatch.length_groups`; 1: one padded pass). Same loss, fewer padded tokens.
            image_loss_weight: weight of the visual-token labels in the training objective, the text labels (and
                `<eoi>`) weighing 1 (Emu3 weighs vision tokens 0.5): the objective is the weighted mean NLL. With
                32 visual labels per image against a caption's ~20 text labels, a weight below 1 gives captioning
                a larger share of the gradient without changing the task mix. Logged NLLs stay unweighted.
            condition_image_loss: weight in the training objective of the visual tokens of the *condition* images
                (the image of image-to-text, the source of an edit), which the formats leave unscored (0: as the
                formats say). Their logits are computed anyway, so a weight > 0 adds unconditional image modelling
                at no extra cost (logged as `train/loss_condition_image`; validation and test NLLs leave it out).
            condition_text_loss: the same for the text conditions (the caption of text-to-image and class, the edit
                instruction): unconditional text modelling (`train/loss_condition_text`).
            visual_embedding_init: `random` (the LM's own init) or `codebook`: the rows of the K visual ids, in the
                input embedding and the output head, start as the DDT codebook's vectors through a fixed random
                orthonormal map to the LM's width (norms matched to the LM's init), so codes that are close in the
                tokenizer start close in the LM. Needs `tokenizer_path`; a checkpoint's weights override it.
            edit_format: `direct` (the target image right after the instruction) or `caption_first`: the LM first
                writes the edited scene's caption, then draws it (`mllm.sequences.edit`); needs the batch field
                `edit_caption` (the world's edits carry it). `chain`: the exported model edits through words -
                it captions the source, rewrites the caption under the instruction (the `rewrite` task, which
                `tasks` must then hold) and draws the rewrite; `edit` rows, if any, train the direct format.
            shuffle_phrases: probability that a training t2i row's caption names its objects in a random order
                (`world.split_caption`; captions of the built-in world's grammar only). The world's captions list
                objects in reading order, so an LM may take an object's quadrant from its place in the list instead
                of from its words - and then cannot draw a caption in any other order (README, "Clause order").
            rewrite_in_place: a training rewrite row's target keeps the source caption's object order, the
                changed object's phrase where its old phrase was (recolour, resize, move), instead of the edited
                scene's reading order: the rewrite becomes a copy with one phrase replaced (removals and additions
                are unchanged). Needs t2i that draws captions in any order (`shuffle_phrases`).
        """
        super().__init__()
        self.save_hyperparameters()
        if lm is not None and pretrained is not None:
            raise ValueError("model.init_args.lm and model.init_args.pretrained are exclusive: set one of them")
        if tokens not in ("on_the_fly", "pretokenized"):
            raise ValueError(f"tokens must be on_the_fly or pretokenized, got {tokens!r}")
        if not 0 <= p_null < 1:
            raise ValueError(f"p_null must be in [0, 1), got {p_null}")
        if length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        if not image_loss_weight > 0:
            raise ValueError(f"image_loss_weight must be > 0, got {image_loss_weight}")
        if not condition_image_loss >= 0:
            raise ValueError(f"condition_image_loss must be >= 0, got {condition_image_loss}")
        if not condition_text_loss >= 0:
            raise ValueError(f"condition_text_loss must be >= 0, got {condition_text_loss}")
        if not 0 <= shuffle_phrases <= 1:
            raise ValueError(f"shuffle_phrases must be in [0, 1], got {shuffle_phrases}")
        if visual_embedding_init not in ("random", "codebook"):
            raise ValueError(f"visual_embedding_init must be random or codebook, got {visual_embedding_init!r}")
        if edit_format not in EDIT_FORMATS:
            raise ValueError(f"edit_format must be one of {EDIT_FORMATS}, got {edit_format!r}")
        if visual_embedding_init == "codebook" and tokenizer_path is None:
            raise ValueError("visual_embedding_init = codebook needs model.init_args.tokenizer_path (the codebook)")
        self.lm_config = None if pretrained is not None else (lm or LMConfig())
        self.mix = TaskMix(tasks or {"t2i": 1.0})
        if edit_format == "chain" and not {"i2t", "rewrite", "t2i"} <= set(self.mix.active):
            raise ValueError(
                "edit_format chain edits by captioning (i2t), rewriting the caption (rewrite) and drawing it (t2i): "
                f"model.init_args.tasks needs a ratio > 0 for each, got {dict(tasks or {})}"
            )
        self.order = token_order or TokenOrder()
        self.num_codes, self.num_tokens, self.image_size = self._image_token_shape()
        self.vocab: MultimodalVocab | None = None  # set by setup(), or by on_load_checkpoint()
        self.lm: torch.nn.Module | None = None  # built by configure_model()
        self.ddt: DDTTokenizer | None = None  # frozen, loaded by frozen_ddt(); not a registered submodule
        self.class_names = list(class_names) if class_names is not None else None
        keys = ["loss", "loss_image", *[f"loss_{task}" for task in self.mix.active]]
        self.val_nll = TokenNLL(keys)
        self.test_nll = TokenNLL(keys)

    def _image_token_shape(self) -> tuple[int, int, int | None]:
        """(K, T, image size) from the DDT tokenizer's config, or from num_codes / num_tokens."""
        hp = self.hparams
        if hp.tokenizer_path is None:
            if hp.tokens == "on_the_fly":
                raise ValueError("tokens = on_the_fly needs model.init_args.tokenizer_path (a DDT tokenizer export)")
            for key in ("num_codes", "num_tokens"):
                if hp[key] is None:
                    raise ValueError(f"model.init_args.{key} is required with pretokenized codes and no tokenizer_path")
            return hp.num_codes, hp.num_tokens, None
        config_file = Path(hp.tokenizer_path).expanduser() / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"tokenizer_path: no DDT tokenizer export at {hp.tokenizer_path} ({CONFIG_NAME})")
        config = json.loads(config_file.read_text())
        found = {"num_codes": config["codebook_size"], "num_tokens": config["num_tokens"]}
        for key, value in found.items():
            if hp[key] is not None and hp[key] != value:
                raise ValueError(f"model.init_args.{key} = {hp[key]}, but the DDT tokenizer's config says {value}")
        return found["num_codes"], found["num_tokens"], config["image_size"]

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.tokens == "on_the_fly":
            where = f"the DDT tokenizer at {self.hparams.tokenizer_path}"
            check_data_resolution(datamodule, self.image_size, where, "set data.init_args.resolution")
        if self.class_names is None and datamodule is not None:
            names = getattr(datamodule, "class_names", None) or getattr(datamodule, "classes", None)
            self.class_names = list(names) if names else None
        if "class" in self.mix.active and not self.class_names:
            raise ValueError("the class task needs model.init_args.class_names (or a DataModule with class_names)")
        if self.vocab is None:
            self.vocab = self._make_vocab(datamodule)
        if self.hparams.tokens == "on_the_fly":
            self.frozen_ddt()

    def frozen_ddt(self) -> DDTTokenizer:
        """The frozen DDT tokenizer of `tokenizer_path`, loaded once, on the module's device (encoding on the fly,
        and decoding for `GenerationSamples`). It stays out of the state_dict and the optimizer."""
        if self.ddt is None:
            if self.hparams.tokenizer_path is None:
                raise ValueError("no DDT tokenizer to load: set model.init_args.tokenizer_path (an export)")
            ddt = DDTTokenizer.from_pretrained(Path(self.hparams.tokenizer_path).expanduser())
            object.__setattr__(self, "ddt", ddt.requires_grad_(False).eval())
        if next(self.ddt.parameters()).device != self.device:
            self.ddt.to(self.device)
        return self.ddt

    def _make_vocab(self, datamodule: Any = None) -> MultimodalVocab:
        hp = self.hparams
        if hp.text_tokenizer_path is not None:
            path = Path(hp.text_tokenizer_path).expanduser()
            if (path / VOCAB_FILE).is_file():  # an exported multimodal vocabulary: reuse its id layout as is
                vocab = MultimodalVocab.from_pretrained(path)
                if vocab.num_codes != self.num_codes:
                    raise ValueError(
                        f"text_tokenizer_path {path}: {vocab.num_codes} visual codes, not {self.num_codes}"
                    )
                return vocab
            text_tokenizer = load_text_tokenizer(path)
        else:
            text_tokenizer = self._trained_text_tokenizer(self._training_texts(datamodule))
        return MultimodalVocab(text_tokenizer, self.num_codes, hp.pad_vocab_to_multiple_of)

    def _training_texts(self, datamodule: Any) -> list[str]:
        """What the BPE is trained on: `datamodule.train_texts()` if it has one, else the world's train captions
        (and edit instructions); plus the class names."""
        texts: list[str] = []
        datasets = getattr(datamodule, "datasets", None)
        train = datasets.get("train") if isinstance(datasets, dict) else None
        if hasattr(datamodule, "train_texts"):
            texts = list(datamodule.train_texts())
        elif hasattr(train, "captions"):
            texts = list(train.captions)
            texts += list(getattr(getattr(train, "edits", None), "instructions", None) or [])
        texts += list(self.class_names or [])
        if not texts:
            raise ValueError(
                "no captions to train the text tokenizer on: set model.init_args.text_tokenizer_path, or use a "
                "DataModule with train_texts() (or datasets['train'].captions)"
            )
        return texts

    def _trained_text_tokenizer(self, texts: list[str]):
        """Train the BPE, or load it from the cache (keyed by the texts and settings; written atomically)."""
        hp = self.hparams
        if hp.text_tokenizer_cache is None:
            return train_text_tokenizer(texts, hp.text_vocab_size, hp.text_min_frequency)
        settings = {"vocab_size": hp.text_vocab_size, "min_frequency": hp.text_min_frequency, "version": 1}
        digest = hashlib.sha256(json.dumps([settings, texts]).encode()).hexdigest()[:16]
        path = Path(hp.text_tokenizer_cache).expanduser() / f"bpe-{hp.text_vocab_size}-{digest}"
        if not (path / "tokenizer.json").is_file():
            tokenizer = train_text_tokenizer(texts, hp.text_vocab_size, hp.text_min_frequency)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
            tokenizer.save_pretrained(str(tmp))
            try:
                os.replace(tmp, path)  # atomic: other ranks see a complete folder or none
            except OSError:  # another rank wrote it first (same texts -> same tokenizer)
                shutil.rmtree(tmp, ignore_errors=True)
        return load_text_tokenizer(path)

    def configure_model(self) -> None:
        """Build the LM over the multimodal vocabulary (once). Without a vocabulary yet (`load_from_checkpoint`
        calls this before `on_load_checkpoint`), wait for the checkpoint's."""
        if self.lm is not None:
            return
        if self.vocab is None:
            if self.hparams.text_tokenizer_path is None:
                return
            self.vocab = self._make_vocab()
        self.lm = build_causal_lm(self.vocab.vocab_size, self.vocab.ids, self.lm_config, self.hparams.pretrained)
        if self.hparams.visual_embedding_init == "codebook":
            self._init_visual_rows_from_codebook()

    @torch.no_grad()
    def _init_visual_rows_from_codebook(self) -> None:
        """Visual rows of the input embedding and the output head := codebook (K, m) @ Q (m, H), Q with orthonormal
        rows (inner products of codes are kept), rescaled to the mean row norm of the LM's own init of those rows."""
        codebook = self.frozen_ddt().quantizer.lookup(torch.arange(self.num_codes, device=self.device)).float()
        generator = torch.Generator().manual_seed(self.hparams.seed)
        for layer in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()):
            rows = layer.weight[self.vocab.visual_offset : self.vocab.visual_end]  # (K, H) view
            width = rows.shape[1]
            if codebook.shape[1] > width:
                raise ValueError(f"codebook dim {codebook.shape[1]} exceeds the LM's width {width}")
            q, _ = torch.linalg.qr(torch.randn(width, codebook.shape[1], generator=generator))  # (H, m) orthonormal
            mapped = codebook @ q.T.to(codebook.device)  # (K, H)
            scale = rows.norm(dim=1).mean() / mapped.norm(dim=1).mean().clamp(min=1e-12)
            rows.copy_((mapped * scale).to(rows.dtype))

    # ------------------------------------------------------------------------------------------- sequences
    def _codes(self, batch: dict, with_targets: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DDT codes (B, T) of the images (and of the edit targets), in DDT's own order."""
        if self.hparams.tokens == "pretokenized":
            keys = ("codes", "edit_target_codes") if with_targets else ("codes",)
            missing = [key for key in keys if key not in batch]
            if missing:
                raise ValueError(f"tokens = pretokenized: the batch has no {missing} (it has {sorted(batch)})")
            codes, targets = batch["codes"], batch.get("edit_target_codes") if with_targets else None
        else:
            if with_targets and "edit_target" not in batch:
                raise ValueError(f"the edit task needs the batch field 'edit_target' (it has {sorted(batch)})")
            images = torch.cat([batch["image"], batch["edit_target"]]) if with_targets else batch["image"]
            both = self.frozen_ddt().encode(images)  # (B or 2B, T), no grad
            codes, targets = both.chunk(2) if with_targets else (both, None)
        if codes.shape[1] != self.num_tokens:
            raise ValueError(f"got {codes.shape[1]} codes per image, expected T = {self.num_tokens}")
        return codes, targets

    def _fields(self, task: str) -> tuple[str, ...]:
        caption_first = task == "edit" and self._caption_first
        return (*TASK_FIELDS[task], "edit_caption") if caption_first else TASK_FIELDS[task]

    def _texts(self, batch: dict, tasks: list[str]) -> list[list[int]]:
        """Per row, the text ids its task conditions on or predicts."""
        for task in sorted(set(tasks)):
            missing = [key for key in self._fields(task) if key not in batch]
            if missing:
                raise ValueError(
                    f"task {task!r} (model.init_args.tasks) needs batch fields {missing}, got {list(batch)}"
                )
        labels = batch["label"].tolist() if "class" in tasks else None
        texts = []
        for row, task in enumerate(tasks):
            if task == "class":
                if not 0 <= labels[row] < len(self.class_names):
                    raise ValueError(f"label {labels[row]} has no class name ({len(self.class_names)} class_names)")
                texts.append(self.class_names[labels[row]])
            else:
                texts.append(batch["edit_instruction" if task == "edit" else "caption"][row])
        return self.vocab.encode_text(texts, self.hparams.max_text_tokens)

    def sequences(
        self, batch: dict, tasks: list[str], null: list[bool] | None, generator: torch.Generator
    ) -> SequenceBatch:
        """The batch as sequences of the given tasks (design.md section 2), on the module's device."""
        if self.training:
            batch = self._phrase_orders(batch, tasks, generator)
        codes, targets = self._codes(batch, with_targets="edit" in tasks)
        b = codes.shape[0]
        both = codes if targets is None else torch.cat([codes, targets])  # (B or 2B, T)
        # The one place the token order is applied (its inverse belongs to sampling, before DDT decoding).
        ordered, _ = self.order.apply(both, generator)
        visual = self.vocab.visual_id(ordered)  # (B or 2B, T) vocabulary ids
        texts = self._texts(batch, tasks)
        edit_targets = visual[b:] if targets is not None else None
        # The edited scene's caption: the target of rewrite rows, and the first target of caption_first edits.
        caption_rows = [r for r, t in enumerate(tasks) if t == "rewrite" or (t == "edit" and self._caption_first)]
        edit_captions = self._row_texts(batch, "edit_caption", caption_rows, b) if caption_rows else None
        rewrite_rows = [row for row, task in enumerate(tasks) if task == "rewrite"]
        instructions = self._row_texts(batch, "edit_instruction", rewrite_rows, b) if rewrite_rows else None
        return build_batch(
            self.vocab.ids, tasks, visual[:b], texts, null, edit_targets, edit_captions, instructions
        ).to(self.device)

    def _phrase_orders(self, batch: dict, tasks: list[str], generator: torch.Generator) -> dict:
        """`shuffle_phrases` and `rewrite_in_place` on a training batch (a shallow copy; the data is untouched).
        Draws from the step's generator, so a resumed run shuffles as the uninterrupted one."""
        p, in_place = self.hparams.shuffle_phrases, self.hparams.rewrite_in_place
        if not (p > 0 and "t2i" in tasks) and not (in_place and "rewrite" in tasks):
            return batch
        batch = dict(batch)
        if p > 0:
            draws = torch.rand(len(tasks), generator=generator, device=generator.device).tolist()
            captions = list(batch["caption"])
            for row, task in enumerate(tasks):
                if task == "t2i" and draws[row] < p:
                    parts = _world_caption(captions[row], "shuffle_phrases")
                    order = torch.randperm(len(parts.phrases), generator=generator, device=generator.device)
                    captions[row] = parts.with_phrases([parts.phrases[i] for i in order.tolist()]).text()
            batch["caption"] = captions
        if in_place and "rewrite" in tasks:
            targets = list(batch["edit_caption"])
            for row, task in enumerate(tasks):
                if task == "rewrite":
                    targets[row] = in_place_target(batch["caption"][row], targets[row])
            batch["edit_caption"] = targets
        return batch

    @property
    def _caption_first(self) -> bool:
        return self.hparams.edit_format == "caption_first"

    def _row_texts(self, batch: dict, key: str, rows: list[int], b: int) -> list[list[int] | None]:
        """The encoded text of batch[key] on `rows`, None on the other rows of the b."""
        out: list[list[int] | None] = [None] * b
        for row, ids in zip(rows, self.vocab.encode_text([batch[key][r] for r in rows], self.hparams.max_text_tokens)):
            out[row] = ids
        return out

    def token_nll(self, seq: SequenceBatch, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL (B, L) of the next token and its mask (B, L); Hugging Face's loss is their ratio.
        `labels` (B, L) replaces `seq.labels` (e.g. with the condition images scored too)."""
        logits = self.lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits  # (B, L, V)
        labels = seq.labels if labels is None else labels
        targets = next_positions(labels, IGNORE_INDEX)  # (B, L): position i predicts token i + 1
        nll = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)  # (B, L), 0 where ignored
        return nll, targets != IGNORE_INDEX

    def _breakdown(self, seq: SequenceBatch, nll: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{key: (NLL sum, token count)} per task and for visual-token labels, without host syncs."""
        targets = next_positions(seq.labels, IGNORE_INDEX)  # (B, L)
        image = (targets >= self.vocab.visual_offset) & (targets < self.vocab.visual_end)  # (B, L)
        parts = {"loss": mask, "loss_image": image}
        for task in self.mix.active:
            parts[f"loss_{task}"] = mask & (seq.task == TASKS.index(task))[:, None]  # (B, L)
        return {key: torch.stack([(nll * m).sum(), m.sum()]) for key, m in parts.items()}

    def condition_images(self, seq: SequenceBatch) -> torch.Tensor:
        """(B, L) bool: the visual tokens of the condition images, i.e. the first image span of the image-to-text
        and edit rows (in every other format the first span is the scored target)."""
        ids = seq.input_ids
        visual = (ids >= self.vocab.visual_offset) & (ids < self.vocab.visual_end)
        first_span = (ids == self.vocab.ids.eoi).cumsum(1) == 0  # up to the first <eoi>
        rows = (seq.task == TASKS.index("i2t")) | (seq.task == TASKS.index("edit"))  # (B,)
        return visual & first_span & rows[:, None]

    def condition_text(self, seq: SequenceBatch) -> torch.Tensor:
        """(B, L) bool: the text tokens no format scores (the caption of text-to-image and class, the instruction
        of an edit); special tokens (`<null>`, `<boi>`, ...) are not text."""
        ids, special = seq.input_ids, self.vocab.ids
        specials = torch.tensor([special.pad, special.bos, special.eos, special.null, special.boi, special.eoi])
        text = (ids < self.vocab.visual_offset) & ~torch.isin(ids, specials.to(ids.device))
        return text & (seq.labels == IGNORE_INDEX) & (seq.attention_mask > 0)

    def _label_weights(self, seq: SequenceBatch, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) weight of each label in the objective: `image_loss_weight` on visual ids, 1 on other labels."""
        weight = mask.float()
        if self.hparams.image_loss_weight != 1.0:
            targets = next_positions(seq.labels, IGNORE_INDEX)  # (B, L)
            image = (targets >= self.vocab.visual_offset) & (targets < self.vocab.visual_end)
            weight = weight * torch.where(image, self.hparams.image_loss_weight, 1.0)
        return weight

    # --------------------------------------------------------------------------------------------- training
    def _step_generator(self) -> torch.Generator:
        # Tasks, null prompts and random token orders are a function of (seed, step, rank) alone (CPU generator:
        # no device sync), so a resumed run draws exactly what the uninterrupted run drew.
        seed = (self.hparams.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank
        return torch.Generator().manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        b = len(batch["codes"] if self.hparams.tokens == "pretokenized" else batch["image"])
        if "num_skipped" in batch:
            self.log("data/skipped", batch["num_skipped"].float(), reduce_fx="sum", batch_size=max(b, 1))
        if b == 0:  # every item of the batch was unreadable (counted above)
            return None
        generator = self._step_generator()
        tasks = self.mix.draw(b, generator)
        null = null_prompts(tasks, self.hparams.p_null, generator)
        seq = self.sequences(batch, tasks, null, generator)
        parts: dict[str, torch.Tensor] = {}
        objective = torch.zeros(2, device=self.device)  # weighted NLL sum, weight sum
        # One LM pass per group of similar lengths: the same summed loss as one padded pass, on fewer tokens.
        weights = {"image": self.hparams.condition_image_loss, "text": self.hparams.condition_text_loss}
        find = {"image": self.condition_images, "text": self.condition_text}
        for group in seq.length_groups(self.hparams.length_groups):
            # The condition tokens scored too (condition_*_loss > 0), by kind: (b, l) each.
            conditions = {kind: find[kind](group) for kind, w in weights.items() if w > 0}
            labels = group.labels
            if conditions:
                labels = torch.where(torch.stack(list(conditions.values())).any(0), group.input_ids, labels)
            nll, mask = self.token_nll(group, labels)
            weight = torch.zeros_like(nll)
            for kind, condition in conditions.items():
                condition = next_positions(condition, False)  # aligned with the next-token NLL
                mask = mask & ~condition
                weight = weight + weights[kind] * condition
                key = f"loss_condition_{kind}"
                total = torch.stack([(nll * condition).sum(), condition.sum()])
                parts[key] = parts[key] + total if key in parts else total
            weight = weight + self._label_weights(group, mask)
            for key, value in self._breakdown(group, nll, mask).items():
                parts[key] = parts[key] + value if key in parts else value
            objective = objective + torch.stack([(nll * weight).sum(), weight.sum()])
        loss = objective[0] / objective[1].clamp(min=1e-12)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        rows = {key: tasks.count(key.removeprefix("loss_")) for key in parts}  # known on the host: no sync
        rows["loss_image"] = b - tasks.count("i2t") - tasks.count("rewrite")  # the others score an image span
        rows["loss_condition_image"] = tasks.count("i2t") + tasks.count("edit")
        rows["loss_condition_text"] = b - tasks.count("i2t")
        for key, (total, count) in parts.items():
            if key != "loss" and rows[key]:
                self.log(f"train/{key}", total / count.clamp(min=1), batch_size=rows[key])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.lm.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)  # matrices and embeddings vs norms
        return adamw_warmup_cosine(decay, no_decay, hp, self.trainer.estimated_stepping_batches)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.hparams.grad_clip_norm if gradient_clip_val is None else gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ----------------------------------------------------------------------------------- validation / test
    def _eval_step(self, metric: TokenNLL, batch: dict, batch_idx: int) -> None:
        b = len(batch["codes"] if self.hparams.tokens == "pretokenized" else batch["image"])
        if b == 0:
            return
        totals: dict[str, torch.Tensor] = {}
        for index, task in enumerate(self.mix.active):  # every active task on every sample, conditional
            generator = torch.Generator().manual_seed((self.hparams.seed * 100_003 + batch_idx) * 7 + index)
            seq = self.sequences(batch, [task] * b, None, generator)
            nll, mask = self.token_nll(seq)
            for key, value in self._breakdown(seq, nll, mask).items():
                totals[key] = totals.get(key, 0) + value
        stacked = torch.stack([totals[key] for key in metric.names])  # (keys, 2): NLL sum, token count
        metric.update(stacked[:, 0], stacked[:, 1])

    def _log_eval(self, metric: TokenNLL, stage: str) -> dict[str, float]:
        results = metric.compute()
        metric.reset()
        if "loss_i2t" in results:
            results["perplexity_text"] = math.exp(min(results["loss_i2t"], 50.0))
        for key, value in results.items():
            self.log(f"{stage}/{key}", value, sync_dist=False)  # the metric already summed across ranks
        return results

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(self.val_nll, batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.last_val_results = self._log_eval(self.val_nll, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(self.test_nll, batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.last_test_results = self._log_eval(self.test_nll, "test")

    # ------------------------------------------------------------------------------------------ persistence
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"files": self.vocab.to_files(), "sha256": self.vocab.fingerprint()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError(f"not a DDT-LLaMA checkpoint: no {CHECKPOINT_KEY!r} entry")
        if self.vocab is None or self.vocab.fingerprint() != saved["sha256"]:
            vocab = MultimodalVocab.from_files(saved["files"])  # the checkpoint's id space is the one trained
            if self.lm is not None and vocab.vocab_size != self.vocab.vocab_size:
                raise ValueError(
                    f"the checkpoint's vocabulary has {vocab.vocab_size} ids, the model built here "
                    f"{self.vocab.vocab_size}: resume with the text tokenizer the run started with"
                )
            self.vocab = vocab
        self.configure_model()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `directory/lm/` (LM + multimodal tokenizer + `ddt_llm.json`) and, when `tokenizer_path` is set,
        a copy of the DDT tokenizer in `directory/ddt_tokenizer/`: one folder to hand over. Returns `lm/`."""
        if self.lm is None or self.vocab is None:
            raise RuntimeError("nothing to export: the LM has not been built (run setup and configure_model)")
        folder = Path(directory) / LM_FOLDER
        self.lm.save_pretrained(str(folder))
        self.vocab.save_pretrained(folder)
        config = {
            "format": "ddt-llm/1",
            "num_tokens": self.num_tokens,
            "num_codes": self.num_codes,
            "token_order": self.order.to_dict(),
            "edit_format": self.hparams.edit_format,
            "tasks": self.mix.ratios,
            "p_null": self.hparams.p_null,
            "max_text_tokens": self.hparams.max_text_tokens,
            "ddt_tokenizer": f"../{DDT_TOKENIZER_FOLDER}",
        }
        (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
        source = self.hparams.tokenizer_path
        if source:
            target = Path(directory) / DDT_TOKENIZER_FOLDER
            if Path(source).expanduser().resolve() != target.resolve():
                shutil.copytree(Path(source).expanduser(), target, dirs_exist_ok=True)
        return folder


def _world_caption(text: str, option: str) -> CaptionParts:
    try:
        return split_caption(text)
    except ValueError as error:
        raise ValueError(
            f"model.init_args.{option} reorders the objects of captions of the built-in world's grammar: {error}"
        ) from None


def in_place_target(source: str, target: str) -> str:
    """The rewrite target `target` (the edited scene's caption) with its objects in `source`'s order: when the edit
    replaced one object phrase by another (recolour, resize, move), the new phrase takes the old one's place in the
    source's list; otherwise (removal, addition) `target` is returned as it is. Both must be captions of the world's
    grammar; the target's template is kept."""
    src, tgt = _world_caption(source, "rewrite_in_place"), _world_caption(target, "rewrite_in_place")
    removed = [p for p in src.phrases if p not in tgt.phrases]
    added = [p for p in tgt.phrases if p not in src.phrases]
    if len(removed) != 1 or len(added) != 1 or len(src.phrases) != len(tgt.phrases):
        return target
    return tgt.with_phrases([added[0] if p == removed[0] else p for p in src.phrases]).text()
