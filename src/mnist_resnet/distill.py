"""Knowledge distillation (Hinton et al. 2015): a network learns from the labels and from the
averaged, softened answers of several trained networks on the very same augmented batch.

An ensemble of `best` runs is more accurate than any one of them (docs/results.md), but costs
one forward pass per member; distilled, one network of the same size carries part of that gain.
The teachers are checkpoints; a run records each one's SHA-256, and a resumed run refuses a
teacher whose file changed, since its targets would no longer be the ones the run began with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_resnet.checkpoint import load_model
from mnist_resnet.config import ConfigError
from mnist_resnet.errors import TrainingError
from mnist_resnet.files import hash_file


class Teacher(nn.Module):
    """Several trained networks as one: the mean of their probabilities at temperature `t`.

    The student's batch arrives normalised with the student's mean and std; each member gets it
    renormalised with its own (`inputs`: one (scale, shift) per member). Members are evaluated
    with folded batch norms (eval mode), so a teacher's answer for an image never depends on the
    rest of the batch.
    """

    def __init__(
        self, members: list[nn.Module], inputs: list[tuple[float, float]], temperature: float
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.inputs = inputs
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [
            F.softmax(m(x * scale + shift).float() / self.temperature, dim=1)
            for m, (scale, shift) in zip(self.members, self.inputs, strict=True)
        ]
        return torch.stack(probs).mean(0)


@dataclass(frozen=True)
class TeacherFile:
    path: str
    sha256: str


def load_teacher(
    paths: tuple[str, ...],
    temperature: float,
    class_names: tuple[str, ...],
    normalization: tuple[float, float],
) -> tuple[Teacher, list[TeacherFile]]:
    """The teacher made of the checkpoints at `paths`, on the CPU, and their files' checksums.

    Each must know the student's classes, by the same names in the same order, or its answers
    would be about other things; `normalization` is the student's (mean, std).
    """
    mean, std = normalization
    members: list[nn.Module] = []
    inputs: list[tuple[float, float]] = []
    files: list[TeacherFile] = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"--teacher {path}: no such checkpoint file")
        loaded = load_model(path)
        if loaded.class_names != class_names:
            raise ConfigError(
                f"--teacher {path} knows other classes ({', '.join(loaded.class_names)[:80]}) "
                f"than this data ({', '.join(class_names)[:80]}): it must have been trained on "
                "the student's dataset"
            )
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        members.append(loaded.model)
        # x_student = (pixel - mean) / std; the member wants (pixel - its mean) / its std.
        inputs.append((std / loaded.std, (mean - loaded.mean) / loaded.std))
        files.append(TeacherFile(str(path), hash_file(Path(path))))
    return Teacher(members, inputs, temperature).eval(), files


def check_teachers(saved: object, sha256: list[str]) -> None:
    """Refuse to resume a run whose teachers' files are not the ones it started with."""
    expected = saved if isinstance(saved, list) else []
    if expected != sha256:
        raise TrainingError(
            "the teacher checkpoints differ from those this run started with (their SHA-256 "
            "changed, or other files were given); resume with the same --teacher files"
        )
