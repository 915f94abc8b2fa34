"""The GenEval-style checker: agreement with ground truth, category rules, caption parsing, edits, robustness."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ddt_lightning.data.world import (
    BACKGROUND,
    CAPTION_TEMPLATES,
    COLOURS,
    Scene,
    World,
    WorldObject,
    reading_order,
    render,
)
from ddt_lightning.geneval import (
    CAPTION_ATTRIBUTES,
    CATEGORIES,
    GenEvalPrompt,
    caption_accuracy,
    caption_attribute_scores,
    detect_objects,
    edit_l1,
    edit_success,
    geneval_scores,
    geneval_suite,
    parse_caption,
    prompt_categories,
    score_image,
    validate_on_ground_truth,
)


def _identities(objects) -> list[tuple]:
    return sorted(o.identity() for o in objects)


def _prompt(scene: Scene, resolution: int = 32) -> GenEvalPrompt:
    return GenEvalPrompt(-1, scene.caption(), scene, prompt_categories(scene), render(scene, resolution))


# Two objects of different shapes and colours in different quadrants: tests every category but single_object.
TWO = Scene([WorldObject("circle", "red", "large", 0.25, 0.25), WorldObject("triangle", "blue", "small", 0.75, 0.75)])


@pytest.mark.parametrize(("resolution", "n"), [(32, 400), (64, 200)])
def test_agreement_with_ground_truth(resolution, n):
    result = validate_on_ground_truth(resolution=resolution, n=n, seed=0)
    for key in ("shape", "colour", "size", "quadrant", "count", "scene"):
        assert result[f"agreement/{key}"] >= 0.98, (key, result)
    # Ground-truth images are perfect answers to their own prompts, in every category.
    assert {k for k in result if k.startswith("geneval/")} == {f"geneval/{c}" for c in (*CATEGORIES, "overall")}
    assert all(v >= 0.98 for k, v in result.items() if k.startswith("geneval/")), result


def test_noisy_images_with_spurious_specks_are_read_correctly():
    rng = np.random.default_rng(0)
    world = World(seed=11)
    exact = []
    for i in range(100):
        image, _ = world.image_and_caption(i)
        noisy = image + rng.normal(0, 12, image.shape)  # (32, 32, 3)
        for _ in range(3):  # 2x2 specks of a palette colour: below the minimum area
            r, c = rng.integers(0, 30, 2)
            noisy[r : r + 2, c : c + 2] = list(COLOURS.values())[rng.integers(len(COLOURS))]
        detected = detect_objects(np.clip(noisy, 0, 255).astype(np.uint8))
        exact.append(_identities(detected) == _identities(world.scene(i).objects))
    assert np.mean(exact) >= 0.95


def test_blank_and_off_palette_images_have_no_objects():
    blank = render(Scene([]), 32)
    assert detect_objects(blank) == []
    white = blank.copy()
    white[4:14, 4:14] = 255  # a large blob of a colour outside the palette
    assert detect_objects(white) == []
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(blank.astype(np.float32))


@pytest.mark.parametrize("resolution", [32, 64])
def test_touching_objects_of_one_colour(resolution):
    # Two discs touching (and overlapping a little) are split into two circles.
    for dx in (0.34, 0.32):
        scene = Scene(
            [WorldObject("circle", "red", "large", 0.3, 0.3), WorldObject("circle", "red", "large", 0.3 + dx, 0.3)]
        )
        detected = detect_objects(render(scene, resolution))
        assert [(d.shape, d.colour, d.size) for d in detected] == [("circle", "red", "large")] * 2
    # Two squares side by side make a rectangle: one object, and not a world shape.
    side = 2 * 0.88 * 0.17
    scene = Scene(
        [WorldObject("square", "red", "large", 0.3, 0.3), WorldObject("square", "red", "large", 0.3 + side, 0.3)]
    )
    assert [d.shape for d in detect_objects(render(scene, resolution))] == ["unknown"]
    # Touching objects of different colours are separated by colour.
    scene = Scene(
        [WorldObject("circle", "red", "large", 0.3, 0.3), WorldObject("circle", "yellow", "large", 0.64, 0.3)]
    )
    assert _identities(detect_objects(render(scene, resolution))) == _identities(scene.objects)


def test_wrong_images_fail_the_right_categories():
    prompt = _prompt(TWO)
    assert set(prompt.categories) == set(CATEGORIES) - {"single_object"}
    red, blue = TWO.objects

    def failed(objects: list[WorldObject]) -> set[str]:
        return {c for c, ok in score_image(render(Scene(objects), 32), prompt).items() if not ok}

    assert failed([red, blue]) == set()
    assert failed([red, replace(blue, colour="green")]) == {"colours", "position", "colour_attribution"}
    assert failed([red, replace(blue, x=0.25)]) == {"position"}  # moved to the bottom left
    assert failed([red]) == {"two_objects", "counting", "colours", "position", "colour_attribution"}
    assert failed([]) == set(prompt.categories)
    assert failed([red, replace(blue, shape="square")]) == {"two_objects", "position", "colour_attribution"}
    # Swapped colours: every colour and shape is present, but bound to the wrong object.
    assert failed([replace(red, colour="blue"), replace(blue, colour="red")]) == {"position", "colour_attribution"}
    extra = WorldObject("square", "green", "small", 0.75, 0.25)
    assert failed([red, blue, extra]) == {"counting"}  # extra objects only fail counting

    single = _prompt(Scene([red]))
    assert single.categories == ("single_object", "counting", "colours", "position")
    assert score_image(render(Scene([red]), 32), single)["single_object"]
    assert not score_image(render(Scene([replace(red, shape="diamond")]), 32), single)["single_object"]
    assert not score_image(render(Scene([red, extra]), 32), single)["single_object"]


def test_scores_are_per_category_means_and_overall_is_their_mean():
    prompts = geneval_suite(seed=0, n=24)
    blank = render(Scene([]), 32)
    images = [p.reference if i % 2 == 0 else blank for i, p in enumerate(prompts)]
    scores = geneval_scores(images, prompts)
    for category in CATEGORIES:
        expected = [i % 2 == 0 for i, p in enumerate(prompts) if category in p.categories]
        assert scores[category] == pytest.approx(np.mean(expected))
    assert scores["overall"] == pytest.approx(np.mean([scores[c] for c in CATEGORIES]))
    assert geneval_scores([p.reference for p in prompts], prompts)["overall"] == 1.0
    with pytest.raises(ValueError, match="prompts"):
        geneval_scores(images[:-1], prompts)


def test_suite_is_the_held_out_stream_and_deterministic():
    prompts = geneval_suite(seed=1, n=16, resolution=32)
    # WorldDataModule(seed=s) draws its test split from World(seed=3 * s + 2); train is 3 * s.
    test_stream, train_stream = World(seed=5), World(seed=3)
    for p in prompts:
        sample = test_stream.sample(p.index)
        assert p.caption == sample.caption and p.scene == sample.scene
        assert np.array_equal(p.reference, sample.image)
        assert p.categories == prompt_categories(p.scene)
    assert [p.scene for p in prompts] != [train_stream.scene(i) for i in range(16)]
    again = geneval_suite(seed=1, n=16, resolution=32)
    assert [(p.caption, p.reference.tobytes()) for p in again] == [(p.caption, p.reference.tobytes()) for p in prompts]
    assert [p.caption for p in geneval_suite(seed=2, n=16)] != [p.caption for p in prompts]
    assert geneval_suite(seed=1, n=2, resolution=64)[0].reference.shape == (64, 64, 3)
    assert {len(p.scene.objects) for p in geneval_suite(seed=0, n=64)} == {1, 2, 3}
    image = prompts[3].reference
    assert detect_objects(image) == detect_objects(image.copy())


def test_caption_parser_round_trips_every_world_caption():
    world = World(seed=2)
    templates = set()
    for i in range(150):
        sample = world.sample(i)
        for scene, caption in ((sample.scene, sample.caption), (sample.edited_scene, sample.edited_scene.caption())):
            assert parse_caption(caption) == [o.identity() for o in reading_order(scene.objects)]
            assert caption_accuracy(caption, scene)
        templates.add(next(t for t in CAPTION_TEMPLATES[::-1] if sample.caption.startswith(t.split("{")[0])))
    assert templates == set(CAPTION_TEMPLATES)
    # Order is free; attributes, count and grammar are not.
    two = TWO.caption()
    swapped = " and ".join(two.split(" and ")[::-1])
    assert caption_accuracy(swapped, TWO)
    assert not caption_accuracy(two.replace("red", "green"), TWO)
    assert not caption_accuracy(two.replace("large", "small"), TWO)
    assert not caption_accuracy(two.replace("top left", "top right"), TWO)
    assert not caption_accuracy(TWO.objects[0].phrase(), TWO)
    assert not caption_accuracy(f"{TWO.objects[0].phrase()}, {two}", TWO)


def test_caption_attribute_scores_say_which_attribute_is_wrong():
    two = TWO.caption()
    assert caption_attribute_scores(two, TWO) == dict.fromkeys(CAPTION_ATTRIBUTES, True)
    # Colours swapped between the objects: every multiset still matches, the exact-attribute caption does not.
    swapped = two.replace("red", "@").replace("blue", "red").replace("@", "blue")
    assert not caption_accuracy(swapped, TWO)
    assert caption_attribute_scores(swapped, TWO) == dict.fromkeys(CAPTION_ATTRIBUTES, True)
    wrong_shape = caption_attribute_scores(two.replace("circle", "square"), TWO)
    assert [a for a, ok in wrong_shape.items() if not ok] == ["shape"]
    one = caption_attribute_scores(TWO.objects[0].phrase(), TWO)
    assert one["parsed"] and not any(one[a] for a in ("count", "shape", "colour", "size", "quadrant"))
    assert caption_attribute_scores("two red things", TWO) == dict.fromkeys(CAPTION_ATTRIBUTES, False)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "a red circle",
        "a large red circle in the top left, a small blue triangle in the bottom right",
        "a large red circle in the top left and and a small blue triangle in the bottom right",
        "a huge red circle in the top left",
        "a large purple circle in the top left",
        "a large red circle in the middle",
        "a large red circle in the top left.",
        "an image of",
        "A large red circle in the top left",
        "a large red circle in the top left and a small blue triangle in the bottom right"
        " and a large red square in the top right",
    ],
)
def test_caption_parser_rejects_garbage(garbage):
    with pytest.raises(ValueError, match="grammar"):
        parse_caption(garbage)
    assert not caption_accuracy(garbage, TWO)


def test_edit_success_and_l1():
    world = World(seed=4)
    kinds = set()
    for i in range(60):
        sample = world.sample(i)
        kinds.add(sample.edit_kind)
        assert edit_success(sample.edited_image, sample.edited_scene), sample.edit_instruction
        # Every edit changes the scene, so the unedited image is no success.
        assert not edit_success(sample.image, sample.edited_scene), sample.edit_instruction
        if sample.edit_kind == "resize":
            assert edit_success(sample.image, sample.edited_scene, check_size=False)
        assert edit_l1(sample.edited_image, sample.edited_image) == 0.0
        l1 = edit_l1(sample.image, sample.edited_image)
        assert 0.0 < l1 == pytest.approx(np.abs(sample.image / 255.0 - sample.edited_image / 255.0).mean())
    assert kinds == {"recolour", "move", "remove", "add", "resize"}
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    assert edit_l1(blank, np.full_like(blank, 255)) == pytest.approx(np.mean(255 - np.array(BACKGROUND)) / 255)
    with pytest.raises(ValueError, match="shapes differ"):
        edit_l1(blank, np.zeros((64, 64, 3), dtype=np.uint8))
