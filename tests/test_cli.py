"""The command line through main(argv): success paths and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mnist_resnet.cli import build_parser, main, train_configs
from mnist_resnet.config import PRESETS, DataConfig, TrainConfig


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_summary_lists_parameters_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "resnet20", "baseline"]) == 0
    out = capsys.readouterr().out
    assert "== resnet20" in out and "== baseline" in out
    assert "1,199,882" in out  # the pytorch/examples CNN


def test_flags_override_preset_and_defaults_come_from_config() -> None:
    args = build_parser().parse_args(["train", "--epochs", "7", "--depth", "56", "--no-amp"])
    model_cfg, train_cfg, data_cfg = train_configs(args)
    assert (train_cfg.epochs, model_cfg.depth, train_cfg.amp) == (7, 56, False)
    assert train_cfg.batch_size == TrainConfig().batch_size
    args = build_parser().parse_args(["train", "--preset", "baseline"])
    _, train_cfg, data_cfg = train_configs(args)
    assert train_cfg == PRESETS["baseline"].train
    assert data_cfg.augment is False
    argv = ["train", "--preset", "fast-gpu", "--no-device-data", "--compile"]
    _, train_cfg, _ = train_configs(
        build_parser().parse_args([*argv, "--compile-mode", "max-autotune"])
    )
    assert train_cfg.batch_size == PRESETS["fast-gpu"].train.batch_size
    assert (train_cfg.device_data, train_cfg.compile_mode) == (False, "max-autotune")


@pytest.mark.parametrize(
    ("argv", "stem"),
    [
        (["--preset", "fast"], "pool-first"),
        (["--preset", "fast", "--no-pool-before-norm"], "pool"),
        (["--preset", "fast-gpu"], "pool"),
        (["--stem", "unshuffle"], "unshuffle"),
        # The four flags of earlier versions, on top of the preset's stem.
        (["--stem-pool", "--pool-before-norm"], "pool-first"),
        (["--preset", "fast-gpu", "--pool-before-norm"], "pool-first"),
        (["--preset", "fast", "--no-stem-pool", "--stem-stride", "2"], "stride2"),
        (["--preset", "fast", "--no-stem-pool", "--stem-unshuffle"], "unshuffle"),
    ],
)
def test_the_stem_is_one_flag_and_the_old_flags_still_work(argv: list[str], stem: str) -> None:
    model_cfg, _, _ = train_configs(build_parser().parse_args(["train", *argv]))
    assert model_cfg.stem == stem


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--preset", "resnet21"], "unknown preset"),
        (["train", "--depth", "21"], "6n+2"),
        (["train", "--block", "bottleneck", "--depth", "21"], "9n+2"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--compile-mode", "fastest"], "--compile-mode"),
        (["train", "--stem", "pooled"], "unknown stem"),
        (["train", "--stem-unshuffle", "--stem-pool"], "--stem-unshuffle already quarters"),
        (["evaluate", "does-not-exist.pt"], "not found"),
    ],
)
def test_user_errors_end_in_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, "--data-dir", str(tmp_path)] if argv[0] == "train" else argv) == 2
    assert needle in _error_line(capsys)


def test_batch_larger_than_data_is_refused(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data-dir", str(mnist_root), "--runs-dir", str(tmp_path)]
    assert main([*argv, "--subset", "0.001", "--batch-size", "512"]) == 2
    assert "larger than" in _error_line(capsys)


@pytest.mark.slow
def test_dry_run_then_evaluate(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dry-run", "--data-dir", str(mnist_root), "--runs-dir", str(tmp_path)]
    assert main([*argv, "--name", "dry", "--width", "0.25"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    ckpt = tmp_path / "dry" / "best.pt"
    assert main(["evaluate", str(ckpt), "--data-dir", str(mnist_root)]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    assert (tmp_path / "dry" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "dry" / "misclassified.png").stat().st_size > 1000


@pytest.mark.slow
# The precision the probe picks depends on the kernels: that case also runs in .ci/run's matrix.
@pytest.mark.parametrize(
    "flag", ["--amp", "--no-amp", pytest.param(None, marks=pytest.mark.numerics)]
)
def test_train_says_its_precision_first_and_evaluate_reproduces_its_accuracy(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str | None
) -> None:
    argv = ["train", "--data-dir", str(mnist_root), "--runs-dir", str(tmp_path), "--name", "r"]
    argv += ["--depth", "8", "--width", "0.5", "--epochs", "1", "--subset", "0.02", "--no-accel"]
    argv += ["--tta", "none"]  # the default five views of 10,000 test images cost more than this
    assert main(argv if flag is None else [*argv, flag]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("precision: ")
    if flag is not None:
        assert lines[0].startswith("precision: bf16" if flag == "--amp" else "precision: fp32")
    # The decision is saved with the run (a resume keeps it) ...
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]["amp"]
    assert saved is lines[0].startswith("precision: bf16")
    # ... and `evaluate` judges in it, so it prints the very accuracy `train` printed.
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "r" / "best.pt"),
                "--data-dir",
                str(mnist_root),
                "--no-accel",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == lines[-1]


def test_existing_run_is_not_overwritten(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "taken"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    argv = ["train", "--data-dir", str(mnist_root), "--runs-dir", str(tmp_path), "--name", "taken"]
    assert main(argv) == 2
    assert "--resume" in _error_line(capsys)


class _Killed(Exception):
    pass


def test_a_resume_reads_the_data_folder_the_run_used_unless_told_otherwise(
    mnist_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Started with a relative --data-dir, killed, resumed from another folder without one:
    the resumed run reads the files the run used (saved as an absolute path), and fetches
    nothing into ./data; a --data-dir given with --resume says where the files are now.
    Flags that would change what the run learns are refused; --threads is this machine's."""
    import mnist_resnet.train as train_module
    from mnist_resnet import data

    monkeypatch.delenv("MNIST_RESNET_DATA", raising=False)
    real_prepare, real_save = data.prepare_data, train_module._Trainer._save
    read_from: list[str] = []

    def prepare(cfg: DataConfig, **kw: Any) -> Any:
        read_from.append(cfg.data_dir)
        assert Path(cfg.data_dir).is_absolute(), read_from  # never ./data of the current folder
        return real_prepare(cfg, **kw)

    def save_then_die(self: Any, epochs_done: int) -> None:
        real_save(self, epochs_done)
        raise _Killed

    monkeypatch.setattr(data, "prepare_data", prepare)
    monkeypatch.setattr(train_module._Trainer, "_save", save_then_die)
    run = tmp_path / "runs" / "r"
    argv = ["train", "--depth", "8", "--epochs", "1", "--subset", "0.02", "--no-amp", "--tta"]
    argv += ["none", "--checkpoint-steps", "4", "--runs-dir", str(run.parent), "--name", "r"]
    monkeypatch.chdir(mnist_root.parent)
    with pytest.raises(_Killed):
        main([*argv, "--data-dir", mnist_root.name])
    monkeypatch.setattr(train_module._Trainer, "_save", real_save)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--width", "2"]) == 2
    refused = _error_line(capsys)
    assert "--width (the run has 1.0); --epochs (the run has 1)" in refused
    assert "--threads" in refused
    # Another preset is another run too; the run's own, named, is fine (below).
    assert main(["train", "--resume", str(run), "--preset", "fast"]) == 2
    assert "--preset (the run has 'resnet14')" in _error_line(capsys)
    assert read_from == [str(mnist_root)]  # refused before any data was read
    # The run's own settings given again are fine; --threads is this machine's to choose.
    resumed = ["train", "--resume", str(run), "--preset", "resnet14", "--depth", "8"]
    assert main([*resumed, "--threads", "1"]) == 0
    assert ", 1 threads" in capsys.readouterr().out
    assert read_from == [str(mnist_root), str(mnist_root)]
    assert not (elsewhere / "data").exists()
    # Files moved: --data-dir with --resume names their new place (they must hash the same).
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "MNIST").symlink_to(mnist_root / "MNIST", target_is_directory=True)
    (run / "result.json").unlink()
    assert main(["train", "--resume", str(run), "--data-dir", str(moved)]) == 0
    assert read_from[-1] == str(moved)


def test_output_to_a_reader_that_has_gone_ends_quietly_as_sigpipe_would() -> None:
    """`mnist-resnet pretrained | head -1`: no traceback when the pipe closes early."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before a byte is written: every write fails
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mnist_resnet", "pretrained"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")
