"""Ensembles and test-time shifts: averaging is exact, members must match, errors are one line."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mnist_resnet import cli, data
from mnist_resnet.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from mnist_resnet.config import ConfigError
from mnist_resnet.ensemble import (
    ensemble,
    pack,
    predict_proba,
    select_members,
    shift_images,
)
from mnist_resnet.evaluate import EvalResult
from mnist_resnet.precision import make_runtime


def reference_shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[..., y, x] = img[..., y - dy, x - dx]
    return out


@pytest.mark.parametrize("dy,dx", [(0, 0), (1, 0), (-1, 0), (0, 2), (-2, -1)])
def test_shift_images_moves_content_and_fills_background(dy: int, dx: int) -> None:
    images = torch.randint(1, 256, (3, 28, 28), dtype=torch.uint8)
    assert torch.equal(shift_images(images, dy, dx), reference_shift(images, dy, dx))


def _variant(src: Path, dst: Path, seed: int, noise: float = 0.5, **config_changes: object) -> Path:
    """A second, different member: the same checkpoint with noise added to its classifier."""
    state = load_checkpoint(src)
    gen = torch.Generator().manual_seed(seed)
    weights = dict(state["model"])
    fc = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 2)
    weights[fc] = weights[fc] + noise * torch.randn(weights[fc].shape, generator=gen)
    state["model"] = weights
    for key, value in config_changes.items():
        state["config"]["data"][key] = value
    save_checkpoint(dst, state)
    return dst


@pytest.mark.numerics
@pytest.mark.slow
def test_ensemble_averages_member_probabilities(
    small_checkpoint: Path,
    mnist_root: Path,
    tmp_path: Path,
    evaluate_saved: Callable[[Path], EvalResult],
) -> None:
    other = _variant(small_checkpoint, tmp_path / "other.pt", seed=1)
    result = ensemble([small_checkpoint, other], data_dir=mnist_root, log=lambda _: None)
    splits = data.load("mnist", mnist_root, log=lambda _: None)
    # Each member runs in the precision its run recorded, as `ensemble` and `evaluate` run it:
    # the CPU probe's verdict today (another load, another thread count) may differ.
    runtime = make_runtime(
        accel=False, amp=load_model(small_checkpoint).trained_amp, channels_last=True
    )
    probas = [
        predict_proba(load_model(p), splits.test_images, runtime) for p in (small_checkpoint, other)
    ]
    expected = ((probas[0] + probas[1]) / 2).argmax(1)
    labels = splits.test_labels.long()
    assert result.count == 10_000
    assert result.accuracy == pytest.approx(float((expected == labels).float().mean()))
    assert [a for _, a in result.members] == pytest.approx(
        [float((p.argmax(1) == labels).float().mean()) for p in probas]
    )
    # One member, no shifts: the same number `evaluate` reports for that checkpoint.
    alone = ensemble([small_checkpoint], data_dir=mnist_root, log=lambda _: None)
    assert alone.accuracy == pytest.approx(evaluate_saved(small_checkpoint).accuracy)


@pytest.mark.slow
def test_one_member_runs_in_its_recorded_precision_as_evaluate_does(
    small_checkpoint: Path,
    mnist_root: Path,
    tmp_path: Path,
    evaluate_saved: Callable[[Path], EvalResult],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CPU probe now says the opposite of what the run recorded (another machine, another
    load): `ensemble` of the one checkpoint still scores it as `evaluate` does."""
    from mnist_resnet import precision

    recorded = load_model(small_checkpoint).trained_amp
    assert recorded is not None  # every run records the precision it chose
    opposite = precision.Probe(1.0, 1.0, 0.5 if recorded else 2.0, "2026-01-01")
    monkeypatch.setattr(precision, "cpu_probe", lambda channels_last: (opposite, "forced"))
    alone = ensemble([small_checkpoint], data_dir=mnist_root, log=lambda _: None)
    reference = evaluate_saved(small_checkpoint)  # in the recorded precision
    labels = data.load("mnist", mnist_root, log=lambda _: None).test_labels.long()
    # The same probabilities to the last bit: the loss of their average is the same float.
    assert alone.loss == float(F.nll_loss(reference.probabilities.clamp_min(1e-12).log(), labels))
    assert alone.accuracy == reference.accuracy
    # And the two commands print the same accuracy line.
    root = ["--data-dir", str(mnist_root)]
    assert cli.main(["evaluate", str(small_checkpoint), *root, "--out", str(tmp_path)]) == 0
    evaluated = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["ensemble", str(small_checkpoint), *root]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == evaluated


