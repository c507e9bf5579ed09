"""The checkpointer: when and what a run saves, and where it resumes from.

What: one dict of state, built from the same stateful objects for saving and
loading (model, optimizer, scaler, RNG, progress), holding only tensors and
plain types, so every file opens with a plain `torch.load(path)`
(weights_only) here, in the published M2D runtime and in EVAR.

When: an epoch checkpoint after every `save_freq` epochs and at the end, a
rolling `last.pth` every `ckpt_interval_min` minutes (written in a thread) and
on a stop signal. Every save that is due happens, also when a stop lands on
an epoch's last step. Nothing non-finite is ever saved: the run ends as
diverged instead. Resume picks the checkpoint with the most progress that
loads, and refuses to start over silently when a run folder shows progress
but nothing loads.

How a file is written and read (atomic, CRC32-checked, code-free) is
m2das.ckptfile's business.
"""

import contextlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from m2das import events, runfolder
from m2das.ckptfile import (FORMAT, LEGACY_ALLOWED, CheckpointError, SaveFailed, as_full_state, load_file,
                            safe_load, save_file, tensor_bytes)
from m2das.runfolder import EXIT_DIVERGED, EXIT_RESUMABLE

__all__ = ["FORMAT", "CheckpointError", "SaveFailed", "Progress", "RNGState", "Outcome", "Checkpointer",
           "BackgroundWriter", "all_finite", "to_cpu", "load_file", "save_file"]


