"""The models shipped in the package: packaging a run, the pins that guard the files, the CLI's
default model, and the shipped files themselves."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from datafakes import SHAPES, ShapesRun, shape_image

from mnist_resnet import data, packaging, pretrained
from mnist_resnet.checkpoint import (
    INFERENCE_KEYS,
    INT8_SCALE,
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from mnist_resnet.cli import PRETRAINED_DEFAULT, PRETRAINED_NAMES, main
from mnist_resnet.config import DATASET_PREPROCESS, PREPROCESS_INPUTS
from mnist_resnet.errors import UserError
from mnist_resnet.evaluate import shipped_figures_folder
from mnist_resnet.files import hash_file
from mnist_resnet.predict import Predictor

REPO = Path(__file__).resolve().parents[1]


def _recipe(run: ShapesRun) -> pretrained.Recipe:
    """The recipe of the `shapes_run` fixture, in the form `package` checks a run against."""
    return pretrained.Recipe(
        "resnet14",
        f"folder:{run.folder}",
        1,
        overrides=(
            ("model", "depth", 8),
            ("model", "num_classes", 3),
            ("train", "epochs", 1),
            ("train", "batch_size", 8),
            ("data", "val_size", 5),
        ),
        flags=" ".join(run.flags[:-1]),
    )


@pytest.fixture(scope="module")
def packaged(shapes_run: ShapesRun, tmp_path_factory: pytest.TempPathFactory) -> packaging.Packaged:
    out = tmp_path_factory.mktemp("package")
    return packaging.package(
        shapes_run.run_dir, "mnist", out_dir=out, recipe=_recipe(shapes_run), log=lambda _: None
    )


@pytest.fixture
def shipped(packaged: packaging.Packaged, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The packaged test model installed as the shipped `mnist` model, pinned."""
    monkeypatch.setattr(pretrained, "FOLDER", packaged.path.parent)
    monkeypatch.setattr(pretrained, "SHA256", {"mnist": packaged.sha256})
    return packaged.path


def test_packaging_keeps_what_inference_needs_and_records_the_recipe(
    packaged: packaging.Packaged, shapes_run: ShapesRun
) -> None:
    state = load_checkpoint(packaged.path)
    for gone in ("optimizer", "scheduler", "weight_average", "rng", "partial_epoch"):
        assert gone not in state
    assert packaged.size < shapes_run.checkpoint.stat().st_size / 1.5
    assert state["config"]["data"]["data_dir"] == "data"  # no path of the packaging machine
    # The same weights and answers as the run's selected model.
    original, shipped = load_model(shapes_run.checkpoint), load_model(packaged.path)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(original.model(x), shipped.model(x))
    meta = json.loads(packaged.path.with_suffix(".json").read_text())
    assert meta["sha256"] == hash_file(packaged.path) and meta["bytes"] == packaged.size
    assert meta["command"] == _recipe(shapes_run).command
    assert meta["classes"] == list(SHAPES) and meta["test_images"] == 9
    assert (meta["preprocess"], meta["inputs"]) == ("mnist", PREPROCESS_INPUTS["mnist"])
    assert meta["test_accuracy"] == original.state["test"]["accuracy"]
    assert 0.0 <= meta["fp32_cpu_test_accuracy"] <= 1.0 and re.fullmatch(
        r"\d{4}-\d\d-\d\d", meta["trained"]
    )
    assert state["pretrained"]["command"] == meta["command"]
    # One self-contained file without pickle: calibration and detector inside, as in the JSON.
    assert packaged.path.suffix == ".safetensors" and packaged.path.read_bytes()[8:9] == b"{"
    assert state["calibration"] == meta["calibration"]
    assert load_model(packaged.path).detector is not None
    card = meta["card"]
    assert card["test_accuracy"] == meta["fp32_cpu_test_accuracy"]
    assert card["calibration"]["temperature"] == meta["calibration"]["temperature"]
    assert card["speed"]["prepared_28x28_ms"] > 0 and card["speed"]["threads"] == 1
    assert "lowest validation error" in card["selection"]


