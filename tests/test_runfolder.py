"""The run-folder contract: the one-trainer lock with real files and real processes, and names spelled once."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


PACKAGE = Path(runfolder.__file__).parent
README = PACKAGE.parent / "README.md"


def _is_event_field(node) -> bool:
    """`row.get("event")` or `row["event"]`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        node = node.args[0]
    elif isinstance(node, ast.Subscript):
        node = node.slice
    else:
        return False
    return isinstance(node, ast.Constant) and node.value == "event"


def event_literals(source: str) -> list:
    """Strings written where an event name goes: `{"event": ...}`, `event=...`, `row.get("event") == ...`
    (or `in (...)`); an event name belongs in a constant of m2das/runfolder.py (or requeue's decisions)."""
    found = []
    for n in ast.walk(ast.parse(source)):
        values = []
        if isinstance(n, ast.Dict):
            values = [v for k, v in zip(n.keys, n.values) if isinstance(k, ast.Constant) and k.value == "event"]
        elif isinstance(n, ast.keyword) and n.arg == "event":
            values = [n.value]
        elif isinstance(n, ast.Compare) and _is_event_field(n.left):
            for c in n.comparators:
                values += c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c]
        found += [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return found


def test_event_names_and_the_attempt_variable_are_spelled_only_in_the_contract():
    events, attempt = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name != "runfolder.py" and (found := event_literals(text)):
            events[str(path.relative_to(PACKAGE))] = found
        if runfolder.LAUNCHER_ATTEMPT_ENV in text:
            attempt.append(str(path.relative_to(PACKAGE)))
    assert events == {}, f"event names spelled outside m2das/runfolder.py: {events}; import its EVENT_* constants"
    assert attempt == ["runfolder.py"], f"{runfolder.LAUNCHER_ATTEMPT_ENV} is spelled in {attempt}"
    # The README's wrapper loop sets the variable the trainer reads.
    assert f"{runfolder.LAUNCHER_ATTEMPT_ENV}=$n torchrun" in README.read_text(encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "m2das.runfolder", "LAUNCHER_ATTEMPT_ENV"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == runfolder.LAUNCHER_ATTEMPT_ENV


def test_the_event_check_sees_each_way_an_event_is_written_or_read():
    source = ('rows = [{"event": "submit", "job_id": 1}]\n'
              'log("x", event="start")\n'
              'a = [r for r in rows if r.get("event") == "stopped"]\n'
              'b = [r for r in rows if r["event"] in ("finished", EVENT_START)]\n'
              'c = {"kind": "submit"}\n')
    assert event_literals(source) == ["submit", "start", "stopped", "finished"]
