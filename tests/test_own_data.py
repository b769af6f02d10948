"""Your own images: `folder:PATH` and `npz:PATH` datasets, read, checked and split like MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datafakes import SHAPES, ShapesRun, make_image_folder, make_npz, quiet, shape_image

from mnist_resnet import data
from mnist_resnet.checkpoint import load_model
from mnist_resnet.cli import main
from mnist_resnet.config import ConfigError, DataConfig, dataset_label
from mnist_resnet.data.own import read_folder
from mnist_resnet.images import preprocess, resize_plain


def _load(dataset: str, **cfg: object) -> data.Splits:
    return data.load_data(DataConfig(dataset=dataset, **cfg), log=quiet)  # type: ignore[arg-type]


def test_folder_classes_are_its_sub_folders_and_a_test_split_is_held_out_per_class(
    tmp_path: Path,
) -> None:
    make_image_folder(tmp_path / "shapes", per_class=10)
    (tmp_path / "shapes" / "disc" / "notes.txt").write_text("not an image")
    splits = _load(f"folder:{tmp_path / 'shapes'}")
    assert splits.classes == SHAPES
    assert splits.train_images.shape[1:] == (28, 28) and splits.train_images.dtype == torch.uint8
    # 15% of each class of 10, rounded: 2 test images per class, the other 8 train.
    assert torch.bincount(splits.test_labels).tolist() == [2, 2, 2]
    assert torch.bincount(splits.train_labels).tolist() == [8, 8, 8]
    # Normalisation comes from the training images themselves, not from MNIST's constants.
    pixels = splits.train_images.float() / 255
    assert splits.mean == pytest.approx(float(pixels.mean()), abs=1e-6)
    assert splits.std == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-6)
    # The same seed holds out the same images; another seed other ones.
    again = _load(f"folder:{tmp_path / 'shapes'}")
    assert again.hashes == splits.hashes and torch.equal(again.test_images, splits.test_images)
    other = _load(f"folder:{tmp_path / 'shapes'}", split_seed=1)
    assert other.hashes != splits.hashes


def test_a_test_folder_is_the_test_set_and_must_hold_the_same_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "shapes", per_class=6, test_per_class=3)
    splits = _load(f"folder:{root}")
    assert (len(splits.train_images), len(splits.test_images)) == (18, 9)
    (root / "test" / "square").rename(root / "test" / "triangle")
    with pytest.raises(data.DataError, match=r"not in .*: triangle; missing from .*: square"):
        _load(f"folder:{root}")


def test_mnist_style_preprocessing_or_a_plain_resize(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "shapes", per_class=2, classes=("disc", "square"))
    _, (mnist_x, _), _ = read_folder(root, "mnist", quiet)
    _, (resized_x, _), _ = read_folder(root, "resize", quiet)
    first = shape_image("disc", 24, -1)
    assert np.array_equal(mnist_x[0].numpy(), preprocess(first))
    assert np.array_equal(resized_x[0].numpy(), resize_plain(first))
    # MNIST-style: ink made bright on black; a plain resize keeps the light background.
    assert mnist_x[0, 0, 0] == 0 and resized_x[0, 0, 0] > 200


def test_an_empty_class_folder_is_one_line(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "shapes", per_class=3)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match=r"1 class folder\(s\) hold no images: empty") as e:
        _load(f"folder:{root}")
    assert "\n" not in str(e.value)


def test_every_unusable_image_is_named_in_one_summary(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "shapes", per_class=3)
    for i in range(7):
        (root / "disc" / f"broken-{i}.png").write_bytes(b"\x89PNG not really")
    (root / "square" / "empty.jpg").write_bytes(b"")
    (root / "cross" / "blank.png").write_bytes(b"")
    from PIL import Image

    Image.new("L", (20, 20), 255).save(root / "cross" / "blank.png")
    with pytest.raises(data.DataError) as raised:
        _load(f"folder:{root}")
    message = str(raised.value)
    assert "9 of 18 images cannot be used" in message and "\n" not in message
    assert "cross/blank.png (blank image" in message and "and 4 more" in message


def test_too_few_classes_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="no such folder"):
        _load(f"folder:{tmp_path / 'nowhere'}")
    make_image_folder(tmp_path / "one", per_class=2, classes=("disc",))
    with pytest.raises(data.DataError, match="at least 2; found 1: disc"):
        _load(f"folder:{tmp_path / 'one'}")
    make_image_folder(tmp_path / "lonely", per_class=1, classes=("disc", "cross"))
    with pytest.raises(data.DataError, match="needs at least 2 per class"):
        _load(f"folder:{tmp_path / 'lonely'}")


def test_npz_arrays_with_class_names_and_an_optional_test_set(tmp_path: Path) -> None:
    splits = _load(f"npz:{make_npz(tmp_path / 'shapes.npz')}")
    assert splits.classes == SHAPES and len(splits.train_images) + len(splits.test_images) == 24
    plain = _load(f"npz:{make_npz(tmp_path / 'plain.npz', names=False)}")
    assert plain.classes == ("0", "1", "2")
    x = np.zeros((4, 28, 28), np.uint8)
    x[:, 10:18, 10:18] = 255
    with_test = make_npz(tmp_path / "t.npz", x_test=x, y_test=np.array([0, 1, 2, 2]))
    assert len(_load(f"npz:{with_test}").test_images) == 4


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((3, 32, 32), np.uint8), "y": np.zeros(3)}, r"N x 28 x 28 uint8.*32, 32"),
        ({"x": np.zeros((3, 28, 28), np.float32), "y": np.zeros(3)}, "float32"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.zeros(4, int)}, "one integer label"),
        ({"x": np.zeros((3, 28, 28), np.uint8)}, "holds no 'y' array"),
        (
            {"x": np.zeros((3, 28, 28), np.uint8), "y": [0, 1, 5], "class_names": ["a", "b"]},
            "they must be 0 to 1",
        ),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.array([0, 1, 5])}, "have no images in y"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.array([0, 2, 2])}, r"1 \(1\)"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.array([0, -1, 1])}, "labels from -1"),
    ],
)
def test_npz_problems_are_one_line(tmp_path: Path, arrays: dict[str, object], needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(data.DataError, match=needle) as raised:
        _load(f"npz:{path}")
    assert "\n" not in str(raised.value)


def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(data.DataError, match=r"not a readable \.npz file"):
        _load(f"npz:{tmp_path / 'x.npz'}")


def test_own_dataset_names_and_settings_are_checked() -> None:
    assert dataset_label("folder:/data/my shapes") == "folder-my_shapes"
    assert dataset_label("npz:/data/glyphs.npz") == "npz-glyphs"
    for bad in (
        DataConfig(dataset="folder:"),
        DataConfig(dataset="zip:/x"),
        DataConfig(dataset="folder:/x", preprocess="sharpen"),
        DataConfig(dataset="folder:/x", test_fraction=1.0),
    ):
        with pytest.raises(ConfigError):
            bad.validate()


def test_validation_takes_at_most_a_tenth_of_own_training_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "shapes", per_class=20)
    lines: list[str] = []
    prepared = data.prepare_data(DataConfig(dataset=f"folder:{root}"), log=lines.append)
    assert prepared.val_size == len(prepared.val_x) == 51 // 10  # 3 x 17 training images
    assert any("at most a tenth" in line for line in lines)


# ----------------------------------------------------------------------------- end to end


def test_class_names_flow_from_the_folder_to_predict_and_evaluate(
    shapes_run: ShapesRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = load_model(shapes_run.checkpoint)
    assert loaded.class_names == SHAPES and loaded.model_config.num_classes == 3
    assert loaded.data_config.dataset == f"folder:{shapes_run.folder}"
    splits = _load(f"folder:{shapes_run.folder}")
    assert (loaded.mean, loaded.std) == (splits.mean, splits.std)
    # 60 images: 9 held out for testing, then a tenth of the other 51 for validation.
    assert loaded.data_config.val_size == 5
    capsys.readouterr()
    image = shapes_run.folder / "disc" / "000.png"
    assert main(["predict", str(shapes_run.checkpoint), str(image), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer[0]["prediction"] in SHAPES
    assert {c["class"] for c in answer[0]["top"]} == set(SHAPES)
    assert main(["evaluate", str(shapes_run.checkpoint), "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "(3 images)" in report and "test accuracy:" in report
    lines = report.splitlines()
    header = lines[lines.index("confusion matrix (rows: true class, columns: predicted):") + 1]
    assert header.split() == ["cross", "disc", "squar"]  # the matrix's columns name classes too
    assert (tmp_path / "confusion.png").is_file()


def test_the_api_and_the_page_get_the_class_names(shapes_run: ShapesRun) -> None:
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (Starlette's test client) is not installed")
    from fastapi.testclient import TestClient

    from mnist_resnet.serve import create_app

    with TestClient(create_app(shapes_run.checkpoint), base_url="http://localhost") as client:
        model = client.get("/model").json()
        assert model["class_names"] == list(SHAPES) and model["preprocess"] == "mnist"
        png = (shapes_run.folder / "square" / "001.png").read_bytes()
        answer = client.post("/predict", files={"file": ("s.png", png, "image/png")}).json()
        assert answer["predictions"][0]["prediction"] in SHAPES
        # The page titles itself from /model: "Draw a digit" only for digits.
        assert "m.class_names" in client.get("/static/app.js").text


def test_a_resume_refuses_a_folder_whose_content_changed(
    shapes_run: ShapesRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_image_folder(tmp_path / "shapes", per_class=20)
    argv = ["train", "--dataset", f"folder:{folder}", *shapes_run.flags, "--epochs", "2"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--name", "r", "--preprocess", "resize"]
    # Ctrl-C is not needed: resuming from the first epoch's checkpoint of a finished run.
    assert main(argv) == 0
    first = tmp_path / "runs" / "r" / "checkpoints" / "epoch-001.pt"
    assert load_model(first).data_config.preprocess == "resize"
    (folder / "disc" / "000.png").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(first)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"in folder:{folder} (their content changed)" in err


def test_an_npz_dataset_trains_and_a_bad_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_npz(tmp_path / "shapes.npz", per_class=12)
    argv = ["train", "--dataset", f"npz:{path}", "--depth", "8", "--epochs", "1"]
    argv += ["--batch-size", "8", "--no-amp", "--runs-dir", str(tmp_path / "runs")]
    assert main([*argv, "--name", "n"]) == 0
    assert load_model(tmp_path / "runs" / "n" / "best.pt").class_names == SHAPES
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 28, 28), np.uint8))
    capsys.readouterr()
    assert main([*argv[:2], f"npz:{tmp_path / 'bad.npz'}", *argv[3:], "--name", "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no 'y' array" in err
