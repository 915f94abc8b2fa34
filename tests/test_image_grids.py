"""Tests for ddt_lightning.images: grid layout, uint8 mapping, PNG writing and an MLflow artifact round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddt_lightning.images import artifact_file_name, log_image, make_grid, save_png, to_uint8


def test_uint8_mapping_of_the_range_ends() -> None:
    values = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(values).tolist() == [0, 0, 128, 255, 255]


def test_grid_layout_padding_and_known_pixels() -> None:
    # 5 images of 2 x 3 pixels, 3 per row -> 2 rows; image n is filled with a distinct grey level.
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, -0.75])
    images = levels.view(5, 1, 1, 1).expand(5, 3, 2, 3).clone()  # (5, 3, 2, 3)
    images[4, 0, 1, 2] = 1.0  # one red-channel pixel at (row 1, col 2) of the last image
    grid = make_grid(images, nrow=3, padding=1, pad_value=1.0)

    assert grid.shape == (2 * (2 + 1) + 1, 3 * (3 + 1) + 1, 3) and grid.dtype == np.uint8
    expected = to_uint8(levels).tolist()
    for n in range(5):
        row, col = divmod(n, 3)
        top, left = 1 + row * 3, 1 + col * 4
        cell = grid[top : top + 2, left : left + 3]
        if n == 4:
            assert cell[1, 2].tolist() == [255, expected[4], expected[4]]
            cell = cell.copy()
            cell[1, 2, 0] = expected[4]
        assert (cell == expected[n]).all(), n
    # Padding lines (outer border and between cells) and the empty 6th cell are pad_value = white.
    assert (grid[0] == 255).all() and (grid[-1] == 255).all() and (grid[:, 0] == 255).all()
    assert (grid[:, 4] == 255).all() and (grid[3] == 255).all()
    assert (grid[4:6, 9:12] == 255).all()


def test_grid_pad_value_and_zero_padding() -> None:
    images = torch.full((2, 3, 2, 2), -1.0)
    grid = make_grid(images, nrow=2, padding=2, pad_value=0.0)
    assert grid.shape == (2 + 4, 2 * 4 + 2, 3)
    assert (grid[:2] == 128).all() and (grid[2:4, 2:4] == 0).all()
    assert make_grid(images, nrow=1, padding=0).shape == (4, 2, 3)


def test_save_png_round_trip(tmp_path: Path) -> None:
    array = make_grid(torch.rand(3, 3, 4, 4) * 2 - 1, nrow=2)
    path = save_png(array, tmp_path / "sub" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), array)
    with pytest.raises(ValueError, match="uint8"):
        save_png(array.astype(np.float32), tmp_path / "bad.png")


def test_artifact_file_name() -> None:
    assert artifact_file_name("val/recon", 42) == "images/val/recon_step0000042.png"
    assert artifact_file_name("../x y", 1) == "images/_/x_y_step0000001.png"
    assert artifact_file_name("val/samples", 2, ".txt") == "images/val/samples_step0000002.txt"


def test_log_image_to_mlflow_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"  # mlflow 3 refuses the plain file store (design.md section 6)
    logger = MLFlowLogger(
        experiment_name="images", tracking_uri=tracking_uri, artifact_location=str(tmp_path / "artifacts")
    )
    image = make_grid(torch.rand(4, 3, 8, 8) * 2 - 1, nrow=2)
    # A list as in trainer.loggers: the CSV logger is skipped silently.
    log_image([CSVLogger(tmp_path / "csv"), logger], "val/recon", image, step=7)
    log_image(CSVLogger(tmp_path / "csv"), "ignored", image, step=0)
    with monkeypatch.context() as patch:
        patch.setattr(rank_zero_only, "rank", 1)
        log_image(logger, "val/other_rank", image, step=7)  # only global rank 0 logs

    client = MlflowClient(tracking_uri=tracking_uri)
    listed = [info.path for info in client.list_artifacts(logger.run_id, "images/val")]
    assert listed == ["images/val/recon_step0000007.png"]
    local = client.download_artifacts(logger.run_id, listed[0], str(tmp_path / "download"))
    assert np.array_equal(np.asarray(Image.open(local).convert("RGB")), image)
