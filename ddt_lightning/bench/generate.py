"""`python -m ddt_lightning.bench generate`: cost of classifier-free guidance in text-to-image sampling.

Builds a small random DDT-LLaMA (`LlamaForCausalLM` from a config; vocabulary = text ids + `<boi>`/`<eoi>` + K
visual codes, design.md section 2) and, on the same batch of caption prompts in the same run, times:

- **guided**: `ddt_lightning.mllm.generation.generate_image_tokens` with guidance s (default 3.0, so 2B rows per
  forward: the B captions and B null prompts, Ho & Salimans 2022), top-k sampling over the visual slice;
- **plain**: transformers' `model.generate` on the B captions without guidance (`max_new_tokens = min_new_tokens =
  T`, sampling with the same top-k, `use_cache=True`);
- **ours, unguided** (guidance 1, B rows), to separate the loop's own overhead from the cost of the null half.

Each figure is the median over timed repeats after a warm-up. `guidance_cost_ratio` = guided seconds per image
token / plain seconds per image token (target <= 1.5). The last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from ddt_lightning.bench import torch_threads
from ddt_lightning.mllm.generation import ImageSpan, generate_image_tokens

BOS_ID, EOS_ID = 1, 2  # inside the text ids


def build_model(
    text_vocab: int, num_codes: int, hidden: int, layers: int, heads: int, max_len: int
) -> LlamaForCausalLM:
    """A random `LlamaForCausalLM` over text ids, `<boi>`, `<eoi>` and K visual codes, in eval mode."""
    config = LlamaConfig(
        vocab_size=text_vocab + 2 + num_codes,  # text, <boi>, <eoi>, K visual codes
        hidden_size=hidden,
        intermediate_size=(hidden * 8 // 3 + 15) // 16 * 16,  # LLaMA's 8/3 d SwiGLU width, rounded to 16
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return LlamaForCausalLM(config).eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(
    batch_size: int,
    prompt_len: int,
    num_tokens: int,
    num_codes: int,
    text_vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    guidance: float,
    top_k: int,
    repeats: int,
    seed: int,
) -> dict:
    torch.manual_seed(seed)
    model = build_model(text_vocab, num_codes, hidden, layers, heads, max_len=prompt_len + num_tokens + 8)
    boi = text_vocab  # then <eoi>, then the K visual ids
    span = ImageSpan(boi_id=boi, eoi_id=boi + 1, visual_offset=boi + 2, num_codes=num_codes, num_tokens=num_tokens)
    # Captions: <bos> caption <boi>; the null prompt: <bos> <boi> (the caption dropped, as in training).
    cond = torch.randint(3, text_vocab, (batch_size, prompt_len))  # (B, L)
    cond[:, 0], cond[:, -1] = BOS_ID, span.boi_id
    uncond = [[BOS_ID, span.boi_id]]
    plain_config = GenerationConfig(
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=top_k,
        top_p=1.0,
        use_cache=True,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    generator = torch.Generator().manual_seed(seed)
    outputs: dict[str, torch.Tensor] = {}

    def guided() -> None:
        outputs["guided"] = generate_image_tokens(
            model, cond, uncond, span, guidance=guidance, top_k=top_k, generator=generator
        )

    def unguided() -> None:
        outputs["unguided"] = generate_image_tokens(model, cond, None, span, top_k=top_k, generator=generator)

    def plain() -> None:
        with torch.inference_mode():
            outputs["plain"] = model.generate(
                input_ids=cond, attention_mask=torch.ones_like(cond), generation_config=plain_config
            )

    runs = {"guided": guided, "plain": plain, "unguided": unguided}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for fn in tqdm(runs.values(), desc="bench generate: warm-up", file=sys.stderr):
        fn()
    for _ in tqdm(range(repeats), desc="bench generate: timing", file=sys.stderr):
        for name, fn in runs.items():  # interleaved, so that drifting machine load hits all three alike
            seconds[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    image_tokens = batch_size * num_tokens
    codes = outputs["guided"]
    return {
        "guided_tokens_per_s": round(image_tokens / median["guided"], 1),
        "plain_tokens_per_s": round(image_tokens / median["plain"], 1),
        "unguided_tokens_per_s": round(image_tokens / median["unguided"], 1),
        "guidance_cost_ratio": round(median["guided"] / median["plain"], 3),
        "unguided_cost_ratio": round(median["unguided"] / median["plain"], 3),
        "guided_seconds": round(median["guided"], 4),
        "plain_seconds": round(median["plain"], 4),
        "unguided_seconds": round(median["unguided"], 4),
        "codes_valid": bool(codes.shape == (batch_size, num_tokens) and codes.min() >= 0 and codes.max() < num_codes),
        "plain_new_tokens": int(outputs["plain"].shape[1] - prompt_len),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "null_prompt_len": len(uncond[0]),
        "num_tokens": num_tokens,
        "num_codes": num_codes,
        "vocab_size": model.config.vocab_size,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "guidance": guidance,
        "top_k": top_k,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddt_lightning.bench generate", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=20, help="caption prompt length, <bos> and <boi> included")
    parser.add_argument("--tokens", type=int, default=32, help="T, visual tokens per image")
    parser.add_argument("--codes", type=int, default=1024, help="K, visual codebook size")
    parser.add_argument("--text-vocab", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.prompt_len < 2:
        parser.error("--prompt-len must be >= 2 (<bos> and <boi>)")
    with torch_threads(args.threads):
        result = run(
            args.batch_size,
            args.prompt_len,
            args.tokens,
            args.codes,
            args.text_vocab,
            args.hidden,
            args.layers,
            args.heads,
            args.guidance,
            args.top_k,
            args.repeats,
            args.seed,
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
