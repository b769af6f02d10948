"""Knowledge distillation: the loss, the teacher, a student that learns what its teacher knows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_resnet import data
from mnist_resnet.cli import main
from mnist_resnet.config import ConfigError, DataConfig, ModelConfig, TrainConfig, from_dict
from mnist_resnet.distill import Teacher, load_teacher
from mnist_resnet.step import distillation_loss
from mnist_resnet.train import train


def test_the_loss_is_zero_at_the_teachers_answer_and_pulls_towards_it() -> None:
    torch.manual_seed(0)
    t = 4.0
    teacher_logits = torch.randn(8, 10) * 3
    target = F.softmax(teacher_logits / t, dim=1)
    assert distillation_loss(teacher_logits, target, t).abs() < 1e-5
    student = torch.randn(8, 10, requires_grad=True)
    loss = distillation_loss(student, target, t)
    assert loss > 0.01
    loss.backward()
    # d/dz of T^2 * KL(p || softmax(z / T)), averaged over the batch: T * (q - p) / B.
    expected = t * (F.softmax(student.detach() / t, dim=1) - target) / 8
    assert student.grad is not None
    torch.testing.assert_close(student.grad, expected, rtol=1e-4, atol=1e-6)


def test_a_teacher_is_the_mean_of_its_members_probabilities_on_their_own_inputs() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    # The second member was trained on inputs normalised otherwise: x * 2 + 1 is what it sees.
    teacher = Teacher([a, b], [(1.0, 0.0), (2.0, 1.0)], temperature=2.0)
    with torch.no_grad():
        got = teacher(x)
        want = (F.softmax(a(x) / 2, 1) + F.softmax(b(x * 2 + 1) / 2, 1)) / 2
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), torch.ones(5))


def test_settings_are_checked_and_teachers_survive_a_round_trip_through_json() -> None:
    for bad in ({"distill_weight": 1.5}, {"distill_weight": float("nan")}):
        with pytest.raises(ConfigError, match="--distill-weight"):
            TrainConfig(**bad).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--distill-temperature"):
        TrainConfig(distill_temperature=0.0).validate()
    cfg = TrainConfig(teachers=("/a/best.pt", "/b/best.pt"))
    again = from_dict(TrainConfig, json.loads(json.dumps(cfg.__dict__)))
    assert again == cfg and isinstance(again.teachers, tuple)
    with pytest.raises(ConfigError, match="teachers"):
        from_dict(TrainConfig, {"teachers": [1, 2]})


def test_a_teacher_of_other_classes_is_refused(small_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="other classes"):
        load_teacher((str(small_checkpoint),), 4.0, tuple("abcdefghij"), (0.13, 0.31))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_teacher(("/nonexistent/best.pt",), 4.0, tuple("0123456789"), (0.13, 0.31))


def _digits_with_wrong_labels(mnist_root: Path, folder: Path) -> Path:
    """4,000 MNIST training digits whose labels are all shuffled, and 1,000 test digits with
    their true labels: only a network that learns from somewhere else can read them."""
    splits = data.load("mnist", mnist_root, log=lambda _: None)
    gen = np.random.default_rng(0)
    y = splits.train_labels[:4000].numpy().copy()
    gen.shuffle(y)
    path = folder / "shuffled.npz"
    np.savez(
        path,
        x=splits.train_images[:4000].numpy(),
        y=y,
        x_test=splits.test_images[:1000].numpy(),
        y_test=splits.test_labels[:1000].numpy(),
    )
    return path


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_a_student_learns_its_teachers_answers_not_its_labels(
    weight: float, small_checkpoint: Path, mnist_root: Path, tmp_path: Path
) -> None:
    # The teacher (98.6-98.8% on MNIST) knows the digits; the labels are noise. Learning only
    # from the teacher, the student reads the true digits (82% after 3 epochs on 3,500 images,
    # selected by a validation split whose labels are noise too); learning only from the
    # labels, it can do no better than chance (10%).
    npz = _digits_with_wrong_labels(mnist_root, tmp_path)
    result = train(
        ModelConfig(depth=8, stem="pool"),
        TrainConfig(
            epochs=3,
            batch_size=64,
            teachers=(str(small_checkpoint),),
            distill_weight=weight,
            runs_dir=str(tmp_path / "runs"),
            name="student",
        ),
        DataConfig(dataset=f"npz:{npz}", val_size=500),
        log=lambda _: None,
    )
    if weight == 1.0:
        assert result.test.accuracy > 0.6
    else:
        assert result.test.accuracy < 0.3


def test_a_resumed_student_refuses_a_changed_teacher(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tmp_path / "teacher.pt"
    shutil.copy(small_checkpoint, teacher)
    runs = tmp_path / "runs"
    argv = ["train", "--depth", "8", "--stem", "pool", "--subset", "0.02", "--epochs", "1"]
    argv += ["--data-dir", str(mnist_root), "--runs-dir", str(runs), "--name", "s"]
    assert main([*argv, "--teacher", str(teacher)]) == 0
    saved = torch.load(runs / "s" / "best.pt", weights_only=False)
    assert list(saved["config"]["train"]["teachers"]) == [str(teacher)]
    assert len(saved["teacher_sha256"]) == 1
    resume = ["train", "--resume", str(runs / "s"), "--data-dir", str(mnist_root)]
    assert main(resume) == 0
    # Another file in its place: the run's targets would change halfway, so it is refused.
    shutil.copy(tmp_path / "runs" / "s" / "best.pt", teacher)
    capsys.readouterr()
    assert main(resume) != 0
    assert "teacher checkpoints differ" in capsys.readouterr().err
