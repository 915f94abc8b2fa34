"""Tokenizer evaluation metrics: codebook usage and perplexity, PSNR on [-1, 1] images, the prefix curve.

design.md section 4 lists what the tokenizer reports: PSNR and SSIM (torchmetrics), codebook usage and perplexity,
overall and per token position, and the prefix curve - reconstruction PSNR against the number j of tokens the
decoder sees (the DDT paper's progressive-decoding figure, arXiv 2504.14666, Fig. 1 and section 4).

Everything here is a `torchmetrics.Metric` (or a thin function over one), so that state is summed across DDP ranks
by torchmetrics at `compute()` and nothing here touches `torch.distributed` directly.

Pixel convention. Our images live in [-1, 1]; PSNR and SSIM are reported on [0, 1] images with `data_range=1.0`, as
the CPU prototype of design.md section 6 did. `to_unit_range` is the one mapping: `(x + 1) / 2` clamped to [0, 1]
(the clamp scores the image that would be displayed; decoders can overshoot). For the stateful classes use
torchmetrics' own `PeakSignalNoiseRatio(data_range=1.0)` / `StructuralSimilarityIndexMeasure(data_range=1.0)` and
feed them `to_unit_range(x)`.

PSNR aggregation. PSNR over a dataset is the PSNR of the mean squared error over all pixels of all images (what
`PeakSignalNoiseRatio(data_range=1.0)` computes when fed batch after batch), not the mean of per-image PSNRs.
`PrefixCurve` follows the same rule for every prefix length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ddt_lightning.models.quantizer import code_perplexity

__all__ = ["CodebookUsage", "PrefixCurve", "psnr_01", "ssim_01", "to_unit_range"]


# ----------------------------------------------------------------------------------------------------------------------
# [-1, 1] -> [0, 1] and functional PSNR / SSIM
# ----------------------------------------------------------------------------------------------------------------------


def to_unit_range(images: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1] and clamp (values outside [-1, 1] would not be displayed either)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr_01(preds: Tensor, target: Tensor) -> Tensor:
    """PSNR (dB) of `preds` against `target`, both (B, C, H, W) in [-1, 1], measured on [0, 1] with data_range 1.

    One number for the whole batch: the PSNR of the batch's mean squared error, exactly what
    `torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)` returns on `to_unit_range(preds)`,
    `to_unit_range(target)`.
    """
    return peak_signal_noise_ratio(to_unit_range(preds), to_unit_range(target), data_range=1.0)


def ssim_01(preds: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM of `preds` against `target`, both (B, C, H, W) in [-1, 1], on [0, 1] with data_range 1."""
    return structural_similarity_index_measure(to_unit_range(preds), to_unit_range(target), data_range=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Codebook usage and perplexity, overall and per token position
# ----------------------------------------------------------------------------------------------------------------------


class CodebookUsage(Metric):
    """Counts of every code at every token position, and the usage / perplexity they imply.

    State: `counts` (T, K), summed over ranks. It is int32 rather than int64 because it is T x K cells (T = 256,
    K = 65,536 is 64 MiB in int32) and one cell counts at most one hit per image seen.

    `compute()` returns a dict:
      - `usage`: fraction of the K codes used at least once, at any position.
      - `perplexity`: exp of the entropy of the code distribution pooled over all positions (K for perfectly
        uniform use, 1 for a collapsed codebook).
      - `usage_per_position` (T,) and `perplexity_per_position` (T,): the same for each token position alone.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, codebook_size: int, num_positions: int) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if num_positions < 1:
            raise ValueError(f"num_positions must be >= 1, got {num_positions}")
        self.codebook_size = codebook_size
        self.num_positions = num_positions
        self.add_state(
            "counts", default=torch.zeros(num_positions, codebook_size, dtype=torch.int32), dist_reduce_fx="sum"
        )

    def update(self, indices: Tensor) -> None:
        """Count the codes of a batch. `indices`: (B, T) integer codes in [0, K)."""
        if indices.ndim != 2 or indices.shape[1] != self.num_positions:
            raise ValueError(f"indices must be (B, {self.num_positions}), got {tuple(indices.shape)}")
        # An out-of-range code would silently land in a neighbouring position's row of the flat index below.
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{indices.min()}, {indices.max()}]")
        positions = torch.arange(self.num_positions, device=indices.device)  # (T,)
        flat = (positions * self.codebook_size + indices.long()).flatten()  # (B * T,) = position * K + code
        ones = torch.ones_like(flat, dtype=self.counts.dtype)
        self.counts.view(-1).scatter_add_(0, flat, ones)

    def compute(self) -> dict[str, Tensor]:
        per_position = self.counts  # (T, K)
        overall = per_position.sum(dim=0, dtype=torch.int64)  # (K,)
        return {
            "usage": (overall > 0).float().mean(),
            "perplexity": code_perplexity(overall).float(),
            "usage_per_position": (per_position > 0).float().mean(dim=-1),  # (T,)
            "perplexity_per_position": code_perplexity(per_position).float(),  # (T,)
        }


# ----------------------------------------------------------------------------------------------------------------------
# Prefix curve: PSNR against the number of tokens j the decoder sees
# ----------------------------------------------------------------------------------------------------------------------


class PrefixCurve(Metric):
    """Dataset-level PSNR (dB, [0, 1] images, data_range 1) for each of a fixed list of prefix lengths j.

    The caller decodes each batch once per prefix length and calls `update(j_index, preds, target)` with
    `prefix_lengths[j_index]` tokens visible. State is the summed squared error and pixel count per j (float64,
    so that a large evaluation set does not lose precision), summed over ranks; `compute()` returns (J,) with
    `10 log10(1 / mean squared error)` per j, the value `PeakSignalNoiseRatio(data_range=1.0)` gives on the same
    images, and NaN for a j that received no update.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, prefix_lengths: Sequence[int]) -> None:
        super().__init__()
        if len(prefix_lengths) == 0:
            raise ValueError("prefix_lengths must not be empty")
        if any(j < 0 for j in prefix_lengths):
            raise ValueError(f"prefix_lengths must be >= 0, got {list(prefix_lengths)}")
        self.prefix_lengths = tuple(int(j) for j in prefix_lengths)
        num = len(self.prefix_lengths)
        self.add_state("sum_squared_error", default=torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, j_index: int, preds: Tensor, target: Tensor) -> None:
        """Add a batch decoded from the first `prefix_lengths[j_index]` tokens; preds, target (B, C, H, W), [-1, 1]."""
        if not 0 <= j_index < len(self.prefix_lengths):
            raise IndexError(f"j_index {j_index} out of range for {len(self.prefix_lengths)} prefix lengths")
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        diff = to_unit_range(preds).double() - to_unit_range(target).double()
        self.sum_squared_error[j_index] += diff.square().sum()
        self.total[j_index] += diff.numel()

    def compute(self) -> Tensor:
        mse = self.sum_squared_error / self.total  # (J,), NaN where total == 0
        return (10.0 * torch.log10(1.0 / mse)).float()
