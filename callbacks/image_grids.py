"""`ReconstructionGrids`: image grids of the first validation/test batch as MLflow run artifacts.

Three grids per evaluation (design.md section 3): originals over one-step and sampled reconstructions
(`<stage>/reconstructions`), and prefix strips - each row one image decoded from its first j tokens for the
evaluator's prefix lengths, next to the original (`<stage>/prefix_strips`, the paper's progressive decoding).
The images come from the step output of `TokenizerModule`, so nothing is decoded twice.
"""

from __future__ import annotations

import lightning as L
import torch
from einops import rearrange

from ddt_lightning.images import log_image, make_grid


class ReconstructionGrids(L.Callback):
    def __init__(self, num_images: int = 8) -> None:
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be >= 1")
        self.num_images = num_images

    def _log(self, trainer: L.Trainer, stage: str, outputs: dict, batch_idx: int) -> None:
        if batch_idx != 0 or not outputs or not trainer.is_global_zero:
            return
        n, step = self.num_images, trainer.global_step
        originals, onestep, sampled = outputs["images"][:n], outputs["onestep"][:n], outputs["sampled"][:n]
        rows = torch.cat([originals, onestep, sampled])  # (3 n, C, H, W): one row each
        log_image(
            trainer.loggers, f"{stage}/reconstructions", make_grid(rows, nrow=len(originals)), trainer.global_step
        )
        strips = torch.stack([originals, *(p[:n] for p in outputs["prefixes"])], dim=1)  # (n, 1 + J, C, H, W)
        grid = make_grid(rearrange(strips, "n j c h w -> (n j) c h w"), nrow=strips.shape[1])
        log_image(trainer.loggers, f"{stage}/prefix_strips", grid, step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(trainer, "val", outputs, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(trainer, "test", outputs, batch_idx)