def _saved_as(state: dict[str, Any], stored: dict[str, Any], tmp_path: Path) -> tuple[float, float]:
    """A checkpoint's inference state saved with its weights as trained and as `stored`: the
    stored file's size as a share of the other's, and the largest change of a logit as a share
    of the logits' spread (the stored file loads as float32 parameters)."""
    kept = {key: state[key] for key in INFERENCE_KEYS if key in state}
    full, small = tmp_path / "full.safetensors", tmp_path / "stored.safetensors"
    save_checkpoint(full, kept)
    save_checkpoint(small, {**kept, "model": stored})
    original, loaded = load_model(full), load_model(small)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        want, got = original.model(x), loaded.model(x)
    moved = float((got - want).abs().max()) / (float(want.std()) + 1e-2)
    return small.stat().st_size / full.stat().st_size, moved


def test_float16_storage_halves_the_weights_and_loads_as_float32(
    shapes_run: ShapesRun, tmp_path: Path
) -> None:
    state = load_checkpoint(shapes_run.checkpoint)
    half = packaging.stored_weights(state["model"], "float16")
    for key, tensor in state["model"].items():
        want = torch.float16 if tensor.is_floating_point() else tensor.dtype
        assert half[key].dtype == want and half[key].shape == tensor.shape
    size, moved = _saved_as(state, half, tmp_path)
    assert size < 0.6
    # Rounding each weight to float16 moves it by at most 1/2048 of itself: the logits move
    # by a small part of their spread, far from what changes an answer of this model.
    assert moved <= 0.01
    assert packaging.stored_weights(state["model"], "float32") == state["model"]
    with pytest.raises(pretrained.PretrainedError, match="beyond float16's range"):
        packaging.stored_weights({"conv.weight": torch.tensor([1.0, 1e6])}, "float16")
    with pytest.raises(pretrained.PretrainedError, match="unknown weight storage 'int4'"):
        packaging.stored_weights({}, "int4")


def test_int8_storage_keeps_conv_weights_in_a_quarter_and_loads_as_float32(
    shapes_run: ShapesRun, tmp_path: Path
) -> None:
    state = load_checkpoint(shapes_run.checkpoint)
    small = packaging.stored_weights(state["model"], "int8")
    for key, tensor in state["model"].items():
        if tensor.is_floating_point() and tensor.dim() >= 2:
            q, scale = small[key], small[key + INT8_SCALE]
            assert q.dtype == torch.int8 and q.shape == tensor.shape
            assert scale.shape == (tensor.shape[0],)
            # Each output channel's largest weight takes the whole range, none is clipped, and
            # each weight moves by at most half a step.
            assert int(q.abs().flatten(1).amax(1).min()) == 127 or bool((tensor == 0).all())
            moved = (q.float() * scale.reshape(-1, *[1] * (q.dim() - 1)) - tensor).abs()
            assert bool((moved <= scale.reshape(-1, *[1] * (q.dim() - 1)) / 2 + 1e-7).all())
        else:
            want = torch.float16 if tensor.is_floating_point() else tensor.dtype
            assert small[key].dtype == want
    size, moved = _saved_as(state, small, tmp_path)
    assert size < 0.4
    # A step of 1/127 of each channel's largest weight: the logits move by a few percent of
    # their spread at most.
    assert moved <= 0.05
    kept = {key: state[key] for key in INFERENCE_KEYS if key in state}
    # A file whose scales were edited (and its checksums recomputed) is refused in one line.
    conv = next(k for k, t in small.items() if t.dtype == torch.int8)
    for edit in (
        {conv + INT8_SCALE: small[conv + INT8_SCALE][:-1]},
        {conv + INT8_SCALE: torch.full_like(small[conv + INT8_SCALE], float("nan"))},
        {conv: small[conv].float()},
        {"nothing" + INT8_SCALE: torch.ones(3)},
    ):
        edited = tmp_path / "edited.safetensors"
        save_checkpoint(edited, {**kept, "model": {**small, **edit}})
        with pytest.raises(CheckpointError, match=r"int8|scales no weight") as caught:
            load_model(edited)
        assert "\n" not in str(caught.value)
    without_scale = {k: v for k, v in small.items() if k != conv + INT8_SCALE}
    save_checkpoint(edited, {**kept, "model": without_scale})
    with pytest.raises(CheckpointError, match="does not fit its scales"):
        load_model(edited)


