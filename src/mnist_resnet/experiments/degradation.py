"""The degradation problem (He et al. 2015, Fig. 1 and 6): plain vs residual nets of each depth.

Every (kind, depth, seed) is one *member run* in `<exp_dir>/<kind>-<depth>-s<seed>/`, trained with
the identical recipe through training's own loop (`loop.train_one_epoch`, `step.train_step`),
whose hooks record every step. A finished member leaves `history.json` (written atomically) and
is reused by a re-run; an unfinished one resumes its `TrainState` from its last per-epoch
`checkpoint.pt`. Batch order is a function of (seed, epoch) and nothing else is random
after initialisation, so a resumed member repeats the epochs an uninterrupted one would run.

One file for one study (its members, their resume, the table and the figures); at a little over
500 lines it reads top to bottom like the experiment it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mnist_resnet import data, plots
from mnist_resnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mnist_resnet.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    default_data_dir,
    to_dict,
)
from mnist_resnet.evaluate import evaluate
from mnist_resnet.experiments import KINDS, DegradationConfig
from mnist_resnet.files import atomic_write_text
from mnist_resnet.images import to_float
from mnist_resnet.loop import Hooks, TrainState, train_one_epoch
from mnist_resnet.model import ResNet, build_model
from mnist_resnet.optim import make_optimizer, make_scheduler
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import Runtime, configure_threads
from mnist_resnet.step import NonFiniteLoss, train_step

Log = Callable[[str], None]

FORMAT_VERSION = 1
# Each finished member's weights, loadable like any checkpoint (predict, evaluate, explain).
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class Member:
    kind: str
    depth: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.depth}-s{self.seed}"


def members(cfg: DegradationConfig) -> list[Member]:
    """Shallow first, so a killed run has the cheap members done and the figure fills in."""
    depths = sorted(cfg.depths)
    seeds = range(1, cfg.seeds + 1)
    return [Member(k, d, s) for s in seeds for d in depths for k in KINDS]


@dataclass(frozen=True)
class ExperimentResult:
    exp_dir: Path
    rows: list[dict[str, Any]]
    trained: list[str]
    reused: list[str]
    seconds: float

    def lines(self) -> list[str]:
        """What `mnist-resnet experiment degradation` reports: the files, the work, the answer."""
        deepest = max(r["depth"] for r in self.rows)
        error = {r["kind"]: r["train_error"]["mean"] for r in self.rows if r["depth"] == deepest}
        work = f"{len(self.trained)} runs trained, {len(self.reused)} reused"
        return [
            f"table: {self.exp_dir / 'degradation.md'}",
            f"figures: {self.exp_dir / 'degradation.png'}, {self.exp_dir / 'grad-norms.png'}",
            f"{work}, {self.seconds:.0f} s in all",
            f"residual-{deepest} train error: {error['residual']:.2%}, "
            f"plain-{deepest} train error: {error['plain']:.2%}",
        ]


# ----------------------------------------------------------------------------- small helpers


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class StageGradNorms:
    """L2 norm of each stage's parameter gradients, read by hooks inside `train_step`.

    `train_step` runs backward and the optimizer step together, so the gradients are read as
    they are accumulated (post-accumulate-grad hooks) and only on armed iterations.
    """

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        self.armed = False
        self._sums = [torch.zeros(()) for _ in stages]
        self._handles = [
            p.register_post_accumulate_grad_hook(partial(self._add, i))  # type: ignore[no-untyped-call]
            for i, stage in enumerate(stages)
            for p in stage.parameters()
        ]

    def _add(self, stage: int, param: torch.Tensor) -> None:
        if self.armed and param.grad is not None:
            self._sums[stage] += param.grad.detach().float().pow(2).sum().cpu()

    def take(self) -> list[float]:
        norms = [float(s.sqrt()) for s in self._sums]
        self._sums = [torch.zeros(()) for _ in self._sums]
        return norms

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ----------------------------------------------------------------------------- one member


def _new_history(cfg: DegradationConfig, member: Member, steps_per_epoch: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "recipe": cfg.recipe(),
        "member": dataclasses.asdict(member),
        "steps_per_epoch": steps_per_epoch,
        # One entry per iteration: the training batch's loss and error before that step's update.
        "train": {"iteration": [], "loss": [], "error": []},
        # `val_points` entries per epoch; the last of each epoch is the per-epoch value.
        "val": {"iteration": [], "error": []},
        "epochs": [],
        "grad_norms": {"stages": ["layer1", "layer2", "layer3"], "iteration": [], "norm": []},
        "diverged_at": None,
        "seconds": 0.0,
    }


def _error(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, d: data.PreparedData, rt: Runtime
) -> float:
    return evaluate(model, x, y, mean=d.mean, std=d.std, runtime=rt).error


def train_member(
    cfg: DegradationConfig,
    member: Member,
    d: data.PreparedData,
    runtime: Runtime,
    member_dir: Path,
    *,
    log: Log,
) -> dict[str, Any]:
    """Train one member (resuming from its checkpoint if one fits); return its finished history."""
    train_cfg = cfg.train_config(member.seed)
    model_cfg = ModelConfig(depth=member.depth, shortcut=member.kind == "residual")
    torch.manual_seed(member.seed)
    model = runtime.prepare_model(build_model(model_cfg))
    assert isinstance(model, ResNet)
    optimizer = make_optimizer(model, train_cfg)
    n = cfg.train_images
    steps = n // cfg.batch_size
    state = TrainState(model, optimizer, make_scheduler(optimizer, train_cfg, steps))
    val_marks = {max(1, round(steps * (k + 1) / cfg.val_points)) for k in range(cfg.val_points)}
    train_x, train_y = d.train_x[:n], d.train_y[:n]
    history = _new_history(cfg, member, steps)
    ckpt = member_dir / "checkpoint.pt"
    _resume(ckpt, history, state, log)
    probe = StageGradNorms(model.stages)

    def one_step(images_u8: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, bool]:
        images = to_float(images_u8, d.mean, d.std)
        return (*train_step(model, images, labels, optimizer, runtime), True)

    def arm(step: int) -> None:
        probe.armed = (state.epoch * steps + step - 1) % cfg.grad_every == 0

    def record(rows: list[tuple[int, float, float]]) -> None:
        for step, loss, err in rows:  # one row a step: the hooks read every step back
            iteration = state.epoch * steps + step
            _record_step(history, iteration, loss, err)
            if probe.armed:
                history["grad_norms"]["iteration"].append(iteration)
                history["grad_norms"]["norm"].append(probe.take())
            if step in val_marks:
                history["val"]["iteration"].append(iteration)
                history["val"]["error"].append(_error(model, d.val_x, d.val_y, d, runtime))
                model.train()

    hooks = Hooks(log_every=1, before_step=arm, on_log=record)
    started = time.perf_counter()
    try:
        while state.epoch < cfg.epochs:
            model.train()
            indices = data.epoch_indices(n, epoch=state.epoch, seed=member.seed)
            batches = data.batches(train_x, train_y, indices, cfg.batch_size, drop_last=True)
            try:
                train_one_epoch(state, batches, one_step, steps, hooks)
            except NonFiniteLoss as e:
                history["diverged_at"] = state.epoch * steps + e.step
                log(f"{member.name}: loss became {e.value} at iteration {history['diverged_at']}")
                break
            state.epoch += 1
            history["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            val_error = history["val"]["error"][-1]
            history["epochs"].append({"epoch": state.epoch, "val_error": val_error})
            config = {"recipe": cfg.recipe(), "member": dataclasses.asdict(member)}
            save_checkpoint(
                ckpt, {"config": config, **state.state_dict(), "history": json.dumps(history)}
            )
            log(
                f"{member.name}: epoch {state.epoch}/{cfg.epochs}, train loss "
                f"{_mean_last(history['train']['loss'], steps):.4f}, val error {val_error:.2%}, "
                f"{history['seconds']:.0f} s"
            )
    finally:
        probe.remove()
    history["seconds"] += time.perf_counter() - started
    eval_n = min(cfg.train_eval_images, n)
    history["final"] = {
        "train_error": _error(model, train_x[:eval_n], train_y[:eval_n], d, runtime),
        "val_error": _error(model, d.val_x, d.val_y, d, runtime),
        "test_error": _error(model, d.test_x, d.test_y, d, runtime),
    }
    # The final weights as a model file that `predict` and `explain` read, so the story can
    # show what a plain and a residual net of one depth look at (docs/degradation.md).
    save_checkpoint(
        member_dir / MODEL_FILE,
        {
            "config": {
                "preset": "custom",
                "model": to_dict(model_cfg),
                "train": to_dict(train_cfg),
                "data": to_dict(DataConfig(dataset=cfg.dataset, data_dir="data", augment=False)),
            },
            "model": model.state_dict(),
            "epoch": state.epoch,
            "data_hashes": d.hashes,
            "normalization": {"mean": d.mean, "std": d.std},
            "class_names": list(d.class_names),
        },
    )
    write_json(member_dir / "history.json", history)
    ckpt.unlink(missing_ok=True)
    return history


def _record_step(history: dict[str, Any], iteration: int, loss: float, err: float) -> None:
    history["train"]["iteration"].append(iteration)
    history["train"]["loss"].append(_finite(loss))
    history["train"]["error"].append(err)


def _mean_last(values: list[float | None], count: int) -> float:
    tail = [v for v in values[-count:] if v is not None]
    return sum(tail) / max(1, len(tail))


def _resume(ckpt: Path, history: dict[str, Any], state: TrainState, log: Log) -> None:
    """Restore a member killed mid-way; a checkpoint of another config is ignored."""
    if not ckpt.exists():
        return
    try:
        saved = load_checkpoint(ckpt)
    except CheckpointError as e:
        log(f"ignoring {ckpt}: {e}")
        return
    expected = {"recipe": history["recipe"], "member": history["member"]}
    if saved["config"] != expected:
        log(f"ignoring {ckpt}: written by a different configuration")
        return
    state.load_state_dict(saved)
    history.clear()
    history.update(json.loads(saved["history"]))
    log(f"{ckpt.parent.name}: resumed after epoch {state.epoch}")


def _finished_history(path: Path, cfg: DegradationConfig, member: Member) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        history: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fits = (
        history.get("format_version") == FORMAT_VERSION
        and history.get("recipe") == cfg.recipe()
        and history.get("member") == dataclasses.asdict(member)
        and "final" in history
    )
    return history if fits else None


# ----------------------------------------------------------------------------- the experiment


def experiment_dir(cfg: DegradationConfig, runs_dir: str = "", name: str = "") -> Path:
    if name and (Path(name).name != name or name in (".", "..")):
        raise ConfigError(f"--name {name!r} must be a plain folder name, not a path")
    return Path(runs_dir or TrainConfig().runs_dir) / (name or f"degradation-{cfg.dataset}")


def _check_experiment(exp_dir: Path, cfg: DegradationConfig, hashes: dict[str, str]) -> None:
    """Write experiment.json, or refuse when the folder holds an experiment of another config."""
    path = exp_dir / "experiment.json"
    wanted: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "recipe": cfg.recipe(),
        "data_hashes": hashes,
    }
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is unreadable ({e}); delete it or choose --name") from e
        if saved != wanted:
            old = saved.get("recipe", {}) if isinstance(saved, dict) else {}
            diff = [k for k in wanted["recipe"] if old.get(k) != wanted["recipe"][k]]
            what = ", ".join(f"{k} {old.get(k)!r} -> {wanted['recipe'][k]!r}" for k in diff)
            raise ConfigError(
                f"{exp_dir} holds an experiment with a different configuration "
                f"({what or 'data files or format'}); pass another --name or delete that folder"
            )
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, wanted)


def run(
    cfg: DegradationConfig,
    *,
    data_dir: str = "",
    runs_dir: str = "",
    name: str = "",
    threads: int = 0,
    log: Log = print,
) -> ExperimentResult:
    """Train every missing member, then write the table (.md/.json) and both figures."""
    cfg.validate()
    exp_dir = experiment_dir(cfg, runs_dir, name)  # a bad --name fails before any work
    started = time.perf_counter()
    configure_threads(threads)
    runtime = make_runtime(accel=True, amp=None, channels_last=True)
    d = data.prepare_data(
        DataConfig(dataset=cfg.dataset, data_dir=data_dir or default_data_dir(), augment=False),
        log=log,
    )
    if cfg.train_images > len(d.train_x) or cfg.val_images > len(d.val_x):
        raise ConfigError(
            f"{cfg.dataset} has {len(d.train_x)} training and {len(d.val_x)} validation images; "
            f"asked for {cfg.train_images} and {cfg.val_images}"
        )
    test_n = cfg.test_images or len(d.test_x)
    d = dataclasses.replace(
        d,
        val_x=d.val_x[: cfg.val_images],
        val_y=d.val_y[: cfg.val_images],
        test_x=d.test_x[:test_n],
        test_y=d.test_y[:test_n],
    )
    _check_experiment(exp_dir, cfg, d.hashes)
    log(
        f"degradation experiment in {exp_dir}: {cfg.dataset}, {cfg.train_images} training images, "
        f"depths {list(cfg.depths)}, {cfg.epochs} epochs, {cfg.seeds} seed(s), "
        f"{runtime.describe()}"
    )
    histories: dict[Member, dict[str, Any]] = {}
    trained, reused = [], []
    for member in members(cfg):
        member_dir = exp_dir / member.name
        done = _finished_history(member_dir / "history.json", cfg, member)
        if done is not None:
            log(f"{member.name}: reusing the finished run")
            reused.append(member.name)
        else:
            member_dir.mkdir(exist_ok=True)
            done = train_member(cfg, member, d, runtime, member_dir, log=log)
            trained.append(member.name)
            log(
                f"{member.name}: train error {done['final']['train_error']:.2%}, "
                f"test error {done['final']['test_error']:.2%}, {done['seconds']:.0f} s"
            )
        histories[member] = done
    rows = summarize(cfg, histories)
    write_json(exp_dir / "degradation.json", {"config": cfg.to_json(), "rows": rows})
    (exp_dir / "degradation.md").write_text(format_table(cfg, rows))
    plot_errors(cfg, histories, exp_dir / "degradation.png")
    plot_grad_norms(cfg, histories, exp_dir / "grad-norms.png")
    return ExperimentResult(exp_dir, rows, trained, reused, time.perf_counter() - started)


# ----------------------------------------------------------------------------- table


METRICS = ("train_error", "val_error", "test_error")


def summarize(
    cfg: DegradationConfig, histories: dict[Member, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (kind, depth): each final error's per-seed values, mean and sample std."""
    rows = []
    for kind in KINDS:
        for depth in sorted(cfg.depths):
            runs = [h for m, h in histories.items() if (m.kind, m.depth) == (kind, depth)]
            row: dict[str, Any] = {"kind": kind, "depth": depth, "seeds": len(runs)}
            for metric in METRICS:
                values = [h["final"][metric] for h in runs]
                row[metric] = {
                    "values": values,
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
            row["diverged"] = sum(h["diverged_at"] is not None for h in runs)
            row["seconds"] = sum(h["seconds"] for h in runs)
            rows.append(row)
    return rows


def _pct(stat: dict[str, Any], seeds: int) -> str:
    if seeds > 1:
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}%"
    return f"{100 * stat['mean']:.2f}%"


