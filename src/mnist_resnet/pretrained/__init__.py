"""Models shipped inside the package: `predict`, `serve`, `evaluate` and `export` work right
after `pip install`, with no data, no network and no training.

Each model is a run of `mnist-resnet train` with a recorded recipe (`RECIPES`), packaged by
`package` (the optimizer and resume state dropped, what checkpoint validation needs kept) and
pinned here by SHA-256: a file that does not match its pin is refused before it is opened, and
is then loaded like any other checkpoint (`checkpoint.load_model`, with all its checks). The
measured accuracy, recipe, date and the command that remakes a model are data, kept in
`<name>.json` beside its weights (as torchvision keeps them in its Weights' `meta`).
`make pretrained` retrains both from their recipes and packages them again.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mnist_resnet.config import (
    PREPROCESS_INPUTS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    default_data_dir,
    from_dict,
    preset,
)
from mnist_resnet.errors import UserError, printable
from mnist_resnet.files import hash_file, temp_beside

NAMES = ("mnist", "fashion-mnist")
DEFAULT = "mnist"
FOLDER = Path(str(resources.files(__name__)))
# The SHA-256 of each shipped file; `mnist-resnet pretrained package` prints the line to put
# here. tests/test_pretrained.py checks that file, pin and <name>.json agree.
SHA256: dict[str, str] = {
    "mnist": "3582bda7aa8e5d33fef1da4b761ce3f8f90e8527577dd91e9f19e8a88819f369",
    "fashion-mnist": "9a444a7fd77c6da3d002963de1e40099403ce3aa92e9a5a40b1b842679247189",
}
# Settings that say where or how fast a run went, not what it learned: ignored when a run is
# compared with its recipe, and the paths replaced in the shipped config.
MACHINE_FIELDS = {
    "train": {
        "runs_dir",
        "name",
        "amp",
        "accel",
        "threads",
        "log_interval",
        "save_model",
        "keep_last",
        "checkpoint_steps",
        "compile",
        "compile_mode",
        "device_data",
        "deterministic",
    },
    "data": {"data_dir"},
}
# What inference and checkpoint validation read; the rest (optimizer, schedule, weight average,
# RNG and mid-epoch state) only serves a resume.
KEPT = ("config", "model", "epoch", "data_hashes", "normalization", "class_names", "test", "best")


class PretrainedError(UserError):
    """A shipped model is unknown, missing or not the file that was pinned."""


@dataclass(frozen=True)
class Recipe:
    preset: str
    dataset: str
    seed: int
    # Settings on top of the preset, as (config, field, value), and the flags that give them.
    overrides: tuple[tuple[str, str, Any], ...] = ()
    flags: str = ""

    @property
    def command(self) -> str:
        return " ".join(
            part
            for part in (
                f"mnist-resnet train --preset {self.preset} --dataset {self.dataset}",
                f"--seed {self.seed}",
                self.flags,
            )
            if part
        )

    def configs(self) -> dict[str, dict[str, Any]]:
        """The model, train and data configs this recipe trains with, as dicts."""
        chosen = preset(self.preset)
        configs = {
            "model": dataclasses.asdict(chosen.model),
            "train": dataclasses.asdict(dataclasses.replace(chosen.train, seed=self.seed)),
            "data": dataclasses.asdict(
                dataclasses.replace(chosen.data or DataConfig(), dataset=self.dataset)
            ),
        }
        for part, key, value in self.overrides:
            configs[part][key] = value
        return configs


RECIPES = {
    "mnist": Recipe("best", "mnist", 1),
    # 8 of the preset's 15 epochs: the shipped model was trained on a shared 2-core machine.
    "fashion-mnist": Recipe(
        "best", "fashion-mnist", 1, overrides=(("train", "epochs", 8),), flags="--epochs 8"
    ),
}


def _known(name: str) -> Recipe:
    if name not in RECIPES:
        raise PretrainedError(f"unknown pretrained model {name!r}; choose {', '.join(NAMES)}")
    return RECIPES[name]


def weights_path(name: str, folder: Path | None = None) -> Path:
    """The shipped checkpoint `name`, after checking it is the very file that was pinned."""
    _known(name)
    path = (folder or FOLDER) / f"{name}.pt"
    pinned = SHA256.get(name)
    if pinned is None:
        raise PretrainedError(
            f"this build of mnist-resnet ships no pretrained {name} model; "
            "give a checkpoint, or run `make pretrained` in a source checkout"
        )
    if not path.is_file():
        raise PretrainedError(f"{path} is missing from the installed package; reinstall it")
    if hash_file(path) != pinned:
        raise PretrainedError(
            f"{path} is not the file this version pins (SHA-256 differs: damaged or replaced); "
            "reinstall mnist-resnet"
        )
    return path


# The metadata fields that are shown, and their types; a field of another type (an edited or
# damaged file) is left out rather than crash the listing.
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "classes": list,
    "recipe": str,
    "command": str,
    "trained": str,
    "test_accuracy": float,
    "bytes": int,
}


def metadata(name: str, folder: Path | None = None) -> dict[str, Any]:
    """What `package` recorded about a shipped model (an empty dict if its file is absent);
    the fields in `META_TYPES` only when they have their type (classes: a list of strings)."""
    _known(name)
    try:
        meta = json.loads(((folder or FOLDER) / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    odd = [
        key
        for key, kind in META_TYPES.items()
        if key in meta
        and (
            not isinstance(meta[key], kind)
            or isinstance(meta[key], bool)
            or (key == "classes" and not all(isinstance(c, str) for c in meta[key]))
        )
    ]
    return {key: value for key, value in meta.items() if key not in odd}


def describe(name: str, folder: Path | None = None) -> str:
    """One line: which shipped model, and how good it is."""
    meta = metadata(name, folder)
    accuracy = meta.get("test_accuracy")
    measured = f", {accuracy:.2%} test accuracy" if isinstance(accuracy, float) else ""
    return f"the pretrained {name} model ({printable(meta.get('recipe', 'shipped'))}{measured})"


# ----------------------------------------------------------------------------- packaging


@dataclass(frozen=True)
class Packaged:
    path: Path
    sha256: str
    size: int
    meta: dict[str, Any]


def recipe_differences(config: object, recipe: Recipe) -> list[str]:
    """Settings of a run's saved config that differ from its recipe (machine settings aside)."""
    expected = recipe.configs()
    saved = config if isinstance(config, dict) else {}
    found = []
    if saved.get("preset") != recipe.preset:
        found.append(f"preset {saved.get('preset')!r} (recipe: {recipe.preset})")
    parts = {
        "model": dataclasses.asdict(from_dict(ModelConfig, saved.get("model", {}))),
        "train": dataclasses.asdict(from_dict(TrainConfig, saved.get("train", {}))),
        "data": dataclasses.asdict(from_dict(DataConfig, saved.get("data", {}))),
    }
    for part, values in parts.items():
        for key, want in expected[part].items():
            if key not in MACHINE_FIELDS.get(part, ()) and values.get(key) != want:
                found.append(f"{part}.{key} {values.get(key)!r} (recipe: {want!r})")
    return found


