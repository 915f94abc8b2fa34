"""Image grids for logging: reconstructions, prefix-decoding strips and samples as PNG run artifacts.

design.md section 3: image grids are MLflow run artifacts. `make_grid` tiles a batch of [-1, 1] images into one
uint8 (H', W', 3) array (torchvision's layout, without depending on torchvision: its PyPI wheel breaks
`import lightning` here, design.md section 6); `save_png` writes it; `log_image` logs it to the MLflow run of
every `MLFlowLogger` among the given loggers under `images/`, and ignores other loggers.

`lightning` is imported inside `log_image` only: by the time a callback logs an image it is loaded anyway, and
`make_grid` stays importable from light scripts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

__all__ = ["artifact_file_name", "log_image", "log_text", "make_grid", "save_png", "to_uint8"]


def to_uint8(images: Tensor) -> Tensor:
    """Map [-1, 1] to {0..255}: -1 -> 0, 1 -> 255, rounding to nearest; values outside are clamped."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: Tensor, nrow: int, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile `images` (N, 3, H, W) in [-1, 1] row-major, `nrow` images per row, into a (H', W', 3) uint8 array.

    Every cell is surrounded by `padding` pixels of `pad_value` (in the images' [-1, 1] scale: 1.0 is white), the
    outer border included, so H' = rows * (H + padding) + padding with rows = ceil(N / nrow), and
    W' = nrow * (W + padding) + padding. Empty cells of the last row are filled with `pad_value`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    num, _, height, width = images.shape
    rows = max(1, math.ceil(num / nrow))
    x = images.detach().float().cpu()  # (N, 3, H, W)
    blank = torch.full((rows * nrow - num, 3, height, width), pad_value)
    x = torch.cat([x, blank])  # (rows * nrow, 3, H, W)
    x = F.pad(x, (padding, 0, padding, 0), value=pad_value)  # (rows * nrow, 3, H + p, W + p): top and left border
    x = rearrange(x, "(r c) ch h w -> ch (r h) (c w)", c=nrow)  # (3, rows * (H + p), nrow * (W + p))
    x = F.pad(x, (0, padding, 0, padding), value=pad_value)  # (3, H', W'): close the bottom and right border
    return rearrange(to_uint8(x), "ch h w -> h w ch").numpy()  # (H', W', 3)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a (H, W, 3) or (H, W) uint8 array as a PNG, creating parent folders; returns the path."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def artifact_file_name(key: str, step: int, suffix: str = ".png") -> str:
    """Artifact path of `key` at `step`: `images/<key>_step<step:07d><suffix>`; '/' in the key makes subfolders."""
    # MLflow rejects '..' and absolute paths in artifact names; keep only safe characters.
    safe = re.sub(r"[^A-Za-z0-9_\-./]", "_", key).replace("..", "_").strip("/")
    return f"images/{safe}_step{step:07d}{suffix}"


def _mlflow_loggers(logger: Any) -> list[Any]:
    """The MLFlowLoggers in `logger` (one Lightning logger, a sequence of them such as `trainer.loggers`, or None);
    none outside global rank 0 (Lightning's MLFlowLogger already hands other ranks a dummy experiment; this makes it
    explicit and skips the encoding there)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0 or logger is None:
        return []
    loggers: Sequence[Any] = logger if isinstance(logger, Sequence) else [logger]
    return [each for each in loggers if isinstance(each, MLFlowLogger)]


def log_image(logger: Any, key: str, image: np.ndarray, step: int) -> None:
    """Log `image` (H, W, 3) uint8 as a PNG artifact of each MLFlowLogger's run; a no-op for any other logger and
    outside global rank 0."""
    for each in _mlflow_loggers(logger):
        each.experiment.log_image(each.run_id, image, artifact_file=artifact_file_name(key, step))


def log_text(logger: Any, key: str, text: str, step: int) -> None:
    """Log `text` as `images/<key>_step<step>.txt` beside the image of the same key (as `log_image`)."""
    for each in _mlflow_loggers(logger):
        each.experiment.log_text(each.run_id, text, artifact_file_name(key, step, ".txt"))
