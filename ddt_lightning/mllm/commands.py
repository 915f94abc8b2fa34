"""`ddt generate | caption | edit | evaluate`: DDT-LLaMA from its export folder on the command line (design.md
sections 2 and 4).

    ddt generate --model outputs/llm-tiny --prompt "a large red circle in the top left" --output outputs/samples
    ddt generate --model outputs/llm-tiny --prompts prompts.txt --guidance 3 --top_k 50 --seed 1 --mlflow
    ddt caption  --model outputs/llm-tiny --images scene.png more_scenes/ --output outputs/captions
    ddt edit     --model outputs/llm-tiny --images scene.png --instruction "make the red circle blue" --output out/
    ddt evaluate --model outputs/llm-tiny --num_prompts 256 --mlflow

`--model` is an export folder (`export_dir/lm/` + `export_dir/ddt_tokenizer/`, see `ddt_lightning.mllm.model`).
Images given to `caption` and `edit` (files, or folders searched recursively) are decoded with `load_rgb` and
resized / centre-cropped to the DDT tokenizer's resolution with the DataModules' `ImageTransform`. Outputs are
numbered PNGs with an index (`prompts.json`/`.txt`, `captions.json`/`.txt`, `edits.json`/`.txt`) and a grid.
`--mlflow` (or `--tracking_uri URI`) logs the arguments, the grid, the index and the scores to a run of the MLflow
experiment `ddt-llm` (default store: `sqlite:///mlflow.db`, `ddt_lightning.tracking`). `ddt evaluate` prints the
scores as one JSON object on its last line of standard output.

These are entry points (`main_*(argv)`), the only place besides the Lightning CLI where arguments are parsed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt
from tqdm import tqdm

from ddt_lightning.data.images import BadImageError, ImageTransform, load_rgb
from ddt_lightning.images import make_grid, save_png
from ddt_lightning.mllm.evaluate import evaluate_world, to_numpy_images
from ddt_lightning.mllm.model import (
    DEFAULT_CAPTION_BEAMS,
    DEFAULT_CAPTION_RERANK,
    DEFAULT_DECODE_GUIDANCE,
    DEFAULT_DRAW_CANDIDATES,
    DEFAULT_IMAGE_TEMPERATURE,
    DEFAULT_REWRITE_SOURCE_WEIGHT,
    DDTLlama,
)

EXPERIMENT = "ddt-llm"


# ---------------------------------------------------------------------------------------------------------------
# Shared arguments and inputs
# ---------------------------------------------------------------------------------------------------------------


def _parser(command: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"ddt {command}", description=description)
    parser.add_argument("--model", type=str, required=True, help="a DDT-LLaMA export folder (with lm/)")
    parser.add_argument("--tokenizer_path", type=str | None, default=None, help="DDT tokenizer, if not in the export")
    parser.add_argument("--device", type=str, default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--batch_size", type=int, default=16, help="images per batch")
    parser.add_argument("--mlflow", action="store_true", help=f"log to an MLflow run of experiment {EXPERIMENT!r}")
    parser.add_argument("--tracking_uri", type=str | None, default=None, help="MLflow store (implies --mlflow)")
    parser.add_argument("--run_name", type=str | None, default=None, help="MLflow run name")
    parser.add_argument("--experiment_name", type=str, default=EXPERIMENT, help="MLflow experiment")
    return parser


def _beams_argument(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--num_beams",
        type=int,
        default=DEFAULT_CAPTION_BEAMS,
        help="beam search width of the captions (1: greedy; default: the main job's)",
    )
    parser.add_argument(
        "--rerank",
        type=float,
        default=DEFAULT_CAPTION_RERANK,
        help="pick among the beams by log p(caption | image) + RERANK * log p(image | caption) (0: the top beam)",
    )


def _rewrite_argument(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--rewrite_source_weight",
        type=float,
        default=DEFAULT_REWRITE_SOURCE_WEIGHT,
        help="a chain model's rewrite: the beam maximising log p(rewrite | caption, instruction) + this * "
        "log p(source | rewrite) (0: the likeliest; default: the main job's)",
    )


def _sampling_arguments(parser: ArgumentParser, candidates: int | None = DEFAULT_DRAW_CANDIDATES) -> None:
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument(
        "--candidates",
        type=PositiveInt | None,
        default=candidates,
        help="drawings per prompt, the one the LM reads back as its prompt likeliest kept (1: draw once)"
        + ("" if candidates else "; default: the model's (a chain model's, else 1)"),
    )
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_IMAGE_TEMPERATURE, help="of the image tokens (0: greedy)"
    )
    parser.add_argument("--top_k", type=int | None, default=None, help="sample among the k likeliest codes")
    parser.add_argument("--top_p", type=float | None, default=None, help="nucleus sampling")
    parser.add_argument("--decode_steps", type=int | None, default=None, help="DDT decoder steps (default: export's)")
    parser.add_argument(
        "--decode_guidance",
        type=float,
        default=DEFAULT_DECODE_GUIDANCE,
        help="the DDT decoder's own guidance (default: the main job's)",
    )


def _sampling(args: Namespace) -> dict[str, Any]:
    keys = ("guidance", "temperature", "top_k", "top_p", "decode_steps", "decode_guidance", "batch_size", "candidates")
    return {key: args[key] for key in keys}


def _load_model(parser: ArgumentParser, args: Namespace) -> DDTLlama:
    try:
        return DDTLlama.from_pretrained(args.model, args.tokenizer_path, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--model: {error}")


def _generator(model: DDTLlama, seed: int) -> torch.Generator:
    return torch.Generator(device=model.device).manual_seed(seed)


def _read_lines(parser: ArgumentParser, option: str, path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        parser.error(f"{option}: file {file} not found")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not lines:
        parser.error(f"{option}: {file} is empty (one entry per line)")
    return lines


def _prompts(parser: ArgumentParser, args: Namespace) -> list[str]:
    prompts = [p.strip() for p in args.prompt or []]
    if any(not p for p in prompts):
        parser.error("--prompt: an empty prompt (use a non-empty caption)")
    if args.prompts:
        prompts += _read_lines(parser, "--prompts", args.prompts)
    if not prompts:
        parser.error("no prompts: give --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    return prompts


def _image_paths(parser: ArgumentParser, specs: list[str] | None) -> list[Path]:
    from ddt_lightning.datamodules.class_folder import list_images

    if not specs:
        parser.error("no images: give --images PATH [PATH ...] (image files or folders)")
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = list_images(path, ignored=[])
            if not found:
                parser.error(f"--images: no image file in folder {path}")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            parser.error(f"--images: image path {path} not found")
    return paths


def _load_images(parser: ArgumentParser, paths: list[Path], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]: `load_rgb`, then the DataModules' resize / centre crop to the tokenizer's size."""
    transform = ImageTransform(resolution)
    images = []
    for path in tqdm(paths, desc="loading images", file=sys.stderr, unit="img"):
        try:
            images.append(transform(load_rgb(path)))
        except BadImageError as error:
            parser.error(f"--images: {error}")
    return torch.stack(images)


