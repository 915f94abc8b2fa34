"""A GenEval-style checker for the built-in compositional world: reads an image back into objects, scores prompts.

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment") scores
a text-to-image model by detecting objects in its images and checking them against the prompt, per category, with
the overall score the mean of the per-category accuracies. Here the prompts are held-out scenes of the built-in
world (design.md sections 4 and 5) and the detector is a hand-written reader with kept tools and no learned weights:

1. **Pixels.** A world image is a dark background with flat-coloured objects whose edges are anti-aliased, i.e.
   `pixel = a * colour + (1 - a) * BACKGROUND` in sRGB values. For each pixel and each palette colour the coverage
   `a` is the projection of `pixel - BACKGROUND` on `colour - BACKGROUND` (clipped to [0, 1]); the pixel takes the
   colour whose mix is nearest in CIELAB (a perceptual space). Foreground: that colour's coverage >= 0.5; the rest
   is background.
2. **Objects.** `scipy.ndimage.label` finds connected components of each colour. Components smaller than
   `MIN_AREA` (a fraction of the image, so it scales with resolution) are noise, and components whose median
   CIELAB error exceeds `MAX_COLOUR_ERROR` (half the closest palette pair's distance) have no palette colour.
   Every world shape has an isotropic second-moment matrix, so an elongated component is taken for touching
   objects of one colour and split at the cores that erosion leaves (`ndimage.binary_erosion`, nearest-core
   assignment); what stays elongated (two squares side by side make a rectangle) is one object of shape
   "unknown". Each object's coverage map is its colour's coverage on the component grown by a rim (the
   anti-aliased edge) that belongs to no other object.
3. **Attributes** from coverage-weighted moments: area (coverage sum) gives the size, the centroid gives the
   position and quadrant, and scale-invariant central moments eta_pq give the shape: a triangle has third-order
   moments (|C3| = |(eta30 - 3 eta12) + i (3 eta21 - eta03)| = 0.068 for an equilateral one, 0 for the symmetric
   shapes); the others differ in the fourth-order ratio (eta40 + eta04) / (2 eta22): square 1.8, circle 3,
   diamond 6 (thresholds at the geometric midpoints). At 32 px, where a small object is ~6 px across, the measured
   features stay far from the thresholds and the reader agrees with every ground-truth scene
   (`validate_on_ground_truth`), also under Gaussian pixel noise of std 16, so no classifier is fitted.

Categories (GenEval's, adapted to the world; a prompt is a held-out scene with its caption). Matching is on
multisets, and, as in GenEval, only `single_object` and `counting` penalise extra objects:

- `single_object` (1-object scenes): exactly one object is detected and it has the scene's shape and colour;
- `two_objects` (2-object scenes): both shapes are present among the detected shapes;
- `counting` (all scenes): the number of detected objects equals the number in the scene;
- `colours` (all scenes): every object's colour is present among the detected colours;
- `position` (all scenes): every object is detected, matched by (shape, colour), in its quadrant;
- `colour_attribution` (scenes with >= 2 objects of different colours): every (shape, colour) pair is detected.

`geneval_scores` gives each category's accuracy over the prompts that test it, and `overall`, the mean of those.
Image-to-text and editing: `caption_accuracy` (the predicted caption, parsed with the world's grammar, names
exactly the scene's objects), `edit_success` (the detected objects are exactly the edited scene's) and `edit_l1`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ddt_lightning.data.world import (
    BACKGROUND,
    COLOURS,
    Scene,
    World,
    WorldObject,
    phrase_identity,
    split_caption,
)

# ---------------------------------------------------------------------------------------------------------------
# Constants (measured on world renders: see validate_on_ground_truth)
# ---------------------------------------------------------------------------------------------------------------

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
MIN_COVERAGE = 0.5  # a pixel is foreground when at least half of it is covered by an object
MAX_COLOUR_ERROR = 25.0  # CIELAB distance to the nearest palette mix; the closest palette pair is 50 apart
MIN_AREA = 0.006  # objects cover >= 0.022 of the image (small triangle); smaller components are noise
# Small objects cover <= 0.035 of the image, large ones >= 0.064 (triangle): split at the geometric mean.
SIZE_AREA_THRESHOLD = 0.048
TRIANGLE_C3 = 0.034  # half of |C3| of an equilateral triangle
SQUARE_MAX_RATIO = float(np.sqrt(1.8 * 3.0))  # (eta40 + eta04) / (2 eta22): square 1.8 | circle 3 | diamond 6
DIAMOND_MIN_RATIO = float(np.sqrt(3.0 * 6.0))
# Every world shape has an isotropic second-moment matrix, with eigenvalue 0.080 (disc) to 0.096 (triangle), and
# <= 0.12 measured on noisy 32 px renders; two touching discs have a major eigenvalue of 0.20, a 2:1 rectangle 0.17.
# A component above the threshold is taken for touching objects of one colour and split; a part still above it
# is no world shape ("unknown").
SPLIT_MAJOR = 0.14

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (K, 3)
_BG = np.array(BACKGROUND, dtype=np.float64)  # (3,)
_DIRECTIONS = _PALETTE - _BG  # (K, 3): from the background to each palette colour
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255], any leading shape (..., 3) -> (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])  # normalised by the D65 white point
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One object read back from an image; `shape` is "unknown" for a blob that is no world shape."""

    shape: str
    colour: str
    size: str
    x: float  # coverage-weighted centroid, fraction of the width, 0 = left
    y: float  # fraction of the height, 0 = top
    area: float  # covered fraction of the image
    colour_error: float  # mean CIELAB distance of the object's pixels to the palette colour's mix
    c3: float  # |C3|, the third-order (triangle) moment
    ratio4: float  # (eta40 + eta04) / (2 eta22), the fourth-order (square/circle/diamond) moment ratio

    @property
    def quadrant(self) -> str:
        return ("top" if self.y < 0.5 else "bottom") + " " + ("left" if self.x < 0.5 else "right")

    def identity(self) -> tuple[str, str, str, str]:
        """(shape, colour, size, quadrant), as `WorldObject.identity`."""
        return (self.shape, self.colour, self.size, self.quadrant)


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return image


