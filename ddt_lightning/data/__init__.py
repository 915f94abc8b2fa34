"""Data primitives without Lightning: the built-in compositional world and robust image decoding."""

from ddt_lightning.data.images import (
    DEFAULT_BACKGROUND,
    BadImageError,
    BadImageWarning,
    ImageTransform,
    load_rgb,
    uint8_to_tensor,
)
from ddt_lightning.data.world import (
    BACKGROUND,
    COLOURS,
    EDIT_KINDS,
    QUADRANTS,
    SHAPES,
    SIZES,
    Scene,
    World,
    WorldObject,
    WorldSample,
    render,
)

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DEFAULT_BACKGROUND",
    "EDIT_KINDS",
    "QUADRANTS",
    "SHAPES",
    "SIZES",
    "BadImageError",
    "BadImageWarning",
    "ImageTransform",
    "Scene",
    "World",
    "WorldObject",
    "WorldSample",
    "load_rgb",
    "render",
    "uint8_to_tensor",
]