def package(
    run_dir: Path,
    name: str,
    *,
    out_dir: Path | None = None,
    data_dir: Path | None = None,
    recipe: Recipe | None = None,
    log: Callable[[str], None] = print,
) -> Packaged:
    """Write `<out_dir>/<name>.pt` and `<name>.json` from a finished run of `name`'s recipe.

    The run must have used the recipe (its saved configs are compared, machine settings
    aside), and its selected model is measured once more on the test set in fp32 on the CPU,
    as `predict` and `serve` run it.
    """
    from mnist_resnet.checkpoint import load_checkpoint, save_checkpoint

    recipe = recipe or _known(name)
    out_dir = out_dir or FOLDER
    best, result_file = run_dir / "best.pt", run_dir / "result.json"
    if not result_file.is_file():
        raise PretrainedError(f"{run_dir} holds no finished run (no result.json)")
    state = load_checkpoint(best)
    differences = recipe_differences(state["config"], recipe)
    if differences:
        raise PretrainedError(
            f"{run_dir} was not trained with the {name} recipe ({recipe.command}): "
            + "; ".join(differences[:4])
        )
    if not isinstance(state.get("test"), dict):
        raise PretrainedError(f"{best} holds no test result: not the final best.pt of a run")
    shipped = {key: state[key] for key in KEPT if key in state}
    config = json.loads(json.dumps(state["config"]))
    # This machine's paths mean nothing elsewhere: the ones `make pretrained` uses instead.
    config["data"]["data_dir"] = "data"
    config["train"].update(runs_dir="runs/pretrained", name=name)
    shipped["config"] = config
    trained = datetime.datetime.fromtimestamp(result_file.stat().st_mtime, datetime.UTC)
    meta: dict[str, Any] = {
        "name": name,
        "dataset": recipe.dataset,
        "classes": list(state.get("class_names", [])),
        "recipe": f"{recipe.preset} preset{' ' + recipe.flags if recipe.flags else ''}, "
        f"seed {recipe.seed}",
        # The preset's own words, and what this model's recipe changed in it.
        "description": preset(recipe.preset).description
        + (f"; here with {recipe.flags}" if recipe.flags else ""),
        "command": recipe.command,
        "remake": "make pretrained",
        "trained": trained.date().isoformat(),
        "best_epoch": state.get("epoch"),
        # As the run measured it once, in the precision it trained in (`evaluate` repeats it).
        "test_accuracy": float(state["test"]["accuracy"]),
        "test_loss": float(state["test"]["loss"]),
    }
    shipped["pretrained"] = meta
    out, meta_file = out_dir / f"{name}.pt", out_dir / f"{name}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both files are staged beside their final names and measured there; the package's own
    # files are replaced only once everything passed, so a failed or interrupted packaging
    # leaves the previous model, its metadata and its pin in agreement.
    with temp_beside(out) as staged, temp_beside(meta_file) as staged_meta:
        save_checkpoint(staged, shipped)
        record = _measured(staged, meta, data_dir, log)
        record.update(file=out.name, bytes=staged.stat().st_size, sha256=hash_file(staged))
        staged_meta.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(staged, out)
        os.replace(staged_meta, meta_file)
    sha, size = record["sha256"], record["bytes"]
    return Packaged(out, sha, size, record)


