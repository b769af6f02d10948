"""Packaging a training run as a shipped model: `mnist-resnet pretrained package` and
`make pretrained`. The run's best checkpoint is checked against its recipe, evaluated on the
test set, calibrated, timed and written as `<name>.safetensors` with its `<name>.json` (model
card included) for `pretrained` to pin. It stands above predict, evaluate and calibration,
which it runs; `pretrained` itself (names, pins, metadata) stands below them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_resnet import pretrained
from mnist_resnet.config import (
    PREPROCESS_INPUTS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    default_data_dir,
    from_dict,
    preset,
)
from mnist_resnet.files import atomic_write_text, hash_file, temp_beside


@dataclass(frozen=True)
class Packaged:
    path: Path
    sha256: str
    size: int
    meta: dict[str, Any]

    def lines(self) -> list[str]:
        """What `pretrained package` reports: the files, their accuracy, the pin to write."""
        measured = (
            f"test accuracy {self.meta['test_accuracy']:.2%} as trained, "
            f"{self.meta['fp32_cpu_test_accuracy']:.2%} in fp32 on the CPU"
        )
        json_name = self.path.with_suffix(".json").name
        return [
            f"wrote {self.path} ({self.size:,} bytes) and {json_name}: {measured}",
            pretrained.pin_line(self.path.stem, self.sha256),
        ]


def recipe_differences(config: object, recipe: pretrained.Recipe) -> list[str]:
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
            if key not in pretrained.MACHINE_FIELDS.get(part, ()) and values.get(key) != want:
                found.append(f"{part}.{key} {values.get(key)!r} (recipe: {want!r})")
    teachers = len(parts["train"]["teachers"])
    if teachers != len(recipe.teachers):
        found.append(f"{teachers} teacher(s) (recipe: {len(recipe.teachers)})")
    return found


def train_recipe(
    name: str,
    runs_dir: Path,
    *,
    data_dir: Path | None = None,
    threads: int = 0,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Train `name`'s recipe in `runs_dir`: its teachers first, then the model itself, each in
    its own run folder (an ensemble: its members, then the file that averages them); a finished
    run of the same recipe is kept, a killed one resumed, one of another recipe refused.
    With `jobs` > 1, up to that many of the runs that do not need each other (the teachers, the
    members) train at once, each in its own process with an even share of the threads.
    Returns the model's run folder, ready for `package`."""
    recipe = pretrained._known(name)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise pretrained.PretrainedError(f"--jobs must be a whole number >= 1, not {jobs!r}")
    # The teachers, then the members: runs that need no other run of the recipe.
    for group in (
        zip(recipe.teachers, recipe.teacher_runs, strict=True),
        zip(recipe.members, recipe.member_runs, strict=True),
    ):
        _train_runs(
            [(run, runs_dir / folder) for run, folder in group], data_dir, threads, jobs, log
        )
    if recipe.members:
        _pack_run(recipe, runs_dir, runs_dir / name, data_dir, log)
        return runs_dir / name
    teachers = tuple(str((runs_dir / run / "best.pt").absolute()) for run in recipe.teacher_runs)
    _train_run(recipe, runs_dir / name, teachers, data_dir, threads, log)
    return runs_dir / name


