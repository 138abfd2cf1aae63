"""The generic training loop: it learns, EMA tracks, and a resumed run continues exactly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from diffusion_engine import progress
from diffusion_engine.errors import InputError
from diffusion_engine.train import EMA, TrainSettings, train

progress.configure(quiet=True)


def _regression_problem() -> tuple[torch.nn.Module, object, object]:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    target = torch.tensor([[1.5], [-2.0], [0.5]])

    def next_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(16, 3, generator=generator)
        return x, x @ target

    def loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(net(x), y)

    return network, loss_fn, next_batch


def test_training_reduces_the_loss(tmp_path: Path) -> None:
    network, loss_fn, next_batch = _regression_problem()
    settings = TrainSettings(steps=300, batch_size=16, learning_rate=1e-2, warmup_steps=10, ema_decay=0.9,
                             checkpoint_every=1000)
    _, history = train(network, loss_fn, next_batch, settings, tmp_path)
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    settings = TrainSettings(steps=60, learning_rate=1e-2, warmup_steps=5, checkpoint_every=30)
    straight, loss_fn, next_batch = _regression_problem()
    train(straight, loss_fn, next_batch, settings, tmp_path / "straight")

    interrupted, loss_fn, next_batch = _regression_problem()
    calls = {"n": 0}

    def stop_after_checkpoint(generator: torch.Generator) -> object:
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt  # the user killed the run right after the step-30 checkpoint
        return next_batch(generator)

    with contextlib.suppress(KeyboardInterrupt):
        train(interrupted, loss_fn, stop_after_checkpoint, settings, tmp_path / "resumed")
    resumed, loss_fn, next_batch = _regression_problem()
    train(resumed, loss_fn, next_batch, settings, tmp_path / "resumed")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_ema_is_an_exponential_average() -> None:
    network = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        network.weight.fill_(0.0)
    ema = EMA(network, decay=0.5)
    with torch.no_grad():
        network.weight.fill_(1.0)
    ema.update(network, step=1000)  # past warm-up the decay is exactly 0.5
    assert ema.shadow["weight"].item() == 0.5


@pytest.mark.parametrize("field, value, message", [("steps", 0, "steps"), ("batch_size", 0, "batch_size"),
                                                   ("warmup_steps", -1, "warmup_steps"),
                                                   ("checkpoint_every", 0, "--checkpoint-every 1"),
                                                   ("learning_rate", 0.0, "learning rate"),
                                                   ("ema_decay", 1.0, "EMA decay")])
def test_settings_out_of_range_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainSettings(**{field: value}).validate()
