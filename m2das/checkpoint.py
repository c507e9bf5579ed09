"""The checkpointer: when, what and how a run is saved, and where it resumes from.

What: one dict of state, built from the same stateful objects for saving and
loading (model, optimizer, scaler, RNG, progress), holding only tensors and
plain types, so every file opens with a plain `torch.load(path)`
(weights_only) here, in the published M2D runtime and in EVAR.

When: an epoch checkpoint after every `save_freq` epochs and at the end, a
rolling `last.pth` every `ckpt_interval_min` minutes (written in a thread) and
on a stop signal. Every save that is due happens, also when a stop lands on
an epoch's last step.

How: atomically (temporary file, fsync, rename; the previous `last.pth`
hard-linked to `last.prev.pth` first), only when every weight and optimizer
tensor is finite, with disk-full and I/O errors turned into one line. On
load, the zip container's CRC32s detect bytes changed after writing; resume
picks the checkpoint with the most progress that loads, and refuses to
start over silently when a run folder shows progress but nothing loads.
"""

import argparse
import contextlib
import errno
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from m2das import runfolder
from m2das.fileio import append_jsonl, atomic_write, fsync_dir

FORMAT = "m2das-full-state-2"  # marks a full-state file; reference-format files lack it
PUBLISHED_ALLOWED = (argparse.Namespace,)  # what published M2D checkpoints pickle besides tensors
# Full-state files of m2das 0.1.0 pickled numpy's RNG state: a uint32 array, which these rebuild
# from bytes and a dtype (data only, no callable of the file's choosing).
_np_core = getattr(np, "_core", None) or np.core
LEGACY_ALLOWED = (_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))
LEGACY_KEYS = ("optimizer", "epoch", "batch_in_epoch", "step", "rng")


class CheckpointError(Exception):
    """A checkpoint that must not or cannot be used; the trainer exits 2 with this one line."""


class SaveFailed(Exception):
    """A save that did not complete; the previous checkpoint is intact."""


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


# -- files -----------------------------------------------------------------------------

def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _describe_failure(e: BaseException, path: Path, need: int) -> str:
    free = shutil.disk_usage(path.parent).free
    errors = [e] + [c for c in (e.__cause__, e.__context__) if c is not None]
    codes = {getattr(x, "errno", None) for x in errors}
    if codes & {errno.ENOSPC, errno.EDQUOT} or free < need:
        return (f"no space left in {path.parent} to write {path.name}: {free / 1e9:.2f} GB free, a checkpoint "
                f"needs about {need / 1e9:.2f} GB; free space (or raise the quota) and rerun")
    return f"could not write {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})"


def save_file(state: dict, path) -> None:
    """Atomically write `state` to `path`; before replacing last.pth, keep it as last.prev.pth.

    At every instant a complete checkpoint exists under a known name. Raises
    SaveFailed with one line (disk full named as such) and leaves the old files.
    """
    path = Path(path)
    if path.name == runfolder.LAST and path.exists():
        prev, link = path.with_name(runfolder.PREVIOUS), path.with_name(f".{runfolder.PREVIOUS}.link")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        try:
            os.link(path, link)
            os.replace(link, prev)
            fsync_dir(path.parent)
        except OSError:  # file systems without hard links: last.pth itself is still replaced atomically
            pass
    need = _tensor_bytes(state)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except Exception as e:  # torch's zip writer hides ENOSPC behind RuntimeError("unexpected pos ...")
        raise SaveFailed(_describe_failure(e, path, need)) from e


def verify_integrity(path) -> None:
    """Check every record of the zip container against its stored CRC32 (torch writes them)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged or not a torch zip checkpoint ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{path}: damaged (CRC32 mismatch in {bad}: bytes changed after it was written)")


def safe_load(path, mmap: bool = False, allowed=(), require_model: bool = True) -> dict:
    """torch.load that runs no code: only tensors, plain types and the `allowed` classes."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise CheckpointError(f"{path}: refused, loading it would run code (it needs {unsafe.group(1)}); "
                                  f"m2das loads only tensors and plain types") from None
        detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {detail})") from None
    if require_model and (not isinstance(state, dict) or "model" not in state):
        raise CheckpointError(f"{path}: not an M2D / m2das checkpoint (no 'model' entry)")
    return state


def load_file(path, mmap: bool = False) -> dict:
    """A full-state m2das checkpoint, integrity-checked; anything else is a CheckpointError."""
    verify_integrity(path)
    # Published classes allowed so a published file gets the right advice below.
    return as_full_state(safe_load(path, mmap=mmap, allowed=PUBLISHED_ALLOWED + LEGACY_ALLOWED), path)


