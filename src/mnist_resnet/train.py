"""A training run: set-up (device, data, model, `loop.TrainState`), resume, then one line of work
per epoch: `loop.train_one_epoch` with this run's hooks (progress bar, mid-epoch checkpoints,
Ctrl-C), validation, selection, the epoch's checkpoint. The step itself is `step.py`.

Batch order and augmentation are pure functions of (seed, epoch), and the global RNG state is
saved with every checkpoint, so a resumed run continues exactly where the killed one stopped.

Over 500 lines on purpose: a run's set-up, its resume checks (data hashes, world size, device of
the augmentation stream), its checkpoints and its selection read and write one run (`_Trainer`);
splitting them would hand that object around. The state and the loop live in `loop.py`, the
optimizer and schedule in `optim.py`, run directories in `runs.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_resnet import data, distributed, plots
from mnist_resnet.checkpoint import (
    checkpoint_name,
    load_checkpoint,
    run_checkpoints,
    save_checkpoint,
)
from mnist_resnet.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    own_data,
    to_dict,
)
from mnist_resnet.distill import check_teachers, load_teacher
from mnist_resnet.errors import TrainingError, TrainingInterrupted
from mnist_resnet.evaluate import EvalResult, evaluate, evaluate_shard
from mnist_resnet.files import atomic_write_text
from mnist_resnet.loop import EpochProgress, Hooks, TrainState, train_one_epoch
from mnist_resnet.model import build_model, check_size, describe, folded_copy, views_off
from mnist_resnet.optim import (
    WeightAverage,
    group_peak_lr,
    make_optimizer,
    make_scheduler,
    peak_lr,
)
from mnist_resnet.precision import make_runtime
from mnist_resnet.runs import (
    check_run_dir,
    load_resume,
    never_checkpointed,
    new_run_dir,
    read_run_config,
    resumed_with,
    saved_configs,
)
from mnist_resnet.runtime import configure_threads, seed_everything
from mnist_resnet.step import Distillation, NonFiniteLoss, train_step

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_error: float | None
    test: EvalResult
    epochs_run: int
    seconds: float
    # The plain module (never a DDP or compiled wrapper) holding the selected weights.
    model: nn.Module | None = None

    def lines(self) -> list[str]:
        """What `mnist-resnet train` says last: the epoch it kept, the time, the test result."""
        return [
            f"selected epoch {self.best_epoch} of {self.epochs_run}; run directory {self.run_dir}",
            f"training time: {self.seconds:.1f} s",
            f"test loss: {self.test.loss:.4f}",
            f"test accuracy: {self.test.accuracy:.2%}",
        ]


class _StopRequests:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second one aborts."""

    def __init__(self, log: Log) -> None:
        self.requested = False
        self.log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        # Signal handlers can only be installed from the main thread (tests call train() from
        # worker threads too); elsewhere Ctrl-C keeps its default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("stopping after this step and saving a checkpoint (press Ctrl-C again to abort)")


