"""Where an attribute is lost between the world and the DDT tokenizer's images (README, "Where shape is lost").

Two measurements, each a command that prints one JSON object on its last line:

- `python -m ddt_lightning.diagnostics oracle [--edge-weight W] [--steps N]`: trains the tokenizer's decoder alone
  on *oracle* tokens - one per object, its true shape, colour, size and centre, no encoder and no quantizer - with
  the tokenizer's loss (x0 MSE, optional edge term, SD3-shifted times, 10 % dropped tokens for guidance), then
  reads its samples of held-out scenes back with the GenEval-style checker. What the decoder cannot draw from
  perfect tokens, no encoder can fix.
- `python -m ddt_lightning.diagnostics tokens EXPORT`: for an exported DDT tokenizer, how far the encoder's
  (normalised) output moves, and how many token ids flip, when one object changes shape, moves by one pixel or
  changes colour, against the mean quantisation error; and the checker's reading of its reconstructions.
- `python -m ddt_lightning.diagnostics probe EXPORT`: is an object's shape *in* the tokens? A small MLP probe
  learns the shape of one-object scenes from the codes (and, for reference, from the encoder's output and from the
  pixels themselves), scored on scenes it did not train on. Shape that a probe reads from the codes but the
  decoder does not draw is lost in the decoder.

Written here because no kept library trains a probe decoder on scene attributes; the parts are the project's own
(`DDTDecoder`, `sample_time`, `euler_sample`, `edge_loss`, the checker).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import COLOURS, SHAPES, SIZES, Scene, World, WorldObject, render
from ddt_lightning.geneval import attribute_agreement, detect_objects, geneval_suite
from ddt_lightning.models.decoder import DDTDecoder, guided
from ddt_lightning.models.schedule import euler_sample, sample_time
from ddt_lightning.modules.optim import warmup_cosine
from ddt_lightning.runtime import flush_denormals
from ddt_lightning.tokenizer import DDTTokenizer, edge_loss

ORACLE_DIM = 16  # one-hot shape (4), colour (6), size (2), centre x, y in [-1, 1], presence flag; one zero
ATTRIBUTES = ("shape", "colour", "size", "quadrant")


def oracle_tokens(scene: Scene, num_tokens: int) -> torch.Tensor:
    """(num_tokens, ORACLE_DIM): token i describes object i; tokens past the last object are all zero."""
    if len(scene.objects) > num_tokens:
        raise ValueError(f"scene has {len(scene.objects)} objects, more than num_tokens={num_tokens}")
    tokens = torch.zeros(num_tokens, ORACLE_DIM)
    for i, obj in enumerate(scene.objects):
        tokens[i, SHAPES.index(obj.shape)] = 1
        tokens[i, 4 + list(COLOURS).index(obj.colour)] = 1
        tokens[i, 10 + list(SIZES).index(obj.size)] = 1
        tokens[i, 12:15] = torch.tensor([2 * obj.x - 1, 2 * obj.y - 1, 1.0])
    return tokens


def to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def read_agreement(images: np.ndarray, scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of scene objects whose detection in `images` (N, H, W, 3) uint8 has the right shape, colour, size
    and quadrant (the checker's `attribute_agreement`, pooled over the images)."""
    pooled: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for image, scene in zip(images, scenes, strict=True):
        for attribute, values in attribute_agreement(detect_objects(image), scene).items():
            pooled[attribute] += values
    return {a: float(np.mean(v)) if v else 0.0 for a, v in pooled.items()}


def train_oracle_decoder(
    steps: int = 1900,
    edge_weight: float = 0.0,
    resolution: int = 32,
    max_objects: int = 3,
    batch_size: int = 32,
    dim: int = 192,
    depth: int = 3,
    heads: int = 2,
    patch_size: int = 4,
    lr: float = 1e-3,
    time_shift: float = 3.0,
    p_uncond: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DDTDecoder, list[float]]:
    """The tiny preset's decoder trained on oracle tokens of `World(seed)` scenes with the tokenizer's loss and
    optimisation (AdamW, warm-up then cosine, gradient norm clipped at 1), in eval mode, and its losses."""
    torch.manual_seed(seed)
    decoder = DDTDecoder(resolution, 3, patch_size, dim, depth, heads, max_objects, ORACLE_DIM)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(100, steps), steps, 0.05))
    world = World(seed=seed, resolution=resolution, max_objects=max_objects)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    losses = []
    for step in tqdm(range(steps), desc="oracle decoder", disable=not progress, mininterval=2.0):
        scenes = [world.scene(step * batch_size + i) for i in range(batch_size)]
        x0 = uint8_to_tensor(np.stack([render(s, resolution) for s in scenes]))  # (B, 3, R, R)
        codes = torch.stack([oracle_tokens(s, max_objects) for s in scenes])
        t = sample_time(batch_size, time_shift, x0.device, generator)
        dropped = torch.rand(batch_size, generator=generator) < p_uncond
        visible = torch.where(dropped, 0, max_objects)
        tb = t[:, None, None, None]
        x_t = tb * torch.randn(x0.shape, generator=generator) + (1 - tb) * x0
        error = decoder(x_t, t, codes, visible) - x0
        loss = error.pow(2).mean() + (edge_weight * edge_loss(error) if edge_weight > 0 else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach().item())
    return decoder.eval(), losses


