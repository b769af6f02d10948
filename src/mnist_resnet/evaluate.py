"""Metrics: loss, accuracy, per-class accuracy and the confusion matrix of a model on a split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mnist_resnet import pretrained
from mnist_resnet.config import TrainConfig
from mnist_resnet.errors import printable
from mnist_resnet.files import writable_folder
from mnist_resnet.inference import predict_logits
from mnist_resnet.pretrained import ModelFile
from mnist_resnet.runtime import Runtime

if TYPE_CHECKING:
    from mnist_resnet.checkpoint import LoadedModel


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    # confusion[true, predicted] counts
    confusion: torch.Tensor
    predictions: torch.Tensor
    probabilities: torch.Tensor

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / totals).tolist()


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """counts[true, predicted] as a (num_classes, num_classes) int64 tensor."""
    flat = labels.long() * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def evaluate(
    model: nn.Module,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: float,
    std: float,
    runtime: Runtime,
    batch_size: int = TrainConfig.test_batch_size,
) -> EvalResult:
    logits = predict_logits(
        model, images_u8, mean=mean, std=std, runtime=runtime, batch_size=batch_size
    )
    labels = labels.cpu().long()  # the logits come back to the CPU; the labels may be on a GPU
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(labels, predictions, num_classes)
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        accuracy=float((predictions == labels).float().mean()),
        confusion=confusion,
        predictions=predictions,
        probabilities=logits.softmax(dim=1),
    )


def evaluate_loaded(
    loaded: LoadedModel,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    runtime: Runtime,
    *,
    batch_size: int = TrainConfig.test_batch_size,
) -> EvalResult:
    """`evaluate` of a loaded checkpoint's network, prepared for `runtime` and fed the images
    normalised as its run normalised them."""
    return evaluate(
        runtime.prepare_model(loaded.model),
        images_u8,
        labels,
        mean=loaded.mean,
        std=loaded.std,
        runtime=runtime,
        batch_size=batch_size,
    )


def evaluate_shard(
    model: nn.Module,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: float,
    std: float,
    runtime: Runtime,
    num_classes: int,
    batch_size: int = TrainConfig.test_batch_size,
) -> EvalResult:
    """Metrics of a split shared out between ranks, reduced across them.

    Rank r evaluates images r, r+W, r+2W, ... ; the loss sum and the confusion matrix are
    summed over all ranks, so loss, accuracy and confusion describe the whole split on every
    rank. `predictions` and `probabilities` are this rank's shard only. One process: the whole
    split, with the loss summed in float64 (it can differ from `evaluate` in the last digits).
    """
    from mnist_resnet.distributed import all_reduce_sum, current

    env = current()
    shard_x, shard_y = images_u8[env.rank :: env.world_size], labels[env.rank :: env.world_size]
    logits = predict_logits(
        model, shard_x, mean=mean, std=std, runtime=runtime, batch_size=batch_size
    )
    if not len(shard_x):
        logits = torch.empty(0, num_classes)
    shard_y = shard_y.cpu().long()
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(shard_y, predictions, num_classes)
    loss_sum = F.cross_entropy(logits.double(), shard_y, reduction="sum").reshape(1)
    # One collective for both: float64 holds counts exactly up to 2^53.
    totals = all_reduce_sum(torch.cat([confusion.flatten().double(), loss_sum]))
    confusion = totals[:-1].round().long().reshape(num_classes, num_classes)
    count = max(1, int(confusion.sum()))
    return EvalResult(
        loss=float(totals[-1]) / count,
        accuracy=float(confusion.diagonal().sum()) / count,
        confusion=confusion,
        predictions=predictions,
        probabilities=logits.softmax(dim=1),
    )


def format_report(result: EvalResult, class_names: Sequence[str]) -> str:
    """Per-class accuracy and the confusion matrix as aligned text."""
    # Names come from a user's folders or arrays: a newline or escape in one is shown escaped.
    class_names = [printable(n) for n in class_names]
    width = max(5, *(len(n) for n in class_names))
    lines = ["per-class accuracy:"]
    for name, acc, total in zip(
        class_names, result.per_class_accuracy, result.confusion.sum(dim=1).tolist(), strict=True
    ):
        lines.append(f"  {name:>{width}}  {acc:7.2%}  ({total} images)")
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    # Columns name the class too, cut to fit their 6 characters ("T-shirt/top" is "T-shi").
    header = " " * (width + 2) + "".join(f"{name[:5]:>6}" for name in class_names)
    lines.append(header)
    for i, row in enumerate(result.confusion.tolist()):
        lines.append(f"  {class_names[i]:>{width}}" + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: Path,
    *,
    data_dir: Path,
    out_dir: Path | None = None,
    batch_size: int = TrainConfig.test_batch_size,
    accel: bool = True,
) -> str:
    """Test-set report of a checkpoint, with confusion.png, misclassified.png and
    reliability.png beside it; calibration measured before and after its temperature.

    Returns the text report; its last line is `test accuracy: NN.NN%`.
    """
    from mnist_resnet import calibration, data, plots
    from mnist_resnet.checkpoint import load_model
    from mnist_resnet.precision import make_runtime

    loaded = load_model(checkpoint)
    splits = data.load_data(dataclasses.replace(loaded.data_config, data_dir=str(data_dir)))
    # The precision the run trained and was judged in (its config records the decision), so
    # that this report reproduces the test accuracy `train` printed.
    runtime = make_runtime(accel=accel, amp=loaded.trained_amp, channels_last=True)
    result = evaluate_loaded(
        loaded, splits.test_images, splits.test_labels, runtime, batch_size=batch_size
    )
    out = out_dir or checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    names = loaded.class_names
    plots.confusion_matrix(result.confusion, names, out / "confusion.png")
    labels = splits.test_labels.cpu().long()
    # The probabilities a user sees are softmax(logits / T); T = 1 is the raw softmax.
    logits = result.probabilities.clamp_min(1e-30).log().double()
    cal = loaded.calibration
    before = calibration.Measures.of(result.probabilities, labels)
    after = calibration.Measures.of(cal.apply(logits), labels)
    plots.reliability_diagram(
        [
            ("softmax (T = 1)", calibration.reliability(result.probabilities, labels)),
            (f"calibrated ({cal.describe()})", calibration.reliability(cal.apply(logits), labels)),
        ],
        out / "reliability.png",
    )
    shown = plots.misclassified_grid(
        splits.test_images, splits.test_labels, result.predictions, names, out / "misclassified.png"
    )
    wrong = int((result.predictions != splits.test_labels.long()).sum())
    return "\n".join(
        [
            f"model: {loaded.preset} from {checkpoint} on {loaded.data_config.dataset} test set "
            f"({result.count} images, {runtime.describe()})",
            format_report(result, names),
            f"figures: {out / 'confusion.png'}, {out / 'misclassified.png'} "
            f"({shown} of {wrong} misclassified shown), {out / 'reliability.png'}",
            f"calibration: {cal.method}, {cal.describe()}"
            + (
                f", fitted on the {loaded.calibration.fitted_on}"
                if loaded.calibration.fitted_on
                else ""
            )
            + ("" if loaded.calibration.method != "none" else " (run `mnist-resnet calibrate`)"),
            f"  {'':10} {'ECE':>7} {'NLL':>7} {'Brier':>7}",
            *(
                f"  {name:10} {m.ece:7.2%} {m.nll:7.4f} {m.brier:7.4f}"
                for name, m in (("softmax", before), ("calibrated", after))
            ),
            f"test loss: {result.loss:.4f}",
            f"test accuracy: {result.accuracy:.2%}",
        ]
    )


def shipped_figures_folder(model: ModelFile) -> Path | None:
    """Where `evaluate` puts a shipped model's figures: `pretrained-NAME/` in the current
    folder, since the model's own folder is the installed package (whether the model was named
    or given by its path); None for any other checkpoint (its figures go beside it)."""
    inside = model.path.resolve().parent == pretrained.FOLDER.resolve()
    name = model.pretrained or (model.path.stem if inside else None)
    return Path(f"pretrained-{name}") if name else None


def main(
    model: ModelFile,
    *,
    data_dir: Path,
    out: Path | None = None,
    batch_size: int = TrainConfig.test_batch_size,
    accel: bool = True,
) -> int:
    """`mnist-resnet evaluate`: the report of `evaluate_checkpoint`, printed; its figures in
    `out` (default: beside the checkpoint, or pretrained-NAME/ here for a shipped model)."""
    out = out or shipped_figures_folder(model)
    # The figures are written after the whole evaluation: check their folder first.
    writable_folder(out or model.path.parent, "--out")
    report = evaluate_checkpoint(
        model.path, data_dir=data_dir, out_dir=out, batch_size=batch_size, accel=accel
    )
    print(report)
    return 0
