"""`ddt_lightning.diagnostics`: oracle tokens, the oracle decoder's training and sampling, the checker's pooled
agreement, and the encoder's sensitivity measurement on a micro tokenizer."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from ddt_lightning.data.world import BACKGROUND, SHAPES, Scene, WorldObject
from ddt_lightning.diagnostics import (
    main,
    oracle_tokens,
    read_agreement,
    sample_oracle,
    shape_probe,
    token_sensitivity,
    train_oracle_decoder,
)
from ddt_lightning.geneval import geneval_suite
from ddt_lightning.tokenizer import PRESETS, DDTTokenizer

TINY = dict(resolution=16, batch_size=8, dim=32, depth=1, progress=False)


def test_oracle_tokens_encode_each_object_and_leave_the_rest_zero():
    objects = [WorldObject("triangle", "blue", "large", 0.25, 0.75), WorldObject("circle", "red", "small", 0.8, 0.2)]
    scene = Scene(objects)
    tokens = oracle_tokens(scene, 3)
    assert tokens.shape == (3, 16)
    first = tokens[0]
    assert first[:4].tolist() == [float(s == "triangle") for s in SHAPES]
    assert first[4:10].sum() == 1 and first[6] == 1  # blue is the third colour
    assert first[10:12].tolist() == [0.0, 1.0]  # large
    torch.testing.assert_close(first[12:15], torch.tensor([-0.5, 0.5, 1.0]))
    assert tokens[1, 0] == 1 and tokens[1, 4] == 1 and tokens[1, 10] == 1
    assert torch.equal(tokens[2], torch.zeros(16))
    with pytest.raises(ValueError, match="more than num_tokens=1"):
        oracle_tokens(scene, 1)


def test_read_agreement_is_one_on_ground_truth_and_zero_on_empty_images():
    prompts = geneval_suite(0, 16, 32)
    scenes = [p.scene for p in prompts]
    truth = read_agreement(np.stack([p.reference for p in prompts]), scenes)
    assert truth == {"shape": 1.0, "colour": 1.0, "size": 1.0, "quadrant": 1.0}
    empty = np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), (16, 32, 32, 3))
    assert read_agreement(empty, scenes) == {"shape": 0.0, "colour": 0.0, "size": 0.0, "quadrant": 0.0}


def test_the_oracle_decoder_learns_and_the_edge_term_adds_to_its_loss():
    decoder, losses = train_oracle_decoder(steps=60, **TINY)
    assert not decoder.training and len(losses) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    # Same seed, same draws and initial weights: at step 0 the edge term can only add.
    _, edged = train_oracle_decoder(steps=1, edge_weight=1.0, **TINY)
    assert edged[0] > losses[0]

    scenes = [p.scene for p in geneval_suite(0, 4, 16)]
    a, b = sample_oracle(decoder, scenes, steps=2, guidance=2.0), sample_oracle(decoder, scenes, steps=2, guidance=2.0)
    assert torch.equal(a, b) and a.shape == (4, 3, 16, 16) and a.abs().max() <= 1
    assert not torch.equal(a, sample_oracle(decoder, scenes, steps=2, guidance=1.0))


def test_token_sensitivity_is_zero_for_an_unchanged_scene():
    tokenizer = DDTTokenizer(dataclasses.replace(PRESETS["micro"], image_size=32)).eval()
    report = token_sensitivity(tokenizer, num_pairs=8)
    assert report["none"] == {"distance": 0.0, "tokens_changed": 0.0}
    for change in ("shape", "move_1px", "colour"):
        assert report[change]["distance"] > 0 and 0 <= report[change]["tokens_changed"] <= 8
    assert report["quantisation_error"] > 0


def test_the_shape_probe_reads_pixels_and_nothing_from_constant_codes():
    # The pixels of one-object scenes carry their shape; codes that are one vector for every id carry nothing, so
    # their probe can do no better than the most frequent shape of the test scenes.
    tokenizer = DDTTokenizer(dataclasses.replace(PRESETS["micro"], image_size=32)).eval()
    tokenizer.quantizer.codebook.copy_(tokenizer.quantizer.codebook[:1].expand_as(tokenizer.quantizer.codebook))
    report = shape_probe(tokenizer, num_train=1000, num_test=300, epochs=40)
    assert set(report) == {"codes", "encoder", "pixels"}
    assert report["pixels"] > 0.38  # chance 0.25
    assert report["codes"] <= 0.36  # 300 scenes of 4 shapes: the most frequent is at most about a third
    assert report["encoder"] > report["codes"]


def test_the_commands_print_one_json_object(tmp_path, capsys):
    tokenizer = DDTTokenizer(dataclasses.replace(PRESETS["micro"], image_size=32))
    tokenizer.save_pretrained(tmp_path / "export")
    assert main(["tokens", str(tmp_path / "export"), "--num-pairs", "4", "--num-scenes", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"export", "sensitivity", "one_step", "sampler"}
    assert set(report["sampler"]) == {"shape", "colour", "size", "quadrant"}
    args = ["oracle", "--steps", "2", "--resolution", "16", "--dim", "32", "--depth", "1", "--num-scenes", "4"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["config"]["steps"] == 2 and all(0 <= v <= 1 for v in report["one_step"].values())
    assert main(["probe", str(tmp_path / "export"), "--num-train", "100", "--num-test", "20"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["shape_probe"]) == {"codes", "encoder", "pixels"}