class _Trainer:
    """State of one run; `run()` is the epoch loop. Kept private: `train()` is the API."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        data_cfg: DataConfig,
        *,
        preset: str,
        run_dir: Path,
        log: Log,
        resume_state: dict[str, Any] | None,
    ) -> None:
        self.model_cfg, self.cfg, self.data_cfg = model_cfg, train_cfg, data_cfg
        # Under torchrun only rank 0 prints and writes files; every rank trains and evaluates.
        self.dist = distributed.current()
        self.preset, self.run_dir = preset, run_dir
        self.log = log if self.dist.is_main else _quiet
        self.threads = configure_threads(train_cfg.threads, self.dist.local_world_size)
        if train_cfg.threads > self.threads:
            self.log(
                f"note: --threads {train_cfg.threads} is more than the {self.threads} CPUs "
                f"this process may use; using {self.threads}"
            )
        seed_everything(train_cfg.seed, train_cfg.deterministic)
        # Rank 0 first: it runs the precision probe (if not cached) while the others wait.
        runtime = distributed.main_first(
            lambda: make_runtime(
                accel=train_cfg.accel, amp=train_cfg.amp, channels_last=train_cfg.channels_last
            )
        )
        self.log(f"precision: {runtime.precision_note}")
        device_data = train_cfg.device_data
        if device_data is None:
            device_data = runtime.device.type != "cpu"
        # The config saves both decisions, so a resumed run keeps the precision it started with
        # and draws its augmentation on the same kind of device.
        self.cfg = train_cfg = dataclasses.replace(
            train_cfg, amp=runtime.amp_dtype is not None, device_data=device_data
        )
        self.runtime = dataclasses.replace(
            runtime, device=distributed.device_for(runtime.device, self.dist)
        )
        # Without a check per step, a non-finite loss is found when the losses are read back
        # (every --log-interval steps, before a checkpoint, at the epoch's end); skipping a bad
        # step needs the verdict before the optimizer takes it, so --skip-nonfinite keeps it.
        self.check_each_step = not device_data or train_cfg.skip_nonfinite
        sync_bn = train_cfg.sync_bn and self.dist.enabled
        if sync_bn and self.runtime.device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on the CPU; "
                "drop --sync-bn (each rank then normalises over its own share of the batch)"
            )
        # Rank 0 fetches and verifies the files first; the others then read the same cache.
        self.data = distributed.main_first(lambda: data.prepare_data(data_cfg, log=self.log))
        # Own data decides the number of classes, and may hold out fewer images for validation
        # than --val-size: the saved configs say what was really trained.
        self.model_cfg = model_cfg = dataclasses.replace(
            model_cfg, num_classes=len(self.data.class_names)
        )
        self.data_cfg = data_cfg = dataclasses.replace(data_cfg, val_size=self.data.val_size)
        if device_data:
            # Uploaded once, as uint8 (55 MB for MNIST): batches are then cut and augmented there.
            self.data = _on_device(self.data, self.runtime.device)
        n_train = len(self.data.train_x)
        world = self.dist.world_size
        if train_cfg.batch_size * world > n_train:
            raise ConfigError(
                f"--batch-size {train_cfg.batch_size} x {world} processes is larger than the "
                f"{n_train} training images"
            )
        # --batch-size is per process: every step trains on batch_size x world_size images.
        self.steps_per_epoch = 1 if train_cfg.dry_run else n_train // (train_cfg.batch_size * world)
        model = build_model(model_cfg)
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
        self.model = self.runtime.prepare_model(model)
        optimizer = make_optimizer(self.model, train_cfg, world)
        average = WeightAverage(self.model, train_cfg.ema_decay) if train_cfg.ema_decay else None
        # The optimizer and the checkpoints hold the plain module; only the forward is wrapped.
        self.state = TrainState(
            self.model,
            optimizer,
            make_scheduler(optimizer, train_cfg, self.steps_per_epoch),
            average,
        )
        self.distill, self.teacher_sha256 = self._teacher(train_cfg)
        wrapped = distributed.wrap(self.model, self.dist, self.runtime.device)
        self.forward: nn.Module = wrapped
        if train_cfg.compile:
            mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
            self.forward = torch.compile(wrapped, mode=mode)  # type: ignore[assignment]
        # Evaluation shards the split itself: DDP's forward would sync buffers on every batch.
        self.eval_forward = self.model if self.dist.enabled else self.forward
        if average is not None:
            self._note_short_average(average, train_cfg.epochs * self.steps_per_epoch)
        if train_cfg.save_model:
            # Weights plus SGD momentum, in fp32: the bulk of a checkpoint's size.
            size = 2 * 4 * sum(p.numel() for p in self.model.parameters()) + (1 << 20)
            distributed.main_only(lambda: check_run_dir(run_dir, size, train_cfg.keep_last + 3))
        self.best_epoch, self.best_val_error = 0, math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        # The run's training time before this process (a resumed run), and when this one began:
        # checkpoints carry their sum, so the reported time is the whole run's.
        self.seconds_before, self.started = 0.0, time.perf_counter()
        self.stop = _StopRequests(log)
        if resume_state is not None:
            try:
                self._restore(resume_state)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                # The checksums cover weights and configs; the rest of a checkpoint (epoch,
                # optimizer, RNG state, progress) can still be damaged in ways torch loads.
                raise TrainingError(
                    f"cannot resume from {run_dir}: its checkpoint's training state is damaged "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else e!r}); "
                    "resume from an older checkpoint file or start a new run"
                ) from e

    def _teacher(self, cfg: TrainConfig) -> tuple[Distillation | None, list[str]]:
        if not cfg.teachers:
            return None, []
        teacher, files = load_teacher(
            cfg.teachers,
            cfg.distill_temperature,
            tuple(self.data.class_names),
            (self.data.mean, self.data.std),
        )
        self.log(
            f"distilling from {len(files)} teacher(s) at temperature {cfg.distill_temperature:g}, "
            f"weight {cfg.distill_weight:g}: "
            + ", ".join(f"{f.path} (sha256 {f.sha256[:12]})" for f in files)
        )
        prepared = self.runtime.prepare_model(teacher.to(self.runtime.device))
        return Distillation(prepared, cfg.distill_weight, cfg.distill_temperature), [
            f.sha256 for f in files
        ]

    def _note_short_average(self, average: WeightAverage, total_steps: int) -> None:
        # The ramp, not --ema-decay, sets the average of a run shorter than the ramp: say so,
        # since otherwise two different settings silently train the same weights.
        needed = average.steps_to_reach_decay()
        if total_steps < needed:
            self.log(
                f"note: the weight average's decay ramps up as (1+n)/(10+n) and reaches "
                f"--ema-decay {average.decay} after {needed:,} steps; this run has "
                f"{total_steps:,}, so its last update uses {average.decay_at(total_steps):.4f}"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        if self.teacher_sha256 or state.get("teacher_sha256"):
            check_teachers(state.get("teacher_sha256"), self.teacher_sha256)
        if state.get("data_hashes") != self.data.hashes:
            where = (
                f"in {self.data_cfg.dataset}"
                if own_data(self.data_cfg.dataset)
                else f"under {self.data_cfg.data_dir}"
            )
            raise TrainingError(
                "the checkpoint was trained on different data than the files found now "
                f"{where} (their content changed); refusing to resume"
            )
        epochs_done = int(state["epoch"])
        partial = state.get("partial_epoch")
        saved_world = int(state.get("world_size", 1))
        world = self.dist.world_size
        if partial and saved_world != world:
            raise TrainingError(
                f"this checkpoint stopped in the middle of epoch {epochs_done + 1} with "
                f"{saved_world} process(es); resume it with {saved_world}, or resume from a "
                f"whole-epoch checkpoint ({self.run_dir}/checkpoints/"
                f"{checkpoint_name(epochs_done)}) to change the number of processes"
            )
        self.state.load_state_dict(state, rank=self.dist.rank)
        if saved_world != world:
            self._rescale_schedule(epochs_done)
        self.seconds_before = float(state.get("run_seconds", 0.0))
        best = state.get("best", {})
        self.best_epoch = int(best.get("epoch", 0))
        self.best_val_error = float(best.get("val_error", math.inf))
        best_path = self.run_dir / "best.pt"
        # Rank 0 reads the files; `_finish` hands its selected weights to the other ranks.
        if self.dist.is_main and best_path.exists() and self.best_epoch:
            self.best_state = load_checkpoint(best_path)["model"]
        if self.dist.is_main:
            self._truncate_metrics(epochs_done)
            # Temp files of writes that a kill interrupted: never loaded, just clutter.
            for stale in self.run_dir.glob("**/.*.tmp"):
                stale.unlink(missing_ok=True)
        where = f", step {self.state.progress.step}" if self.state.progress.step else ""
        procs = (
            f" with {world} processes (saved with {saved_world})" if saved_world != world else ""
        )
        self.log(f"resumed after epoch {epochs_done}{where} of {self.cfg.epochs}{procs}")

    def _rescale_schedule(self, epochs_done: int) -> None:
        """Another world size means another global batch and steps per epoch: restart the
        per-step schedule at the start of epoch `epochs_done + 1` from the scaled peak lr."""
        optimizer = self.state.optimizer
        for group in optimizer.param_groups:
            group["initial_lr"] = group_peak_lr(group, self.cfg, self.dist.world_size)
        self.state.scheduler = make_scheduler(
            optimizer, self.cfg, self.steps_per_epoch, step=epochs_done * self.steps_per_epoch
        )

    def _truncate_metrics(self, epochs_done: int) -> None:
        # A run killed after writing metrics but before its checkpoint would duplicate rows.
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("epoch", 0) <= epochs_done]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _state(self, epoch: int) -> dict[str, Any]:
        """A checkpoint: the configs, the training state as after `epoch` whole epochs, and
        what a model file needs besides its weights (data, normalisation, classes, selection)."""
        return {
            "config": {
                "preset": self.preset,
                "model": to_dict(self.model_cfg),
                "train": to_dict(self.cfg),
                "data": to_dict(self.data_cfg),
            },
            **self.state.state_dict(),
            "epoch": epoch,
            "world_size": self.dist.world_size,
            "data_hashes": self.data.hashes,
            "normalization": {"mean": self.data.mean, "std": self.data.std},
            "class_names": list(self.data.class_names),
            "best": {"epoch": self.best_epoch, "val_error": self.best_val_error},
            "run_seconds": self._run_seconds(),
            **({"teacher_sha256": self.teacher_sha256} if self.teacher_sha256 else {}),
        }

    def _save(self, epochs_done: int) -> None:
        """Write the newest checkpoint, check it loads, then prune the oldest beyond K.

        Called on every rank; rank 0 writes. Mid-epoch, it gathers each rank's progress.
        """
        progress, ranks = self.state.progress, None
        if progress.step and self.dist.enabled:
            ranks = distributed.gather_objects(dict(vars(progress)))
        if not self.dist.is_main:
            return
        path = self.run_dir / "checkpoints" / checkpoint_name(epochs_done, progress.step)
        state = self._state(epochs_done)
        if ranks is not None:
            state["partial_epoch_ranks"] = ranks
        save_checkpoint(path, state)
        load_checkpoint(path)  # never prune the older ones for a file that does not load back
        for old in run_checkpoints(self.run_dir)[: -self.cfg.keep_last]:
            old.unlink(missing_ok=True)

    def _evaluate(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        model: nn.Module | None = None,
        *,
        views: bool = True,
    ) -> EvalResult:
        """Metrics of the model on (x, y); `views=False` judges the network on the images as
        given even when the model averages views at test time (`--tta`): the per-epoch
        validation, which only compares epochs and would cost the views' multiple each time."""
        model = self.eval_forward if model is None else model
        if not self.dist.enabled and not self.cfg.compile:
            # Judged through a copy with its batch norms folded, the form `evaluate`, `predict`
            # and `serve` load (logits within 1e-5), and faster to run (docs/speed.md).
            model = self.runtime.prepare_model(folded_copy(model))
        if self.cfg.dry_run:
            x, y = x[: self.cfg.test_batch_size], y[: self.cfg.test_batch_size]
        with contextlib.nullcontext() if views else views_off(model):
            return self._metrics(model, x, y)

    def _metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> EvalResult:
        if self.dist.enabled:
            return evaluate_shard(
                model,
                x,
                y,
                mean=self.data.mean,
                std=self.data.std,
                runtime=self.runtime,
                num_classes=len(self.data.class_names),
                batch_size=self.cfg.test_batch_size,
            )
        return evaluate(
            model,
            x,
            y,
            mean=self.data.mean,
            std=self.data.std,
            runtime=self.runtime,
            batch_size=self.cfg.test_batch_size,
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (or the rest of one, after a resume) through `train_one_epoch`, with this
        run's logging (the progress bar), checkpoint and signal points as its hooks."""
        from tqdm import tqdm

        cfg, progress = self.cfg, self.state.progress
        batches, augment_rng = self._epoch_batches(epoch)
        started = time.perf_counter() - progress.seconds
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=progress.step,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if self.dist.is_main else True,
            unit="batch",
        )

        def show(rows: list[tuple[int, float, float]]) -> None:
            if rows and not bar.disable:
                rate = self.state.progress.seen / max(1e-9, time.perf_counter() - started)
                bar.set_postfix(loss=f"{rows[-1][1]:.4f}", img_s=f"{rate:,.0f}")

        def checkpoint() -> None:
            self.state.progress.augment_rng = augment_rng.get_state()
            if cfg.save_model:
                self._save(epoch)

        def stop() -> None:
            step = self.state.progress.step
            raise TrainingInterrupted(
                f"stopped at epoch {epoch + 1}, step {step}; checkpoint saved. "
                f"Continue with: mnist-resnet train --resume {self.run_dir}"
                if cfg.save_model
                else f"stopped at epoch {epoch + 1}, step {step} (--no-save-model: nothing saved)"
            )

        hooks = Hooks(
            log_every=cfg.log_interval,
            on_log=show,
            checkpoint_every=cfg.checkpoint_steps,
            on_checkpoint=checkpoint,
            stop_now=self._stop_requested,
            on_stop=stop,
        )
        self.forward.train()
        with bar:
            try:
                done = train_one_epoch(
                    self.state,
                    _counted(batches, bar),
                    lambda images_u8, labels: self._step(epoch, images_u8, labels, augment_rng),
                    self.steps_per_epoch,
                    hooks,
                )
            except NonFiniteLoss as e:
                raise self._nonfinite(e.value, epoch, e.step) from None
        return self._epoch_metrics(done)

    def _epoch_batches(
        self, epoch: int
    ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], torch.Generator]:
        """This rank's batches of the epoch, and the augmentation stream they are drawn with."""
        cfg, d, p = self.cfg, self.data, self.state.progress
        rank, world = self.dist.rank, self.dist.world_size
        # Every rank draws the same permutation and takes its own stride of it.
        indices = data.epoch_indices(
            len(d.train_x), epoch=epoch, seed=cfg.seed, rank=rank, world_size=world
        )
        # A resumed epoch skips the batches it already trained on, and continues the same
        # augmentation stream, so the result is the same as if it had never stopped.
        indices = indices[p.step * cfg.batch_size :].to(d.train_x.device)
        batches = data.batches(d.train_x, d.train_y, indices, cfg.batch_size, drop_last=True)
        # Rank 0 keeps the single-process stream; other ranks get streams of their own. Drawn
        # where the images are, so that device-resident batches never wait for the host.
        augment_rng = data.augment_generator(
            d.train_x.device, cfg.seed * 1_000_003 + epoch + (rank << 40)
        )
        if p.augment_rng is not None:
            try:
                augment_rng.set_state(p.augment_rng)
            except RuntimeError:  # a CPU generator's state does not fit a GPU's, nor back
                raise TrainingError(
                    f"this run stopped in the middle of epoch {epoch + 1} with its augmentation "
                    f"drawn on another kind of device than {d.train_x.device.type}; resume it "
                    f"there, or resume from its whole-epoch checkpoint ({self.run_dir}/"
                    f"checkpoints/{checkpoint_name(epoch)})"
                ) from None
        return batches, augment_rng

    def _step(
        self,
        epoch: int,
        images_u8: torch.Tensor,
        labels: torch.Tensor,
        augment_rng: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Augment one batch and take one optimizer step: (loss, error rate, stepped), on the
        device; with --skip-nonfinite a non-finite step is logged and not taken."""
        cfg = self.cfg
        images = data.training_batch(
            images_u8, self.data_cfg, augment_rng, self.data.mean, self.data.std
        )
        try:
            loss, err = train_step(
                self.forward,
                images,
                labels,
                self.state.optimizer,
                self.runtime,
                label_smoothing=cfg.label_smoothing,
                grad_clip=cfg.grad_clip,
                check_finite=self.check_each_step,
                distill=self.distill,
            )
        except NonFiniteLoss as e:
            if not cfg.skip_nonfinite:
                raise
            step = self.state.progress.step + 1
            self.log(f"skipped step {step} of epoch {epoch + 1}: loss {e.value}")
            device = self.runtime.device
            return torch.zeros((), device=device), torch.ones((), device=device), False
        return loss, err, True

    def _nonfinite(self, value: float, epoch: int, step: int) -> TrainingError:
        saved = (
            f" (checkpoints in {self.run_dir} hold the last good weights)"
            if run_checkpoints(self.run_dir)
            else ""
        )
        return TrainingError(
            f"loss became {value} at epoch {epoch + 1}, step {step}; lower --lr, set "
            f"--grad-clip, or pass --skip-nonfinite{saved}"
        )

    def _epoch_metrics(self, p: EpochProgress) -> dict[str, float]:
        """Loss and error over the whole global batch stream (the same on every rank)."""
        loss_sum, err_sum, seen = distributed.all_reduce_sum(
            torch.tensor([p.loss_sum, p.err_sum, float(p.seen)], dtype=torch.float64)
        ).tolist()
        return {
            "train_loss": loss_sum / max(1, seen),
            "train_error": err_sum / max(1, seen),
            "images_per_second": seen / max(1e-9, p.seconds),
            "train_seconds": p.seconds,
        }

    def _candidate(self) -> nn.Module:
        """The weights an epoch is judged by: the running average if there is one."""
        average = self.state.average
        return self.eval_forward if average is None else average.model

    def _stop_requested(self, step: int | None = None) -> bool:
        """Whether to stop now: at once in one process; with several, only where all ranks ask
        (at the end of an epoch, and every --log-interval steps within one, as the losses are
        read back then anyway): the question is a collective the host waits for, and one that
        stopped alone would leave the others waiting in DDP."""
        if not self.dist.enabled:
            return self.stop.requested
        if step is not None and step % self.cfg.log_interval:
            return False
        self.stop.requested = distributed.any_rank(self.stop.requested)
        return self.stop.requested

    def run(self) -> TrainResult:
        with self.stop:
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        writer = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                self.run_dir / "config.json", json.dumps(self._state(0)["config"], indent=2) + "\n"
            )
            writer = _tensorboard_writer(self.run_dir)
        procs = ""
        if self.dist.enabled:
            procs = (
                f", {self.dist.world_size} processes x batch {cfg.batch_size} = global batch "
                f"{cfg.batch_size * self.dist.world_size}, peak lr "
                f"{peak_lr(cfg, self.dist.world_size):g}"
            )
        self.log(
            f"training {describe(self.model_cfg)} (preset {self.preset}) on "
            f"{self.data_cfg.dataset}: {len(self.data.train_x)} train / "
            f"{len(self.data.val_x)} validation images, {self.runtime.describe()}{procs}, "
            f"run directory {self.run_dir}"
        )
        self.started = time.perf_counter()
        epochs = 1 if cfg.dry_run else cfg.epochs
        epochs_run = self.state.epoch
        for epoch in range(self.state.epoch, epochs):
            epochs_run = epoch + 1
            row: dict[str, float] = {"epoch": epoch + 1, "lr": self._epoch_lr()}
            row.update(self._train_epoch(epoch))
            # With --ema-decay the averaged weights are validated, selected and tested.
            average = self.state.average
            selectable = self.model if average is None else average.model
            self._check_finite(selectable, epoch)
            if len(self.data.val_x):
                val = self._evaluate(
                    self.data.val_x, self.data.val_y, self._candidate(), views=False
                )
                row.update(val_loss=val.loss, val_error=val.error)
                improved = val.error < self.best_val_error
            else:
                improved = True  # no validation split: the last epoch is the selected one
            if cfg.eval_test_every_epoch:
                test_start = time.perf_counter()
                test = self._evaluate(self.data.test_x, self.data.test_y, self._candidate())
                # Timed so benchmarks can tell this extra pass from what a plain run costs.
                row.update(
                    test_loss=test.loss,
                    test_error=test.error,
                    test_eval_seconds=time.perf_counter() - test_start,
                )
            if improved:
                self.best_epoch = epoch + 1
                self.best_val_error = row.get("val_error", math.inf)
                self.best_state = {
                    k: v.detach().clone() for k, v in selectable.state_dict().items()
                }
            self._end_epoch(epoch + 1, row, improved, writer)
            if self._stop_requested():
                raise TrainingInterrupted(
                    f"stopped after epoch {epoch + 1}; checkpoint saved. Continue with: "
                    f"mnist-resnet train --resume {self.run_dir}"
                )
            if cfg.patience and epoch + 1 - self.best_epoch >= cfg.patience:
                self.log(f"early stop: validation error has not improved for {cfg.patience} epochs")
                break
        if writer is not None:
            writer.close()
        return self._finish(epochs_run, self._run_seconds())

    def _run_seconds(self) -> float:
        """The whole run's training time so far, a killed and resumed run's earlier part too."""
        return self.seconds_before + time.perf_counter() - self.started

    def _epoch_lr(self) -> float:
        """The learning rate of the epoch's first step, also when a resume starts mid-epoch
        (the optimizer then holds the rate of the step it resumes at)."""
        scheduler = self.state.scheduler
        first_step = scheduler.last_epoch - self.state.progress.step
        factor = scheduler.lr_lambdas[0](first_step)
        return float(scheduler.base_lrs[0] * factor)

    def _check_finite(self, model: nn.Module, epoch: int) -> None:
        """Stop before a model whose weights went NaN/inf is judged, selected or saved: its
        predictions mean nothing (possible with --skip-nonfinite, where a bad step got through)."""
        if all(
            torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
        ):
            return
        kept = (
            f"best.pt keeps epoch {self.best_epoch}"
            if self.best_epoch
            else "nothing was saved as best.pt"
        )
        raise TrainingError(
            f"the weights became NaN or infinite during epoch {epoch + 1}; {kept}. Lower --lr "
            "or set --grad-clip"
        )

    def _end_epoch(self, epoch: int, row: dict[str, float], improved: bool, writer: Any) -> None:
        if not self.dist.is_main:
            return  # ranks agree on the row and on `improved`; rank 0 writes them
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
        val = f", val error {row['val_error']:.2%}" if "val_error" in row else ""
        self.log(
            f"epoch {epoch}/{self.cfg.epochs}: train loss {row['train_loss']:.4f}{val}, "
            f"{row['images_per_second']:,.0f} img/s, {row['train_seconds']:.1f} s"
            + (" *" if improved and "val_error" in row else "")
        )
        if not self.cfg.save_model:
            return
        self._save(epoch)
        if improved and self.best_state is not None:
            # best.pt is a separate file from the pruned epoch checkpoints: it always survives.
            best = self._state(epoch)
            best["model"] = self.best_state
            save_checkpoint(self.run_dir / "best.pt", best)

    def _finish(self, epochs_run: int, seconds: float) -> TrainResult:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        distributed.broadcast_module(self.model)  # a resumed run read best.pt on rank 0 only
        test = self._evaluate(self.data.test_x, self.data.test_y)
        result = {
            "best_epoch": self.best_epoch,
            "best_val_error": self.best_val_error if math.isfinite(self.best_val_error) else None,
            "test_accuracy": test.accuracy,
            "test_loss": test.loss,
            "epochs_run": epochs_run,
            "train_seconds": seconds,
        }
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=2) + "\n")
            if self.cfg.save_model:
                best = self._state(self.best_epoch)
                best["model"] = self.model.state_dict()
                best["test"] = {"accuracy": test.accuracy, "loss": test.loss}
                save_checkpoint(self.run_dir / "best.pt", best)
            plots.training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        return TrainResult(
            run_dir=self.run_dir,
            best_epoch=self.best_epoch,
            best_val_error=result["best_val_error"],  # type: ignore[arg-type]
            test=test,
            epochs_run=epochs_run,
            seconds=seconds,
            model=self.model,
        )


def _quiet(line: str) -> None:
    """The log of ranks other than 0."""


def _on_device(d: data.PreparedData, device: torch.device) -> data.PreparedData:
    """The three splits, images and labels, on `device` (the same tensors on the CPU)."""
    return dataclasses.replace(
        d,
        train_x=d.train_x.to(device),
        train_y=d.train_y.to(device),
        val_x=d.val_x.to(device),
        val_y=d.val_y.to(device),
        test_x=d.test_x.to(device),
        test_y=d.test_y.to(device),
    )


def _counted(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], bar: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches, moving the progress bar on as each one's step is done."""
    for batch in batches:
        yield batch
        bar.update()


def _tensorboard_writer(run_dir: Path) -> Any:
    """A SummaryWriter when tensorboard is installed; scalars are optional extras."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    *,
    preset: str = "custom",
    log: Log = print,
    resume: Path | None = None,
    resume_data_dir: str | None = None,
    resume_given: dict[str, set[str]] | None = None,
) -> TrainResult:
    """Train (or resume) a run and evaluate its selected checkpoint once on the test set.

    A resumed run takes every setting from the run itself, the data folder included; give
    `resume_data_dir` when its files are now elsewhere (they must hash the same). With
    `resume_given` (the fields set on the command line, by config class name) the configs given
    say what a resume may change: this machine's settings (`runs.RESUME_MACHINE`) apply, and a
    setting that differs from the run's own is refused.
    Started by torchrun with several processes, it joins their process group (gloo on CPUs,
    NCCL on CUDA) and trains data-parallel; it leaves the group on success and on error.
    """
    with distributed.process_group(accel=train_cfg.accel):
        return _train(
            model_cfg,
            train_cfg,
            data_cfg,
            preset=preset,
            log=log,
            resume=resume,
            resume_data_dir=resume_data_dir,
            resume_given=resume_given or {},
        )


def _one_network(model_cfg: ModelConfig) -> None:
    if model_cfg.members != 1:
        raise ConfigError(
            f"that model is an ensemble of {model_cfg.members} trained networks, packed by "
            "`mnist-resnet ensemble --save`: train its members one by one instead"
        )


def _train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    *,
    preset: str,
    log: Log,
    resume: Path | None,
    resume_data_dir: str | None,
    resume_given: dict[str, set[str]],
) -> TrainResult:
    _one_network(model_cfg)  # before a run folder is made
    asked, asked_preset = (model_cfg, train_cfg, data_cfg), preset
    resume_state = None
    fresh_dir = None
    if resume is not None and never_checkpointed(resume):
        # Killed before its first checkpoint: nothing to restore, so start that run over.
        preset, model_cfg, train_cfg, data_cfg = saved_configs(
            read_run_config(resume), preset, resume_data_dir, source=resume / "config.json"
        )
        log(f"{resume} has no checkpoint yet: starting that run from the beginning")
        fresh_dir, resume = resume, None
    if fresh_dir is not None:
        run_dir = fresh_dir
    elif resume is not None:
        # Rank 0 picks and reads the checkpoint; every rank then restores the same state.
        ckpt, resume_state = distributed.main_only(lambda: load_resume(resume))
        preset, model_cfg, train_cfg, data_cfg = saved_configs(
            resume_state["config"], preset, resume_data_dir, source=ckpt
        )
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    else:
        # Rank 0 names the run (the default name holds the time) and checks it is new.
        run_dir = distributed.main_only(lambda: new_run_dir(preset, train_cfg, data_cfg))
    if fresh_dir is not None or resume is not None:
        train_cfg = resumed_with(
            (model_cfg, train_cfg, data_cfg), asked, resume_given, (preset, asked_preset)
        )
    for cfg in (model_cfg, train_cfg, data_cfg):
        cfg.validate()
    _one_network(model_cfg)
    check_size(model_cfg)  # before any data is fetched or memory allocated
    trainer = _Trainer(
        model_cfg,
        train_cfg,
        data_cfg,
        preset=preset,
        run_dir=run_dir,
        log=log,
        resume_state=resume_state,
    )
    return trainer.run()
