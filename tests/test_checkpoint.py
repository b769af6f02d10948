"""Checkpoints: atomic writes, verified loads, one-line errors for bad files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mnist_resnet.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    latest_loadable,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from mnist_resnet.config import DataConfig, ModelConfig, to_dict
from mnist_resnet.model import build_model


def _state() -> dict[str, object]:
    model_cfg = ModelConfig(depth=20, width=0.25)
    return {
        "config": {"preset": "t", "model": to_dict(model_cfg), "data": to_dict(DataConfig())},
        "model": build_model(model_cfg).state_dict(),
        "epoch": 3,
        "normalization": {"mean": 0.1307, "std": 0.3081},
    }


def test_round_trip_and_model_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "a" / "best.pt"
    save_checkpoint(path, _state())
    state = load_checkpoint(path)
    assert state["epoch"] == 3
    assert state["format_version"] == FORMAT_VERSION
    loaded = load_model(path)
    assert loaded.model_config.width == 0.25
    assert loaded.mean == pytest.approx(0.1307)
    out = loaded.model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    # Loaded for inference: batch norms folded, same eval logits as the saved weights give.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
    saved = build_model(loaded.model_config)
    saved.load_state_dict(loaded.state["model"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), saved.eval()(x))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp files left
    # fold=False keeps the batch norms (e.g. to re-estimate their statistics), in eval mode.
    unfolded = load_model(path, fold=False).model
    assert not unfolded.training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unfolded(x), saved(x))


def test_truncated_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", os.urandom(4096)])
def test_garbage_files_are_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_foreign_torch_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not an mnist-resnet checkpoint"):
        load_checkpoint(path)


def test_future_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "v.pt"
    torch.save({**_state(), "format": "mnist-resnet", "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "mnist-resnet", "x": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_latest_loadable_skips_corrupt(tmp_path: Path) -> None:
    good, bad = tmp_path / "epoch-001.pt", tmp_path / "epoch-002.pt"
    save_checkpoint(good, _state())
    bad.write_bytes(b"\x00" * 10)
    found = latest_loadable([good, bad])
    assert found is not None and found[0] == good
