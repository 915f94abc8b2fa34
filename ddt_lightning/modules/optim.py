"""The optimisation both LightningModules share: AdamW with decoupled weight decay on matrices only, and a
linear warm-up into a cosine decay, stepped every optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_ratio x lr at the last step (a LambdaLR factor)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def adamw_warmup_cosine(
    decay: list[torch.nn.Parameter],
    no_decay: list[torch.nn.Parameter],
    hparams,
    total_steps: int,
    factor: Callable[[int], float] | None = None,
) -> dict:
    """`configure_optimizers`' return value: AdamW (weight decay on `decay` only) under `warmup_cosine`, from the
    module's hparams `lr`, `betas`, `weight_decay`, `warmup_steps`, `min_lr_ratio` - or under `factor` (a LambdaLR
    factor of the optimizer step) when given."""
    groups = [{"params": decay, "weight_decay": hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas: Sequence[float] = hparams.betas
    optimizer = torch.optim.AdamW(groups, lr=hparams.lr, betas=tuple(betas))
    total = max(int(total_steps), 1)
    factor = factor or warmup_cosine(min(hparams.warmup_steps, total), total, hparams.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
