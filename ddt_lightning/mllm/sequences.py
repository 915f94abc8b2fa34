"""DDT-LLaMA training sequences: the formats, their loss masks, the task mix and the visual token order.

design.md section 2; DDT-LLaMA (DDT paper, arXiv 2504.14666, section 4). With `v = visual_offset + code`:

    t2i    <bos> caption <boi> v_1 .. v_T <eoi>                      labels: v_1 .. v_T <eoi>
    i2t    <bos> <boi> v_1 .. v_T <eoi> caption <eos>                labels: caption <eos>
    edit   <bos> <boi> src.. <eoi> instruction <boi> tgt.. <eoi>     labels: tgt.. <eoi>
    class  t2i with the class name as the caption (ImageNet-style data)

and, with `EDIT_FORMATS` "caption_first" (ours), an edit that first states the edited scene in words, then draws it:

    edit   <bos> <boi> src.. <eoi> instruction <eos> target-caption <boi> tgt.. <eoi>
                                                  labels: target-caption <boi> tgt.. <eoi>

and a text-only task for the "chain" edit format (ours), which edits through words in three steps of one LM -
caption the source (i2t), rewrite its caption under the instruction (rewrite), draw the result (t2i):

    rewrite  <bos> caption <eos> instruction <eos> target-caption <eos>     labels: target-caption <eos>

Labels are the input ids inside the loss span and -100 elsewhere (Hugging Face convention: the model shifts them,
so position i's logits are scored against labels[i + 1]). Null-prompt dropout (for classifier-free guidance) turns
the caption of t2i and class, and the instruction of edit, into the single token `<null>`; the null prompt of
generation is therefore `<bos> <null> <boi>` (and `<bos> <boi> src <eoi> <null> <boi>` for instruction guidance
of edits, as InstructPix2Pix drops its text condition - ours). Batches are right-padded with `<pad>` for training.

`TokenOrder` is the one place where the order of the T visual tokens changes (the paper's language test: ordered
vs shuffled tokens): `apply` before codes enter a sequence, `invert` on generated codes before DDT decoding.

Pure PyTorch and Python; no tokenizer object (ids come in a `SpecialIds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

TASKS: tuple[str, ...] = ("t2i", "i2t", "edit", "class", "rewrite")
# "direct": the target image right after the instruction; "caption_first": the target's caption, then its image
# (an edit becomes captioning + text-to-image in one sequence: both of which the LM learns from the other tasks too);
# "chain": no edit sequence at all - the source's caption (i2t), its rewrite (rewrite), its drawing (t2i).
EDIT_FORMATS: tuple[str, ...] = ("direct", "caption_first", "chain")
NULL_TASKS: frozenset[str] = frozenset({"t2i", "edit", "class"})  # tasks whose text condition may be dropped
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    """The ids the formats need; `MultimodalVocab.ids` builds it. Visual ids are `[visual_offset, visual_end)`."""

    pad: int
    bos: int
    eos: int
    null: int
    boi: int
    eoi: int
    visual_offset: int
    num_codes: int  # K

    def __post_init__(self) -> None:
        specials = [self.pad, self.bos, self.eos, self.null, self.boi, self.eoi]
        if len(set(specials)) != len(specials):
            raise ValueError(f"special ids must be distinct, got {self}")
        if any(i >= self.visual_offset for i in specials):
            raise ValueError(f"special ids must lie below visual_offset={self.visual_offset}, got {self}")

    @property
    def visual_end(self) -> int:
        return self.visual_offset + self.num_codes


# ----------------------------------------------------------------------------------------------------- formats
Example = tuple[list[int], list[int]]  # (input_ids, labels) of one sequence


def _masked(ids: Sequence[int]) -> list[int]:
    return [IGNORE_INDEX] * len(ids)


def text_to_image(ids: SpecialIds, caption: Sequence[int] | None, image: Sequence[int]) -> Example:
    """`<bos> caption <boi> v.. <eoi>`, loss on `v.. <eoi>`; caption None -> the null prompt `<null>`."""
    prefix = [ids.bos, *(caption if caption is not None else [ids.null]), ids.boi]
    span = [*image, ids.eoi]
    return prefix + span, _masked(prefix) + span


def class_conditional(ids: SpecialIds, class_name: Sequence[int] | None, image: Sequence[int]) -> Example:
    """Class-conditional generation is text-to-image with the class name as the caption."""
    return text_to_image(ids, class_name, image)


def image_to_text(ids: SpecialIds, image: Sequence[int], caption: Sequence[int]) -> Example:
    """`<bos> <boi> v.. <eoi> caption <eos>`, loss on `caption <eos>`."""
    prefix = [ids.bos, ids.boi, *image, ids.eoi]
    span = [*caption, ids.eos]
    return prefix + span, _masked(prefix) + span


def edit(
    ids: SpecialIds,
    source: Sequence[int],
    instruction: Sequence[int] | None,
    target: Sequence[int],
    target_caption: Sequence[int] | None = None,
) -> Example:
    """`<bos> <boi> src.. <eoi> instruction <boi> tgt.. <eoi>`, loss on `tgt.. <eoi>`; instruction None -> `<null>`.

    With `target_caption` (the caption_first format): `<bos> <boi> src.. <eoi> instruction <eos> target_caption <boi>
    tgt.. <eoi>`, loss on `target_caption <boi> tgt.. <eoi>`. A null instruction drops the caption too: the null
    prompt of guidance stays `<bos> <boi> src <eoi> <null> <boi>` in both formats.
    """
    if instruction is not None and target_caption is not None:
        prefix = [ids.bos, ids.boi, *source, ids.eoi, *instruction, ids.eos]
        span = [*target_caption, ids.boi, *target, ids.eoi]
        return prefix + span, _masked(prefix) + span
    text = instruction if instruction is not None else [ids.null]
    prefix = [ids.bos, ids.boi, *source, ids.eoi, *text, ids.boi]
    span = [*target, ids.eoi]
    return prefix + span, _masked(prefix) + span


def rewrite(
    ids: SpecialIds, caption: Sequence[int], instruction: Sequence[int], target_caption: Sequence[int]
) -> Example:
    """`<bos> caption <eos> instruction <eos> target_caption <eos>`, loss on `target_caption <eos>`: the edit of a
    scene's caption under an instruction, in words alone (the "chain" edit format's middle step)."""
    prefix = [ids.bos, *caption, ids.eos, *instruction, ids.eos]
    span = [*target_caption, ids.eos]
    return prefix + span, _masked(prefix) + span


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX outside the loss spans and on padding
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    task: torch.Tensor  # (B,) long, index into TASKS

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> SequenceBatch:
        """The rows `index` (1-D long), cut to their longest sequence (exact for right padding: only pads go)."""
        mask = self.attention_mask[index]  # (b, L)
        length = int(mask.sum(1).max()) if len(index) else 0
        return SequenceBatch(
            self.input_ids[index, :length], self.labels[index, :length], mask[:, :length], self.task[index]
        )

    def length_groups(self, groups: int = 2) -> list[SequenceBatch]:
        """Split a right-padded batch into at most `groups` batches of rows of similar length, so that short
        sequences (text-to-image, captions) are not padded to the long ones (edits hold two image spans): fewer
        padded tokens go through the LM, and the summed token loss is unchanged. Rows are sorted by length and cut
        where the padded area is least (exhaustively for 2 groups, greedily halving the worst group beyond)."""
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        lengths = self.attention_mask.sum(1)  # (B,)
        order = torch.argsort(lengths, stable=True)
        parts = [order]
        while len(parts) < groups:
            # Split the part whose best cut saves the most padded tokens; stop when no cut saves any.
            best = None
            for i, part in enumerate(parts):
                sorted_lengths = lengths[part].tolist()
                n, whole = len(sorted_lengths), len(sorted_lengths) * sorted_lengths[-1]
                for cut in range(1, n):
                    saved = whole - (cut * sorted_lengths[cut - 1] + (n - cut) * sorted_lengths[-1])
                    if saved > 0 and (best is None or saved > best[0]):
                        best = (saved, i, cut)
            if best is None:
                break
            _, i, cut = best
            parts[i : i + 1] = [parts[i][:cut], parts[i][cut:]]
        return [self.rows(part) for part in parts]


def pad_batch(
    examples: Sequence[Example], tasks: Sequence[str], pad_id: int, side: Literal["right", "left"] = "right"
) -> SequenceBatch:
    """Stack examples into a batch padded to the longest (right padding for training)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    length = max(len(inp) for inp, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    for row, (inp, lab) in enumerate(examples):
        cols = slice(0, len(inp)) if side == "right" else slice(length - len(inp), length)
        input_ids[row, cols] = torch.tensor(inp, dtype=torch.long)
        labels[row, cols] = torch.tensor(lab, dtype=torch.long)
        mask[row, cols] = 1
    task = torch.tensor([TASKS.index(t) for t in tasks], dtype=torch.long)  # (B,)
    return SequenceBatch(input_ids, labels, mask, task)


def build_batch(
    ids: SpecialIds,
    tasks: Sequence[str],
    images: torch.Tensor,
    texts: Sequence[Sequence[int]],
    null: Sequence[bool] | None = None,
    edit_targets: torch.Tensor | None = None,
    edit_captions: Sequence[Sequence[int] | None] | None = None,
    instructions: Sequence[Sequence[int] | None] | None = None,
) -> SequenceBatch:
    """One sequence per row in its task's format, right-padded.

    Args:
        images: (B, T) visual ids (codes already put in the configured `TokenOrder` and offset by visual_offset).
        texts: per row, the text token ids of its task: the caption (t2i, i2t, rewrite), the class name (class) or
            the edit instruction (edit).
        null: per row, replace the text condition by `<null>` (ignored for i2t, whose text is the target).
        edit_targets: (B, T) visual ids of the edited images; required when a row's task is edit.
        edit_captions: per row, the text ids of the edited image's caption (the caption_first edit format, and
            the rewrite task's target), or None for the direct format.
        instructions: per row, the edit instruction's text ids of a rewrite row (None elsewhere).
    """
    b = len(tasks)
    if images.shape[0] != b or len(texts) != b:
        raise ValueError(f"{b} tasks but {images.shape[0]} images and {len(texts)} texts")
    for name, given in (("edit captions", edit_captions), ("instructions", instructions)):
        if given is not None and len(given) != b:
            raise ValueError(f"{b} tasks but {len(given)} {name}")
    null = [False] * b if null is None else list(null)
    image_rows = images.tolist()  # one host copy per batch; the formats are list operations
    target_rows = edit_targets.tolist() if edit_targets is not None else None
    examples = []
    for row, task in enumerate(tasks):
        text = None if null[row] and task in NULL_TASKS else texts[row]
        if task == "t2i":
            examples.append(text_to_image(ids, text, image_rows[row]))
        elif task == "class":
            examples.append(class_conditional(ids, text, image_rows[row]))
        elif task == "i2t":
            examples.append(image_to_text(ids, image_rows[row], texts[row]))
        elif task == "edit":
            if target_rows is None:
                raise ValueError("an edit sequence needs edit_targets (the edited images' visual ids)")
            caption = edit_captions[row] if edit_captions is not None else None
            examples.append(edit(ids, image_rows[row], text, target_rows[row], caption))
        elif task == "rewrite":
            target = edit_captions[row] if edit_captions is not None else None
            instruction = instructions[row] if instructions is not None else None
            if target is None or instruction is None:
                raise ValueError("a rewrite sequence needs its row's instruction and edit caption (the target)")
            examples.append(rewrite(ids, texts[row], instruction, target))
        else:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return pad_batch(examples, tasks, ids.pad)


# ---------------------------------------------------------------------------------------------------- task mix
class TaskMix:
    """Which format each training sequence takes, drawn per sample from `ratios` (normalised) with a generator."""

    def __init__(self, ratios: Mapping[str, float]) -> None:
        if not ratios:
            raise ValueError(f"tasks: give at least one ratio, e.g. {{'t2i': 1.0}}; tasks are {TASKS}")
        for name, value in ratios.items():
            if name not in TASKS:
                raise ValueError(f"tasks[{name!r}]: unknown task; choose from {TASKS}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"tasks[{name!r}]: the ratio must be a non-negative number, got {value!r}")
        total = float(sum(ratios.values()))
        if not total > 0:
            raise ValueError(f"tasks: the ratios must sum to more than 0, got {dict(ratios)}")
        self.ratios = {name: float(ratios[name]) / total for name in TASKS if ratios.get(name, 0) > 0}
        self.active: tuple[str, ...] = tuple(self.ratios)
        self._probs = torch.tensor([self.ratios[name] for name in self.active], dtype=torch.float64)

    def draw(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n task names, i.i.d. with the normalised ratios (a CPU generator keeps this off the device)."""
        if len(self.active) == 1:
            return [self.active[0]] * n
        index = torch.multinomial(self._probs, n, replacement=True, generator=generator)  # (n,)
        return [self.active[i] for i in index.tolist()]

    def __repr__(self) -> str:
        return f"TaskMix({self.ratios})"


def null_prompts(tasks: Sequence[str], p: float, generator: torch.Generator | None = None) -> list[bool]:
    """Null-prompt dropout: True where the text condition is replaced by `<null>` (probability p, conditioned
    tasks only). One uniform is drawn per row whatever its task, so the stream does not depend on the mix."""
    if not 0 <= p < 1:
        raise ValueError(f"p_null must be in [0, 1), got {p}")
    u = torch.rand(len(tasks), generator=generator).tolist()
    return [task in NULL_TASKS and x < p for task, x in zip(tasks, u)]


# ------------------------------------------------------------------------------------------------- token order
@dataclass(frozen=True)
class TokenOrder:
    """Order of the T visual tokens inside a sequence (the paper's ordered-vs-shuffled language test).

    - `timestep`: DDT's own order (token j is first needed at diffusion time j / T; coarse to fine);
    - `reversed`: fine to coarse;
    - `shuffled` with `shuffle: fixed`: one permutation drawn from `seed`, the same for every image (and invertible
      at generation); `shuffle: random`: a new permutation per sequence (a language test only: generated codes
      cannot be put back without the permutation, which the model never sees).
    """

    mode: Literal["timestep", "reversed", "shuffled"] = "timestep"
    shuffle: Literal["fixed", "random"] = "fixed"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("timestep", "reversed", "shuffled"):
            raise ValueError(f"token_order.mode must be timestep, reversed or shuffled, got {self.mode!r}")
        if self.shuffle not in ("fixed", "random"):
            raise ValueError(f"token_order.shuffle must be fixed or random, got {self.shuffle!r}")

    @property
    def is_random(self) -> bool:
        return self.mode == "shuffled" and self.shuffle == "random"

    def fixed_permutation(self, num_tokens: int) -> torch.Tensor:
        """(T,) positions: ordered[i] = codes[perm[i]] (not defined for the random shuffle)."""
        if self.is_random:
            raise ValueError("token_order.shuffle = random has no fixed permutation")
        if self.mode == "timestep":
            return torch.arange(num_tokens)
        if self.mode == "reversed":
            return torch.arange(num_tokens - 1, -1, -1)
        return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(self.seed))

    def permutation(self, batch: int, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T) positions for a batch; the random shuffle draws one permutation per row from `generator`."""
        if self.is_random:
            return torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)  # (B, T)
        return self.fixed_permutation(num_tokens).expand(batch, num_tokens)  # (B, T)

    def apply(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, T) in DDT's order -> (ordered (B, T), the permutation (B, T) that `invert` takes)."""
        perm = self.permutation(codes.shape[0], codes.shape[1], generator).to(codes.device)  # (B, T)
        return codes.gather(1, perm), perm

    def invert(self, ordered: torch.Tensor, permutation: torch.Tensor | None = None) -> torch.Tensor:
        """ordered (B, T) (e.g. generated codes) -> codes in DDT's order for the decoder."""
        if permutation is None:
            if self.is_random:
                raise ValueError("token_order.shuffle = random: invert needs the permutation returned by apply")
            permutation = self.fixed_permutation(ordered.shape[1]).expand_as(ordered)
        codes = torch.empty_like(ordered)
        return codes.scatter_(1, permutation.to(ordered.device), ordered)  # codes[perm[i]] = ordered[i]

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "shuffle": self.shuffle, "seed": self.seed}
