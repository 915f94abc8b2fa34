"""Subnormal flushing (ddt_lightning/runtime.py): every thread of a `ddt` process flushes, which only holds if the
entry point sets it before torch's thread pool starts."""

import subprocess
import sys

import pytest
import torch

# Multiplies 2^20 subnormals by 1 on torch's threads (it splits an element-wise op this large between them) and
# prints how many products stayed nonzero: 0 when every thread flushes (DAZ), all of them when none does.
CHECK = """
x = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)  # the bits of the smallest subnormal, 1.4e-45
print(int((x * 1.0 != 0).sum()))
"""


def _nonzero(prelude: str) -> int:
    proc = subprocess.run([sys.executable, "-c", "import torch\n" + prelude + CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_ddt_entry_point_flushes_subnormals_on_every_thread():
    entry = "from ddt_lightning import cli\ntry:\n    cli.main(['pipeline', '--help'])\nexcept SystemExit:\n    pass\n"
    assert _nonzero(entry) == 0


def test_flushing_after_the_thread_pool_started_misses_its_threads():
    """Why the entry points flush first: set later, only the calling thread flushes (the check can tell)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: nothing to miss")
    assert _nonzero("") == 1 << 20  # no flushing: every product stays subnormal
    late = "torch.ones(1 << 20) * 2\nfrom ddt_lightning.runtime import flush_denormals\n"
    late += "assert flush_denormals()\n"
    assert 0 < _nonzero(late) < 1 << 20
