"""The run folder's promises, tried as a cluster breaks them: real trainer processes, real signals,
real damaged files, a real full file system."""

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import SHARED, TINY_TRAIN, m2das_cmd, run_m2das, write_lms_folder
from m2das import EXIT_BAD_INPUT, EXIT_RESUMABLE, runfolder
from m2das.fileio import read_jsonl
from test_checkpoint import Marker, flip_byte_in_tensor_data, small_tmpfs  # noqa: F401  (fixture)

EPOCHS = 2  # 48 files, batch 2: 24 steps an epoch


def args(data, run, *extra):
    return ["train", *TINY_TRAIN, "--data_path", data, "--output_dir", run, "--batch_size", "2",
            "--epochs", str(EPOCHS), "--save_freq", "1", *extra]


def final_model(run):
    return torch.load(runfolder.final_weights(run, EPOCHS))["model"]


def assert_same_weights(a, b):
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def stop_at(step):
    """A real SIGTERM, sent by the trainer to itself inside optimizer step `step`."""
    return {"M2DAS_TEST_SIGTERM_AT_STEP": str(step)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_lms_folder(tmp_path_factory.mktemp("trust") / "data")


@pytest.fixture(scope="module")
def reference(data):
    run = data.parent / "reference"
    r = run_m2das(*args(data, run))
    assert r.returncode == 0, r.stderr
    return final_model(run)


def test_damaged_checkpoints_fall_back_or_stop_but_never_reset(data, reference, tmp_path):
    run = tmp_path / "run"
    r = run_m2das(*args(data, run, "--ckpt_interval_min", "0"), env=stop_at(8))
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    assert torch.load(run / runfolder.LAST)["step"] == 8 and torch.load(run / runfolder.PREVIOUS)["step"] == 7

    # Both rolling files damaged, no epoch checkpoint yet: exit 2, every file named, nothing touched.
    both = tmp_path / "both"
    shutil.copytree(run, both)
    flip_byte_in_tensor_data(both / runfolder.LAST)
    (both / runfolder.PREVIOUS).write_bytes((both / runfolder.PREVIOUS).read_bytes()[:4096])
    before = {p.name: p.read_bytes() for p in both.iterdir() if p.is_file()}
    r = run_m2das(*args(data, both))
    assert r.returncode == EXIT_BAD_INPUT, r.stdout + r.stderr
    error = r.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert "last.pth" in error and "last.prev.pth" in error and "--resume none" in error
    after = {p.name: p.read_bytes() for p in both.iterdir() if p.is_file()}
    assert after == before

    # One flipped byte in last.pth: detected, the previous file used, the end bit-identical.
    flip_byte_in_tensor_data(run / runfolder.LAST)
    r = run_m2das(*args(data, run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CRC32 mismatch" in r.stdout and f"resumed from {run / runfolder.PREVIOUS} at step 7" in r.stdout
    assert_same_weights(reference, final_model(run))


def test_a_stop_in_the_last_step_of_an_epoch_still_writes_its_checkpoint(data, reference, tmp_path):
    run = tmp_path / "run"
    r = run_m2das(*args(data, run), env=stop_at(24))
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    assert torch.load(run / "checkpoint-1.pth")["step"] == 24
    r = run_m2das(*args(data, run), env=stop_at(48))  # the very last step of the run
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    assert runfolder.final_weights(run, EPOCHS).exists()
    assert runfolder.EVENT_FINISHED not in [e["event"] for e in read_jsonl(run / runfolder.RESTARTS)]
    r = run_m2das(*args(data, run))
    assert r.returncode == 0 and "all epochs done" in r.stdout, r.stdout + r.stderr
    assert read_jsonl(run / runfolder.RESTARTS)[-1]["event"] == runfolder.EVENT_FINISHED
    assert_same_weights(reference, final_model(run))


def test_crafted_pickles_never_run(data, tmp_path):
    marker = tmp_path / "hijacked"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": {}, "epoch": 1, "step": 1, "payload": Marker(marker)}, crafted)
    for i, extra in enumerate((["--init_from", crafted], ["--resume", crafted])):
        r = run_m2das(*args(data, tmp_path / f"run{i}", *extra))
        assert r.returncode == EXIT_BAD_INPUT and "loading it would run code" in r.stderr, r.stdout + r.stderr
    run = tmp_path / "run0"
    shutil.copy(crafted, run / runfolder.LAST)
    r = run_m2das(*args(data, run, "--init_from", crafted))
    assert r.returncode == EXIT_BAD_INPUT and "loading it would run code" in r.stderr, r.stdout + r.stderr
    assert not marker.exists()


def test_one_trainer_per_run_folder_and_a_killed_holder_does_not_block(data, tmp_path):
    run = tmp_path / "run"
    long = args(data, run, "--epochs", "200")
    # One thread: the holder trains on while the second start is timed, and must not starve it.
    first = subprocess.Popen(m2das_cmd(*long), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not read_jsonl(run / runfolder.LOG):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        t0 = time.time()
        r = run_m2das(*long)
        assert r.returncode == EXIT_BAD_INPUT and f"pid {first.pid}" in r.stderr, r.stdout + r.stderr
        assert time.time() - t0 < 30 and "in use by another trainer" in r.stderr
    finally:
        first.kill()
        first.wait()
    assert (run / runfolder.LOCK).exists(), "SIGKILL leaves the lock behind"
    third = subprocess.Popen(m2das_cmd(*long), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = time.time() + 120
    while not any(r.get("pid") == third.pid for r in read_jsonl(run / runfolder.RESTARTS)):
        assert third.poll() is None and time.time() < deadline, third.communicate()
        time.sleep(0.05)
    os.killpg(third.pid, signal.SIGTERM)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == EXIT_RESUMABLE and "took over the run folder" in out, out
    assert not (run / runfolder.LOCK).exists(), "a clean exit releases the lock"


def test_damaged_small_files_are_named_and_the_validation_cache_is_rebuilt(data, tmp_path):
    run = tmp_path / "run"
    assert run_m2das(*args(data, run, "--epochs", "1")).returncode == 0
    (run / runfolder.VALIDATED).write_text("{not json")
    r = run_m2das(*args(data, run, "--epochs", "1"))
    assert r.returncode == 0 and "checking 48 listed files" in r.stdout, r.stdout + r.stderr
    for name in (runfolder.CLASSES, runfolder.CONFIG):
        good = (run / name).read_bytes()
        (run / name).write_text('{"torn')
        r = run_m2das(*args(data, run, "--epochs", "1"))
        assert r.returncode == EXIT_BAD_INPUT and str(run / name) in r.stderr, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        (run / name).write_bytes(good)


def test_a_full_disk_is_one_line_and_costs_no_checkpoint(data, small_tmpfs):
    # 4 MiB: room for one 2.6 MB checkpoint, not for the next save beside it.
    run = small_tmpfs / "run"
    r = run_m2das(*args(data, run, "--ckpt_interval_min", "0"))
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "interval save failed, training goes on" in out and f"no space left in {run}" in out
    assert "less than two checkpoints" in out  # the warning at start
    assert "Traceback" not in out and "unexpected pos" not in out
    events = [e["event"] for e in read_jsonl(run / runfolder.RESTARTS)]
    assert runfolder.EVENT_SAVE_FAILED in events
    kept = [torch.load(p)["step"] for p in runfolder.checkpoint_files(run)]
    assert kept and all(step > 0 for step in kept)


def test_written_files_are_readable_by_others_under_umask_022(tmp_path):
    audio, data = tmp_path / "audio", tmp_path / "data"
    audio.mkdir()
    t = np.arange(16000) / 16000
    sf.write(str(audio / "--PJHxphWEs_30.000.wav"), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    r = subprocess.run(m2das_cmd("prepare", audio, data, "--metadata", SHARED / "audioset", "--workers", "1",
                                 "--stats-files", "4", "--no-progress", "--device", "cpu"),
                       capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stdout + r.stderr
    files = [p for p in data.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert any(p.suffix == ".npy" for p in files) and any(p.suffix == ".csv" for p in files)
    modes = {p.relative_to(data).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_the_quality_monitor_reports_and_leaves_exact_resume_untouched(data, reference, tmp_path):
    run = tmp_path / "run"
    monitored = args(data, run, "--monitor_every", "1", "--monitor_list", data / "files_as_weighted.csv")
    r = run_m2das(*monitored, env=stop_at(30))  # mid-way through epoch 2, after epoch 1's check
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    r = run_m2das(*monitored)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_weights(reference, final_model(run))  # the same as a run without the monitor
    rows = [row for row in read_jsonl(run / runfolder.LOG) if "monitor_map" in row]
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert 0 < row["monitor_map"] <= 1 and 1 <= row["monitor_rankme"] and 0 < row["monitor_share"] < 1
    assert "quality after epoch 2: mAP" in r.stdout and "% of training time" in r.stdout


@pytest.mark.parametrize("damage", ["truncated", "refused pickle"])
def test_a_skipped_checkpoint_is_named_with_what_the_fallback_costs(tmp_path, damage):
    """A last.pth that cannot be opened: the older file resumes, and the warning and restarts.jsonl say
    which file was passed over and how many steps that costs (from the records: the file cannot tell)."""
    from m2das import ckptfile
    from m2das.fileio import append_jsonl
    from test_checkpoint import make_checkpointer

    last = tmp_path / runfolder.LAST
    ckptfile.save_file(make_checkpointer(tmp_path, step=8).state_dict(), last)
    ckptfile.save_file(make_checkpointer(tmp_path, step=11).state_dict(), last)  # step 8 becomes last.prev.pth
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:300])
        append_jsonl(tmp_path / runfolder.RESTARTS, {"event": runfolder.EVENT_STOPPED, "step": 11})
        known = "it was saved at step 11 (the stop recorded in restarts.jsonl): 3 steps trained again"
    else:
        torch.save({"model": {}, "step": 11, "payload": Marker(tmp_path / "hijacked")}, last)
        for step in (10, 12):  # a later interval save, logged but not recorded by a stop
            append_jsonl(tmp_path / runfolder.LOG, {"step": step})
        known = "its step is unknown; log.jsonl reached step 12: up to 4 steps trained again"
    said = []
    ckpt = make_checkpointer(tmp_path)
    ckpt.log = said.append
    assert ckpt.resume("auto", shows_progress=True) == str(tmp_path / runfolder.PREVIOUS) and ckpt.progress.step == 8
    assert len(said) == 1 and said[0].startswith(f"warning: skipping {last}: ") and said[0].endswith(known), said
    row = read_jsonl(tmp_path / runfolder.RESTARTS)[-1]
    assert row["event"] == runfolder.EVENT_CHECKPOINT_SKIPPED and row["file"] == runfolder.LAST
    assert row["resumed_from"] == runfolder.PREVIOUS and row["resumed_step"] == 8
    assert row["steps_lost"] == (3 if damage == "truncated" else None) and not (tmp_path / "hijacked").exists()
