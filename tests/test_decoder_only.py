"""TokenizerModule's decoder-only phase: from `decoder_only_from_step` on the encoder and codebook stay exactly as
they were (no gradient step, no EMA, no restart), the decoder keeps learning, and the learning rate follows a
schedule of its own."""

import lightning as L
import pytest
import torch

from ddt_lightning.callbacks import DeadCodeRestart
from ddt_lightning.datamodules import WorldDataModule
from ddt_lightning.modules import TokenizerModule
from ddt_lightning.modules.optim import warmup_cosine
from ddt_lightning.tokenizer import TokenizerConfig

MICRO = TokenizerConfig.preset("micro", decoder_depth=2)
START, STEPS = 4, 8


class Record(L.Callback):
    """Snapshots of the state after every optimizer step, and the learning rate each step used."""

    def __init__(self) -> None:
        self.states, self.lrs, self.frozen = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.frozen.append(pl_module.codes_frozen)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.tokenizer.state_dict().items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    module = TokenizerModule(
        tokenizer=MICRO, lr=3e-3, warmup_steps=2, decoder_only_from_step=START, decoder_only_lr_scale=0.5
    )
    data = WorldDataModule(resolution=16, train_size=32, val_size=8, test_size=8, batch_size=8, cache_dir=None)
    record, restart = Record(), DeadCodeRestart(early_every=1, early_steps=STEPS, every=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record, restart],
        default_root_dir=str(tmp_path_factory.mktemp("run")),
    )
    trainer.fit(module, datamodule=data)
    return module, record, restart


def test_the_phase_starts_at_its_step(run):
    _, record, _ = run
    assert record.frozen == [False] * START + [True] * (STEPS - START)


def test_encoder_and_codebook_are_frozen_and_the_decoder_learns(run):
    _, record, restart = run
    before, after = record.states[START - 1], record.states[-1]  # after the last joint step; at the end
    # Every tensor of the encoder and the quantizer but the restart window's hit counter, which the callback clears
    # (no hits are counted while frozen, so none would be seen as alive if the codes thawed).
    frozen = [k for k in after if k.startswith(("encoder.", "quantizer.")) and k != "quantizer.window_hits"]
    assert after["quantizer.window_hits"].sum() == 0
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), [
        k for k in frozen if not torch.equal(before[k], after[k])
    ]
    assert any("codebook" in k for k in frozen)  # the EMA codebook and its statistics are in that list
    decoder = [k for k in after if k.startswith("decoder.")]
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2
    # ... while the joint steps did move the encoder and the codebook (the check above is not vacuous).
    first = record.states[0]
    assert any(not torch.equal(first[k], before[k]) for k in frozen if k.startswith("encoder."))
    assert any(not torch.equal(first[k], before[k]) for k in frozen if "codebook" in k)
    assert restart.step == STEPS and restart.last_restarted == 0  # checks every step, none in the phase


def test_the_learning_rate_restarts_its_schedule_for_the_decoder(run):
    module, record, _ = run
    joint = warmup_cosine(2, START, 0.05)
    alone = warmup_cosine(2, STEPS - START, 0.05)
    expected = [3e-3 * joint(s) for s in range(START)] + [1.5e-3 * alone(s) for s in range(STEPS - START)]
    assert record.lrs == pytest.approx(expected)
    assert module.tokenizer.encoder.training is False and module.tokenizer.decoder.training is True


def test_bad_values_and_a_ddp_strategy_without_unused_parameters_fail_before_training():
    with pytest.raises(ValueError, match="decoder_only_from_step must be >= 0"):
        TokenizerModule(tokenizer=MICRO, decoder_only_from_step=-1)
    with pytest.raises(ValueError, match="decoder_only_lr_scale must be > 0"):
        TokenizerModule(tokenizer=MICRO, decoder_only_lr_scale=0.0)
    from lightning.pytorch.strategies import DDPStrategy

    module = TokenizerModule(tokenizer=MICRO, decoder_only_from_step=10)
    for strategy, fails in ((DDPStrategy(), True), (DDPStrategy(find_unused_parameters=True), False)):
        module._trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
        if fails:
            with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
                module._check_strategy_allows_frozen_codes()
        else:
            module._check_strategy_allows_frozen_codes()
