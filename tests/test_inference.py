"""inference: normalisation and logits, shared by every model user without the data layer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mnist_resnet.images import to_float


def test_to_float() -> None:
    x = torch.tensor([[0, 255]], dtype=torch.uint8)
    out = to_float(x, 0.1307, 0.3081)
    assert out.dtype == torch.float32
    assert out.tolist()[0] == pytest.approx([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081])


def test_serving_and_predicting_never_import_the_downloader() -> None:
    # A request image goes serve -> predict -> inference -> model: none of it needs the dataset
    # table, the mirrors or the package-index fallback.
    code = (
        "import sys, mnist_resnet.serve, mnist_resnet.predict, mnist_resnet.inference; "
        "print(sorted(m for m in sys.modules if m.startswith('mnist_resnet.data')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
