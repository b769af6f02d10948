"""serve: the HTTP API through FastAPI's test client, including hostile uploads."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_resnet import data

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx2", reason="httpx2 (Starlette's test client) is not installed")
from fastapi.testclient import TestClient

from mnist_resnet.serve import MAX_BODY_BYTES, create_app


@pytest.fixture(scope="module")
def client(small_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(small_checkpoint)) as c:
        yield c


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    splits = data.load("mnist", mnist_root, log=lambda _: None)
    return splits.test_images[:32].numpy(), splits.test_labels[:32].numpy()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_health_model_schema_and_page(client: TestClient, small_checkpoint: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["preset"] and 0.5 < info["test_accuracy"] <= 1.0
    assert len(info["checkpoint_sha256"]) == 64 and "t10k-images-idx3-ubyte" in info["data_hashes"]
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: every asset is local
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.numerics
def test_uploads_and_pixel_arrays_predict_digits(
    client: TestClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    files = [("file", (f"{i}.png", _png(255 - images[i]), "image/png")) for i in range(8)]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 8 and all(len(p["top"]) == 3 for p in predictions)
    assert sum(p["prediction"] == str(y) for p, y in zip(predictions, labels, strict=False)) >= 7
    top = predictions[0]["top"]
    assert top[0]["class"] == predictions[0]["prediction"]
    assert 0 <= top[2]["probability"] <= top[1]["probability"] <= top[0]["probability"] <= 1

    as_json = client.post("/predict", json={"images": images.tolist(), "top_k": 1})
    assert as_json.status_code == 200
    got = [p["prediction"] for p in as_json.json()["predictions"]]
    assert len(got) == 32 and sum(g == str(y) for g, y in zip(got, labels, strict=True)) >= 28


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"files": {"file": ("x.png", b"", "image/png")}}, 400, "empty"),
        ({"files": {"file": ("x.png", b"<html>hi</html>", "image/png")}}, 400, "not an image"),
        (
            {"files": {"file": ("x.png", _png(np.zeros((20, 20), np.uint8)), "image/png")}},
            422,
            "blank",
        ),
        ({"files": {"other": ("x.png", b"abc", "image/png")}}, 422, "field 'file'"),
        ({"json": {"images": [[[0] * 27] * 28]}}, 422, "28x28"),
        ({"json": {"images": [[[300] * 28] * 28]}}, 422, "0..255"),
        ({"json": {"images": []}}, 422, "invalid JSON"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ],
)
def test_bad_requests_get_clear_4xx(
    client: TestClient, kwargs: dict[str, object], status: int, needle: str
) -> None:
    answer = client.post("/predict", **kwargs)  # type: ignore[arg-type]
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["detail"]


def test_oversized_and_hostile_uploads_leave_the_server_answering(
    client: TestClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    big = b"\0" * (MAX_BODY_BYTES + 1)
    assert client.post("/predict", files={"file": ("big.png", big, "image/png")}).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(6):
            yield b"\0" * (1024 * 1024)

    streamed = client.post(
        "/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert streamed.status_code == 413
    bomb = Image.new("1", (9000, 9000))  # 81 MP, 10 KB as PNG: over the pixel limit
    buf = io.BytesIO()
    bomb.save(buf, "PNG")
    answer = client.post("/predict", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert answer.status_code == 400 and "decompression bomb" in answer.json()["detail"]
    truncated = _png(255 - digits[0][0])[:100]
    assert client.post("/predict", files={"file": ("t.png", truncated)}).status_code == 400
    # Still answering, and still right.
    ok = client.post("/predict", files={"file": ("d.png", _png(digits[0][1]), "image/png")})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["prediction"] == str(digits[1][1])
