"""The built-in compositional world: procedurally drawn scenes with captions, edits and ground truth (ours).

design.md section 5: the embedded data set for the main job, the tests and the GenEval-style checker. A scene
holds 1..`max_objects` non-overlapping objects on a plain dark background; each object has a shape
(circle, square, triangle, diamond), one of six well-separated colours, a size (small, large) and a centre
(x, y) in [0, 1] (y grows downwards, as in image coordinates). Each scene comes with

- a caption naming size, colour, shape and quadrant of every object, in reading order ("a large red circle in
  the top left and a small blue square in the bottom right"; `Scene.caption`),
- an edit instruction (recolour, move to another quadrant, remove, add, resize) whose target is named
  unambiguously, and the edited scene and image.

Everything is a pure function of `(seed, index)`: sample `i` draws from its own generator
`np.random.default_rng([seed, i])`, so any sample is reproducible alone and in any order. Images are drawn
`supersample` times larger with PIL and reduced with a box (area) filter, which gives clean anti-aliased edges
at any resolution. No torch here.

Invariants (checked by `Scene.is_valid` and kept by every edit): objects lie inside the image, do not overlap
(their circumscribed circles are `GAP` apart), their centres are at least `MIDLINE_MARGIN` from the midlines so
the quadrant word is never ambiguous, and no two objects share (shape, colour, size, quadrant), so every
object has a unique description.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Fixed RGB table: hues 60 degrees apart at high saturation, so that colour distance separates them easily.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 205, 215),
}
SIZES: dict[str, float] = {"small": 0.10, "large": 0.17}  # reference half-extent, as a fraction of the width
BACKGROUND: tuple[int, int, int] = (20, 20, 28)
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "remove", "add", "resize")

# Circumradius of each shape in units of the size's half-extent. Chosen so the four shapes have similar areas
# (circle pi h^2 = 3.1 h^2, square 3.1 h^2, diamond 2.9 h^2, triangle 2.2 h^2) and read as the same size.
_SHAPE_RADIUS: dict[str, float] = {"circle": 1.0, "square": 0.88 * math.sqrt(2.0), "triangle": 1.3, "diamond": 1.2}
GAP = 0.03  # minimum distance between circumscribed circles (1 px at 32x32)
MIDLINE_MARGIN = 0.05  # minimum distance of a centre from x = 0.5 and y = 0.5
MAX_PLACEMENT_DRAWS = 100  # rejection-sampling bound for a whole scene
MAX_EDIT_DRAWS = 20  # rejection-sampling bound for one move/add proposal
CAPTION_TEMPLATES: tuple[str, ...] = ("{objects}", "an image of {objects}", "a picture showing {objects}")


# ---------------------------------------------------------------------------------------------------------------
# Scene description
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the width, 0 = left
    y: float  # centre, fraction of the height, 0 = top

    @property
    def quadrant(self) -> str:
        return ("top" if self.y < 0.5 else "bottom") + " " + ("left" if self.x < 0.5 else "right")

    @property
    def radius(self) -> float:
        """Circumscribed radius as a fraction of the width (used for the overlap and bounds checks)."""
        return SIZES[self.size] * _SHAPE_RADIUS[self.shape]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.quadrant}"

    def identity(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.quadrant)


@dataclass
class Scene:
    objects: list[WorldObject]
    background: tuple[int, int, int] = BACKGROUND

    def to_dict(self) -> dict[str, Any]:
        return {"background": list(self.background), "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(
            objects=[WorldObject(**o) for o in data["objects"]],
            background=tuple(int(c) for c in data["background"]),  # type: ignore[arg-type]
        )

    def caption(self, template: str = "{objects}") -> str:
        """The objects in reading order (quadrants top left, top right, bottom left, bottom right; inside one,
        top to bottom, then left to right), so a caption is a function of the image and not of the order in
        which the scene was drawn: a captioner learns one target per image instead of one per permutation."""
        return template.format(objects=_join([o.phrase() for o in reading_order(self.objects)]))

    def is_valid(self) -> bool:
        if len({o.identity() for o in self.objects}) != len(self.objects):
            return False
        return all(_fits(o, self.objects[:i]) for i, o in enumerate(self.objects))


@dataclass
class WorldSample:
    index: int
    image: np.ndarray  # (H, W, 3) uint8
    scene: Scene
    caption: str
    edit_kind: str  # one of EDIT_KINDS
    edit_instruction: str
    edited_scene: Scene
    edited_image: np.ndarray  # (H, W, 3) uint8


def reading_order(objects: list[WorldObject]) -> list[WorldObject]:
    """`objects` sorted by quadrant (top left, top right, bottom left, bottom right), then by centre y, then x."""
    return sorted(objects, key=lambda o: (o.y >= 0.5, o.x >= 0.5, o.y, o.x))


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) in the ({'|'.join(QUADRANTS)})"
)
_AFFIXES: tuple[tuple[str, str], ...] = tuple(tuple(t.split("{objects}")) for t in CAPTION_TEMPLATES)  # type: ignore[misc]


@dataclass(frozen=True)
class CaptionParts:
    """A caption of the world's grammar cut into its template's prefix and suffix and one phrase per object
    (`WorldObject.phrase()`, in the caption's order); `text()` puts it back together."""

    prefix: str
    phrases: tuple[str, ...]
    suffix: str

    def text(self) -> str:
        return self.prefix + _join(list(self.phrases)) + self.suffix

    def with_phrases(self, phrases: list[str] | tuple[str, ...]) -> CaptionParts:
        return CaptionParts(self.prefix, tuple(phrases), self.suffix)


def split_caption(text: str) -> CaptionParts:
    """Cut a caption of the world's grammar: a template's prefix, then "P", "P1 and P2" or "P1, P2, ... and Pn" with
    each P "a {size} {colour} {shape} in the {quadrant}". Raises ValueError naming the text on anything else."""
    text = text.strip()
    for prefix, suffix in sorted(_AFFIXES, key=lambda a: -len(a[0])):  # longest prefix first
        if text.startswith(prefix) and text.endswith(suffix) and len(text) > len(prefix) + len(suffix):
            body = text[len(prefix) : len(text) - len(suffix)]
            head, sep, last = body.rpartition(" and ")
            phrases = [*head.split(", "), last] if sep else [body]
            if all(_PHRASE.fullmatch(p) for p in phrases):
                return CaptionParts(prefix, tuple(phrases), suffix)
    raise ValueError(f"not a caption of the world's grammar: {text!r}")


def phrase_identity(phrase: str) -> tuple[str, str, str, str]:
    """(shape, colour, size, quadrant) of one phrase of `split_caption`, like `WorldObject.identity()`."""
    match = _PHRASE.fullmatch(phrase)
    if match is None:
        raise ValueError(f"not an object phrase of the world's grammar: {phrase!r}")
    return (match[3], match[2], match[1], match[4])


def _in_bounds(obj: WorldObject) -> bool:
    r = obj.radius
    return (
        r <= obj.x <= 1.0 - r
        and r <= obj.y <= 1.0 - r
        and abs(obj.x - 0.5) >= MIDLINE_MARGIN
        and abs(obj.y - 0.5) >= MIDLINE_MARGIN
    )


def _fits(obj: WorldObject, others: list[WorldObject]) -> bool:
    """`obj` lies inside the image and keeps GAP from every object in `others`."""
    if not _in_bounds(obj):
        return False
    return all(math.hypot(obj.x - o.x, obj.y - o.y) >= obj.radius + o.radius + GAP for o in others)


def _quadrant_box(quadrant: str, radius: float) -> tuple[float, float, float, float]:
    """(lo_x, hi_x, lo_y, hi_y) of centres inside `quadrant`, `radius` from the border, off the midlines."""
    vertical, horizontal = quadrant.split()
    lo_x, hi_x = (radius, 0.5 - MIDLINE_MARGIN) if horizontal == "left" else (0.5 + MIDLINE_MARGIN, 1.0 - radius)
    lo_y, hi_y = (radius, 0.5 - MIDLINE_MARGIN) if vertical == "top" else (0.5 + MIDLINE_MARGIN, 1.0 - radius)
    return lo_x, hi_x, lo_y, hi_y


def _random_object(rng: np.random.Generator) -> WorldObject:
    u = rng.random(6)  # one draw for all attributes: Generator calls dominate the cost of a scene
    shape = SHAPES[int(u[0] * len(SHAPES))]
    colour = _COLOUR_NAMES[int(u[1] * len(_COLOUR_NAMES))]
    size = _SIZE_NAMES[int(u[2] * len(_SIZE_NAMES))]
    quadrant = QUADRANTS[int(u[3] * len(QUADRANTS))]
    lo_x, hi_x, lo_y, hi_y = _quadrant_box(quadrant, SIZES[size] * _SHAPE_RADIUS[shape])
    return WorldObject(shape, colour, size, float(lo_x + u[4] * (hi_x - lo_x)), float(lo_y + u[5] * (hi_y - lo_y)))


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _vertices(obj: WorldObject, scale: float) -> list[tuple[float, float]]:
    cx, cy, h = obj.x * scale, obj.y * scale, SIZES[obj.size] * scale
    if obj.shape == "square":
        s = 0.88 * h
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if obj.shape == "diamond":
        s = _SHAPE_RADIUS["diamond"] * h
        return [(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)]
    if obj.shape == "triangle":  # equilateral, pointing up, centred on its centroid
        r = _SHAPE_RADIUS["triangle"] * h
        return [(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)]
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def _draw(draw: ImageDraw.ImageDraw, scene: Scene, size: int, fill: Any) -> None:
    """Draw every object of `scene` on a `size`-pixel canvas, `fill(obj)` giving each object's fill value."""
    for obj in scene.objects:
        if obj.shape == "circle":
            cx, cy, h = obj.x * size, obj.y * size, SIZES[obj.size] * size
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill(obj))
        else:
            draw.polygon(_vertices(obj, size), fill=fill(obj))


