"""`mnist-resnet calibrate`: fit a trained model's temperature and its out-of-distribution
detector on its own data, and store them with the model (docs/calibration.md).

The temperature is fitted on the validation split alone; the detector's class Gaussians on (a
sample of) the training split, its head on those images and on synthetic and font-rendered
outliers, its cut-off on the validation split. The test split is never read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from mnist_resnet import calibration, data, ood
from mnist_resnet.checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint
from mnist_resnet.files import atomic_write_text, hash_file, writable_file
from mnist_resnet.images import to_float
from mnist_resnet.pretrained import ModelFile, pin_line

Log = Callable[[str], None]
# Training images the class Gaussians and the head are fitted on: 10,000 estimate a 64x64
# covariance well, and take a few seconds on 2 cores instead of a minute.
FIT_TRAIN_IMAGES = 10_000
SEED = 0


@torch.inference_mode()
def logits_and_features(
    loaded: LoadedModel, images: Tensor | NDArray[np.uint8], names: tuple[str, ...]
) -> tuple[Tensor, list[Tensor]]:
    """fp32 CPU logits and the pooled features of the layers `names`, 1,000 images at a time."""
    model: nn.Module = loaded.model
    x = torch.as_tensor(np.asarray(images, dtype=np.uint8)).unsqueeze(1)
    logits: list[Tensor] = []
    parts: list[list[Tensor]] = [[] for _ in names]
    with ood.tapped(model, names) as found:
        for start in range(0, len(x), 1000):
            found.clear()
            logits.append(model(to_float(x[start : start + 1000], loaded.mean, loaded.std)))
            for i, f in enumerate(found):
                parts[i].append(f)
    return torch.cat(logits), [torch.cat(p) for p in parts]


def fit(
    loaded: LoadedModel,
    splits: data.Splits,
    *,
    outliers: NDArray[np.uint8] | None = None,
    log: Log = print,
) -> ood.Fitted:
    """Temperature and detector of `loaded`, from the training and validation images only,
    and `outliers` (default: `ood.fit_outliers()`)."""
    cfg = loaded.data_config
    if cfg.val_size == 0:
        raise CheckpointError(
            "this model was trained without a validation split: nothing to calibrate on"
        )
    train_x, train_y, val_x, val_y = data.split_validation(
        splits.train_images, splits.train_labels, cfg.val_size, cfg.split_seed
    )
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SEED))
    pick = pick[:FIT_TRAIN_IMAGES].sort().values
    names = ood.taps(loaded.model)
    val_logits, val_features = logits_and_features(loaded, val_x, names)
    fitted_on = f"{cfg.dataset} validation split ({len(val_y):,} images, seed {cfg.split_seed})"
    cal = calibration.fit(val_logits, val_y, fitted_on)
    log(
        f"temperature {cal.temperature:.4f}: "
        f"validation NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f}"
    )
    _, train_features = logits_and_features(loaded, train_x[pick], names)
    if outliers is None:
        log("rendering outliers (scribbles, noise, letters in matplotlib's DejaVu fonts)")
        outliers = ood.fit_outliers(SEED)
    _, outlier_features = logits_and_features(loaded, outliers, names)
    detector = ood.fit_detector(
        {"train": train_features, "validation": val_features, "outliers": outlier_features},
        train_y[pick].long(),
        names,
        len(loaded.class_names),
    )
    log(
        f"detector on {', '.join(names)}: cut-off {detector.threshold:.3f} flags "
        f"{ood.FLAG_RATE:.1%} of the validation images"
    )
    return ood.Fitted(cal, detector)


def load_splits(loaded: LoadedModel, data_dir: Path, log: Log) -> data.Splits:
    try:
        return data.load_data(
            dataclasses.replace(loaded.data_config, data_dir=str(data_dir)), log=log
        )
    except data.DataError as e:
        raise CheckpointError(
            f"calibrating needs the {loaded.data_config.dataset} training images: {e}"
        ) from None


def calibrate_checkpoint(
    path: Path, *, data_dir: Path, out: Path | None = None, log: Log = print
) -> ood.Fitted:
    """Fit, then write the checkpoint again (atomically) with its calibration and detector."""
    from mnist_resnet.checkpoint import load_model

    loaded = load_model(path)
    fitted = fit(loaded, load_splits(loaded, data_dir, log), log=log)
    state = load_checkpoint(path)
    state["calibration"] = fitted.calibration.as_dict()
    state["ood"] = fitted.detector.as_dict()
    for key in ("format", "format_version", "weights_sha256", "config_sha256"):
        state.pop(key, None)
    save_checkpoint(out or path, state)
    return fitted


def metadata_record(fitted: ood.Fitted) -> dict[str, Any]:
    """The calibration and detector as JSON-ready data (for a shipped model's metadata)."""
    detector = fitted.detector.as_dict()
    # Little-endian float32 bytes in base64: exact, and 35 KB instead of 150 KB of decimals.
    detector["tensors"] = {k: ood.encode_tensor(v) for k, v in detector["tensors"].items()}
    return {"calibration": fitted.calibration.as_dict(), "ood": detector}


def calibrate_shipped(weights: Path, *, data_dir: Path, log: Log = print) -> ood.Fitted:
    """Fit a shipped model and store the result in its file and in the `<name>.json` beside it
    (calibration, detector, the file's new size and SHA-256): pin the new hash afterwards."""
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("sha256") != hash_file(weights):
        raise CheckpointError(f"{meta_path} does not describe {weights} (SHA-256 differs)")
    fitted = calibrate_checkpoint(weights, data_dir=data_dir, log=log)
    meta.update(metadata_record(fitted), bytes=weights.stat().st_size, sha256=hash_file(weights))
    if isinstance(meta.get("card"), dict):
        meta["card"]["calibration"] = dict(meta["calibration"])
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return fitted


def main(model: ModelFile, *, data_dir: Path, out: Path | None = None) -> int:
    """`mnist-resnet calibrate`: fit `model` and store the fit in its file (or in `out`); a
    shipped model's also in its JSON, with the line that pins its new hash."""
    if model.pretrained is not None and out is None:
        calibrate_shipped(model.path, data_dir=data_dir)
        print(f"wrote the calibration into {model.path} and {model.path.with_suffix('.json').name}")
        print(pin_line(model.pretrained, hash_file(model.path)))
        return 0
    if out is not None:
        writable_file(out, "--out")
    calibrate_checkpoint(model.path, data_dir=data_dir, out=out)
    print(f"wrote {out or model.path}")
    return 0
