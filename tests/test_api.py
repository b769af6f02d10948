"""The Python API (`mnist_resnet.load`, `Classifier.predict`) and the torch.hub entries, on the
shipped models: the README's snippet runs, every kind of picture gets the same answer, and the
`predict` command prints what `predict` returns."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import mnist_resnet
from mnist_resnet import pretrained
from mnist_resnet.checkpoint import CheckpointError
from mnist_resnet.cli import main
from mnist_resnet.config import ConfigError
from mnist_resnet.images import UnreadableImage
from mnist_resnet.predict import Classifier, Prediction

REPO = Path(__file__).resolve().parents[1]


def readme_python() -> str:
    """The fenced Python block under the README's "Use from Python" heading."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "no ```python block under 'Use from Python'"
    return found.group(1)


def drawn_seven(size: tuple[int, int] = (240, 300)) -> Image.Image:
    """Dark ink on light paper, larger than MNIST and off-centre: what a user photographs."""
    page = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(page)
    draw.line([(60, 70), (180, 70), (110, 250)], fill=(30, 30, 40), width=16, joint="curve")
    return page


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return mnist_resnet.load("mnist")


def test_the_readme_snippet_runs_as_written(tmp_path: Path) -> None:
    drawn_seven().save(tmp_path / "digit.png")
    drawn_seven((200, 200)).convert("L").save(tmp_path / "other.png")
    # Its own interpreter, in a folder of its own: as a user pastes it.
    done = subprocess.run(
        [sys.executable, "-c", readme_python()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    label, probability, verdict = done.stdout.split()
    assert label == "7" and probability.endswith("%") and verdict == "sure"


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, mnist_resnet; print('torch' in sys.modules, callable(mnist_resnet.load))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "True"], done.stderr


@pytest.mark.numerics
def test_every_kind_of_picture_gets_the_same_answer(clf: Classifier, tmp_path: Path) -> None:
    page = drawn_seven()
    path = tmp_path / "seven.png"
    page.save(path)
    array = np.array(page)  # (H, W, 3) uint8
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W), torchvision's layout
    inputs = [str(path), path, Image.open(path), page, array, tensor]
    answers = [clf.predict(image, k=3) for image in inputs]  # one in, one out
    assert all(a == answers[0] for a in answers), answers
    one = answers[0]
    assert isinstance(one, Prediction)
    # A list in, a list out; one batch (its kernels may round the last digit differently).
    batch = clf.predict(inputs, k=3)
    assert isinstance(batch, list) and len(batch) == len(inputs)
    assert all(b.label == one.label and b.verdict == one.verdict for b in batch)
    np.testing.assert_allclose(batch[-1].probabilities, one.probabilities, atol=1e-5)
    assert (one.index, one.label, one.verdict) == (7, "7", "sure")
    assert one.probability == one.probabilities[7] == one.top[0].probability
    assert len(one.probabilities) == 10 and abs(sum(one.probabilities) - 1) < 1e-5
    assert [r.index for r in one.top] == sorted(range(10), key=lambda i: -one.probabilities[i])[:3]
    # Gray pictures too: a 2-D array, a (1, H, W) tensor and an "L" image agree.
    gray = page.convert("L")
    flat = np.array(gray)
    same = [clf.predict(image) for image in (gray, flat, torch.from_numpy(flat)[None])]
    assert same[0] == same[1] == same[2] and same[0].label == "7"
    # The prepared input, given as it is, gets the same answer again.
    pixels = clf.prepare(path)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert clf.predict(pixels, preprocess=False) == one
    assert clf.predict(torch.from_numpy(pixels), preprocess=False) == one


def test_the_predict_command_prints_what_predict_returns(
    clf: Classifier, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "seven.png"
    drawn_seven().save(path)
    capsys.readouterr()
    assert main(["predict", str(path), "--json", "--top-k", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]
    assert printed == {"file": str(path), **clf.predict(path, k=2).as_dict()}


def test_unusable_inputs_are_one_clear_error(clf: Classifier, tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="uint8"):
        clf.predict(np.zeros((28, 28), np.float32))
    with pytest.raises(UnreadableImage, match="shape"):
        clf.predict(np.zeros((28, 28, 2), np.uint8))
    with pytest.raises(UnreadableImage, match="28x28"):
        clf.predict(np.zeros((30, 30), np.uint8), preprocess=False)
    # An (N, 28, 28) array, as MNIST-style sets are kept, is told how to go in as a batch.
    batch = np.zeros((5, 28, 28), np.uint8)
    batch[:, 8:20, 13:15] = 255
    with pytest.raises(UnreadableImage, match=r"a batch\? give a list of images"):
        clf.predict(batch)
    assert [p.label for p in clf.predict(list(batch))] == [clf.predict(batch[0]).label] * 5
    with pytest.raises(UnreadableImage, match=r"no such file|cannot read"):
        clf.predict(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="cannot read a dict"):
        clf.predict({"image": 1})  # type: ignore[call-overload]
    assert clf.predict([]) == []
    with pytest.raises(CheckpointError, match="no shipped model or file named 'cifar'"):
        mnist_resnet.load("cifar")


def test_a_checkpoint_file_loads_like_a_shipped_name(clf: Classifier) -> None:
    by_path = mnist_resnet.load(pretrained.weights_path("mnist"))
    page = drawn_seven()
    assert by_path.predict(page) == clf.predict(page)
    assert isinstance(by_path.model, torch.nn.Module) and not by_path.model.training


# ----------------------------------------------------------------------------- torch.hub


def test_torch_hub_entries(clf: Classifier) -> None:
    assert pretrained.NAMES == ("mnist", "fashion-mnist")
    net = torch.hub.load(str(REPO), "mnist", source="local")
    assert isinstance(net, torch.nn.Module) and not net.training
    # float32 parameters, as a PyTorch user expects, whatever dtype the file stores.
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    x = torch.from_numpy(clf.prepare(drawn_seven())).float()[None, None]
    x = (x / 255 - clf.loaded.mean) / clf.loaded.std
    with torch.no_grad():
        # The hub's network keeps its batch norms (to fine-tune); the Classifier folds them.
        torch.testing.assert_close(net(x), clf.model(x), atol=1e-4, rtol=1e-4)
    fashion = torch.hub.load(str(REPO), "fashion_mnist", source="local")
    assert fashion(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    untrained = torch.hub.load(str(REPO), "mnist", pretrained=False, source="local")
    assert type(untrained) is type(net)
    assert not torch.equal(untrained.state_dict()["fc.weight"], net.state_dict()["fc.weight"])
    wrapped = torch.hub.load(str(REPO), "classifier", "mnist", source="local")
    assert wrapped.predict(drawn_seven()) == clf.predict(drawn_seven())
    letters = torch.hub.load(str(REPO), "resnet", "best", num_classes=26, source="local")
    assert letters(torch.zeros(2, 1, 28, 28)).shape == (2, 26)
    with pytest.raises(ConfigError, match="unknown model settings"):
        torch.hub.load(str(REPO), "resnet", "best", classes=26, source="local")
