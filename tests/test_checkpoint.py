"""The checkpointer's file guarantees, in-process with real files: atomicity, integrity, no code on load,
finiteness, progress-ordered resume, disk full, file modes."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2das import checkpoint, ckptfile, runfolder
from m2das.runfolder import EXIT_DIVERGED, EXIT_RESUMABLE
from m2das.checkpoint import Checkpointer, Outcome, Progress, RNGState
from m2das.ckptfile import CheckpointError, SaveFailed
from m2das.fileio import read_jsonl

WRITER = """
import sys, torch
from m2das import ckptfile
# ~400 MB: long enough to be caught mid-write.
ckptfile.save_file({"model": {"w": torch.full((100_000_000,), 2.0)}, "step": 2}, sys.argv[1])
print("done", flush=True)
"""


class Marker:
    """An object whose unpickling would create a file: what a hijacked checkpoint does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def make_checkpointer(run_dir, value=0.0, step=0):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters())
    progress = Progress()
    progress.step = step
    return Checkpointer(run_dir, {"model": model, "optimizer": optimizer, "rng": RNGState(torch.device("cpu")),
                                  "progress": progress}, {"args": {"model": "x"}},
                        rank=0, epochs=2, save_freq=1, interval_s=1e9, log=lambda m: None)


def flip_byte_in_tensor_data(path: Path) -> None:
    """One byte of a tensor's stored data (not the pickle or the zip directory)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_full_state_opens_with_a_plain_torch_load_and_round_trips(tmp_path):
    a = make_checkpointer(tmp_path, value=1.5, step=7)
    torch.rand(3)  # move the RNG so the restore is visible
    ckptfile.save_file(a.state_dict(), tmp_path / runfolder.LAST)
    expected_next = torch.rand(3)
    plain = torch.load(tmp_path / runfolder.LAST)  # weights_only=True by default: only plain types inside
    assert plain["step"] == 7 and plain["format"] == ckptfile.FORMAT and plain["args"] == {"model": "x"}
    b = make_checkpointer(tmp_path)
    assert b.resume("auto", shows_progress=True) == str(tmp_path / runfolder.LAST)
    assert b.progress.step == 7 and torch.equal(b.states["model"].weight, torch.full((2, 3), 1.5))
    assert torch.equal(torch.rand(3), expected_next), "the RNG state is restored"


def test_kill_during_write_leaves_the_previous_checkpoint_and_the_next_start_removes_the_temporary(tmp_path):
    last = tmp_path / runfolder.LAST
    ckptfile.save_file(make_checkpointer(tmp_path, 1.0, step=1).state_dict(), last)
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
    assert list(tmp_path.glob(".last.pth.*.tmp")), "a killed write leaves its temporary"
    ckpt = make_checkpointer(tmp_path)
    removed = ckpt.prepare_folder()
    assert removed and not list(tmp_path.glob(".*.tmp"))
    assert ckpt.resume("auto", shows_progress=True) and ckpt.progress.step == 1


def test_one_flipped_byte_is_detected_and_the_previous_checkpoint_used(tmp_path):
    last = tmp_path / runfolder.LAST
    ckptfile.save_file(make_checkpointer(tmp_path, 1.0, step=1).state_dict(), last)
    ckptfile.save_file(make_checkpointer(tmp_path, 2.0, step=2).state_dict(), last)
    flip_byte_in_tensor_data(last)
    torch.load(last)  # torch itself does not notice
    with pytest.raises(CheckpointError, match="CRC32 mismatch"):
        ckptfile.load_file(last)
    ckpt = make_checkpointer(tmp_path)
    assert ckpt.resume("auto", shows_progress=True) == str(tmp_path / runfolder.PREVIOUS)
    assert ckpt.progress.step == 1


def test_no_loadable_checkpoint_in_a_folder_with_progress_is_an_error_not_a_fresh_start(tmp_path):
    last = tmp_path / runfolder.LAST
    ckptfile.save_file(make_checkpointer(tmp_path, step=1).state_dict(), last)
    ckptfile.save_file(make_checkpointer(tmp_path, step=2).state_dict(), last)
    last.write_bytes(last.read_bytes()[:100])
    flip_byte_in_tensor_data(tmp_path / runfolder.PREVIOUS)
    with pytest.raises(CheckpointError) as e:
        make_checkpointer(tmp_path).resume("auto", shows_progress=True)
    assert "last.pth" in str(e.value) and "last.prev.pth" in str(e.value) and "--resume none" in str(e.value)
    assert make_checkpointer(tmp_path).resume("none", shows_progress=True) is None


def test_resume_picks_the_most_progress_not_the_newest_file(tmp_path):
    ckptfile.save_file(make_checkpointer(tmp_path, step=7).state_dict(), tmp_path / runfolder.LAST)
    ckptfile.save_file(make_checkpointer(tmp_path, step=4).state_dict(), tmp_path / "checkpoint-1.pth")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path, copy, ignore=shutil.ignore_patterns("copy"))
    os.utime(copy / "checkpoint-1.pth", (time.time() + 60, time.time() + 60))  # as `cp -r` may leave it
    ckpt = make_checkpointer(copy)
    assert ckpt.resume("auto", shows_progress=True) == str(copy / runfolder.LAST) and ckpt.progress.step == 7


def test_loading_never_runs_code(tmp_path):
    marker = tmp_path / "hijacked"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": {}, "payload": Marker(marker)}, crafted)
    for load in (ckptfile.load_file, ckptfile.load_weight_file):
        with pytest.raises(CheckpointError, match="refused, loading it would run code"):
            load(crafted)
    (tmp_path / "run").mkdir()
    shutil.copy(crafted, tmp_path / "run" / runfolder.LAST)
    with pytest.raises(CheckpointError):
        make_checkpointer(tmp_path / "run").resume("auto", shows_progress=False)
    assert not marker.exists()


def test_published_checkpoints_load_through_the_allow_list_only(tmp_path):
    published = tmp_path / "m2d_as.pth"
    torch.save({"model": {"blocks.0.w": torch.ones(2)}, "epoch": 299,
                "args": argparse.Namespace(model="m2d_vit_base", input_size=[80, 608])}, published)
    assert torch.equal(ckptfile.load_weight_file(published)["model"]["blocks.0.w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="not a full-state m2das checkpoint.*--init_from"):
        ckptfile.load_file(published)  # --resume on a reference-format file


def test_non_finite_state_is_detected():
    ok = [torch.ones(3), torch.zeros(2, 2), torch.tensor([1, 2])]
    assert checkpoint.all_finite(ok)
    assert not checkpoint.all_finite(ok + [torch.tensor([0.0, float("nan")])])
    assert not checkpoint.all_finite(ok + [torch.tensor([float("-inf")])])
    assert not checkpoint.all_finite(ok + [torch.tensor([float("inf"), float("-inf")])])  # a sum of NaN
    # Finite values whose sum overflows float16 are finite: the tensor is then checked element-wise.
    big = torch.full((1000,), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(big.sum()) and checkpoint.all_finite(ok + [big])
    assert not checkpoint.all_finite(ok + [torch.cat([big, torch.tensor([float("nan")], dtype=torch.float16)])])


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckptfile.save_file({"model": {}}, tmp_path / "a.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs: a real file system that fills up."""
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tmpfs", "4m") as mnt:
        yield mnt


