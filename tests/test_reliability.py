"""Faults: kills, signals, non-finite losses, full or unwritable disks, hostile bytes, bad flags.

Each test here is listed in docs/reliability.md next to the fault it shows.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SESSION_ENV
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_resnet import data
from mnist_resnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mnist_resnet.cli import main
from mnist_resnet.config import DataConfig, ModelConfig, TrainConfig
from mnist_resnet.errors import TrainingError
from mnist_resnet.train import NonFiniteLoss, train

# A run small enough to be killed and resumed several times within a few seconds each:
# 2,750 images, 21 steps an epoch, a mid-epoch checkpoint every 4 steps; one view at test time
# (the default's five would make the final test pass cost more than the training).
SMALL = ["--depth", "8", "--epochs", "3", "--subset", "0.05", "--batch-size", "128"]
SMALL += ["--deterministic", "--threads", "1", "--checkpoint-steps", "4", "--no-amp"]
SMALL += ["--tta", "none"]


def _cli(root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "mnist_resnet", "train", *SMALL, "--data-dir", str(root)]
    return [*argv, "--runs-dir", str(runs), "--name", name, *extra]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "checkpoints" / "epoch-003.pt")
    weights: dict[str, torch.Tensor] = state["model"]
    return weights


def _all_checkpoints_load(run: Path) -> int:
    files = [p for p in run.rglob("*.pt")]
    for path in files:
        load_checkpoint(path)  # raises on any torn or partial file
    return len(files)


def _kill_after_new_checkpoints(proc: subprocess.Popen[bytes], folder: Path, count: int) -> bool:
    """SIGKILL `proc` once `count` checkpoints it wrote have appeared, or at once when a write is
    caught half-done (its temp file); False if it ended first. Waits on files, not on a clock.
    """

    def names() -> set[str]:
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    before = names()  # a temp file left by the previous kill is not a new write
    new: set[str] = set()
    while proc.poll() is None:
        now = names() - before
        new |= {n for n in now if n.endswith(".pt")}
        if len(new) >= count or any(n.endswith(".tmp") for n in now):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_exact(mnist_root: Path, tmp_path: Path) -> None:
    subprocess.run(_cli(mnist_root, tmp_path, "clean"), check=True, capture_output=True)
    argv = _cli(mnist_root, tmp_path, "killed")
    run = tmp_path / "killed"
    # Three kills, each after a few more checkpoints (or in the middle of writing one); the
    # run writes about 18 checkpoints in all, so each kill lands before it ends.
    kills = 0
    for count in (1, 2, 3):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += _kill_after_new_checkpoints(proc, run / "checkpoints", count)
        # Whatever moment the kill hit (a checkpoint write included), what is on disk loads.
        _all_checkpoints_load(run)
        argv = _cli(mnist_root, tmp_path, "killed", "--resume", str(run))
    assert kills == 3
    assert not (run / "result.json").exists()
    subprocess.run(argv, check=True, capture_output=True)
    assert (run / "result.json").exists(), "run never completed"
    clean, resumed = _final_weights(tmp_path / "clean"), _final_weights(run)
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_and_exits_130(mnist_root: Path, tmp_path: Path) -> None:
    argv = _cli(mnist_root, tmp_path, "sigint")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until an epoch has been trained and the next one begun
        if line.startswith("epoch 1/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"--resume {tmp_path / 'sigint'}" in err
    assert "Traceback" not in err
    saved = list((tmp_path / "sigint" / "checkpoints").glob("epoch-*.pt"))
    assert saved, "no checkpoint written on Ctrl-C"
    done = subprocess.run(
        _cli(mnist_root, tmp_path, "sigint", "--resume", str(tmp_path / "sigint")),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("test accuracy: ")


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(mnist_root: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _cli(mnist_root, tmp_path, "twice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(b"training "):
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # the first Ctrl-C was heard: the loop will stop after its step
        if line.startswith(b"stopping after this step"):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"test accuracy" not in out  # it stopped; it did not train on to the end


def _tiny_run(
    root: Path, runs: Path, **train_kw: object
) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    # Precision fixed: these runs replace the training step, which the precision probe would
    # otherwise time (and trip over) when this session has no cached verdict yet.
    train_cfg = TrainConfig(epochs=1, runs_dir=str(runs), threads=1, amp=False, **train_kw)  # type: ignore[arg-type]
    return ModelConfig(depth=8), train_cfg, DataConfig(data_dir=str(root), subset=0.02)


def test_nonfinite_loss_leaves_weights_untouched() -> None:
    from mnist_resnet.optim import make_optimizer
    from mnist_resnet.precision import make_runtime
    from mnist_resnet.step import train_step

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    before = [p.detach().clone() for p in model.parameters()]
    runtime = make_runtime(accel=False, amp=False, channels_last=False)
    opt = make_optimizer(model, TrainConfig())
    x = torch.full((4, 1, 28, 28), float("nan"))
    with pytest.raises(NonFiniteLoss):
        train_step(model, x, torch.zeros(4, dtype=torch.long), opt, runtime)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _nan_on_third_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist_resnet.train as train_module

    real = train_module.train_step
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise NonFiniteLoss(float("nan"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "train_step", flaky)


def test_nonfinite_loss_stops_naming_the_step(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_third_call(monkeypatch)
    with pytest.raises(TrainingError, match="epoch 1, step 3"):
        train(*_tiny_run(mnist_root, tmp_path, name="nan"), log=lambda _: None)


def test_nonfinite_loss_found_later_without_a_check_per_step(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device-resident path reads losses every --log-interval steps: a NaN at step 3 is
    named when they are read (step 5 here), before anything is saved."""
    import mnist_resnet.train as train_module

    real = train_module.train_step
    calls: list[bool] = []

    def nan_third(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kwargs["check_finite"])
        loss, err = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), err

    monkeypatch.setattr(train_module, "train_step", nan_third)
    cfgs = _tiny_run(mnist_root, tmp_path, name="late", device_data=True, log_interval=5)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 3;"):
        train(*cfgs, log=lambda _: None)
    assert calls == [False] * 5  # no step waited for the verdict; the read after step 5 did
    assert not (tmp_path / "late" / "best.pt").exists()
    assert not list((tmp_path / "late").glob("checkpoints/*.pt"))


