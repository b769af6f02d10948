"""Models shipped inside the package: `predict`, `serve`, `evaluate` and `export` work right
after `pip install`, with no data, no network and no training.

Each model is a run of `mnist-resnet train` with a recorded recipe (`RECIPES`), packaged by
`packaging.package` as `<name>.safetensors` (no pickle; the optimizer and resume state dropped;
configs,
calibration and detector in its header, so the file alone rebuilds the model) and pinned here by
SHA-256: a file that does not match its pin is refused before it is opened, and is then loaded
like any other checkpoint (`checkpoint.load_model`, with all its checks). The measured accuracy,
recipe, date, the command that remakes a model and its model card are data, kept in
`<name>.json` beside its weights (as torchvision keeps them in its Weights' `meta`) and shown in
docs/models.md. `make pretrained` retrains both from their recipes and packages them again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mnist_resnet.config import (
    ConfigError,
    DataConfig,
    preset,
)
from mnist_resnet.errors import UserError, printable
from mnist_resnet.files import hash_file

NAMES = ("mnist", "fashion-mnist")
DEFAULT = "mnist"
FOLDER = Path(str(resources.files(__name__)))
# The SHA-256 of each shipped file; `mnist-resnet pretrained package` prints the line to put
# here. tests/test_pretrained.py checks that file, pin and <name>.json agree.
SHA256: dict[str, str] = {
    "mnist": "2b126c1448d43faefcfe1bf098cb706a0f91e8d6a7012d4d16105e19173dae3f",
    "fashion-mnist": "acb89ccb0956f46218717635cd889a179b00f09f8d527943c5b7f4cb0c93fcb4",
}
SUFFIX = ".safetensors"
# What a shipped file may weigh (`package` refuses more): the package stays a small download,
# and each file one that a source repository keeps without large-file storage.
MAX_BYTES = 2_000_000
# How a shipped file may store its weights: float16 halves the bytes, int8 quarters those of
# the convs, and `load_model` widens them to float32 again (the accuracy `package` records is
# measured from the stored file).
STORAGE = ("float32", "float16", "int8")
# Where `make pretrained` trains the runs it packages.
RUNS = "runs/pretrained"
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
        # Where this machine keeps the teachers' files; how many there are is checked apart.
        "teachers",
    },
    "data": {"data_dir"},
}


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
    # The model card's words: what the model is for, and where it is known to fail.
    use: str = ""
    limits: tuple[str, ...] = ()
    # Knowledge distillation (distill.py): recipes of the runs this one learns from, trained
    # first, each in `<runs>/<dataset>-teacher-s<seed>/` (`teacher_runs`).
    teachers: tuple[Recipe, ...] = ()
    # An ensemble: recipes of the runs the shipped model averages, each trained in
    # `<runs>/<dataset>-member-s<seed>/` (`member_runs`), then packed into one model file by
    # `mnist-resnet ensemble --save` (model.stack_members). `seed` is then the first member's.
    members: tuple[Recipe, ...] = ()
    # How the seeds were chosen, for the model card.
    chosen: str = ""
    # The dtype the shipped file stores its weights in (`STORAGE`).
    storage: str = "float32"

    @property
    def teacher_runs(self) -> list[str]:
        return [f"{t.dataset}-teacher-s{t.seed}" for t in self.teachers]

    @property
    def member_runs(self) -> list[str]:
        return [f"{m.dataset}-member-s{m.seed}" for m in self.members]

    @property
    def summary(self) -> str:
        """The recipe in a few words, e.g. `best preset --epochs 8, seed 1`."""
        flags = f" {self.flags}" if self.flags else ""
        if not self.members:
            return f"{self.preset} preset{flags}, seed {self.seed}"
        seeds = ", ".join(str(m.seed) for m in self.members)
        runs = len(self.members)
        return f"average of {runs} runs of the {self.preset} preset{flags}, seeds {seeds}"

    def command_in(self, runs_dir: str) -> str:
        """The command that makes this recipe's model file, its teachers' or members' runs
        read from `runs_dir`: a train command, or for an ensemble the one that packs it."""
        if self.members:
            return " ".join(
                (
                    "mnist-resnet ensemble",
                    *(f"{runs_dir}/{run}/best.pt" for run in self.member_runs),
                    f"--split validation --save {runs_dir}/{self.dataset}/best.pt",
                )
            )
        return " ".join(
            part
            for part in (
                f"mnist-resnet train --preset {self.preset} --dataset {self.dataset}",
                f"--seed {self.seed}",
                self.flags,
                *(f"--teacher {runs_dir}/{run}/best.pt" for run in self.teacher_runs),
            )
            if part
        )

    @property
    def command(self) -> str:
        """The command that trains this model, as `make pretrained` runs it (after its
        teachers: `commands`)."""
        return self.command_in(RUNS)

    @property
    def commands(self) -> list[str]:
        """Every command that makes this model: teachers or members first."""
        return [r.command for r in (*self.teachers, *self.members)] + [self.command]

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
        if self.members:
            configs["model"]["members"] = len(self.members)
        return configs


def ensemble_of(
    base: Recipe, seeds: tuple[int, ...], chosen: str = "", storage: str = "float32"
) -> Recipe:
    """The recipe of a model that averages runs of `base` trained with `seeds`."""
    members = tuple(dataclasses.replace(base, seed=seed, use="", limits=()) for seed in seeds)
    return dataclasses.replace(base, seed=seeds[0], members=members, chosen=chosen, storage=storage)


RECIPES = {
    # One width-2 run of `best`: on the validation split better than width-1 runs and their
    # averages (docs/results.md), and at float16 a file of under 2 MB, where an average of
    # three width-2 runs is not.
    "mnist": Recipe(
        "best",
        "mnist",
        1,
        overrides=(("model", "width", 2.0),),
        flags="--width 2",
        use="reading one handwritten digit (0-9) per picture: scans, photos of paper, pen or "
        "mouse drawings, prepared MNIST-style (docs/data.md#preparing-pictures)",
        limits=(
            "one digit per picture: it does not find or split several digits, letters or words",
            "anything that is not a digit still gets a digit's name; the verdict "
            "(out_of_distribution, unsure) is the only warning, and it misses some",
            "MNIST is scanned handwriting of American census staff and students: its test "
            "accuracy holds for such scans; other pictures depend on the preparation "
            "(docs/data.md#pen-written-digits measures pen-drawn pages and photos of them)",
        ),
        chosen="seed 1 of seeds 1-3: seeds 1 and 2 tied at the lowest validation error, "
        "seed 1 had the lower validation loss at its selected epoch (0.1058 against 0.1079)",
        storage="float16",
    ),
    # Two width-2 runs of `best` with mirrored images and Cutout, averaged in one file: on the
    # validation split better than any single run (docs/results.md); in int8 two such networks
    # weigh under 2 MB, where float16 holds one.
    "fashion-mnist": ensemble_of(
        Recipe(
            "best",
            "fashion-mnist",
            1,
            overrides=(
                ("model", "width", 2.0),
                ("train", "epochs", 60),
                ("data", "flip", True),
                ("data", "erase", 10),
                ("data", "rotate", 0.0),
                ("data", "scale", 0.0),
            ),
            flags="--flip --rotate 0 --scale 0 --width 2 --erase 10 --epochs 60",
            use="sorting one Zalando-style product image (a single garment, shoe or bag on a "
            "plain background) into Fashion-MNIST's 10 classes",
            limits=(
                "clothing photos are not Fashion-MNIST scans: worn clothes, people, several "
                "items, cluttered backgrounds or unusual angles are outside what it learned "
                "(docs/data.md#preparing-pictures measures it on synthetic product photos)",
                "shirts are its weakest class, mistaken for T-shirts/tops, coats and pullovers "
                "(`mnist-resnet evaluate --pretrained fashion-mnist` draws the confusion matrix)",
                "only the 10 classes: anything else still gets one of their names, flagged at "
                "best by the verdict",
            ),
        ),
        (1, 2),
        chosen="two runs, the most whose average fits 2 MB in int8; the average of two such "
        "runs had a lower validation error than either run alone (docs/results.md)",
        storage="int8",
    ),
}


def _known(name: str) -> Recipe:
    if name not in RECIPES:
        raise PretrainedError(f"unknown pretrained model {name!r}; choose {', '.join(NAMES)}")
    return RECIPES[name]


def weights_path(name: str, folder: Path | None = None) -> Path:
    """The shipped model `name`, after checking it is the very file that was pinned."""
    _known(name)
    path = (folder or FOLDER) / f"{name}{SUFFIX}"
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
    "fp32_cpu_test_accuracy": float,
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
    """One line: which shipped model, and how good it is: the figure of its model card (the
    stored file in fp32 on the CPU, as `predict` runs it), else the one measured as trained."""
    meta = metadata(name, folder)
    accuracy = meta.get("fp32_cpu_test_accuracy", meta.get("test_accuracy"))
    measured = f", {accuracy:.2%} test accuracy" if isinstance(accuracy, float) else ""
    return f"the pretrained {name} model ({printable(meta.get('recipe', 'shipped'))}{measured})"


def catalogue() -> list[str]:
    """`mnist-resnet pretrained list`: what each shipped model is and how it was made."""
    lines = []
    for name in NAMES:
        meta, shipped = metadata(name), name in SHA256
        lines.append(f"{name}: {describe(name) if shipped else 'not shipped in this build'}")
        if shipped and meta:
            inputs = f"({meta.get('preprocess')} preparation): {meta.get('inputs')}"
            made = f"{meta.get('trained')} by: {meta.get('command')}"
            lines += [
                f"  classes: {printable(', '.join(meta.get('classes', [])))}",
                f"  inputs {printable(inputs)}",
                f"  trained {printable(made)} (make pretrained)",
                f"  {meta.get('bytes', 0):,} bytes, sha256 {SHA256[name]}",
            ]
    return lines


def pin_line(name: str, sha256: str) -> str:
    """What to do after a shipped file changed: the line that pins its new hash here."""
    return f"pin it in src/mnist_resnet/pretrained/__init__.py, in SHA256: {name!r}: {sha256!r}"


@dataclass(frozen=True)
class ModelFile:
    """The model a command runs: a checkpoint file, or a shipped model's."""

    path: Path
    pretrained: str | None  # the shipped model's name, or None for a checkpoint

    @property
    def shown(self) -> str:
        return f"the pretrained {self.pretrained} model" if self.pretrained else str(self.path)


def choose(checkpoint: Path | None, name: str | None, *, must_exist: bool = False) -> ModelFile:
    """The checkpoint given, or the shipped model `name` (without either the MNIST one, said
    in one line on stderr). `must_exist` checks the checkpoint is there."""
    if checkpoint is not None and name is not None:
        raise ConfigError(f"give a checkpoint ({checkpoint}) or --pretrained {name}, not both")
    if checkpoint is not None:
        if must_exist and not checkpoint.is_file():
            raise ConfigError(f"checkpoint not found: {checkpoint}")
        return ModelFile(checkpoint, None)
    path = weights_path(name or DEFAULT)
    hint = "" if name else " (give a checkpoint, or --pretrained fashion-mnist, to change)"
    print(f"using {describe(name or DEFAULT)}{hint}", file=sys.stderr)
    return ModelFile(path, name or DEFAULT)
