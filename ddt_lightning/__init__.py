"""ddt-lightning: Discrete Diffusion Timestep (DDT) tokens and DDT-LLaMA as a PyTorch Lightning codebase.

`from ddt_lightning import DDTTokenizer` gives the pure-PyTorch tokenizer (no Lightning import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DDTTokenizer", "__version__"]

if TYPE_CHECKING:
    from ddt_lightning.tokenizer import DDTTokenizer


def __getattr__(name: str) -> Any:
    # Lazy, so that `import ddt_lightning.data` (used by dataloader workers) stays light.
    if name == "DDTTokenizer":
        from ddt_lightning.tokenizer import DDTTokenizer

        return DDTTokenizer
    raise AttributeError(f"module 'ddt_lightning' has no attribute {name!r}")
