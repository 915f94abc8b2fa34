"""DeadCodeRestart: window and EMA rules, schedule, logging, state dict, and identical codebooks under 2-process DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ddt_lightning.callbacks import DeadCodeRestart
from ddt_lightning.models.quantizer import VectorQuantizer


class _Module(nn.Module):
    """Stands in for a LightningModule: the callback only needs `modules()` and `log`."""

    def __init__(self, vq: VectorQuantizer) -> None:
        super().__init__()
        self.vq = vq
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs: Any) -> None:
        self.logged[name] = value


def _vq_with_hits(hit: list[int], buffer_size: int = 64) -> VectorQuantizer:
    """A K=8 quantizer trained on batches that hit only the codes `hit`."""
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=8, dim=2, num_positions=2, cosine=False, restart_buffer_size=buffer_size)
    with torch.no_grad():
        vq.codebook.copy_(torch.stack([torch.arange(8.0) * 10, torch.zeros(8)], 1))  # (8, 2) on a line
        vq.embed_sum.copy_(vq.codebook)
    vq.train()
    for _ in range(3):
        z = vq.codebook[torch.tensor(hit)].repeat(2, 1) + 0.1 * torch.randn(2 * len(hit), 2)  # (n, 2)
        vq(z.view(-1, 2, 2))
    return vq


def test_window_rule_restarts_exactly_the_unused_codes() -> None:
    vq = _vq_with_hits([0, 1, 2, 5])
    dead = [3, 4, 6, 7]
    before = {k: getattr(vq, k).clone() for k in ("codebook", "cluster_size", "embed_sum")}
    cb = DeadCodeRestart()
    assert cb.dead_codes(vq).nonzero().squeeze(1).tolist() == dead
    assert cb.restart(vq) == 4
    alive = [0, 1, 2, 5]
    for key, value in before.items():
        assert torch.equal(getattr(vq, key)[alive], value[alive])  # live codes untouched
    candidates = vq.restart_candidates()  # (n, 2) the encoder outputs seen
    assert torch.cdist(vq.codebook[dead], candidates).min(1).values.max() < 1e-6  # each one is an encoder output
    assert vq.codebook[dead].unique(dim=0).shape[0] == 4  # drawn without replacement
    assert vq.cluster_size[dead].tolist() == [1.0] * 4  # fresh EMA statistics
    torch.testing.assert_close(vq.embed_sum[dead], vq.codebook[dead])
    assert int(vq.window_hits.sum()) == 0  # a new window starts
    assert not cb.dead_codes(vq).logical_not().any()  # and nothing has been hit in it yet


def test_restart_draws_only_filled_buffer_rows() -> None:
    vq = _vq_with_hits([6], buffer_size=64)  # 12 of 64 ring slots filled, all near code 6 at (60, 0)
    DeadCodeRestart().restart(vq)
    assert (vq.codebook[:6, 0] > 59).all()  # never a zero row of the unfilled buffer


def test_ema_rule_threshold() -> None:
    vq = _vq_with_hits([0, 1, 2, 3, 4, 5, 6, 7])
    with torch.no_grad():
        vq.tokens_per_step.fill_(16.0)  # expected uniform hits 16 / 8 = 2; threshold 0.5 -> dead below 1
        vq.cluster_size.copy_(torch.tensor([0.5, 0.99, 1.0, 3.0, 0.0, 2.0, 1.01, 0.2]))
    cb = DeadCodeRestart(rule="ema", threshold=0.5)
    assert cb.dead_codes(vq).nonzero().squeeze(1).tolist() == [0, 1, 4, 7]
    assert cb.restart(vq) == 4
    torch.testing.assert_close(vq.cluster_size, torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0, 2.0, 1.01, 1.0]))


def test_schedule_and_logging() -> None:
    cb = DeadCodeRestart(early_every=25, early_steps=500, every=100)
    checks = [s for s in range(1, 1001) if cb.is_check_step(s)]
    assert checks == [*range(25, 501, 25), 600, 700, 800, 900, 1000]

    vq = _vq_with_hits([0, 1])
    module = _Module(vq)
    cb = DeadCodeRestart(early_every=2, early_steps=4, every=3)
    restarted = []
    for _ in range(6):
        cb.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]
        restarted.append(module.logged["train/dead_codes_restarted"])
    # Checks after batches 2 and 4 (early) and 6: the first restarts the 6 unused codes; no training in between,
    # so every code is unused again at the next checks.
    assert cb.step == 6 and restarted == [0, 6, 6, 8, 8, 8]
    assert module.logged["train/dead_codes_restarted_total"] == 22 == cb.total_restarted


def test_callback_state_dict_round_trip() -> None:
    cb = DeadCodeRestart(seed=3)
    vq = _vq_with_hits([0])
    module = _Module(vq)
    for _ in range(30):
        cb.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]
    state = cb.state_dict()
    resumed = DeadCodeRestart(seed=3)
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.total_restarted, resumed.last_restarted) == (30, 7, 7)
    # The generator continues where it was: the next draws agree, and differ from a fresh generator's.
    assert torch.equal(torch.randperm(100, generator=cb.generator), torch.randperm(100, generator=resumed.generator))
    assert (
        resumed.state_key
        == cb.state_key
        == DeadCodeRestart(rule="window").state_key
        != DeadCodeRestart(rule="ema").state_key
    )


@pytest.mark.parametrize(("key", "value"), [("rule", "never"), ("every", 0), ("early_every", 0), ("threshold", -1)])
def test_invalid_arguments_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        DeadCodeRestart(**{key: value})


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_processes_keep_identical_codebooks(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_dead_code_script.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=110, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("codebook", "cluster_size", "embed_sum", "window_hits", "code_counts", "position_counts"):
        assert torch.equal(r0[key], r1[key]), key
    assert not torch.equal(r0["initial_codebook"], r1["initial_codebook"])  # ranks started apart
    assert r0["step"] == r1["step"] == 40
    assert r0["total_restarted"] == r1["total_restarted"] > 0  # dead codes occurred and were restarted
    assert r0["restarts_per_check"] == r1["restarts_per_check"]
    assert r0["usage"] > 0.3  # restarts brought codes into use (without them: 1 or 2 codes of 64)
    assert not torch.equal(r0["restart_buffer"], r1["restart_buffer"])  # the ranks did see different data
