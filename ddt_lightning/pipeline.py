"""`ddt pipeline --config configs/pipeline.yaml`: the whole DDT-LLaMA pipeline on the built-in world, in one process.

design.md sections 1-2 and 4, stage by stage, all in one MLflow experiment, each with its progress bar:

0. **features** - when the tokenizer's config names a `feature_net` folder (its distillation or perceptual term)
   that does not exist yet: train that frozen network on the world (`python -m ddt_lightning.perceptual train`);
1. **tokenizer** - `ddt fit --config <tokenizer>`: train the DDT tokenizer, export it, evaluate it on held-out images;
2. **pretokenize** - `ddt pretokenize --config <pretokenize>`: encode the world's images and edit targets once;
3. **llm** - `ddt fit --config <llm>`: train DDT-LLaMA on those shards, export the LM + tokenizers as one folder;
4. **evaluate** - `ddt evaluate`: GenEval-style, captioning and editing scores on held-out prompts and images.

A stage whose output already exists for the same inputs is reused, not recomputed, and the pipeline says so (an
existing feature network is used as it is, and the digest of its weights is part of the tokenizer's key): the
tokenizer and LLM exports carry a `stage.json` with the digest of their parsed config files (and, for the LLM, of the
tokenizer and the shards it read) and the figures the stage reported; the shards carry their own manifest
(`ddt_lightning/pretokenize.py`). The last line of standard output is one JSON object: the tokenizer's held-out
figures (`psnr_onestep`, `psnr_sampler`, `sampler_steps`, `usage`, `prefix_psnr`; its folder as
`tokenizer_export`), the LLM's held-out scores (`geneval_overall`, `caption_accuracy`, `edit_success`, ...), and
`export`, the folder that holds the LM, its tokenizer and the DDT tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

STAGE_FILE = "stage.json"
TOKENIZER_KEYS = ("psnr_onestep", "psnr_sampler", "sampler_steps", "usage", "prefix_psnr", "ssim")


def _say(message: str) -> None:
    print(f"[ddt pipeline] {message}", file=sys.stderr, flush=True)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(configs: str | list[str]) -> list[str]:
    return [configs] if isinstance(configs, str) else list(configs)


def _config_value(configs: list[str], key: str) -> Any:
    """A top-level key of a stage's YAMLs (e.g. its `export_dir`; the last file that sets it wins), which must be
    set."""
    values = [(yaml.safe_load(Path(c).read_text()) or {}).get(key) for c in configs]
    values = [v for v in values if v]
    if not values:
        raise ValueError(f"{' + '.join(configs)}: the pipeline needs the top-level key {key!r}")
    return values[-1]


def _tokenizer_value(configs: list[str], key: str, default: Any = None) -> Any:
    """`model.init_args.tokenizer.<key>` of a tokenizer stage's YAMLs (the last file that sets it wins)."""
    value = default
    for config in configs:
        init_args = (yaml.safe_load(Path(config).read_text()) or {}).get("model", {}).get("init_args", {})
        value = (init_args.get("tokenizer") or {}).get(key, value)
    return value


def _features_or_reuse(folder: str, resolution: int, steps: int, scenes: int) -> tuple[str, str]:
    """Train the tokenizer's frozen feature network into `folder` unless it exists; returns ("trained" | "reused",
    the digest of its weights)."""
    from ddt_lightning.models.perceptual import CONFIG_NAME, WEIGHTS_NAME
    from ddt_lightning.perceptual import train_and_save

    if (Path(folder) / CONFIG_NAME).is_file():
        _say(f"features: reusing {folder}")
        status = "reused"
    else:
        _say(f"features: python -m ddt_lightning.perceptual train {folder} --resolution {resolution} --steps {steps}")
        scores = train_and_save(folder, resolution, steps, train_scenes=scenes)
        _say(f"features: {json.dumps(scores)}")
        status = "trained"
    return status, _file_digest(Path(folder) / WEIGHTS_NAME)


def stage_key(configs: list[str], inputs: list[Any]) -> str:
    """What a trained stage is keyed on: its config files as parsed YAML (so comments and layout do not count, every
    value does, in file order) and the digests of its inputs."""
    return _digest([yaml.safe_load(Path(c).read_text()) for c in configs], *inputs)


