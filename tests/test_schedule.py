"""The k(t) map and rectified-flow time sampling."""

import pytest
import torch

from ddt_lightning.models.schedule import TokenMap, sample_time, shift_time


def test_uniform_map_is_ceil_t_times_T():
    token_map = TokenMap(32)
    t = torch.tensor([0.0, 1e-3, 1 / 32, 1 / 32 + 1e-4, 0.5, 0.51, 1.0])
    assert token_map(t).tolist() == [0, 1, 1, 2, 16, 17, 32]
    grid = torch.arange(33) / 32  # exact grid times must not round up by float error
    assert token_map(grid).tolist() == list(range(33))


def test_map_is_monotone_and_bounded():
    token_map = TokenMap(512, [192, 184, 72, 48, 16])
    t = torch.linspace(0, 1, 10_001)
    k = token_map(t)
    assert k.min() == 0 and k.max() == 512
    assert bool((k[1:] >= k[:-1]).all())


def test_staged_map_reveals_each_stage_in_its_interval():
    token_map = TokenMap(512, [192, 184, 72, 48, 16])
    ends = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0])
    assert token_map(ends).tolist() == [192, 376, 448, 496, 512]
    # Halfway through stage 3 (t = 0.5): 376 + 72 / 2 tokens.
    assert token_map(torch.tensor([0.5])).item() == 412


def test_bad_stages_are_rejected_naming_the_key():
    with pytest.raises(ValueError, match="stage_tokens"):
        TokenMap(32, [16, 8])
    with pytest.raises(ValueError, match="stage_tokens"):
        TokenMap(32, [40, -8])


def test_shift_time():
    u = torch.linspace(0, 1, 101)
    assert torch.allclose(shift_time(u, 1.0), u)
    s = shift_time(u, 3.0)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:] > s[:-1]).all())
    assert bool((s[1:-1] > u[1:-1]).all())  # shift > 1 moves mass towards noise
    t = sample_time(100_000, 3.0, torch.device("cpu"), torch.Generator().manual_seed(0))
    # median of the shifted distribution: shift(0.5) = 0.75
    assert abs(t.median().item() - 0.75) < 0.01 and t.min() > 0 and t.max() <= 1
