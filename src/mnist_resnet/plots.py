"""Figures written into run directories: training curves, confusion matrix, misclassified grid.

matplotlib is imported inside each function, and figures are made without pyplot, so importing
this module costs nothing and no display is ever needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: figures are files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(figsize: tuple[float, float]) -> Any:
    """A figure that is only ever saved to a file.

    Built without pyplot: importing pyplot adds a noticeable start-up cost to every training
    run, and a figure no window shows needs none of its state.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def training_curves(metrics_path: Path, out: Path) -> None:
    """Loss (left) and error (right) against epoch from a run's metrics.jsonl."""
    if not metrics_path.exists():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig = figure((10, 4))
    ax_loss, ax_err = fig.subplots(1, 2)
    for key, label in (("train", "train"), ("val", "validation"), ("test", "test")):
        if f"{key}_loss" in rows[0]:
            ax_loss.plot(epochs, [r[f"{key}_loss"] for r in rows], marker="o", label=label)
        if f"{key}_error" in rows[0]:
            ax_err.plot(epochs, [100 * r[f"{key}_error"] for r in rows], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error", yscale="log")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str], out: Path) -> None:
    n = len(class_names)
    fig = figure((7, 6))
    ax = fig.subplots()
    # Log colour scale: the diagonal holds a thousand and the interesting errors single digits.
    shown = confusion.float().clamp(min=0.5).log10().numpy()
    image = ax.imshow(shown, cmap="Blues")
    for i in range(n):
        for j in range(n):
            value = int(confusion[i, j])
            if value:
                colour = "white" if i == j else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (log colour scale)")
    fig.colorbar(image, ax=ax, label="log10(count)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def misclassified_grid(
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    class_names: Sequence[str],
    out: Path,
    *,
    limit: int = 100,
) -> int:
    """Grid of misclassified images titled `true→predicted`; returns how many are shown."""
    wrong = (predictions != labels).nonzero().flatten()[:limit]
    count = len(wrong)
    cols = 10
    rows = max(1, (count + cols - 1) // cols)
    fig = figure((cols * 1.2, rows * 1.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong.tolist(), strict=False):
        ax.imshow(images_u8[index].reshape(28, 28).numpy(), cmap="gray_r")
        true, pred = class_names[int(labels[index])], class_names[int(predictions[index])]
        ax.set_title(f"{true}→{pred}", fontsize=8)
    if count == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return count


def reliability_diagram(
    curves: Sequence[tuple[str, Sequence[tuple[float, float, int]]]], out: Path
) -> None:
    """Accuracy against confidence per bin (`calibration.reliability`), one curve per label, the
    diagonal being perfect calibration (left); the share of answers in each bin (right, log
    scale: on MNIST nearly all answers fall in the top bin)."""
    fig = figure((10, 4.5))
    ax_acc, ax_share = fig.subplots(1, 2)
    ax_acc.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for label, table in curves:
        if not table:
            continue
        conf, acc, counts = zip(*table, strict=True)
        total = sum(counts)
        ax_acc.plot(conf, acc, marker="o", label=label)
        ax_share.plot(conf, [n / total for n in counts], marker="o", label=label)
    ax_acc.set(
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="reliability",
    )
    ax_share.set(
        xlabel="confidence (top probability)",
        ylabel="share of answers",
        xlim=(0, 1),
        yscale="log",
        title="answers per confidence bin",
    )
    for ax in (ax_acc, ax_share):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
