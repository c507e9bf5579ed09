"""Shared fixtures: a tiny LMS data folder and a way to run the real CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tiny model and input so a training run takes seconds on 2 CPU cores.
TINY_TRAIN = ["--model", "m2d_as_vit_tiny", "--input_size", "80x208", "--warmup_epochs", "1",
              "--num_workers", "0", "--stats_files", "50", "--log_every", "1"]


def write_lms_folder(root: Path, n_files: int = 48, seed: int = 0, classes=("/m/a", "/m/b", "/m/c", "/m/d")):
    """DATA/audioset_lms/*.npy ([1, 80, T], T around 150-260) and DATA/files_as_weighted.csv."""
    rng = np.random.default_rng(seed)
    (root / "audioset_lms").mkdir(parents=True, exist_ok=True)
    rows = ["file_name,label,weight"]
    for i in range(n_files):
        t = int(rng.integers(150, 260))
        lms = (rng.standard_normal((1, 80, t)) * 4 - 7).astype(np.float32)
        np.save(root / "audioset_lms" / f"clip{i:03d}.npy", lms)
        labels = sorted(set(rng.choice(list(classes), size=int(rng.integers(1, 3)))))
        rows.append(f'audioset_lms/clip{i:03d}.npy,"{",".join(labels)}",{rng.uniform(0.5, 2):.4f}')
    (root / "files_as_weighted.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def lms_data(tmp_path):
    return write_lms_folder(tmp_path / "data")


def m2das_cmd(*args):
    return [sys.executable, "-m", "m2das", *map(str, args)]


def run_m2das(*args, env=None, timeout=300, **kwargs):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(m2das_cmd(*args), capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=kwargs.pop("cwd", REPO), **kwargs)