def resume_hint() -> str:
    """Who resumes a stopped run: under SLURM the job requeues itself and under the local launcher
    the supervisor restarts it, so "rerun the same command" would send the user to do it twice."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"SLURM job {job} requeues itself and resumes here (a job started by hand: rerun the same command)"
    if os.environ.get("M2DAS_LAUNCHER_ATTEMPT"):
        return "the launcher restarts the run and resumes here"
    return "rerun the same command to resume"


@dataclass(frozen=True)
class Outcome:
    """Why the run ends here: the restarts.jsonl event, the exit code and the line for the user."""
    event: str
    exit_code: int
    message: str

# -- stateful pieces that are not torch objects ----------------------------------------

class Progress:
    """Where the run is: the next epoch to run, batches done in it, optimizer steps so far."""

    def __init__(self):
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch, self.step = (int(state[k]) for k in ("epoch", "batch_in_epoch", "step"))


class RNGState:
    """The global torch / numpy (/ CUDA) generators as tensors and numbers, so no pickled numpy object."""

    def __init__(self, device):
        self.device = device

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                 "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_gauss"]))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def all_finite(tensors) -> bool:
    """One fused reduction (max |x| per tensor, NaN propagating) and a single host sync."""
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return True
    by_device = {}
    for t in floats:
        by_device.setdefault(t.device, []).append(t.detach())
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, ord=float("inf")))).all())
               for ts in by_device.values())


def to_cpu(obj):
    """Deep copy of a state with every tensor on the CPU, safe to write while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes one snapshot at a time in a thread, keeping disk I/O off the training step."""

    def __init__(self):
        self._thread = None
        self.error = None

    def submit(self, state: dict, path, then=None) -> None:
        """Write `state` to `path`, then call `then(path, state)` (an upload), all off the training thread."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state, path, then), daemon=True)
        self._thread.start()

    def _write(self, state, path, then):
        try:
            save_file(state, path)
            if then is not None:
                then(Path(path), state)
        except SaveFailed as e:  # reported on the next wait()
            self.error = e

    def wait(self) -> None:
        """Block until the write in flight is done; raise its SaveFailed, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


# -- the manager -----------------------------------------------------------------------

class Checkpointer:
    """Owns the checkpoint files of one run folder; the training loop only calls it.

    `states` maps top-level checkpoint keys to objects with state_dict() and
    load_state_dict(); "progress" (a Progress) is stored flat (epoch, step,
    batch_in_epoch at the top level, as the reference format has "epoch").
    `meta` holds plain values saved alongside (args, norm_stats, classes).
    """

    def __init__(self, run_dir, states: dict, meta: dict, *, rank: int, epochs: int, save_freq: int,
                 interval_s: float, log, flag_group=None, publish=None, keep_epochs: int = 0):
        self.run_dir = Path(run_dir)
        self.keep_epochs = keep_epochs  # newest epoch checkpoints kept (0: all)
        self.publish = publish  # publish(path, step): mirror a completed file (object storage), or None
        self.states, self.meta = states, meta
        self.progress: Progress = states["progress"]
        self.rank, self.epochs, self.save_freq, self.interval_s = rank, epochs, save_freq, interval_s
        self.log, self.flag_group = log, flag_group
        self.writer = BackgroundWriter()
        self.last_save = time.monotonic()

    # what
    def state_dict(self) -> dict:
        state = {"format": FORMAT, **self.meta, **self.progress.state_dict()}
        for key, obj in self.states.items():
            if key != "progress":
                state[key] = obj.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
        for key, obj in self.states.items():
            if key != "progress" and state.get(key) is not None:
                obj.load_state_dict(state[key])

    def tensors(self):
        """The model's and the optimizer's tensors: what a save must find finite."""
        model = self.states["model"]
        yield from model.state_dict().values()
        opt = self.states.get("optimizer")
        if opt is not None:
            for per_param in opt.state.values():
                yield from per_param.values()

    # start-up
    def prepare_folder(self) -> list:
        """Remove temporaries left by killed writes (the caller holds the run lock). Returns their names."""
        removed = []
        for p in self.run_dir.iterdir():
            if runfolder.TEMPORARY_RE.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
        return removed

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes: an existing one's size, else the state's tensors, counting
        the two AdamW moments per parameter that the first step will create."""
        existing = max((p.stat().st_size for p in runfolder.checkpoint_files(self.run_dir)), default=0)
        if existing:
            return existing
        need = tensor_bytes(self.state_dict())
        opt = self.states.get("optimizer")
        if opt is not None and not opt.state:
            need += 2 * sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
        return need

    def warn_if_low_space(self) -> None:
        need = self.checkpoint_bytes()
        free = shutil.disk_usage(self.run_dir).free
        if free < 2 * need:
            self.log(f"warning: {self.run_dir} has {free / 1e9:.2f} GB free, less than two checkpoints "
                     f"({2 * need / 1e9:.2f} GB); saves may fail")

    def resume(self, mode: str, shows_progress: bool):
        """Load the state to continue from (in place); return its path, or None for a fresh start."""
        if mode == "none":
            return None
        if mode != "auto":
            self.load_state_dict(load_file(mode))
            return str(mode)
        ranked, tried = self._ranked_checkpoints()
        for path in ranked:
            try:
                self.load_state_dict(load_file(path))
            except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
                tried.append((path, str(e)))
                continue
            self._report_skipped(tried, path)
            return str(path)
        if shows_progress or tried:
            detail = "; ".join(f"{p.name}: {why}" for p, why in tried) if tried else "no checkpoint file"
            raise CheckpointError(f"{self.run_dir} shows progress but no checkpoint loads ({detail}); nothing was "
                                  f"changed. Restore a checkpoint, or start over on purpose with --resume none")
        return None

    def _report_skipped(self, skipped, loaded: Path) -> None:
        """Name every checkpoint passed over on the way to `loaded`, with what the fallback costs: an older
        state resumed without a word would be a silent rollback."""
        for path, why in skipped:
            cost = runfolder.fallback_cost(self.run_dir, path.name, self.progress.step)
            self.log(f"warning: skipping {path}: {why}; resumed from {loaded.name} at step {self.progress.step} "
                     f"instead: {cost.pop('cost')}")
            if self.rank == 0:
                events.record(self.run_dir, runfolder.EVENT_CHECKPOINT_SKIPPED, file=path.name, error=why,
                              resumed_from=loaded.name, resumed_step=self.progress.step, **cost)

    def _ranked_checkpoints(self):
        """Full-state checkpoints by recorded progress (most steps first), not by file time, which a
        copy resets; and (path, why) for the files that could not even be opened."""
        tried, ranked = [], []
        for path in runfolder.checkpoint_files(self.run_dir):
            try:
                peek = safe_load(path, mmap=True, allowed=LEGACY_ALLOWED)  # the small pickle; tensors stay on disk
                peek = as_full_state(peek, path)
                ranked.append((int(peek["step"]), path.name != runfolder.PREVIOUS, path))
            except (CheckpointError, KeyError, ValueError, TypeError) as e:
                tried.append((path, str(e)))
        return [r[2] for r in sorted(ranked, key=lambda r: r[:2], reverse=True)], tried

    def save_missed_epoch_checkpoint(self) -> None:
        """A state at the start of a due epoch whose checkpoint-E.pth is missing (killed before it): write it."""
        p = self.progress
        if p.batch_in_epoch == 0 and p.epoch > 0 and self._epoch_due(p.epoch):
            path = self.run_dir / runfolder.epoch_checkpoint_name(p.epoch)
            if not path.exists():
                if self.rank == 0:
                    state = self.state_dict()
                    save_file(state, path)
                    self._published(path, state)
                    self.log(f"saved {path} (due before the last stop)")

    # when
    def _epoch_due(self, epoch: int) -> bool:
        return epoch % self.save_freq == 0 or epoch == self.epochs

    def _agree(self, stop_requested: bool, interval_due: bool):
        """Every rank stops (or saves) at the same step: any rank's stop, rank 0's clock for saves."""
        if not dist.is_initialized():
            return stop_requested, interval_due
        flags = torch.tensor([float(stop_requested), float(interval_due and self.rank == 0)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(flags[0]), bool(flags[1])

    def diverged(self, *watched) -> Outcome | None:
        """The one divergence check: the watched tensors (the loss sums) and every weight and optimizer
        tensor must be finite, else the run ends as diverged, saving nothing over the good files."""
        if all_finite([*watched, *self.tensors()]):
            return None
        return Outcome(runfolder.EVENT_DIVERGED, EXIT_DIVERGED, self._diverged_message())

    def step_boundary(self, stop: str | None, epoch_ended: bool) -> Outcome | None:
        """Save whatever is due after an optimizer step. `stop` names this rank's stop request
        ("SIGTERM", "Ctrl-C (SIGINT)") or is None. Returns None to go on, or the Outcome that ends the run."""
        stopping, interval = self._agree(stop is not None, time.monotonic() - self.last_save >= self.interval_s)
        epoch_due = epoch_ended and self._epoch_due(self.progress.epoch)
        if not (stopping or interval or epoch_due):
            return None
        outcome = self.diverged()
        if outcome is not None:
            return outcome
        if epoch_due or stopping:
            path = self.run_dir / (runfolder.epoch_checkpoint_name(self.progress.epoch) if epoch_due
                                   else runfolder.LAST)
            error = self._save_now(path)
            if error is not None:
                return Outcome(runfolder.EVENT_SAVE_FAILED, EXIT_RESUMABLE, f"stopping: {error}; the previous "
                               f"checkpoint is intact; {resume_hint()} (exit {EXIT_RESUMABLE})")
            if epoch_due:
                self.log(f"saved {path}")
                self._drop_old_epochs()
            if stopping:
                p = self.progress
                return Outcome(runfolder.EVENT_STOPPED, EXIT_RESUMABLE, f"{stop or 'stop'} received: saved {path} "
                               f"at step {p.step} (epoch {p.epoch + 1}, batch {p.batch_in_epoch}); "
                               f"{resume_hint()} (exit {EXIT_RESUMABLE})")
        elif interval and self.rank == 0:
            self._interval_save()
        self.last_save = time.monotonic()
        return None

    # how
    def _save_now(self, path: Path):
        """A synchronous save on rank 0 that every rank waits for; the error line, if any, on every rank."""
        error = None
        if self.rank == 0:
            try:
                self.writer.wait()
            except SaveFailed as e:
                self._interval_failed(e)
            try:
                state = self.state_dict()
                save_file(state, path)
                self._published(path, state)
            except SaveFailed as e:
                error = str(e)
                events.record(self.run_dir, runfolder.EVENT_SAVE_FAILED, file=path.name, message=error)
        if dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.flag_group)
            error = box[0]
        return error

    def _drop_old_epochs(self) -> None:
        """--keep_epochs N: rank 0 deletes local epoch checkpoints older than the newest N, once the
        newest is complete (a bucket's copies stay)."""
        if self.rank != 0 or self.keep_epochs <= 0:
            return
        epochs = sorted(runfolder.saved_epochs(p.name for p in self.run_dir.iterdir()))
        for epoch in epochs[:-self.keep_epochs]:
            path = self.run_dir / runfolder.epoch_checkpoint_name(epoch)
            try:
                path.unlink()
            except OSError as e:
                self.log(f"warning: --keep_epochs could not delete {path}: {e}")

    def _interval_save(self) -> None:
        try:
            self.writer.wait()
        except SaveFailed as e:
            self._interval_failed(e)
        self.writer.submit(to_cpu(self.state_dict()), self.run_dir / runfolder.LAST, self._published)

    def _published(self, path: Path, state: dict) -> None:
        """Hand a completed file to the mirror; its failure is a failed save (the local file stays)."""
        if self.publish is None:
            return
        try:
            self.publish(path, int(state["step"]))
        except Exception as e:  # network and storage errors come in many types
            raise SaveFailed(f"{path.name} is saved in {path.parent} but could not be uploaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    def _interval_failed(self, e: SaveFailed) -> None:
        self.log(f"warning: interval save failed, training goes on and retries at the next interval: {e}")
        events.record(self.run_dir, runfolder.EVENT_SAVE_FAILED, file=runfolder.LAST, message=str(e))

    def finish(self) -> None:
        """Wait for the write in flight (its failure is a warning: the final epoch checkpoint is on disk)."""
        try:
            self.writer.wait()
        except SaveFailed as e:
            self._interval_failed(e)

    def _diverged_message(self) -> str:
        point = self._best_on_disk()
        where = f"{point} is the resume point" if point else "no checkpoint was saved yet"
        return (f"loss, weights or optimizer state became non-finite by step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}); nothing saved over the good files: {where}. Lower the "
                f"learning rate (e.g. --blr half of now) or switch precision (--bf16), keeping --output_dir "
                f"{self.run_dir}; those flags may change on resume")

    def _best_on_disk(self):
        """The file `--resume auto` would pick now (the write in flight finished first)."""
        with contextlib.suppress(SaveFailed):
            self.writer.wait()
        ranked, _ = self._ranked_checkpoints()
        return ranked[0] if ranked else None
