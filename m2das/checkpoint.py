"""The checkpointer: when and what a run saves, and where it resumes from.

What: one dict of state, built from the same stateful objects for saving and
loading (model, optimizer, scaler, RNG, progress), holding only tensors and
plain types, so every file opens with a plain `torch.load(path)`
(weights_only) here, in the published M2D runtime and in EVAR.

When: an epoch checkpoint after every `save_freq` epochs and at the end, a
rolling `last.pth` every `ckpt_interval_min` minutes and on a stop signal.
Only the last save before exit (a stop's, the final epoch's) is written on
the training step; the others are a snapshot there and written, fsynced and
renamed by a thread, since the file's guarantees do not need the step to
wait. Every save that is due happens, also when a stop lands on
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
                            safe_load, save_file, tensor_bytes, verify_integrity)
from m2das.runfolder import EXIT_DIVERGED, EXIT_RESUMABLE

__all__ = ["FORMAT", "CheckpointError", "SaveFailed", "Progress", "RNGState", "Outcome", "Checkpointer",
           "BackgroundWriter", "all_finite", "to_cpu", "load_file", "save_file"]


def resume_hint() -> str:
    """Who resumes a stopped run: under SLURM the job requeues itself and under the local launcher
    the supervisor restarts it, so "rerun the same command" would send the user to do it twice."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"SLURM job {job} requeues itself and resumes here (a job started by hand: rerun the same command)"
    if os.environ.get(runfolder.LAUNCHER_ATTEMPT_ENV):
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
    """NaN and inf anywhere, with one reduction per tensor and one host sync per device.

    On a GPU one fused launch takes max |x| of every tensor. On a CPU a sum is the cheapest reduction
    (max |x| there is several times slower): NaN and inf propagate through it, so a finite sum proves
    its tensor finite, and only a tensor whose sum overflowed on finite values is checked element-wise.
    """
    by_device = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(t.detach())
    for device, ts in by_device.items():
        if device.type == "cuda":
            reduced = torch._foreach_norm(ts, ord=float("inf"))
        else:
            reduced = [t.sum() for t in ts]
        bad = ~torch.isfinite(torch.stack([r.float() for r in reduced]))
        if bool(bad.any()) and not all(bool(torch.isfinite(ts[i]).all()) for i in bad.nonzero()[:, 0].tolist()):
            return False
    return True


def _finite_state(state: dict) -> bool:
    """all_finite over every tensor of a (snapshot) state."""
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)
    return all_finite(tensors(state))


def to_cpu(obj):
    """Deep copy of a state with every tensor on the CPU, safe to write while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class Snapshot:
    """to_cpu into buffers kept from the previous save, pinned for a GPU's tensors.

    A fresh copy of a ViT-B state allocates 1.7 GB at every save (page faults on the CPU, a slow pinned
    registration for a GPU); a reused buffer costs the copy alone. GPU copies are issued without
    waiting and synchronized once. The caller must not take a snapshot while the previous one is
    still being written.
    """

    def __init__(self):
        self._buffers = {}

    def take(self, state):
        copied_from_gpu = []
        out = self._copy(state, (), copied_from_gpu)
        for device in set(copied_from_gpu):
            torch.cuda.synchronize(device)
        return out

    def _copy(self, obj, key, copied_from_gpu):
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self._buffers[key] = buf
            buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
            if obj.is_cuda:
                copied_from_gpu.append(obj.device)
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, key + (k,), copied_from_gpu) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, key + (i,), copied_from_gpu) for i, v in enumerate(obj))
        return obj


class BackgroundWriter:
    """Writes one snapshot at a time in a thread, keeping disk I/O and fsync off the training step."""

    def __init__(self):
        self._thread = None
        self.error = None
        self.failed_path = None  # the file whose write raised `error`
        self.refused_path = None  # the file not written because `check` refused its state

    def submit(self, state: dict, path, then=None, check=None) -> None:
        """Write `state` to `path` unless `check(state)` is false, then call `then(path, state)` (an
        upload), all off the training thread."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state, path, then, check), daemon=True)
        self._thread.start()

    def _write(self, state, path, then, check):
        try:
            if check is not None and not check(state):
                self.refused_path = Path(path)
                return
            save_file(state, path)
            if then is not None:
                then(Path(path), state)
        except SaveFailed as e:  # reported on the next wait()
            self.error, self.failed_path = e, Path(path)
        except Exception as e:  # anything else (out of memory in the check) is a failed save too, not a silent one
            self.error, self.failed_path = SaveFailed(f"could not write {path} ({type(e).__name__}: {e})"), Path(path)

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight is done; raise its SaveFailed, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


