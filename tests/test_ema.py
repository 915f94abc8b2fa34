"""`WeightEMA`: the average of the weights from its start step on, used by validation, checkpoints and the end of
training only once it exists, and an interrupted run resumes it exactly."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ddt_lightning.callbacks import WeightEMA
from ddt_lightning.datamodules import WorldDataModule
from ddt_lightning.modules import TokenizerModule
from ddt_lightning.tokenizer import TokenizerConfig

MICRO = TokenizerConfig.preset("micro", decoder_depth=2)
START, STEPS, DECAY = 4, 8, 0.6
KEY = "tokenizer.decoder.blocks.0.x_out.mlp.fc2.weight"  # a decoder weight that trains from step 1


class Record(L.Callback):
    """The module's parameters after every optimizer step, and those validation saw."""

    def __init__(self) -> None:
        self.states, self.validated = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.validated.append((trainer.global_step, {k: v.detach().clone() for k, v in pl_module.named_parameters()}))


def fit(root, max_steps: int = STEPS, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    module = TokenizerModule(tokenizer=MICRO, lr=3e-3, warmup_steps=2, decoder_only_from_step=START)
    data = WorldDataModule(resolution=16, train_size=32, val_size=8, test_size=8, batch_size=8, cache_dir=None)
    ema, record = WeightEMA(decay=DECAY, start_step=START), Record()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[record, ema, checkpoints, *callbacks],
        default_root_dir=str(root),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # our own checkpoints
    return module, record, ema


def expected_average(states: list[dict]) -> dict:
    """The EMA by hand: a copy at step START, then lerps with the warmed-up decay."""
    average = {k: v.clone() for k, v in states[START].items()}
    for n, state in enumerate(states[START + 1 :], start=1):
        decay = min(DECAY, (1 + n) / (10 + n))
        for k in average:
            average[k] = decay * average[k] + (1 - decay) * state[k]
    return average


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    module, record, ema = fit(root)
    return root, module, record, ema


def test_the_run_ends_on_the_average_of_its_steps_from_start(run):
    _, module, record, ema = run
    assert len(record.states) == STEPS and int(ema._average_model.n_averaged) == STEPS - START
    average, final = expected_average(record.states), dict(module.named_parameters())
    for k, value in average.items():
        torch.testing.assert_close(final[k], value, rtol=1e-5, atol=1e-6, msg=k)
    # Not vacuous: the decoder's average differs from its last weights; the frozen encoder is its own average.
    decoder = [k for k in average if k.startswith("tokenizer.decoder.")]
    assert any(not torch.allclose(final[k], record.states[-1][k]) for k in decoder)
    encoder = [k for k in average if k.startswith("tokenizer.encoder.")]
    assert encoder and all(torch.equal(final[k], record.states[-1][k]) for k in encoder)


def test_validation_sees_the_current_weights_before_the_start_and_the_average_after(run):
    _, _, record, _ = run
    (step_a, before), (step_b, after) = record.validated[:2]
    assert (step_a, step_b) == (3, 6)
    for k, value in before.items():  # step 3 < START: nothing averaged yet, the training weights
        assert torch.equal(value, record.states[step_a - 1][k]), k
    average = expected_average(record.states[:step_b])
    decoder = [k for k in average if k.startswith("tokenizer.decoder.")]
    for k in decoder:
        torch.testing.assert_close(after[k], average[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(after[k], record.states[step_b - 1][k]) for k in decoder)


def test_checkpoints_hold_the_model_before_the_start_and_both_after(run):
    root, _, record, _ = run
    early = torch.load(root / "epoch=0-step=2.ckpt", weights_only=False)
    assert "current_model_state" not in early
    assert torch.equal(early["state_dict"][KEY], record.states[1][KEY])
    late = torch.load(root / "epoch=1-step=6.ckpt", weights_only=False)
    assert torch.equal(late["current_model_state"][KEY], record.states[5][KEY])
    average = expected_average(record.states[:6])[KEY]
    torch.testing.assert_close(late["state_dict"][KEY], average, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(average, record.states[5][KEY])


@pytest.mark.parametrize("step", [2, 6])
def test_a_resumed_run_ends_on_the_same_average(run, tmp_path, step):
    root, reference, _, _ = run
    ckpt = next(root.glob(f"epoch=*-step={step}.ckpt"))
    resumed, _, _ = fit(tmp_path, ckpt_path=str(ckpt))
    expected = dict(reference.named_parameters())
    for k, value in resumed.named_parameters():
        assert torch.equal(value, expected[k]), k


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(decay=1.0)
    with pytest.raises(ValueError, match="start_step"):
        WeightEMA(start_step=-1)
