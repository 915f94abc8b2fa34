"""Helper for tests/test_dead_code.py: 2-process CPU DDP (gloo) training of a tiny encoder + VectorQuantizer with
DeadCodeRestart; each rank saves its quantizer state to `<out_dir>/rank<r>.pt`.

Run as `python tests/ddp_dead_code_script.py OUT_DIR` (Lightning re-launches this script for rank 1).
DDP's own buffer broadcast is turned off, so identical codebooks can only come from the quantizer's and the
callback's cross-rank exchanges.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddt_lightning.callbacks import DeadCodeRestart
from ddt_lightning.models.quantizer import VectorQuantizer

T, M, K = 4, 4, 64


class TinyTokenizer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, T * M)
        self.quantizer = VectorQuantizer(codebook_size=K, dim=M, num_positions=T, cosine=True, restart_buffer_size=32)
        self.decoder = nn.Linear(T * M, 8)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0] + 2.0 * self.global_rank  # (B, 8) each rank sees different data, from a different region
        out = self.quantizer(self.encoder(x).view(-1, T, M))  # quantized (B, T, M)
        return F.mse_loss(self.decoder(out.quantized.flatten(1)), x) + out.commit_loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RecordChecks(L.Callback):
    def __init__(self, restart: DeadCodeRestart) -> None:
        self.restart = restart
        self.per_check: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.restart.is_check_step(self.restart.step):
            self.per_check.append(self.restart.last_restarted)


def main(out_dir: Path) -> None:
    L.seed_everything(0, verbose=False)
    # A narrow input distribution: few codes are hit, so dead codes occur at every check.
    data = TensorDataset(0.3 + 0.1 * torch.randn(1280, 8))
    # Seeded per rank (Lightning starts rank 1 with LOCAL_RANK=1): the random codebooks differ until the
    # quantizer's one-time init broadcasts rank 0's (DDP syncs parameters at start, but not these buffers).
    torch.manual_seed(1000 + int(os.environ.get("LOCAL_RANK", "0")))
    model = TinyTokenizer()
    initial_codebook = model.quantizer.codebook.clone()
    restart = DeadCodeRestart(early_every=5, early_steps=20, every=10, seed=1)
    record = RecordChecks(restart)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        max_steps=40,
        callbacks=[restart, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    vq = model.quantizer
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    state |= {
        "step": restart.step,
        "total_restarted": restart.total_restarted,
        "restarts_per_check": record.per_check,
        "usage": vq.usage_stats()["usage"],
        "initial_codebook": initial_codebook,
    }
    torch.save(state, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
