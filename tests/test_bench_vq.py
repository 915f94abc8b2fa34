"""`python -m ddt_lightning.bench vq --quick`: one JSON object on the last stdout line, indices that agree with brute
force and faiss; and the dispatcher's usage message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ddt_lightning.bench.__main__ import main as bench_main


def test_quick_vq_bench_reports_all_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ddt_lightning.bench", "vq", "--quick", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("time_ratio_vs_vqpytorch", "mem_ratio_vs_vqpytorch", "time_ratio_vs_faiss"):
        assert isinstance(result[key], float) and result[key] > 0, key
    for key in ("ours_seconds", "faiss_seconds", "vqpytorch_seconds", "ours_seconds_n_peer", "ours_search_seconds"):
        assert result[key] > 0, key
    for key in ("ours_peak_mib", "vqpytorch_peak_mib", "ours_peak_mib_n_peer", "faiss_peak_mib"):
        assert result[key] >= 0, key
    assert result["errors"] == {}
    assert (result["n"], result["n_peer"], result["codebook_size"], result["dim"]) == (2048, 512, 1024, 16)
    assert result["torch_threads"] == 2
    assert result["indices_agree_with_bruteforce"] == 1.0  # exact search
    assert result["indices_agree_with_faiss"] == 1.0
    assert result["time_ratio_vs_faiss"] == pytest.approx(result["ours_seconds"] / result["faiss_seconds"])
    assert "bench vq" in proc.stderr  # progress lines go to stderr


def test_unknown_bench_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown bench 'nope'" in err and "vq" in err and "train" in err
    assert bench_main([]) == 2
