"""Where and how tensors run: device, thread count, the one autocast decision, host memory reuse.

Everything that depends on the hardware is decided here once and carried in a `Runtime`, so the
training step and evaluation use the same precision and memory layout without re-deciding.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    # None means full fp32; bfloat16 needs no loss scaling, unlike float16.
    amp_dtype: torch.dtype | None
    channels_last: bool
    # Why this precision: forced by a flag, or what the probe measured on this machine.
    precision_note: str = ""

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.amp_dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            yield

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            # NHWC lets oneDNN/cuDNN pick their fastest (blocked) convolution kernels.
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def describe(self) -> str:
        precision = "fp32" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        layout = "channels_last" if self.channels_last else "contiguous"
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device.type} ({precision}, {layout}{threads})"


def select_device(accel: bool = True) -> torch.device:
    """CUDA, then Apple MPS, then CPU; `accel=False` (--no-accel) forces the CPU."""
    if accel and torch.cuda.is_available():
        return torch.device("cuda")
    if accel and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# glibc's mallopt parameters (malloc.h) and the environment variables that set them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_KEEP_BYTES = 1 << 30


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Every training step frees and re-allocates the same activation buffers (megabytes each).
    By default glibc serves large ones with mmap or trims them off the heap when freed, so each
    step faults fresh zeroed pages back in; with both thresholds raised the buffers stay in the
    heap (docs/speed.md has the measurements). Memory the process has used then stays mapped
    until it exits, so this is for the commands that loop over batches (train, evaluate,
    ensemble, experiments), which call it themselves; a long-lived server does not.
    Does nothing where the C library is not glibc, or when the user already set
    MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_; returns whether both settings took.
    """
    # Both or neither: setting the trim threshold alone also switches off glibc's adaptive
    # mmap threshold, and large buffers then go through mmap every time (far slower).
    return _mallopt((_M_MMAP_THRESHOLD, _KEEP_BYTES), (_M_TRIM_THRESHOLD, _KEEP_BYTES))


def return_freed_memory() -> bool:
    """The opposite choice, for a long-lived server: buffers over 1 MiB (a decoded upload) are
    mapped for themselves and unmapped when freed, so memory goes back to the OS after a burst.

    glibc's adaptive threshold would otherwise rise after the first large free, and the next
    large buffers would stay in the per-thread arenas of the worker threads, each keeping its
    own (docs/serving.md). Same conditions as `retain_freed_memory`.
    """
    return _mallopt((_M_MMAP_THRESHOLD, 1 << 20))


def _mallopt(*settings: tuple[int, int]) -> bool:
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        # glibc only: macOS and Windows have no such setting, musl's mallopt is a stub.
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([bool(mallopt(param, value)) for param, value in settings])


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        available = os.cpu_count() or 1
    return max(1, available)


def configure_threads(threads: int, world_size: int = 1) -> int:
    """Set intra-op threads: `threads`, or the cores shared evenly between local processes.

    Never more than the CPUs this process may use: more threads only contend, and absurd
    counts crash the OpenMP runtime.
    """
    cpus = available_cpus()
    n = min(threads, cpus) if threads else max(1, cpus // max(1, world_size))
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # Bit-for-bit repeatability on the same machine; costs a little speed on CUDA only.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def trim_freed_memory() -> bool:
    """Hand the free memory inside every malloc arena back to the OS now (glibc's malloc_trim):
    a burst of small objects (a large JSON body parsed into millions of floats) leaves holes
    that `return_freed_memory`'s mmap threshold does not cover. Returns whether any was freed;
    False where the C library is not glibc."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, ValueError, OSError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
