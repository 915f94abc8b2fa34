"""LightningModules: thin wiring of losses, optimisation and logging around the pure-PyTorch models.

`MLLMModule` is exported lazily: it pulls in transformers, which the tokenizer stage does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ddt_lightning.modules.tokenizer import TokenizerModule

if TYPE_CHECKING:
    from ddt_lightning.modules.mllm import MLLMModule

__all__ = ["MLLMModule", "TokenizerModule"]


def __getattr__(name: str) -> Any:
    if name == "MLLMModule":
        from ddt_lightning.modules.mllm import MLLMModule

        return MLLMModule
    raise AttributeError(f"module 'ddt_lightning.modules' has no attribute {name!r}")
