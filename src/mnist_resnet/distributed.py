"""Data-parallel training on PyTorch's own engine: the torchrun environment, the process group,
rank helpers and the `--nproc` launcher.

torchrun (`python -m torch.distributed.run`) starts one process per rank and describes the job
in environment variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).
Without them, everything here degrades to a single process that needs no process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, local rank on its machine, sizes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_os() -> DistEnv:
    """The job as torchrun describes it; one process (rank 0 of 1) outside torchrun."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.strip() else default

    world = read("WORLD_SIZE", 1)
    return DistEnv(
        rank=read("RANK", 0),
        world_size=world,
        local_rank=read("LOCAL_RANK", 0),
        local_world_size=read("LOCAL_WORLD_SIZE", world),
    )


def current() -> DistEnv:
    """This process's place in an initialised process group, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    env = env_from_os()
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
    )


def is_main_process() -> bool:
    """Rank 0 of the job (also true outside torchrun): the one process that prints and writes."""
    return env_from_os().rank == 0


def backend_for(accel: bool) -> str:
    """NCCL between CUDA devices; gloo on CPUs (and for everything NCCL does not carry: the
    small CPU tensors of the stop flag and the summed metrics, which then never wait for the
    GPU)."""
    return "cpu:gloo,cuda:nccl" if accel and torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def process_group(*, accel: bool = True) -> Iterator[DistEnv]:
    """Join the job's process group when torchrun started several processes; always leave it.

    Reads the rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) from the environment.
    A group that the caller already initialised is used as is and left to the caller.
    """
    env = env_from_os()
    if env.world_size <= 1 or dist.is_initialized():
        yield current()
        return
    backend = backend_for(accel)
    if "nccl" in backend:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend)
    try:
        yield current()
    finally:
        # On success and on error: a rank that leaves without this makes the others wait for
        # it until the collective timeout instead of failing fast.
        dist.destroy_process_group()


def device_for(device: torch.device, env: DistEnv) -> torch.device:
    """One GPU per local rank; CPU processes share the device."""
    if device.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return device


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (which stays the one whose state is saved)."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where the process group can reduce `tensor`: its own device when the group's backend
    carries that kind of device (gloo: CPU; `process_group`'s gloo beside NCCL: both), else
    this rank's GPU (an NCCL-only group that a caller set up)."""
    carried = {part.split(":")[0].strip() for part in str(dist.get_backend_config()).split(",")}
    if tensor.device.type in carried:
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device())


def _all_reduce(tensor: torch.Tensor, op: Any) -> None:
    """`dist.all_reduce` of `tensor` in place, on a device the group's backend carries."""
    device = collective_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=op)
        return
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    tensor.copy_(moved)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (a no-op for one process) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _all_reduce(tensor, dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop request)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)])
    _all_reduce(value, dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's module."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _share_outcome(value: Any, error: BaseException | None) -> Any:
    """Broadcast rank 0's result or exception; raise it on every rank if it was an exception."""
    box: list[Any] = [(value, error)]
    try:
        dist.broadcast_object_list(box, src=0)
    except (TypeError, AttributeError):  # an exception that does not pickle
        box = [(None, RuntimeError(str(error)))]
        dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def main_only(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result (or its exception) to every rank.

    For decisions that must agree (run directory name, file checks): every rank raises the same
    error, so none is left waiting in a collective for a rank that already failed.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    value, error = None, None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as e:
            error = e
    return _share_outcome(value, error)  # type: ignore[no-any-return]


def main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 first (e.g. fetch and verify data), then on the other ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    if dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as e:
            _share_outcome(None, e)
            raise
        _share_outcome(None, None)
        return value
    _share_outcome(None, None)
    return fn()


# --- the `--nproc N` launcher -----------------------------------------------------------------


def strip_option(argv: Sequence[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def torchrun_args(nproc: int, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments for this machine (`--standalone` picks a free port) running
    `python -m mnist_resnet argv` in each process."""
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "mnist_resnet", *argv]


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The shell command `launch` is equivalent to."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, argv)]


def launch(nproc: int, argv: Sequence[str], *, threads: int = 0) -> int:
    """Run `mnist_resnet argv` as `nproc` torchrun workers on this machine; their exit code.

    torchrun runs in this process so that a failed worker ends the command with that worker's
    exit code and its own one-line message, without torchrun's report and traceback on top.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from mnist_resnet.runtime import available_cpus

    # torchrun would set 1 thread per worker and warn; give each worker its share of the cores.
    per_worker = threads or max(1, available_cpus() // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_worker))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(nproc, argv)))  # type: ignore[no-untyped-call]
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
