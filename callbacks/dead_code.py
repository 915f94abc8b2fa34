"""Dead-code restart for EMA vector quantizers (DDT, arXiv 2504.14666, section 3.1; design.md section 1).

The paper keeps its 65,536-code codebook alive by "replacing [dead codes] with random encoder outputs from training
batches". This callback does that for every `VectorQuantizer` in the LightningModule, on a schedule of its own:

- `rule="window"` (default): at each check, restart every code with no hit since the previous check (hits summed
  across ranks). Checks come every `early_every` steps for the first `early_steps` steps, then every `every`.
  In the CPU prototype (design.md section 6) this lifted held-out usage to 60-75 % in 2 minutes.
- `rule="ema"`: restart codes whose EMA cluster size is below `threshold` x the uniform expectation
  (tokens per step x world size / K). Relative, so independent of the batch size, but it rarely fires early
  because EMA counts start high and decay slowly (the prototype collapsed to 1 code of 1,024 with it alone).

Every rank ends with the same codebook: the dead set is computed from statistics already summed across ranks,
candidates (each rank's ring buffer of recent encoder outputs) are gathered from all ranks, rank 0 draws from
them with its own generator, and the draw is broadcast. Restarted codes get fresh EMA statistics.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from ddt_lightning.distributed import all_gather_cat, broadcast, rank
from ddt_lightning.models.quantizer import VectorQuantizer


class DeadCodeRestart(L.Callback):
    """Restart dead codes of every `VectorQuantizer` in the module; counts its own steps (train batches).

    Args:
        rule: "window" (no hit since the last check) or "ema" (EMA cluster size below threshold x uniform hits).
        every: steps between checks after the early phase.
        early_every: steps between checks during the first `early_steps` steps.
        early_steps: length of the early phase (0 disables it).
        threshold: for rule "ema", fraction of the expected uniform hits below which a code is dead.
        seed: seed of the generator that draws replacement vectors (on rank 0).
    """

    def __init__(
        self,
        rule: Literal["window", "ema"] = "window",
        every: int = 100,
        early_every: int = 25,
        early_steps: int = 500,
        threshold: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if rule not in ("window", "ema"):
            raise ValueError(f"rule must be 'window' or 'ema', got {rule!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if early_every < 1:
            raise ValueError(f"early_every must be >= 1, got {early_every}")
        if early_steps < 0:
            raise ValueError(f"early_steps must be >= 0, got {early_steps}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.rule = rule
        self.every = every
        self.early_every = early_every
        self.early_steps = early_steps
        self.threshold = threshold
        self.seed = seed
        self.step = 0  # train batches seen (not trainer.global_step, which counts optimizer steps)
        self.last_restarted = 0  # codes restarted at the latest check, all quantizers
        self.total_restarted = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule)

    def is_check_step(self, step: int) -> bool:
        """Whether the check runs after train batch number `step` (1-based)."""
        period = self.early_every if step <= self.early_steps else self.every
        return step % period == 0

    def dead_codes(self, vq: VectorQuantizer) -> Tensor:
        """(K,) bool mask of dead codes; identical on every rank (built from cross-rank sums)."""
        if self.rule == "window":
            return vq.window_hits == 0
        return vq.cluster_size < self.threshold * vq.expected_uniform_hits()

    @torch.no_grad()
    def restart(self, vq: VectorQuantizer) -> int:
        """Restart the dead codes of `vq` with random recent encoder outputs from all ranks; returns how many."""
        code_ids = self.dead_codes(vq).nonzero().squeeze(1)  # (n,) same on every rank
        n = code_ids.numel()
        restarted = 0
        if n:
            S = vq.restart_buffer_size
            candidates = all_gather_cat(vq.restart_buffer)  # (W * S, m)
            counts = all_gather_cat(vq.restart_buffer_count.view(1))  # (W,) valid rows per rank
            valid = (torch.arange(S, device=counts.device) < counts.unsqueeze(1)).flatten()  # (W * S,)
            n_valid = int(valid.sum())  # same on every rank, so every rank takes the same branch
            if n_valid:
                chosen = candidates.new_empty(n, vq.dim)  # (n, m)
                if rank() == 0:
                    pool = candidates[valid]  # (n_valid, m)
                    if n_valid >= n:
                        pick = torch.randperm(n_valid, generator=self.generator)[:n]
                    else:
                        pick = torch.randint(n_valid, (n,), generator=self.generator)
                    chosen.copy_(pool[pick.to(pool.device)])
                broadcast(chosen, src=0)
                vq.restart_codes(code_ids, chosen)
                restarted = n
        vq.window_hits.zero_()
        return restarted

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step += 1
        quantizers = [m for m in pl_module.modules() if isinstance(m, VectorQuantizer)]
        if getattr(pl_module, "codes_frozen", False):
            # The codebook is frozen (TokenizerModule's decoder-only phase): no hits are counted, so every code
            # would look dead. Nothing to restart, and the window starts afresh should the codes thaw.
            for vq in quantizers:
                vq.window_hits.zero_()
            self.last_restarted = 0
        elif self.is_check_step(self.step):
            self.last_restarted = sum(self.restart(vq) for vq in quantizers)
            self.total_restarted += self.last_restarted
        # Logged every step (held between checks) so that the logger's log_every_n_steps cannot drop a check.
        pl_module.log("train/dead_codes_restarted", float(self.last_restarted), on_step=True, batch_size=1)
        pl_module.log("train/dead_codes_restarted_total", float(self.total_restarted), on_step=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "last_restarted": self.last_restarted,
            "total_restarted": self.total_restarted,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.last_restarted = int(state_dict["last_restarted"])
        self.total_restarted = int(state_dict["total_restarted"])
        self.generator.set_state(state_dict["generator"])
