"""Saving and finding checkpoints so that a kill at any instant loses at most the current step.

RUN/last.pth        rolling full state (interval saves and signal stops)
RUN/last.prev.pth   the one before it, kept until a new last.pth is complete
RUN/checkpoint-E.pth reference-format checkpoint after epoch E (plus the full state)
"""

import contextlib
import os
import re
import threading
import warnings
from pathlib import Path

import torch

from m2das.fileio import atomic_write, fsync_dir

LAST = "last.pth"
PREVIOUS = "last.prev.pth"
EPOCH_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth"


def save(state: dict, path) -> None:
    """Atomically write `state` to `path`; for last.pth keep the old one as last.prev.pth.

    The previous file is hard-linked aside before the new one is written, so at
    every instant at least one complete checkpoint exists under a known name.
    """
    path = Path(path)
    if path.name == LAST and path.exists():
        prev = path.with_name(PREVIOUS)
        tmp = path.with_name(f".{PREVIOUS}.link")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(path, tmp)
            os.replace(tmp, prev)
            fsync_dir(path.parent)
        except OSError:  # file systems without hard links: keep going, last.pth is still atomic
            pass
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def candidates(run_dir) -> list:
    """Checkpoints in a run folder, newest first (by modification time)."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / LAST, run_dir / PREVIOUS) if p.exists()]
    found += [p for p in run_dir.glob("checkpoint-*.pth") if EPOCH_RE.search(p.name)]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def load(path, map_location="cpu") -> dict:
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError("not an m2das/M2D checkpoint (no 'model' entry)")
    return state


def load_latest(run_dir, map_location="cpu"):
    """(state, path) of the newest checkpoint that loads cleanly, or (None, None).

    A damaged file is skipped with a warning naming it, and the next one tried.
    """
    for path in candidates(run_dir):
        try:
            return load(path, map_location), path
        except Exception as e:  # a torn or corrupt file can raise almost anything
            warnings.warn(f"skipping checkpoint {path}: cannot be loaded ({type(e).__name__}: {e})",
                          stacklevel=2)
    return None, None


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

    def submit(self, state: dict, path) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state, path), daemon=True)
        self._thread.start()

    def _write(self, state, path):
        try:
            save(state, path)
        except Exception as e:  # reported on the next wait()
            self.error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"background checkpoint write failed: {error}") from error
