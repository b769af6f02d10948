"""Test-time averaging (`--tta`): what a model that averages views predicts, and that every way
out of the project (evaluate, ONNX, feature taps) sees the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from mnist_resnet import data, ood
from mnist_resnet.checkpoint import load_checkpoint, load_model, save_checkpoint
from mnist_resnet.cli import main
from mnist_resnet.config import TTA, ConfigError, ModelConfig
from mnist_resnet.inference import predict_logits
from mnist_resnet.model import VIEWS, build_model, describe
from mnist_resnet.precision import make_runtime


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """`x` moved `dy` rows down and `dx` columns right, the edge row/column repeated into the gap
    (written out by index, independently of the model's padding)."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[..., rows, :][..., cols]


def _trained_like(tta: str) -> torch.nn.Module:
    model = build_model(ModelConfig(depth=8, stem="pool", tta=tta))
    with torch.no_grad():  # BN statistics away from the identity, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_every_tta_name_has_its_views_and_the_image_as_given_comes_first() -> None:
    assert set(VIEWS) == set(TTA)
    for views in VIEWS.values():
        assert views[0] == (0, 0, False)
        assert len(set(views)) == len(views)
    assert [len(VIEWS[n]) for n in ("none", "shift-x", "shift", "shift-flip")] == [1, 3, 5, 10]


@pytest.mark.parametrize("tta", ["shift-x", "shift", "shift-flip"])
def test_eval_averages_the_class_probabilities_of_the_views(tta: str) -> None:
    model = _trained_like(tta)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        got = model(x)
        want = torch.stack(
            [
                model.logits(_shifted(x.flip(-1) if mirrored else x, dy, dx)).softmax(1)
                for dy, dx, mirrored in VIEWS[tta]
            ]
        ).mean(0)
    # Logits whose softmax is the mean probability: the argmax is the averaged vote.
    assert torch.allclose(got.softmax(1), want, atol=1e-6)
    assert torch.allclose(got.exp().sum(1), torch.ones(6), atol=1e-5)
    assert describe(ModelConfig(depth=8, tta=tta)).endswith(
        f"averages {len(VIEWS[tta])} views at test time)"
    )


def test_a_view_moves_the_picture_the_way_its_name_says() -> None:
    model = _trained_like("shift-x")
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 10, 10] = 1.0
    seen: list[Tensor] = []
    model.logits = lambda x: seen.append(x) or torch.zeros(len(x), 10)  # type: ignore[method-assign]
    model(dot)
    views = seen[0]
    assert [tuple(torch.nonzero(v[0]).tolist()[0]) for v in views] == [(10, 10), (10, 11), (10, 9)]


def test_training_mode_and_tta_none_see_each_image_once() -> None:
    x = torch.randn(4, 1, 28, 28)
    averaged = _trained_like("shift")
    plain = _trained_like("none")
    plain.load_state_dict(averaged.state_dict())  # the views are not weights
    with torch.no_grad():
        assert torch.equal(plain(x), plain.logits(x))
        assert not torch.allclose(averaged(x), plain(x), atol=1e-3)
        averaged.train()
        assert averaged(x).shape == (4, 10)
        assert torch.equal(averaged(x), averaged.logits(x))


def test_mirror_views_make_the_prediction_blind_to_a_mirror() -> None:
    # The shifts of "shift" are symmetric left/right, so with their mirrors the set of views of an
    # image and of its mirror image is the same.
    model = _trained_like("shift-flip")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.flip(-1)), atol=1e-5)


def test_feature_taps_see_the_image_as_given() -> None:
    averaged, plain = _trained_like("shift"), _trained_like("none")
    plain.load_state_dict(averaged.state_dict())
    x = torch.randn(5, 1, 28, 28)
    names = ood.taps(plain)
    with torch.no_grad(), ood.tapped(averaged, names) as got, ood.tapped(plain, names) as want:
        averaged(x)
        plain(x)
    assert [g.shape[0] for g in got] == [5, 5]
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)


def test_tta_is_refused_for_the_baseline_network() -> None:
    with pytest.raises(ConfigError, match="--tta shift needs a resnet"):
        build_model(ModelConfig(arch="baseline", tta="shift"))


@pytest.fixture(scope="module")
def tta_checkpoint(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small checkpoint's weights, saved as a model that averages 5 views."""
    state = load_checkpoint(small_checkpoint)
    state["config"]["model"]["tta"] = "shift"
    path = tmp_path_factory.mktemp("tta") / "best.pt"
    save_checkpoint(path, state)
    return path


def test_a_checkpoint_without_the_setting_predicts_from_the_image_as_given(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    state = load_checkpoint(small_checkpoint)
    del state["config"]["model"]["tta"]  # as files written before the setting existed
    save_checkpoint(tmp_path / "old.pt", state)
    assert load_model(tmp_path / "old.pt").model.views == VIEWS["none"]


@pytest.mark.numerics
def test_evaluate_and_onnx_run_the_views_the_checkpoint_names(
    tta_checkpoint: Path,
    small_checkpoint: Path,
    mnist_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    test = data.load("mnist", mnist_root, log=lambda _: None)
    loaded, plain = load_model(tta_checkpoint), load_model(small_checkpoint)
    runtime = make_runtime(accel=False, amp=False, channels_last=False)

    def probabilities(model: torch.nn.Module, images: Tensor) -> Tensor:
        return predict_logits(
            model, images, mean=loaded.mean, std=loaded.std, runtime=runtime
        ).softmax(1)

    some = test.test_images[:1000]
    averaged = torch.stack(
        [probabilities(plain.model, _shifted(some, dy, dx)) for dy, dx, _ in VIEWS["shift"]]
    ).mean(0)
    # Background is 0 in these images: the edge repeated in is what a zero fill would give.
    assert torch.allclose(probabilities(loaded.model, some), averaged, atol=1e-5)
    accuracy = (
        (probabilities(loaded.model, test.test_images).argmax(1) == test.test_labels)
        .float()
        .mean()
        .item()
    )

    assert main(["evaluate", str(tta_checkpoint), "--data-dir", str(mnist_root)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ")
    # Within two images: the folded network in one stacked batch may round a near tie otherwise.
    assert abs(float(last.removeprefix("test accuracy: ").rstrip("%")) - 100 * accuracy) <= 0.02

    out = tmp_path / "tta.onnx"
    argv = ["export", str(tta_checkpoint), "--out", str(out), "--data-dir", str(mnist_root)]
    assert main(argv) == 0
    assert (
        capsys.readouterr().out.strip().splitlines()[-1].endswith(", 0 of 1000 predictions differ")
    )
    from mnist_resnet.export import onnx_session

    images = test.test_images[:9]
    x = ((images.numpy()[:, None] / 255.0 - loaded.mean) / loaded.std).astype(np.float32)
    got = onnx_session(out).run(None, {"image": x})[0]
    want = predict_logits(loaded.model, images, mean=loaded.mean, std=loaded.std, runtime=runtime)
    assert np.abs(got - want.numpy()).max() < 1e-4