def as_full_state(state: dict, path) -> dict:
    """The state if it is a full-state m2das checkpoint (an m2das 0.1.0 one converted), else CheckpointError."""
    if state.get("format") == FORMAT:
        return state
    if all(k in state for k in LEGACY_KEYS) and isinstance(state["rng"].get("numpy"), tuple):
        _, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        state["rng"] = {"torch": state["rng"]["torch"], "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
                        **({"cuda": state["rng"]["cuda"]} if "cuda" in state["rng"] else {})}
        return {**state, "format": FORMAT}
    raise CheckpointError(f"{path}: not a full-state m2das checkpoint (no optimizer position); "
                          f"to continue pre-training from published weights use --init_from {path}")


def load_weight_file(path) -> dict:
    """Any M2D / M2D-AS / m2das checkpoint or encoder-only file, integrity-checked, running no code.

    Published checkpoints pickle an argparse.Namespace; that one class is allowed, nothing else.
    """
    if zipfile.is_zipfile(path):
        verify_integrity(path)
    return safe_load(path, allowed=PUBLISHED_ALLOWED, require_model=False)


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
                 interval_s: float, log, flag_group=None, publish=None):
        self.run_dir = Path(run_dir)
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

    def _tensors(self):
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
        need = _tensor_bytes(self.state_dict())
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
                tried.append(f"{path.name}: {e}")
                self.log(f"warning: skipping {path}: {e}")
                continue
            return str(path)
        if shows_progress or tried:
            detail = "; ".join(tried) if tried else "no checkpoint file"
            raise CheckpointError(f"{self.run_dir} shows progress but no checkpoint loads ({detail}); nothing was "
                                  f"changed. Restore a checkpoint, or start over on purpose with --resume none")
        return None

    def _ranked_checkpoints(self):
        """Full-state checkpoints by recorded progress (most steps first), not by file time, which a
        copy resets; and "name: why" for the files that could not even be opened."""
        tried, ranked = [], []
        for path in runfolder.checkpoint_files(self.run_dir):
            try:
                peek = safe_load(path, mmap=True, allowed=LEGACY_ALLOWED)  # the small pickle; tensors stay on disk
                peek = as_full_state(peek, path)
                ranked.append((int(peek["step"]), path.name != runfolder.PREVIOUS, path))
            except (CheckpointError, KeyError, ValueError, TypeError) as e:
                tried.append(f"{path.name}: {e}")
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

    def step_boundary(self, stop_requested: bool, epoch_ended: bool):
        """Save whatever is due after an optimizer step. Returns None to go on, or
        ("stopped" | "save_failed" | "diverged", message) to end the run."""
        stop, interval = self._agree(stop_requested, time.monotonic() - self.last_save >= self.interval_s)
        epoch_due = epoch_ended and self._epoch_due(self.progress.epoch)
        if not (stop or interval or epoch_due):
            return None
        if not all_finite(self._tensors()):
            return "diverged", self._diverged_message()
        if epoch_due or stop:
            path = self.run_dir / (runfolder.epoch_checkpoint_name(self.progress.epoch) if epoch_due
                                   else runfolder.LAST)
            error = self._save_now(path)
            if error is not None:
                return "save_failed", error
            if epoch_due:
                self.log(f"saved {path}")
            if stop:
                return "stopped", str(path)
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
                append_jsonl(self.run_dir / runfolder.RESTARTS, {"time": time.time(),
                             "event": runfolder.EVENT_SAVE_FAILED, "file": path.name, "message": error})
        if dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.flag_group)
            error = box[0]
        return error

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
        append_jsonl(self.run_dir / runfolder.RESTARTS, {"time": time.time(), "event": runfolder.EVENT_SAVE_FAILED,
                                                         "file": runfolder.LAST, "message": str(e)})

    def finish(self) -> None:
        """Wait for the write in flight (its failure is a warning: the final epoch checkpoint is on disk)."""
        try:
            self.writer.wait()
        except SaveFailed as e:
            self._interval_failed(e)

    def _diverged_message(self) -> str:
        point = self._best_on_disk()
        where = f"{point} is the resume point" if point else "no checkpoint was saved yet"
        return (f"weights or optimizer state became non-finite by step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}); nothing saved over the good files: {where}. Lower the "
                f"learning rate (e.g. --blr half of now) or switch precision (--bf16), keeping --output_dir "
                f"{self.run_dir}; those flags may change on resume")

    def _best_on_disk(self):
        """The file `--resume auto` would pick now (the write in flight finished first)."""
        with contextlib.suppress(SaveFailed):
            self.writer.wait()
        ranked, _ = self._ranked_checkpoints()
        return ranked[0] if ranked else None
