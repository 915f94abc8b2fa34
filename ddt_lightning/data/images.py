"""Robust image decoding and the one image transform shared by every data backend.

`load_rgb` turns anything Pillow can decode into the RGB image a viewer would show:

- EXIF orientation is applied (`ImageOps.exif_transpose`), so a rotated phone JPEG comes out upright;
- transparency (RGBA, LA, PA, palette or grey/RGB with a `transparency` key) is alpha-composited over a fixed
  background, `DEFAULT_BACKGROUND` = white, the usual choice for cut-out product and stamp photos;
- high bit depths are scaled, not clipped: 16-bit grey (`I;16*`, and `I`, which Pillow uses for 16/32-bit
  integer grey) maps 0..65535 to 0..255 with rounding (v / 257); float grey (`F`) is read as [0, 1] when its
  maximum is <= 1, else as 0..255 when <= 255, else as 0..65535;
- multi-frame files (GIF, TIFF) give their first frame; CMYK, YCbCr, LAB, HSV go through Pillow's converter.

Corrupt, truncated, empty and non-image inputs all raise `BadImageError(path, reason)`, the one exception the data
pipelines catch (and then skip, count and report the file). Truncated files are refused, never padded with grey,
as long as `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` keeps its default (False); nothing here sets it.

`ImageTransform` is the preprocessing of ADM/DiT (Dhariwal & Nichol 2021, `center_crop_arr`): box-halve while the
shorter side is >= 2x the target, bicubic-resize the shorter side to `resolution`, centre-crop, optionally flip,
then to a float32 (3, H, W) tensor in [-1, 1].
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class BadImageError(Exception):
    """A file that cannot be decoded into an image (corrupt, truncated, empty, not an image)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BadImageWarning(UserWarning):
    """Emitted when a data pipeline skips a bad image; the message names the path and the reason."""


def warn_bad_image(error: BadImageError) -> None:
    warnings.warn(f"skipping bad image {error.path}: {error.reason}", BadImageWarning, stacklevel=2)


def _grey_to_uint8(image: Image.Image) -> np.ndarray:
    """A high-bit-depth or float grey image as (H, W) uint8, scaled rather than clipped."""
    data = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        # 65535 / 255 = 257 exactly, so v / 257 maps the 16-bit range onto the 8-bit one.
        return np.rint(np.clip(data.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)
    data = np.nan_to_num(data.astype(np.float64))
    peak = float(data.max()) if data.size else 0.0
    scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    return np.rint(np.clip(data / scale, 0.0, 1.0) * 255.0).astype(np.uint8)


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
    alpha = rgba[..., 3:] / 255.0
    out = rgba[..., :3] * alpha + np.asarray(background, dtype=np.float32) * (1.0 - alpha)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:  # a transparency key on deep grey: scale first
            image = Image.fromarray(_grey_to_uint8(image))
        return _composite(image, background)
    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        return Image.fromarray(_grey_to_uint8(image)).convert("RGB")
    return image.convert("RGB")


def load_rgb(
    source: str | os.PathLike[str] | bytes, background: tuple[int, int, int] = DEFAULT_BACKGROUND
) -> Image.Image:
    """Decode a path or encoded bytes into an upright 8-bit RGB image; raise `BadImageError` if impossible."""
    if isinstance(source, bytes | bytearray | memoryview):
        path, data = "<bytes>", bytes(source)
    else:
        path = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise BadImageError(path, f"cannot read file ({error})") from error
    if not data:
        raise BadImageError(path, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes everything now: truncated data raises here (see the module docstring)
            upright = image
            # A malformed EXIF block must not cost the pixels: keep the stored orientation then.
            with contextlib.suppress(Exception):
                upright = ImageOps.exif_transpose(image)
            rgb = to_rgb(upright, background)
            return rgb.copy() if rgb is image else rgb  # `image` is closed on leaving the block
    except UnidentifiedImageError as error:
        raise BadImageError(path, "not an image Pillow can identify") from error
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too many pixels ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's decoders raise all of these
        raise BadImageError(path, f"cannot decode ({type(error).__name__}: {error})") from error


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]: one image, or a stacked batch (N, H, W, 3)."""
    # np.array copies: the source may be a read-only memory map or a PIL buffer.
    tensor = rearrange(torch.from_numpy(np.array(array, dtype=np.uint8)), "... h w c -> ... c h w")
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


class ImageTransform:
    """Resize the shorter side to `resolution`, centre-crop, optionally flip, and return (3, R, R) in [-1, 1]."""

    def __init__(self, resolution: int, random_flip: bool = False) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.resolution = resolution
        self.random_flip = random_flip

    def resize_crop(self, image: Image.Image) -> Image.Image:
        r = self.resolution
        # Box-halving first keeps large downscales alias-free and fast (ADM's center_crop_arr).
        while min(image.size) >= 2 * r:
            image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
        scale = r / min(image.size)
        image = image.resize(tuple(max(r, round(s * scale)) for s in image.size), resample=Image.Resampling.BICUBIC)
        left, top = (image.size[0] - r) // 2, (image.size[1] - r) // 2
        return image.crop((left, top, left + r, top + r))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.resize_crop(image.convert("RGB") if image.mode != "RGB" else image)
        if self.random_flip and torch.rand(()) < 0.5:  # torch RNG: seeded per DataLoader worker
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return uint8_to_tensor(np.asarray(image))  # (3, R, R)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution}, random_flip={self.random_flip})"
