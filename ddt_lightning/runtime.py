"""The process's CPU floating-point environment (ours): subnormal floats flushed to zero.

Training drives some weights, activations and gradients into the subnormal range (|x| < 1.2e-38 in float32). On
x86 CPUs every operation that touches a subnormal takes a microcode assist of about a hundred cycles: measured on
this project's 2-core CPU machines, the frozen feature network (`python -m ddt_lightning.perceptual train`) slowed
from 8 to 1 step/s as its loss fell, and ran at a steady 3.7 steps/s on one thread with subnormals flushed (8.5 on
two). Flushing changes values only below 1.2e-38, far under float32's resolution of any quantity this code computes
(the main job's tokenizer: 27.61 / 25.41 dB held out with it after 3,096 steps, 27.71 / 25.41 without after 3,300;
README, "The main job"), so every entry point (`ddt ...`, `python -m ddt_lightning.<tool>`) sets it first.

The flags (FTZ/DAZ) live per CPU thread and a new thread inherits its creator's: they must be set before PyTorch
starts its intra-op thread pool, i.e. before the first parallel operation, or the pool's threads keep subnormals
(`tests/test_runtime.py` checks both the entry point and this ordering).
"""

from __future__ import annotations

import torch


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on this thread and on the threads it starts later; returns whether the CPU
    supports it (x86 with SSE3; elsewhere a no-op that returns False)."""
    return bool(torch.set_flush_denormal(True))
