"""Datasets: the file table, the source chain, a strict IDX reader, in-memory splits and batches.

The whole dataset lives in memory as one uint8 tensor per split (60,000 x 28 x 28 is 47 MB), and
batches are cut and augmented as whole tensors: no DataLoader, no per-sample Python work.

Files are cached decompressed in torchvision's layout, ``<root>/<Folder>/raw/<file>``, so a root
that torchvision already filled is reused, and ``<root>/<Folder>/raw/SOURCES.json`` records where
each file came from, its content hash and the size/mtime stamp of the last full check.

One module per job: `datasets` (the table), `idx` (the file format), `cache` (verification and
provenance), `sources` (the download chain), `own` (a user's folder of images or .npz file),
`splits` (datasets in memory, `prepare_data`) and `batches` (batch order and augmentation).
This package re-exports what other modules use.
Models need none of it to run: normalisation and logits live in `mnist_resnet.inference`.
"""

from mnist_resnet.data.batches import (
    augment_batch,
    augment_generator,
    batches,
    elastic_offsets,
    epoch_indices,
    random_affine,
    random_erase,
    random_flip,
    training_batch,
)
from mnist_resnet.data.cache import verify
from mnist_resnet.data.datasets import (
    DATASETS,
    IMAGE_SIZE,
    MIRRORS_ENV,
    SOURCES_FILE,
    DatasetSpec,
    FileSpec,
    Log,
    PipSource,
    default_root,
    get_spec,
    mnist_style_files,
    raw_dir,
)
from mnist_resnet.data.errors import DataError, DataUnavailable, IDXError
from mnist_resnet.data.idx import read_idx, read_images, read_labels, read_split, write_idx
from mnist_resnet.data.own import OwnData, load_own
from mnist_resnet.data.sources import FetchResult, fetch, load_array_pickle
from mnist_resnet.data.splits import (
    DatasetInfo,
    PreparedData,
    Splits,
    format_info,
    info,
    load,
    load_data,
    prepare_data,
    split_validation,
    validation_size,
)

__all__ = [
    "DATASETS",
    "IMAGE_SIZE",
    "MIRRORS_ENV",
    "SOURCES_FILE",
    "DataError",
    "DataUnavailable",
    "DatasetInfo",
    "DatasetSpec",
    "FetchResult",
    "FileSpec",
    "IDXError",
    "Log",
    "OwnData",
    "PipSource",
    "PreparedData",
    "Splits",
    "augment_batch",
    "augment_generator",
    "batches",
    "default_root",
    "elastic_offsets",
    "epoch_indices",
    "fetch",
    "format_info",
    "get_spec",
    "info",
    "load",
    "load_array_pickle",
    "load_data",
    "load_own",
    "mnist_style_files",
    "prepare_data",
    "random_affine",
    "random_erase",
    "random_flip",
    "raw_dir",
    "read_idx",
    "read_images",
    "read_labels",
    "read_split",
    "split_validation",
    "training_batch",
    "validation_size",
    "verify",
    "write_idx",
]
