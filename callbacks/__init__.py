"""Lightning callbacks (installed as `ddt_lightning.callbacks`): side effects that stay out of the hot path."""

from ddt_lightning.callbacks.dead_code import DeadCodeRestart
from ddt_lightning.callbacks.image_grids import ReconstructionGrids
from ddt_lightning.callbacks.samples import GenerationSamples

__all__ = ["DeadCodeRestart", "GenerationSamples", "ReconstructionGrids"]