def recorded_test_accuracy(run_dir: Path) -> float | None:
    """The test accuracy a finished run (or packed average) recorded in its result.json; None
    where there is no readable figure."""
    try:
        value = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))["test_accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _train_runs(
    runs: list[tuple[pretrained.Recipe, Path]],
    data_dir: Path | None,
    threads: int,
    jobs: int,
    log: Callable[[str], None],
) -> None:
    """Train runs that do not depend on each other: one after another, or with `jobs` > 1 side
    by side in processes of their own (spawned: a forked torch may hang in its thread pools).
    Each such process writes to `<run folder>.log` beside its run folder, since the progress
    bars of several runs cannot share one terminal."""
    todo = [(recipe, run_dir) for recipe, run_dir in runs if not _finished(recipe, run_dir, log)]
    side = min(jobs, len(todo))
    if side <= 1:
        for recipe, run_dir in todo:
            _train_run(recipe, run_dir, (), data_dir, threads, log)
        return
    from mnist_resnet.runtime import available_cpus

    each = max(1, (threads or available_cpus()) // side)
    logs = ", ".join(str(_side_log(run_dir)) for _, run_dir in todo)
    log(f"training {len(todo)} runs, {side} at a time with {each} thread(s) each; output: {logs}")
    work = [(recipe, run_dir, data_dir, each) for recipe, run_dir in todo]
    # Leaving the pool (an error in one run, Ctrl-C) terminates the others: every run keeps its
    # epoch checkpoints, so the next `pretrained train` resumes them.
    with multiprocessing.get_context("spawn").Pool(side, maxtasksperchild=1) as pool:
        for run_dir in pool.imap_unordered(_train_run_beside, work):
            accuracy = recorded_test_accuracy(run_dir)
            measured = f": test accuracy {accuracy:.2%}" if accuracy is not None else ""
            log(f"{run_dir}: finished{measured}")


def _side_log(run_dir: Path) -> Path:
    # Beside the run folder, not in it: a run folder that exists is a killed run to resume.
    return run_dir.with_name(f"{run_dir.name}.log")


def _train_run_beside(work: tuple[pretrained.Recipe, Path, Path | None, int]) -> Path:
    """One run of `_train_runs`, in its own process, its output appended to its log."""
    recipe, run_dir, data_dir, threads = work
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(_side_log(run_dir), "a", encoding="utf-8", buffering=1) as out,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        try:
            _train_run(recipe, run_dir, (), data_dir, threads, print)
        except Exception as error:
            print(f"error: {error}")
            raise
    return run_dir


def _finished(recipe: pretrained.Recipe, run_dir: Path, log: Callable[[str], None]) -> bool:
    """Whether `run_dir` holds a finished run of `recipe` (said in the log, and kept); a
    finished run of another recipe is refused."""
    from mnist_resnet.checkpoint import load_checkpoint

    if not (run_dir / "result.json").is_file():
        return False
    differences = recipe_differences(load_checkpoint(run_dir / "best.pt")["config"], recipe)
    if differences:
        raise pretrained.PretrainedError(
            f"{run_dir} holds a finished run of another recipe ({'; '.join(differences[:3])}"
            "); delete it, or give another --runs-dir"
        )
    log(f"{run_dir}: finished earlier with this recipe, kept")
    return True


def _train_run(
    recipe: pretrained.Recipe,
    run_dir: Path,
    teachers: tuple[str, ...],
    data_dir: Path | None,
    threads: int,
    log: Callable[[str], None],
) -> None:
    from mnist_resnet.train import train

    data_root = str((data_dir or Path(default_data_dir())).expanduser().absolute())
    if _finished(recipe, run_dir, log):
        return
    configs = recipe.configs()
    train_cfg = dataclasses.replace(
        from_dict(TrainConfig, configs["train"]),
        runs_dir=str(run_dir.parent),
        name=run_dir.name,
        threads=threads,
        teachers=teachers,
    )
    data_cfg = dataclasses.replace(from_dict(DataConfig, configs["data"]), data_dir=data_root)
    model_cfg = from_dict(ModelConfig, configs["model"])
    log(f"{run_dir}: {recipe.command_in(str(run_dir.parent))}")
    # A folder without result.json is a killed run of this recipe: go on with it.
    killed = run_dir.exists()
    train(
        model_cfg,
        train_cfg,
        data_cfg,
        preset=recipe.preset,
        log=log,
        resume=run_dir if killed else None,
        resume_data_dir=data_root if killed else None,
    )


def _pack_run(
    recipe: pretrained.Recipe,
    runs_dir: Path,
    run_dir: Path,
    data_dir: Path | None,
    log: Callable[[str], None],
) -> None:
    """Pack an ensemble recipe's trained members into `run_dir/best.pt`, with a result.json
    as a training run leaves, unless a finished one of this recipe is there."""
    from mnist_resnet.checkpoint import load_checkpoint
    from mnist_resnet.ensemble import pack

    best, result_file = run_dir / "best.pt", run_dir / "result.json"
    members = [runs_dir / run / "best.pt" for run in recipe.member_runs]
    if result_file.is_file():
        packed = load_checkpoint(best)
        differences = recipe_differences(packed["config"], recipe)
        if differences:
            raise pretrained.PretrainedError(
                f"{run_dir} holds another recipe's model ({'; '.join(differences[:3])}); "
                "delete it, or give another --runs-dir"
            )
        recorded = [m.get("sha256") for m in packed.get("members", []) if isinstance(m, dict)]
        if recorded == [hash_file(path) for path in members]:
            log(f"{run_dir}: packed earlier from these runs, kept")
            return
        log(f"{run_dir}: a member run changed since it was packed: packing again")
    log(f"{run_dir}: {recipe.command_in(str(runs_dir))}")
    run_dir.mkdir(parents=True, exist_ok=True)
    state = pack(
        members,
        best,
        data_dir=(data_dir or Path(default_data_dir())).expanduser(),
        log=log,
    )
    result = {
        "members": len(recipe.members),
        "best_val_error": state["best"]["val_error"],
        "test_accuracy": state["test"]["accuracy"],
        "test_loss": state["test"]["loss"],
    }
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")


def package(
    run_dir: Path,
    name: str,
    *,
    out_dir: Path | None = None,
    data_dir: Path | None = None,
    recipe: pretrained.Recipe | None = None,
    log: Callable[[str], None] = print,
) -> Packaged:
    """Write `<out_dir>/<name>.safetensors` and `<name>.json` from a finished run of `name`'s
    recipe.

    The run must have used the recipe (its saved configs are compared, machine settings
    aside), and its selected model is measured once more on the test set in fp32 on the CPU,
    as `predict` and `serve` run it; its calibration and detector are fitted and stored in the
    file, and its single-image speed measured for the model card.
    """
    from mnist_resnet.checkpoint import INFERENCE_KEYS, load_checkpoint, save_checkpoint

    recipe = recipe or pretrained._known(name)
    out_dir = out_dir or pretrained.FOLDER
    best, result_file = run_dir / "best.pt", run_dir / "result.json"
    if not result_file.is_file():
        raise pretrained.PretrainedError(f"{run_dir} holds no finished run (no result.json)")
    state = load_checkpoint(best)
    differences = recipe_differences(state["config"], recipe)
    if differences:
        raise pretrained.PretrainedError(
            f"{run_dir} was not trained with the {name} recipe ({recipe.command}): "
            + "; ".join(differences[:4])
        )
    if not isinstance(state.get("test"), dict):
        raise pretrained.PretrainedError(
            f"{best} holds no test result: not the final best.pt of a run"
        )
    shipped = {key: state[key] for key in INFERENCE_KEYS if key in state}
    shipped["model"] = stored_weights(state["model"], recipe.storage)
    config = json.loads(json.dumps(state["config"]))
    # This machine's paths mean nothing elsewhere: the ones `make pretrained` uses instead.
    config["data"]["data_dir"] = "data"
    config["train"].update(
        runs_dir=pretrained.RUNS,
        name=name,
        teachers=[f"{pretrained.RUNS}/{run}/best.pt" for run in recipe.teacher_runs],
    )
    shipped["config"] = config
    trained = datetime.datetime.fromtimestamp(result_file.stat().st_mtime, datetime.UTC)
    meta: dict[str, Any] = {
        "name": name,
        "dataset": recipe.dataset,
        "classes": list(state.get("class_names", [])),
        "recipe": recipe.summary,
        # The preset's own words, and what this model's recipe changed in it.
        "description": (f"{len(recipe.members)} networks averaged, each " if recipe.members else "")
        + preset(recipe.preset).description
        + (f"; here with {recipe.flags}" if recipe.flags else ""),
        "command": recipe.command,
        "remake": "make pretrained",
        "trained": trained.date().isoformat(),
        "best_epoch": state.get("epoch"),
        "weights_stored_as": recipe.storage,
        # An ensemble's members: each run's seed, selected epoch and scores on its own.
        **({"members": state["members"]} if isinstance(state.get("members"), list) else {}),
        # As the run measured it once, in the precision it trained in (`evaluate` repeats it).
        "test_accuracy": float(state["test"]["accuracy"]),
        "test_loss": float(state["test"]["loss"]),
    }
    shipped["pretrained"] = meta
    out, meta_file = out_dir / f"{name}{pretrained.SUFFIX}", out_dir / f"{name}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both files are staged beside their final names and measured there; the package's own
    # files are replaced only once everything passed, so a failed or interrupted packaging
    # leaves the previous model, its pretrained.metadata and its pin in agreement.
    with temp_beside(out) as staged, temp_beside(meta_file) as staged_meta:
        save_checkpoint(staged, shipped, safetensors=True)
        record, fitted = _measured(staged, meta, data_dir, log)
        # The calibration and detector travel in the file too: it is self-contained.
        shipped.update(calibration=fitted.calibration.as_dict(), ood=fitted.detector.as_dict())
        save_checkpoint(staged, shipped, safetensors=True)
        if staged.stat().st_size > pretrained.MAX_BYTES:
            raise pretrained.PretrainedError(
                f"{name} would be {staged.stat().st_size:,} bytes, over the "
                f"{pretrained.MAX_BYTES:,} a shipped model may weigh"
            )
        record = finish_record(staged, out.name, record, recipe)
        staged_meta.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(staged, out)
        os.replace(staged_meta, meta_file)
    sha, size = record["sha256"], record["bytes"]
    return Packaged(out, sha, size, record)


def stored_weights(weights: dict[str, Any], storage: str) -> dict[str, Any]:
    """`weights` as a shipped file stores them (`pretrained.STORAGE`): float16 rounds each
    floating tensor, refused where a value would not fit it (beyond about 65,504); int8 keeps
    each conv and linear weight as int8 with a float32 scale per output channel
    (`checkpoint.INT8_SCALE`), and the rest (batch norms, biases) in float16."""
    import torch

    from mnist_resnet.checkpoint import INT8_SCALE, int8_weight

    if storage not in pretrained.STORAGE:
        raise pretrained.PretrainedError(
            f"unknown weight storage {storage!r}; choose {', '.join(pretrained.STORAGE)}"
        )
    if storage == "float32":
        return dict(weights)
    stored = {}
    for key, tensor in weights.items():
        if storage == "int8" and tensor.is_floating_point() and tensor.dim() >= 2:
            stored[key], stored[key + INT8_SCALE] = int8_weight(tensor)
            continue
        if tensor.is_floating_point():
            half = tensor.to(torch.float16)
            if not torch.isfinite(half).all():
                raise pretrained.PretrainedError(
                    f"{key} holds values beyond float16's range: keep this model in float32"
                )
            tensor = half
        stored[key] = tensor
    return stored


def finish_record(
    path: Path, file_name: str, record: dict[str, Any], recipe: pretrained.Recipe
) -> dict[str, Any]:
    """The metadata of the finished shipped file at `path`: its size, hash and model card (with
    its speed, measured here)."""
    record = {**record, "file": file_name}
    record.update(bytes=path.stat().st_size, sha256=hash_file(path))
    record["card"] = model_card(record, recipe, single_image_speed(path))
    return record


def _measured(
    path: Path, meta: dict[str, Any], data_dir: Path | None, log: Callable[[str], None]
) -> tuple[dict[str, Any], Any]:
    """`meta` with what the checkpoint at `path` measures on the test set in fp32 on the CPU,
    as `predict` and `serve` run it, after it passed the checks any checkpoint must pass."""
    from mnist_resnet import data
    from mnist_resnet.checkpoint import INT8_SCALE, load_model
    from mnist_resnet.evaluate import evaluate_loaded
    from mnist_resnet.posthoc import fit, metadata_record
    from mnist_resnet.precision import make_runtime

    loaded = load_model(path)
    splits = data.load_data(
        dataclasses.replace(loaded.data_config, data_dir=str(data_dir or default_data_dir())),
        log=log,
    )
    runtime = make_runtime(accel=False, amp=False, channels_last=False)
    fp32 = evaluate_loaded(loaded, splits.test_images, splits.test_labels, runtime)
    preparation = loaded.data_config.preparation
    fitted = fit(loaded, splits, log=log)
    best = loaded.state.get("best") or {}
    record = {
        **meta,
        # The card says what pictures the model is for: predict and serve prepare them so.
        "preprocess": preparation,
        "inputs": PREPROCESS_INPUTS[preparation],
        "training_images": len(splits.train_labels) - loaded.data_config.val_size,
        "validation_images": loaded.data_config.val_size,
        "validation_error": best.get("val_error"),
        "test_images": len(splits.test_labels),
        "fp32_cpu_test_accuracy": fp32.accuracy,
        "parameters": sum(
            t.numel()
            for key, t in loaded.state["model"].items()
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked", INT8_SCALE))
        ),
        # Temperature and out-of-distribution detector (docs/calibration.md), as stored in the
        # file itself: shown here for readers of the card.
        **metadata_record(fitted),
    }
    return record, fitted


# ----------------------------------------------------------------------------- model cards


# How a model card names each weight storage (`stored_weights`).
STORAGE_WORDS = {
    "float16": "float16",
    "int8": "int8 with a scale per output channel, batch norms in float16",
}


def model_card(
    meta: dict[str, Any], recipe: pretrained.Recipe, speed: dict[str, Any]
) -> dict[str, Any]:
    """What the model is, how it was made and chosen, how good, sure and fast it is, and what
    it is for: from the packaging's measurements (`meta`), shown in docs/models.md."""
    calibration = meta.get("calibration") or {}
    val_error = meta.get("validation_error")
    chosen = f" ({val_error:.2%})" if isinstance(val_error, float) else ""
    selection = (
        f"the epoch with the lowest validation error, epoch {meta.get('best_epoch')}{chosen}"
        + (f"; {recipe.chosen}" if recipe.chosen else "")
    )
    members = meta.get("members")
    if isinstance(members, list) and members:
        epochs = ", ".join(str(m.get("epoch") if isinstance(m, dict) else "?") for m in members)
        selection = (
            f"each of the {len(members)} runs at its epoch with the lowest validation error "
            f"(epochs {epochs}); their average's validation error{chosen}"
            + (f"; {recipe.chosen}" if recipe.chosen else "")
        )
    return {
        "model": f"{meta.get('description')}; {meta.get('parameters', 0):,} parameters"
        + (
            f", stored as {STORAGE_WORDS.get(meta['weights_stored_as'], meta['weights_stored_as'])}"
            " (computed in float32 or bf16)"
            if meta.get("weights_stored_as", "float32") != "float32"
            else ""
        ),
        "data": f"{meta.get('dataset')}: {meta.get('training_images', 0):,} training images, "
        f"{meta.get('validation_images', 0):,} held out for validation, "
        f"{meta.get('test_images', 0):,} test images",
        "recipe": meta.get("recipe"),
        "command": meta.get("command"),
        "selection": f"{selection}; the test set was read once, after the selection",
        "test_accuracy": meta.get("fp32_cpu_test_accuracy"),
        # Every field the calibration stores (docs/calibration.md): how, on what, how much better.
        "calibration": dict(calibration),
        "speed": speed,
        "intended_use": recipe.use,
        "limits": list(recipe.limits),
    }


# A page with one drawn stroke figure, as a user photographs it: what `single_image_speed`
# prepares and answers (the preparation's cost grows with the picture, up to images.WORK_SIDE).
SPEED_PICTURE = (240, 300)
SPEED_REPEATS = 200


def single_image_speed(path: Path, repeats: int = SPEED_REPEATS) -> dict[str, Any]:
    """Median CPU latency of one image through `Classifier.predict` on one thread: a prepared
    28x28 input, and a 240x300 picture with its preparation; where it was measured."""
    import torch
    from PIL import Image, ImageDraw

    from mnist_resnet.predict import load

    clf = load(path)
    page = Image.new("RGB", SPEED_PICTURE, (245, 245, 240))
    ImageDraw.Draw(page).line(
        [(60, 70), (180, 70), (110, 250)], fill=(30, 30, 40), width=16, joint="curve"
    )
    pixels = clf.prepare(page)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_ms = _median_ms(lambda: clf.predict(pixels, preprocess=False), repeats)
        picture_ms = _median_ms(lambda: clf.predict(page), max(20, repeats // 10))
    finally:
        torch.set_num_threads(threads)
    return {
        "prepared_28x28_ms": round(model_ms, 3),
        "picture_240x300_ms": round(picture_ms, 3),
        "threads": 1,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "measured": datetime.date.today().isoformat(),
    }


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def cpu_name() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else the platform's word."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
