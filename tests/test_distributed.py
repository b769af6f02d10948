"""Data-parallel training: 2 gloo processes on 127.0.0.1 against 1 process, and resume 2 -> 1.

The 2-process run is started once per module with torch.multiprocessing.spawn, each rank with
the environment torchrun would give it and 1 thread, so the pair fits a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from mnist_resnet import cli, distributed
from mnist_resnet.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from mnist_resnet.config import DataConfig, ModelConfig, TrainConfig
from mnist_resnet.errors import TrainingError
from mnist_resnet.evaluate import evaluate, evaluate_shard
from mnist_resnet.model import build_model
from mnist_resnet.optim import lr_factor
from mnist_resnet.precision import make_runtime
from mnist_resnet.train import train

WORLD = 2
PER_RANK_BATCH = 32
LR = 0.2


def _configs(
    root: Path, runs: Path, **train_kw: Any
) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    train_cfg = TrainConfig(
        epochs=2, batch_size=PER_RANK_BATCH, lr=LR, runs_dir=str(runs), threads=1, name="ddp"
    )
    return (
        ModelConfig(depth=8),
        dataclasses.replace(train_cfg, **train_kw),
        # 3,300 train / 300 validation images: 51 steps of 64 images per epoch.
        DataConfig(data_dir=str(root), subset=0.06),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, port: int, out: str, cfgs: tuple[Any, ...]) -> None:
    """One rank, started as torchrun would start it: the rendezvous comes from the environment."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    lines: list[str] = []
    collectives: list[dict[str, Any]] = []
    real_all_reduce = torch.distributed.all_reduce

    def recorded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        config = str(torch.distributed.get_backend_config())
        collectives.append({"tensor": str(tensor.dtype), "numel": tensor.numel(),
                            "device": tensor.device.type, "backends": config})  # fmt: skip
        return real_all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = recorded  # in this rank's own process only
    result = train(*cfgs, log=lines.append)
    assert result.model is not None
    report = {
        "digest": weights_digest(result.model.state_dict()),
        "test_accuracy": result.test.accuracy,
        "test_count": result.test.count,
        "log": lines,
        "group_left": not torch.distributed.is_initialized(),
        "collectives": collectives,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def two_process_run(
    mnist_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, Any]]]:
    """2 epochs of ResNet-8 with 2 gloo ranks x batch 32 (global batch 64, peak lr 0.4)."""
    base = tmp_path_factory.mktemp("ddp")
    cfgs = _configs(mnist_root, base / "runs")
    mp.spawn(_rank_main, args=(_free_port(), str(base), cfgs), nprocs=WORLD, join=True)
    reports = [json.loads((base / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return base / "runs" / "ddp", reports


@pytest.mark.slow
def test_ranks_end_with_identical_weights(two_process_run: tuple[Path, list[Any]]) -> None:
    run_dir, reports = two_process_run
    assert reports[0]["digest"] == reports[1]["digest"]
    assert load_checkpoint(run_dir / "best.pt")["weights_sha256"] == reports[0]["digest"]
    # Test metrics are reduced over the ranks' shards: both see the whole 10,000 images.
    assert [r["test_count"] for r in reports] == [10_000, 10_000]
    assert reports[0]["test_accuracy"] == reports[1]["test_accuracy"]
    assert all(r["group_left"] for r in reports)


@pytest.mark.slow
def test_only_rank_zero_logs_and_writes_once(two_process_run: tuple[Path, list[Any]]) -> None:
    run_dir, reports = two_process_run
    assert reports[1]["log"] == []
    assert any("2 processes x batch 32 = global batch 64" in line for line in reports[0]["log"])
    assert [p.name for p in run_dir.parent.iterdir()] == ["ddp"]
    files = {p.name for p in run_dir.iterdir()} - {"tensorboard"}
    assert files == {"best.pt", "checkpoints", "config.json", "curves.png", "metrics.jsonl",
                     "result.json"}  # fmt: skip
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch-001.pt",
        "epoch-002.pt",
    ]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    state = load_checkpoint(run_dir / "checkpoints" / "epoch-002.pt")
    assert state["world_size"] == WORLD
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped module


def _carried(backends: str) -> set[str]:
    """The device kinds a process group's backend config ("cpu:gloo,cuda:nccl") reduces on."""
    return {part.split(":")[0].strip() for part in backends.split(",")}


@pytest.mark.slow
def test_ranks_agree_on_a_stop_every_log_interval_on_the_backends_device(
    two_process_run: tuple[Path, list[Any]],
) -> None:
    """Asking the ranks whether one wants to stop is a collective the host waits for: asked
    every --log-interval steps and at each epoch's end, not at every step. And every tensor a
    collective of the run reduced was on a device the group's backend carries."""
    _, reports = two_process_run
    cfg = _configs(Path("data"), Path("runs"))[1]
    started = next(line for line in reports[0]["log"] if line.startswith("training "))
    n_train = int(re.search(r"(\d+) train /", started)[1])  # type: ignore[index]
    steps = n_train // (cfg.batch_size * WORLD)
    for report in reports:
        calls = report["collectives"]
        assert calls and all(c["device"] in _carried(c["backends"]) for c in calls)
        stop_flags = [c for c in calls if (c["tensor"], c["numel"]) == ("torch.int64", 1)]
        assert len(stop_flags) == cfg.epochs * (steps // cfg.log_interval + 1)


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param("nccl", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                      reason="NCCL needs a CUDA GPU")),
        pytest.param("cpu:gloo,cuda:nccl", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="NCCL needs a CUDA GPU")),
    ],
)  # fmt: skip
def test_rank_helpers_reduce_where_the_backend_works(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`any_rank` and `all_reduce_sum` in a real group of this one process (told it has two):
    each tensor a collective gets is on a device the backend carries (an NCCL-only group gets
    its CPU tensors moved to the GPU), and the results come back as given, on the CPU."""
    dist = torch.distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.backend_for(accel=True) == "cpu:gloo,cuda:nccl"  # CPU tensors: gloo
    assert distributed.backend_for(accel=False) == "gloo"
    monkeypatch.undo()
    seen: list[str] = []
    real_all_reduce = dist.all_reduce

    def recorded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tensor.device.type)
        return real_all_reduce(tensor, *args, **kwargs)

    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_reduce", recorded)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        assert distributed.any_rank(True) is True and distributed.any_rank(False) is False
        total = distributed.all_reduce_sum(torch.tensor([1.5, 2.0], dtype=torch.float64))
        assert total.device.type == "cpu" and total.tolist() == [1.5, 2.0]
        assert len(seen) == 3 and set(seen) <= _carried(str(dist.get_backend_config()))
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


@pytest.mark.numerics
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(
    two_process_run: tuple[Path, list[Any]], mnist_root: Path, tmp_path: Path
) -> None:
    _, reports = two_process_run
    # One process, global batch 64 and the same peak lr (0.2 x 2 processes).
    single = train(
        *_configs(mnist_root, tmp_path, batch_size=WORLD * PER_RANK_BATCH, lr=WORLD * LR),
        log=lambda _: None,
    )
    assert single.test.accuracy > 0.9
    assert reports[0]["test_accuracy"] > 0.9
    assert abs(reports[0]["test_accuracy"] - single.test.accuracy) < 0.03


@pytest.mark.numerics
@pytest.mark.slow
def test_a_two_process_run_resumes_with_one(
    two_process_run: tuple[Path, list[Any]], mnist_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "ddp"
    shutil.copytree(two_process_run[0], run_dir)
    lines: list[str] = []
    resumed = train(
        *_configs(mnist_root, tmp_path / "ignored"),
        log=lines.append,
        resume=run_dir / "checkpoints" / "epoch-001.pt",
    )
    assert any("with 1 processes (saved with 2)" in line for line in lines)
    assert resumed.run_dir == run_dir and resumed.epochs_run == 2
    assert resumed.test.accuracy > 0.9
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # The schedule continues at the start of epoch 2 of a 1-process run: 103 steps of 32.
    cfg = _configs(mnist_root, tmp_path)[1]
    assert rows[1]["lr"] == pytest.approx(LR * lr_factor(103, cfg=cfg, steps_per_epoch=103))
    assert load_checkpoint(run_dir / "checkpoints" / "epoch-002.pt")["world_size"] == 1


@pytest.mark.slow
def test_mid_epoch_checkpoint_keeps_its_world_size(
    two_process_run: tuple[Path, list[Any]], mnist_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "ddp"
    shutil.copytree(two_process_run[0], run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / "epoch-001.pt")
    state["partial_epoch"] = {"step": 5, "loss_sum": 1.0, "err_sum": 1.0, "seen": 160}
    save_checkpoint(run_dir / "checkpoints" / "epoch-001-step-00005.pt", state)
    with pytest.raises(TrainingError, match="resume it with 2"):
        train(
            *_configs(mnist_root, tmp_path),
            log=lambda _: None,
            resume=run_dir / "checkpoints" / "epoch-001-step-00005.pt",
        )


@pytest.mark.numerics
def test_sharded_evaluation_of_one_process_is_the_plain_evaluation() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=8))
    runtime = make_runtime(accel=False, amp=False, channels_last=False)
    x, y = torch.randint(0, 256, (70, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (70,))
    kw: dict[str, Any] = dict(mean=0.13, std=0.31, runtime=runtime, batch_size=32)
    plain, shard = evaluate(model, x, y, **kw), evaluate_shard(model, x, y, num_classes=10, **kw)
    assert torch.equal(plain.confusion, shard.confusion)
    assert shard.accuracy == pytest.approx(plain.accuracy)
    assert shard.loss == pytest.approx(plain.loss, rel=1e-5)


def test_nproc_hands_the_command_line_to_torchrun() -> None:
    argv = ["train", "--nproc", "2", "--epochs", "3", "--nproc=4", "--name", "x"]
    rest = distributed.strip_option(argv, "--nproc")
    assert rest == ["train", "--epochs", "3", "--name", "x"]
    cmd = distributed.torchrun_command(2, rest)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == ["--standalone", "--nproc-per-node", "2", "-m", "mnist_resnet", *rest]


@pytest.mark.slow
def test_an_error_in_the_workers_is_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mnist_resnet", "train", "--nproc", "2", "--resume",
           str(tmp_path / "missing")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"mnist-resnet: error: --resume: {tmp_path / 'missing'} is neither a run directory "
        "nor a checkpoint"
    )


def test_nproc_checks_flags_before_starting_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--nproc", "2", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mnist-resnet: error: --epochs must be >= 1, got 0"
    assert cli.main(["train", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


def test_nproc_is_refused_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--nproc", "2"]) == 2
    assert "leave it out when using torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_nproc_runs_two_processes(mnist_root: Path, tmp_path: Path) -> None:
    """The convenience launcher end to end: one dry-run step on 2 ranks, one line of results."""
    cmd = [sys.executable, "-m", "mnist_resnet", "train", "--nproc", "2", "--dry-run",
           "--depth", "8", "--subset", "0.05", "--data-dir", str(mnist_root),
           "--runs-dir", str(tmp_path), "--name", "cli"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy:") == 1  # rank 0 only
    assert "2 processes x batch 128" in done.stdout
    assert (tmp_path / "cli" / "best.pt").is_file()
