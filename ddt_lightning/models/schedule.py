"""Rectified-flow time and the DDT timestep-to-token map k(t) (DDT paper, section 3; design.md section 1).

Rectified flow: `x_t = t * eps + (1 - t) * x0`, `t = 1` pure noise. At time `t` the decoder sees only the first
`k(t)` tokens, `k` non-decreasing in `t`: the more noise destroys, the more tokens make up for it.

`TokenMap(T)` is the paper's uniform map, `k(t) = ceil(t * T)`. `TokenMap(T, stage_tokens=[...])` is Selftok's
staged map (e.g. stages of 192/184/72/48/16 tokens for T = 512): the time axis is cut into equal stages and stage
`s` reveals its `n_s` tokens linearly over its interval (the stage layout is ours; the uniform map is the
one-stage case).

Time sampling follows SD3's shift `t = s u / (1 + (s - 1) u)`, `u ~ U(0, 1)`, which puts more training on high
noise (design.md section 6: shift 3 beat uniform t by 3 dB in a CPU prototype).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


class TokenMap:
    """Maps times `t` in [0, 1] to the number of visible tokens `k(t)` in [0, T]."""

    def __init__(self, num_tokens: int, stage_tokens: list[int] | None = None) -> None:
        stages = list(stage_tokens) if stage_tokens else [num_tokens]
        if any(n <= 0 for n in stages) or sum(stages) != num_tokens:
            raise ValueError(f"stage_tokens={stages} must be positive and sum to num_tokens={num_tokens}")
        self.num_tokens = num_tokens
        self.stage_tokens = stages
        # Cumulative token count at the start of each stage, and after the last: (S + 1,)
        self.bounds = torch.tensor([0, *itertools.accumulate(stages)], dtype=torch.float64, device="cpu")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) float in [0, 1] -> (B,) long in [0, T]; ceil, so any t > 0 shows at least one token."""
        s = len(self.stage_tokens)
        pos = t.double().clamp(0, 1) * s  # position on the stage axis
        stage = pos.floor().clamp(max=s - 1).long()
        frac = pos - stage
        start = self.bounds.to(t.device)[stage]
        width = self.bounds.to(t.device)[stage + 1] - start
        # A tolerance (in tokens) keeps float32 grid times such as t = j / T from rounding up to j + 1.
        return torch.ceil(start + frac * width - 1e-4).clamp(0, self.num_tokens).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.num_tokens}, stage_tokens={self.stage_tokens})"


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift: maps u in [0, 1] to s u / (1 + (s - 1) u); shift 1 is the identity."""
    return shift * u / (1 + (shift - 1) * u)


def sample_time(batch: int, shift: float, device: torch.device, generator: torch.Generator | None = None):
    """Training times (B,): u ~ U(0, 1) shifted, kept strictly inside (0, 1]."""
    u = torch.rand(batch, device=device, generator=generator)
    return shift_time(u, shift).clamp(1e-4, 1.0)


def euler_sample(
    x: torch.Tensor, steps: int, shift: float, predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Integrate the rectified flow from noise `x` (t = 1) to t = 0 in `steps` Euler steps on diffusers'
    FlowMatchEulerDiscreteScheduler grid (SD3 `shift`); `predict_x0(x_t, t)` with t (B,) gives the x0 estimate,
    from which the velocity eps - x0 = (x_t - x0) / t follows."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=x.device)
    for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1]):
        x0 = predict_x0(x, sigma.expand(x.shape[0]).float())
        x = scheduler.step((x - x0) / sigma, timestep, x).prev_sample
    return x
