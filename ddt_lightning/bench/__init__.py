"""Benchmarks: `python -m ddt_lightning.bench vq|train|generate` (each prints one JSON object on its last line)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (None: unchanged), restoring the count after: it is
    process-global, and a caller in the same process (a test) keeps its own."""
    import torch  # here, so that `python -m ddt_lightning.bench vq` (torch only in its workers) stays light

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
