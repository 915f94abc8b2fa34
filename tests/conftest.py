"""Shared test set-up: fp32 CPU defaults and denormal flushing, as the training entry points use."""

import torch

torch.set_flush_denormal(True)