_GOOD, _FAILED, _NON_FINITE = 0, 1, 2  # rank 0's verdict on its background writes, worst last (all-reduce MAX)


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
        self.writer, self.snapshot = BackgroundWriter(), Snapshot()
        self.save_failure = None  # rank 0: why a save failed (an epoch checkpoint in the background, or this one)
        self.diverged_at = None  # rank 0: the step of a snapshot the writer found non-finite (and did not write)
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
            self.load_state_dict(self._load_file(mode))
            return str(mode)
        ranked, tried = self._ranked_checkpoints()
        for path in ranked:
            try:
                self.load_state_dict(self._load_file(path))
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

    def _load_file(self, path) -> dict:
        """load_file with its CRC32 pass (a full read) on rank 0 only and the verdict broadcast: every
        rank reads the same file, so one check answers for all."""
        error = None
        if self.rank == 0:
            try:
                verify_integrity(path)
            except CheckpointError as e:
                error = str(e)
        error = self._from_rank0(error)
        if error is not None:
            raise CheckpointError(error)
        return load_file(path, verify=False)

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

    def _agree(self, stop_requested: bool, interval_due: bool, background: int = _GOOD):
        """Every rank stops (or saves) at the same step: any rank's stop, rank 0's clock for saves and
        rank 0's verdict on its last background write; one all-reduce."""
        if not dist.is_initialized():
            return stop_requested, interval_due, background
        flags = torch.tensor([float(stop_requested), float(interval_due and self.rank == 0),
                              float(background if self.rank == 0 else _GOOD)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(flags[0]), bool(flags[1]), int(flags[2])

    def diverged(self, *watched) -> Outcome | None:
        """The one divergence check: the watched tensors (the loss sums) and every weight and optimizer
        tensor must be finite, else the run ends as diverged, saving nothing over the good files."""
        if all_finite([*watched, *self.tensors()]):
            return None
        return Outcome(runfolder.EVENT_DIVERGED, EXIT_DIVERGED, self._diverged_message())

    def step_boundary(self, stop: str | None, epoch_ended: bool) -> Outcome | None:
        """Save whatever is due after an optimizer step. `stop` names this rank's stop request
        ("SIGTERM", "Ctrl-C (SIGINT)") or is None. Returns None to go on, or the Outcome that ends the run.

        The last save before exit (a stop's, the final epoch's) is checked and written here. Any other
        is only a snapshot here: the writer thread checks it is finite, then writes it; a snapshot found
        non-finite there (never written) or an epoch checkpoint that failed there ends the run at the
        next step boundary."""
        stopping, interval, background = self._agree(stop is not None,
                                                     time.monotonic() - self.last_save >= self.interval_s,
                                                     self._background_verdict())
        if background != _GOOD:
            return self._background_outcome(background)
        epoch_due = epoch_ended and self._epoch_due(self.progress.epoch)
        if not (stopping or interval or epoch_due):
            return None
        epoch_path = self.run_dir / runfolder.epoch_checkpoint_name(self.progress.epoch)
        if stopping or (epoch_due and self.progress.epoch >= self.epochs):
            path = epoch_path if epoch_due else self.run_dir / runfolder.LAST
            outcome = self.diverged() or self._save_now(path)
            if outcome is not None:
                return outcome
            if epoch_due:
                self.log(f"saved {path}")
                self._drop_old_epochs()
            if stopping:
                p = self.progress
                return Outcome(runfolder.EVENT_STOPPED, EXIT_RESUMABLE, f"{stop or 'stop'} received: saved {path} "
                               f"at step {p.step} (epoch {p.epoch + 1}, batch {p.batch_in_epoch}); "
                               f"{resume_hint()} (exit {EXIT_RESUMABLE})")
        elif (epoch_due or interval) and self.rank == 0:
            self._save_in_background(epoch_path if epoch_due else self.run_dir / runfolder.LAST,
                                     self._epoch_written if epoch_due else self._published)
        self.last_save = time.monotonic()
        return None

    def _background_outcome(self, verdict: int) -> Outcome:
        """The end of the run that rank 0's background writer decided, on every rank."""
        if verdict == _NON_FINITE:
            return Outcome(runfolder.EVENT_DIVERGED, EXIT_DIVERGED, self._diverged_message())
        return self._save_failed(self._from_rank0(self.save_failure))

    @staticmethod
    def _save_failed(error: str) -> Outcome:
        return Outcome(runfolder.EVENT_SAVE_FAILED, EXIT_RESUMABLE, f"stopping: {error}; the previous checkpoint "
                       f"is intact; {resume_hint()} (exit {EXIT_RESUMABLE})")

    # how
    def _from_rank0(self, value):
        """Rank 0's value on every rank."""
        if dist.is_initialized():
            box = [value]
            dist.broadcast_object_list(box, src=0, group=self.flag_group)
            value = box[0]
        return value

    def _save_now(self, path: Path) -> Outcome | None:
        """A synchronous save on rank 0 that every rank waits for. Returns None, or on every rank the
        Outcome that ends the run instead: this save's failure, or rank 0's verdict on its last
        background write (an epoch checkpoint that failed there is this save's failure: nothing newer
        is saved, so the resumed run passes that epoch's end again and writes it)."""
        verdict = _GOOD
        if self.rank == 0:
            self._collect_background()
            verdict = self._background_verdict()
            if verdict == _GOOD:
                try:
                    state = self.state_dict()
                    save_file(state, path)
                    self._published(path, state)
                except SaveFailed as e:
                    self.save_failure, verdict = str(e), _FAILED
                    events.record(self.run_dir, runfolder.EVENT_SAVE_FAILED, file=path.name, message=str(e))
        verdict = self._from_rank0(verdict)
        return None if verdict == _GOOD else self._background_outcome(verdict)

    def _save_in_background(self, path: Path, then) -> None:
        """Snapshot now (the only part on the training step), write, fsync and rename in the writer."""
        self._collect_background()
        if self._background_verdict() != _GOOD:
            return  # the next step boundary ends the run instead
        self.writer.submit(self.snapshot.take(self.state_dict()), path, then, check=_finite_state)

    def _epoch_written(self, path: Path, state: dict) -> None:
        """After an epoch checkpoint is complete on disk (in the writer's thread)."""
        self._published(path, state)
        self.log(f"saved {path}")
        self._drop_old_epochs()

    def _background_verdict(self) -> int:
        """Rank 0, without waiting for a write in flight: _GOOD, _FAILED (an epoch checkpoint could not be
        written) or _NON_FINITE (a snapshot was found non-finite and not written)."""
        if self.rank == 0 and not self.writer.busy():
            self._collect_background()
        return _NON_FINITE if self.diverged_at is not None else _FAILED if self.save_failure is not None else _GOOD

    def _collect_background(self):
        """Wait for the write in flight. A failed interval save is a warning (training goes on, the next
        interval retries); a failed epoch checkpoint is kept in `save_failure`."""
        try:
            self.writer.wait()
        except SaveFailed as e:
            name = self.writer.failed_path.name
            self.writer.failed_path = None
            events.record(self.run_dir, runfolder.EVENT_SAVE_FAILED, file=name, message=str(e))
            if name == runfolder.LAST:
                self.log(f"warning: interval save failed, training goes on and retries at the next interval: {e}")
            else:
                self.save_failure = str(e)
        if self.writer.refused_path is not None and self.diverged_at is None:
            self.diverged_at, self.writer.refused_path = self.progress.step, None

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

    def _published(self, path: Path, state: dict) -> None:
        """Hand a completed file to the mirror; its failure is a failed save (the local file stays)."""
        if self.publish is None:
            return
        try:
            self.publish(path, int(state["step"]))
        except Exception as e:  # network and storage errors come in many types
            raise SaveFailed(f"{path.name} is saved in {path.parent} but could not be uploaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    def finish(self) -> None:
        """Wait for the write in flight (the final epoch checkpoint, written last, waited for it)."""
        self._collect_background()

    def _diverged_message(self) -> str:
        point = self._best_on_disk()
        where = f"{point} is the resume point" if point else "no checkpoint was saved yet"
        return (f"loss, weights or optimizer state became non-finite by step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}); nothing saved over the good files: {where}. Lower the "
                f"learning rate (e.g. --blr half of now) or switch precision (--bf16), keeping --output_dir "
                f"{self.run_dir}; those flags may change on resume")

    def _best_on_disk(self):
        """The file `--resume auto` would pick now (the write in flight finished first)."""
        self._collect_background()
        ranked, _ = self._ranked_checkpoints()
        return ranked[0] if ranked else None
