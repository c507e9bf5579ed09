"""Normalisation statistics: computed once with a fixed seed, then stored, never re-drawn.

The reference re-draws 5,000 random crops at every start, so a resumed run
normalises differently. Here the same (files, seed) always gives the same
numbers, and `norm_stats.json` (in the data folder or the run folder) pins them.
"""

import json
from pathlib import Path

import numpy as np

from m2das.fileio import write_json

DEFAULT_STATS_FILES = 5000
DEFAULT_STATS_SEED = 0


class NonFiniteLMS(ValueError):
    """An LMS crop holding NaN or inf: the file is broken, the message names it."""


def finite_crop(x: np.ndarray, path) -> np.ndarray:
    """`x` if every value is finite, else NonFiniteLMS naming `path`.

    One isfinite over the crop (608 x 80 values), not over the file: cheap enough
    for every sample the trainer or the stats step reads.
    """
    if not np.isfinite(x).all():
        raise NonFiniteLMS(f"{path}: NaN or inf values in the LMS; delete it and rerun "
                           f"`m2das prepare` to convert it again, or take it out of the list")
    return x


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
    paths = list(paths)
    if not paths:
        raise ValueError("cannot compute normalisation statistics from an empty file list")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(paths), size=num_files)
    total = total_sq = count = 0.0
    for n, i in enumerate(picks):
        lms = np.load(paths[i], mmap_mode="r")
        x = finite_crop(crop_or_pad(lms, frames, crop_start(lms.shape[-1], frames, rng)),
                        paths[i]).astype(np.float64)
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
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ValueError(f"{path}: mean {mean} / std {std} unusable; delete it to recompute")
    return stats
