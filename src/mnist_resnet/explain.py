"""What the network looked at: attribution maps and each stage's strongest feature maps.

Attributions are integrated gradients (Sundararajan et al. 2017) from Captum, PyTorch's
interpretability library: the gradient of a class's logit, averaged along the straight path
from a blank image (the background every MNIST-style image is drawn on) to the input, times
the input's difference from it. They sum to the logit's change from the blank image
(completeness), so a pixel's share means something; positive pixels speak for the class,
negative ones against it.

Whether a map is faithful is measured, not assumed: deleting pixels in the map's order (most
important first, each set to the background) should lower the class's probability faster than
deleting them in a random order (the deletion curve of Petsiuk et al. 2018); `deletion_curve`
gives both, and benchmarks/explain_faithfulness.py runs it over a test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients
from numpy.typing import NDArray
from torch import Tensor, nn

from mnist_resnet import ood
from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.config import ExplainConfig
from mnist_resnet.errors import printable
from mnist_resnet.files import writable_folder
from mnist_resnet.images import ImageError, load_image, prepare_image, to_float
from mnist_resnet.model import flops_per_image
from mnist_resnet.predict import checkpoint_and_images, expand_inputs
from mnist_resnet.pretrained import choose

# Integration steps: `explain`'s (config.py says why 64). The draw page redraws as the user
# draws: 32 steps of the width-1 ResNet-14 (40.4 M FLOPs an image, 1.3 G for the 32) kept an
# update inside the page's 150 ms on one core. A costlier network gets proportionally fewer
# steps, never under 16, below which the maps drift from the converged ones
# (docs/serving.md#what-the-network-looks-at).
STEPS = ExplainConfig.steps
LIVE_STEPS = 32
MIN_LIVE_STEPS = 16
LIVE_FLOPS = 1_300_000_000
# Feature maps shown per stage: the channels with the largest mean activation.
MAPS_PER_STAGE = 4
# Where each stage's output is read, by module name: the ResNet's stem (after its ReLU and
# optional pool) and stages, or the baseline CNN's two convolutions.
RESNET_TAPS = (
    ("stem", "stem_pool"),
    ("stage 1", "layer1"),
    ("stage 2", "layer2"),
    ("stage 3", "layer3"),
)
BASELINE_TAPS = (("conv 1", "conv1"), ("conv 2", "conv2"))
# Points on the deletion curve: none, a sixteenth, ..., all of the image's ink removed.
DELETION_POINTS = 17


def live_steps(loaded: LoadedModel) -> int:
    """Integration steps for the draw page's live explanations of `loaded`'s network: as many
    as `LIVE_FLOPS` of forward passes allow, between `MIN_LIVE_STEPS` and `LIVE_STEPS`."""
    views = len(getattr(loaded.model, "views", ())) or 1
    cost = max(1, flops_per_image(loaded.model, loaded.model_config.in_channels) * views)
    return max(MIN_LIVE_STEPS, min(LIVE_STEPS, LIVE_FLOPS // cost))


@dataclass(frozen=True)
class StageMaps:
    """The strongest channels of one stage's output for one image."""

    name: str
    channels: tuple[int, ...]
    mean_activation: tuple[float, ...]
    maps: Tensor  # (k, h, w), float32


@dataclass(frozen=True)
class Explanation:
    """One prepared image, its two most probable classes and why."""

    image: NDArray[np.uint8]  # (28, 28), white ink on black
    classes: tuple[int, ...]  # predicted, then the runner-up
    probabilities: tuple[float, ...]  # calibrated, in the same order
    attributions: Tensor  # (len(classes), 28, 28): integrated gradients of each class's logit
    # Completeness check: sum of attributions minus (logit(image) - logit(blank)), per class.
    gap: tuple[float, ...]
    stages: list[StageMaps] = field(default_factory=list)


def _inputs(loaded: LoadedModel, images_u8: Tensor | NDArray[np.uint8]) -> Tensor:
    x = torch.as_tensor(np.asarray(images_u8, dtype=np.uint8))
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return to_float(x.unsqueeze(1), loaded.mean, loaded.std)


