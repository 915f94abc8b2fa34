"""Train the `FeatureNet` behind the tokenizer's perceptual term (`TokenizerConfig.perceptual_weight`).

    python -m ddt_lightning.perceptual train outputs/world-features [--resolution 32] [--steps 800] [--seed 0]

The built-in world's *training* stream (`World(3 * seed)`, the stream `WorldDataModule` trains on; the held-out
splits are never seen) is rendered with its per-pixel shape labels (`render_shape_labels`), and the net learns to
segment them with a pixel cross-entropy. The validation stream (`World(3 * seed + 1)`) scores it: shape accuracy on
object pixels and background accuracy. The folder is written with `FeatureNet.save_pretrained` (the scores in its
metadata) and the command prints one JSON object on its last line. A plain loop: about a minute on 2 cores, too
small to need a Trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.data.world import World, render, render_shape_labels
from ddt_lightning.models.perceptual import FeatureNet, FeatureNetConfig
from ddt_lightning.modules.optim import warmup_cosine
from ddt_lightning.runtime import flush_denormals


def world_shape_data(seed: int, split_id: int, count: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, R, R) in [-1, 1] and shape labels (N, R, R) long of `World(3 * seed + split_id)`'s first
    `count` scenes (split ids as in `WorldDataModule`: 0 train, 1 val, 2 test)."""
    world = World(seed=3 * seed + split_id, resolution=resolution)
    scenes = [world.scene(i) for i in range(count)]
    images = np.stack([render(s, resolution) for s in scenes])
    labels = np.stack([render_shape_labels(s, resolution) for s in scenes])
    return uint8_to_tensor(images), torch.from_numpy(labels).long()


@torch.no_grad()
def segmentation_scores(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy of the predicted shape on object pixels (`shape_accuracy`) and on the background."""
    pred = torch.cat([net(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])
    objects = labels > 0
    return {
        "shape_accuracy": float((pred == labels)[objects].float().mean()),
        "background_accuracy": float((pred == labels)[~objects].float().mean()),
    }


def train_feature_net(
    resolution: int = 32,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    train_scenes: int = 16_384,
    val_scenes: int = 1_024,
    seed: int = 0,
    config: FeatureNetConfig | None = None,
    progress: bool = True,
) -> tuple[FeatureNet, dict[str, float]]:
    """Train a `FeatureNet` to segment the world's shapes; returns it (eval mode) and its validation scores."""
    torch.manual_seed(seed)
    x, y = world_shape_data(seed, 0, train_scenes, resolution)
    x_val, y_val = world_shape_data(seed, 1, val_scenes, resolution)
    net = FeatureNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(50, steps), steps, 0.05))
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="feature net", disable=not progress, mininterval=1.0)
    for _ in bar:
        rows = torch.randint(len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(net(x[rows]), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    optimizer.zero_grad(set_to_none=True)
    net.eval()
    return net, segmentation_scores(net, x_val, y_val)


def train_and_save(
    output: str | Path,
    resolution: int = 32,
    steps: int = 800,
    batch_size: int = 64,
    train_scenes: int = 16_384,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """`train_feature_net`, then `save_pretrained(output)` with how it was trained and scored as metadata; returns
    the validation scores. The command and the pipeline's stage 0 both make their networks here."""
    net, scores = train_feature_net(
        resolution, steps, batch_size, train_scenes=train_scenes, seed=seed, progress=progress
    )
    net.save_pretrained(output, data="world", resolution=resolution, steps=steps, seed=seed, **scores)
    return scores


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # first: before torch starts its thread pool (runtime.py)
    parser = argparse.ArgumentParser(prog="python -m ddt_lightning.perceptual", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a feature net on the built-in world and save it")
    train.add_argument("output", help="the folder to write (FeatureNet.save_pretrained)")
    train.add_argument("--resolution", type=int, default=32)
    train.add_argument("--steps", type=int, default=800)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--train-scenes", type=int, default=16_384)
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    scores = train_and_save(args.output, args.resolution, args.steps, args.batch_size, args.train_scenes, args.seed)
    minutes = (time.perf_counter() - start) / 60
    print(json.dumps({"output": str(Path(args.output)), **scores, "minutes": round(minutes, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