def render(scene: Scene, resolution: int, supersample: int = 4) -> np.ndarray:
    """Draw `scene` as a (resolution, resolution, 3) uint8 array (anti-aliased by area-averaging a larger canvas)."""
    size = resolution * supersample
    canvas = Image.new("RGB", (size, size), tuple(scene.background))
    _draw(ImageDraw.Draw(canvas), scene, size, lambda obj: COLOURS[obj.colour])
    if supersample > 1:
        canvas = canvas.reduce(supersample)  # box filter: each output pixel is the mean of a supersample^2 block
    return np.asarray(canvas, dtype=np.uint8)


def render_shape_labels(scene: Scene, resolution: int, supersample: int = 4) -> np.ndarray:
    """The shape under each pixel of `render(scene, resolution)`: a (resolution, resolution) uint8 map, 0 for the
    background and 1 + `SHAPES.index(shape)` for an object - the label covering most of the pixel's
    supersample^2 block (objects never overlap)."""
    size = resolution * supersample
    canvas = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(canvas), scene, size, lambda obj: 1 + SHAPES.index(obj.shape))
    blocks = np.asarray(canvas).reshape(resolution, supersample, resolution, supersample)
    counts = np.stack([(blocks == label).sum(axis=(1, 3)) for label in range(1 + len(SHAPES))])  # (L, R, R)
    return counts.argmax(0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------------------------------------------


def describe(scene: Scene, target: int) -> str:
    """The shortest description of object `target` that matches no other object of `scene`."""
    obj = scene.objects[target]
    others = [o for i, o in enumerate(scene.objects) if i != target]
    candidates = [
        (f"{obj.colour} {obj.shape}", lambda o: (o.colour, o.shape) == (obj.colour, obj.shape)),
        (f"{obj.size} {obj.colour} {obj.shape}", lambda o: o.identity()[:3] == obj.identity()[:3]),
        (
            f"{obj.colour} {obj.shape} in the {obj.quadrant}",
            lambda o: (o.colour, o.shape, o.quadrant) == (obj.colour, obj.shape, obj.quadrant),
        ),
    ]
    for text, same in candidates:
        if not any(same(o) for o in others):
            return text
    return f"{obj.size} {obj.colour} {obj.shape} in the {obj.quadrant}"  # unique by the scene invariant


def _propose_edit(rng: np.random.Generator, scene: Scene, kind: str, max_objects: int) -> tuple[str, Scene] | None:
    """One edit of `kind`, or None when it is impossible for this scene."""
    objects = scene.objects
    n = len(objects)
    if kind == "add":
        if n >= max_objects:
            return None
        for _ in range(MAX_EDIT_DRAWS):
            new = _random_object(rng)
            edited = Scene([*objects, new], scene.background)
            if edited.is_valid():
                return f"add {new.phrase()}", edited
        return None
    if kind == "remove" and n == 1:
        return None
    target = int(rng.integers(n))
    obj, ref = objects[target], describe(scene, target)

    def with_target(new: WorldObject | None) -> Scene:  # the scene with the target replaced (None: removed)
        if new is None:
            return Scene([o for i, o in enumerate(objects) if i != target], scene.background)
        return Scene([new if i == target else o for i, o in enumerate(objects)], scene.background)

    if kind == "remove":
        return f"remove the {ref}", with_target(None)
    if kind == "recolour":
        for colour in rng.permutation([c for c in COLOURS if c != obj.colour]):
            edited = with_target(replace(obj, colour=str(colour)))
            if edited.is_valid():
                return f"make the {ref} {colour}", edited
        return None
    if kind == "resize":
        new_size = "small" if obj.size == "large" else "large"
        edited = with_target(replace(obj, size=new_size))
        if edited.is_valid():
            return f"make the {ref} {'larger' if new_size == 'large' else 'smaller'}", edited
        return None
    if kind == "move":
        for _ in range(MAX_EDIT_DRAWS):
            quadrant = QUADRANTS[rng.choice([i for i, q in enumerate(QUADRANTS) if q != obj.quadrant])]
            lo_x, hi_x, lo_y, hi_y = _quadrant_box(quadrant, obj.radius)
            x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            edited = with_target(replace(obj, x=x, y=y))
            if edited.is_valid():
                return f"move the {ref} to the {quadrant}", edited
        return None
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


# ---------------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------------


class World:
    """A deterministic, indexable stream of scenes: `World(seed).sample(i)` depends on `(seed, i)` only."""

    def __init__(self, seed: int = 0, resolution: int = 32, max_objects: int = 3, supersample: int = 4) -> None:
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if not 1 <= max_objects <= 6:
            raise ValueError(f"max_objects must be in 1..6 (they must fit without overlap), got {max_objects}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.seed = seed
        self.resolution = resolution
        self.max_objects = max_objects
        self.supersample = supersample

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"world index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, index])

    def _scene_and_caption(self, rng: np.random.Generator) -> tuple[Scene, str]:
        # Draw order matters: scene, then caption template, then the edit (sample() continues the same stream).
        n = int(rng.integers(1, self.max_objects + 1))
        objects: list[WorldObject] = []
        identities: set[tuple[str, str, str, str]] = set()
        for _ in range(MAX_PLACEMENT_DRAWS):
            if len(objects) == n:
                break
            candidate = _random_object(rng)
            if candidate.identity() not in identities and _fits(candidate, objects):
                objects.append(candidate)
                identities.add(candidate.identity())
        # The first draw always fits an empty canvas, so a scene has at least one object.
        scene = Scene(objects)
        return scene, scene.caption(CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))])

    def scene(self, index: int) -> Scene:
        return self._scene_and_caption(self._rng(index))[0]

    def image_and_caption(self, index: int) -> tuple[np.ndarray, str]:
        """The fast path used to render data sets: identical to `sample(index)`'s image and caption."""
        scene, caption = self._scene_and_caption(self._rng(index))
        return render(scene, self.resolution, self.supersample), caption

    def sample(self, index: int) -> WorldSample:
        rng = self._rng(index)
        scene, caption = self._scene_and_caption(rng)
        for kind in rng.permutation(EDIT_KINDS):
            proposal = _propose_edit(rng, scene, str(kind), self.max_objects)
            if proposal is not None:
                break
        else:  # unreachable: recolouring a lone object, or removing one of several, is always possible
            raise RuntimeError(f"no edit possible for world sample {index} (seed {self.seed})")
        instruction, edited = proposal
        return WorldSample(
            index=index,
            image=render(scene, self.resolution, self.supersample),
            scene=scene,
            caption=caption,
            edit_kind=str(kind),
            edit_instruction=instruction,
            edited_scene=edited,
            edited_image=render(edited, self.resolution, self.supersample),
        )

    def render_range(self, start: int, stop: int, progress: bool = True) -> tuple[np.ndarray, list[str]]:
        """Images (N, H, W, 3) uint8 and captions of samples `start..stop-1`, with a progress bar."""
        n = stop - start
        images = np.empty((n, self.resolution, self.resolution, 3), dtype=np.uint8)  # (N, H, W, 3)
        captions: list[str] = []
        desc = f"rendering world (seed {self.seed}, {self.resolution}px)"
        for i in tqdm(range(n), desc=desc, disable=not progress, mininterval=1.0, unit="img"):
            images[i], caption = self.image_and_caption(start + i)
            captions.append(caption)
        return images, captions
