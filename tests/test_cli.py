"""The `ddt` command: every config parses, bad configs fail before training, a run goes end to end through
MLflow and the export, and an interrupted run resumes exactly."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddt_lightning import DDTTokenizer
from ddt_lightning.cli import DDTCLI, main

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "configs" / "micro.yaml")
YAMLS = sorted([*REPO.glob("configs/**/*.yaml"), *REPO.glob("tests/configs/*.yaml")])


def first_line_command(path: Path) -> list[str]:
    line = path.read_text().splitlines()[0]
    assert line.startswith("# ddt "), f"{path}: the first line must be the command that runs it"
    return shlex.split(line[len("# ddt ") :])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses_with_the_command_on_its_first_line(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = first_line_command(path)
    assert str(path.relative_to(REPO)) in args, f"{path}: its own command does not use it"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    if args[0] == "pipeline":  # names stage configs, each a YAML that this test parses too
        assert "tokenizer:" in out and "llm:" in out
    else:
        assert "class_path" in out


def test_a_wrong_config_key_fails_before_training_and_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", MICRO, "--model.init_args.tokenizer.num_tokenz", "3"])
    assert exit_info.value.code != 0
    assert "num_tokenz" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_an_image_size_that_does_not_fit_fails_at_setup_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data resolution 32 .*image_size is 16"):
        main(["fit", "--config", MICRO, "--data.init_args.resolution", "32"])


@pytest.mark.slow
def test_fit_logs_exports_and_prints_the_held_out_figures(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"has not taken off: token gain .* < min_gain=2.0 at step 4"):
        main(["fit", "--config", MICRO, "--export_dir", "export", "--test_after_fit", "true"])
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) >= {"psnr_onestep", "psnr_sampler", "sampler_steps", "usage", "prefix_psnr", "export"}
    assert figures["export"] == "export" and figures["sampler_steps"] == 2 and len(figures["prefix_psnr"]) == 3
    assert 0 < figures["usage"] <= 1 and all(5 < p < 60 for p in [figures["psnr_onestep"], *figures["prefix_psnr"]])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store, made absolute
    assert any(f"mlflow ui --backend-store-uri {uri}" in line for line in lines)

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("ddt-tests").experiment_id])[0]
    assert {"train/loss", "val/psnr_onestep", "test/psnr_sampler", "test/usage", "test/prefix_psnr_8"} <= set(
        run.data.metrics
    )
    artifacts = set()
    for top in client.list_artifacts(run.info.run_id):
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, top.path)} if top.is_dir else {top.path}
    assert "config.yaml" in artifacts and "tokenizer/model.safetensors" in artifacts
    assert any(a.startswith("images/val") for a in artifacts) and any(a.startswith("images/test") for a in artifacts)
    assert any(a.startswith("metrics/test_per_position") for a in artifacts)
    # The auxiliary terms' factor (here on the edge term) is 0 until aux_start_step = 2, then ramps to 1 over
    # aux_warmup_steps = 4 and stays there.
    ramp = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/aux_scale")]
    assert ramp and all(value == pytest.approx(min(max(step - 2, 0) / 4, 1.0)) for step, value in ramp), ramp
    assert ramp[0][1] == 0 and 0 < ramp[2][1] < 1 and ramp[-1][1] == pytest.approx(1.0)
    entropy = [m.value for m in client.get_metric_history(run.info.run_id, "train/entropy")]
    assert entropy[0] < 0  # the code-entropy term is on (entropy_weight: 0.01) ...
    assert entropy[-1] == 0  # ... until the decoder-only phase freezes the codebook (decoder_only_from_step: 7)
    gains = [m.step for m in client.get_metric_history(run.info.run_id, "train/token_gain")]
    # TakeOffMonitor(every=2) measures after optimizer steps 2, 4, 6, 8: the logger files them under batches 1-7.
    assert gains == [1, 3, 5, 7], gains
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "codebook_size: 64" in config_text

    tokenizer = DDTTokenizer.from_pretrained("export")
    assert tokenizer.config.num_tokens == 8 and tokenizer.config.image_size == 16


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    # Reference: 8 uninterrupted steps (two epochs of 4; checkpoints every 3 steps, mid-epoch).
    monkeypatch.chdir(tmp_path / "..")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    reference = DDTCLI(args=["fit", "--config", MICRO])
    # Interrupted: killed (SIGKILL, no clean-up) after step 7; the last checkpoint is step 6, mid-epoch 2.
    (tmp_path / "b").mkdir()
    killer = json.dumps({"class_path": "resume_helpers.KillAtStep", "init_args": {"step": 7}})
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    command = [sys.executable, "-m", "ddt_lightning.cli", "fit", "--config", MICRO, f"--trainer.callbacks+={killer}"]
    killed = subprocess.run(command, cwd=tmp_path / "b", env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    monkeypatch.chdir(tmp_path / "b")
    resumed = DDTCLI(args=["fit", "--config", MICRO, "--ckpt_path", str(last)])

    assert resumed.trainer.global_step == reference.trainer.global_step == 8
    state, expected = resumed.model.state_dict(), reference.model.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:  # parameters, codebook, EMA statistics, usage counters, restart buffer
        assert torch.equal(state[key], expected[key]), key
    opt, opt_expected = resumed.trainer.optimizers[0].state_dict(), reference.trainer.optimizers[0].state_dict()
    for index, values in opt_expected["state"].items():
        for name, value in values.items():
            assert torch.equal(opt["state"][index][name], value), (index, name)
    restart, restart_expected = (
        next(c for c in cli.trainer.callbacks if type(c).__name__ == "DeadCodeRestart") for cli in (resumed, reference)
    )
    assert restart.state_dict()["step"] == restart_expected.state_dict()["step"] == 8
    assert restart.total_restarted == restart_expected.total_restarted
