"""Robust image decoding (`load_rgb`) in every Pillow mode, and the shared `ImageTransform`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddt_lightning.data.images import DEFAULT_BACKGROUND, BadImageError, ImageTransform, load_rgb, uint8_to_tensor

WHITE = np.array(DEFAULT_BACKGROUND)


def _saved(tmp_path, image: Image.Image, name: str, **save_args) -> str:
    path = tmp_path / name
    image.save(path, **save_args)
    return str(path)


def _pixels(source) -> np.ndarray:
    image = load_rgb(source)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)  # (H, W, 3)


def test_bilevel_and_grey(tmp_path):
    bits = np.zeros((4, 4), dtype=bool)
    bits[:, 2:] = True
    px = _pixels(_saved(tmp_path, Image.fromarray(bits), "bits.png"))
    assert (px[:, :2] == 0).all() and (px[:, 2:] == 255).all()
    px = _pixels(_saved(tmp_path, Image.new("L", (3, 3), 77), "grey.png"))
    assert (px == 77).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # exactly 0, 1, 128, 255 in 8 bits
    for name in ("grey16.png", "grey16.tif"):
        image = Image.fromarray(values)
        assert image.mode == "I;16"
        px = _pixels(_saved(tmp_path, image, name))
        assert px[0, :, 0].tolist() == [0, 1, 128, 255]
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()


def test_thirty_two_bit_int_and_float_grey(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535, 70000, 514]], dtype=np.int32))
    assert ints.mode == "I"
    assert _pixels(_saved(tmp_path, ints, "int32.tif"))[0, :, 0].tolist() == [0, 255, 255, 2]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert _pixels(_saved(tmp_path, floats, "float.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = (200, 40, 0)
    rgba[0, :, 3] = (0, 255, 128)
    px = _pixels(_saved(tmp_path, Image.fromarray(rgba), "rgba.png"))[0]
    expected_half = np.rint(np.array([200, 40, 0]) * 128 / 255 + WHITE * 127 / 255)
    assert px[0].tolist() == WHITE.tolist()
    assert px[1].tolist() == [200, 40, 0]
    assert px[2].tolist() == expected_half.tolist()
    la = Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), "LA")
    assert _pixels(_saved(tmp_path, la, "la.png"))[0].tolist() == [WHITE.tolist(), [90, 90, 90]]


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255] + [0] * (254 * 3)
    image = Image.fromarray(np.array([[0, 1, 0]], dtype=np.uint8), "P")
    image.putpalette(palette)
    assert _pixels(_saved(tmp_path, image, "p.png"))[0].tolist() == [[255, 0, 0], [0, 0, 255], [255, 0, 0]]
    path = _saved(tmp_path, image, "p_trns.png", transparency=1)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    assert _pixels(path)[0].tolist() == [[255, 0, 0], WHITE.tolist(), [255, 0, 0]]
    gif = _saved(tmp_path, image, "p_trns.gif", transparency=0)
    assert _pixels(gif)[0].tolist() == [WHITE.tolist(), [0, 0, 255], WHITE.tolist()]


def test_cmyk_and_ycbcr(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # pure cyan ink
    assert _pixels(_saved(tmp_path, cmyk, "cyan.tif"))[0, 0].tolist() == [0, 255, 255]
    cmyk_jpeg = _saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "red.jpg", quality=95)
    assert Image.open(cmyk_jpeg).mode == "CMYK"
    assert np.abs(_pixels(cmyk_jpeg)[4, 4] - [255, 0, 0]).max() <= 6
    ycbcr = Image.new("RGB", (8, 8), (30, 160, 90)).convert("YCbCr")
    buffer = io.BytesIO()
    ycbcr.save(buffer, format="TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "YCbCr"
    assert np.abs(_pixels(buffer.getvalue())[0, 0] - [30, 160, 90]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), dtype=np.uint8)  # wide: red left half, blue right half
    stored[:, :10] = (255, 0, 0)
    stored[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = _saved(tmp_path, Image.fromarray(stored), "rotated.jpg", exif=exif, quality=95)
    px = _pixels(path)
    assert px.shape == (20, 10, 3)  # now tall
    assert np.abs(px[3, 5] - [255, 0, 0]).max() < 30  # the left half went to the top
    assert np.abs(px[16, 5] - [0, 0, 255]).max() < 30


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert _pixels(str(path))[0, 0].tolist() == [255, 0, 0]


def test_bad_inputs_raise_one_exception_type(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(jpeg, "JPEG")
    cases = {
        "empty.png": (b"", "empty"),
        "notes.jpg": (b"just some text, not pixels\n", "identify"),
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "decode"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "decode"),
        "corrupt.png": (good.getvalue()[:100] + b"\x00" * 200 + good.getvalue()[300:], "decode"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadImageError, match=reason) as info:
            load_rgb(path)
        assert info.value.path == str(path) and str(path) in str(info.value)
    with pytest.raises(BadImageError, match="cannot read"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="identify"):
        load_rgb(b"\x89PNX not really")


def test_transform_resizes_crops_and_scales():
    image = np.zeros((20, 40, 3), dtype=np.uint8)  # wide: black | white | black in thirds of the width
    image[:, 13:27] = 255
    out = ImageTransform(16)(Image.fromarray(image))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # Centre crop of the 32x16 resize keeps columns 8..23: white in the middle, black at both edges.
    assert out[:, :, 8].min() > 0.9 and out[:, :, 0].max() < -0.9 and out[:, :, 15].max() < -0.9
    assert torch.equal(ImageTransform(4)(Image.new("RGB", (300, 200), (255, 0, 255))), _constant(4, [1, -1, 1]))
    grey = ImageTransform(8)(Image.new("L", (28, 28), 0))
    assert grey.shape == (3, 8, 8) and (grey == -1).all()


def _constant(resolution: int, rgb: list[float]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, resolution, resolution)


def test_random_flip_flips_sometimes():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4] = 255  # white left half
    torch.manual_seed(0)
    outs = [ImageTransform(8, random_flip=True)(Image.fromarray(image)) for _ in range(20)]
    lefts = {bool(o[0, 0, 0] > 0) for o in outs}
    assert lefts == {True, False}
    assert all(ImageTransform(8)(Image.fromarray(image))[0, 0, 0] > 0 for _ in range(5))


def test_uint8_to_tensor_maps_0_and_255_to_the_ends_and_a_batch_like_its_images():
    arrays = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4, 3), dtype=np.uint8)  # (N, H, W, 3)
    arrays[0, 0, 0] = (0, 255, 128)
    one = uint8_to_tensor(arrays[0])
    assert one.shape == (3, 5, 4) and one.dtype == torch.float32
    assert one[:, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]
    assert torch.equal(one[:, 2, 1], torch.from_numpy(arrays[0, 2, 1]).float() / 127.5 - 1)
    batch = uint8_to_tensor(arrays)
    assert batch.shape == (3, 3, 5, 4) and torch.equal(batch, torch.stack([uint8_to_tensor(a) for a in arrays]))
