"""loop.py: the training state's round trip (old checkpoints' keys included) and the points at
which train_one_epoch hands control back."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from mnist_resnet.config import TrainConfig
from mnist_resnet.errors import TrainingError
from mnist_resnet.loop import EpochProgress, Hooks, TrainState, train_one_epoch
from mnist_resnet.optim import WeightAverage, make_optimizer, make_scheduler
from mnist_resnet.step import NonFiniteLoss


def _state(average: bool = False, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    optimizer = make_optimizer(model, TrainConfig())
    scheduler = make_scheduler(optimizer, TrainConfig(), steps_per_epoch=5)
    return TrainState(model, optimizer, scheduler, WeightAverage(model, 0.9) if average else None)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _step(state: TrainState) -> Any:
    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        loss = nn.functional.cross_entropy(state.model(x), y)
        state.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        state.optimizer.step()
        return loss.detach(), torch.zeros(()), True

    return step


def test_state_round_trip_restores_everything_a_restart_needs() -> None:
    a = _state(average=True)
    train_one_epoch(a, _batches(3), _step(a), steps=5, hooks=Hooks(log_every=2))
    a.epoch, a.progress = 1, EpochProgress(step=2, loss_sum=1.5, seen=16)
    saved = a.state_dict()
    expected = torch.rand(3), random.random()
    b = _state(average=True, seed=1)
    b.load_state_dict(saved)
    assert (b.epoch, b.progress.step, b.progress.loss_sum) == (1, 2, 1.5)
    assert b.scheduler.last_epoch == a.scheduler.last_epoch
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert b.average is not None and b.average.updates == 3
    # The RNG states come back too: the same draws follow as after the save.
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_checkpoint_in_the_layout_before_trainstate_loads() -> None:
    # The keys the trainer wrote before loop.py existed (mid-epoch, no weight average).
    old = _state()
    ckpt = {
        "model": old.model.state_dict(),
        "optimizer": old.optimizer.state_dict(),
        "scheduler": old.scheduler.state_dict(),
        "epoch": 2,
        "partial_epoch": {
            "step": 3,
            "loss_sum": 2.0,
            "err_sum": 0.5,
            "seen": 24,
            "seconds": 1.0,
            "augment_rng": torch.Generator().get_state(),
        },
        "world_size": 1,
        "weight_average": None,
        "best": {"epoch": 2, "val_error": 0.1},
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
    }
    state = _state(seed=3)
    state.load_state_dict(ckpt)
    assert (state.epoch, state.progress.step, state.progress.seen) == (2, 3, 24)
    with pytest.raises(TrainingError, match="no weight average to resume --ema-decay"):
        _state(average=True).load_state_dict(ckpt)


def test_one_epoch_hands_back_at_its_log_checkpoint_and_stop_points() -> None:
    state = _state()
    logged: list[list[int]] = []
    saved: list[int] = []

    def stop() -> None:
        raise KeyboardInterrupt

    hooks = Hooks(
        log_every=2,
        on_log=lambda rows: logged.append([step for step, _, _ in rows]),
        checkpoint_every=2,
        on_checkpoint=lambda: saved.append(state.progress.step),
        stop_now=lambda step: step == 5,
        on_stop=stop,
    )
    with pytest.raises(KeyboardInterrupt):
        train_one_epoch(state, _batches(8), _step(state), steps=6, hooks=hooks)
    assert logged == [[1, 2], [3, 4]] and saved == [2, 4, 5]
    assert state.progress.step == 5 and state.progress.seen == 40
    # The last step of an epoch saves no mid-epoch checkpoint: the epoch's own follows.
    state, saved = _state(), []
    every_3 = Hooks(checkpoint_every=3, on_checkpoint=lambda: saved.append(state.progress.step))
    done = train_one_epoch(state, _batches(8), _step(state), steps=6, hooks=every_3)
    assert saved == [3] and done.step == 6 and state.progress == EpochProgress()


def test_a_non_finite_loss_names_its_step() -> None:
    state = _state()

    def nan_at_third(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if state.progress.step == 2:
            raise NonFiniteLoss(float("nan"))
        state.optimizer.step()
        return torch.ones(()), torch.zeros(()), True

    with pytest.raises(NonFiniteLoss) as checked:
        train_one_epoch(state, _batches(5), nan_at_third, steps=5, hooks=Hooks())
    assert checked.value.step == 3

    # Without a check per step, the bad value is found when the losses are read back.
    state = _state()
    values = iter([1.0, float("inf"), 1.0])

    def unchecked(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        state.optimizer.step()
        return torch.tensor(next(values)), torch.zeros(()), True

    with pytest.raises(NonFiniteLoss) as read:
        train_one_epoch(state, _batches(3), unchecked, steps=3, hooks=Hooks(log_every=10))
    assert read.value.step == 2
