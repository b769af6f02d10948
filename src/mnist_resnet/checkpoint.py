"""Atomic checkpoint writes and verified loads.

A checkpoint is a plain dict of tensors and primitives, loadable with `weights_only=True`, so
opening a file from elsewhere cannot run code. It always carries the three configs and the data
hashes, so the model can be rebuilt and its provenance checked from the file alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_resnet.config import DataConfig, ModelConfig, from_dict
from mnist_resnet.errors import UserError
from mnist_resnet.files import atomic_write
from mnist_resnet.model import build_model, fold_batchnorm

FORMAT = "mnist-resnet"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "config", "model", "epoch")


class CheckpointError(UserError):
    """A checkpoint cannot be written or read; the message names the file and the reason."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash at any moment leaves either the old file or the complete new one, never a torn one.
    """
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    state["weights_sha256"] = weights_digest(state["model"])
    try:
        atomic_write(path, lambda f: torch.save(state, f), durable=True)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes: detects edited or damaged weights
    that still unpickle (torch.load checks the zip structure, not the tensor bytes)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and check a checkpoint; any problem becomes one `CheckpointError` line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except Exception as e:
        # Damaged files make torch.load fail in many ways (UnpicklingError, RuntimeError,
        # BadZipFile, even AssertionError, found by the hypothesis test): all mean the same.
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path} is not a readable mnist-resnet checkpoint (truncated, corrupted or "
            f"foreign file): {first_line[:200]}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mnist-resnet checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('format_version')!r}; "
            f"this version of mnist-resnet reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    if not isinstance(state["model"], dict) or not all(
        isinstance(v, torch.Tensor) for v in state["model"].values()
    ):
        raise CheckpointError(f"{path} holds no model weights")
    recorded = state.get("weights_sha256")
    if recorded is not None and recorded != weights_digest(state["model"]):
        raise CheckpointError(
            f"{path}: weights do not match their recorded checksum (tampered or corrupted)"
        )
    return state


def latest_loadable(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The last of `paths` (ordered oldest first) that loads cleanly; corrupt ones are skipped."""
    for candidate in reversed(paths):
        try:
            return candidate, load_checkpoint(candidate)
        except CheckpointError:
            continue
    return None


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    state: dict[str, Any]
    model_config: ModelConfig
    data_config: DataConfig
    preset: str
    mean: float
    std: float
    class_names: tuple[str, ...]


def load_model(path: Path | str, *, fold: bool = True) -> LoadedModel:
    """Rebuild a checkpoint's model from its saved config, for inference on the CPU.

    The model is in eval mode with its batch norms folded into their convs (`fold=False`
    keeps them, for code that still needs them, e.g. to re-estimate their statistics); the
    trained weights as saved stay in `LoadedModel.state["model"]`.
    """
    state = load_checkpoint(path)
    config = state["config"]
    model_cfg = from_dict(ModelConfig, config["model"])
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the saved model config") from e
    # Loaded models only predict (evaluate, ensemble, predict, serve, export): fold batch norms.
    if fold:
        fold_batchnorm(model)
    else:
        model.eval()
    norm = state.get("normalization", {})
    return LoadedModel(
        model=model,
        state=state,
        model_config=model_cfg,
        data_config=from_dict(DataConfig, config["data"]),
        preset=str(config.get("preset", "custom")),
        mean=float(norm.get("mean", 0.0)),
        std=float(norm.get("std", 1.0)),
        class_names=tuple(state.get("class_names", [str(i) for i in range(model_cfg.num_classes)])),
    )


# Checkpoint names within a run directory: checkpoints/epoch-NNN[-step-SSSSS].pt

_CKPT_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?\.pt")


def checkpoint_name(epochs_done: int, step: int = 0) -> str:
    """`epoch-003.pt` after 3 whole epochs; `epoch-003-step-00120.pt` 120 steps into the 4th."""
    return (
        f"epoch-{epochs_done:03d}.pt"
        if step == 0
        else f"epoch-{epochs_done:03d}-step-{step:05d}.pt"
    )


def _progress(path: Path) -> tuple[int, int]:
    match = _CKPT_NAME.fullmatch(path.name)
    if match is None:
        return (-1, -1)
    return int(match[1]), int(match[2] or 0)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's epoch and mid-epoch checkpoints, oldest progress first."""
    found = [p for p in (run_dir / "checkpoints").glob("epoch-*.pt") if _progress(p)[0] >= 0]
    return sorted(found, key=_progress)
