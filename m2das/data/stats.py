"""Normalisation statistics: computed once with a fixed seed, then stored, never re-drawn.

The reference re-draws 5,000 random crops at every start, so a resumed run
normalises differently. Here the same (files, seed) always gives the same
numbers, and `norm_stats.json` (in the data folder or the run folder) pins them.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m2das.fileio import write_json

DEFAULT_STATS_FILES = 5000
DEFAULT_STATS_SEED = 0


LMS_BOUND = 100.0
"""Largest |value| a log-mel may hold; beyond it a file is bad data, not a training problem.

A value is ln(mel power + eps): ln(float32 eps) = -15.9 is the floor, and a full-scale
waveform's mel power stays below e**10, so the paper's LMS lie within about [-16, 10].
100 leaves room for any gain while refusing files of 1e30 (a broken conversion or a
foreign array), which would otherwise pin absurd norm stats or diverge with the blame on
the learning rate.
"""


class NonFiniteLMS(ValueError):
    """An LMS crop holding NaN, inf or values beyond LMS_BOUND: the file is broken, the message names it."""


def finite_crop(x: np.ndarray, path) -> np.ndarray:
    """`x` if every value is finite and within +-LMS_BOUND, else NonFiniteLMS naming `path`.

    One min and one max over the crop (608 x 80 values, in cache), not over the
    file; NaN propagates through both, so this one check replaces an isfinite and
    costs about the same, for every sample the trainer or the stats step reads.
    """
    lo, hi = float(x.min()), float(x.max())
    if -LMS_BOUND <= lo and hi <= LMS_BOUND:
        return x
    if not (np.isfinite(lo) and np.isfinite(hi)):
        what = "NaN or inf values in the LMS"
    else:
        what = f"value {hi if hi > LMS_BOUND else lo:.3g} in the LMS, outside the log-mel range +-{LMS_BOUND:g}"
    raise NonFiniteLMS(f"{path}: {what}; delete it and rerun `m2das prepare` to convert it again, or take it "
                       f"out of the list")


def crop_or_pad(lms: np.ndarray, frames: int, start: int) -> np.ndarray:
    """[1, F, T] -> [1, F, frames]: a window from `start`, zero-padded on the right if T < frames."""
    t = lms.shape[-1]
    if t >= frames:
        return lms[..., start : start + frames]
    out = np.zeros(lms.shape[:-1] + (frames,), dtype=lms.dtype)
    out[..., :t] = lms
    return out


def crop_start(num_frames: int, frames: int, rng: np.random.Generator) -> int:
    """Uniform start over the valid range (0 when the clip is shorter than the crop)."""
    return int(rng.integers(0, num_frames - frames + 1)) if num_frames > frames else 0


def compute_norm_stats(paths, num_files: int = DEFAULT_STATS_FILES, frames: int = 608,
                       seed: int = DEFAULT_STATS_SEED, progress=None) -> dict:
    """Mean and std of one random crop from each of `num_files` files drawn with replacement.

    Same rule as the reference (draws with replacement, one crop each) but a
    fixed seed, and accumulated in float64 so the result does not depend on
    how many files are summed.
    """
    paths = paths if isinstance(paths, Sequence) else list(paths)  # a lazy sequence stays lazy
    if not paths:
        raise ValueError("cannot compute normalisation statistics from an empty file list")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(paths), size=num_files)
    total = total_sq = count = 0.0
    for n, i in enumerate(picks):
        path = paths[i]
        lms = np.load(path, mmap_mode="r")
        x = finite_crop(crop_or_pad(lms, frames, crop_start(lms.shape[-1], frames, rng)), path).astype(np.float64)
        total += x.sum()
        total_sq += np.square(x).sum()
        count += x.size
        if progress is not None:
            progress(n + 1, num_files)
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return {"mean": float(mean), "std": std, "num_files": int(num_files), "frames": int(frames),
            "seed": int(seed), "list_size": len(paths)}


def write_norm_stats(path, stats: dict) -> None:
    write_json(path, stats)


def read_norm_stats(path) -> dict:
    """Read and check a norm_stats.json; raise ValueError naming the file when it is unusable."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid norm stats file ({e}); delete it to recompute") from e
    problem = norm_stats_problem(mean, std)
    if problem:
        raise ValueError(f"{path}: {problem}; delete it to recompute")
    return stats


def norm_stats_problem(mean: float, std: float) -> str | None:
    """Why (mean, std) cannot normalise log-mels, or None: both must lie within what LMS_BOUND allows."""
    if not (np.isfinite(mean) and np.isfinite(std) and 0 < std <= LMS_BOUND and abs(mean) <= LMS_BOUND):
        return f"mean {mean} / std {std} unusable (log-mels lie within +-{LMS_BOUND:g})"
    return None
