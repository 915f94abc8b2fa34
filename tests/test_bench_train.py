"""`python -m ddt_lightning.bench train` on the micro preset: the figures are consistent with each other."""

from __future__ import annotations

import json

from ddt_lightning.bench import train
from ddt_lightning.tokenizer import DDTTokenizer, TokenizerConfig


def test_bench_train_reports_consistent_figures(capsys):
    train.main(["--preset", "micro", "--batch-size", "4", "--steps", "1", "--windows", "3", "--threads", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["preset"] == "micro" and result["batch_size"] == 4 and result["threads"] == 1
    assert result["parameters"] == sum(p.numel() for p in DDTTokenizer(TokenizerConfig.preset("micro")).parameters())
    assert result["images_per_s"] > 0 and result["gflop_per_image"] > 0 and result["peak_gflops"] > 0
    low, high = result["mfu_range"]
    assert 0 < low <= result["mfu"] <= high
    # achieved = FLOPs per image x images per second (rounding aside)
    achieved = result["gflop_per_image"] * result["images_per_s"]
    assert abs(achieved - result["achieved_gflops"]) <= 0.01 * achieved + 0.01
