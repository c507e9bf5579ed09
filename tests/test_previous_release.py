"""A data folder and a stopped run folder written by the last flat-package release (commit 3a7dc38)
resume and train with today's code, and end bit-identical to a run started today.

The fixture is made by tests/fixtures/make_previous_release.sh at that commit: prepare of six
synthetic clips, then the tiny model for 3 epochs stopped by a real SIGTERM after step 2.
"""

import shutil
from pathlib import Path

import torch

from conftest import run_m2das
from m2das.fileio import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "release-3a7dc38"
FLAGS = ["--model", "m2d_as_vit_tiny", "--input_size", "80x208", "--warmup_epochs", "1", "--num_workers", "0",
         "--log_every", "1", "--epochs", "3", "--batch_size", "2", "--seed", "0", "--save_freq", "1",
         "--device", "cpu"]


# The fixture's first steps ran with the two threads a single rank takes on a 2-core machine.
SAME_THREADS = {"OMP_NUM_THREADS": "2"}


def test_previous_release_run_folder_resumes_and_matches_a_run_started_today(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "old")
    data, run = tmp_path / "old" / "data", tmp_path / "old" / "run"
    resumed = run_m2das("train", "--data_path", data, "--output_dir", run, *FLAGS, env=SAME_THREADS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout, resumed.stdout[-2000:]
    starts = [r for r in read_jsonl(run / "restarts.jsonl") if r["event"] == "start"]
    assert [r["resumed_step"] for r in starts] == [0, 2]

    fresh = run_m2das("train", "--data_path", data, "--output_dir", tmp_path / "today", *FLAGS, env=SAME_THREADS)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    old = torch.load(run / "checkpoint-3.pth", map_location="cpu", weights_only=True)["model"]
    new = torch.load(tmp_path / "today" / "checkpoint-3.pth", map_location="cpu", weights_only=True)["model"]
    assert old.keys() == new.keys()
    different = [k for k in old if not torch.equal(old[k], new[k])]
    assert not different, f"{len(different)} tensors differ after resuming the old run, e.g. {different[:3]}"