def _write_images(images: torch.Tensor, folder: Path) -> list[str]:
    """Numbered PNGs `0000.png`, ... in `folder`; returns the file names."""
    names = []
    for i, array in enumerate(to_numpy_images(images)):
        names.append(save_png(array, folder / f"{i:04d}.png").name)
    return names


def _write_index(folder: Path, stem: str, rows: list[dict[str, str]], header: dict[str, Any]) -> str:
    """`stem.json` ({settings, rows}) and `stem.txt` (the rows' values, tab-separated); returns the JSON text."""
    text = json.dumps(header | {"items": rows}, indent=2)
    (folder / f"{stem}.json").write_text(text)
    (folder / f"{stem}.txt").write_text("".join("\t".join(map(_one_line, row.values())) + "\n" for row in rows))
    return text


def _one_line(text: str) -> str:
    """A field of a tab-separated line: generated text may hold tabs or newlines."""
    return " ".join(str(text).split())


class _Run:
    """An MLflow run (experiment `ddt-llm` unless `--experiment_name`) with `--mlflow` or `--tracking_uri`; else a
    no-op."""

    def __init__(self, args: Namespace, command: str) -> None:
        self.logger = None
        if args.mlflow or args.tracking_uri:
            from ddt_lightning.tracking import MLflowLogger

            name = args.run_name or command
            self.logger = MLflowLogger(args.experiment_name, run_name=name, tracking_uri=args.tracking_uri)
            skip = ("mlflow", "tracking_uri", "run_name", "experiment_name")
            params = {k: v for k, v in args.as_dict().items() if k not in skip}
            self.logger.log_hyperparams({"command": command, **params})

    def image(self, key: str, grid: np.ndarray) -> None:
        if self.logger is not None:
            from ddt_lightning.images import log_image

            log_image(self.logger, key, grid, step=0)

    def text(self, text: str, file_name: str) -> None:
        if self.logger is not None:
            self.logger.experiment.log_text(self.logger.run_id, text, file_name)

    def metrics(self, scores: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_metrics(dict(scores), step=0)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if self.logger is not None:
            self.logger.finalize("success" if kind is None else "failed")
            if kind is None:
                print(self.logger.describe())


def _grid(rows: list[torch.Tensor], max_columns: int = 16) -> np.ndarray:
    """Rows of images (each (N, 3, H, W)) as one grid, a column per item (at most `max_columns`)."""
    n = min(min(len(r) for r in rows), max_columns)
    return make_grid(torch.cat([r[:n].cpu() for r in rows]), nrow=n)


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def main_generate(argv: list[str] | None = None) -> int:
    """`ddt generate`: text-to-image; numbered PNGs, `prompts.json`/`.txt` and `grid.png` in `--output`."""
    parser = _parser("generate", "Text-to-image with DDT-LLaMA (classifier-free guidance, KV cache).")
    parser.add_argument("--prompt", type=str, action="append", default=None, help="a caption (repeatable)")
    parser.add_argument("--prompts", type=str | None, default=None, help="a file of captions, one per line")
    parser.add_argument("--num_per_prompt", type=int, default=1, help="images per prompt")
    parser.add_argument("--output", type=str, default="outputs/generated", help="folder for the PNGs and the index")
    _sampling_arguments(parser)
    args = parser.parse_args(argv)
    prompts = _prompts(parser, args)
    if args.num_per_prompt < 1:
        parser.error(f"--num_per_prompt must be >= 1, got {args.num_per_prompt}")
    prompts = [p for p in prompts for _ in range(args.num_per_prompt)]
    model = _load_model(parser, args)
    with _Run(args, "generate") as run:
        images = model.text_to_image(prompts, generator=_generator(model, args.seed), progress=True, **_sampling(args))
        folder = Path(args.output)
        names = _write_images(images, folder)
        header = {"model": args.model, "seed": args.seed, **_sampling(args)}
        index = _write_index(folder, "prompts", [{"file": f, "prompt": p} for f, p in zip(names, prompts)], header)
        grid = make_grid(images.cpu(), nrow=min(len(images), 8))
        save_png(grid, folder / "grid.png")
        run.image("generate/grid", grid)
        run.text(index, "prompts.json")
        print(f"wrote {len(names)} images to {folder} (index: {folder / 'prompts.json'})")
    return 0


def main_caption(argv: list[str] | None = None) -> int:
    """`ddt caption`: one line `path<TAB>caption` per image on stdout; `captions.json`/`.txt` in `--output` if set."""
    parser = _parser("caption", "Image captioning with DDT-LLaMA (greedy unless --do_sample).")
    parser.add_argument("--images", type=str, nargs="+", default=None, help="image files or folders")
    parser.add_argument("--output", type=str | None, default=None, help="folder for captions.json / captions.txt")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="caption length limit")
    _beams_argument(parser)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of beam search or greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --do_sample")
    parser.add_argument("--top_k", type=int | None, default=None, help="with --do_sample")
    parser.add_argument("--top_p", type=float | None, default=None, help="with --do_sample")
    args = parser.parse_args(argv)
    paths = _image_paths(parser, args.images)
    model = _load_model(parser, args)
    images = _load_images(parser, paths, model.resolution)
    with _Run(args, "caption") as run:
        captions = model.caption(
            images,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=_generator(model, args.seed),
            batch_size=args.batch_size,
            progress=True,
            num_beams=args.num_beams,
            rerank=args.rerank,
        )
        rows = [{"image": str(p), "caption": c} for p, c in zip(paths, captions)]
        header = {"model": args.model, "seed": args.seed, "do_sample": args.do_sample, "num_beams": args.num_beams}
        header["rerank"] = args.rerank
        text = json.dumps(header | {"items": rows}, indent=2)
        if args.output:
            folder = Path(args.output)
            folder.mkdir(parents=True, exist_ok=True)
            _write_index(folder, "captions", rows, header)
        run.image("caption/images", _grid([images]))
        run.text(text, "captions.json")
        for row in rows:
            print(f"{row['image']}\t{_one_line(row['caption'])}")
    return 0