def attributions(
    loaded: LoadedModel,
    x: Tensor,
    targets: Sequence[int],
    steps: int = STEPS,
    batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrated gradients of each target's logit for the standardised images `x` (N, 1, H, W),
    one target per image, and their completeness gaps (N,). `batch`: images on the path per
    forward and backward pass (Captum's internal_batch_size; None: all N x steps at once)."""
    model = loaded.model.eval()
    blank = torch.full_like(x, -loaded.mean / loaded.std)
    target = torch.tensor(list(targets))
    ig = IntegratedGradients(model)
    with torch.enable_grad():
        maps, delta = ig.attribute(
            x,
            baselines=blank,
            target=target,
            n_steps=steps,
            internal_batch_size=batch,
            return_convergence_delta=True,
        )
    return maps.detach()[:, 0], delta.detach()


def stage_taps(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(label, module name) of the stages `model` has."""
    names = {name for name, _ in model.named_modules()}
    return RESNET_TAPS if "layer1" in names else BASELINE_TAPS


@torch.inference_mode()
def _forward(loaded: LoadedModel, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    present = {name for name, _ in loaded.model.named_modules()}
    names = [name for _, name in stage_taps(loaded.model) if name in present]
    with ood.tapped(loaded.model, names, pool=False) as found:
        logits = loaded.model.eval()(x)
        return loaded.calibration.apply(logits), dict(zip(names, found, strict=True))


def _strongest(name: str, out: Tensor, k: int) -> StageMaps:
    means = out.mean(dim=(1, 2))
    top = means.topk(min(k, len(means)))
    return StageMaps(
        name=name,
        channels=tuple(int(i) for i in top.indices),
        mean_activation=tuple(round(float(v), 4) for v in top.values),
        maps=out[top.indices].float(),
    )


def explain(
    loaded: LoadedModel,
    images_u8: Tensor | NDArray[np.uint8],
    *,
    classes: int = 2,
    steps: int = STEPS,
    maps_per_stage: int = MAPS_PER_STAGE,
    batch: int | None = None,
) -> list[Explanation]:
    """Explanations of prepared 28x28 images (N, 28, 28) or one (28, 28): the attribution maps
    of the `classes` most probable classes, and `maps_per_stage` feature maps per stage
    (0: none). `batch` as in `attributions`: the same maps, in smaller passes."""
    x = _inputs(loaded, images_u8)
    probs, stages = _forward(loaded, x)
    k = max(1, min(classes, probs.shape[1]))
    top_p, top_i = probs.topk(k, dim=1)
    # Every (image, class) pair in one batch: Captum runs its steps for all of them at once.
    pairs = x.repeat_interleave(k, dim=0)
    maps, delta = attributions(loaded, pairs, top_i.flatten().tolist(), steps, batch)
    maps, delta = maps.view(len(x), k, *x.shape[2:]), delta.view(len(x), k)
    pixels = torch.as_tensor(np.asarray(images_u8, dtype=np.uint8)).reshape(len(x), *x.shape[2:])
    out = []
    for n in range(len(x)):
        stage_maps = [
            _strongest(label, stages[name][n], maps_per_stage)
            for label, name in stage_taps(loaded.model)
            if name in stages and maps_per_stage > 0
        ]
        out.append(
            Explanation(
                image=pixels[n].numpy(),
                classes=tuple(int(i) for i in top_i[n]),
                probabilities=tuple(float(p) for p in top_p[n]),
                attributions=maps[n],
                gap=tuple(float(d) for d in delta[n]),
                stages=stage_maps,
            )
        )
    return out


# ----------------------------------------------------------------------------- faithfulness


@torch.inference_mode()
def deletion_curve(
    loaded: LoadedModel,
    image_u8: NDArray[np.uint8],
    target: int,
    order: Tensor,
    points: int = DELETION_POINTS,
    *,
    insert: bool = False,
) -> Tensor:
    """The calibrated probability of `target` as the image's ink pixels are set to the
    background in `order` (a permutation of the H*W pixel indices; blank pixels are skipped, as
    removing them changes nothing): `points` values from nothing removed to all ink removed.
    With `insert`, the other way: from a blank image, the ink pixels put back in `order`
    (the insertion curve)."""
    flat = torch.as_tensor(np.asarray(image_u8, dtype=np.uint8)).flatten()
    ink = order[flat[order] > 0]
    images = torch.zeros(points, len(flat), dtype=torch.uint8) if insert else flat.repeat(points, 1)
    for i in range(points):
        chosen = ink[: round(len(ink) * i / (points - 1))]
        images[i, chosen] = flat[chosen] if insert else 0
    probs = loaded.calibration.apply(
        loaded.model.eval()(_inputs(loaded, images.view(points, *np.shape(image_u8))))
    )
    return probs[:, target]


def area(curve: Tensor) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoids)."""
    c = curve.double()
    return float(((c[1:] + c[:-1]) / 2).mean())


def attribution_order(attribution: Tensor) -> Tensor:
    """Pixel indices, most positive attribution first."""
    return attribution.flatten().argsort(descending=True, stable=True)


# ----------------------------------------------------------------------------- the figure


def draw(explanation: Explanation, class_names: Sequence[str], path: Path) -> None:
    """One PNG: the prepared input, each class's attribution over it, each stage's maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = explanation
    rows = 1 + len(e.stages)
    cols = max(1 + len(e.classes), max((len(s.channels) for s in e.stages), default=0))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(e.image, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title("prepared input", fontsize=9)
    # One scale for both classes: red for the class, blue against it, opaque where strongest,
    # over the input dimmed to grey.
    limit = float(e.attributions.abs().max()) or 1.0
    for j, (c, p) in enumerate(zip(e.classes, e.probabilities, strict=True)):
        ax = axes[0, 1 + j]
        ax.imshow(e.image, cmap="gray", vmin=0, vmax=255 * 3)
        ax.imshow(overlay(e.attributions[j], limit))
        role = "answer" if j == 0 else "runner-up"
        ax.set_title(f"{role}: {class_names[c]} ({p:.1%})", fontsize=9)
    for r, stage in enumerate(e.stages, start=1):
        for j, (ch, m) in enumerate(zip(stage.channels, stage.maps, strict=True)):
            ax = axes[r, j]
            ax.imshow(m.numpy(), cmap="viridis")
            size = f"{m.shape[0]}x{m.shape[1]}"
            ax.set_title(f"{stage.name} ch {ch} ({size})", fontsize=8)
    fig.suptitle("integrated gradients (red: for the class, blue: against)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay(attribution: Tensor, limit: float) -> NDArray[np.float32]:
    """An RGBA image of `attribution` (H, W): red where positive, blue where negative, its
    opacity the size of the value against `limit`."""
    a = (attribution / limit).clamp(-1, 1).numpy().astype(np.float32)
    rgba = np.zeros((*a.shape, 4), dtype=np.float32)
    rgba[..., 0] = a > 0
    rgba[..., 2] = a < 0
    rgba[..., 3] = np.abs(a)
    return rgba


def as_record(explanation: Explanation, class_names: Sequence[str]) -> dict[str, Any]:
    """The numbers behind the figure, JSON-ready."""
    e = explanation
    return {
        "classes": [
            {
                "class": class_names[c],
                "index": c,
                "probability": round(p, 6),
                "attribution": [
                    [round(float(v), 5) + 0.0 for v in row] for row in e.attributions[j]
                ],
                "completeness_gap": round(g, 6),
            }
            for j, (c, p, g) in enumerate(zip(e.classes, e.probabilities, e.gap, strict=True))
        ],
        "stages": [
            {
                "name": s.name,
                "shape": list(s.maps.shape[1:]),
                "channels": [
                    {"index": ch, "mean_activation": a}
                    for ch, a in zip(s.channels, s.mean_activation, strict=True)
                ],
            }
            for s in e.stages
        ],
    }


# ----------------------------------------------------------------------------- files


@dataclass
class FileExplanation:
    source: str
    figure: Path | None = None
    explanation: Explanation | None = None
    error: str | None = None


def explain_files(
    loaded: LoadedModel,
    inputs: Sequence[str],
    out_dir: Path,
    *,
    steps: int = STEPS,
    classes: int = 2,
) -> list[FileExplanation]:
    """One figure per input image in `out_dir` (`NNNN-<name>.png`), each prepared as `predict`
    prepares it; a file that cannot be read is reported and the others still run."""
    results: list[FileExplanation] = []
    ready: list[tuple[FileExplanation, NDArray[np.uint8], str]] = []
    for shown, path in expand_inputs(inputs):
        result = FileExplanation(shown)
        results.append(result)
        if path is None:
            result.error = "no such file, folder or matching image"
            continue
        try:
            pixels = prepare_image(load_image(path), loaded.data_config.preparation)
        except ImageError as err:
            result.error = str(err)
            continue
        ready.append((result, pixels, path.stem))
    if not ready:
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    done = explain(loaded, np.stack([p for _, p, _ in ready]), classes=classes, steps=steps)
    for n, ((result, _, stem), e) in enumerate(zip(ready, done, strict=True)):
        result.explanation = e
        result.figure = out_dir / f"{n:04d}-{stem[:64]}.png"
        draw(e, loaded.class_names, result.figure)
    return results


def format_files(
    results: Sequence[FileExplanation], class_names: Sequence[str], *, as_json: bool = False
) -> str:
    if as_json:
        import json

        return json.dumps(
            [
                {"file": r.source, "error": r.error}
                if r.explanation is None
                else {
                    "file": r.source,
                    "figure": str(r.figure),
                    **as_record(r.explanation, class_names),
                }
                for r in results
            ]
        )
    lines = []
    for r in results:
        if r.explanation is None:
            lines.append(printable(f"{r.source}: error: {r.error}"))
            continue
        e = r.explanation
        said = ", ".join(
            f"{class_names[c]} {p:.1%}" for c, p in zip(e.classes, e.probabilities, strict=True)
        )
        lines.append(printable(f"{r.source}: {said} -> {r.figure}"))
    ok = sum(r.explanation is not None for r in results)
    lines.append(f"explained {ok} of {len(results)} inputs")
    return "\n".join(lines)


def main(inputs: Sequence[str], cfg: ExplainConfig, *, pretrained: str | None = None) -> int:
    """`mnist-resnet explain`: an optional checkpoint (else a shipped model), then pictures →
    one figure each in `cfg.out` and their numbers, printed. 1 when an input could not be read."""
    cfg.validate()
    checkpoint, images = checkpoint_and_images(inputs, "explain")
    writable_folder(cfg.out, "--out")
    loaded = load_model(choose(checkpoint, pretrained).path)
    results = explain_files(loaded, images, cfg.out, steps=cfg.steps)
    print(format_files(results, loaded.class_names, as_json=cfg.json))
    return 1 if any(r.explanation is None for r in results) else 0
