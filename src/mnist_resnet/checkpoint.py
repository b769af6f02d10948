"""Atomic checkpoint writes and verified loads.

A checkpoint is a plain dict of tensors and primitives, loadable with `weights_only=True`, so
opening a file from elsewhere cannot run code. It always carries the three configs and the data
hashes, so the model can be rebuilt and its provenance checked from the file alone.

The same state can be written as `.safetensors` (no pickle at all): the tensors are the plain
model's state dict, loadable by `safetensors.torch.load_file` alone, and every other entry of
the state (configs, normalisation, class names, calibration, detector, checksums) is JSON in the
header's metadata, one entry per key. Only what inference needs travels there (`INFERENCE_KEYS`:
no optimizer or resume state). Both forms are read by `load_checkpoint`, told apart by content,
and pass the same checks.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from mnist_resnet.calibration import Calibration, CalibrationError
from mnist_resnet.config import ConfigError, DataConfig, ModelConfig, from_dict
from mnist_resnet.errors import UserError
from mnist_resnet.files import atomic_write, hash_file
from mnist_resnet.model import build_model, check_size, fold_batchnorm
from mnist_resnet.ood import Detector, DetectorError, Scored, decode_tensor, encode_tensor

FORMAT = "mnist-resnet"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "config", "model", "epoch")
# What inference and checkpoint validation read; the rest (optimizer, schedule, weight average,
# RNG and mid-epoch state) only serves a resume, and stays out of shipped and .safetensors files.
INFERENCE_KEYS = (
    "config",
    "model",
    "epoch",
    "data_hashes",
    "normalization",
    "class_names",
    "test",
    "best",
    "calibration",
    "ood",
    "pretrained",
    "members",
)
SAFETENSORS_SUFFIX = ".safetensors"
# A weight stored as int8 (`packaging.stored_weights`) travels with one float scale per output
# channel under its own name plus this suffix; no module parameter name holds a ':'.
INT8_SCALE = ":int8_scale"
# What a command line's argument must end in to be read as a checkpoint rather than an image.
CHECKPOINT_SUFFIXES = (".pt", ".pth", SAFETENSORS_SUFFIX)


class CheckpointError(UserError):
    """A checkpoint cannot be written or read; the message names the file and the reason."""


def save_checkpoint(path: Path, state: dict[str, Any], *, safetensors: bool | None = None) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash at any moment leaves either the old file or the complete new one, never a torn one.
    `safetensors` (default: when `path` ends in `.safetensors`) writes the safetensors form,
    which keeps only `INFERENCE_KEYS`.
    """
    if safetensors is None:
        safetensors = path.suffix == SAFETENSORS_SUFFIX
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    if safetensors:
        state = {
            k: v for k, v in state.items() if k in ("format", "format_version", *INFERENCE_KEYS)
        }
    state["weights_sha256"] = weights_digest(state["model"])
    state["config_sha256"] = config_digest(state)
    try:
        payload = _safetensors_bytes(state) if safetensors else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot write {path} as safetensors: {e}") from e
    try:
        atomic_write(
            path,
            (lambda f: f.write(payload)) if payload is not None else lambda f: torch.save(state, f),
            durable=True,
        )
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
    except RuntimeError as e:
        # torch.save reports a failed write (a full disk, say) as its own RuntimeError.
        why = "no space left on the device" if _disk_full(path) else str(e).splitlines()[0][:120]
        raise CheckpointError(
            f"cannot write checkpoint {path}: {why}; the previous checkpoint is intact"
        ) from e


