"""A user's own images as a dataset: `folder:PATH` (one sub-folder of images per class, an
optional `PATH/test/` with the same sub-folders) or `npz:PATH` (`x`: N x 28 x 28 uint8, `y`: N
labels, optional `class_names`, optional `x_test`/`y_test`).

Everything is checked before training starts, and every problem is one line: an empty class, a
folder's unreadable images (all of them listed in one summary), arrays of the wrong shape or
type. Sizes are bounded before anything is decoded or allocated. Image files become 28x28 the
way `predict` reads them (`preprocess="mnist"`) or by a plain resize (`"resize"`), so a trained
model later sees a photo exactly as it saw its training images.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mnist_resnet.config import MAX_CLASSES, own_data
from mnist_resnet.data.datasets import IMAGE_SIZE, Log
from mnist_resnet.data.errors import DataError
from mnist_resnet.errors import printable
from mnist_resnet.images import IMAGE_SUFFIXES, ImageError, load_image, prepare_image

# One million images is 784 MB as uint8: far beyond a hand-made dataset, within any machine.
MAX_IMAGES = 1_000_000
# Longest class name a checkpoint accepts (checkpoint._validated checks the same bound).
MAX_NAME = 100
# Problems named in a summary line; the rest are counted.
LISTED = 5
TEST_FOLDER = "test"


@dataclass(frozen=True, eq=False)
class OwnData:
    """Own images in memory: (N,28,28) uint8, labels (N,) int64, test split always present."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    held_out: bool  # the test split was taken from the training images

    def content_hash(self) -> str:
        """SHA-256 of the arrays and class names: a resume refuses data that changed since."""
        digest = hashlib.sha256()
        for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.contiguous().numpy().tobytes())
        digest.update("\0".join(self.classes).encode())
        return digest.hexdigest()


def load_own(
    dataset: str,
    *,
    preprocess: str,
    test_fraction: float,
    seed: int,
    log: Log = print,
) -> OwnData:
    """Read and check a `folder:` or `npz:` dataset; hold out a test split if it has none."""
    own = own_data(dataset)
    if own is None:
        raise DataError(f"{dataset!r} is not a folder: or npz: dataset")
    kind, where = own
    path = Path(where)
    if kind == "folder":
        classes, train, test = read_folder(path, preprocess, log)
    else:
        classes, train, test = read_npz(path)
    if test is not None:
        return OwnData(*train, *test, classes=classes, held_out=False)
    held = hold_out_test(*train, classes, test_fraction, seed, source=dataset)
    return OwnData(*held, classes=classes, held_out=True)


# ----------------------------------------------------------------------------- folders


