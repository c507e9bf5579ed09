"""The one requeue policy (m2das/cluster/requeue.py), its command line, and the shell held to it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from m2das import runfolder
from m2das.cluster import requeue
from m2das.cluster.requeue import CAP, DIVERGED, FAILED, FINISHED, REQUEUE, STOPPED, decide

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
TEMPLATES = sorted(SLURM.glob("*.sbatch"))


@pytest.mark.parametrize("codes, kw, action", [
    ([0, 0], {}, FINISHED),
    ([75, 75], {}, REQUEUE),
    ([75, 0], {}, REQUEUE),
    ([-9, 1], {}, REQUEUE),            # one rank SIGKILLed, the other failed on the broken collective
    ([137], {}, REQUEUE),              # srun's code for a SIGKILLed task
    ([143], {"last_event": "stopped"}, REQUEUE),  # kill-on-bad-exit hit a slower rank after the save
    ([1], {"signalled": True}, REQUEUE),
    ([1], {}, FAILED),
    ([3, 75], {}, DIVERGED),
    ([1], {"last_event": "diverged"}, DIVERGED),
    ([2, 75], {"signalled": True}, FAILED),  # bad input / run folder held by another trainer: never requeued
    ([-15], {"last_event": "finished"}, FINISHED),
    ([75, 75], {"stop_requested": True}, STOPPED),
])
def test_decide(codes, kw, action):
    assert decide(codes, 0, **kw).action == action


def test_cap():
    assert decide([75], 2, 3).action == REQUEUE
    d = decide([75], 3, 3)
    assert d.action == CAP and "--max-requeues 3" in d.reason
    assert requeue.EXIT_FOR[CAP] == runfolder.EXIT_RESUMABLE and requeue.EXIT_FOR[DIVERGED] == runfolder.EXIT_DIVERGED


def test_master_port_is_one_rule():
    ports = {requeue.master_port("4242", r) for r in range(5)}
    assert len(ports) == 5 and all(15000 <= p < 35000 for p in ports)
    out = subprocess.run([sys.executable, "-m", "m2das.cluster.requeue", "port"], capture_output=True, text=True,
                         env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "3", "PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert int(out.stdout) == requeue.master_port("4242", 3)


def cli(run, *args, **env):
    base = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1", **env}
    return subprocess.run([sys.executable, "-m", "m2das.cluster.requeue", "decide", "--run", str(run), *map(str, args)],
                          capture_output=True, text=True, env=base, cwd=REPO)


def test_cli_decides_records_once_and_reads_only_its_own_start(tmp_path):
    rows = [{"event": "start", "job_id": "77", "restart_count": 0}, {"event": "stopped"}]
    (tmp_path / runfolder.RESTARTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Restart 1 died before recording its start: restart 0's "stopped" does not make exit 1 resumable.
    out = cli(tmp_path, 1)
    assert out.stdout.strip() == FAILED, out.stderr
    rows.append({"event": "start", "job_id": "77", "restart_count": 1})
    rows.append({"event": "stopped"})
    (tmp_path / runfolder.RESTARTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli(tmp_path, 143, "--max-requeues", "")
    assert out.stdout.strip() == REQUEUE and "requeued" in out.stderr
    assert cli(tmp_path, 143, "--once").stdout.strip() == "decided"  # this start already has its decision
    log = [json.loads(x) for x in (tmp_path / runfolder.LAUNCHER).read_text().splitlines()]
    assert [r["event"] for r in log] == [FAILED, REQUEUE] and log[-1]["start_id"] == "77.1"
    assert cli(tmp_path, 75, "--max-requeues", "1", SLURM_RESTART_COUNT="2").stdout.strip() == CAP
    assert cli(tmp_path, 75, "--max-requeues", "x").returncode == runfolder.EXIT_BAD_INPUT


def test_templates_are_held_to_the_policy():
    """Signal and lead time as declared; the shell asks the policy and keeps no rule of its own."""
    assert len(TEMPLATES) == 3
    for t in TEMPLATES:
        text = t.read_text()
        assert re.findall(r"^#SBATCH --signal=(.*)$", text, re.M) == [f"B:{requeue.SIGNAL}@{requeue.LEAD_S}"], t
        assert "m2das.cluster.requeue port" in text and "MASTER_PORT=$((" not in text, t
        assert "m2das_python()" in text and "m2das_run srun" in text, t
        assert "M2DAS_MAX_REQUEUES:-" not in text, t  # the default lives in m2das/cluster/requeue.py
    common = (SLURM / "m2das-common.sh").read_text()
    code = "\n".join(ln for ln in common.splitlines() if not ln.lstrip().startswith("#"))
    assert "m2das_python -m m2das.cluster.requeue decide" in code
    # No exit code compared in the shell: 0, 2, 3, 75, 137 are the policy's business.
    assert not re.search(r"-(eq|ne|ge|lt|gt)\s+\d|\"(75|137|3)\"", code), code
    assert f"--signal={requeue.SIGNAL}" not in common  # the forward handles any signal it is given


def test_submitit_route_uses_the_same_signal_and_lead(tmp_path):
    from submitit.slurm.slurm import SlurmJobEnvironment

    from m2das.cluster import plan

    assert SlurmJobEnvironment.USR_SIG == requeue.SIGNAL  # submitit requeues on this one
    assert plan.build_parser().parse_args([]).signal_delay == requeue.LEAD_S
    assert plan.build_parser().parse_args([]).max_requeues == requeue.MAX_REQUEUES
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "slurm", "--run-dir", str(tmp_path / "run"), "--dry-run"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"#SBATCH --signal={requeue.SIGNAL}@{requeue.LEAD_S}\n" in out.stdout
    assert "-m m2das.cluster.requeue decide --once --by sbatch-teardown" in out.stdout
    assert not (tmp_path / "run").exists()


def test_task_exit_codes_reach_the_decision(tmp_path):
    """srun says 143 after killing the slower task; the other task's own 2 makes it `failed`."""
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "0", "M2DAS_RUN": str(tmp_path)}
    for rank, code in ((0, 2), (1, 143)):
        subprocess.run([sys.executable, "-m", "m2das.cluster.requeue", "task-exit", str(code)], check=True, cwd=REPO,
                       env={**env, "SLURM_PROCID": str(rank)})
    assert requeue.task_exits(tmp_path, "9", 0) == [2, 143]
    assert requeue.task_exits(tmp_path, "9", 1) == []  # another start's
    out = cli(tmp_path, 143, SLURM_JOB_ID="9", SLURM_RESTART_COUNT="0")
    assert out.stdout.strip() == FAILED, out.stderr
