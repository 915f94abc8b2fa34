"""LightningModules: thin wiring of losses, optimisation and logging around the pure-PyTorch models."""

from ddt_lightning.modules.tokenizer import TokenizerModule

__all__ = ["TokenizerModule"]