def _fit_or_reuse(
    stage: str, configs: list[str], inputs: list[Any], experiment: str, wiring: list[str]
) -> tuple[dict[str, Any], str]:
    """Run `ddt fit` for a stage unless its export already records the same key (its config files' values and the
    digests of its inputs, `stage_key`); returns (the figures the stage reported, "trained" | "reused")."""
    folder = Path(_config_value(configs, "export_dir"))
    key = stage_key(configs, inputs)
    record = folder / STAGE_FILE
    if record.is_file() and (saved := json.loads(record.read_text())).get("key") == key:
        _say(f"{stage}: reusing {folder} (trained with the same {' + '.join(configs)} and inputs)")
        return saved["results"], "reused"
    _say(f"{stage}: ddt fit --config {' --config '.join(configs)}")
    results = _fit(configs, experiment, wiring)
    steps, asked = results.get("steps"), results.get("max_steps")
    if steps is not None and asked is not None and 0 < asked and steps < asked:
        _say(f"{stage}: trainer.max_time stopped it at step {steps} of {asked}: its figures are those of a shorter run")
    record.write_text(json.dumps({"key": key, "results": results}, indent=2))
    return results, "trained"


def _fit(configs: list[str], experiment: str, extra: list[str]) -> dict[str, Any]:
    """`ddt fit --config A [--config B]` in this process; returns the figures it printed (its held-out test)."""
    from ddt_lightning.cli import DDTCLI

    args = ["fit", *(arg for c in configs for arg in ("--config", c))]
    args += ["--trainer.logger.init_args.experiment_name", experiment, *extra]
    args += ["--test_after_fit", "true"]
    cli = DDTCLI(args=args)
    return dict(cli.summary)


