"""precision: bf16 autocast only where a cached probe measured it faster; flags force it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mnist_resnet import precision
from mnist_resnet.precision import MIN_SPEEDUP, Probe, choose

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / precision.CACHE_FILE


def _fake_probe(monkeypatch: pytest.MonkeyPatch, fp32: float, bf16: float) -> list[bool]:
    calls: list[bool] = []

    def measure(channels_last: bool, **_: object) -> Probe:
        calls.append(channels_last)
        return Probe(fp32, bf16, fp32 / bf16, "2026-01-01")

    monkeypatch.setattr(precision, "measure", measure)
    return calls


def test_flags_force_the_choice_without_a_probe(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_probe(monkeypatch, 1.0, 0.5)
    assert choose(CPU, True, True).dtype == torch.bfloat16
    forced_off = choose(CPU, False, True)
    assert forced_off.dtype is None and "fp32" in forced_off.reason
    assert calls == [] and not cache.exists()


def test_bf16_is_chosen_where_it_measured_faster_and_the_verdict_is_cached(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_probe(monkeypatch, 1.0, 0.5)
    first = choose(CPU, None, True)
    assert first.dtype == torch.bfloat16
    assert "2.00x" in first.reason and "measured just now" in first.reason
    again = choose(CPU, None, True)
    assert again.dtype == torch.bfloat16 and f"cached in {cache}" in again.reason
    assert calls == [True]  # measured once, then read back
    saved = json.loads(cache.read_text())
    assert [entry["bf16_seconds"] for entry in saved.values()] == [0.5]


@pytest.mark.parametrize("bf16_seconds", [1.5, 1.0, 1 / (MIN_SPEEDUP - 0.01)])
def test_fp32_where_bf16_is_slower_or_only_marginally_faster(
    cache: Path, monkeypatch: pytest.MonkeyPatch, bf16_seconds: float
) -> None:
    _fake_probe(monkeypatch, 1.0, bf16_seconds)
    chosen = choose(CPU, None, True)
    assert chosen.dtype is None and chosen.reason.startswith("fp32")
    assert "--amp forces bf16" in chosen.reason


def test_another_kernel_set_or_layout_is_measured_apart(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Start from no oneDNN cap, so the AVX2 cap below is a change whatever the suite runs under.
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    calls = _fake_probe(monkeypatch, 1.0, 0.5)
    choose(CPU, None, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    choose(CPU, None, True)
    choose(CPU, None, False)
    assert calls == [True, True, False]
    assert len(json.loads(cache.read_text())) == 3


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", '{"KEY": {"fp32_seconds": "x"}}', '{"KEY": {}}']
)
def test_a_damaged_cache_is_measured_again_and_rewritten(
    cache: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text(content.replace("KEY", precision.probe_key(True)))
    calls = _fake_probe(monkeypatch, 1.0, 0.5)
    assert choose(CPU, None, True).dtype == torch.bfloat16
    assert calls == [True]
    assert precision.probe_key(True) in json.loads(cache.read_text())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_folder_still_gives_a_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setenv(precision.CACHE_ENV, str(folder))
    _fake_probe(monkeypatch, 1.0, 2.0)
    chosen = choose(CPU, None, True)
    assert chosen.dtype is None and "not writable" in chosen.reason


def test_a_cache_folder_that_is_a_file_still_gives_a_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(precision.CACHE_ENV, str(blocker / "sub"))
    _fake_probe(monkeypatch, 1.0, 2.0)
    chosen = choose(CPU, None, True)
    assert chosen.dtype is None and "not writable" in chosen.reason


def test_the_real_probe_times_both_precisions_and_leaves_the_random_state_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    probe = precision.measure(True, batch=8, budget_s=0.05)
    assert torch.equal(torch.get_rng_state(), before)
    assert probe.fp32_seconds > 0 and probe.bf16_seconds > 0
    assert probe.speedup > 0


def test_default_cache_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(precision.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_dir() == tmp_path / "mnist-resnet"
