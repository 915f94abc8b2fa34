"""Lightning callbacks (installed as `ddt_lightning.callbacks`): side effects that stay out of the hot path."""

from ddt_lightning.callbacks.dead_code import DeadCodeRestart
from ddt_lightning.callbacks.ema import WeightEMA
from ddt_lightning.callbacks.image_grids import ReconstructionGrids
from ddt_lightning.callbacks.samples import GenerationSamples
from ddt_lightning.callbacks.take_off import TakeOffMonitor

__all__ = ["DeadCodeRestart", "GenerationSamples", "ReconstructionGrids", "TakeOffMonitor", "WeightEMA"]