def format_table(cfg: DegradationConfig, rows: list[dict[str, Any]]) -> str:
    seeds = f"mean ± std over {cfg.seeds} seeds" if cfg.seeds > 1 else "one seed"
    lines = [
        f"Final error after {cfg.epochs} epochs on {cfg.dataset} ({cfg.train_images} training "
        f"images; {seeds}). Train error: the first "
        f"{min(cfg.train_eval_images, cfg.train_images)} training images in eval mode; validation: "
        f"{cfg.val_images} held-out training images; test: "
        f"{cfg.test_images or 'all the'} test images.",
        "",
        "| net | depth | train error | validation error | test error | training time |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_pct(row[m], row["seeds"]) for m in METRICS]
        note = f" (diverged: {row['diverged']})" if row["diverged"] else ""
        lines.append(
            f"| {row['kind']}{note} | {row['depth']} | {' | '.join(cells)} "
            f"| {row['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def _smooth(
    xs: Sequence[int], ys: Sequence[float | None], window: int
) -> tuple[list[float], list[float]]:
    """Moving average of per-batch values (one batch's error is too noisy to read)."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if len(points) < window or window <= 1:
        return [float(x) for x, _ in points], [float(y) for _, y in points]
    out_x, out_y = [], []
    total = sum(y for _, y in points[:window])
    for i in range(window - 1, len(points)):
        if i >= window:
            total += points[i][1] - points[i - window][1]
        out_x.append(float(points[i - window // 2][0]))
        out_y.append(total / window)
    return out_x, out_y


def _band(
    runs: list[dict[str, Any]], part: str, key: str, window: int = 1
) -> tuple[list[float], list[float], list[float]]:
    """A curve (each seed's moving average over `window` points) as its mean over seeds and
    their sample std (0 for one seed), on the iterations every seed reached."""
    curves = [_smooth(h[part]["iteration"], h[part][key], window) for h in runs]
    length = min(len(ys) for _, ys in curves)
    means, stds = [], []
    for i in range(length):
        values = [ys[i] for _, ys in curves]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return curves[0][0][:length], means, stds


def plot_errors(cfg: DegradationConfig, histories: dict[Member, dict[str, Any]], out: Path) -> None:
    """Training error (thin, smoothed) and validation error (bold) vs iteration, like Fig. 6."""
    plt = plots.pyplot()
    depths = sorted(cfg.depths)
    colours = plt.get_cmap("viridis")(
        [0.85 - 0.8 * i / max(1, len(depths) - 1) for i in range(len(depths))]
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    top = 0.0
    for ax, kind in zip(axes, KINDS, strict=True):
        for depth, colour in zip(depths, colours, strict=True):
            runs = [h for m, h in histories.items() if (m.kind, m.depth) == (kind, depth)]
            window = max(1, runs[0]["steps_per_epoch"] // 5)
            tx, ty, ts = _band(runs, "train", "error", window)
            vx, vy, vs = _band(runs, "val", "error")
            ax.plot(tx, [100 * y for y in ty], color=colour, lw=0.9, alpha=0.9)
            name = f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}"
            ax.plot(vx, [100 * y for y in vy], color=colour, lw=2.6, marker="o", ms=3, label=name)
            if len(runs) > 1:
                # Mean ± one std over the seeds: where two depths' bands part, the seeds agree.
                for x, y, sd, alpha in ((tx, ty, ts, 0.15), (vx, vy, vs, 0.25)):
                    low = [100 * (m - d) for m, d in zip(y, sd, strict=True)]
                    high = [100 * (m + d) for m, d in zip(y, sd, strict=True)]
                    ax.fill_between(x, low, high, color=colour, alpha=alpha, lw=0)
            top = max(
                top, *(y for y in ty[len(ty) // 4 :] if math.isfinite(y)), *vy[len(vy) // 4 :]
            )
        steps = runs[0]["steps_per_epoch"]
        for epoch in range(1, cfg.epochs):
            ax.axvline(epoch * steps, color="0.85", lw=0.8, zorder=0)
        ax.set(
            xlabel="iteration",
            title=f"{'plain networks' if kind == 'plain' else 'residual networks'}",
        )
        ax.grid(alpha=0.3)
        ax.legend(title="thin: train, bold: validation", fontsize=9, title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, min(100.0, 1.25 * 100 * top + 1))
    seeds = f"mean ± std of {cfg.seeds} seeds" if cfg.seeds > 1 else "one seed"
    fig.suptitle(
        f"{cfg.dataset}, {cfg.train_images} training images, {cfg.epochs} epochs, {seeds}, "
        f"identical recipe (SGD lr {cfg.lr:g}, batch {cfg.batch_size})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


STAGE_ROLES = ("next to the input", "middle", "next to the output")


def plot_grad_norms(
    cfg: DegradationConfig, histories: dict[Member, dict[str, Any]], out: Path
) -> None:
    """Per-stage gradient norm vs iteration for plain and residual nets of the largest depth."""
    plt = plots.pyplot()
    depth = max(cfg.depths)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = ("tab:blue", "tab:orange", "tab:green")
    for ax, kind in zip(axes, KINDS, strict=True):
        runs = [h for m, h in histories.items() if (m.kind, m.depth) == (kind, depth)]
        h = runs[0]  # the first seed: seeds differ in detail, not in the picture
        xs = h["grad_norms"]["iteration"]
        norms = h["grad_norms"]["norm"]
        for stage, (name, colour) in enumerate(
            zip(h["grad_norms"]["stages"], colours, strict=True)
        ):
            ys = [row[stage] for row in norms]
            ax.plot(xs, ys, color=colour, lw=1.2, label=f"{name} ({STAGE_ROLES[stage]})")
        ax.set(
            xlabel="iteration",
            yscale="log",
            title=f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}: gradient norm per stage",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    axes[0].set_ylabel("‖gradient‖ of the stage's parameters")
    fig.suptitle(
        f"{cfg.dataset}: L2 norm of each stage's parameter gradients, read every "
        f"{cfg.grad_every} iterations (same batches for both nets)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
