"""Take-off monitor for the DDT tokenizer: does the decoder use the tokens yet? (README, "What else was tried").

A run of the tiny tokenizer first learns to denoise without its tokens; it "takes off" when the decoder starts
reading them, or it never does and spends its budget as an unconditional denoiser (about 15.8 dB one-step). The
signal is `DDTTokenizer.token_gain`: 1 - MSE(with the tokens) / MSE(without), on one batch with fixed noise and
times. Measured on checkpoints of runs of the main job's config: 0.00 and -0.00 at steps 500 / 1,000 for a run
that never took off, 0.06 at steps 1,000 and 1,500 for another; 0.02 -> 0.61 and -0.00 -> 0.53 (steps 500 ->
1,000) for two that did, 0.29 at step 1,000 for a slow one. Every `every` steps the monitor logs `train/token_gain`
(the mean over ranks, so every rank decides alike); from step `patience` on, a gain below `min_gain` warns, or,
with `action="stop"`, ends the run with a message saying so, instead of training on for nothing.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ddt_lightning.distributed import all_reduce_sum, world_size


class TakeOffMonitor(L.Callback):
    """Log the decoder's token gain every `every` steps; act when it is below `min_gain` from step `patience` on.

    Args:
        every: steps between measurements (each costs two decoder forwards on `num_images` images).
        patience: first step at which a low gain counts (take-off came at steps 600-900 in the runs measured).
        min_gain: gain below which the run has not taken off (failed runs measured 0.00-0.06, working ones >= 0.29).
        action: "warn" (log and warn once) or "stop" (end training: `trainer.should_stop`).
        num_images: images of the current batch used for the measurement.
        seed: seed of the measurement's noise and times (the training's random state is not touched).
    """

    def __init__(
        self,
        every: int = 100,
        patience: int = 1000,
        min_gain: float = 0.2,
        action: Literal["warn", "stop"] = "warn",
        num_images: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every < 1 or num_images < 1 or patience < 0:
            raise ValueError(
                f"every and num_images must be >= 1 and patience >= 0, got {every}, {num_images}, {patience}"
            )
        if action not in ("warn", "stop"):
            raise ValueError(f"action must be 'warn' or 'stop', got {action!r}")
        self.every, self.patience, self.min_gain, self.action = every, patience, min_gain, action
        self.num_images, self.seed = num_images, seed
        self.last_gain: float | None = None
        self.stalled_at: int | None = None  # the step at which the run was found not to have taken off

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done, after this batch
        if step % self.every or "image" not in batch or batch["image"].shape[0] == 0:
            return
        generator = torch.Generator(pl_module.device).manual_seed(self.seed * 1_000_003 + step)
        gain = pl_module.tokenizer.token_gain(batch["image"][: self.num_images], generator).reshape(1)
        gain = all_reduce_sum(gain) / world_size()  # the mean over ranks: every rank decides alike
        self.last_gain = float(gain)
        pl_module.log("train/token_gain", self.last_gain, on_step=True, on_epoch=False, batch_size=1)
        if step >= self.patience and self.last_gain < self.min_gain and self.stalled_at is None:
            self.stalled_at = step
            message = (
                f"the DDT tokenizer has not taken off: token gain {self.last_gain:.3f} < min_gain={self.min_gain} at "
                f"step {step} (the decoder ignores the tokens; see the README's take-off paragraph)"
            )
            if self.action == "stop":
                trainer.should_stop = True
                message += " - stopping the run (TakeOffMonitor action='stop')"
            rank_zero_warn(message)

    def state_dict(self) -> dict[str, Any]:
        return {"last_gain": self.last_gain, "stalled_at": self.stalled_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_gain, self.stalled_at = state_dict["last_gain"], state_dict["stalled_at"]
