"""Shared test set-up: fp32 CPU defaults and denormal flushing, as the entry points set it (runtime.py)."""

import pytest
import torch

from ddt_lightning.runtime import flush_denormals

flush_denormals()


@pytest.fixture(autouse=True)
def _isolated_mlflow_store(monkeypatch):
    """`mlflow.set_tracking_uri` (called by every logger) exports MLFLOW_TRACKING_URI to the process, which our
    loggers honour: without this, one test's store would become the default of every later test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _thread_count_is_not_leaked(request):
    """torch's intra-op thread count is process-global and changes float reduction order: a test that leaves it
    changed makes every later in-process run differ from a fresh subprocess (the exact-resume tests compare the
    two). Restore it, and fail the test that leaked it."""
    threads = torch.get_num_threads()
    yield
    leaked = torch.get_num_threads()
    if leaked != threads:
        torch.set_num_threads(threads)
        pytest.fail(f"{request.node.nodeid} left torch.get_num_threads() at {leaked} (was {threads})")