@pytest.mark.parametrize("device_data", [False, True])
def test_nonfinite_loss_skipped_under_flag(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device_data: bool
) -> None:
    # Skipping needs the verdict before the optimizer steps: the device path checks each step.
    _nan_on_third_call(monkeypatch)
    lines: list[str] = []
    cfgs = _tiny_run(
        mnist_root, tmp_path, name="skip", skip_nonfinite=True, device_data=device_data
    )
    result = train(*cfgs, log=lines.append)
    assert any("skipped step 3" in line for line in lines)
    assert result.epochs_run == 1 and (tmp_path / "skip" / "best.pt").is_file()


def test_unwritable_run_directory_fails_before_training(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the runs folder should be")
    argv = ["train", "--data-dir", str(mnist_root), "--runs-dir", str(blocker), "--subset", "0.02"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write to run directory" in err and len(err.splitlines()) == 1


def test_full_disk_is_detected_before_training(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(
        "mnist_resnet.runs.shutil.disk_usage",
        lambda path: real(path)._replace(free=1 << 20),
    )
    with pytest.raises(TrainingError, match="MB free"):
        train(*_tiny_run(mnist_root, tmp_path, name="full"), log=lambda _: None)


def test_disk_full_during_save_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "epoch-001.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1})
    good = path.read_bytes()

    def no_space(obj: object, f: io.BufferedWriter) -> None:
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mnist_resnet.checkpoint.torch.save", no_space)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "epoch": 2})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001.pt"]


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1})
    state = torch.load(path, weights_only=True)
    state["model"]["w"][0] = 42.0  # edited, then saved again without the project's writer
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


# --- hostile bytes (property-based) ----------------------------------------------------------

FAST = settings(
    max_examples=150,
    deadline=2000,
    derandomize=True,  # the same examples every CI run: a failure here is a bug, not noise
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _idx_header(magic: int, dims: list[int]) -> bytes:
    import struct

    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)


@FAST
@given(
    st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda m, dims, tail: _idx_header(m, dims) + tail,
            st.sampled_from([0x801, 0x803, 0x802, 0x80D, 0x1F8B0803, 0]),
            st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=4),
            st.binary(max_size=200),
        ),
    ),
    st.booleans(),
)
def test_idx_reader_never_crashes(tmp_path: Path, payload: bytes, gz: bool) -> None:
    import gzip

    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    try:
        out = data.read_idx(path)
    except data.DataError:
        return
    assert out.dtype == torch.uint8


