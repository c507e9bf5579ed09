"""Shared fixtures: a tiny LMS data folder and a way to run the real CLI in a subprocess."""

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Two test workers share two cores: each trainer, worker and in-process torch takes one thread instead
# of both (two-thread ranks on a busy machine spend most of their time waiting for each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def pytest_collection_modifyitems(config, items):
    """`make test` runs two workers (pytest -n 2 --dist loadgroup): the tests on the real SLURM share
    one worker, so one cluster serves them all as in a serial run."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture
def lms_data(tmp_path):
    return write_lms_folder(tmp_path / "data")


def m2das_cmd(*args):
    return [sys.executable, "-m", "m2das", *map(str, args)]


def run_m2das(*args, env=None, timeout=300, **kwargs):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(m2das_cmd(*args), capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=kwargs.pop("cwd", REPO), **kwargs)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible HTTP server (moto's) on 127.0.0.1, stopped by pid; yields the environment
    a client needs (credentials and endpoint come from the environment, as on a cloud cluster).
    The same server and environment `m2das bench data-remote` measures against."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        pytest.skip("moto[server] and s3fs are not installed (pip install -e '.[test]')")
    from m2das.machine import free_port
    from m2das.tools.bench_remote import s3_environment, serving

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with serving([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log) as endpoint, \
            s3_environment(endpoint):
        yield {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                          "AWS_ENDPOINT_URL")}


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder` (a real file system that fills up; mounting needs root),
    unmounted afterwards; the test skips, saying why, where it cannot be mounted."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