# The views `ensemble --tta` averages: the image itself first, then one pixel each way.
ONE_PIXEL_SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))


@pytest.mark.numerics
def test_tta_averages_the_shifted_views(small_checkpoint: Path, tmp_path: Path) -> None:
    member = load_model(small_checkpoint)
    runtime = make_runtime(accel=False, amp=None, channels_last=True)
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    views = [
        predict_proba(member, shift_images(images, dy, dx), runtime) for dy, dx in ONE_PIXEL_SHIFTS
    ]
    got = predict_proba(member, images, runtime, tta=True)
    assert torch.allclose(got, torch.stack(views).mean(0), atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(16), atol=1e-5)


@pytest.mark.numerics
def test_tta_of_a_model_trained_on_mirror_images_also_averages_their_mirrors(
    small_checkpoint: Path,
) -> None:
    plain = load_model(small_checkpoint)
    flipped = dataclasses.replace(plain.data_config, flip=True)
    member = dataclasses.replace(plain, data_config=flipped)
    runtime = make_runtime(accel=False, amp=None, channels_last=True)
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    mirrored = images.flip(-1)
    views = [
        predict_proba(plain, shift_images(seen, dy, dx), runtime)
        for seen in (images, mirrored)
        for dy, dx in ONE_PIXEL_SHIFTS
    ]
    got = predict_proba(member, images, runtime, tta=True)
    assert torch.allclose(got, torch.stack(views).mean(0), atol=1e-6)
    # Without --tta a mirror-trained model still sees the image once, unmirrored.
    assert torch.allclose(predict_proba(member, images, runtime), views[0], atol=1e-6)


@pytest.mark.slow
def test_validation_split_is_the_held_out_one(small_checkpoint: Path, mnist_root: Path) -> None:
    result = ensemble(
        [small_checkpoint], data_dir=mnist_root, split="validation", log=lambda _: None
    )
    assert result.split == "validation"
    assert result.count == load_model(small_checkpoint).data_config.val_size


