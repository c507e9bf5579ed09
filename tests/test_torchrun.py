"""torchrun says 1 for a clean stop (every rank 75) and for a killed rank alike: the requeue decision and
`m2das status` read the exit code each rank left in the run folder. The real torchrun SIGTERM is in
test_train.py (test_two_process_gloo_run_stops_together_and_resumes_exactly)."""

import json
import os
import subprocess
import sys
import time

import pytest

from m2das import runfolder
from m2das.cluster import requeue, status
from m2das.fileio import append_jsonl, read_jsonl


def ranks_exit(run, codes, run_id="none", world=None):
    """What each surviving rank of one torchrun start leaves (None: that rank was killed, it left nothing)."""
    for rank, code in enumerate(codes):
        if code is not None:
            env = {runfolder.TORCHRUN_RUN_ID_ENV: run_id, "RANK": str(rank), "WORLD_SIZE": str(world or len(codes))}
            assert runfolder.record_torchrun_exit(run, code, env)


def start(run):
    """Rank 0's start record (the ranks' records above carry this process's pid: this is their start)."""
    append_jsonl(run / runfolder.RESTARTS, {"time": time.time(), "event": runfolder.EVENT_START, "pid": os.getpid()})


@pytest.mark.parametrize("codes, action, why", [
    ([75, 75], requeue.REQUEUE, "stopped resumably"),
    ([1, None], requeue.REQUEUE, "killed (SIGKILL"),  # rank 1 killed; rank 0 failed on the broken collective
    ([1, 1], requeue.FAILED, "exit codes [1, 1]"),  # a crash on every rank: a rerun fails the same way
    ([2, 75], requeue.FAILED, "bad input"),
])
def test_the_decision_comes_from_what_the_ranks_recorded(tmp_path, codes, action, why):
    start(tmp_path)
    ranks_exit(tmp_path, codes)
    decision, seen, _ = requeue.decide_torchrun(tmp_path, 1, restart_count=0)  # torchrun's own code: 1
    assert decision.action == action and why in decision.reason, (decision, seen)
    assert sorted(seen) == sorted(c if c is not None else -9 for c in codes)


def test_a_ctrl_c_in_the_terminal_is_a_stop_not_a_requeue(tmp_path):
    start(tmp_path)
    append_jsonl(tmp_path / runfolder.RESTARTS, {"time": time.time(), "event": runfolder.EVENT_STOPPED, "step": 3,
                                                 "signal": "SIGINT"})
    ranks_exit(tmp_path, [75, 75])
    decision, _, _ = requeue.decide_torchrun(tmp_path, 1, restart_count=0)
    assert decision.action == requeue.STOPPED and "on request" in decision.reason


def test_the_documented_decision_command_reads_and_consumes_the_records(tmp_path):
    start(tmp_path)
    ranks_exit(tmp_path, [1, None], run_id="a")
    assert status.collect(tmp_path, queue=False)["state"].startswith(
        "ended under torchrun (rank exit codes [1, -9]): requeue")

    def decide(code):
        r = subprocess.run([sys.executable, "-m", "m2das.cluster.requeue", "decide", "--run", str(tmp_path),
                            "--torchrun", "--restart", "3", str(code)], capture_output=True, text=True, check=True)
        return r.stdout.strip()

    assert decide(1) == requeue.REQUEUE
    row = read_jsonl(tmp_path / runfolder.LAUNCHER)[-1]
    assert row["exit_codes"] == [1, -9] and row["restart_count"] == 3
    assert not list(runfolder.task_exits_dir(tmp_path).iterdir())  # decided: not mixed with the next start's
    # The next start recorded its start, then torchrun itself failed before any rank could record:
    # torchrun's own code is all there is, and the earlier records could not pass for this start's.
    ranks_exit(tmp_path, [75, 75], run_id="b")
    time.sleep(0.01)
    start(tmp_path)
    assert decide(1) == requeue.FAILED
    assert json.loads(next(runfolder.task_exits_dir(tmp_path).glob("torchrun.b.0.0")).read_text())["code"] == 75
