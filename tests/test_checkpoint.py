"""Checkpoints: atomic writes, verified loads, one-line errors for bad files."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mnist_resnet.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    config_digest,
    latest_loadable,
    load_checkpoint,
    load_model,
    save_checkpoint,
    weights_digest,
)
from mnist_resnet.cli import main
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


# ----------------------------------------------------------------------------- safetensors


def _calibrated_state() -> dict[str, object]:
    return {**_state(), "calibration": {"temperature": 0.5, "method": "temperature scaling"}}


def test_safetensors_round_trip_without_pickle(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = {**_calibrated_state(), "optimizer": {"state": {}, "param_groups": []}}
    pt, st = tmp_path / "best.pt", tmp_path / "best.safetensors"
    save_checkpoint(pt, dict(state))
    save_checkpoint(st, dict(state))
    assert st.read_bytes()[8:9] == b"{" and b"optimizer" not in st.read_bytes()[:4096]
    # The tensors are the plain state dict: the safetensors library alone loads them.
    plain = load_file(st)
    assert plain.keys() == state["model"].keys()  # type: ignore[attr-defined]
    net = build_model(ModelConfig(depth=20, width=0.25))
    net.load_state_dict(plain)
    # Through mnist-resnet: the same state as the .pt (less what only a resume needs), the
    # same checks passed, the same logits.
    got, want = load_checkpoint(st), load_checkpoint(pt)
    assert "optimizer" not in got and got["config"] == want["config"]
    assert got["weights_sha256"] == want["weights_sha256"]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_model(st).model(x), load_model(pt).model(x))
    assert load_model(st).temperature == 0.5
    # Told apart by content, not by name.
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(st.read_bytes())
    assert load_checkpoint(renamed)["epoch"] == 3


def _rewritten(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> None:
    """`path` written again with its tensors and header metadata changed by `edit`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _deeper(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    config = json.loads(metadata["config"])
    config["model"]["depth"] = 32
    metadata["config"] = json.dumps(config)


def _not_json(_: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    metadata["normalization"] = "{'mean': 0.1"


def _no_checksums(_: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    del metadata["weights_sha256"], metadata["config_sha256"]


def _resized_with_checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # Someone who also recomputed the checksums: the shapes no longer fit the config.
    tensors["fc.weight"] = torch.zeros(10, 7)
    state = {k: json.loads(v) for k, v in metadata.items()}
    metadata["weights_sha256"] = json.dumps(weights_digest(tensors))
    metadata["config_sha256"] = json.dumps(config_digest(state))


def _foreign(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    metadata.clear()  # a state dict saved by someone else's code


def _edited_weights(tensors: dict[str, torch.Tensor], _: dict[str, str]) -> None:
    tensors["fc.bias"] = tensors["fc.bias"] + 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_deeper, "its config does not match its recorded checksum"),
        (_not_json, "metadata entry 'normalization' is not JSON"),
        (_no_checksums, "its checksums are missing"),
        (_resized_with_checksums, "weights do not fit the saved model config"),
        (_foreign, "is not an mnist-resnet checkpoint"),
        (_edited_weights, "weights do not match their recorded checksum"),
    ],
)
def test_hostile_safetensors_are_one_line_errors(
    tmp_path: Path,
    edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _calibrated_state())
    _rewritten(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
    # The commands say it in one line, exit 2.
    capsys.readouterr()
    assert main(["predict", str(path), str(tmp_path / "any.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.split("'")[0] in err


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_safetensors_is_one_line_error(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _calibrated_state())
    payload = path.read_bytes()
    path.write_bytes(payload[: int(len(payload) * keep)])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
