"""Shared test set-up: fp32 CPU defaults and denormal flushing, as the training entry points use."""

import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _isolated_mlflow_store(monkeypatch):
    """`mlflow.set_tracking_uri` (called by every logger) exports MLFLOW_TRACKING_URI to the process, which our
    loggers honour: without this, one test's store would become the default of every later test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
