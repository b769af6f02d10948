"""`--optimizer muon`: Muon on the residual stages' conv weights, SGD on the rest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mnist_resnet.config import ModelConfig, TrainConfig
from mnist_resnet.model import build_model
from mnist_resnet.optim import (
    MuonSGD,
    hidden_conv_weights,
    make_optimizer,
    make_scheduler,
)

MUON = TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.05, weight_decay=1e-3)


def _model(channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=8, stem="pool-first"))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def test_muon_takes_the_stage_convs_and_sgd_the_stem_classifier_and_norms() -> None:
    model = _model(channels_last=False)
    hidden = {id(p) for p in hidden_conv_weights(model)}
    stage_convs = [m for s in model.stages for m in s.modules() if isinstance(m, nn.Conv2d)]
    assert hidden == {id(m.weight) for m in stage_convs}
    assert id(model.conv1.weight) not in hidden and id(model.fc.weight) not in hidden
    opt = make_optimizer(model, MUON)
    assert isinstance(opt, MuonSGD)
    groups = opt.param_groups
    assert [g.get("muon", False) for g in groups] == [False, False, True]
    assert {id(p) for p in groups[2]["params"]} == hidden
    # Every trainable parameter is stepped by exactly one of the two.
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert groups[2]["lr"] == MUON.muon_lr and groups[0]["lr"] == MUON.lr


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_step_moves_each_stage_conv_by_an_orthogonalised_update(channels_last: bool) -> None:
    model = _model(channels_last)
    opt = make_optimizer(model, MUON)
    conv = model.layer3[0].conv2.weight  # 64 x 64 x 3 x 3: a 64 x 576 matrix
    stem, fc = model.conv1.weight.detach().clone(), model.fc.weight.detach().clone()
    before = conv.detach().clone()
    _backward(model, 1)
    stem_grad = model.conv1.weight.grad.clone()
    opt.step()
    delta = (conv.detach() - before).reshape(64, -1)
    # Muon's update is the gradient's (approximate) polar factor times the rate: its singular
    # values sit near 1 (Newton-Schulz in bf16 leaves them within about 0.5-1.5), while the
    # gradient's own spread over orders of magnitude.
    s = torch.linalg.svdvals(delta / MUON.muon_lr)
    assert float(s.min()) > 0.3 and float(s.max()) < 1.6
    assert float(s.max() / s.min()) < 3.0  # the gradient's own ratio here is about 15
    # The stem and the classifier took a plain Nesterov SGD step: the first one, whose
    # momentum buffer is the decayed gradient d, moves by -lr * (1 + momentum) * d.
    torch.testing.assert_close(
        model.conv1.weight.detach(),
        stem - MUON.lr * (1 + MUON.momentum) * (stem_grad + MUON.weight_decay * stem),
    )
    assert not torch.equal(model.fc.weight.detach(), fc)
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_its_state_round_trips_so_a_resumed_run_steps_identically() -> None:
    a = _model(channels_last=True)
    opt_a = make_optimizer(a, MUON)
    sched_a = make_scheduler(opt_a, MUON, steps_per_epoch=10)
    for seed in range(3):
        _backward(a, seed)
        opt_a.step()
        sched_a.step()
    saved = copy.deepcopy({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()})
    assert saved["opt"]["muon"]["state"], "Muon's momentum buffers are part of the state"

    b = _model(channels_last=True)
    b.load_state_dict(a.state_dict())
    opt_b = make_optimizer(b, MUON)
    sched_b = make_scheduler(opt_b, MUON, steps_per_epoch=10)
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    for seed in (3, 4):
        for model, opt, sched in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
            _backward(model, seed)
            opt.step()
            sched.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # Without momentum buffers (were they dropped) the next steps would differ.
    c = _model(channels_last=True)
    with pytest.raises(ValueError, match="no Muon part"):
        make_optimizer(c, MUON).load_state_dict(
            {k: v for k, v in saved["opt"].items() if k != "muon"}
        )


def test_weights_laid_out_anew_after_the_optimizer_are_refused_not_silently_missed() -> None:
    model = _model(channels_last=False)
    opt = make_optimizer(model, MUON)
    model.to(memory_format=torch.channels_last)  # new storage for every 3x3 conv weight
    _backward(model, 0)
    with pytest.raises(RuntimeError, match="moved after"):
        opt.step()


def test_a_model_without_convs_after_its_stem_is_refused_in_one_line() -> None:
    from mnist_resnet.settings import ConfigError

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(ConfigError, match="needs conv layers after the stem"):
        make_optimizer(model, MUON)