def test_a_run_of_another_recipe_is_not_packaged(shapes_run: ShapesRun, tmp_path: Path) -> None:
    with pytest.raises(pretrained.PretrainedError, match=r"not trained with the mnist recipe"):
        packaging.package(shapes_run.run_dir, "mnist", out_dir=tmp_path, log=lambda _: None)
    assert not list(tmp_path.iterdir())


def test_a_failed_packaging_leaves_the_previous_files(
    shapes_run: ShapesRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = {"mnist.safetensors": b"the previous weights", "mnist.json": b'{"sha256": "previous"}'}
    for name, content in old.items():
        (tmp_path / name).write_bytes(content)

    def no_data(*_: object, **__: object) -> None:
        raise data.DataError("no test data here")

    # The measurement fails after the new checkpoint was written (staged) and loaded.
    monkeypatch.setattr(data, "load_data", no_data)
    with pytest.raises(data.DataError, match="no test data"):
        packaging.package(
            shapes_run.run_dir,
            "mnist",
            out_dir=tmp_path,
            recipe=_recipe(shapes_run),
            log=lambda _: None,
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no staged file left


def test_the_pin_guards_the_shipped_file(shipped: Path) -> None:
    assert pretrained.weights_path("mnist") == shipped
    with pytest.raises(pretrained.PretrainedError, match="unknown pretrained model"):
        pretrained.weights_path("cifar")
    with pytest.raises(pretrained.PretrainedError, match="ships no pretrained fashion-mnist"):
        pretrained.weights_path("fashion-mnist")
    payload = bytearray(shipped.read_bytes())
    payload[len(payload) // 2] ^= 1
    shipped.write_bytes(bytes(payload))
    try:
        with pytest.raises(pretrained.PretrainedError, match="SHA-256 differs"):
            pretrained.weights_path("mnist")
    finally:
        payload[len(payload) // 2] ^= 1
        shipped.write_bytes(bytes(payload))


def test_without_a_checkpoint_the_commands_use_the_shipped_model_and_say_so(
    shipped: Path, shapes_run: ShapesRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "disc.png"
    shape_image("disc", 40, 0).save(image)
    capsys.readouterr()
    assert main(["predict", str(image)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "using the pretrained mnist model" in captured.err
    # With the figure of its model card: the stored file's, in fp32.
    card = json.loads(shipped.with_suffix(".json").read_text())["card"]
    assert f", {card['test_accuracy']:.2%} test accuracy)" in captured.err
    assert re.match(rf"{re.escape(str(image))}: ({'|'.join(SHAPES)}) ", captured.out)
    assert main(["predict", "--pretrained", "mnist", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["prediction"] in SHAPES
    # A checkpoint and --pretrained together is one line, as is a checkpoint without images.
    assert main(["predict", "--pretrained", "mnist", str(shapes_run.checkpoint), str(image)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["predict", str(shapes_run.checkpoint)]) == 2
    assert "give the image files" in capsys.readouterr().err
    # evaluate writes its figures to the current folder, never into the installed package.
    out = tmp_path / "figures"
    assert main(["evaluate", "--pretrained", "mnist", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "test accuracy:" in report and (out / "confusion.png").is_file()
    # The shipped model's temperature (from its metadata) and the reliability diagram.
    assert (
        "calibration: margin temperature scaling" in report and (out / "reliability.png").is_file()
    )
    assert re.search(r"^  calibrated +\d+\.\d+% ", report, re.MULTILINE)


def test_a_shipped_models_figures_never_go_into_the_package(tmp_path: Path) -> None:
    # Named, or given by its path inside the installed package: figures to ./pretrained-NAME.
    by_path = pretrained.ModelFile(pretrained.FOLDER / "mnist.safetensors", None)
    assert shipped_figures_folder(by_path) == Path("pretrained-mnist")
    named = pretrained.choose(None, "fashion-mnist")
    assert shipped_figures_folder(named) == Path("pretrained-fashion-mnist")
    # Any other checkpoint's go beside it (None: the default).
    elsewhere = pretrained.ModelFile(tmp_path / "mnist.safetensors", None)
    assert shipped_figures_folder(elsewhere) is None


def test_the_pretrained_command_lists_the_shipped_models(
    shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    assert "mnist: the pretrained mnist model" in out and pretrained.SHA256["mnist"] in out
    assert "fashion-mnist: not shipped in this build" in out


def test_names_recipes_make_target_and_package_data_agree() -> None:
    assert PRETRAINED_NAMES == pretrained.NAMES == tuple(pretrained.RECIPES)
    assert PRETRAINED_DEFAULT == pretrained.DEFAULT
    makefile = (REPO / "Makefile").read_text()
    for name in pretrained.RECIPES:
        # The recipe's own commands run through `pretrained train NAME` (packaging.train_recipe).
        assert f"mnist-resnet pretrained train {name} " in makefile
        assert f"package $(PRETRAINED_RUNS)/{name} --name {name}" in makefile
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["mnist_resnet"]
    assert {"pretrained/*.safetensors", "pretrained/*.json"} <= set(data)


# ----------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("name", pretrained.NAMES)
def test_each_shipped_model_is_pinned_small_and_loads_with_its_metadata(name: str) -> None:
    if name not in pretrained.SHA256:
        pytest.skip(f"no {name} model pinned in this checkout (make pretrained)")
    path = pretrained.weights_path(name)
    meta = pretrained.metadata(name)
    assert meta["sha256"] == pretrained.SHA256[name] and meta["bytes"] == path.stat().st_size
    assert path.stat().st_size <= pretrained.MAX_BYTES
    loaded = load_model(path)
    recipe = pretrained.RECIPES[name]
    # Stored as its recipe says (float16 halves a file, int8 keeps the convs in a quarter with
    # float32 scales beside them), and computed in float32 all the same.
    stored = {t.dtype for t in loaded.state["model"].values() if t.dtype != torch.int64}
    assert (
        stored
        == {
            "float32": {torch.float32},
            "float16": {torch.float16},
            "int8": {torch.int8, torch.float32, torch.float16},
        }[recipe.storage]
    )
    assert meta.get("weights_stored_as", "float32") == recipe.storage
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.data_config.dataset == meta["dataset"] == recipe.dataset
    assert list(loaded.class_names) == meta["classes"]
    assert not packaging.recipe_differences(loaded.state["config"], recipe)
    assert meta["command"] == recipe.command
    # The card says what pictures it is for, and predict prepares them that way.
    assert meta["preprocess"] == Predictor(loaded).preprocess == DATASET_PREPROCESS[recipe.dataset]
    assert meta["inputs"] == PREPROCESS_INPUTS[meta["preprocess"]]


def _pinned(name: str) -> Path:
    if name not in pretrained.SHA256:
        pytest.skip(f"no {name} model pinned in this checkout (make pretrained)")
    return pretrained.weights_path(name)


@pytest.mark.numerics
def test_the_shipped_mnist_model_reads_a_drawn_seven_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pinned("mnist")
    from PIL import Image, ImageDraw

    # Dark ink on white paper, larger than MNIST and off-centre: what a user photographs.
    page = Image.new("RGB", (240, 300), (245, 245, 240))
    draw = ImageDraw.Draw(page)
    draw.line([(60, 70), (180, 70), (110, 250)], fill=(30, 30, 40), width=16, joint="curve")
    page.save(tmp_path / "seven.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "seven.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["prediction"] == "7"


@pytest.mark.numerics
def test_the_shipped_mnist_model_is_as_accurate_as_its_metadata_says(mnist_root: Path) -> None:
    from mnist_resnet import data
    from mnist_resnet.predict import Predictor

    path = _pinned("mnist")
    splits = data.load("mnist", mnist_root, log=lambda _: None)
    predictor = Predictor.from_checkpoint(path)
    guesses = predictor.probabilities(splits.test_images[:2000]).argmax(dim=1)
    accuracy = float((guesses == splits.test_labels[:2000]).float().mean())
    # Measured on the whole test set in fp32 when it was packaged. The first 5,000 test digits
    # are the cleaner, easier half (LeCun's notes), so its first 2,000 do no worse than that,
    # less half a point for chance in a sample this size.
    assert accuracy >= pretrained.metadata("mnist")["fp32_cpu_test_accuracy"] - 0.005


CARD_FIELDS = (
    "model",
    "data",
    "recipe",
    "command",
    "selection",
    "test_accuracy",
    "calibration",
    "speed",
    "intended_use",
    "limits",
)


def test_no_pickle_ships_and_each_file_is_small() -> None:
    files = sorted(p.name for p in pretrained.FOLDER.iterdir() if p.suffix != ".py")
    names = [
        f"{n}{suffix}" for n in sorted(pretrained.SHA256) for suffix in (".json", ".safetensors")
    ]
    assert files == sorted(names), "only .safetensors and their .json ship"
    assert all((pretrained.FOLDER / f).stat().st_size <= pretrained.MAX_BYTES for f in files)


@pytest.mark.parametrize("name", pretrained.NAMES)
def test_a_shipped_file_opens_with_the_safetensors_library_alone(name: str) -> None:
    path = _pinned(name)
    code = f"""
import json, sys
from safetensors import safe_open
from safetensors.torch import load_file
weights = load_file({str(path)!r})
with safe_open({str(path)!r}, framework="pt") as f:
    meta = f.metadata()
config = json.loads(meta["config"])
print(len(weights), config["model"]["depth"], json.loads(meta["calibration"])["temperature"])
print("mnist_resnet" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    counts, imported = done.stdout.splitlines()
    loaded = load_model(path, fold=False)
    assert imported == "False"
    assert counts.split() == [
        str(len(loaded.state["model"])),
        str(loaded.model_config.depth),
        str(loaded.temperature),
    ]


@pytest.mark.parametrize("name", pretrained.NAMES)
def test_each_model_card_says_what_its_file_holds(name: str) -> None:
    path = _pinned(name)
    meta = pretrained.metadata(name)
    card = meta["card"]
    assert set(CARD_FIELDS) <= set(card)
    loaded = load_model(path)
    assert card["calibration"]["temperature"] == loaded.temperature
    assert card["test_accuracy"] == meta["fp32_cpu_test_accuracy"]
    assert card["command"] == pretrained.RECIPES[name].command
    assert card["limits"] == list(pretrained.RECIPES[name].limits) and card["intended_use"]
    # docs/models.md shows the same numbers, in the section of this model.
    models = (REPO / "docs" / "models.md").read_text(encoding="utf-8")
    section = models.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    assert f"{card['test_accuracy']:.2%}" in section
    assert f"{card['calibration']['temperature']:.3f}" in section
    assert f"{card['speed']['prepared_28x28_ms']:.1f} ms" in section
    assert meta["sha256"] in section and card["command"] in section


def test_a_recipe_with_teachers_trains_them_first_and_keeps_finished_runs(
    shapes_run: ShapesRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _recipe(shapes_run)
    teacher = pretrained.Recipe(base.preset, base.dataset, 2, base.overrides, base.flags)
    recipe = pretrained.Recipe(
        base.preset, base.dataset, 3, base.overrides, base.flags, teachers=(teacher,)
    )
    assert recipe.commands == [
        teacher.command,
        f"{base.command.replace('--seed 1', '--seed 3')} --teacher "
        f"{pretrained.RUNS}/{base.dataset}-teacher-s2/best.pt",
    ]
    monkeypatch.setitem(pretrained.RECIPES, "shapes", recipe)
    lines: list[str] = []
    run_dir = packaging.train_recipe("shapes", tmp_path, log=lines.append)
    teacher_dir = tmp_path / recipe.teacher_runs[0]
    student = load_checkpoint(run_dir / "best.pt")
    assert list(student["config"]["train"]["teachers"]) == [str(teacher_dir / "best.pt")]
    assert student["teacher_sha256"] == [hash_file(teacher_dir / "best.pt")]
    assert not packaging.recipe_differences(student["config"], recipe)
    # Without its teacher it is another recipe.
    assert packaging.recipe_differences(student["config"], base)
    # Again: both runs are finished with this recipe and kept, nothing is trained.
    lines.clear()
    packaging.train_recipe("shapes", tmp_path, log=lines.append)
    assert sum("kept" in line for line in lines) == 2 and len(lines) == 2
    # A finished run of another recipe in the model's folder is refused, not reused.
    monkeypatch.setitem(pretrained.RECIPES, "shapes", base)
    with pytest.raises(pretrained.PretrainedError, match="another recipe"):
        packaging.train_recipe("shapes", tmp_path, log=lines.append)


def test_pretrained_train_command_trains_the_named_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make pretrained` runs `mnist-resnet pretrained train NAME`: it hands the name, folders
    threads and jobs to packaging.train_recipe (tested above) and says where the run is."""
    calls: list[tuple[object, ...]] = []

    def fake_train_recipe(
        name: str, runs_dir: Path, *, data_dir: Path, threads: int, jobs: int
    ) -> Path:
        calls.append((name, runs_dir, data_dir, threads, jobs))
        (runs_dir / name).mkdir(parents=True)
        (runs_dir / name / "result.json").write_text('{"test_accuracy": 0.99771}')
        return runs_dir / name

    monkeypatch.setattr(packaging, "train_recipe", fake_train_recipe)
    argv = ["pretrained", "train", "mnist", "--runs-dir", str(tmp_path / "r"), "--threads", "1"]
    assert main([*argv, "--data-dir", str(tmp_path / "d"), "--jobs", "2"]) == 0
    assert calls == [("mnist", tmp_path / "r", tmp_path / "d", 1, 2)]
    # It ends as every command that measures a model does: with the model's test accuracy.
    assert capsys.readouterr().out.strip().splitlines() == [
        f"run directory: {tmp_path / 'r' / 'mnist'}",
        "test accuracy: 99.77%",
    ]
    for damaged in ('{"test_accuracy": "high"}', "{not json", '{"test_accuracy": true}'):
        (tmp_path / "r" / "mnist" / "result.json").write_text(damaged)
        assert packaging.recorded_test_accuracy(tmp_path / "r" / "mnist") is None
    with pytest.raises(SystemExit):
        main(["pretrained", "train", "no-such-model"])


def test_an_ensemble_recipe_trains_its_members_then_packs_their_average(
    shapes_run: ShapesRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _recipe(shapes_run)
    recipe = pretrained.ensemble_of(base, (1, 2), chosen="the only seeds tried")
    members = [f"{pretrained.RUNS}/{run}/best.pt" for run in recipe.member_runs]
    assert recipe.commands == [
        base.command,
        base.command.replace("--seed 1", "--seed 2"),
        f"mnist-resnet ensemble {' '.join(members)} --split validation "
        f"--save {pretrained.RUNS}/{base.dataset}/best.pt",
    ]
    monkeypatch.setitem(pretrained.RECIPES, "shapes", recipe)
    # Both members finished earlier (the fixture's run, once as itself and once relabelled as
    # seed 2; the teacher test above shows a missing run being trained): kept, then packed.
    for run, seed in zip(recipe.member_runs, (1, 2), strict=True):
        shutil.copytree(shapes_run.run_dir, tmp_path / run)
        state = load_checkpoint(tmp_path / run / "best.pt")
        state["config"]["train"]["seed"] = seed
        save_checkpoint(tmp_path / run / "best.pt", state)
    lines: list[str] = []
    run_dir = packaging.train_recipe("shapes", tmp_path, log=lines.append)
    assert ["kept" in line for line in lines[:3]] == [True, True, False]
    state = load_checkpoint(run_dir / "best.pt")
    assert state["config"]["model"]["members"] == 2
    assert [m["seed"] for m in state["members"]] == [1, 2]
    assert not packaging.recipe_differences(state["config"], recipe)
    assert packaging.recipe_differences(state["config"], base)  # one network: another recipe
    result = json.loads((run_dir / "result.json").read_text())
    assert result["test_accuracy"] == state["test"]["accuracy"]
    # Again: the members and their average are finished with this recipe, and kept.
    lines.clear()
    packaging.train_recipe("shapes", tmp_path, log=lines.append)
    assert len(lines) == 3 and all("kept" in line for line in lines)
    # A member retrained since (here: its file rewritten) makes the average be packed again.
    state2 = load_checkpoint(tmp_path / recipe.member_runs[1] / "best.pt")
    state2["epoch"] = 2
    save_checkpoint(tmp_path / recipe.member_runs[1] / "best.pt", state2)
    lines.clear()
    packaging.train_recipe("shapes", tmp_path, log=lines.append)
    assert "packing again" in lines[2]
    state = load_checkpoint(run_dir / "best.pt")
    assert [m["epoch"] for m in state["members"]] == [1, 2]
    # Its model card says how the members were chosen, each at its own epoch.
    meta = {"members": state["members"], "best_epoch": state["epoch"], "validation_error": 0.25}
    selection = packaging.model_card(meta, recipe, {})["selection"]
    assert selection.startswith("each of the 2 runs at its epoch with the lowest validation")
    assert "(epochs 1, 2)" in selection and "(25.00%); the only seeds tried;" in selection
    assert recipe.summary == f"average of 2 runs of the resnet14 preset {base.flags}, seeds 1, 2"


def test_jobs_train_an_ensembles_members_side_by_side_in_processes_of_their_own(
    shapes_run: ShapesRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pretrained train NAME --jobs 2` (what `make pretrained` runs): the members, which need
    no other run, train at once in spawned processes, the threads shared between them, each
    writing to its own log beside its run folder; the average is then packed as before."""
    recipe = pretrained.ensemble_of(_recipe(shapes_run), (1, 2), chosen="the only seeds tried")
    monkeypatch.setitem(pretrained.RECIPES, "shapes", recipe)
    lines: list[str] = []
    run_dir = packaging.train_recipe("shapes", tmp_path, threads=2, jobs=2, log=lines.append)
    assert lines[0].startswith("training 2 runs, 2 at a time with 1 thread(s) each")
    for run, seed in zip(recipe.member_runs, (1, 2), strict=True):
        state = load_checkpoint(tmp_path / run / "best.pt")
        assert (state["config"]["train"]["seed"], state["config"]["train"]["threads"]) == (seed, 1)
        assert not packaging.recipe_differences(state["config"], recipe.members[seed - 1])
        # The run's own lines went to its log, ending with its test accuracy as a run does.
        own = (tmp_path / f"{run}.log").read_text().splitlines()
        assert any(line.startswith("epoch 1/1:") for line in own)
        accuracy = packaging.recorded_test_accuracy(tmp_path / run)
        assert accuracy is not None and f"{tmp_path / run}: finished: test accuracy" in "\n".join(
            lines
        )
    state = load_checkpoint(run_dir / "best.pt")
    assert [m["seed"] for m in state["members"]] == [1, 2]
    # Finished runs are kept, with or without --jobs: nothing is trained again.
    lines.clear()
    packaging.train_recipe("shapes", tmp_path, jobs=2, log=lines.append)
    assert len(lines) == 3 and all("kept" in line for line in lines)
    with pytest.raises(pretrained.PretrainedError, match="--jobs must be a whole number >= 1"):
        packaging.train_recipe("shapes", tmp_path, jobs=0, log=lines.append)


def test_a_run_that_fails_beside_another_stops_both_with_its_one_line_error(
    shapes_run: ShapesRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = dataclasses.replace(_recipe(shapes_run), dataset=f"folder:{tmp_path / 'gone'}")
    recipe = pretrained.ensemble_of(missing, (1, 2), chosen="the only seeds tried")
    monkeypatch.setitem(pretrained.RECIPES, "shapes", recipe)
    with pytest.raises(UserError) as raised:
        packaging.train_recipe("shapes", tmp_path / "runs", jobs=2, log=lambda _: None)
    message = str(raised.value)
    assert "gone" in message and "\n" not in message
    # Its log says the same, for whoever reads it instead of the terminal.
    logs = [(tmp_path / "runs" / f"{run}.log").read_text() for run in recipe.member_runs]
    assert any(f"error: {message}" in text for text in logs)
