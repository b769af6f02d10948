"""export: ONNX with a dynamic batch axis and its contract, checked in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mnist_resnet import data
from mnist_resnet.checkpoint import load_model
from mnist_resnet.cli import main
from mnist_resnet.export import onnx_session
from mnist_resnet.inference import predict_logits
from mnist_resnet.precision import make_runtime

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
onnx = pytest.importorskip("onnx")


@pytest.mark.numerics
def test_onnx_export_matches_pytorch_and_carries_its_contract(
    small_checkpoint: Path,
    mnist_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "model.onnx"
    argv = ["export", str(small_checkpoint), "--out", str(out), "--data-dir", str(mnist_root)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("onnx parity: max |diff| ")
    assert lines[-1].endswith(", 0 of 1000 predictions differ")
    assert any("ONNX Runtime CPU" in line and "images/s" in line for line in lines)

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    contract = json.loads(meta["preprocessing"])
    loaded = load_model(small_checkpoint)
    assert contract["shape"] == ["N", 1, 28, 28] and contract["dtype"] == "float32"
    assert (contract["mean"], contract["std"]) == (loaded.mean, loaded.std)
    assert contract["class_names"] == list(loaded.class_names)
    assert contract["test_accuracy"] == loaded.state["test"]["accuracy"]

    # Any batch size runs, and a caller following the contract gets PyTorch's answers.
    test = data.load("mnist", mnist_root, log=lambda _: None).test_images[:37]
    x = ((test.numpy()[:, None] / 255.0 - contract["mean"]) / contract["std"]).astype(np.float32)
    got = onnx_session(out).run(None, {contract["input"]: x})[0]
    runtime = make_runtime(accel=False, amp=False, channels_last=False)
    want = predict_logits(loaded.model, test, mean=loaded.mean, std=loaded.std, runtime=runtime)
    assert got.shape == (37, 10)
    assert np.abs(got - want.numpy()).max() < 1e-4


def test_torchscript_export_and_user_errors(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.pt"
    argv = ["export", str(small_checkpoint), "--format", "torchscript", "--out", str(out)]
    assert main([*argv, "--data-dir", str(mnist_root)]) == 0
    assert "torchscript parity: max |diff| " in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1
    # No test images, no parity check: refused in one line, nothing downloaded.
    assert main(["export", str(small_checkpoint), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_safetensors_export_reloads_to_the_same_answers(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mnist_resnet.cli import EXPORT_FORMATS
    from mnist_resnet.export import FORMATS

    assert EXPORT_FORMATS == FORMATS
    out = tmp_path / "model.safetensors"
    argv = ["export", str(small_checkpoint), "--format", "safetensors", "--out", str(out)]
    assert main([*argv, "--data-dir", str(mnist_root)]) == 0
    assert "safetensors parity: max |diff| 0.0e+00, 0 of 1000" in capsys.readouterr().out
    original, exported = load_model(small_checkpoint), load_model(out)
    assert exported.state["config"] == original.state["config"]
    assert exported.temperature == original.temperature
    assert "optimizer" not in exported.state and out.read_bytes()[8:9] == b"{"
    # predict takes it like any checkpoint.
    assert main(["predict", str(out), str(tmp_path / "missing.png")]) == 1
    assert "missing.png: error" in capsys.readouterr().out
