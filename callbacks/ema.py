"""An exponential moving average of the weights from a given step on (Lightning's `WeightAveraging`).

Diffusion models are sampled from an EMA of their weights (DDPM, ADM, DiT, SD3); the tokenizer's decoder is one.
Lightning's `EMAWeightAveraging` averages from step 0 and assumes the average is meaningful at every validation,
checkpoint and at the end of training. The main job averages only its decoder-only phase (the encoder and the
codebook are frozen, so the average of the codes is the codes), which that callback gets wrong before its first
update: validation would swap in the weights of step 0, checkpoints would store them as the model, and a run that
ends before the start would end on them. This subclass

- updates from optimizer step `start_step` on (the first update copies the weights, as `AveragedModel` does);
- warms the decay up, `min(decay, (1 + n) / (10 + n))` after n updates (as timm's and diffusers' EMA do), so that a
  short average is not dominated by the weights it started from (0.999 ** 1000 = 0.37);
- leaves validation, checkpoints and the end of training to the current weights until the first update;
- averages parameters only and keeps the buffers in sync (`use_buffers=False`): the quantizer's buffers hold
  integer counters and its EMA codebook, which are not weights to average;
- copies the module at the first update (or when a checkpoint holds an average), not at `setup`: callbacks are set
  up before the module's `setup` and `configure_model`, which build DDT-LLaMA's LM (Lightning's callback calls
  `configure_model` itself, too early for a module whose vocabulary comes from its `setup`), and no copy is held
  before it is needed.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel


class WeightEMA(WeightAveraging):
    """EMA of the LightningModule's parameters from optimizer step `start_step` on; evaluated, saved and exported.

    Args:
        decay: the EMA decay after warm-up (the average's half-life is ln 2 / (1 - decay) steps).
        start_step: the first optimizer step (0-based, after the step's update) whose weights enter the average.
        warmup: warm the decay up as `min(decay, (1 + n) / (10 + n))`; False: `decay` from the first update on.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA: decay must be in (0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"WeightEMA: start_step must be >= 0, got {start_step}")
        self.decay, self.start_step, self.warmup = decay, start_step, warmup
        super().__init__(use_buffers=False, multi_avg_fn=self._average)

    def decay_at(self, num_averaged: int) -> float:
        """The decay of the update that follows `num_averaged` updates."""
        return min(self.decay, (1.0 + num_averaged) / (10.0 + num_averaged)) if self.warmup else self.decay

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        """`AveragedModel`'s multi_avg_fn (one call per device and dtype, from the second update on): in place,
        averaged <- decay * averaged + (1 - decay) * current."""
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(int(num_averaged)))

    @property
    def started(self) -> bool:
        """Whether the average holds at least one update (before it, the current weights stand for it)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # the average is made by `_make_average` when first needed (module docstring)

    def _make_average(self, pl_module: L.LightningModule) -> None:
        if self._average_model is None:
            device = self._device or pl_module.device
            self._average_model = AveragedModel(pl_module, device, use_buffers=self._use_buffers, **self._kwargs)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._make_average(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started:
            super().on_train_end(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "current_model_state" not in checkpoint:
            # Saved before the first update (or without this callback): nothing averaged yet; the average starts at
            # `start_step` by copying the weights, as in a run that was never interrupted.
            return
        self._make_average(pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.started:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