def run_pipeline(
    tokenizer: str | list[str] = "configs/main.yaml",
    pretokenize: str = "configs/pretokenize.yaml",
    llm: str | list[str] = "configs/mllm/main.yaml",
    experiment_name: str = "ddt-pipeline",
    num_prompts: int = 256,
    num_captions: int = 256,
    num_edits: int = 256,
    guidance: float = 3.0,
    edit_guidance: float | None = None,
    temperature: float = 0.25,  # mllm.model.DEFAULT_IMAGE_TEMPERATURE
    top_k: int | None = None,
    decode_steps: int = 1,  # mllm.model.DEFAULT_DECODE_STEPS
    decode_guidance: float = 1.0,  # mllm.model.DEFAULT_DECODE_GUIDANCE
    caption_beams: int = 8,  # mllm.model.DEFAULT_CAPTION_BEAMS (not imported: this module loads no torch)
    caption_rerank: float = 1.0,  # mllm.model.DEFAULT_CAPTION_RERANK
    candidates: int = 4,  # mllm.model.DEFAULT_DRAW_CANDIDATES
    rewrite_source_weight: float = 0.1,  # mllm.model.DEFAULT_REWRITE_SOURCE_WEIGHT
    seed: int = 0,
    feature_net_steps: int = 800,
    feature_net_scenes: int = 16_384,
) -> dict[str, Any]:
    """Run (or reuse) the four stages; returns the summary printed on the last line.

    Args:
        tokenizer: the tokenizer's `ddt fit` config file(s), composed in order (they must set `export_dir`).
        pretokenize: the `ddt pretokenize` config (its `tokenizer` is set to that export).
        llm: the LLM's `ddt fit` config file(s) (must set `export_dir`; its data reads the shards, and its
            `model.init_args.tokenizer_path` is set to the tokenizer export).
        experiment_name: the MLflow experiment of every stage's run.
        num_prompts, num_captions, num_edits: held-out GenEval prompts, images to caption, edits to make.
        guidance, edit_guidance, temperature, top_k: sampling of the evaluation's image tokens (edit_guidance
            defaults to guidance).
        decode_steps, decode_guidance: the DDT decoder's Euler steps and its own guidance when it draws the
            generated tokens.
        caption_beams: beam search width of the evaluation's captions (1: greedy).
        caption_rerank: weight of log p(image | caption) when those beams are reranked (0: the top beam).
        candidates: drawings per prompt (text-to-image, a chain model's edits), the one the LM reads back as its
            prompt likeliest kept (1: draw once).
        rewrite_source_weight: a chain model's edits: the rewrite maximising log p(rewrite | caption, instruction) +
            this x log p(source | rewrite) among the beams (0: the likeliest beam that changes the caption).
        seed: the evaluation's sampling seed.
        feature_net_steps, feature_net_scenes: training of the feature network (stage 0), when it is made here.
    """
    from ddt_lightning.pretokenize import main as pretokenize_main
    from ddt_lightning.pretokenize import tokenizer_digest

    stages: dict[str, str] = {}
    timings: dict[str, float] = {}

    # 0. the tokenizer's frozen feature network, if it uses one
    start = time.perf_counter()
    tokenizer, llm = _files(tokenizer), _files(llm)
    feature_net, tokenizer_inputs = _tokenizer_value(tokenizer, "feature_net"), []
    if feature_net:
        resolution = _tokenizer_value(tokenizer, "image_size", 32)
        stages["features"], digest = _features_or_reuse(feature_net, resolution, feature_net_steps, feature_net_scenes)
        tokenizer_inputs.append(digest)
        timings["features"] = time.perf_counter() - start

    # 1. tokenizer
    start = time.perf_counter()
    tokenizer_dir = Path(_config_value(tokenizer, "export_dir"))
    tokenizer_results, stages["tokenizer"] = _fit_or_reuse(
        "tokenizer", tokenizer, tokenizer_inputs, experiment_name, []
    )
    timings["tokenizer"] = time.perf_counter() - start

    # 2. pretokenize (reuses its shards by itself: same tokenizer digest and data config)
    start = time.perf_counter()
    shards_dir = str(_config_value([pretokenize], "output"))
    shards = pretokenize_main(["--config", pretokenize, "--tokenizer", str(tokenizer_dir)])
    stages["pretokenize"] = "done"
    timings["pretokenize"] = time.perf_counter() - start

    # 3. LLM, from the shards and with the tokenizer just made (both digests are part of its key)
    start = time.perf_counter()
    llm_dir = Path(_config_value(llm, "export_dir"))
    inputs = [tokenizer_digest(tokenizer_dir), shards["key"]]
    wiring = ["--model.init_args.tokenizer_path", str(tokenizer_dir), "--data.init_args.root", shards_dir]
    llm_results, stages["llm"] = _fit_or_reuse("llm", llm, inputs, experiment_name, wiring)
    timings["llm"] = time.perf_counter() - start

    # 4. evaluate on held-out prompts and images
    start = time.perf_counter()
    from ddt_lightning.mllm.commands import main_evaluate

    args = ["--model", str(llm_dir), "--mlflow", "--experiment_name", experiment_name, "--run_name", "evaluate"]
    args += ["--num_prompts", str(num_prompts), "--num_captions", str(num_captions), "--num_edits", str(num_edits)]
    args += ["--guidance", str(guidance), "--temperature", str(temperature), "--seed", str(seed)]
    args += ["--output", str(llm_dir / "evaluation")]
    args += ["--decode_guidance", str(decode_guidance), "--num_beams", str(caption_beams)]
    args += ["--rerank", str(caption_rerank), "--decode_steps", str(decode_steps), "--candidates", str(candidates)]
    args += ["--rewrite_source_weight", str(rewrite_source_weight)]
    if edit_guidance is not None:
        args += ["--edit_guidance", str(edit_guidance)]
    if top_k is not None:
        args += ["--top_k", str(top_k)]
    main_evaluate(args)
    scores = json.loads((llm_dir / "evaluation" / "scores.json").read_text())
    timings["evaluate"] = time.perf_counter() - start

    summary = {k: tokenizer_results[k] for k in TOKENIZER_KEYS if k in tokenizer_results}
    summary["tokenizer_export"] = str(tokenizer_dir)
    summary |= {k: scores[k] for k in ("geneval_overall", "caption_accuracy", "edit_success", "edit_l1") if k in scores}
    if "perplexity_text" in llm_results:  # held-out caption tokens of image-to-text sequences
        summary["perplexity_text"] = llm_results["perplexity_text"]
    summary["export"] = str(llm_dir)
    summary["scores"] = {k: v for k, v in scores.items() if k not in summary}
    summary["stages"] = stages
    # Optimizer steps taken of those asked for, per trained stage (a time cap may stop one early); a stage reused
    # from an export written before the steps were recorded has none.
    summary["steps"] = {
        stage: {"done": results["steps"], "of": results["max_steps"]}
        for stage, results in (("tokenizer", tokenizer_results), ("llm", llm_results))
        if "steps" in results and "max_steps" in results
    }
    summary["minutes"] = {k: round(v / 60, 2) for k, v in timings.items()}
    return summary


def main(args: list[str] | None = None) -> dict[str, Any]:
    """`ddt pipeline --config configs/pipeline.yaml [--key value]`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="ddt pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with the keys below")
    parser.add_function_arguments(run_pipeline)
    config = parser.parse_args(args)
    summary = run_pipeline(**{k: v for k, v in config.as_dict().items() if k != "config"})
    sys.stdout.flush()
    print(json.dumps(summary), flush=True)
    return summary
