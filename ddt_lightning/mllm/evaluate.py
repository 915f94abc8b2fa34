"""DDT-LLaMA on the built-in world's held-out stream: GenEval-style, captioning and editing scores (design.md s. 4).

Every figure is computed on held-out data: the test stream of `WorldDataModule(seed=seed)`, `World(seed=3 seed + 2)`
(`geneval.held_out_world`), rendered at the DDT tokenizer's resolution. Sample i is the same scene in every task.

- **Text-to-image** (`geneval_overall`, `geneval/<category>`): `model.text_to_image` on the captions of the first
  `num_prompts` held-out scenes (`geneval.geneval_suite`), each image read back by the GenEval-style checker; the
  overall score is the mean of the per-category accuracies (GenEval, Ghosh et al. 2023). A category no prompt tests
  (e.g. `single_object` in a tiny run without a one-object scene) has no key.
- **Captioning** (`caption_accuracy`): the fraction of the first `num_captions` held-out images whose generated
  caption parses (the world's grammar) to exactly the scene's objects (`geneval.caption_accuracy`).
- **Editing** (`edit_success`, `edit_l1`): `model.edit` on the first `num_edits` held-out (image, instruction)
  pairs; success = the objects read back are exactly the edited scene's (`geneval.edit_success`), L1 = mean
  absolute difference to the world's edited render on the [0, 1] scale.
- **Ceilings** (`ceiling/...`, optional): the same scores of the DDT tokenizer's own reconstructions (encode ->
  decode, same steps and generator) of the ground-truth images and edited images: an LM that emits exactly the
  right codes reaches these, so they bound what the LM can reach through this tokenizer.
- **Readability** (`read/<attribute>`, `ceiling/read/<attribute>`): per object of the prompts' scenes, whether the
  object the checker matches to it (nearest centroid) in the generated image, or in the reconstruction, has its
  shape, colour, size and quadrant (`geneval.attribute_agreement`): which attribute the images lose.

All values lie in [0, 1]. `evaluate_world` returns them as a dict that also carries sample images for grids.
Each generation and scoring loop has a tqdm bar on stderr. Pure PyTorch (no Lightning).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ddt_lightning.data.images import uint8_to_tensor
from ddt_lightning.geneval import (
    CAPTION_ATTRIBUTES,
    CATEGORIES,
    attribute_agreement,
    caption_accuracy,
    caption_attribute_scores,
    detect_objects,
    edit_l1,
    edit_success,
    geneval_suite,
    held_out_world,
    score_image,
)
from ddt_lightning.images import make_grid, to_uint8
from ddt_lightning.mllm.model import (
    DEFAULT_CAPTION_BEAMS,
    DEFAULT_CAPTION_RERANK,
    DEFAULT_DECODE_GUIDANCE,
    DEFAULT_DRAW_CANDIDATES,
    DEFAULT_IMAGE_TEMPERATURE,
    DEFAULT_REWRITE_SOURCE_WEIGHT,
)


def to_numpy_images(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, what the checker reads."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def from_numpy_images(arrays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.stack([uint8_to_tensor(a) for a in arrays])


class WorldScores(dict):
    """The scores ({name: value in [0, 1]}, a plain dict to JSON and MLflow), carrying the first few images of each
    task for grids (`samples`, name -> (n, 3, H, W) in [-1, 1]), the (held-out, generated) captions and the edit
    instructions."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, torch.Tensor] = {}
        self.captions: list[tuple[str, str]] = []
        self.instructions: list[str] = []

    def grids(self) -> dict[str, np.ndarray]:
        """`t2i`: references over generations (and reconstructions); `edit`: sources, edits, targets; `caption`:
        the captioned images. One (H', W', 3) uint8 grid per task, a row per kind, a column per sample."""
        rows = {
            "t2i": ["t2i/reference", "t2i/generated", "t2i/reconstructed"],
            "edit": ["edit/source", "edit/generated", "edit/target", "edit/reconstructed"],
            "caption": ["caption/image"],
        }
        grids = {}
        for name, keys in rows.items():
            present = [self.samples[k] for k in keys if k in self.samples]
            if present:
                n = min(len(p) for p in present)
                grids[name] = make_grid(torch.cat([p[:n] for p in present]), nrow=n)
        return grids


