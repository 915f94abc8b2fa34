"""DDTTokenizer.token_gain and the TakeOffMonitor callback: the gain's definition, no side effects, and the
monitor's warn / stop decisions."""

from types import SimpleNamespace

import pytest
import torch

from ddt_lightning.callbacks import TakeOffMonitor
from ddt_lightning.tokenizer import PRESETS, DDTTokenizer


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_token_gain_is_one_minus_the_error_ratio_and_changes_nothing():
    torch.manual_seed(0)
    tok = DDTTokenizer(PRESETS["micro"]).train()
    tok(images(8), generator=torch.Generator().manual_seed(0))  # one training forward: codebook initialised
    with torch.no_grad():  # open the decoder's gates so that its output depends on the tokens
        for p in tok.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state = {k: v.clone() for k, v in tok.state_dict().items()}
    x = images(8)
    gain = tok.token_gain(x, torch.Generator().manual_seed(1))

    # By hand, with the same draws in the same order (times, then noise).
    generator = torch.Generator().manual_seed(1)
    from ddt_lightning.models.schedule import sample_time

    t = sample_time(8, tok.config.time_shift, x.device, generator)
    eps = torch.randn(x.shape, generator=generator)
    tb = t[:, None, None, None]
    x_t = tb * eps + (1 - tb) * x
    codes = tok.quantizer.lookup(tok.encode(x))
    with torch.no_grad():
        with_tokens = (tok.decoder(x_t, t, codes, tok.token_map(t)) - x).pow(2).mean()
        without = (tok.decoder(x_t, t, codes, torch.zeros(8, dtype=torch.long)) - x).pow(2).mean()
    torch.testing.assert_close(gain, 1 - with_tokens / without)
    assert gain != 0
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in state.items())  # no EMA step, no counters


class FakeModule:
    """What the monitor reads of a TokenizerModule: `tokenizer`, `device` and `log`."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.tokenizer = DDTTokenizer(PRESETS["micro"])
        self.device = torch.device("cpu")
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_monitor_acts_only_from_patience_on_and_once(action):
    monitor = TakeOffMonitor(every=2, patience=4, min_gain=2.0, action=action, num_images=4)
    module, batch = FakeModule(), {"image": images(8)}
    trainer = SimpleNamespace(global_step=0, should_stop=False)
    for step in (1, 2):  # step 1: not a measurement step; step 2: measured, but before patience
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, batch, step - 1)
    assert "train/token_gain" in module.logged and monitor.stalled_at is None and not trainer.should_stop
    trainer.global_step = 4
    with pytest.warns(UserWarning, match="has not taken off: token gain .* at step 4"):
        monitor.on_train_batch_end(trainer, module, None, batch, 3)
    assert monitor.stalled_at == 4 and trainer.should_stop == (action == "stop")
    assert monitor.last_gain == module.logged["train/token_gain"] < 2.0
    restored = TakeOffMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.stalled_at == 4 and restored.last_gain == monitor.last_gain


def test_monitor_is_quiet_when_the_gain_is_high_enough():
    monitor = TakeOffMonitor(every=1, patience=0, min_gain=-1.0, num_images=4)
    trainer = SimpleNamespace(global_step=1, should_stop=False)
    monitor.on_train_batch_end(trainer, FakeModule(), None, {"image": images(4)}, 0)
    assert monitor.stalled_at is None and not trainer.should_stop and monitor.last_gain is not None


@pytest.mark.parametrize(("key", "value"), [("every", 0), ("num_images", 0), ("patience", -1), ("action", "halt")])
def test_invalid_arguments_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        TakeOffMonitor(**{key: value})