def _measured(
    path: Path, meta: dict[str, Any], data_dir: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """`meta` with what the checkpoint at `path` measures on the test set in fp32 on the CPU,
    as `predict` and `serve` run it, after it passed the checks any checkpoint must pass."""
    from mnist_resnet import data
    from mnist_resnet.checkpoint import load_model
    from mnist_resnet.evaluate import evaluate
    from mnist_resnet.posthoc import fit, metadata_record
    from mnist_resnet.precision import make_runtime

    loaded = load_model(path)
    splits = data.load_data(
        dataclasses.replace(loaded.data_config, data_dir=str(data_dir or default_data_dir())),
        log=log,
    )
    runtime = make_runtime(accel=False, amp=False, channels_last=False)
    fp32 = evaluate(
        runtime.prepare_model(loaded.model),
        splits.test_images,
        splits.test_labels,
        mean=loaded.mean,
        std=loaded.std,
        runtime=runtime,
    )
    preparation = loaded.data_config.preparation
    return {
        **meta,
        # The card says what pictures the model is for: predict and serve prepare them so.
        "preprocess": preparation,
        "inputs": PREPROCESS_INPUTS[preparation],
        "test_images": len(splits.test_labels),
        "fp32_cpu_test_accuracy": fp32.accuracy,
        "parameters": sum(
            t.numel()
            for key, t in loaded.state["model"].items()
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        ),
        # Temperature and out-of-distribution detector (docs/calibration.md): data beside the
        # pinned file, used when loading it (checkpoint.posthoc_data).
        **metadata_record(fit(loaded, splits, log=log)),
    }