@FAST
@given(st.data())
def test_checkpoint_loader_never_crashes(tmp_path: Path, draw: st.DataObject) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.arange(8.0)}, "epoch": 1})
    blob = bytearray(path.read_bytes())
    choice = draw.draw(st.sampled_from(["truncate", "flip", "random"]))
    if choice == "truncate":
        blob = blob[: draw.draw(st.integers(0, len(blob) - 1))]
    elif choice == "flip":
        for _ in range(draw.draw(st.integers(1, 8))):
            i = draw.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= draw.draw(st.integers(1, 255))
    else:
        blob = bytearray(draw.draw(st.binary(max_size=2000)))
    path.write_bytes(bytes(blob))
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return
    assert torch.equal(state["model"]["w"], torch.arange(8.0))


@FAST
@given(st.binary(max_size=3000))
def test_image_decoder_never_crashes_on_random_bytes(payload: bytes) -> None:
    from mnist_resnet import images

    try:
        image = images.decode(payload)
        pixels = images.preprocess(image)
    except images.ImageError:
        return
    assert pixels.shape == (28, 28)


@FAST
@given(
    st.integers(1, 64),
    st.integers(1, 64),
    st.sampled_from(["L", "LA", "RGB", "RGBA", "P", "I;16", "1", "F"]),
    st.integers(0, 2**32 - 1),
)
def test_preprocessing_never_crashes_on_any_mode(w: int, h: int, mode: str, seed: int) -> None:
    import numpy as np
    from PIL import Image

    from mnist_resnet import images

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    image = base.convert(mode) if mode != "I;16" else base.convert("I").convert("I;16")
    try:
        pixels = images.preprocess(image)
    except images.ImageError:
        return
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8


# --- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--epochs", "-3"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "100000"], "larger than"),
        (["--preset", "resnet-9000"], "unknown preset"),
        (["--depth", "22"], "6n+2"),
        (["--block", "bottleneck", "--depth", "22"], "9n+2"),
        (["--width", "0"], "--width"),
        (["--lr", "0"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--label-smoothing", "1"], "--label-smoothing"),
        (["--subset", "0"], "--subset"),
        (["--max-shift", "30"], "--max-shift"),
        (["--val-size", "-1"], "--val-size"),
        (["--val-size", "60000"], "validation size"),
        (["--threads", "-1"], "--threads"),
        (["--keep-last", "0"], "--keep-last"),
        (["--name", "../escape"], "--name"),
        (["--resume", "/nonexistent/run"], "--resume"),
    ],
)
def test_every_bad_flag_gets_one_clear_line(
    flags: list[str],
    needle: str,
    mnist_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["train", "--data-dir", str(mnist_root), "--runs-dir", str(tmp_path), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err


def test_argparse_type_errors_exit_2_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def _session_processes(needle: str = "mnist_resnet") -> list[int]:
    """Live processes whose command line holds `needle` and that this test session started:
    its children, and whatever carries its marker (their children, torchrun's workers, orphans
    of a killed parent). Another user's run on the same machine is not this session's to judge.
    """
    marker = f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (proc / "environ").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if needle.encode() in cmdline and (marker in environ or parent == os.getpid()):
            found.append(int(proc.name))
    return found


def test_the_leftover_check_judges_only_this_sessions_processes(tmp_path: Path) -> None:
    """A `mnist_resnet train` of someone else (not a child, without the session's marker) is
    not a leftover; one this session started is, and so is its marked orphan."""
    code = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).touch(); time.sleep(120)"
    others_env = {k: v for k, v in os.environ.items() if k != SESSION_ENV}
    # Started through a shell that exits at once: reparented, like another user's process.
    shell = 'exec "$@" >/dev/null 2>&1 & echo $!'

    def sleeper(name: str) -> list[str]:
        return [sys.executable, "-c", code, str(tmp_path / name), "mnist_resnet", "train"]

    spawn = ["sh", "-c", shell, "sh"]
    foreign = int(subprocess.run([*spawn, *sleeper("foreign")], env=others_env,
                                 capture_output=True, text=True).stdout)  # fmt: skip
    orphan = int(subprocess.run([*spawn, *sleeper("orphan")], capture_output=True).stdout)
    child = subprocess.Popen(sleeper("child"))
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / name).exists() for name in ("foreign", "orphan", "child")):
            assert time.monotonic() < deadline, "the sleepers did not start"
            time.sleep(0.01)
        found = _session_processes()
        assert child.pid in found and orphan in found
        assert foreign not in found
    finally:
        for pid in (foreign, orphan):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def test_environment_is_clean_of_test_leftovers() -> None:
    # The kill tests run children; none may survive them (runs of other sessions may). One killed
    # at the end of its test may still be going away, more slowly on a busy machine: wait for
    # that (a fresh clone's run once saw one such), not for one that stays.
    deadline = time.monotonic() + 30
    while (left := _session_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
