"""Inputs the data benchmarks share: synthetic AudioSet-shaped clips, and a cold page cache for chosen files."""

import os
from pathlib import Path

from m2das.datafolder import LMS_DIR, NORM_STATS, WEIGHTED_LIST


def drop_from_cache(paths) -> None:
    """Evict these files from the page cache (sync, then POSIX_FADV_DONTNEED per file): no root needed,
    and other processes' cached files stay cached."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def synthetic_data(folder: Path, n_files: int, frames: int) -> Path:
    """n_files LMS files [1, 80, frames] (AudioSet's 10-s clips), their list and norm stats."""
    import numpy as np

    from m2das.fileio import write_json

    rng = np.random.default_rng(0)
    (folder / LMS_DIR).mkdir(parents=True)
    rows = ["file_name,label,weight"]
    for i in range(n_files):
        np.save(folder / LMS_DIR / f"clip{i:05d}.npy",
                (rng.standard_normal((1, 80, frames)) * 4 - 7).astype(np.float32))
        rows.append(f"{LMS_DIR}/clip{i:05d}.npy,/m/{i % 7},1.0")
    (folder / WEIGHTED_LIST).write_text("\n".join(rows) + "\n")
    write_json(folder / NORM_STATS, {"mean": -7.0, "std": 4.0})
    return folder
