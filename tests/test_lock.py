"""The run lock under attack: removed under a live trainer, set to unsafe timings, garbled in a bucket."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import TINY_TRAIN, m2das_cmd, run_m2das
from m2das import runfolder
from m2das.fileio import read_jsonl
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_RESUMABLE, LOCK_HEARTBEAT_ENV, LOCK_STALE_ENV, RunLock, RunLocked
from test_train import wait_for_step

BEAT = 0.3  # seconds: the heartbeat these tests set through LOCK_HEARTBEAT_ENV


def test_a_removed_lock_stops_the_trainer_resumably_within_a_heartbeat(lms_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", *TINY_TRAIN, "--data_path", lms_data, "--output_dir", run, "--batch_size", "2", "--epochs", "2"]
    proc = subprocess.Popen(m2das_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, LOCK_HEARTBEAT_ENV: str(BEAT)})
    wait_for_step(run, 2, proc)
    (run / runfolder.LOCK).unlink()
    removed_at = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE, out
    assert "run lock lost" in out and "was removed" in out and "saved" in out, out
    stop = read_jsonl(run / runfolder.RESTARTS)[-1]
    assert stop["event"] == runfolder.EVENT_STOPPED and "was removed" in stop["reason"]
    # One heartbeat, the step that was running and the save: seconds, not the rest of the run.
    assert time.monotonic() - removed_at < 30
    steps = [r["step"] for r in read_jsonl(run / runfolder.LOG)]
    assert steps == sorted(steps) and steps[-1] < 24  # stopped before the end (2 epochs of 12 steps)


def test_a_lock_taken_by_another_stops_its_old_holder(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_HEARTBEAT_ENV, str(BEAT))
    lost = []
    lock = RunLock(tmp_path).acquire()
    lock.on_lost(lost.append)
    (tmp_path / runfolder.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "theirs"}))
    deadline = time.monotonic() + 10 * BEAT
    while not lost and time.monotonic() < deadline:
        time.sleep(BEAT / 10)
    assert lost and "now names another trainer (host elsewhere, pid 7" in lost[0]
    lock.release()
    assert (tmp_path / runfolder.LOCK).exists()  # the other's lock stays


def test_a_newcomer_waits_for_a_trainer_that_lost_its_lock(tmp_path, monkeypatch):
    """restarts.jsonl names a live trainer without an end: the new holder does not start beside it."""
    monkeypatch.setenv(LOCK_HEARTBEAT_ENV, str(BEAT))
    # Not our child (a zombie would pass for alive): a shell starts it and leaves it to init.
    pid = int(subprocess.run(["sh", "-c", "sleep 1 >/dev/null 2>&1 & echo $!"], capture_output=True,
                             text=True, check=True).stdout)
    (tmp_path / runfolder.RESTARTS).write_text(json.dumps(
        {"time": time.time(), "event": "start", "host": runfolder.holder_record()["host"], "pid": pid}) + "\n")
    t0 = time.monotonic()
    lock = RunLock(tmp_path).acquire()
    waited = time.monotonic() - t0
    lock.release()
    assert 0.8 < waited < 10


@pytest.mark.parametrize("env, says", [
    ({LOCK_STALE_ENV: "abc"}, "expected a positive number of seconds"),
    ({LOCK_STALE_ENV: "0"}, "cannot be switched off"),
    ({LOCK_STALE_ENV: "-5"}, "cannot be switched off"),
    ({LOCK_STALE_ENV: "10"}, "must be at least 3 heartbeats (90 s"),
    ({LOCK_HEARTBEAT_ENV: "300"}, "must be at least 3 heartbeats (900 s"),
])
def test_unsafe_lock_timings_are_refused_at_use(tmp_path, monkeypatch, env, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(runfolder.LockSettingError) as e:
        RunLock(tmp_path).acquire()
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / runfolder.LOCK).exists()


def test_the_trainer_refuses_an_unsafe_staleness_with_one_line(tmp_path):
    r = run_m2das("train", *TINY_TRAIN, "--data_path", tmp_path / "nodata", "--output_dir", tmp_path / "run",
                  env={LOCK_STALE_ENV: "10"})
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert r.stderr.strip().count("\n") == 0 and LOCK_STALE_ENV in r.stderr and "Traceback" not in r.stderr


def test_a_garbled_lock_object_is_stale_by_its_age_and_a_removed_one_stops_the_holder(s3_server, tmp_path,
                                                                                       monkeypatch):
    from m2das.fileio import url_fs
    from m2das.remote import RemoteRunFolder

    urls = {content: f"s3://m2das-lock-test/runs/garbled{i}" for i, content in enumerate((b"", b"not json {"))}
    fs, _ = url_fs(urls[b""])
    fs.mkdir("m2das-lock-test")
    for content, url in urls.items():
        fs.pipe_file(f"{url_fs(url)[1]}/{runfolder.LOCK}", content)
        with pytest.raises(RunLocked, match=r"an unreadable lock, written \d+ s ago"):
            RemoteRunFolder(url, tmp_path / "refused").acquire()  # a fresh one may be a holder writing it
    monkeypatch.setenv(LOCK_HEARTBEAT_ENV, str(BEAT))
    monkeypatch.setenv(LOCK_STALE_ENV, str(3 * BEAT))
    time.sleep(1.2)  # S3 times have whole seconds: past the staleness for sure
    for content, url in urls.items():
        folder = RemoteRunFolder(url, tmp_path / "taken").acquire()
        assert "an unreadable lock" in folder.took_over and "no heartbeat" in folder.took_over
        lost = []
        folder.on_lost(lost.append)
        fs.rm_file(f"{url_fs(url)[1]}/{runfolder.LOCK}")
        deadline = time.monotonic() + 10 * BEAT
        while not lost and time.monotonic() < deadline:
            time.sleep(BEAT / 10)
        assert lost and "was removed" in lost[0]
        folder.release()