def _coverage(image: np.ndarray) -> np.ndarray:
    """Coverage of every palette colour at every pixel: (H, W, 3) -> (H, W, K) in [0, 1]."""
    offset = image.astype(np.float64) - _BG  # (H, W, 3)
    return np.clip(offset @ _DIRECTIONS.T / (_DIRECTIONS**2).sum(1), 0.0, 1.0)


def _pixel_colours(coverage: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index whose background mix is nearest in CIELAB (H, W) and that distance (H, W).

    Only pixels that some colour covers at least MIN_COVERAGE can be foreground, so only those are converted
    (a few per cent of a world image); the others get index 0 and an infinite distance.
    """
    candidates = coverage.max(-1) >= MIN_COVERAGE  # (H, W)
    cover = coverage[candidates]  # (P, K)
    mixes = _BG + cover[..., None] * _DIRECTIONS  # (P, K, 3): the best mix of each colour with the background
    errors = np.linalg.norm(srgb_to_lab(image[candidates])[:, None, :] - srgb_to_lab(mixes), axis=-1)  # (P, K)
    index = np.zeros(candidates.shape, dtype=np.int64)
    error = np.full(candidates.shape, np.inf)
    index[candidates] = errors.argmin(-1)
    error[candidates] = errors.min(-1)
    return index, error


def _moments(weights: np.ndarray, top: int = 0, left: int = 0) -> dict[str, float]:
    """Area (pixels), centroid (pixels) and scale-invariant shape moments of a coverage map (h, w) at (top, left)."""
    height, width = weights.shape
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres, (h, w) each
    m00 = weights.sum()
    cx, cy = (weights * xs).sum() / m00, (weights * ys).sum() / m00
    dx, dy = xs - cx, ys - cy

    def eta(p: int, q: int) -> float:  # normalised central moment: invariant to translation and scale
        return float((weights * dx**p * dy**q).sum() / m00 ** (1 + (p + q) / 2))

    return {
        "area": float(m00),
        "x": float(cx) + left,
        "y": float(cy) + top,
        # Largest eigenvalue of the normalised second-moment matrix [[eta20, eta11], [eta11, eta02]].
        "major": 0.5 * (eta(2, 0) + eta(0, 2)) + float(np.hypot(0.5 * (eta(2, 0) - eta(0, 2)), eta(1, 1))),
        "c3": float(np.hypot(eta(3, 0) - 3 * eta(1, 2), 3 * eta(2, 1) - eta(0, 3))),
        "ratio4": (eta(4, 0) + eta(0, 4)) / max(2 * eta(2, 2), 1e-12),
    }


def _shape(c3: float, ratio4: float, major: float) -> str:
    if major > SPLIT_MAJOR:
        return "unknown"
    if c3 > TRIANGLE_C3:
        return "triangle"
    if ratio4 < SQUARE_MAX_RATIO:
        return "square"
    return "diamond" if ratio4 > DIAMOND_MIN_RATIO else "circle"


def _split_touching(mask: np.ndarray, min_pixels: float) -> list[np.ndarray]:
    """Split a component (h, w) bool at the cores that erosion leaves, assigning pixels to the nearest core.

    Kept only if every part is an object's size: a jagged single object may shed a stray one-pixel core.
    """
    core = mask
    for _ in range(min(mask.shape) // 2):  # until the cores separate or vanish
        core = ndimage.binary_erosion(core)
        cores, n = ndimage.label(core)
        if n == 0:
            break
        if n >= 2:
            # Nearest-core assignment: the index of the closest core pixel for every pixel.
            _, (rows, cols) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
            owner = cores[rows, cols] * mask  # (h, w), 0 outside the component
            parts = [owner == k for k in range(1, n + 1)]
            return parts if min(p.sum() for p in parts) >= min_pixels else [mask]
    return [mask]


def detect_objects(image: np.ndarray, min_area: float = MIN_AREA) -> list[DetectedObject]:
    """Objects of a world-style image (H, W, 3) uint8, in reading order (top to bottom, then left to right)."""
    image = _check_image(image)
    height, width, _ = image.shape
    per_colour = _coverage(image)  # (H, W, K)
    colour_index, error = _pixel_colours(per_colour, image)  # (H, W) each
    own_coverage = np.take_along_axis(per_colour, colour_index[..., None], -1)[..., 0]  # (H, W)
    foreground = own_coverage >= MIN_COVERAGE  # (H, W)
    min_pixels = min_area * height * width
    rim = max(1, round(min(height, width) / 64))  # the anti-aliased edge is ~1 px wide; wider for blurry images

    # Connected components of each colour, kept if large enough, with a box around each that leaves room for the rim.
    components: list[tuple[int, tuple[slice, slice], np.ndarray]] = []  # (palette index, box, (h, w) bool mask)
    kept = np.zeros((height, width), dtype=bool)  # every kept component's pixels
    for k in range(len(_COLOUR_NAMES)):
        labels, _ = ndimage.label(foreground & (colour_index == k))  # 4-connected
        for j, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            box = (
                slice(max(rows.start - rim, 0), min(rows.stop + rim, height)),
                slice(max(cols.start - rim, 0), min(cols.stop + rim, width)),
            )
            mask = labels[box] == j
            # Colour error is judged per component: noisy pixels stay in, off-palette blobs go.
            if mask.sum() >= min_pixels and np.median(error[box][mask]) <= MAX_COLOUR_ERROR:
                components.append((k, box, mask))
                kept[box] |= mask

    objects: list[DetectedObject] = []
    for k, box, mask in components:
        parts = [mask]
        if _moments(mask.astype(np.float64))["major"] > SPLIT_MAJOR:
            parts = _split_touching(mask, min_pixels)
        for part in parts:
            # The object's coverage: its own pixels plus the rim around them that belongs to no other object.
            region = ndimage.binary_dilation(part, structure=np.ones((3, 3)), iterations=rim)
            region &= ~(kept[box] & ~part)
            weights = per_colour[box][..., k] * region  # (h, w)
            if weights.sum() < min_pixels:
                continue
            m = _moments(weights, top=box[0].start, left=box[1].start)
            area = m["area"] / (height * width)
            objects.append(
                DetectedObject(
                    shape=_shape(m["c3"], m["ratio4"], m["major"]),
                    colour=_COLOUR_NAMES[k],
                    size="large" if area >= SIZE_AREA_THRESHOLD else "small",
                    x=m["x"] / width,
                    y=m["y"] / height,
                    area=area,
                    colour_error=float(error[box][part].mean()),
                    c3=m["c3"],
                    ratio4=m["ratio4"],
                )
            )
    return sorted(objects, key=lambda o: (o.y, o.x))


# ---------------------------------------------------------------------------------------------------------------
# GenEval prompts and scores
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenEvalPrompt:
    index: int  # the scene's index in the held-out (test) stream
    caption: str  # the world's caption, exactly as the LM is trained on it
    scene: Scene
    categories: tuple[str, ...]  # the categories this prompt tests, in CATEGORIES order
    reference: np.ndarray  # (R, R, 3) uint8, the ground-truth render


def held_out_world(seed: int, resolution: int = 32, max_objects: int = 3) -> World:
    """The held-out stream of `WorldDataModule(seed=seed)`: its test split is `World(seed=3 * seed + 2)`."""
    return World(seed=3 * seed + 2, resolution=resolution, max_objects=max_objects)


def prompt_categories(scene: Scene) -> tuple[str, ...]:
    n = len(scene.objects)
    tested = {
        "single_object": n == 1,
        "two_objects": n == 2,
        "counting": True,
        "colours": True,
        "position": True,
        "colour_attribution": len({o.colour for o in scene.objects}) >= 2,
    }
    return tuple(c for c in CATEGORIES if tested[c])


def geneval_suite(seed: int, n: int, resolution: int = 32, max_objects: int = 3) -> list[GenEvalPrompt]:
    """The first `n` held-out scenes of `WorldDataModule(seed=seed)`'s test split, as GenEval prompts."""
    world = held_out_world(seed, resolution, max_objects)
    prompts = []
    for i in range(n):
        sample = world.sample(i)
        prompts.append(GenEvalPrompt(i, sample.caption, sample.scene, prompt_categories(sample.scene), sample.image))
    return prompts


def _contains(found: Sequence[tuple], wanted: Sequence[tuple]) -> bool:
    """Multiset containment: every wanted item is found, as many times as it is wanted."""
    return not Counter(wanted) - Counter(found)


def score_objects(detected: Sequence[DetectedObject], scene: Scene, categories: Sequence[str]) -> dict[str, bool]:
    """The rules of the module docstring, for already-detected objects."""
    targets = scene.objects

    def keys(objects: Sequence, *attributes: str) -> list[tuple]:
        return [tuple(getattr(o, a) for a in attributes) for o in objects]

    rules = {
        "single_object": lambda: (
            len(detected) == 1 and keys(detected, "shape", "colour") == keys(targets, "shape", "colour")
        ),
        "two_objects": lambda: _contains(keys(detected, "shape"), keys(targets, "shape")),
        "counting": lambda: len(detected) == len(targets),
        "colours": lambda: _contains(keys(detected, "colour"), keys(targets, "colour")),
        "position": lambda: _contains(
            keys(detected, "shape", "colour", "quadrant"), keys(targets, "shape", "colour", "quadrant")
        ),
        "colour_attribution": lambda: _contains(keys(detected, "shape", "colour"), keys(targets, "shape", "colour")),
    }
    return {c: bool(rules[c]()) for c in categories}


def score_image(image: np.ndarray, prompt: GenEvalPrompt) -> dict[str, bool]:
    """Pass/fail of `image` (H, W, 3) uint8 for each category `prompt` tests."""
    return score_objects(detect_objects(image), prompt.scene, prompt.categories)


def _accuracies(results: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Per-category accuracy over the prompts that test the category, and `overall`, the mean of those."""
    scores = {}
    for category in CATEGORIES:
        passed = [r[category] for r in results if category in r]
        if passed:
            scores[category] = float(np.mean(passed))
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


def geneval_scores(images: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[GenEvalPrompt]) -> dict[str, float]:
    """GenEval scores of images (N, H, W, 3) uint8 generated for `prompts`: per category and `overall`."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return _accuracies([score_image(image, prompt) for image, prompt in zip(images, prompts)])


# ---------------------------------------------------------------------------------------------------------------
# Captioning and editing
# ---------------------------------------------------------------------------------------------------------------


def parse_caption(text: str) -> list[tuple[str, str, str, str]]:
    """Objects named by a caption in the world's grammar, as (shape, colour, size, quadrant) like `identity()`.

    Grammar: a template's prefix, then "P", "P1 and P2" or "P1, P2, ... and Pn" with each P "a {size} {colour}
    {shape} in the {quadrant}" (`world.split_caption`). Raises ValueError on anything else.
    """
    return [phrase_identity(p) for p in split_caption(text).phrases]


def caption_accuracy(predicted_caption: str, scene: Scene) -> bool:
    """Exact-attribute accuracy: the caption names exactly the scene's objects (a multiset; order is free)."""
    try:
        named = parse_caption(predicted_caption)
    except ValueError:
        return False
    return Counter(named) == Counter(o.identity() for o in scene.objects)


CAPTION_ATTRIBUTES = ("parsed", "count", "shape", "colour", "size", "quadrant")


def caption_attribute_scores(predicted_caption: str, scene: Scene) -> dict[str, bool]:
    """Which parts of a caption are right, to see what an exact-attribute miss is made of: `parsed` (the world's
    grammar), `count` (as many objects as the scene), and per attribute whether the multiset of that attribute over
    the named objects equals the scene's (so "a red square and a blue circle" for a blue square and a red circle
    gets shape and colour right, and fails `caption_accuracy`). All False when the caption does not parse."""
    try:
        named = parse_caption(predicted_caption)
    except ValueError:
        return dict.fromkeys(CAPTION_ATTRIBUTES, False)
    truth = [o.identity() for o in scene.objects]  # (shape, colour, size, quadrant)
    scores = {"parsed": True, "count": len(named) == len(truth)}
    for i, attribute in enumerate(("shape", "colour", "size", "quadrant")):
        scores[attribute] = Counter(n[i] for n in named) == Counter(t[i] for t in truth)
    return scores


def _identities(objects: Sequence[DetectedObject] | Sequence[WorldObject], with_size: bool) -> Counter:
    return Counter((o.shape, o.colour, o.quadrant, o.size)[: 4 if with_size else 3] for o in objects)


def edit_success(edited_image: np.ndarray, target_scene: Scene, check_size: bool = True) -> bool:
    """The detected objects are exactly the target scene's, by count, shape, colour, quadrant and size (a resize
    edit changes the size alone; `check_size=False` leaves it out)."""
    return _identities(detect_objects(edited_image), check_size) == _identities(target_scene.objects, check_size)


def edit_l1(edited_image: np.ndarray, reference_image: np.ndarray) -> float:
    """Mean absolute difference of two (H, W, 3) uint8 images on the [0, 1] scale."""
    a, b = _check_image(edited_image), _check_image(reference_image)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255.0)


# ---------------------------------------------------------------------------------------------------------------
# Validation on ground truth
# ---------------------------------------------------------------------------------------------------------------


def attribute_agreement(detected: Sequence[DetectedObject], scene: Scene) -> dict[str, list[bool]]:
    """Per scene object, whether the detection matched to it (nearest centroids, Hungarian) has each attribute."""
    targets = scene.objects
    found: dict[int, DetectedObject] = {}
    if detected and targets:
        cost = np.array([[np.hypot(d.x - t.x, d.y - t.y) for d in detected] for t in targets])  # (targets, detected)
        found = {int(t): detected[int(d)] for t, d in zip(*linear_sum_assignment(cost))}
    agree: dict[str, list[bool]] = {a: [] for a in ("shape", "colour", "size", "quadrant")}
    for i, target in enumerate(targets):
        for attribute, values in agree.items():
            values.append(i in found and getattr(found[i], attribute) == getattr(target, attribute))
    return agree


def validate_on_ground_truth(resolution: int = 32, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Agreement of the reader with the ground truth on the first `n` held-out prompts of `seed`, and their scores.

    `agreement/<attribute>`: fraction of scene objects whose matched detection has the right shape, colour, size or
    quadrant; `agreement/count`: fraction of scenes with the right number of detections; `agreement/scene`:
    fraction of scenes read back exactly (the multiset of (shape, colour, size, quadrant)); `geneval/<category>`
    and `geneval/overall`: the scores of the ground-truth renders as their own images (1.0 for a perfect reader).
    """
    per_object: dict[str, list[bool]] = {a: [] for a in ("shape", "colour", "size", "quadrant")}
    count, exact, results = [], [], []
    for prompt in geneval_suite(seed, n, resolution):
        detected = detect_objects(prompt.reference)
        for attribute, values in attribute_agreement(detected, prompt.scene).items():
            per_object[attribute] += values
        count.append(len(detected) == len(prompt.scene.objects))
        exact.append(_identities(detected, True) == _identities(prompt.scene.objects, True))
        results.append(score_objects(detected, prompt.scene, prompt.categories))
    agreement = {f"agreement/{a}": float(np.mean(v)) for a, v in per_object.items()}
    agreement |= {"agreement/count": float(np.mean(count)), "agreement/scene": float(np.mean(exact))}
    return agreement | {f"geneval/{c}": v for c, v in _accuracies(results).items()}