@torch.no_grad()
def sample_oracle(
    decoder: DDTDecoder,
    scenes: Sequence[Scene],
    steps: int = 8,
    guidance: float = 2.0,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] of `scenes` from the oracle decoder, sampled as `DDTTokenizer.decode` does
    (`euler_sample`, classifier-free guidance against the all-dropped model)."""
    codes = torch.stack([oracle_tokens(s, decoder.num_tokens) for s in scenes])
    b, size = codes.shape[0], decoder.patch.grid * decoder.patch_size
    x = torch.randn(b, decoder.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    full = torch.full((b,), decoder.num_tokens, dtype=torch.long)
    x = euler_sample(x, steps, shift, lambda x_t, t: guided(decoder, x_t, t, codes, full, guidance))
    return x.clamp(-1, 1)


def oracle_report(decoder: DDTDecoder, num_scenes: int = 256, seed: int = 0) -> dict[str, dict[str, float]]:
    """Checker agreement per attribute on the held-out scenes of `WorldDataModule(seed)`: one step (the decoder's
    estimate from the tokens alone) and 8 steps with guidance 2 (the main job's sampler)."""
    size = decoder.patch.grid * decoder.patch_size
    scenes = [p.scene for p in geneval_suite(seed, num_scenes, size, decoder.num_tokens)]
    report = {}
    for name, steps, guidance in (("one_step", 1, 1.0), ("sampler", 8, 2.0)):
        images = torch.cat(
            [sample_oracle(decoder, scenes[i : i + 64], steps, guidance) for i in range(0, len(scenes), 64)]
        )
        report[name] = read_agreement(to_images(images), scenes)
    return report


def _variants(rng: np.random.Generator, resolution: int) -> tuple[Scene, dict[str, Scene]]:
    """A one-object scene and its copies with one thing changed (and one unchanged: the control)."""
    x, y = rng.uniform(0.3, 0.7, 2)
    size, colour = str(rng.choice(list(SIZES))), str(rng.choice(list(COLOURS)))
    shape, other_shape = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
    other_colour = str(rng.choice([c for c in COLOURS if c != colour]))
    base = WorldObject(shape, colour, size, float(x), float(y))
    changed = {
        "none": base,
        "shape": WorldObject(other_shape, colour, size, float(x), float(y)),
        "move_1px": WorldObject(shape, colour, size, float(x) + 1 / resolution, float(y)),
        "colour": WorldObject(shape, other_colour, size, float(x), float(y)),
    }
    return Scene([base]), {name: Scene([obj]) for name, obj in changed.items()}


@torch.no_grad()
def token_sensitivity(tokenizer: DDTTokenizer, num_pairs: int = 100, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean per-token distance between the encoder's outputs (l2-normalised when the codes are) of a one-object
    scene and its variant, and the mean number of token ids that differ, per kind of change; plus the mean
    distance of an output to its code (`quantisation_error`)."""
    cfg = tokenizer.config
    rng = np.random.default_rng(seed)
    pairs = [_variants(rng, cfg.image_size) for _ in range(num_pairs)]
    names = list(pairs[0][1])
    scenes = [base for base, _ in pairs] + [variants[n] for n in names for _, variants in pairs]
    x = uint8_to_tensor(np.stack([render(s, cfg.image_size) for s in scenes]))  # (B, 3, R, R)
    z, ids = tokenizer.search_latent(tokenizer.to_latent(x))  # (B, T, m), (B, T)
    codes = tokenizer.quantizer.lookup(ids)
    if cfg.cosine_codes:
        codes = F.normalize(codes, dim=-1)
    report = {"quantisation_error": float((z - codes).norm(dim=-1).mean())}
    z_base, ids_base = z[:num_pairs], ids[:num_pairs]
    for k, name in enumerate(names):
        rows = slice((k + 1) * num_pairs, (k + 2) * num_pairs)
        report[name] = {
            "distance": float((z[rows] - z_base).norm(dim=-1).mean()),
            "tokens_changed": float((ids[rows] != ids_base).sum(-1).float().mean()),
        }
    return report


@torch.no_grad()
def reconstruction_report(tokenizer: DDTTokenizer, num_scenes: int = 256, seed: int = 0) -> dict[str, dict[str, float]]:
    """Checker agreement per attribute on the tokenizer's reconstructions of held-out scenes (one step, and the
    main job's 8-step sampler with guidance 2)."""
    prompts = geneval_suite(seed, num_scenes, tokenizer.config.image_size)
    x = uint8_to_tensor(np.stack([p.reference for p in prompts]))  # (N, 3, R, R)
    ids = tokenizer.encode(x)
    report = {}
    for name, steps, guidance in (("one_step", 1, 1.0), ("sampler", 8, 2.0)):
        images = [
            tokenizer.decode(ids[i : i + 64], steps, guidance, generator=torch.Generator().manual_seed(0))
            for i in range(0, len(ids), 64)
        ]
        report[name] = read_agreement(to_images(torch.cat(images)), [p.scene for p in prompts])
    return report


def shape_probe(
    tokenizer: DDTTokenizer, num_train: int = 20_000, num_test: int = 2_000, epochs: int = 15, seed: int = 0
) -> dict[str, float]:
    """Held-out accuracy of an MLP probe (one hidden layer of 256) that reads the shape of the single object of a
    world scene from: `codes` (the quantised tokens, flattened), `encoder` (the encoder's output before the
    quantizer), `pixels` (the image). Chance is 1/4. Scenes: `World(seed=77)`, a stream no split trains on.
    The probe needs many scenes: with 3,000 it reads the pixels' shape on only 62 % of test scenes, with 20,000 on
    95 % (README); about 2.5 minutes on 2 cores at the defaults."""
    cfg = tokenizer.config
    world, images, labels, index = World(seed=77, resolution=cfg.image_size), [], [], 0
    while len(labels) < num_train + num_test:
        scene = world.scene(index)
        index += 1
        if len(scene.objects) == 1:
            images.append(render(scene, cfg.image_size))
            labels.append(SHAPES.index(scene.objects[0].shape))
    x = uint8_to_tensor(np.stack(images))  # (N, 3, R, R)
    y = torch.tensor(labels)
    with torch.no_grad():  # in chunks: the encoder's activations for all N scenes at once do not fit in memory
        chunks = [tokenizer.search_latent(tokenizer.to_latent(x[i : i + 512])) for i in range(0, len(x), 512)]
        z = torch.cat([c[0] for c in chunks])  # (N, T, m)
        codes = tokenizer.quantizer.lookup(torch.cat([c[1] for c in chunks]))  # (N, T, m)
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for name, features in (("codes", codes.flatten(1)), ("encoder", z.flatten(1)), ("pixels", x.flatten(1))):
        train = features[:num_train]
        features = (features - train.mean(0)) / (train.std(0) + 1e-6)  # standardised with training statistics
        torch.manual_seed(seed)
        probe = torch.nn.Sequential(torch.nn.Linear(features.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 4))
        optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(epochs):
            order = torch.randperm(num_train, generator=generator)
            for start in range(0, num_train, 100):
                rows = order[start : start + 100]
                loss = F.cross_entropy(probe(features[rows]), y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            report[name] = float((probe(features[num_train:]).argmax(1) == y[num_train:]).float().mean())
    return report


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # first: before torch starts its thread pool (runtime.py)
    parser = argparse.ArgumentParser(prog="python -m ddt_lightning.diagnostics", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    oracle = commands.add_parser("oracle", help="train a decoder on oracle tokens and read its samples back")
    oracle.add_argument("--steps", type=int, default=1900)
    oracle.add_argument("--edge-weight", type=float, default=0.0)
    oracle.add_argument("--time-shift", type=float, default=3.0)
    oracle.add_argument("--resolution", type=int, default=32)
    oracle.add_argument("--dim", type=int, default=192)
    oracle.add_argument("--depth", type=int, default=3)
    oracle.add_argument("--num-scenes", type=int, default=256)
    oracle.add_argument("--seed", type=int, default=0)
    tokens = commands.add_parser("tokens", help="shape/position/colour sensitivity of an exported tokenizer")
    tokens.add_argument("export", help="a folder written by DDTTokenizer.save_pretrained")
    tokens.add_argument("--num-pairs", type=int, default=100)
    tokens.add_argument("--num-scenes", type=int, default=256)
    probe = commands.add_parser("probe", help="is an object's shape in the tokens? an MLP probe vs the pixels")
    probe.add_argument("export", help="a folder written by DDTTokenizer.save_pretrained")
    probe.add_argument("--num-train", type=int, default=20_000)
    probe.add_argument("--num-test", type=int, default=2_000)
    args = parser.parse_args(argv)
    if args.command == "oracle":
        decoder, _ = train_oracle_decoder(
            args.steps,
            args.edge_weight,
            args.resolution,
            dim=args.dim,
            depth=args.depth,
            time_shift=args.time_shift,
            seed=args.seed,
        )
        result = {"config": vars(args)} | oracle_report(decoder, args.num_scenes, args.seed)
    elif args.command == "probe":
        tokenizer = DDTTokenizer.from_pretrained(args.export).eval()
        result = {"export": args.export, "shape_probe": shape_probe(tokenizer, args.num_train, args.num_test)}
    else:
        tokenizer = DDTTokenizer.from_pretrained(args.export).eval()
        result = {"export": args.export, "sensitivity": token_sensitivity(tokenizer, args.num_pairs)}
        result |= reconstruction_report(tokenizer, args.num_scenes)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