def test_members_must_be_distinct_and_share_a_dataset(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        ensemble([small_checkpoint, small_checkpoint], data_dir=mnist_root, log=lambda _: None)
    fashion = _variant(small_checkpoint, tmp_path / "f.pt", seed=2, dataset="fashion-mnist")
    with pytest.raises(CheckpointError, match="must share a dataset"):
        ensemble([small_checkpoint, fashion], data_dir=mnist_root, log=lambda _: None)
    other_split = _variant(small_checkpoint, tmp_path / "s.pt", seed=3, split_seed=7)
    with pytest.raises(CheckpointError, match="different validation split"):
        ensemble(
            [small_checkpoint, other_split],
            data_dir=mnist_root,
            split="validation",
            log=lambda _: None,
        )


@pytest.mark.slow
def test_cli_ensemble_prints_accuracy_and_writes_json(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _variant(small_checkpoint, tmp_path / "other.pt", seed=4)
    out = tmp_path / "ensemble.json"
    argv = ["ensemble", str(small_checkpoint), str(other), "--data-dir", str(mnist_root)]
    assert cli.main([*argv, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("test accuracy: ") and lines[-1].endswith("%")
    assert "ensemble of 2 models" in lines[-2]
    saved = json.loads(out.read_text())
    assert len(saved["members"]) == 2 and saved["count"] == 10_000
    assert f"{saved['accuracy']:.2%}" in lines[-1]
    # --save: the same two as one model file, which `evaluate` reads like any checkpoint.
    packed = tmp_path / "packed.safetensors"
    assert cli.main([*argv, "--save", str(packed)]) == 0
    assert f"wrote {packed}: one model averaging 2 networks" in capsys.readouterr().out
    loaded = load_model(packed)
    assert loaded.model_config.members == 2
    assert [m["epoch"] for m in loaded.state["members"]] == [load_checkpoint(other)["epoch"]] * 2
    assert loaded.state["test"]["accuracy"] == pytest.approx(saved["accuracy"], abs=2e-4)
    assert cli.main(["evaluate", str(packed), "--data-dir", str(mnist_root)]) == 0
    evaluated = capsys.readouterr().out.strip().splitlines()[-1]
    assert evaluated == f"test accuracy: {loaded.state['test']['accuracy']:.2%}"


def test_only_members_of_one_network_and_one_data_pack_into_one_file(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "packed.pt"
    with pytest.raises(ConfigError, match="at least two"):
        pack([small_checkpoint], out, data_dir=mnist_root, log=lambda _: None)
    state = load_checkpoint(small_checkpoint)
    state["normalization"] = {"mean": 0.5, "std": 0.5}
    save_checkpoint(tmp_path / "other.pt", state)
    with pytest.raises(CheckpointError, match=r"differs .* in its normalization"):
        pack([small_checkpoint, tmp_path / "other.pt"], out, data_dir=mnist_root)
    assert not out.exists()


def test_cli_ensemble_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ensemble", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]
    assert cli.main(["ensemble", str(tmp_path / "missing.pt"), "--select", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--select must be >= 0, got -1" in err[0]


def _validation_score(paths: list[Path], mnist_root: Path) -> tuple[int, float]:
    """(errors, loss) of the averaged softmax of `paths` on their validation split."""
    splits = data.load("mnist", mnist_root, log=lambda _: None)
    cfg = load_model(paths[0]).data_config
    _, _, images, labels = data.split_validation(
        splits.train_images, splits.train_labels, cfg.val_size, cfg.split_seed
    )
    runtime = make_runtime(accel=False, amp=None, channels_last=True)
    proba = torch.stack([predict_proba(load_model(p), images, runtime) for p in paths]).mean(0)
    errors = int((proba.argmax(1) != labels.long()).sum())
    return errors, float(F.nll_loss(proba.clamp_min(1e-12).log(), labels.long()))


@pytest.mark.slow
def test_select_members_is_greedy_on_validation_errors(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path
) -> None:
    near = _variant(small_checkpoint, tmp_path / "near.pt", seed=5, noise=0.05)
    noisy = _variant(small_checkpoint, tmp_path / "noisy.pt", seed=6, noise=0.5)
    # A classifier drowned in noise: averaging it in can only add validation errors.
    broken = _variant(small_checkpoint, tmp_path / "broken.pt", seed=7, noise=20.0)
    pool = [broken, noisy, near, small_checkpoint]
    quiet = lambda _: None  # noqa: E731
    chosen = select_members(pool, data_dir=mnist_root, max_members=4, log=quiet)
    alone = {p: _validation_score([p], mnist_root) for p in pool}
    assert chosen[0] == min(pool, key=alone.__getitem__)
    assert broken not in chosen
    # The search went on through all four, so every model it left out added errors.
    kept = _validation_score(chosen, mnist_root)[0]
    for left_out in set(pool) - set(chosen):
        assert _validation_score([*chosen, left_out], mnist_root)[0] > kept
    assert select_members(pool, data_dir=mnist_root, max_members=1, log=quiet) == chosen[:1]
    with pytest.raises(ConfigError, match="--select must be >= 1"):
        select_members(pool, data_dir=mnist_root, max_members=0, log=quiet)


@pytest.mark.slow
def test_cli_ensemble_select_reports_the_chosen_models_on_the_test_set(
    small_checkpoint: Path, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _variant(small_checkpoint, tmp_path / "broken.pt", seed=8, noise=20.0)
    out = tmp_path / "ensemble.json"
    argv = ["ensemble", str(broken), str(small_checkpoint), "--data-dir", str(mnist_root)]
    assert cli.main([*argv, "--select", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "choosing up to 2 of 2 models on the validation split" in text
    assert text.strip().splitlines()[-1].startswith("test accuracy: ")
    saved = json.loads(out.read_text())
    assert saved["split"] == "test"
    assert [m["checkpoint"] for m in saved["members"]] == [str(small_checkpoint)]
