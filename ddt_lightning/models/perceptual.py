"""A perceptual distance for the tokenizer's x0 estimates: LPIPS's recipe on a small network of ours.

LPIPS (Zhang et al. 2018) compares two images through a frozen classification network: each layer's feature map is
unit-normalised along channels, the squared differences are averaged over positions and summed over layers. The
VQGAN family trains its tokenizers with it, and diffusion decoders (epsilon-VAE) add it to their x0 estimates. No
LPIPS or VGG weights exist offline here (design.md section 5), so the network is trained in this project:
`FeatureNet` is a small fully-convolutional per-pixel classifier, trained by `python -m ddt_lightning.perceptual`
on a data set's *training* split (the built-in world: which shape covers each pixel) - the features a pixel MSE
weighs least (a circle and a square of one area differ on about as many pixels as a 1-pixel shift) are the ones it
must separate. Uniform layer weights: LPIPS's learned linear heads need human similarity judgements we do not have.

Written by hand because no kept library ships a perceptual loss (torchmetrics' LPIPS downloads its weights).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "ddt-feature-net/1"


@dataclass
class FeatureNetConfig:
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 64)  # one stage each; every stage after the first halves the resolution
    num_classes: int = 5  # the world: background + 4 shapes

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or min(self.widths) < 1 or self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(f"FeatureNetConfig: invalid {dataclasses.asdict(self)}")


class FeatureNet(nn.Module):
    """Stages of two 3x3 convolutions (the first strided from the second stage on), GELU; a head that upsamples
    every stage to the input size, concatenates them and classifies each pixel. `features(x)` returns the stages'
    outputs, the layers of the perceptual distance. Input in [-1, 1]."""

    def __init__(self, config: FeatureNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or FeatureNetConfig()
        stages, channels = [], cfg.in_channels
        for i, width in enumerate(cfg.widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, stride=stride, padding=1),
                    nn.GELU(),
                    nn.Conv2d(width, width, 3, padding=1),
                    nn.GELU(),
                )
            )
            channels = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(sum(cfg.widths), cfg.num_classes, 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> per-pixel class logits (B, num_classes, H, W)."""
        size = x.shape[-2:]
        maps = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in self.features(x)]
        return self.head(torch.cat(maps, dim=1))

    # ------------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path, **metadata) -> Path:
        """Write `config.json` (with `metadata`, e.g. how the net was trained and scored) + `model.safetensors`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, **dataclasses.asdict(self.config), "metadata": metadata}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FeatureNet:
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no feature network at {directory}: {CONFIG_NAME} is missing (train one with "
                f"`python -m ddt_lightning.perceptual train {directory}`)"
            )
        raw = json.loads(config_file.read_text())
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{config_file}: not a feature network export (format {FORMAT!r} expected)")
        raw.pop("metadata", None)
        net = cls(FeatureNetConfig(**raw))
        net.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return net.eval()


class PerceptualDistance(nn.Module):
    """LPIPS-style distance through a frozen `FeatureNet`: per layer, channel-unit-normalised features, squared
    differences summed over channels and averaged over positions; summed over layers. (B,) per pair of images.
    The network is frozen (no gradient to its weights, eval mode) and gradients flow to the first argument."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # always eval: a frozen network's behaviour never depends on the trainer

    @staticmethod
    def _normalise(f: torch.Tensor) -> torch.Tensor:
        return f / (f.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, C, H, W) in [-1, 1] -> (B,)."""
        with torch.no_grad():
            target = [self._normalise(f) for f in self.net.features(y)]
        total = x.new_zeros(x.shape[0])
        for fx, fy in zip(self.net.features(x), target):
            total = total + (self._normalise(fx) - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total
