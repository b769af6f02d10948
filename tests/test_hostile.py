"""Hostile files and flags: edited checkpoints, rotten data, full disks, bad outputs, odd files.

Each case ends in one line naming the file or flag, a non-zero exit (2 for bad input), no
traceback, and nothing half-written. Listed in docs/reliability.md next to the fault it shows.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_resnet import data
from mnist_resnet.checkpoint import CheckpointError, save_checkpoint, weights_digest
from mnist_resnet.cli import main
from mnist_resnet.config import DataConfig, ModelConfig, TrainConfig
from mnist_resnet.errors import TrainingError


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "Warning" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def _edited(
    source: Path, dest: Path, edit: Callable[[dict[str, Any]], None], *, sign: bool
) -> Path:
    """A copy of a real checkpoint with `edit` applied, saved as a plain torch file would be.

    `sign=False` also drops the config checksum (an old file, or one whose editor removed it),
    so what catches the edit must be the validation itself.
    """
    state = torch.load(source, map_location="cpu", weights_only=True)
    edit(state)
    if sign:
        state["weights_sha256"] = weights_digest(state["model"])
    else:
        state.pop("config_sha256", None)
        state["weights_sha256"] = weights_digest(state["model"])
    torch.save(state, dest)
    return dest


def _digit_png(folder: Path) -> Path:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255  # a "1"
    path = folder / "one.png"
    Image.fromarray(pixels).save(path)
    return path


def _set(*keys: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _nan_weights(state: dict[str, Any]) -> None:
    weight = next(v for v in state["model"].values() if v.is_floating_point())
    weight.fill_(math.nan)


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "width 1000": (_set("config", "model", "width", value=1000.0), "--width"),
    "width 16, depth 110": (
        lambda s: s["config"]["model"].update(width=16.0, depth=110),
        "parameters",
    ),
    "no model config": (lambda s: s["config"].pop("model"), "ModelConfig"),
    "model config a string": (_set("config", "model", value="resnet"), "ModelConfig"),
    "depth a string": (_set("config", "model", "depth", value="fourteen"), "depth"),
    "config a list": (_set("config", value=[1, 2]), "mapping"),
    "std 0": (_set("normalization", "std", value=0.0), "normalisation"),
    "std nan": (_set("normalization", "std", value=math.nan), "normalisation"),
    "no normalisation": (lambda s: s.pop("normalization"), "normalisation"),
    "class names short": (_set("class_names", value=["a", "b"]), "class names"),
    "NaN weights": (_nan_weights, "not all finite"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_checkpoint_is_refused_before_anything_is_built(
    case: str, small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, needle = EDITS[case]
    image = _digit_png(tmp_path)
    # As saved by anyone but mnist-resnet: the config checksum no longer matches.
    signed = _edited(small_checkpoint, tmp_path / "signed.pt", edit, sign=True)
    if case != "NaN weights":  # the weights are not part of the config checksum
        assert main(["predict", str(signed), str(image)]) == 2
        assert "checksum" in _one_line(capsys)
    # With the checksum removed, the validation of every field catches it all the same.
    unsigned = _edited(small_checkpoint, tmp_path / "unsigned.pt", edit, sign=False)
    assert main(["predict", str(unsigned), str(image)]) == 2
    err = _one_line(capsys)
    assert str(unsigned) in err and needle in err, err


def test_evaluate_and_export_share_the_validation(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _edited(small_checkpoint, tmp_path / "bad.pt", EDITS["width 1000"][0], sign=False)
    for argv in (
        ["evaluate", str(bad), "--data-dir", str(mnist_root)],
        ["export", str(bad), "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
        ["ensemble", str(bad), str(small_checkpoint), "--data-dir", str(mnist_root)],
    ):
        assert main(argv) == 2, argv
        assert "--width" in _one_line(capsys)


def test_a_plain_pickle_is_refused_without_torchs_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "mnist-resnet", "payload": io.BytesIO(b"x")}, path)
    assert main(["predict", str(path), str(_digit_png(tmp_path))]) == 2
    err = _one_line(capsys)
    assert "refused" in err and "weights_only" not in err


# --- data ---------------------------------------------------------------------------------------


def test_a_flipped_byte_in_the_cache_is_caught_before_training(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data.fetch("mnist", mnist_root, log=lambda _: None)  # decompressed files and their stamp
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in data.raw_dir(mnist_root, "mnist").iterdir():
        if not path.name.endswith(".gz") and path.is_file():
            shutil.copy2(path, raw / path.name)  # keeps the mtimes the stamp recorded
    labels = raw / "train-labels-idx1-ubyte"
    stat = labels.stat()
    content = bytearray(labels.read_bytes())
    content[100] = (content[100] + 1) % 10
    labels.write_bytes(bytes(content))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot: size and mtime kept
    argv = ["train", "--dry-run", "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = _one_line(capsys)
    expected = data.get_spec("mnist").train_labels.sha256
    assert str(labels) in err and str(expected) in err and "data fetch" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.pt"))


# --- disk -------------------------------------------------------------------------------------


def test_a_write_error_inside_torch_save_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "epoch-001.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1})
    good = path.read_bytes()

    def torn(obj: object, f: io.BufferedWriter) -> None:
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr("mnist_resnet.checkpoint.torch.save", torn)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*previous checkpoint"):
        save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "epoch": 2})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001.pt"]


# --- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--grad-clip", "nan"], "--grad-clip"),
        (["--warmup-epochs", "nan"], "--warmup-epochs"),
        (["--width", "nan"], "--width"),
        (["--width", "1e6"], "--width"),
        (["--depth", "1208"], "--depth"),
        (["--width", "16", "--depth", "56"], "parameters"),
    ],
)
def test_non_finite_and_absurd_numbers_are_refused_up_front(
    flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dry-run", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path)]
    assert main([*argv, *flags]) == 2
    assert needle in _one_line(capsys)
    assert not any(tmp_path.iterdir())  # refused before the data was even looked for


def test_threads_beyond_the_machine_are_capped_with_a_note(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dry-run", "--depth", "8", "--threads", "100000"]
    argv += ["--data-dir", str(mnist_root), "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "note: --threads 100000 is more than the" in capsys.readouterr().out


def test_weights_that_go_nan_never_become_best_pt(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist_resnet.train as train_module

    real_step = train_module.train_step

    def poisoning(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = real_step(model, *args, **kwargs)
        with torch.no_grad():
            next(iter(model.parameters())).fill_(math.nan)  # as a bad step let through would
        return out

    monkeypatch.setattr(train_module, "train_step", poisoning)
    cfgs = (
        ModelConfig(depth=8),
        # --skip-nonfinite: the NaN losses that follow are skipped, the NaN weights stay.
        TrainConfig(
            epochs=1, runs_dir=str(tmp_path), name="nan", threads=1, skip_nonfinite=True, amp=False
        ),
        DataConfig(data_dir=str(mnist_root), subset=0.01),
    )
    with pytest.raises(TrainingError, match="NaN or infinite during epoch 1; nothing was saved"):
        train_module.train(*cfgs, log=lambda _: None)
    assert not (tmp_path / "nan" / "best.pt").exists()


# --- outputs and odd files --------------------------------------------------------------------


def test_outputs_are_checked_before_the_work(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    image = str(_digit_png(tmp_path))
    cases = [
        (["predict", str(small_checkpoint), image, "--save-preprocessed", str(a_file)], "--save"),
        (["predict", str(small_checkpoint), image, "--save-preprocessed", "/proc/nope"], "--save"),
        (["evaluate", str(small_checkpoint), "--out", "/proc/x"], "--out"),
        (["evaluate", str(small_checkpoint), "--test-batch-size", "0"], "--test-batch-size"),
        (["evaluate", str(small_checkpoint), "--test-batch-size", "-5"], "--test-batch-size"),
        (["ensemble", str(small_checkpoint), "--json", "/proc/x.json"], "--json"),
        (["ensemble", str(small_checkpoint), "--json", str(tmp_path)], "--json"),
    ]
    for argv, needle in cases:
        argv = [*argv, "--data-dir", str(mnist_root)] if argv[0] != "predict" else argv
        assert main(argv) == 2, argv
        assert needle in _one_line(capsys), argv


def test_serve_refuses_a_bad_or_busy_port(
    small_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(small_checkpoint), "--port", "70000"])
    assert exit_info.value.code == 2
    assert "70000 is not a port" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(small_checkpoint), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in _one_line(capsys)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--workers", "0"], "--workers"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-batch", "100000"], "--max-batch"),
        (["--max-delay-ms", "nan"], "--max-delay-ms"),
        (["--header-timeout", "600"], "--header-timeout"),
        (["--body-timeout", "0"], "--body-timeout"),
        (["--max-connections", "0"], "--max-connections"),
    ],
)
def test_serve_settings_out_of_range_are_one_line(
    flags: list[str], needle: str, small_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(small_checkpoint), *flags]) == 2
    assert needle in _one_line(capsys)


@pytest.mark.parametrize(
    "content", ["{not json", "{}", '{"model": "x", "train": {}, "data": {}}', "\xff\xfe"]
)
def test_resume_of_a_run_with_a_damaged_config_is_one_line(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(content.encode("latin-1"))
    assert main(["train", "--resume", str(run), "--runs-dir", str(tmp_path)]) == 2
    assert str(run / "config.json") in _one_line(capsys)


def test_an_experiment_name_cannot_leave_the_runs_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    argv = ["experiment", "degradation", "--runs-dir", str(runs), "--name", "../escape"]
    assert main([*argv, "--data-dir", str(tmp_path / "none")]) == 2
    assert "--name" in _one_line(capsys)
    assert not (tmp_path / "escape").exists()


def test_predict_does_not_hang_on_a_fifo(small_checkpoint: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "mnist_resnet", "predict", str(small_checkpoint), str(fifo)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "not a regular file" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize("damage", [{"epoch": "one"}, {"rng": {"torch": "x"}}, {"optimizer": {}}])
def test_resume_from_a_checkpoint_with_damaged_training_state_is_one_line(
    damage: dict[str, object], mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--depth", "8", "--epochs", "2", "--subset", "0.01", "--no-amp"]
    argv += ["--tta", "none"]  # five views of the 10,000 test images would cost more than training
    argv += ["--data-dir", str(mnist_root), "--runs-dir", str(tmp_path), "--name", "r"]
    assert main(argv) == 0
    capsys.readouterr()
    path = tmp_path / "r" / "checkpoints" / "epoch-001.pt"
    state = torch.load(path, weights_only=True)
    state.update(damage)  # not covered by the weight and config checksums
    torch.save(state, path)
    assert main(["train", "--resume", str(path), "--data-dir", str(mnist_root)]) == 2
    assert "training state is damaged" in _one_line(capsys)


def test_evaluate_of_a_missing_checkpoint_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(tmp_path / "nope" / "best.pt")]) == 2
    assert "checkpoint not found" in _one_line(capsys)
    assert not (tmp_path / "nope").exists()


def test_an_unreadable_training_config_only_costs_the_recorded_precision(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # load_model validates what builds and feeds the model; the training config only tells
    # evaluate which precision the run used, and a damaged one falls back to deciding anew.
    odd = _edited(
        small_checkpoint, tmp_path / "odd.pt", _set("config", "train", value="x"), sign=False
    )
    argv = ["evaluate", str(odd), "--data-dir", str(mnist_root), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test accuracy: ")


# --- odd names and archives (issue 29) --------------------------------------------------------


def _train_argv(dataset: str, runs: Path) -> list[str]:
    argv = ["train", "--dataset", dataset, "--depth", "8", "--dry-run", "--no-amp"]
    return [*argv, "--batch-size", "4", "--runs-dir", str(runs)]


def _member_npz(path: Path, member: str, *, method: int | None = None, flag: int = 0) -> Path:
    """An npz whose x array is stored as `member`, with an odd compression method or flag."""
    import zipfile

    from datafakes import make_npz

    good = make_npz(path.with_suffix(".good.npz"))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "x.npy":
                info.filename = member
            dst.writestr(info, data)
    if method is not None or flag:
        raw = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = raw.find(signature)
            while at != -1:
                if flag:
                    raw[at + offset] |= flag  # general purpose flag: encrypted
                if method is not None:
                    raw[at + offset + 2 : at + offset + 4] = method.to_bytes(2, "little")
                at = raw.find(signature, at + 4)
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("member in a folder", "holds no 'x' array"),
        ("encrypted member", "is not a readable .npz file"),
        ("compression method 98", "is not a readable .npz file"),
    ],
)
def test_odd_npz_archives_are_one_line(
    case: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.npz"
    if case == "member in a folder":
        _member_npz(path, "a/x.npy")
    elif case == "encrypted member":
        _member_npz(path, "x.npy", flag=1)
    else:
        _member_npz(path, "x.npy", method=98)
    assert main(_train_argv(f"npz:{path}", tmp_path / "runs")) == 2
    assert needle in _one_line(capsys)


def test_class_names_that_are_not_text_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datafakes import SHAPES, make_image_folder, make_npz

    # A folder name in Latin-1 on a UTF-8 system: Python sees a lone surrogate.
    root = make_image_folder(tmp_path / "shapes", per_class=3)
    os.rename(root / SHAPES[0], os.fsencode(root) + b"/caf\xe9")
    assert main(_train_argv(f"folder:{root}", tmp_path / "runs")) == 2
    assert "caf\\udce9" in _one_line(capsys)
    names = np.asarray(["ring", "sq\udcffuare", "cross"])
    path = make_npz(tmp_path / "names.npz", names=False, class_names=names)
    assert main(_train_argv(f"npz:{path}", tmp_path / "runs")) == 2
    assert "sq\\udcffuare" in _one_line(capsys)


def test_a_very_long_folder_name_still_names_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datafakes import make_image_folder

    root = make_image_folder(tmp_path / ("d" * 240), per_class=3)
    assert main(_train_argv(f"folder:{root}", tmp_path / "runs")) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert len(run.name) < 128


def test_names_with_newlines_and_escapes_are_shown_escaped(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = tmp_path / "evil\nmnist-resnet: all good\x1b[2J.png"
    forged.write_bytes(b"not an image")
    assert main(["predict", str(small_checkpoint), str(forged)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].endswith(
        "evil\\nmnist-resnet: all good\\x1b[2J.png: error: "
        "not an image in a supported format "
        "(PNG, JPEG, GIF, BMP, TIFF or WebP)"
    ), out
    # An error line holding the name stays one line too.
    assert main(["evaluate", str(forged.with_suffix(".pt"))]) == 2
    assert "evil\\nmnist-resnet: all good\\x1b[2J.pt" in _one_line(capsys)


def test_class_names_with_escapes_are_shown_escaped_by_data_info(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datafakes import make_npz

    names = np.asarray(["ring\x1b[2J", "square\nmnist-resnet: ok", "cross"])
    path = make_npz(tmp_path / "names.npz", names=False, class_names=names)
    assert main(["data", "info", "--dataset", f"npz:{path}"]) == 0
    out = capsys.readouterr().out
    assert "ring\\x1b[2J" in out and "square\\nmnist-resnet: ok" in out
    assert "\x1b" not in out and "\nmnist-resnet: ok" not in out


def test_a_symlinked_class_folder_is_skipped_like_any_symlinked_folder_and_said(
    tmp_path: Path,
) -> None:
    from datafakes import SHAPES, make_image_folder

    from mnist_resnet.data.own import scan_folder

    root = make_image_folder(tmp_path / "shapes", per_class=3)
    outside = make_image_folder(tmp_path / "elsewhere", per_class=2)
    (root / "everything").symlink_to(outside)  # a class folder pointing out of the dataset
    (root / SHAPES[0] / "deeper").symlink_to(outside / SHAPES[1])
    said: list[str] = []
    classes, files = scan_folder(root, log=said.append)
    assert classes == tuple(sorted(SHAPES)) and sum(map(len, files)) == 9
    assert len(said) == 1 and "not followed" in said[0], said
    assert "everything" in said[0] and "deeper" in said[0], said


def test_predict_takes_options_between_its_files(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _digit_png(tmp_path)
    second = tmp_path / "two.png"
    second.write_bytes(first.read_bytes())
    argv = ["predict", str(small_checkpoint), str(first), "--top-k", "2", str(second), "--json"]
    assert main(argv) == 0
    import json

    answers = json.loads(capsys.readouterr().out)
    assert [len(a["top"]) for a in answers] == [2, 2]
    with pytest.raises(SystemExit):
        main(["predict", str(small_checkpoint), str(first), "--no-such-flag"])


def test_evaluate_without_data_leaves_no_folder_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_data(*_: object, **__: object) -> None:
        raise data.DataError("fashion-mnist: no data here and no network")

    monkeypatch.setattr("mnist_resnet.data.load_data", no_data)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--pretrained", "fashion-mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # which model, then the error
    assert len(err) == 2 and err[1].endswith("no data here and no network"), err
    out = tmp_path / "figures" / "deeper"
    assert main(["evaluate", "--pretrained", "fashion-mnist", "--out", str(out)]) == 2
    assert not any(tmp_path.iterdir())  # neither pretrained-fashion-mnist/ nor figures/


def test_damaged_metadata_of_a_shipped_model_is_listed_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnist_resnet import pretrained

    folder = tmp_path / "package"
    folder.mkdir()
    for name in pretrained.NAMES:
        shutil.copy(pretrained.FOLDER / f"{name}{pretrained.SUFFIX}", folder)
    (folder / "mnist.json").write_text('{"classes": 5, "bytes": "many", "recipe": ["x"]}')
    (folder / "fashion-mnist.json").write_text('{"classes": ["T-shirt\\u001b[2J", "Trouser\\n"]}')
    monkeypatch.setattr(pretrained, "FOLDER", folder)
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    assert "mnist: the pretrained mnist model (shipped)" in out
    assert "T-shirt\\x1b[2J, Trouser\\n" in out and "\x1b" not in out