def _check_text(source: str, what: str, names: tuple[str, ...]) -> None:
    """Class names are saved in checkpoints and shown everywhere: they must be text. A lone
    surrogate (a folder name in another encoding than the system's, or one put into an npz)
    cannot be written as UTF-8."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{source}: {what} '{printable(name)}' is not valid UTF-8 text; rename it"
            ) from None


def _image_files(folder: Path, budget: int, linked: list[str]) -> tuple[list[Path], int]:
    """Image files under `folder` (recursively, sorted, hidden ones skipped), and how many other
    files were skipped; symlinked folders are not followed, and added to `linked`. Stops with
    an error beyond `budget` images, before any is decoded."""
    found: list[Path] = []
    skipped = 0
    for top, dirs, names in os.walk(folder):
        linked += [str(Path(top) / d) for d in sorted(dirs) if (Path(top) / d).is_symlink()]
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not (Path(top) / d).is_symlink()
        )
        for name in sorted(names):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                skipped += 1
                continue
            found.append(Path(top) / name)
            if len(found) > budget:
                raise DataError(
                    f"{folder.parent} holds more than {MAX_IMAGES:,} images; use a subset "
                    "(or an .npz file)"
                )
    return found, skipped


def scan_folder(
    root: Path, *, budget: int = MAX_IMAGES, log: Log = print
) -> tuple[tuple[str, ...], list[list[Path]]]:
    """Class names (sorted sub-folder names) and each class's image files, checked.

    Symlinked folders are not followed, class folders included: one could lead anywhere (a
    link to / reads the whole disk). `log` says which were left out."""
    if not root.is_dir():
        raise DataError(f"folder:{root}: no such folder")
    linked = sorted(str(d) for d in root.iterdir() if d.is_symlink() and d.is_dir())
    classes = tuple(
        sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir()
            and not d.is_symlink()
            and not d.name.startswith(".")
            and d.name != TEST_FOLDER
        )
    )
    _check_text(f"folder:{root}", "class folder", classes)
    if len(classes) < 2:
        raise DataError(
            f"folder:{root} needs one sub-folder of images per class, at least 2; found "
            f"{len(classes)}{': ' + classes[0] if classes else ''}"
        )
    if len(classes) > MAX_CLASSES:
        raise DataError(f"folder:{root} has {len(classes):,} classes; at most {MAX_CLASSES}")
    long = [c for c in classes if len(c) > MAX_NAME]
    if long:
        raise DataError(f"folder:{root}: class folder names over {MAX_NAME} characters: {long[0]}")
    files: list[list[Path]] = []
    skipped = 0
    for name in classes:
        found, other = _image_files(root / name, budget - sum(map(len, files)), linked)
        files.append(found)
        skipped += other
    if linked:
        log(
            f"folder:{root}: {len(linked)} symlinked folder(s) not followed: "
            f"{_listed([printable(str(Path(d).relative_to(root))) for d in linked])}"
        )
    empty = [name for name, found in zip(classes, files, strict=True) if not found]
    if empty:
        raise DataError(
            f"folder:{root}: {len(empty)} class folder(s) hold no images: {_listed(empty)} "
            f"(images are files ending in {', '.join(IMAGE_SUFFIXES)})"
        )
    return classes, files


def read_folder(
    root: Path, preprocess: str, log: Log = print
) -> tuple[tuple[str, ...], tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """Class names, the training images and labels, and those of `root/test/` if present."""
    classes, files = scan_folder(root, log=log)
    test_root = root / TEST_FOLDER
    test_files = None
    if test_root.is_dir():
        budget = MAX_IMAGES - sum(map(len, files))
        test_classes, test_files = scan_folder(test_root, budget=budget, log=log)
        if test_classes != classes:
            extra = sorted(set(test_classes) - set(classes))
            missing = sorted(set(classes) - set(test_classes))
            raise DataError(
                f"folder:{root}: {test_root} must hold the same class folders as {root}; "
                + "; ".join(
                    part
                    for part in (
                        f"not in {root}: {_listed(extra)}" if extra else "",
                        f"missing from {test_root}: {_listed(missing)}" if missing else "",
                    )
                    if part
                )
            )
    total = sum(map(len, files)) + (sum(map(len, test_files)) if test_files else 0)
    log(
        f"reading {total:,} images of {len(classes)} classes from {root} "
        f"({preprocess} preprocessing)"
    )
    problems: list[str] = []
    train = _decode_all(root, files, preprocess, problems)
    test = _decode_all(root, test_files, preprocess, problems) if test_files else None
    if problems:
        raise DataError(
            f"folder:{root}: {len(problems)} of {total:,} images cannot be used: "
            f"{_listed(problems)}; fix or remove them"
        )
    return classes, train, test


def _decode_all(
    root: Path, files: list[list[Path]], preprocess: str, problems: list[str]
) -> tuple[Tensor, Tensor]:
    images: list[np.ndarray[Any, Any]] = []
    labels: list[int] = []
    for label, paths in enumerate(files):
        for path in paths:
            try:
                images.append(prepare_image(load_image(path), preprocess))
            except ImageError as e:
                problems.append(f"{path.relative_to(root)} ({e})")
                continue
            labels.append(label)
    if not images:
        return torch.empty(0, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), torch.empty(0).long()
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


# ----------------------------------------------------------------------------- .npz files


def _header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an array's .npy header, read without loading the array."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), dtype


# What zipfile and numpy raise for a damaged or odd archive: an encrypted member (RuntimeError),
# a compression method Python lacks (NotImplementedError), a bad deflate stream (zlib.error).
_UNREADABLE_ZIP = (
    zipfile.BadZipFile,
    ValueError,
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    KeyError,
    zlib.error,
)


def _reason(e: BaseException) -> str:
    return printable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:120]


def read_npz(
    path: Path,
) -> tuple[tuple[str, ...], tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """Class names, training and optional test arrays of an .npz file, checked."""
    source = f"npz:{path}"
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            # By their whole names, as np.load keys them: `a/x.npy` is not the array `x`.
            members = {n[: -len(".npy")]: n for n in archive.namelist() if n.endswith(".npy")}
            missing = [k for k in ("x", "y") if k not in members]
            if missing:
                raise DataError(
                    f"{source} holds no {' or '.join(repr(m) for m in missing)} array (found: "
                    f"{', '.join(sorted(members)) or 'none'}); save it with "
                    "numpy.savez(path, x=images, y=labels)"
                )
            if ("x_test" in members) != ("y_test" in members):
                raise DataError(f"{source}: x_test and y_test go together; found only one")
            headers = {k: _header(archive, n) for k, n in members.items()}
    except _UNREADABLE_ZIP as e:
        raise DataError(f"{source} is not a readable .npz file: {_reason(e)}") from None
    _check_arrays(source, headers, "x", "y")
    has_test = "x_test" in headers
    if has_test:
        _check_arrays(source, headers, "x_test", "y_test")
    names_header = headers.get("class_names")
    if names_header is not None and (
        names_header[1].kind not in "US"
        or len(names_header[0]) != 1
        or not 2 <= names_header[0][0] <= MAX_CLASSES
    ):
        raise DataError(
            f"{source}: class_names must be a 1-D array of 2 to {MAX_CLASSES} strings, got "
            f"shape {names_header[0]} of {names_header[1]}"
        )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
            test = (arrays["x_test"], arrays["y_test"]) if has_test else None
            names = arrays["class_names"] if names_header is not None else None
    except _UNREADABLE_ZIP as e:
        raise DataError(f"{source} is not a readable .npz file: {_reason(e)}") from None
    classes = _class_names(source, names, y)
    train = _labelled(source, x, y, classes, "y")
    if test is None:
        return classes, train, None
    return classes, train, _labelled(source, *test, classes, "y_test")


def _check_arrays(
    source: str, headers: dict[str, tuple[tuple[int, ...], np.dtype[Any]]], xk: str, yk: str
) -> None:
    (xs, xd), (ys, yd) = headers[xk], headers[yk]
    if xd != np.uint8 or len(xs) != 3 or xs[1:] != (IMAGE_SIZE, IMAGE_SIZE) or not xs[0]:
        raise DataError(
            f"{source}: {xk} must be N x 28 x 28 uint8 images, got shape {xs} of {xd}; resize "
            "them, or save them as image files in class folders and use folder:PATH"
        )
    if xs[0] > MAX_IMAGES:
        raise DataError(f"{source}: {xk} holds {xs[0]:,} images; at most {MAX_IMAGES:,}")
    if yd.kind not in "iu" or ys != (xs[0],):
        raise DataError(
            f"{source}: {yk} must hold one integer label per image ({xs[0]}), "
            f"got shape {ys} of {yd}"
        )


def _class_names(
    source: str, names: np.ndarray[Any, Any] | None, y: np.ndarray[Any, Any]
) -> tuple[str, ...]:
    if names is None:
        top = int(y.max())
        if top + 1 > MAX_CLASSES:
            raise DataError(f"{source}: label {top} is over the limit of {MAX_CLASSES} classes")
        return tuple(str(i) for i in range(max(2, top + 1)))
    out = tuple(n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names)
    _check_text(source, "class_names", out)
    bad = [n for n in out if not 0 < len(n) <= MAX_NAME]
    if bad or len(set(out)) != len(out):
        raise DataError(
            f"{source}: class_names must be distinct and 1 to {MAX_NAME} characters long"
        )
    return out


def _labelled(
    source: str,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    classes: tuple[str, ...],
    key: str,
) -> tuple[Tensor, Tensor]:
    labels = torch.from_numpy(y.astype(np.int64))
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise DataError(
            f"{source}: {key} holds labels from {int(labels.min())} to {int(labels.max())}; "
            f"they must be 0 to {len(classes) - 1} ({len(classes)} classes)"
        )
    counts = torch.bincount(labels, minlength=len(classes))
    empty = [f"{i} ({classes[i]})" for i in range(len(classes)) if not counts[i]]
    if empty:
        raise DataError(
            f"{source}: {len(empty)} class(es) have no images in {key}: {_listed(empty)}"
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), labels


# ----------------------------------------------------------------------------- test split


def hold_out_test(
    images: Tensor,
    labels: Tensor,
    classes: tuple[str, ...],
    fraction: float,
    seed: int,
    *,
    source: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train x, train y, test x, test y): `fraction` of each class held out, chosen by `seed`.

    Per class, so that every class is tested however few images it has; at least one image of
    each class stays on each side, and both sides keep file order.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c, name in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < 2:
            raise DataError(
                f"{source}: class {name!r} has {len(members)} image(s); holding out a test split "
                "needs at least 2 per class (or give a test set: PATH/test/ or x_test/y_test)"
            )
        count = min(max(1, round(len(members) * fraction)), len(members) - 1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    test = torch.zeros(len(labels), dtype=torch.bool)
    test[torch.cat(chosen)] = True
    return images[~test], labels[~test], images[test], labels[test]
