import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from m2das import checkpoint

WRITER = """
import sys, torch
from m2das import checkpoint
# ~400 MB: long enough to be caught mid-write.
checkpoint.save({"model": {"w": torch.full((100_000_000,), 2.0)}, "step": 2}, sys.argv[1])
print("done", flush=True)
"""


def test_kill_during_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    last = tmp_path / checkpoint.LAST
    checkpoint.save({"model": {"w": torch.ones(3)}, "step": 1}, last)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the new file is partly on disk
        partial = [p for p in tmp_path.glob(".last.pth.*.tmp") if p.stat().st_size > 1_000_000]
        if partial or proc.poll() is not None:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "writer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert path.name in (checkpoint.LAST, checkpoint.PREVIOUS)


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    last = tmp_path / checkpoint.LAST
    checkpoint.save({"model": {}, "step": 1}, last)
    checkpoint.save({"model": {}, "step": 2}, last)
    assert torch.load(tmp_path / checkpoint.PREVIOUS, weights_only=False)["step"] == 1
    last.write_bytes(last.read_bytes()[:50])  # torn by a crashed disk or copy
    with pytest.warns(UserWarning, match="skipping checkpoint .*last.pth"):
        state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == checkpoint.PREVIOUS


def test_newest_file_wins_across_rolling_and_epoch_checkpoints(tmp_path):
    checkpoint.save({"model": {}, "step": 5}, tmp_path / checkpoint.LAST)
    time.sleep(0.01)
    checkpoint.save({"model": {}, "step": 9}, tmp_path / checkpoint.epoch_checkpoint_name(3))
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 9 and path.name == "checkpoint-3.pth"


def test_background_writer_snapshot_is_independent_of_later_updates(tmp_path):
    w = torch.zeros(4)
    writer = checkpoint.BackgroundWriter()
    writer.submit(checkpoint.to_cpu({"model": {"w": w}}), tmp_path / "snap.pth")
    w += 1  # training goes on while the file is written
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "snap.pth")["model"]["w"], torch.zeros(4))