def main_edit(argv: list[str] | None = None) -> int:
    """`ddt edit`: edited images as numbered PNGs, `edits.json`/`.txt` and `grid.png` (sources over edits)."""
    parser = _parser("edit", "Instruction-based image editing with DDT-LLaMA.")
    parser.add_argument("--images", type=str, nargs="+", default=None, help="source image files or folders")
    parser.add_argument("--instruction", type=str, action="append", default=None, help="one for all, or one per image")
    parser.add_argument("--instructions", type=str | None, default=None, help="a file of instructions, one per line")
    parser.add_argument("--output", type=str, default="outputs/edited", help="folder for the PNGs and the index")
    _sampling_arguments(parser, candidates=None)
    _rewrite_argument(parser)
    args = parser.parse_args(argv)
    paths = _image_paths(parser, args.images)
    instructions = [i.strip() for i in args.instruction or []]
    if any(not i for i in instructions):
        parser.error("--instruction: an empty instruction")
    if args.instructions:
        instructions += _read_lines(parser, "--instructions", args.instructions)
    if len(instructions) == 1:
        instructions *= len(paths)
    if len(instructions) != len(paths):
        parser.error(f"{len(instructions)} instructions for {len(paths)} images: give one, or one per image")
    model = _load_model(parser, args)
    sources = _load_images(parser, paths, model.resolution)
    with _Run(args, "edit") as run:
        rewrite = {"rewrite_source_weight": args.rewrite_source_weight} if model.reads_back_edits else {}
        edited = model.edit(
            sources, instructions, generator=_generator(model, args.seed), progress=True, **rewrite, **_sampling(args)
        )
        folder = Path(args.output)
        names = _write_images(edited, folder)
        rows = [{"file": f, "source": str(p), "instruction": i} for f, p, i in zip(names, paths, instructions)]
        index = _write_index(folder, "edits", rows, {"model": args.model, "seed": args.seed, **_sampling(args)})
        grid = _grid([sources, edited])
        save_png(grid, folder / "grid.png")
        run.image("edit/grid", grid)
        run.text(index, "edits.json")
        print(f"wrote {len(names)} edited images to {folder} (index: {folder / 'edits.json'})")
    return 0