def test_disk_full_is_one_line_and_the_previous_checkpoint_survives(small_tmpfs):
    last = small_tmpfs / runfolder.LAST
    ckptfile.save_file({"model": {"w": torch.ones(256 * 1024)}, "step": 1}, last)  # 1 MiB
    with pytest.raises(SaveFailed) as e:
        ckptfile.save_file({"model": {"w": torch.ones(1024 * 1024)}, "step": 2}, last)  # 4 MiB: no room
    message = str(e.value)
    assert message.startswith(f"no space left in {small_tmpfs}") and "GB free" in message and "\n" not in message
    assert torch.load(last)["step"] == 1
    assert not list(small_tmpfs.glob(".*.tmp"))


def test_background_writer_snapshot_is_independent_of_later_updates(tmp_path):
    w = torch.zeros(4)
    writer = checkpoint.BackgroundWriter()
    writer.submit(checkpoint.to_cpu({"model": {"w": w}}), tmp_path / "snap.pth")
    w += 1  # training goes on while the file is written
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "snap.pth")["model"]["w"], torch.zeros(4))


def test_a_full_state_of_m2das_0_1_0_resumes(tmp_path):
    """The previous release pickled numpy's RNG state: still loaded without running code, and converted."""
    import numpy as np

    a = make_checkpointer(tmp_path, value=0.5, step=3)
    old = a.state_dict()
    del old["format"]
    np.random.seed(11)
    old["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    expected = np.random.rand(3)
    torch.save(old, tmp_path / runfolder.LAST)
    np.random.seed(0)
    b = make_checkpointer(tmp_path)
    assert b.resume("auto", shows_progress=True) == str(tmp_path / runfolder.LAST) and b.progress.step == 3
    assert np.array_equal(np.random.rand(3), expected)


def test_step_boundary_answers_with_a_typed_outcome(tmp_path):
    ckpt = make_checkpointer(tmp_path, 1.0, step=5)
    assert ckpt.step_boundary(None, epoch_ended=False) is None  # nothing due: go on, nothing written
    assert not list(tmp_path.glob("*.pth"))
    stopped = ckpt.step_boundary("Ctrl-C (SIGINT)", epoch_ended=False)
    assert stopped == Outcome(runfolder.EVENT_STOPPED, EXIT_RESUMABLE, stopped.message)
    assert stopped.message.startswith(f"Ctrl-C (SIGINT) received: saved {tmp_path / runfolder.LAST} at step 5")
    # The one divergence check: a non-finite loss or weight ends the run as diverged, and saves nothing.
    assert ckpt.diverged(torch.tensor([1.0, float("nan")])).exit_code == EXIT_DIVERGED
    with torch.no_grad():
        ckpt.states["model"].weight[0, 0] = float("inf")
    before = (tmp_path / runfolder.LAST).read_bytes()
    diverged = ckpt.step_boundary("SIGTERM", epoch_ended=False)
    assert (diverged.event, diverged.exit_code) == (runfolder.EVENT_DIVERGED, EXIT_DIVERGED)
    assert f"{tmp_path / runfolder.LAST} is the resume point" in diverged.message
    assert (tmp_path / runfolder.LAST).read_bytes() == before


def write_bomb(path: Path, expanded: int = 1 << 30) -> Path:
    """A torch zip whose tensor record is `expanded` bytes of deflated zeros: about 1 MB on disk."""
    import zipfile
    import zlib

    plain = path.with_suffix(".plain")
    torch.save({"model": {"w": torch.zeros(4)}}, plain)
    chunk = bytes(16 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no back-references
    crc = 0
    for _ in range(expanded // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if "/data/" not in info.filename:
                out.writestr(info, src.read(info))
                continue
            bomb = zipfile.ZipInfo(info.filename)
            with out.open(bomb, "w") as f:  # raw bytes stored, then relabelled as deflated below
                f.write(block * (expanded // len(chunk)) + zlib.compressobj(9, zlib.DEFLATED, -15).flush())
            bomb.compress_type, bomb.file_size, bomb.CRC = zipfile.ZIP_DEFLATED, expanded, crc
            end = out.fp.tell()
            out.fp.seek(bomb.header_offset)
            out.fp.write(bomb.FileHeader())
            out.fp.seek(end)
    plain.unlink()
    return path


def test_a_decompression_bomb_is_refused_before_it_is_expanded(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.pth")
    assert bomb.stat().st_size < 2_000_000
    for load in (ckptfile.load_file, ckptfile.load_weight_file, ckptfile.verify_integrity,
                 lambda p: ckptfile.safe_load(p, mmap=True)):
        with pytest.raises(CheckpointError, match="compressed"):
            load(bomb)
    # export reads weights as --init_from does (load_weight_file); its peak memory and time, from wait4.
    t0, err = time.monotonic(), tmp_path / "stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "m2das", "export", str(bomb), "--out", str(tmp_path / "out")],
                                stdout=subprocess.DEVNULL, stderr=f)
    while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0 and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    if waited[0] == 0:
        proc.kill()
        waited = os.wait4(proc.pid, 0)
    seconds, proc.returncode = time.monotonic() - t0, os.waitstatus_to_exitcode(waited[1])
    lines = err.read_text().strip().splitlines()
    assert proc.returncode == runfolder.EXIT_BAD_INPUT and len(lines) == 1, lines
    assert str(bomb) in lines[0] and "compressed" in lines[0]
    assert waited[2].ru_maxrss < 1_000_000, f"peak RSS {waited[2].ru_maxrss} KB: the record was expanded"
    cpu = waited[2].ru_utime + waited[2].ru_stime  # what it spent, whatever else loads the machine
    assert cpu < 10, f"{cpu:.1f} s of CPU ({seconds:.1f} s wall)"
    assert not (tmp_path / "out").exists()


def test_epoch_checkpoints_are_written_in_the_background_from_a_snapshot_and_the_final_one_at_once(tmp_path):
    import threading

    logged, uploaded = [], threading.Event()
    ckpt = make_checkpointer(tmp_path, 1.0, step=4)
    ckpt.log, ckpt.epochs = logged.append, 3
    ckpt.publish = lambda path, step: uploaded.wait(30)  # an upload (in the writer) that waits for the test
    for epoch, value in ((1, 1.0), (2, 2.0)):
        with torch.no_grad():
            ckpt.states["model"].weight.fill_(value)
        ckpt.progress.epoch = epoch
        assert ckpt.step_boundary(None, epoch_ended=True) is None
        assert ckpt.writer.busy(), "the step went on while the checkpoint was written and uploaded"
        with torch.no_grad():
            ckpt.states["model"].weight.fill_(-1.0)  # the next step changes the weights during the write
        buffers = [t.data_ptr() for t in ckpt.snapshot._buffers.values()]
        uploaded.set()
        ckpt.finish()
        uploaded.clear()
        path = tmp_path / runfolder.epoch_checkpoint_name(epoch)
        assert torch.equal(torch.load(path)["model"]["weight"], torch.full((2, 3), value))
        assert logged[-1] == f"saved {path}"
    assert buffers == [t.data_ptr() for t in ckpt.snapshot._buffers.values()], "the snapshot reuses its buffers"
    ckpt.publish = None
    ckpt.progress.epoch = 3  # the final epoch: complete on disk when step_boundary returns
    assert ckpt.step_boundary(None, epoch_ended=True) is None and not ckpt.writer.busy()
    assert torch.load(tmp_path / runfolder.epoch_checkpoint_name(3))["epoch"] == 3


@pytest.mark.parametrize("then", ["next step", "stop"])
def test_an_epoch_checkpoint_that_fails_in_the_background_stops_the_run_saving_nothing_newer(tmp_path, then):
    ckpt = make_checkpointer(tmp_path, 1.0, step=4)
    ckpt.progress.epoch = 1
    blocker = tmp_path / runfolder.epoch_checkpoint_name(1)
    (blocker / "x").mkdir(parents=True)  # a non-empty folder in its place: the rename fails
    assert ckpt.step_boundary(None, epoch_ended=True) is None
    if then == "next step":
        while ckpt.writer.busy():
            time.sleep(0.01)
        ckpt.progress.step += 1
        outcome = ckpt.step_boundary(None, epoch_ended=False)
    else:  # a stop while the write may still be in flight: its save would skip the epoch checkpoint
        outcome = ckpt.step_boundary("SIGTERM", epoch_ended=False)
    assert (outcome.event, outcome.exit_code) == (runfolder.EVENT_SAVE_FAILED, EXIT_RESUMABLE)
    assert outcome.message.startswith(f"stopping: could not write {blocker}") and "previous checkpoint is intact" \
        in outcome.message
    assert not (tmp_path / runfolder.LAST).exists() and not list(tmp_path.glob(".*.tmp"))
    rows = [r for r in read_jsonl(tmp_path / runfolder.RESTARTS) if r["event"] == runfolder.EVENT_SAVE_FAILED]
    assert [r["file"] for r in rows] == [blocker.name]


@pytest.mark.parametrize("then", ["next step", "stop"])
def test_a_non_finite_snapshot_is_never_written_and_ends_the_run_as_diverged(tmp_path, then):
    """The writer, not the step, checks a background save's snapshot; the next step boundary ends the run."""
    ckpt = make_checkpointer(tmp_path, 1.0, step=4)
    ckpt.progress.epoch = 1
    with torch.no_grad():
        ckpt.states["model"].weight[1, 2] = float("nan")
    assert ckpt.step_boundary(None, epoch_ended=True) is None
    with torch.no_grad():
        ckpt.states["model"].weight.fill_(1.0)  # the live state is finite again: the writer's verdict decides
    if then == "next step":
        while ckpt.writer.busy():
            time.sleep(0.01)
        outcome = ckpt.step_boundary(None, epoch_ended=False)
    else:
        outcome = ckpt.step_boundary("SIGTERM", epoch_ended=False)
    assert (outcome.event, outcome.exit_code) == (runfolder.EVENT_DIVERGED, EXIT_DIVERGED)
    assert "no checkpoint was saved yet" in outcome.message
    assert not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob(".*.tmp"))


RANK = """
import json, sys
import torch.distributed as dist
from m2das.checkpoint import Checkpointer, Progress

rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
ckpt = Checkpointer(".", {"progress": Progress()}, {}, rank=rank, epochs=1, save_freq=1, interval_s=1e9, log=print)
verdicts = {}
for name in ("a.pth", "b.pth"):  # relative: each rank reads the file in its own working folder
    try:
        verdicts[name] = ckpt._load_file(name)["step"]
    except Exception as e:
        verdicts[name] = str(e)
print(json.dumps(verdicts))
"""


def test_the_crc32_check_runs_on_rank_0_only_and_its_verdict_reaches_every_rank(tmp_path):
    """Each rank's working folder holds its own copy of a.pth and b.pth, one damaged: who checked shows."""
    import json
    import socket

    state = make_checkpointer(tmp_path, 1.0, step=6).state_dict()
    for rank, damaged in ((0, "b.pth"), (1, "a.pth")):
        for name in ("a.pth", "b.pth"):
            ckptfile.save_file(state, tmp_path / f"rank{rank}" / name)
        flip_byte_in_tensor_data(tmp_path / f"rank{rank}" / damaged)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank)], env=env, text=True, stdout=subprocess.PIPE,
                              cwd=tmp_path / f"rank{rank}") for rank in (0, 1)]
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    assert [r["a.pth"] for r in results] == [6, 6], "rank 1 loads its damaged a.pth: it trusts rank 0's check"
    for r in results:  # rank 0's damaged b.pth is refused on both ranks, though rank 1's copy is intact
        assert "CRC32 mismatch" in r["b.pth"], r
