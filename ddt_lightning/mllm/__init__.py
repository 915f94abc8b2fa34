"""DDT-LLaMA: the multimodal causal LM over text tokens and DDT visual codes (design.md, section 2).

- `vocab`: the text tokenizer (byte-level BPE trained here, or a local one) extended by `<boi>`, `<eoi>`, `<null>`
  and K visual tokens (`MultimodalVocab`);
- `sequences`: the four sequence formats with their loss masks, `TaskMix`, null-prompt dropout, `TokenOrder`;
- `lm`: `LMConfig` size presets and `build_causal_lm` (a Hugging Face `LlamaForCausalLM`);
- `generation`: KV-cache sampling with classifier-free guidance;
- `model`: `DDTLlama`, the export folder as a model (text-to-image, captioning, editing);
- `evaluate`: `evaluate_world`, GenEval-style, captioning and editing scores on the held-out world (section 4);
- `commands`: the `ddt generate | caption | edit | evaluate` entry points.

The exports are lazy (submodules import transformers); `ddt_lightning.modules.MLLMModule` trains the LM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddt_lightning.mllm.evaluate import evaluate_world
    from ddt_lightning.mllm.lm import LM_PRESETS, LMConfig, build_causal_lm
    from ddt_lightning.mllm.model import DDTLlama
    from ddt_lightning.mllm.sequences import TASKS, SequenceBatch, SpecialIds, TaskMix, TokenOrder, build_batch
    from ddt_lightning.mllm.vocab import MultimodalVocab, load_text_tokenizer, train_text_tokenizer

_EXPORTS = {
    "DDTLlama": "model",
    "evaluate_world": "evaluate",
    "LM_PRESETS": "lm",
    "LMConfig": "lm",
    "build_causal_lm": "lm",
    "TASKS": "sequences",
    "SequenceBatch": "sequences",
    "SpecialIds": "sequences",
    "TaskMix": "sequences",
    "TokenOrder": "sequences",
    "build_batch": "sequences",
    "MultimodalVocab": "vocab",
    "load_text_tokenizer": "vocab",
    "train_text_tokenizer": "vocab",
}
__all__ = [
    "LM_PRESETS",
    "TASKS",
    "DDTLlama",
    "LMConfig",
    "MultimodalVocab",
    "SequenceBatch",
    "SpecialIds",
    "TaskMix",
    "TokenOrder",
    "build_batch",
    "build_causal_lm",
    "evaluate_world",
    "load_text_tokenizer",
    "train_text_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ddt_lightning.mllm.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ddt_lightning.mllm' has no attribute {name!r}")