def _bar(items: Any, desc: str, progress: bool) -> Any:
    return tqdm(items, desc=desc, file=sys.stderr, disable=not progress, unit="img")


def _geneval(images: np.ndarray, prompts: list, desc: str, progress: bool) -> dict[str, float]:
    """`geneval.geneval_scores` with a progress bar: each category's accuracy over the prompts that test it, and
    `overall`, the mean of those."""
    results = [score_image(image, prompt) for prompt, image in zip(_bar(prompts, desc, progress), images)]
    tested = [c for c in CATEGORIES if any(c in r for r in results)]
    categories = {c: float(np.mean([r[c] for r in results if c in r])) for c in tested}
    return {"overall": float(np.mean(list(categories.values()))), **categories}


def _readability(images: np.ndarray, scenes: list, prefix: str) -> dict[str, float]:
    """`<prefix>read/<attribute>`: the fraction of scene objects whose matched detection has that attribute."""
    agree: dict[str, list[bool]] = {}
    for image, scene in zip(images, scenes):
        for attribute, values in attribute_agreement(detect_objects(image), scene).items():
            agree.setdefault(attribute, []).extend(values)
    return {f"{prefix}read/{attribute}": float(np.mean(values)) for attribute, values in agree.items() if values}


def _edit_scores(edited: np.ndarray, samples: list, desc: str, progress: bool) -> dict[str, float]:
    success, l1 = [], []
    for sample, image in zip(_bar(samples, desc, progress), edited):
        success.append(edit_success(image, sample.edited_scene))
        l1.append(edit_l1(image, sample.edited_image))
    return {"edit_success": float(np.mean(success)), "edit_l1": float(np.mean(l1))}


