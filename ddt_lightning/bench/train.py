"""`python -m ddt_lightning.bench train`: DDT tokenizer training throughput and model FLOP utilisation.

Runs the training step of the main job (`DDTTokenizer.forward` + backward + AdamW, the `tiny` preset, batch 32,
fp32, built-in world images) and reports:

- `images_per_s`: training images per second, median over timed windows after warm-up;
- `gflop_per_image`: FLOPs of one training step per image, counted by `torch.utils.flop_counter.FlopCounterMode`
  (matmuls and attention; elementwise work is not counted, as usual for MFU);
- `peak_gflops`: this machine's fp32 matmul peak measured in the same run (best of square sgemms after each timed
  window; the median over windows);
- `mfu`: achieved FLOP/s over the peak measured right after it, the median over windows (`mfu_range`: min, max).

The last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ddt_lightning.bench import torch_threads
from ddt_lightning.tokenizer import DDTTokenizer, TokenizerConfig


def matmul_peak(size: int = 2048, repeats: int = 12) -> float:
    """Best fp32 sgemm FLOP/s over `repeats` multiplications of two size x size matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def world_batch(batch_size: int, resolution: int) -> torch.Tensor:
    from ddt_lightning.data.world import World

    world = World(seed=123, resolution=resolution)
    images = torch.stack([torch.from_numpy(world.sample(i).image) for i in range(batch_size)])  # (B, H, W, 3)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def run(batch_size: int, steps: int, windows: int, compile_model: bool, preset: str) -> dict:
    torch.manual_seed(0)
    config = dataclasses.replace(TokenizerConfig.preset(preset))
    tokenizer = DDTTokenizer(config).train()
    if compile_model:
        tokenizer.encoder.compile()
        tokenizer.decoder.compile()
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-4, betas=(0.9, 0.99), fused=True)
    batch = world_batch(batch_size, config.image_size)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        tokenizer(batch, generator=generator).loss.backward()
        optimizer.step()

    for _ in tqdm(range(3), desc="warm-up", file=sys.stderr):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    # The machine's speed drifts (other tenants): each timed window is paired with a short sgemm peak measured
    # right after it, and the reported mfu is the median of the per-window ratios.
    rates, peaks = [], []
    for _ in tqdm(range(windows), desc="timing", file=sys.stderr):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch_size * steps / (time.perf_counter() - start))
        peaks.append(matmul_peak(repeats=4))
    ratios = [flops_per_step / batch_size * rate / peak for rate, peak in zip(rates, peaks)]
    images_per_s, peak = statistics.median(rates), statistics.median(peaks)
    achieved = flops_per_step / batch_size * images_per_s
    return {
        "images_per_s": round(images_per_s, 2),
        "gflop_per_image": round(flops_per_step / batch_size / 1e9, 4),
        "achieved_gflops": round(achieved / 1e9, 2),
        "peak_gflops": round(peak / 1e9, 2),
        "mfu": round(statistics.median(ratios), 4),
        "mfu_range": [round(min(ratios), 4), round(max(ratios), 4)],
        "batch_size": batch_size,
        "preset": preset,
        "parameters": sum(p.numel() for p in tokenizer.parameters()),
        "compile": compile_model,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddt_lightning.bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    parser.add_argument(
        "--windows", type=int, default=7, help="timed windows; the median is reported (this machine is noisy)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        result = run(args.batch_size, args.steps, args.windows, args.compile, args.preset)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
