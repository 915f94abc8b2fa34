"""The perceptual term: world shape labels, the feature network (training, export), the LPIPS-style distance and
its place in the tokenizer's loss."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from ddt_lightning import DDTTokenizer
from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import BACKGROUND, COLOURS, SHAPES, Scene, World, WorldObject, render, render_shape_labels
from ddt_lightning.models.perceptual import FeatureNet, FeatureNetConfig, PerceptualDistance
from ddt_lightning.perceptual import main as perceptual_main
from ddt_lightning.perceptual import train_feature_net
from ddt_lightning.tokenizer import TokenizerConfig

MICRO = TokenizerConfig.preset("micro", decoder_depth=2)
RES = 16  # the tokenizer's micro preset
NET_RES = 32  # the feature net's (it is fully convolutional: it takes any size)


@pytest.fixture(scope="module")
def trained():
    """A feature net trained briefly at 32 px (about 20 s), and its validation scores."""
    return train_feature_net(
        resolution=NET_RES, steps=250, batch_size=32, train_scenes=4096, val_scenes=256, progress=False
    )


def test_shape_labels_cover_the_drawn_objects_with_their_shape():
    # Single objects: a pixel is labelled iff the object covers most of it (its colour's share of the pixel,
    # read back from the anti-aliased rendering), with the object's shape.
    world = World(seed=5, resolution=32)
    for index in range(40):
        obj = world.scene(index).objects[0]
        labels, image = render_shape_labels(Scene([obj]), 32), render(Scene([obj]), 32).astype(float)
        background, colour = np.array(BACKGROUND), np.array(COLOURS[obj.colour])
        coverage = np.abs(image - background).sum(-1) / np.abs(colour - background).sum()
        assert (labels[coverage > 0.6] == 1 + SHAPES.index(obj.shape)).all()
        assert (labels[coverage < 0.4] == 0).all()
    for index in range(20):  # several objects: the pixel under each centre carries that object's shape
        scene = world.scene(index)
        labels = render_shape_labels(scene, 32)
        for obj in scene.objects:
            assert labels[int(obj.y * 32), int(obj.x * 32)] == 1 + SHAPES.index(obj.shape)
    assert render_shape_labels(Scene([]), 32).max() == 0


def test_the_feature_net_learns_to_segment_shapes(trained):
    _, scores = trained
    assert scores["shape_accuracy"] > 0.6  # chance on object pixels: 0.25
    assert scores["background_accuracy"] > 0.95


def test_feature_net_export_round_trip_and_errors(tmp_path, trained):
    net, _ = trained
    folder = net.save_pretrained(tmp_path / "net", data="world", steps=250)
    loaded = FeatureNet.from_pretrained(folder)
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    assert torch.equal(loaded(x), net(x)) and not loaded.training
    assert json.loads((folder / "config.json").read_text())["metadata"] == {"data": "world", "steps": 250}
    with pytest.raises(FileNotFoundError, match=r"no feature network at .*missing"):
        FeatureNet.from_pretrained(tmp_path / "nothing")
    DDTTokenizer(MICRO).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="not a feature network export"):
        FeatureNet.from_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="FeatureNetConfig"):
        FeatureNetConfig(widths=())


def test_the_distance_weighs_a_shape_change_above_a_one_pixel_move(trained):
    # The point of the term: under pixel MSE a shape change costs about what a 1-px move does; here it must cost
    # clearly more. One large object per scene, the same object as a square and as a triangle, and moved by 1 px.
    distance = PerceptualDistance(trained[0])
    rng = np.random.default_rng(0)
    base, shape, move = [], [], []
    for _ in range(32):
        x, y = rng.uniform(0.3, 0.7, 2)
        obj = WorldObject("square", "red", "large", float(x), float(y))
        base.append(render(Scene([obj]), NET_RES))
        shape.append(render(Scene([dataclasses.replace(obj, shape="triangle")]), NET_RES))
        move.append(render(Scene([dataclasses.replace(obj, x=float(x) + 1 / NET_RES)]), NET_RES))
    base, shape, move = (uint8_to_tensor(np.stack(group)) for group in (base, shape, move))
    d_shape, d_move = distance(shape, base), distance(move, base)
    mse_shape, mse_move = (shape - base).pow(2).mean(), (move - base).pow(2).mean()
    assert torch.all(distance(base, base) == 0)
    assert d_shape.mean() / d_move.mean() > 1.5 * mse_shape / mse_move


def test_the_distance_is_frozen_and_differentiable_in_its_first_argument(trained):
    distance = PerceptualDistance(trained[0]).train()
    assert not distance.training and not distance.net.training  # train() cannot switch a frozen net to train
    x = (torch.rand(2, 3, RES, RES) * 2 - 1).requires_grad_(True)
    y = (torch.rand(2, 3, RES, RES) * 2 - 1).requires_grad_(True)
    distance(x, y).sum().backward()
    assert x.grad.abs().sum() > 0 and y.grad is None
    assert all(p.grad is None and not p.requires_grad for p in distance.net.parameters())


@pytest.fixture(scope="module")
def net_folder(tmp_path_factory, trained):
    return str(trained[0].save_pretrained(tmp_path_factory.mktemp("features") / "net"))


def _with_and_without(cfg, key, weight, net_folder, x, before_forward):
    """The losses on `x` of two tokenizers with the same initial weights and random draws, the term `key` off and
    at `weight`; returns (plain, with the term, the tokenizer with the term). `before_forward(tok)` runs on the
    latter just before its forward (hooks, snapshots)."""
    outs = {}
    for w in (0.0, weight):
        torch.manual_seed(0)
        tok = DDTTokenizer(dataclasses.replace(cfg, **{key: w, "feature_net": net_folder if w else None}))
        if w:
            tok.load_feature_net(net_folder)
            before_forward(tok)
        outs[w] = tok(x, generator=torch.Generator().manual_seed(1))
    return outs[0.0], outs[weight], tok


@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_the_perceptual_term_enters_the_tokenizer_loss(net_folder, prediction):
    # Same weights and draws with and without the term: only the total changes, by weight x perceptual, and
    # perceptual is the distance of the decoder's x0 estimate to the image (recomputed from its inputs).
    base = dataclasses.replace(MICRO, prediction=prediction)
    x = uint8_to_tensor(World(seed=1, resolution=RES).render_range(0, 4, progress=False)[0])  # (4, 3, 16, 16)
    seen = {}

    def watch(tok):
        tok.decoder.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))

    plain, with_term, tok = _with_and_without(base, "perceptual_weight", 0.3, net_folder, x, watch)
    assert plain.perceptual == 0 and torch.equal(plain.diffusion, with_term.diffusion)
    x_t, t = seen["args"][:2]
    x0_hat = seen["out"] if prediction == "x0" else x_t - t.view(-1, 1, 1, 1) * seen["out"]
    expected = PerceptualDistance(FeatureNet.from_pretrained(net_folder))(x0_hat, x).mean()
    torch.testing.assert_close(with_term.perceptual, expected)
    assert with_term.perceptual > 0
    torch.testing.assert_close(with_term.loss, plain.loss + 0.3 * with_term.perceptual)
    with_term.loss.backward()
    assert tok.encoder.out.weight.grad.abs().sum() > 0
    assert "perceptual" not in " ".join(tok.state_dict())  # never exported with the tokenizer
    off = tok(x, generator=torch.Generator().manual_seed(1), aux_scale=0.0)  # the module's schedule: not yet on
    assert off.perceptual == 0 and torch.equal(off.loss, off.diffusion + off.commitment)


def test_perceptual_config_errors_name_the_key(net_folder):
    with pytest.raises(ValueError, match="perceptual_weight"):
        TokenizerConfig(perceptual_weight=-0.1)
    with pytest.raises(ValueError, match=r"feature_net: perceptual_weight=0\.1 needs a feature network"):
        TokenizerConfig(perceptual_weight=0.1)
    with pytest.raises(ValueError, match="pixel space"):
        TokenizerConfig(perceptual_weight=0.1, feature_net=net_folder, vae_path="vae")
    tok = DDTTokenizer(dataclasses.replace(MICRO, perceptual_weight=0.1, feature_net=net_folder))
    with pytest.raises(RuntimeError, match="load_feature_net"):
        tok(torch.zeros(2, 3, RES, RES))
    with pytest.raises(ValueError, match=r"takes 3 channels but TokenizerConfig\.in_channels=1"):
        DDTTokenizer(dataclasses.replace(MICRO, in_channels=1)).load_feature_net(net_folder)


def test_the_training_module_loads_the_net_and_logs_the_term(net_folder):
    from ddt_lightning.modules import TokenizerModule

    cfg = dataclasses.replace(MICRO, perceptual_weight=0.2, feature_net=net_folder)
    module = TokenizerModule(tokenizer=cfg)
    assert isinstance(module.tokenizer.perceptual, PerceptualDistance)
    assert not any("perceptual" in name for name, _ in module.named_parameters())
    missing = dataclasses.replace(cfg, feature_net="/nonexistent/features")
    with pytest.raises(FileNotFoundError, match="/nonexistent/features"):
        TokenizerModule(tokenizer=missing)


def test_the_command_trains_saves_and_prints_json(tmp_path, capsys):
    out = tmp_path / "features"
    assert perceptual_main(["train", str(out), "--resolution", "16", "--steps", "5", "--train-scenes", "128"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output"] == str(out) and 0 <= result["shape_accuracy"] <= 1
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["steps"] == 5 and meta["shape_accuracy"] == result["shape_accuracy"]
    assert FeatureNet.from_pretrained(out).config.num_classes == 1 + len(SHAPES)


def test_the_distillation_term_reads_the_codes_and_leaves_the_decoder_alone(net_folder):
    # Same weights and draws with and without the term: only the total changes, by weight x distill, and distill is
    # 1 - the mean cosine of the feature head's prediction from the quantized tokens to the net's deepest features
    # of the clean image, pooled to the patch grid. Its gradient reaches the encoder (through the straight-through
    # quantizer) and the head, never the decoder.
    x = uint8_to_tensor(World(seed=1, resolution=RES).render_range(0, 4, progress=False)[0])
    seen = {}

    def watch(tok):
        tok.feature_head.register_forward_hook(lambda m, args, out: seen.update(codes=args[0], out=out))
        seen["quantizer"] = copy.deepcopy(tok.quantizer)  # the forward's EMA moves the codebook

    plain, with_term, tok = _with_and_without(MICRO, "distill_weight", 0.5, net_folder, x, watch)
    assert plain.distill == 0 and torch.equal(plain.diffusion, with_term.diffusion)
    codes = seen["quantizer"].lookup(with_term.indices)  # the head reads the quantized tokens, all T of them
    torch.testing.assert_close(seen["codes"], codes)
    grid = RES // MICRO.patch_size
    feats = FeatureNet.from_pretrained(net_folder).features(x)[-1]  # (4, 64, 4, 4) at 16 px: pooled to 4 x 4
    target = torch.nn.functional.adaptive_avg_pool2d(feats, grid).flatten(2).transpose(1, 2)
    expected = 1 - torch.nn.functional.cosine_similarity(seen["out"], target, dim=-1).mean()
    torch.testing.assert_close(with_term.distill, expected)
    torch.testing.assert_close(with_term.loss, plain.loss + 0.5 * with_term.distill)
    with_term.distill.backward()
    assert tok.encoder.out.weight.grad.abs().sum() > 0 and tok.feature_head.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tok.decoder.parameters())
    # The head is trained state (an exact resume needs it); the frozen net is not.
    assert any(name.startswith("feature_head.") for name in tok.state_dict())
    assert "perceptual" not in " ".join(tok.state_dict())


def test_the_feature_head_learns_to_read_features_from_codes():
    # The head alone, on fixed random codes that determine their targets through a fixed random map: its loss falls.
    from ddt_lightning.models.distill import FeatureHead, distill_loss

    torch.manual_seed(0)
    head = FeatureHead(num_tokens=8, token_dim=4, grid=2, out_dim=6, dim=32, heads=2)
    codes = torch.randn(64, 8, 4)
    target = torch.einsum("btm,tmgd->bgd", codes, torch.randn(8, 4, 4, 6))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = distill_loss(head(codes), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 and losses[-1] < 0.25 * losses[0]


def test_distillation_config_errors_name_the_key(net_folder, tmp_path):
    with pytest.raises(ValueError, match=r"feature_net: distill_weight=0\.5 needs a feature network"):
        TokenizerConfig(distill_weight=0.5)
    with pytest.raises(ValueError, match="distill_weight"):
        TokenizerConfig(distill_weight=-1.0)
    with pytest.raises(ValueError, match=r"distill_weight: the feature network works in pixel space"):
        TokenizerConfig(distill_weight=0.5, feature_net=net_folder, vae_path="vae")
    cfg = dataclasses.replace(MICRO, distill_weight=0.5, feature_net=net_folder)
    with pytest.raises(ValueError, match=r"ends in 64 channels but TokenizerConfig\.distill_dim=32"):
        DDTTokenizer(dataclasses.replace(cfg, distill_dim=32)).load_feature_net(net_folder)
    tok = DDTTokenizer(cfg)
    with pytest.raises(RuntimeError, match="load_feature_net"):
        tok(torch.zeros(2, 3, RES, RES))
    again = DDTTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "export"))
    torch.testing.assert_close(again.feature_head.out.weight, tok.feature_head.out.weight)


def test_an_export_written_before_the_feature_net_key_was_renamed_still_loads(tmp_path):
    tok = DDTTokenizer(MICRO)
    folder = tok.save_pretrained(tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    config["perceptual_net"] = config.pop("feature_net")  # as written before the rename
    config["perceptual_net"] = "features"
    (folder / "config.json").write_text(json.dumps(config))
    again = DDTTokenizer.from_pretrained(folder)
    assert again.config.feature_net == "features"
    torch.testing.assert_close(again.decoder.final.linear.weight, tok.decoder.final.linear.weight)
    config["nonsense"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown keys \['nonsense'\]"):
        DDTTokenizer.from_pretrained(folder)


def test_with_frozen_codes_the_distillation_term_is_skipped_and_only_the_decoder_learns(net_folder):
    # The decoder-only phase's forward: the codes are those of the normal forward, but nothing reaches the encoder
    # or the head, and the term that only trains them is not computed.
    x = uint8_to_tensor(World(seed=1, resolution=RES).render_range(0, 4, progress=False)[0])
    torch.manual_seed(0)
    tok = DDTTokenizer(dataclasses.replace(MICRO, distill_weight=0.5, feature_net=net_folder))
    tok.load_feature_net(net_folder)
    tok.encoder.eval()
    tok.quantizer.eval()
    normal = tok(x, generator=torch.Generator().manual_seed(1))
    frozen = tok(x, generator=torch.Generator().manual_seed(1), codes_frozen=True)
    assert normal.distill > 0 and frozen.distill == 0
    assert torch.equal(frozen.indices, normal.indices) and torch.equal(frozen.diffusion, normal.diffusion)
    torch.testing.assert_close(frozen.loss, normal.loss - 0.5 * normal.distill)
    frozen.loss.backward()
    assert all(p.grad is None for p in [*tok.encoder.parameters(), *tok.feature_head.parameters()])
    assert tok.decoder.final.linear.weight.grad.abs().sum() > 0
