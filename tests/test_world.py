"""The built-in compositional world: determinism, geometry, captions, edits, serialisation, rendering."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

from ddt_lightning.data.world import (
    BACKGROUND,
    COLOURS,
    EDIT_KINDS,
    GAP,
    QUADRANTS,
    SHAPES,
    SIZES,
    Scene,
    World,
    WorldObject,
    describe,
    phrase_identity,
    reading_order,
    render,
    split_caption,
)

N = 120  # samples per property test: enough to see every edit kind, fast (about 0.1 s)


def _summary(sample) -> tuple:
    return (
        sample.image.tobytes(),
        sample.caption,
        json.dumps(sample.scene.to_dict()),
        sample.edit_instruction,
        json.dumps(sample.edited_scene.to_dict()),
        sample.edited_image.tobytes(),
    )


def test_same_seed_and_index_give_identical_samples_in_any_order():
    forward = [_summary(World(seed=7).sample(i)) for i in range(8)]
    world = World(seed=7)
    backward = [_summary(world.sample(i)) for i in reversed(range(8))][::-1]
    assert forward == backward
    # The fast path used to render data sets agrees with sample().
    image, caption = World(seed=7).image_and_caption(5)
    assert image.tobytes() == forward[5][0] and caption == forward[5][1]


def test_different_seeds_give_different_scenes():
    a, b = World(seed=0), World(seed=1)
    for i in range(8):
        assert a.sample(i).image.tobytes() != b.sample(i).image.tobytes()
    assert a.sample(0).image.tobytes() != a.sample(1).image.tobytes()


def test_objects_are_inside_apart_and_off_the_midlines():
    world = World(seed=3, max_objects=4)
    counts = set()
    for i in range(N):
        objects = world.scene(i).objects
        counts.add(len(objects))
        for obj in objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES
            assert obj.radius <= obj.x <= 1 - obj.radius and obj.radius <= obj.y <= 1 - obj.radius
            assert abs(obj.x - 0.5) >= 0.05 and abs(obj.y - 0.5) >= 0.05
        for a, b in itertools.combinations(objects, 2):
            assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + GAP
            assert a.identity() != b.identity()
    assert counts == {1, 2, 3, 4}


def test_drawn_objects_do_not_touch():
    # Pixel-level check, independent of the radius bookkeeping: each object drawn alone covers pixels no other
    # object covers (at 64 px, where anti-aliased edges are 1 px wide).
    world = World(seed=4)
    for i in range(40):
        scene = world.scene(i)
        masks = [(render(Scene([o]), 64) != np.array(BACKGROUND)).any(-1) for o in scene.objects]
        for a, b in itertools.combinations(masks, 2):
            assert not (a & b).any(), f"sample {i}: objects touch"


def test_caption_names_every_object_and_the_image_shows_it():
    world = World(seed=5)
    for i in range(N):
        sample = world.sample(i)
        for obj in sample.scene.objects:
            assert f"a {obj.size} {obj.colour} {obj.shape} in the {obj.quadrant}" in sample.caption
            vertical = "top" if obj.y < 0.5 else "bottom"
            horizontal = "left" if obj.x < 0.5 else "right"
            assert obj.quadrant == f"{vertical} {horizontal}"
            # The object's colour is drawn at its centre (the checker of a later issue relies on it).
            r, c = int(obj.y * 32), int(obj.x * 32)
            assert np.abs(sample.image[r, c].astype(int) - COLOURS[obj.colour]).max() <= 40
        assert sample.caption.count(" in the ") == len(sample.scene.objects)


def test_caption_lists_the_objects_in_reading_order_whatever_the_drawing_order():
    # One caption per image (not one per permutation of the scene's objects): quadrants top left, top right,
    # bottom left, bottom right; inside one, top to bottom, then left to right.
    world, rank = World(seed=6), {q: i for i, q in enumerate(("top left", "top right", "bottom left", "bottom right"))}
    several = 0
    for i in range(N):
        scene = world.scene(i)
        several += len(scene.objects) > 1
        by_phrase = {o.phrase(): o for o in scene.objects}
        named = [by_phrase[p] for p in re.split(r", | and ", scene.caption())]
        keys = [(rank[o.quadrant], o.y, o.x) for o in named]
        assert len(named) == len(scene.objects) and keys == sorted(keys), scene.caption()
        for permuted in itertools.permutations(scene.objects):
            assert Scene(list(permuted)).caption() == scene.caption()
    assert several > N // 2  # the test saw multi-object scenes


_REF = re.compile(r"^(?:(small|large) )?(\w+) (\w+)(?: in the (\w+ \w+))?$")


def _resolve(ref: str, scene: Scene) -> int:
    """Index of the one object matching a description like 'small red circle in the top left'."""
    size, colour, shape, quadrant = _REF.match(ref).groups()
    hits = [
        i
        for i, o in enumerate(scene.objects)
        if o.colour == colour and o.shape == shape and size in (None, o.size) and quadrant in (None, o.quadrant)
    ]
    assert len(hits) == 1, f"{ref!r} is ambiguous or matches nothing in {scene}"
    return hits[0]


def _check_edit(sample) -> str:
    before, after, text = sample.scene.objects, sample.edited_scene.objects, sample.edit_instruction
    if m := re.fullmatch(r"add a (small|large) (\w+) (\w+) in the (\w+ \w+)", text):
        assert after[:-1] == before and len(after) == len(before) + 1
        assert after[-1].identity() == (m[3], m[2], m[1], m[4])
        return "add"
    if m := re.fullmatch(r"remove the (.+)", text):
        target = _resolve(m[1], sample.scene)
        assert after == before[:target] + before[target + 1 :]
        return "remove"
    if m := re.fullmatch(r"move the (.+) to the (\w+ \w+)", text):
        target = _resolve(m[1], sample.scene)
        old, new = before[target], after[target]
        assert new.quadrant == m[2] != old.quadrant
        assert (new.shape, new.colour, new.size) == (old.shape, old.colour, old.size)
        kind = "move"
    elif m := re.fullmatch(r"make the (.+) (larger|smaller)", text):
        target = _resolve(m[1], sample.scene)
        old, new = before[target], after[target]
        assert (old.size, new.size) == (("small", "large") if m[2] == "larger" else ("large", "small"))
        assert (new.shape, new.colour, new.x, new.y) == (old.shape, old.colour, old.x, old.y)
        kind = "resize"
    elif m := re.fullmatch(r"make the (.+) (\w+)", text):
        target = _resolve(m[1], sample.scene)
        old, new = before[target], after[target]
        assert new.colour == m[2] != old.colour and new.colour in COLOURS
        assert (new.shape, new.size, new.x, new.y) == (old.shape, old.size, old.x, old.y)
        kind = "recolour"
    else:
        raise AssertionError(f"unparsed instruction {text!r}")
    assert len(after) == len(before)
    assert all(a == b for i, (a, b) in enumerate(zip(before, after)) if i != target)  # nothing else changed
    return kind


def test_edits_do_exactly_what_the_instruction_says():
    world = World(seed=6)
    kinds = set()
    for i in range(N):
        sample = world.sample(i)
        kind = _check_edit(sample)
        assert kind == sample.edit_kind
        kinds.add(kind)
        assert sample.edited_scene.is_valid()
        assert np.array_equal(sample.edited_image, render(sample.edited_scene, 32))
        assert not np.array_equal(sample.edited_image, sample.image)
    assert kinds == set(EDIT_KINDS)


def test_descriptions_disambiguate():
    scene = Scene(
        [
            WorldObject("circle", "red", "small", 0.2, 0.2),
            WorldObject("circle", "red", "large", 0.75, 0.25),
            WorldObject("circle", "red", "large", 0.75, 0.75),
            WorldObject("square", "blue", "small", 0.25, 0.8),
        ]
    )
    assert scene.is_valid()
    assert [describe(scene, i) for i in range(4)] == [
        "small red circle",
        "red circle in the top right",
        "red circle in the bottom right",
        "blue square",
    ]


def test_scene_json_round_trip():
    sample = World(seed=8).sample(3)
    for scene in (sample.scene, sample.edited_scene):
        restored = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert restored == scene
        assert np.array_equal(render(restored, 32), render(scene, 32))


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_at_two_resolutions(resolution):
    small, large = World(seed=9, resolution=32).sample(2), World(seed=9, resolution=resolution).sample(2)
    assert large.scene == small.scene and large.caption == small.caption
    assert large.image.shape == (resolution, resolution, 3) and large.image.dtype == np.uint8
    # Box-reducing the larger render gives (nearly) the smaller one: same scene, same geometry.
    factor = resolution // 32
    reduced = large.image.reshape(32, factor, 32, factor, 3).mean(axis=(1, 3))
    assert np.abs(reduced - small.image).mean() < 2.0
    # Anti-aliased: edges have intermediate values, not just background and object colours.
    palette = {tuple(BACKGROUND), *COLOURS.values()}
    assert any(tuple(p) not in palette for p in large.image.reshape(-1, 3))


def test_quadrant_vocabulary_and_invalid_arguments():
    assert {World(seed=1).scene(i).objects[0].quadrant for i in range(60)} == set(QUADRANTS)
    with pytest.raises(ValueError, match="max_objects"):
        World(max_objects=0)
    with pytest.raises(ValueError, match="resolution"):
        World(resolution=4)


def test_split_caption_cuts_every_world_caption_into_its_phrases_and_back():
    world = World(seed=5)
    for i in range(60):
        sample = world.sample(i)
        for scene, caption in ((sample.scene, sample.caption), (sample.edited_scene, sample.edited_scene.caption())):
            parts = split_caption(caption)
            assert parts.text() == caption
            assert list(parts.phrases) == [o.phrase() for o in reading_order(scene.objects)]
            assert [phrase_identity(p) for p in parts.phrases] == [o.identity() for o in reading_order(scene.objects)]
    parts = split_caption("an image of a large red circle in the top left and a small blue square in the bottom right")
    assert parts.prefix == "an image of " and parts.suffix == ""
    assert (
        parts.with_phrases(parts.phrases[::-1]).text()
        == "an image of a small blue square in the bottom right and a large red circle in the top left"
    )
    with pytest.raises(ValueError, match="grammar: 'a red circle'"):
        split_caption("a red circle")
    with pytest.raises(ValueError, match="object phrase"):
        phrase_identity("a large red circle")
