"""batching: the micro-batcher answers each request with its own rows, batches what waits,
respects its limits, and never leaves a request hanging."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from mnist_resnet.batching import BatcherClosed, MicroBatcher


def _images(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 28, 28), value, np.uint8)


def _score(images: np.ndarray) -> np.ndarray:
    """A fake model whose "probabilities" name the image: row i is [pixel value of image i]."""
    return images[:, :1, 0].astype(np.float32)


class Gate:
    """A model that holds its first call until released, so requests pile up behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        self.entered.set()
        assert self.release.wait(30)
        return _score(images)


async def _submit_all(batcher: MicroBatcher, values: list[int], n: int = 1) -> list[np.ndarray]:
    return await asyncio.gather(*(batcher.submit(_images(v, n)) for v in values))


def test_each_request_gets_its_own_rows_and_waiting_requests_share_a_call() -> None:
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=64, max_delay_s=0.0)

    async def scenario() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.submit(_images(1)))
        await asyncio.to_thread(gate.entered.wait, 30)  # the model is busy with request 1
        rest = [asyncio.ensure_future(batcher.submit(_images(v, 2))) for v in range(2, 12)]
        await asyncio.sleep(0)  # all ten queued behind the busy model
        while batcher._jobs.qsize() < 10:
            await asyncio.sleep(0.001)
        gate.release.set()
        return [await first, *[await r for r in rest]]

    answers = asyncio.run(scenario())
    batcher.close()
    assert [a.ravel().tolist() for a in answers] == [[1.0]] + [[v, v] for v in range(2, 12)]
    # The first call had request 1 alone; the ten that waited were answered by one more call.
    assert gate.sizes == [1, 20]


def test_a_batch_never_exceeds_max_batch_and_nothing_is_lost() -> None:
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=8, max_delay_s=0.0)

    async def scenario() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.submit(_images(0)))
        await asyncio.to_thread(gate.entered.wait, 30)
        rest = [asyncio.ensure_future(batcher.submit(_images(v, 3))) for v in range(1, 8)]
        while batcher._jobs.qsize() < 7:
            await asyncio.sleep(0.001)
        gate.release.set()
        return [await first, *[await r for r in rest]]

    answers = asyncio.run(scenario())
    batcher.close()
    assert [a.ravel().tolist() for a in answers[1:]] == [[v] * 3 for v in range(1, 8)]
    assert max(gate.sizes) <= 8 and sum(gate.sizes) == 1 + 7 * 3
    assert gate.sizes == [1, 6, 6, 6, 3]  # whole requests only: 3 + 3 fit in 8, a third does not


def test_a_model_failure_reaches_every_request_of_its_batch() -> None:
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    batcher = MicroBatcher(broken, max_batch=16, max_delay_s=0.001)

    async def scenario() -> list[object]:
        return await asyncio.gather(
            *(batcher.submit(_images(v)) for v in range(5)), return_exceptions=True
        )

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in outcomes)
    # And the batcher still answers afterwards with a working model.
    batcher.run = _score
    assert asyncio.run(_submit_all(batcher, [7]))[0].item() == 7.0
    batcher.close()


def test_closing_answers_what_is_queued_and_refuses_new_requests() -> None:
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=1, max_delay_s=0.0)

    async def scenario() -> list[object]:
        jobs = [asyncio.ensure_future(batcher.submit(_images(v))) for v in range(3)]
        await asyncio.to_thread(gate.entered.wait, 30)
        closer = asyncio.ensure_future(asyncio.to_thread(batcher.close))
        gate.release.set()
        await closer
        return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    answered = [o for o in outcomes if isinstance(o, np.ndarray)]
    refused = [o for o in outcomes if isinstance(o, BatcherClosed)]
    assert len(answered) >= 1 and len(answered) + len(refused) == 3
    with pytest.raises(BatcherClosed):
        asyncio.run(_submit_all(batcher, [1]))


def test_an_idle_batcher_answers_a_lone_request_after_at_most_its_delay() -> None:
    sizes: list[int] = []

    def model(images: np.ndarray) -> np.ndarray:
        sizes.append(len(images))
        return _score(images)

    batcher = MicroBatcher(model, max_batch=64, max_delay_s=0.005)
    assert asyncio.run(_submit_all(batcher, [3]))[0].item() == 3.0
    batcher.close()
    assert sizes == [1]


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(_score, max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(_score, max_delay_s=-1.0)
