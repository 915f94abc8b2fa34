"""The DDT-LLaMA vocabulary: text tokens, special tokens and K visual codes in one id space.

design.md section 2; DDT-LLaMA (DDT paper, arXiv 2504.14666, section 4): the LM's vocabulary is extended by the K
visual codes and `<boi>`, `<eoi>`; visual id = `visual_offset` + code.

Id layout of a text tokenizer trained here (`train_text_tokenizer`, byte-level BPE with `tokenizers`):

    0 <pad>   1 <bos>   2 <eos>   3 <null>   4 <boi>   5 <eoi>       special tokens
    6 .. 261                                                       the 256 byte-level base symbols
    262 .. visual_offset - 1                                       BPE merges (text_vocab_size ids in all at most)
    visual_offset + c, c in [0, K)                                 `<v{c}>`, one added special token per code
    [visual_offset + K, vocab_size)                                padding of the LM's embedding to a multiple of 64
                                                                   (ours, for matmul efficiency): never a label,
                                                                   never a valid sample

A tokenizer loaded from a local path (e.g. LLaMA-3's) keeps its own ids and its own bos/eos/pad when it has them;
the missing special tokens and then the K visual tokens are appended after its last id.

The visual codes are added to the Hugging Face tokenizer as special tokens, so the saved folder alone covers the
LM's vocabulary: `AutoTokenizer.from_pretrained(dir)` decodes `<v17>`, `tok.boi_token_id` etc. work, and
`skip_special_tokens=True` drops image spans from decoded text. Measured here for K = 65,536 (2 cores):
adding them 0.3 s, saving 0.4-0.6 s, `tokenizer.json` 12 MB, `AutoTokenizer.from_pretrained` 2.7-5.4 s (transformers
deep-copies every added token), text encoding speed unchanged. `ddt_vocab.json` beside it records the layout.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ddt_lightning.mllm.sequences import SpecialIds

# Named special tokens: Hugging Face's own names for pad/bos/eos, model-specific `*_token` names for the others
# (saved in tokenizer_config.json, so a reloaded tokenizer has `boi_token_id`, `eoi_token_id`, `null_token_id`).
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "null_token": "<null>",
    "boi_token": "<boi>",
    "eoi_token": "<eoi>",
}
VISUAL_TOKEN = "<v{}>"
VOCAB_FILE = "ddt_vocab.json"
VOCAB_FORMAT = "ddt-vocab/1"


def train_text_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on `texts` with the special tokens first (ids 0-5).

    Deterministic: the same texts in the same order give the same tokenizer, whatever the number of threads.
    Any text can be encoded (the 256 byte symbols are always in the vocabulary)."""
    base = 256 + len(SPECIAL_TOKENS)
    if vocab_size < base:
        raise ValueError(f"text_vocab_size must be >= {base} (special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a local folder (never from a hub)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text tokenizer folder {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class MultimodalVocab:
    """A text tokenizer extended by the special tokens and K visual tokens; the LM's id space.

    Build it from any text tokenizer (`MultimodalVocab(tokenizer, num_codes)`, which copies it) or reload a saved
    one (`MultimodalVocab.from_pretrained(dir)`, which checks the layout)."""

    def __init__(self, text_tokenizer: PreTrainedTokenizerBase, num_codes: int, pad_to_multiple_of: int = 64) -> None:
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_vocab_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if not getattr(text_tokenizer, "is_fast", False):
            raise TypeError(f"a fast (Rust `tokenizers`) text tokenizer is required, got {type(text_tokenizer)}")
        if text_tokenizer.convert_tokens_to_ids(VISUAL_TOKEN.format(0)) not in (None, text_tokenizer.unk_token_id):
            raise ValueError("this tokenizer already has visual tokens: load it with MultimodalVocab.from_pretrained")
        backend = Tokenizer.from_str(text_tokenizer.backend_tokenizer.to_str())  # a copy: the input is untouched
        # Keep the tokenizer's own pad/bos/eos when it has them (a pretrained LM knows its bos/eos).
        named = dict(SPECIAL_TOKENS)
        for key in ("pad_token", "bos_token", "eos_token"):
            named[key] = str(getattr(text_tokenizer, key, None) or named[key])
        missing = [token for token in named.values() if backend.token_to_id(token) is None]
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
        visual = [AddedToken(VISUAL_TOKEN.format(c), special=True, normalized=False) for c in range(num_codes)]
        backend.add_special_tokens(visual)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
        self._init(tokenizer, num_codes, pad_to_multiple_of)

    def _init(self, tokenizer: PreTrainedTokenizerBase, num_codes: int, pad_to_multiple_of: int) -> None:
        self.tokenizer = tokenizer
        self.num_codes = num_codes
        self.pad_to_multiple_of = pad_to_multiple_of
        backend = tokenizer.backend_tokenizer
        offset = backend.token_to_id(VISUAL_TOKEN.format(0))
        last = backend.token_to_id(VISUAL_TOKEN.format(num_codes - 1))
        size = backend.get_vocab_size(with_added_tokens=True)
        if offset is None or last != offset + num_codes - 1 or size != offset + num_codes:
            raise ValueError(
                f"the visual tokens must be the last {num_codes} ids, contiguous: <v0> = {offset}, "
                f"<v{num_codes - 1}> = {last}, {size} ids in all"
            )
        self.visual_offset = offset
        names = {key: getattr(tokenizer, key) for key in SPECIAL_TOKENS}
        self.ids = SpecialIds(
            **{key.removesuffix("_token"): backend.token_to_id(str(token)) for key, token in names.items()},
            visual_offset=offset,
            num_codes=num_codes,
        )
        self.vocab_size = -(-(offset + num_codes) // pad_to_multiple_of) * pad_to_multiple_of

    # ---------------------------------------------------------------------------------------------------- ids
    @property
    def visual_end(self) -> int:
        """One past the last visual id; ids in [visual_end, vocab_size) are padding."""
        return self.visual_offset + self.num_codes

    def visual_id(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in [0, K) -> vocabulary ids."""
        return codes + self.visual_offset

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Visual vocabulary ids -> codes in [0, K)."""
        return ids - self.visual_offset

    def encode_text(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Text ids without any special token (the formats add them), cut to `max_tokens`."""
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [row[:max_tokens] for row in rows] if max_tokens is not None else rows

    def decode_text(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Text of id rows; special and visual tokens are dropped."""
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def image_span(self, num_tokens: int):
        """The `generation.ImageSpan` of this vocabulary for images of `num_tokens` tokens."""
        from ddt_lightning.mllm.generation import ImageSpan

        return ImageSpan(self.ids.boi, self.ids.eoi, self.visual_offset, self.num_codes, num_tokens)

    # ------------------------------------------------------------------------------------------- persistence
    def layout(self) -> dict[str, object]:
        return {
            "format": VOCAB_FORMAT,
            "visual_offset": self.visual_offset,
            "num_codes": self.num_codes,
            "visual_token": VISUAL_TOKEN,
            "vocab_size": self.vocab_size,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "special_ids": {
                name: getattr(self.ids, name) for name in (k.removesuffix("_token") for k in SPECIAL_TOKENS)
            },
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Hugging Face tokenizer files + `ddt_vocab.json` (the layout); `AutoTokenizer` loads the folder offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        (directory / VOCAB_FILE).write_text(json.dumps(self.layout(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MultimodalVocab:
        directory = Path(directory).expanduser()
        layout_file = directory / VOCAB_FILE
        if not layout_file.is_file():
            raise FileNotFoundError(f"no multimodal vocabulary at {directory}: {VOCAB_FILE} is missing")
        layout = json.loads(layout_file.read_text())
        if layout.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{layout_file}: unknown format {layout.get('format')!r}, expected {VOCAB_FORMAT}")
        vocab = cls.__new__(cls)
        vocab._init(load_text_tokenizer(directory), int(layout["num_codes"]), int(layout["pad_to_multiple_of"]))
        if vocab.layout() != layout:
            raise ValueError(f"{layout_file} does not match the tokenizer beside it: {vocab.layout()} != {layout}")
        return vocab

    def to_files(self) -> dict[str, str]:
        """The saved folder as {file name: text} (what a checkpoint stores)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return {p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    @classmethod
    def from_files(cls, files: dict[str, str]) -> MultimodalVocab:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / Path(name).name).write_text(text)
            return cls.from_pretrained(tmp)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer (its full `tokenizer.json`) and the layout: equal iff the id spaces agree."""
        text = self.tokenizer.backend_tokenizer.to_str() + json.dumps(self.layout(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"MultimodalVocab(text ids < {self.visual_offset}, K = {self.num_codes} visual ids "
            f"[{self.visual_offset}, {self.visual_end}), vocab_size = {self.vocab_size}, {self.ids})"
        )
