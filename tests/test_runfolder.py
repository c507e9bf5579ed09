"""The one-trainer lock with real files and real processes: who may take a run folder, and when."""

import json
import os
import subprocess
import sys
import time

import pytest

from m2das import runfolder
from m2das.runfolder import RunLock, RunLocked

HOLDER = """
import sys, time
from m2das.runfolder import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(run_dir, env=None):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_holder_refuses_and_is_named(tmp_path):
    child = hold_in_child(tmp_path, {"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(RunLocked, match=rf"in use by another trainer \(host .*, pid {child.pid}, SLURM job 4242"):
            RunLock(tmp_path).acquire()
        assert runfolder.live_holder(tmp_path) is not None
    finally:
        child.kill()
        child.wait()


def test_a_sigkilled_holder_on_this_host_does_not_block(tmp_path):
    child = hold_in_child(tmp_path)
    child.kill()
    child.wait()
    assert (tmp_path / runfolder.LOCK).exists()
    assert runfolder.live_holder(tmp_path) is None
    lock = RunLock(tmp_path).acquire()
    assert f"pid {child.pid} is gone" in lock.took_over
    lock.release()
    assert not (tmp_path / runfolder.LOCK).exists()


def write_foreign_lock(run_dir, job_id=None, age_s=0.0):
    """A holder on another node: its pid cannot be checked from here."""
    path = run_dir / runfolder.LOCK
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "job_id": job_id, "token": "t"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_requeued_job_takes_over_its_own_lock_at_once(tmp_path, monkeypatch):
    write_foreign_lock(tmp_path, job_id="777")
    with pytest.raises(RunLocked, match="node-elsewhere"):
        RunLock(tmp_path).acquire()  # another job: the holder may be alive
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = RunLock(tmp_path).acquire()
    assert "same SLURM job 777" in lock.took_over
    assert json.loads((tmp_path / runfolder.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_silent_foreign_holder_is_stale_after_the_timeout(tmp_path):
    write_foreign_lock(tmp_path, age_s=runfolder.DEFAULT_STALE_S - 60)
    with pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()
    write_foreign_lock(tmp_path, age_s=runfolder.DEFAULT_STALE_S + 60)
    lock = RunLock(tmp_path).acquire()
    assert "no heartbeat" in lock.took_over
    lock.release()


def test_shell_scripts_read_names_from_the_contract():
    r = subprocess.run([sys.executable, "-m", "m2das.runfolder", "LAUNCHER"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == runfolder.LAUNCHER
    r = subprocess.run([sys.executable, "-m", "m2das.runfolder", "nope"], capture_output=True, text=True)
    assert r.returncode == runfolder.EXIT_BAD_INPUT and "usage" in r.stderr
