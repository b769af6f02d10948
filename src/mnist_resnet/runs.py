"""Run directories: their names, the run and checkpoint a resume starts from, the configs a run
saved, and the check that a run directory can hold the run before training starts."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

from mnist_resnet.checkpoint import latest_loadable, load_checkpoint, run_checkpoints
from mnist_resnet.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    dataset_label,
    from_dict,
)
from mnist_resnet.errors import TrainingError
from mnist_resnet.files import prove_writable
from mnist_resnet.settings import flag_of


def default_run_name(preset: str, cfg: DataConfig, train_cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{preset}-{dataset_label(cfg.dataset)}-s{train_cfg.seed}-{stamp}"


def find_resume_checkpoint(target: Path) -> Path:
    """`target` is a checkpoint file or a run directory; return the newest loadable checkpoint."""
    if target.is_file():
        return target
    if not target.is_dir():
        raise TrainingError(f"--resume: {target} is neither a run directory nor a checkpoint")
    found = latest_loadable(run_checkpoints(target))
    if found is None:
        raise TrainingError(f"no loadable checkpoint under {target}/checkpoints to resume from")
    return found[0]


def check_run_dir(run_dir: Path, checkpoint_bytes: int, copies: int) -> None:
    """Fail before training, not after an hour, when the run directory cannot hold the run."""
    try:
        prove_writable(run_dir)
    except OSError as e:
        raise TrainingError(
            f"cannot write to run directory {run_dir}: {e.strerror or e}; choose another --runs-dir"
        ) from e
    free = shutil.disk_usage(run_dir).free
    needed = checkpoint_bytes * copies + (16 << 20)
    if free < needed:
        raise TrainingError(
            f"only {free >> 20} MB free under {run_dir}; this run needs about {needed >> 20} MB "
            "for its checkpoints. Free some space or choose another --runs-dir"
        )


# What a resumed run may be told anew besides where its data is: how this machine runs it. What
# it learns (model, recipe, data and its split) stays the run's own.
RESUME_MACHINE = ("threads", "accel", "log_interval", "keep_last", "checkpoint_steps")
# Where the run and its data are: said by --resume and --data-dir themselves.
_RESUME_PLACES = {"TrainConfig": {"runs_dir"}, "DataConfig": {"data_dir"}}


def resumed_with(
    saved: tuple[ModelConfig, TrainConfig, DataConfig],
    asked: tuple[ModelConfig, TrainConfig, DataConfig],
    given: dict[str, set[str]],
    presets: tuple[str, str] = ("", ""),
) -> TrainConfig:
    """A resumed run's saved TrainConfig with this machine's settings among those `given` on
    the command line (`asked` holds their values; `presets`, the run's and the asked-for one,
    compared when `given["run"]` holds "preset"); any other given setting must equal the run's
    own, or the resume is refused rather than silently ignoring it."""
    differing = []
    if "preset" in given.get("run", set()) and presets[0] != presets[1]:
        differing.append(f"--preset (the run has {presets[0]!r})")
    for own, wanted in zip(saved, asked, strict=True):
        name = type(own).__name__
        for f in dataclasses.fields(cast(Any, own)):
            if f.name not in given.get(name, set()) or f.name in _RESUME_PLACES.get(name, set()):
                continue
            if name == "TrainConfig" and f.name in RESUME_MACHINE:
                continue
            if getattr(own, f.name) != getattr(wanted, f.name):
                differing.append(f"{flag_of(f)} (the run has {getattr(own, f.name)!r})")
    if differing:
        raise ConfigError(
            f"--resume continues a run with its own settings: {'; '.join(differing[:4])}; start "
            "a new run to change them (--threads, --no-accel and --data-dir may change)"
        )
    train_cfg = saved[1]
    machine = {k: getattr(asked[1], k) for k in RESUME_MACHINE if k in given.get("TrainConfig", ())}
    return dataclasses.replace(train_cfg, **machine)


def saved_configs(
    saved: object, preset: str, data_dir: str | None, *, source: Path
) -> tuple[str, ModelConfig, TrainConfig, DataConfig]:
    """The configs a run saved (in `source`: config.json or a checkpoint), with its own data
    folder, or `data_dir` when one is given: the verified files may have moved."""
    try:
        if not isinstance(saved, dict):
            raise ConfigError(f"expected a mapping of configs, got {type(saved).__name__}")
        data = saved.get("data")
        if not isinstance(data, dict):
            raise ConfigError("DataConfig: missing")
        configs = (
            str(saved.get("preset", preset)),
            from_dict(ModelConfig, saved.get("model")),
            from_dict(TrainConfig, saved.get("train")),
            from_dict(DataConfig, data if data_dir is None else {**data, "data_dir": data_dir}),
        )
    except ConfigError as e:
        raise TrainingError(
            f"{source}: the run's saved configs are damaged ({e}); start a new run instead"
        ) from e
    return configs


def read_run_config(run_dir: Path) -> object:
    """The run directory's config.json, parsed; a damaged file is one TrainingError line."""
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TrainingError(
            f"{path} cannot be read ({type(e).__name__}: {str(e)[:80]}); start a new run instead"
        ) from e


def never_checkpointed(target: Path) -> bool:
    return (
        target.is_dir()
        and (target / "config.json").is_file()
        and not (target / "metrics.jsonl").exists()
        and not run_checkpoints(target)
    )


def load_resume(target: Path) -> tuple[Path, dict[str, Any]]:
    ckpt = find_resume_checkpoint(target)
    return ckpt, load_checkpoint(ckpt)


def new_run_dir(preset: str, train_cfg: TrainConfig, data_cfg: DataConfig) -> Path:
    name = train_cfg.name or default_run_name(preset, data_cfg, train_cfg)
    run_dir = Path(train_cfg.runs_dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise TrainingError(
            f"run directory {run_dir} already holds a run; pass --resume {run_dir} to "
            "continue it or choose another --name"
        )
    return run_dir


def resume_target(value: str, runs_dir: str) -> Path:
    """What `--resume` names: its PATH, or without one ("latest") the run under `runs_dir` that
    checkpointed last."""
    if value != "latest":
        return Path(value)
    runs = sorted(Path(runs_dir).glob("*/checkpoints"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(f"--resume: no run with checkpoints under {runs_dir}/")
    return runs[-1].parent
