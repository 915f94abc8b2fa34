"""Tests for ddt_lightning.metrics: exact codebook usage / perplexity on hand-made indices, PSNR consistency."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.image import PeakSignalNoiseRatio

from ddt_lightning.metrics import CodebookUsage, PrefixCurve, psnr_01, ssim_01, to_unit_range


def test_codebook_usage_exact_values() -> None:
    metric = CodebookUsage(codebook_size=4, num_positions=2)
    # Position 0 sees codes 0, 0, 1, 1 (two codes, equally often); position 1 sees code 3 four times.
    metric.update(torch.tensor([[0, 3], [1, 3]]))
    metric.update(torch.tensor([[0, 3], [1, 3]]))
    out = metric.compute()

    expected_counts = torch.tensor([[2, 2, 0, 0], [0, 0, 0, 4]], dtype=torch.int32)
    assert torch.equal(metric.counts, expected_counts)
    # Overall distribution over codes: 2, 2, 0, 4 out of 8 -> 3 of 4 codes used.
    assert out["usage"].item() == pytest.approx(0.75)
    entropy = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert out["perplexity"].item() == pytest.approx(math.exp(entropy), rel=1e-6)
    assert torch.allclose(out["usage_per_position"], torch.tensor([0.5, 0.25]))
    assert torch.allclose(out["perplexity_per_position"], torch.tensor([2.0, 1.0]))


def test_codebook_usage_uniform_and_empty() -> None:
    metric = CodebookUsage(codebook_size=8, num_positions=3)
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    assert empty["usage"].item() == 0.0 and empty["perplexity"].item() == 0.0

    # Each position cycles through all 8 codes: perplexity is exactly K everywhere.
    indices = torch.stack([torch.arange(8), (torch.arange(8) + 3) % 8, torch.arange(8).flip(0)], dim=1)  # (8, 3)
    metric.update(indices)
    out = metric.compute()
    assert out["usage"].item() == 1.0
    assert out["perplexity"].item() == pytest.approx(8.0, rel=1e-6)
    assert torch.allclose(out["perplexity_per_position"], torch.full((3,), 8.0))
    assert out["usage_per_position"].shape == (3,)


def test_codebook_usage_rejects_bad_indices() -> None:
    metric = CodebookUsage(codebook_size=4, num_positions=2)
    with pytest.raises(ValueError, match="indices must lie"):
        metric.update(torch.tensor([[0, 4]]))  # would otherwise count as position 1, code 0
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        metric.update(torch.tensor([[0, 1, 2]]))


def test_psnr_01_matches_torchmetrics_on_unit_range() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    preds = (target + 0.1 * torch.randn(4, 3, 8, 8, generator=gen)).clamp(-1, 1)
    reference = PeakSignalNoiseRatio(data_range=1.0)
    reference.update((preds + 1) / 2, (target + 1) / 2)
    assert psnr_01(preds, target).item() == pytest.approx(reference.compute().item(), rel=1e-5)
    # An error of 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert psnr_01(torch.full((1, 3, 4, 4), 0.2), torch.zeros(1, 3, 4, 4)).item() == pytest.approx(20.0, rel=1e-5)
    assert ssim_01(target, target).item() == pytest.approx(1.0, abs=1e-5)
    assert to_unit_range(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_prefix_curve_is_dataset_level_psnr_per_j() -> None:
    gen = torch.Generator().manual_seed(1)
    curve = PrefixCurve(prefix_lengths=[1, 4, 16])
    references = [PeakSignalNoiseRatio(data_range=1.0) for _ in range(3)]
    for _ in range(2):  # two batches of different sizes
        for j_index, noise in enumerate([0.3, 0.1, 0.02]):
            batch = 3 + j_index
            target = torch.rand(batch, 3, 6, 6, generator=gen) * 2 - 1
            preds = (target + noise * torch.randn(batch, 3, 6, 6, generator=gen)).clamp(-1, 1)
            curve.update(j_index, preds, target)
            references[j_index].update(to_unit_range(preds), to_unit_range(target))
    values = curve.compute()
    assert values.shape == (3,)
    expected = torch.stack([ref.compute() for ref in references])
    assert torch.allclose(values, expected, rtol=1e-5)
    assert values[0] < values[1] < values[2]  # less noise with more tokens


def test_prefix_curve_unfilled_j_is_nan_and_bad_index_raises() -> None:
    curve = PrefixCurve(prefix_lengths=[2, 8])
    curve.update(1, torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2) + 0.2)
    values = curve.compute()
    assert math.isnan(values[0].item()) and values[1].item() == pytest.approx(20.0, rel=1e-5)
    with pytest.raises(IndexError):
        curve.update(2, torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def test_states_reduce_by_sum_as_across_ranks() -> None:
    """merge_state applies each state's dist_reduce_fx: two "ranks" on halves equal one metric on everything."""
    gen = torch.Generator().manual_seed(2)
    indices = torch.randint(0, 16, (10, 5), generator=gen)
    whole, rank0, rank1 = (CodebookUsage(codebook_size=16, num_positions=5) for _ in range(3))
    whole.update(indices)
    rank0.update(indices[:4])
    rank1.update(indices[4:])
    rank0.merge_state(rank1)
    for name, value in whole.compute().items():
        assert torch.allclose(rank0.compute()[name], value), name

    target = torch.rand(6, 3, 4, 4, generator=gen) * 2 - 1
    preds = target + 0.1 * torch.randn(6, 3, 4, 4, generator=gen)
    curve_whole, curve0, curve1 = (PrefixCurve(prefix_lengths=[1]) for _ in range(3))
    curve_whole.update(0, preds, target)
    curve0.update(0, preds[:2], target[:2])
    curve1.update(0, preds[2:], target[2:])
    curve0.merge_state(curve1)
    assert torch.allclose(curve0.compute(), curve_whole.compute())
