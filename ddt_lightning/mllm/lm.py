"""The causal LM of DDT-LLaMA: a Hugging Face `LlamaForCausalLM` over the multimodal vocabulary.

design.md section 2: built from a config for small runs (size presets below, the only place they live) or loaded
with `from_pretrained(local path)` (LLaMA-3-8B, Gemma-2-2B, ...) and resized to the multimodal vocabulary.
Pure PyTorch + transformers (no Lightning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ddt_lightning.mllm.sequences import SpecialIds


@dataclass
class LMConfig:
    """A Llama built from scratch. Defaults are the `tiny` CPU preset (design.md section 6's prototype: 4 x 256,
    3.65 M parameters with a 1,050-id vocabulary)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: multi-head attention (= num_heads); fewer: grouped-query attention
    intermediate_size: int = 688  # about 8/3 x hidden, SwiGLU
    max_position_embeddings: int = 2048
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        checks = {
            "hidden_size": self.hidden_size > 0 and self.hidden_size % max(self.num_heads, 1) == 0,
            "num_layers": self.num_layers > 0,
            "num_heads": self.num_heads > 0,
            "num_kv_heads": self.num_kv_heads is None
            or (0 < self.num_kv_heads and self.num_heads % self.num_kv_heads == 0),
            "intermediate_size": self.intermediate_size > 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"LMConfig.{bad[0]}: invalid value {getattr(self, bad[0])!r} (hidden_size must be divisible by "
                f"num_heads = {self.num_heads}, num_heads by num_kv_heads)"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> LMConfig:
        if name not in LM_PRESETS:
            raise ValueError(f"unknown LM preset {name!r}; choose one of {sorted(LM_PRESETS)}")
        return dataclasses.replace(LM_PRESETS[name], **overrides)

    def llama_config(self, vocab_size: int, ids: SpecialIds) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
            attn_implementation=self.attn_implementation,
        )


LM_PRESETS: dict[str, LMConfig] = {
    "tiny": LMConfig(),  # CPU: 4 x 256, the design.md prototype
    "micro": LMConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=172),  # tests
}


def build_causal_lm(
    vocab_size: int, ids: SpecialIds, config: LMConfig | None = None, pretrained: str | Path | None = None
) -> PreTrainedModel:
    """A causal LM with `vocab_size` embedding rows: from `config`, or loaded from a local folder and resized
    (new rows initialised at the mean of the old ones, transformers' `mean_resizing`)."""
    if pretrained is None:
        cfg = config or LMConfig()
        lm = LlamaForCausalLM(cfg.llama_config(vocab_size, ids))
    else:
        path = Path(pretrained).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"pretrained: LM folder {path} does not exist")
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        old = lm.get_input_embeddings().weight.shape[0]
        if old > vocab_size:
            raise ValueError(
                f"pretrained LM at {path} has {old} embedding rows, more than the multimodal vocabulary's "
                f"{vocab_size}: its text tokenizer must be the LM's own (set text_tokenizer_path to the LM folder)"
            )
        lm.resize_token_embeddings(vocab_size, mean_resizing=True)
        lm.config.pad_token_id, lm.config.bos_token_id, lm.config.eos_token_id = ids.pad, ids.bos, ids.eos
    generation = lm.generation_config
    generation.pad_token_id, generation.bos_token_id, generation.eos_token_id = ids.pad, ids.bos, ids.eos
    return lm