def evaluate_world(
    model: Any,
    seed: int = 0,
    num_prompts: int = 64,
    num_captions: int = 64,
    num_edits: int = 64,
    guidance: float = 3.0,
    edit_guidance: float | None = None,
    temperature: float = DEFAULT_IMAGE_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    decode_steps: int | None = None,
    decode_guidance: float = DEFAULT_DECODE_GUIDANCE,
    max_new_tokens: int = 64,
    caption_beams: int = DEFAULT_CAPTION_BEAMS,
    caption_rerank: float = DEFAULT_CAPTION_RERANK,
    candidates: int = DEFAULT_DRAW_CANDIDATES,
    rewrite_source_weight: float = DEFAULT_REWRITE_SOURCE_WEIGHT,
    batch_size: int = 16,
    generator_seed: int = 0,
    ceilings: bool = True,
    max_objects: int = 3,
    num_samples: int = 8,
    progress: bool = True,
) -> WorldScores:
    """Evaluate a `DDTLlama` (or anything with its `resolution`, `text_to_image`, `caption`, `edit` and
    `reconstruct`) on the held-out world of `seed`; see the module docstring for the scores.

    Args:
        num_prompts, num_captions, num_edits: held-out samples per task (0 skips the task).
        guidance, edit_guidance: classifier-free guidance of text-to-image and of edits (default: `guidance`).
        generator_seed: seeds one CPU-or-device generator per task, so a task's images do not depend on the others.
        caption_beams: beam search width of the captions (1: greedy).
        caption_rerank: weight of log p(image | caption) when the beams are reranked (0: the top beam).
        candidates: drawings per prompt, the one kept that the model reads back as its prompt likeliest - in
            text-to-image and in a chain model's edits (the other edit formats draw once).
        rewrite_source_weight: a chain model's rewrites checked against the source (`DDTLlama.rewrite`; 0: none).
        ceilings: also score the DDT tokenizer's reconstructions of the ground truth (`ceiling/...`).
        num_samples: images per task kept in `samples` for grids.
    """
    for key, value in (("num_prompts", num_prompts), ("num_captions", num_captions), ("num_edits", num_edits)):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    resolution = int(model.resolution)
    device = getattr(model, "device", torch.device("cpu"))
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampling |= dict(decode_steps=decode_steps, decode_guidance=decode_guidance)
    decoder = dict(steps=decode_steps, guidance=decode_guidance)

    def generator(task: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(generator_seed * 1_000 + task)

    scores = WorldScores()
    keep = slice(0, num_samples)

    if num_prompts:
        prompts = geneval_suite(seed, num_prompts, resolution, max_objects)
        generated = model.text_to_image(
            [p.caption for p in prompts],
            guidance=guidance,
            generator=generator(0),
            batch_size=batch_size,
            progress=progress,
            candidates=candidates,
            **sampling,
        )
        found = _geneval(to_numpy_images(generated), prompts, "GenEval reader", progress)
        scores["geneval_overall"] = found.pop("overall")
        scores |= {f"geneval/{category}": value for category, value in found.items()}
        scores |= _readability(to_numpy_images(generated), [p.scene for p in prompts], "")
        references = from_numpy_images([p.reference for p in prompts])
        scores.samples["t2i/reference"], scores.samples["t2i/generated"] = references[keep], generated[keep].cpu()
        if ceilings:
            rebuilt = _reconstruct(model, references, decoder, generator(3), batch_size, progress)
            found = _geneval(to_numpy_images(rebuilt), prompts, "GenEval reader (ceiling)", progress)
            scores["ceiling/geneval_overall"] = found.pop("overall")
            scores |= {f"ceiling/geneval/{category}": value for category, value in found.items()}
            scores |= _readability(to_numpy_images(rebuilt), [p.scene for p in prompts], "ceiling/")
            scores.samples["t2i/reconstructed"] = rebuilt[keep].cpu()

    world = held_out_world(seed, resolution, max_objects)
    held_out = [world.sample(i) for i in _bar(range(max(num_captions, num_edits)), "held-out samples", progress)]
    if num_captions:
        samples = held_out[:num_captions]
        images = from_numpy_images([s.image for s in samples])
        predicted = model.caption(
            images,
            max_new_tokens=max_new_tokens,
            generator=generator(1),
            batch_size=batch_size,
            progress=progress,
            num_beams=caption_beams,
            rerank=caption_rerank,
        )
        correct = [caption_accuracy(text, s.scene) for text, s in zip(predicted, samples)]
        scores["caption_accuracy"] = float(np.mean(correct))
        parts = [caption_attribute_scores(text, s.scene) for text, s in zip(predicted, samples)]
        scores.update({f"caption/{a}": float(np.mean([p[a] for p in parts])) for a in CAPTION_ATTRIBUTES})
        scores.captions = [(s.caption, text) for s, text in zip(samples, predicted)]
        scores.samples["caption/image"] = images[keep]

    if num_edits:
        samples = held_out[:num_edits]
        sources = from_numpy_images([s.image for s in samples])
        instructions = [s.edit_instruction for s in samples]
        edited = model.edit(
            sources,
            instructions,
            guidance=guidance if edit_guidance is None else edit_guidance,
            generator=generator(2),
            batch_size=batch_size,
            progress=progress,
            candidates=candidates if model.reads_back_edits else 1,
            **({"rewrite_source_weight": rewrite_source_weight} if model.reads_back_edits else {}),
            **sampling,
        )
        scores |= _edit_scores(to_numpy_images(edited), samples, "edit reader", progress)
        targets = from_numpy_images([s.edited_image for s in samples])
        scores.samples |= {
            "edit/source": sources[keep],
            "edit/generated": edited[keep].cpu(),
            "edit/target": targets[keep],
        }
        scores.instructions = instructions
        if ceilings:
            rebuilt = _reconstruct(model, targets, decoder, generator(4), batch_size, progress)
            ceiling = _edit_scores(to_numpy_images(rebuilt), samples, "edit reader (ceiling)", progress)
            scores |= {f"ceiling/{key}": value for key, value in ceiling.items()}
            scores.samples["edit/reconstructed"] = rebuilt[keep].cpu()
    return scores


def _reconstruct(
    model: Any, images: torch.Tensor, decoder: dict, generator: torch.Generator, batch_size: int, progress: bool
) -> torch.Tensor:
    """The DDT tokenizer's encode -> decode (the decoder settings of the generations) of ground-truth images."""
    parts = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    bar = tqdm(parts, desc="reconstructions", file=sys.stderr, disable=not progress, unit="batch")
    return torch.cat([model.reconstruct(part, generator=generator, **decoder).cpu() for part in bar])
