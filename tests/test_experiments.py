"""The degradation experiment: outputs, table vs member histories, reuse, resume, refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mnist_resnet.checkpoint import load_model
from mnist_resnet.cli import main
from mnist_resnet.config import ModelConfig
from mnist_resnet.experiments import DegradationConfig
from mnist_resnet.experiments.degradation import (
    METRICS,
    MODEL_FILE,
    ExperimentResult,
    StageGradNorms,
    format_table,
    members,
    run,
    summarize,
)
from mnist_resnet.model import ResNet, build_model

# 4 iterations per member, a few hundred images evaluated: the whole file runs in seconds.
TINY = [
    "--dataset", "mnist", "--depths", "8", "14", "--epochs", "1", "--train-images", "512",
    "--val-images", "200", "--test-images", "500", "--batch-size", "128", "--threads", "1",
    "--seeds", "1",
]  # fmt: skip


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_tiny_experiment_writes_figures_and_table_then_reuses_members(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["experiment", "degradation", *TINY, "--data-dir", str(mnist_root)]
    argv += ["--runs-dir", str(tmp_path), "--name", "tiny"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    exp = tmp_path / "tiny"
    for name in ("degradation.png", "grad-norms.png", "degradation.md", "degradation.json"):
        assert (exp / name).stat().st_size > 0, name
    names = ["plain-8-s1", "residual-8-s1", "plain-14-s1", "residual-14-s1"]
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == sorted(names)

    # The table holds exactly what the member histories hold.
    table = json.loads((exp / "degradation.json").read_text())
    markdown = (exp / "degradation.md").read_text()
    for row in table["rows"]:
        history = json.loads(
            (exp / f"{row['kind']}-{row['depth']}-s1" / "history.json").read_text()
        )
        for metric in ("train_error", "val_error", "test_error"):
            assert row[metric]["values"] == [history["final"][metric]]
            assert row[metric]["mean"] == history["final"][metric]
        cells = f"| {row['kind']} | {row['depth']} | {100 * row['train_error']['mean']:.2f}% |"
        assert cells in markdown
        assert len(history["train"]["error"]) == history["steps_per_epoch"] == 4
        assert len(history["grad_norms"]["norm"][0]) == 3  # one norm per stage
        assert all(n > 0 for n in history["grad_norms"]["norm"][0])
        # Its weights are a model file that explain and predict read.
        model_file = exp / f"{row['kind']}-{row['depth']}-s1" / MODEL_FILE
        loaded = load_model(model_file)
        assert loaded.model_config.shortcut == (row["kind"] == "residual")
        assert loaded.model_config.depth == row["depth"]
    last = out.strip().splitlines()[-1]
    plain14 = next(r for r in table["rows"] if (r["kind"], r["depth"]) == ("plain", 14))
    assert last.startswith("residual-14 train error: ")
    assert last.endswith(f"plain-14 train error: {plain14['train_error']['mean']:.2%}")

    # A re-run trains nothing: every member is reused and its history file is untouched.
    stamps = {n: (exp / n / "history.json").stat().st_mtime_ns for n in names}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 4
    assert "0 runs trained, 4 reused" in out
    assert stamps == {n: (exp / n / "history.json").stat().st_mtime_ns for n in names}

    # Another configuration in the same folder is refused in one line.
    assert main([*argv[:-4], "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "tiny"]) == 2
    err = _error_line(capsys)
    assert "different configuration" in err and "epochs 1 -> 2" in err


def test_killed_member_resumes_from_its_epoch_checkpoint(mnist_root: Path, tmp_path: Path) -> None:
    cfg = DegradationConfig(
        dataset="mnist",
        depths=(8,),
        epochs=2,
        train_images=256,
        val_images=100,
        test_images=100,
        train_eval_images=100,
        seeds=1,
    )
    lines: list[str] = []

    def kill_after_first_epoch(line: str) -> None:
        lines.append(line)
        if "plain-8-s1: epoch 1/2" in line:
            raise KeyboardInterrupt

    def go(log: Callable[[str], None]) -> ExperimentResult:
        return run(cfg, data_dir=str(mnist_root), runs_dir=str(tmp_path), threads=1, log=log)

    with pytest.raises(KeyboardInterrupt):
        go(kill_after_first_epoch)
    assert (tmp_path / "degradation-mnist" / "plain-8-s1" / "checkpoint.pt").is_file()
    lines.clear()
    result = go(lines.append)
    assert "plain-8-s1: resumed after epoch 1" in lines
    assert "residual-8-s1: resumed after epoch 1" not in lines
    history = json.loads((result.exp_dir / "plain-8-s1" / "history.json").read_text())
    # Iterations continue across the kill with nothing repeated or lost.
    assert history["train"]["iteration"] == list(range(1, 2 * history["steps_per_epoch"] + 1))
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert not (result.exp_dir / "plain-8-s1" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--depths", "9"], "depth 9 is not valid"),
        (["--depths", "8", "8"], "repeats a depth"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_invalid_settings_give_one_line(
    flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["experiment", "degradation", *flags, "--runs-dir", str(tmp_path)]) == 2
    assert needle in _error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.numerics
def test_stage_grad_norms_match_autograd_and_read_only_when_armed() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=8, shortcut=False))
    assert isinstance(model, ResNet)
    probe = StageGradNorms(model.stages)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
    assert probe.take() == [0.0, 0.0, 0.0]
    model.zero_grad(set_to_none=True)
    probe.armed = True
    torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
    expected = [
        float(torch.cat([p.grad.flatten() for p in s.parameters()]).norm())  # type: ignore[union-attr]
        for s in model.stages
    ]
    assert probe.take() == pytest.approx(expected, rel=1e-5)
    probe.remove()


def test_members_run_shallow_first_with_both_kinds() -> None:
    names = [m.name for m in members(DegradationConfig(depths=(20, 8), seeds=2))]
    assert names[:4] == ["plain-8-s1", "residual-8-s1", "plain-20-s1", "residual-20-s1"]
    assert len(names) == 8


def test_table_gives_mean_and_sample_std_over_seeds() -> None:
    cfg = DegradationConfig(depths=(8,), seeds=2)
    errors = {1: (0.10, 0.20), 2: (0.30, 0.40)}  # seed -> (plain, residual) train error
    histories = {
        m: {
            "final": {metric: errors[m.seed][m.kind == "residual"] for metric in METRICS},
            "diverged_at": None,
            "seconds": 1.0,
        }
        for m in members(cfg)
    }
    rows = summarize(cfg, histories)
    plain = next(r for r in rows if r["kind"] == "plain")
    assert plain["train_error"]["mean"] == pytest.approx(0.20)
    assert plain["train_error"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert "| plain | 8 | 20.00 ± 14.14% |" in format_table(cfg, rows)


def test_the_figure_draws_each_curve_as_mean_with_a_band_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.axes import Axes

    from mnist_resnet.experiments.degradation import plot_errors

    cfg = DegradationConfig(depths=(8, 20), seeds=2, epochs=1)
    steps = 20

    def history(seed: int) -> dict[str, object]:
        error = [0.5 - 0.01 * i + 0.05 * seed for i in range(steps)]
        return {
            "steps_per_epoch": steps,
            "train": {"iteration": list(range(1, steps + 1)), "error": error},
            "val": {"iteration": [10, 20], "error": [0.3 + 0.1 * seed, 0.2 + 0.1 * seed]},
        }

    bands: list[list[float]] = []
    original = Axes.fill_between

    def spy(self: Axes, x: object, low: list[float], high: list[float], **kw: object) -> object:
        bands.append([h - lo for lo, h in zip(low, high, strict=True)])
        return original(self, x, low, high, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Axes, "fill_between", spy)
    plot_errors(cfg, {m: history(m.seed) for m in members(cfg)}, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0
    # Train and validation bands for 2 kinds x 2 depths; the seeds differ by 10 points of
    # validation error, so that band is 2 x 7.07 points wide (mean ± sample std).
    assert len(bands) == 8
    assert any(all(w == pytest.approx(14.14, abs=0.01) for w in b) for b in bands)
    one = DegradationConfig(depths=(8, 20), seeds=1, epochs=1)
    bands.clear()
    plot_errors(one, {m: history(m.seed) for m in members(one)}, tmp_path / "one.png")
    assert bands == []
