"""Held-out evaluation of a DDT tokenizer (design.md section 4): one object used by validation, test and
the standalone evaluation alike, so the figures of the README, the main job and MLflow are computed one way.

Reported (PSNR and SSIM on [0, 1], dataset-level, see `ddt_lightning.metrics`):
- `psnr_onestep`: decode from pure noise in one step (the decoder's x0 estimate given all T tokens);
- `psnr_sampler`, `ssim`: the configured Euler sampler (`sampler_steps`, `guidance`);
- `prefix_psnr`: PSNR decoding from the first j tokens only, for each j in `prefix_tokens` (the prefix curve);
- `usage`, `perplexity` (overall) and `usage_position_min`, `perplexity_position_mean` (per position);
- `rfid` with the offline FID Inception network when `fid=True`.

Every metric is a torchmetrics object, so states are summed over DDP ranks at `compute()`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ddt_lightning.metrics import CodebookUsage, to_unit_range


class TokenizerEvaluator(nn.Module):
    def __init__(
        self,
        num_tokens: int,
        codebook_size: int,
        sampler_steps: int = 8,
        guidance: float = 1.0,
        prefix_tokens: list[int] | None = None,
        fid: bool = False,
    ) -> None:
        super().__init__()
        self.sampler_steps, self.guidance = sampler_steps, guidance
        self.prefix_tokens = prefix_tokens or [num_tokens // 4, num_tokens // 2, num_tokens]
        if not all(0 < j <= num_tokens for j in self.prefix_tokens):
            raise ValueError(f"prefix_tokens={self.prefix_tokens} must lie in [1, num_tokens={num_tokens}]")
        self.psnr_onestep = PeakSignalNoiseRatio(data_range=1.0)
        self.psnr_sampler = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.prefix_psnr = nn.ModuleList(PeakSignalNoiseRatio(data_range=1.0) for _ in self.prefix_tokens)
        self.usage = CodebookUsage(codebook_size=codebook_size, num_positions=num_tokens)
        if fid:
            from ddt_lightning.fid import ReconstructionFID

            self.fid = ReconstructionFID()
        else:
            self.fid = None

    @torch.no_grad()
    def update(self, tokenizer, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Evaluate one batch of images in [-1, 1]; returns the decoded images (for grids)."""
        tokens = tokenizer.encode(images)  # (B, T)
        self.usage.update(tokens)
        target = to_unit_range(images)
        onestep = tokenizer.decode(tokens, steps=1, generator=generator)
        self.psnr_onestep.update(to_unit_range(onestep), target)
        sampled = tokenizer.decode(tokens, steps=self.sampler_steps, guidance=self.guidance, generator=generator)
        self.psnr_sampler.update(to_unit_range(sampled), target)
        self.ssim.update(to_unit_range(sampled), target)
        prefixes = []
        for j, metric in zip(self.prefix_tokens, self.prefix_psnr):
            if j == tokenizer.config.num_tokens:
                decoded = sampled  # the full prefix is the sampler's reconstruction: same noise, same result
            else:
                decoded = tokenizer.decode(
                    tokens, steps=self.sampler_steps, guidance=self.guidance, prefix=j, generator=generator
                )
            metric.update(to_unit_range(decoded), target)
            prefixes.append(decoded)
        if self.fid is not None:
            self.fid.update(images, real=True)
            self.fid.update(sampled, real=False)
        return {"tokens": tokens, "onestep": onestep, "sampled": sampled, "prefixes": prefixes}

    def compute(self) -> dict:
        usage = self.usage.compute()
        out = {
            "psnr_onestep": self.psnr_onestep.compute().item(),
            "psnr_sampler": self.psnr_sampler.compute().item(),
            "ssim": self.ssim.compute().item(),
            "sampler_steps": self.sampler_steps,
            "usage": float(usage["usage"]),
            "perplexity": float(usage["perplexity"]),
            "usage_position_min": float(usage["usage_per_position"].min()),
            "perplexity_position_mean": float(usage["perplexity_per_position"].mean()),
            "usage_per_position": [round(float(u), 4) for u in usage["usage_per_position"]],
            "perplexity_per_position": [round(float(p), 2) for p in usage["perplexity_per_position"]],
            "prefix_tokens": list(self.prefix_tokens),
            "prefix_psnr": [m.compute().item() for m in self.prefix_psnr],
        }
        if self.fid is not None:
            out["rfid"] = self.fid.compute().item()
        return out

    def reset(self) -> None:
        metrics = [self.psnr_onestep, self.psnr_sampler, self.ssim, self.usage, *self.prefix_psnr]
        for metric in [*metrics, *([self.fid] if self.fid is not None else [])]:
            metric.reset()