def _safetensors_bytes(state: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    meta = dict(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in meta.pop("model").items()}
    if isinstance(meta.get("ood"), dict):
        ood = dict(meta["ood"])
        ood["tensors"] = {k: encode_tensor(v) for k, v in ood.get("tensors", {}).items()}
        meta["ood"] = ood
    # allow_nan=False: the header must be JSON that any reader parses.
    return save(tensors, {k: json.dumps(v, allow_nan=False) for k, v in meta.items()})


def is_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte header length, then JSON."""
    try:
        with path.open("rb") as f:
            head = f.read(10)
    except OSError:
        return False
    return len(head) == 10 and head[8:9] == b"{" and head[:2] != b"PK"


def _read_safetensors(path: Path) -> dict[str, Any]:
    """The state a `.safetensors` checkpoint holds, in the form `torch.load` gives a `.pt`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as e:
        # The safetensors reader raises its own SafetensorError (and others) for damaged files.
        raise _unreadable(path, e, "safetensors file") from e
    state: dict[str, Any] = {}
    for key, text in metadata.items():
        try:
            state[key] = json.loads(text)
        except ValueError:
            raise CheckpointError(
                f"{path}: its metadata entry {key[:40]!r} is not JSON (edited or damaged file)"
            ) from None
    state["model"] = tensors
    if state.get("format") == FORMAT and not {"weights_sha256", "config_sha256"} <= set(state):
        # Every safetensors file mnist-resnet writes has both: without them nothing is checked.
        raise CheckpointError(f"{path}: its checksums are missing (edited or foreign file)")
    ood = state.get("ood")
    if isinstance(ood, dict) and isinstance(ood.get("tensors"), dict):
        try:
            ood["tensors"] = {str(k): decode_tensor(v) for k, v in ood["tensors"].items()}
        except (TypeError, ValueError, RuntimeError, binascii.Error) as e:
            raise CheckpointError(f"{path}: its detector's tensors are damaged ({e})") from None
    return state


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        return False


def config_digest(state: dict[str, Any]) -> str:
    """SHA-256 over what rebuilds and feeds the model besides its weights: the configs, the
    normalisation and the class names, so an edited config is caught like edited weights."""
    covered = {key: state.get(key) for key in ("config", "normalization", "class_names")}
    # Post-hoc data (calibrate) is covered when present, so files written before it existed
    # keep their digests.
    if "calibration" in state:
        covered["calibration"] = state["calibration"]
    if isinstance(state.get("ood"), dict):
        ood = dict(state["ood"])
        tensors = ood.pop("tensors", {})
        ood["tensors_sha256"] = weights_digest(tensors) if isinstance(tensors, dict) else None
        covered["ood"] = ood
    text = json.dumps(covered, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


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
    state = _read_safetensors(path) if is_safetensors(path) else _read_pickled(path)
    return _checked(path, state)


def _read_pickled(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about, and advises loading with weights_only=False, files holding
            # arbitrary objects: advice a user must not follow for a file they did not make.
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: it holds Python objects other than tensors and settings, "
            "which could run code when loaded (not a file mnist-resnet wrote)"
        ) from e
    except Exception as e:
        # Damaged files make torch.load fail in many ways (UnpicklingError, RuntimeError,
        # BadZipFile, even AssertionError, found by the hypothesis test): all mean the same.
        raise _unreadable(path, e, "mnist-resnet checkpoint") from e
    return state


def _unreadable(path: Path, e: Exception, kind: str) -> CheckpointError:
    """One line for a file its reader failed on: the system's reason, or the reader's first."""
    if isinstance(e, OSError):
        return CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}")
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(
        f"{path} is not a readable {kind} (truncated, corrupted or foreign file): "
        f"{first_line[:200]}"
    )


def _checked(path: Path, state: Any) -> dict[str, Any]:
    """The checks every checkpoint passes, whichever form it was read from."""
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
    # Written by every save since the config joined the checksum; older files are still
    # bounded by the validation in `load_model`.
    recorded = state.get("config_sha256")
    if recorded is not None and recorded != config_digest(state):
        raise CheckpointError(
            f"{path}: its config does not match its recorded checksum (edited or corrupted)"
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
    # How logits become probabilities, and the out-of-distribution detector: fitted after
    # training by `mnist-resnet calibrate` (docs/calibration.md); none for older files.
    calibration: Calibration = field(default_factory=Calibration)
    detector: Detector | None = None

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    def scored(self) -> Scored:
        """The network with its calibration and detector (for serving and export)."""
        return Scored(self.model, self.calibration, self.detector)

    @property
    def trained_amp(self) -> bool | None:
        """Whether the run trained, and was judged, in bf16 autocast, as its config records it;
        None when the file does not say (the precision is then decided afresh)."""
        saved = self.state["config"].get("train")  # unchecked by load_model: read warily
        recorded = saved.get("amp") if isinstance(saved, dict) else None
        return recorded if isinstance(recorded, bool) else None


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv or linear weight as int8 steps and one float32 scale per output channel
    (`float_weights` undoes it). Symmetric: each channel's largest weight maps to 127, so no
    weight is clipped and each moves by at most half a step."""
    full = weight.float()
    scale = full.abs().amax(dim=tuple(range(1, full.dim()))) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (full / _per_channel(scale, full)).round().clamp(-127, 127).to(torch.int8), scale


def _per_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`scale` (one value per output channel) shaped to multiply `weight`."""
    return scale.float().reshape(-1, *[1] * (weight.dim() - 1))


def float_weights(path: Path | str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` as the network takes them: each int8 weight times its scales, in float32;
    every other tensor as stored (`load_state_dict` widens float16 as it copies)."""
    widened = {}
    for key, tensor in weights.items():
        if key.endswith(INT8_SCALE):
            if key.removesuffix(INT8_SCALE) not in weights:
                raise CheckpointError(f"{path}: {key[:60]!r} scales no weight (edited file)")
            continue
        scale = weights.get(key + INT8_SCALE)
        if scale is None and tensor.dtype != torch.int8:
            widened[key] = tensor
            continue
        if (
            scale is None
            or tensor.dtype != torch.int8
            or tensor.dim() < 2
            or not scale.is_floating_point()
            or tuple(scale.shape) != (tensor.shape[0],)
            or not bool(torch.isfinite(scale).all())
        ):
            raise CheckpointError(
                f"{path}: its int8 weight {key[:60]!r} does not fit its scales (edited file)"
            )
        widened[key] = tensor.float() * _per_channel(scale, tensor)
    return widened


def load_model(path: Path | str, *, fold: bool = True) -> LoadedModel:
    """Rebuild a checkpoint's model from its saved config, for inference on the CPU.

    The model is in eval mode with its batch norms folded into their convs (`fold=False`
    keeps them, for code that still needs them, e.g. to re-estimate their statistics); the
    trained weights as saved stay in `LoadedModel.state["model"]`.
    """
    state = load_checkpoint(path)
    model_cfg, data_cfg, mean, std, class_names = _validated(path, state)
    model = build_model(model_cfg)
    try:
        model.load_state_dict(float_weights(path, state["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the saved model config") from e
    # Loaded models only predict (evaluate, ensemble, predict, serve, export): fold batch norms.
    if fold:
        fold_batchnorm(model)
    else:
        model.eval()
    calibration, detector = posthoc_data(path, state)
    if detector is not None and not set(detector.taps) <= {n for n, _ in model.named_modules()}:
        raise CheckpointError(f"{path}: its detector reads layers this model does not have")
    return LoadedModel(
        model=model,
        state=state,
        model_config=model_cfg,
        data_config=data_cfg,
        preset=str(state["config"].get("preset", "custom")),
        mean=mean,
        std=std,
        class_names=class_names,
        calibration=calibration,
        detector=detector,
    )


def posthoc_data(path: Path | str, state: dict[str, Any]) -> tuple[Calibration, Detector | None]:
    """The calibration and detector of a checkpoint: its own, or for a shipped model those in
    the metadata JSON beside it, when that JSON names this very file by its SHA-256."""
    source: dict[str, Any] = state
    where = str(path)
    if "calibration" not in state and isinstance(state.get("pretrained"), dict):
        beside = Path(path).with_suffix(".json")
        try:
            meta = json.loads(beside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("sha256") == hash_file(Path(path)):
            source, where = meta, str(beside)
    if "calibration" not in source:
        return Calibration(), None
    try:
        calibration = Calibration.from_dict(source["calibration"])
        raw = source.get("ood")
        detector = None if raw is None else Detector.from_dict(raw)
    except (CalibrationError, DetectorError) as e:
        raise CheckpointError(f"{where}: its calibration data is damaged ({e})") from e
    return calibration, detector


def _validated(
    path: Path | str, state: dict[str, Any]
) -> tuple[ModelConfig, DataConfig, float, float, tuple[str, ...]]:
    """Everything a model is built and fed from, checked before anything is allocated: the
    configs (types, bounds, size), the normalisation, the class names, finite weights."""
    config = state["config"]
    try:
        if not isinstance(config, dict):
            raise ConfigError(f"expected a mapping of configs, got {type(config).__name__}")
        model_cfg = from_dict(ModelConfig, config.get("model"))
        data_cfg = from_dict(DataConfig, config.get("data"))
        check_size(model_cfg)
        data_cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid saved config ({e}); edited or damaged file") from e
    norm = state.get("normalization", {})
    mean, std = (norm.get(k) if isinstance(norm, dict) else None for k in ("mean", "std"))
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (mean, std)):
        raise CheckpointError(f"{path}: its normalisation is missing or not finite: {norm!r:.80}")
    mean, std = float(cast(float, mean)), float(cast(float, std))
    if not (-10.0 <= mean <= 10.0 and 1e-3 <= std <= 10.0):
        raise CheckpointError(f"{path}: its normalisation is out of range: mean {mean}, std {std}")
    names = state.get("class_names", [str(i) for i in range(model_cfg.num_classes)])
    if (
        not isinstance(names, list | tuple)
        or len(names) != model_cfg.num_classes
        or not all(isinstance(n, str) and 0 < len(n) <= 100 for n in names)
    ):
        raise CheckpointError(
            f"{path}: its class names do not fit its {model_cfg.num_classes} classes"
        )
    if not all(torch.isfinite(w).all() for w in state["model"].values() if w.is_floating_point()):
        raise CheckpointError(f"{path}: its weights are not all finite (NaN or inf): unusable")
    return model_cfg, data_cfg, mean, std, tuple(names)


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