def main_evaluate(argv: list[str] | None = None) -> int:
    """`ddt evaluate`: held-out world scores (`ddt_lightning.mllm.evaluate`); the last stdout line is their JSON."""
    parser = _parser("evaluate", "GenEval-style, captioning and editing scores on the world's held-out stream.")
    parser.add_argument("--world_seed", type=int, default=0, help="the WorldDataModule seed the LM was trained with")
    parser.add_argument("--max_objects", type=int, default=3, help="the WorldDataModule's max_objects")
    parser.add_argument("--num_prompts", type=int, default=64, help="GenEval prompts (0: skip)")
    parser.add_argument("--num_captions", type=int, default=64, help="images to caption (0: skip)")
    parser.add_argument("--num_edits", type=int, default=64, help="edit pairs (0: skip)")
    parser.add_argument("--edit_guidance", type=float | None, default=None, help="default: --guidance")
    parser.add_argument("--ceilings", type=bool, default=True, help="score the DDT tokenizer's reconstructions too")
    _beams_argument(parser)
    parser.add_argument("--output", type=str | None, default=None, help="folder for scores.json, grids, captions")
    _sampling_arguments(parser)
    _rewrite_argument(parser)
    args = parser.parse_args(argv)
    model = _load_model(parser, args)
    with _Run(args, "evaluate") as run:
        scores = evaluate_world(
            model,
            seed=args.world_seed,
            num_prompts=args.num_prompts,
            num_captions=args.num_captions,
            num_edits=args.num_edits,
            guidance=args.guidance,
            edit_guidance=args.edit_guidance,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            decode_steps=args.decode_steps,
            decode_guidance=args.decode_guidance,
            caption_beams=args.num_beams,
            caption_rerank=args.rerank,
            candidates=args.candidates,
            rewrite_source_weight=args.rewrite_source_weight,
            batch_size=args.batch_size,
            generator_seed=args.seed,
            ceilings=args.ceilings,
            max_objects=args.max_objects,
        )
        captions = json.dumps([{"held_out": t, "generated": g} for t, g in scores.captions], indent=2)
        grids = scores.grids()
        if args.output:
            folder = Path(args.output)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "scores.json").write_text(json.dumps(dict(scores), indent=2))
            (folder / "captions.json").write_text(captions)
            for name, grid in grids.items():
                save_png(grid, folder / f"{name}.png")
        for name, grid in grids.items():
            run.image(f"evaluate/{name}", grid)
        run.metrics(scores)
        run.text(captions, "captions.json")
    sys.stdout.flush()
    print(json.dumps(dict(scores)), flush=True)
    return 0
