"""`ddt pipeline`: the four stages end to end on micro configs, one MLflow experiment, stages reused on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddt_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "tests" / "configs" / "pipeline_micro.yaml")


def run(capsys) -> tuple[dict, str]:
    main(["pipeline", "--config", CONFIG])
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_reuses_them(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    (tmp_path / "tests").symlink_to(REPO / "tests")  # the stage configs' paths are relative to the repository
    monkeypatch.chdir(tmp_path)  # and the outputs land in tmp_path
    summary, err = run(capsys)

    assert summary["stages"] == {"features": "trained", "tokenizer": "trained", "pretokenize": "done", "llm": "trained"}
    for key in ("psnr_onestep", "psnr_sampler", "sampler_steps", "usage", "prefix_psnr"):
        assert key in summary, key
    assert len(summary["prefix_psnr"]) == 3 and summary["tokenizer_export"] == "tok"
    for key in ("geneval_overall", "caption_accuracy", "edit_success"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["export"] == "llm" and summary["perplexity_text"] > 1.0
    # Every step the stage configs ask for was taken (micro.yaml 8, llm_micro.yaml 4), and the job says so.
    assert summary["steps"] == {"tokenizer": {"done": 8, "of": 8}, "llm": {"done": 4, "of": 4}}
    assert "stopped it at step" not in err
    # One folder to hand over: the LM and its tokenizer (transformers Auto classes) and the DDT tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddt_lightning import DDTTokenizer

    AutoModelForCausalLM.from_pretrained("llm/lm")
    assert AutoTokenizer.from_pretrained("llm/lm").convert_tokens_to_ids("<boi>") >= 0
    handed = DDTTokenizer.from_pretrained("llm/ddt_tokenizer")
    assert handed.config.num_tokens == 8 and handed.config.distill_weight == 0.5  # micro_export.yaml merged in
    assert handed.config.feature_net == "features" and Path("features/config.json").is_file()  # stage 0's net
    assert handed.perceptual is None  # the frozen net is a training input, not part of the export
    assert json.loads(Path("tokens/manifest.json").read_text())["splits"]["train"]["items"] == 32

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddt-tests")
    names = sorted(r.info.run_name or "" for r in client.search_runs([experiment.experiment_id]))
    assert len(names) == 3 and "evaluate" in names  # tokenizer fit, LLM fit, evaluation: one experiment
    # The evaluation samples as the pipeline's config says (pipeline_micro.yaml), not at the commands' defaults.
    evaluation = next(r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "evaluate")
    keys = ("guidance", "temperature", "num_beams", "rerank", "decode_steps", "decode_guidance")
    sampling = {k: evaluation.data.params.get(k) for k in keys}
    assert sampling == {
        "guidance": "2.0",
        "temperature": "0.7",
        "num_beams": "2",
        "rerank": "0.5",
        "decode_steps": "2",
        "decode_guidance": "1.5",
    }
    # The LLM's validations logged GenerationSamples (pretokenized: decoded with the exported DDT tokenizer).
    logged = {
        a.path
        for r in client.search_runs([experiment.experiment_id])
        for a in client.list_artifacts(r.info.run_id, "images/val")
    }
    assert {"images/val/samples_step0000004.png", "images/val/samples_step0000004.txt"} <= logged, logged

    weights = Path("llm/lm/model.safetensors").stat().st_mtime_ns
    again, err = run(capsys)
    assert again["stages"] == {"features": "reused", "tokenizer": "reused", "pretokenize": "done", "llm": "reused"}
    assert (
        "features: reusing features" in err
        and "tokenizer: reusing tok" in err
        and "pretokenize: reusing tokens" in err
        and "llm: reusing llm" in err
    )
    assert Path("llm/lm/model.safetensors").stat().st_mtime_ns == weights
    for key in ("psnr_onestep", "prefix_psnr", "perplexity_text"):
        assert again[key] == summary[key]
    assert len(client.search_runs([experiment.experiment_id])) == 4  # only the evaluation ran again


def test_stage_key_follows_values_not_comments_or_layout(tmp_path):
    from ddt_lightning.pipeline import stage_key

    config = tmp_path / "llm.yaml"
    config.write_text("trainer:\n  max_steps: 3800\nmodel:\n  lr: 0.001\n")
    key = stage_key([str(config)], ["tokenizer-digest"])
    config.write_text("# a note\ntrainer: {max_steps: 3800}  # steps\n\nmodel:\n    lr: 1.0e-3\n")
    assert stage_key([str(config)], ["tokenizer-digest"]) == key  # a comment or reflow does not retrain
    assert stage_key([str(config)], ["another tokenizer"]) != key  # an input does
    config.write_text("trainer:\n  max_steps: 3801\nmodel:\n  lr: 0.001\n")
    assert stage_key([str(config)], ["tokenizer-digest"]) != key  # and so does any value
    other = tmp_path / "overlay.yaml"
    other.write_text("trainer:\n  max_steps: 3800\n")
    assert stage_key([str(config), str(other)], ["tokenizer-digest"]) != stage_key(
        [str(other), str(config)], ["tokenizer-digest"]
    )  # the last file wins in `ddt fit`, so the order of the files is part of the key


def test_a_stage_stopped_by_its_time_cap_is_reported(tmp_path, monkeypatch, capsys):
    import ddt_lightning.pipeline as pipeline

    config = tmp_path / "stage.yaml"
    config.write_text(f"export_dir: {tmp_path / 'out'}\ntrainer:\n  max_steps: 8\n")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(pipeline, "_fit", lambda configs, experiment, extra: {"psnr": 1.0, "steps": 5, "max_steps": 8})
    results, status = pipeline._fit_or_reuse("tokenizer", [str(config)], [], "x", [])
    assert status == "trained" and results["steps"] == 5
    assert "tokenizer: trainer.max_time stopped it at step 5 of 8" in capsys.readouterr().err
    # A run that took all its steps, or one without a step budget (max_steps -1), says nothing.
    for done, asked in ((8, 8), (120, -1)):
        monkeypatch.setattr(pipeline, "_fit", lambda *a, d=done, m=asked: {"steps": d, "max_steps": m})
        config.write_text(f"export_dir: {tmp_path / 'out'}\ntrainer:\n  max_steps: {asked}\n")
        pipeline._fit_or_reuse("llm", [str(config)], [], "x", [])
        assert "stopped it" not in capsys.readouterr().err
