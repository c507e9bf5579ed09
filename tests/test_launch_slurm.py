"""`launch/submit.py --cluster slurm` and the sbatch templates on a real SLURM: preempted,
SIGKILLed, requeued by SLURM, a node lost; the job comes back by itself each time and
ends with the weights of an uninterrupted run.

The clusters (munged, slurmctld, one or two slurmd) are started by the fixtures in a
temp folder; without root, Debian's slurm-wlm and munge (and network namespaces for
two nodes) the tests are skipped with the reason.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_fixture import (LONG_EPOCHS, REPO, TINY_EPOCHS, assert_same_weights, job_task_pids,  # noqa: F401
                           load_model_tensors, make_env, read_jsonl, reference_weights, slurm_cluster,
                           slurm_two_nodes, starts, tiny_data, user_trainer_flags, wait_for, wait_for_progress)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def submit(cluster, run, data, *extra, epochs=TINY_EPOCHS):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test",
                          "--cluster", "slurm", "--run-dir", str(run), "--time", "10", *extra,
                          "--", *user_trainer_flags(data, epochs)],
                         env=dict(make_env(), SLURM_CONF=str(cluster.conf)), capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"job id:\s+(\d+)", out.stdout)
    assert m, out.stdout
    assert f"m2das status {run}" in out.stdout
    return m.group(1)


def test_an_unknown_partition_is_one_line_before_submitting(slurm_cluster, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test",
                          "--cluster", "slurm", "--run-dir", str(tmp_path / "run"), "--partition", "nosuch"],
                         env=dict(make_env(), SLURM_CONF=str(slurm_cluster.conf)), capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stdout + out.stderr
    assert "--partition nosuch" in out.stderr and "sinfo lists" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "launcher.jsonl").exists()


def test_a_job_sbatch_refuses_is_sbatchs_line_and_exit_2(slurm_cluster, tiny_data, tmp_path):
    """Memory no node has: the real sbatch refuses the job; its reason in one line, nothing queued."""
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test",
                          "--cluster", "slurm", "--run-dir", str(tmp_path / "run"), "--time", "10",
                          "--sbatch", "mem=99999999", "--", *user_trainer_flags(tiny_data, TINY_EPOCHS)],
                         env=dict(make_env(), SLURM_CONF=str(slurm_cluster.conf)), capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stdout + out.stderr
    assert "sbatch refused the job: " in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run" / "launcher.jsonl").exists()


def diagnostics(cluster, run, job):
    def text():
        parts = [f"job: {cluster.job(job)}"]
        for p in sorted((run / "slurm").glob(f"{job}_*_log.*")):
            parts.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-25:]))
        parts.append(cluster.logs())
        return "\n".join(parts)
    return text


def wait_requeued(cluster, job, restarts, timeout, diag):
    """The job is back in the queue (PENDING, waiting on its BeginTime) with `restarts` restarts."""
    def ok():
        j = cluster.job(job)
        return j.get("JobState") == "PENDING" and int(j.get("Restarts", -1)) == restarts
    wait_for(ok, timeout, f"job {job} to be requeued (restart {restarts})", diag)
    cluster.release(job)


def status_of(run, cluster):
    out = subprocess.run([sys.executable, "-m", "m2das", "status", str(run)], capture_output=True, text=True,
                         cwd=REPO, timeout=60, env=dict(make_env(), SLURM_CONF=str(cluster.conf)))
    assert out.returncode == 0, out.stderr
    return out.stdout


def kill_tasks(job, expected):
    pids = job_task_pids(job)
    assert len(pids) == expected, f"expected {expected} trainer tasks, got {pids}"
    subprocess.run(["kill", "-9", *map(str, pids)], check=True)


@pytest.fixture(scope="module")
def two_node_reference(slurm_two_nodes, tiny_data, tmp_path_factory):
    """Weights of an undisturbed two-node run of the same configuration (through slurm/m2das-venv.sbatch)."""
    from slurm_fixture import train_argv_for

    cluster, folder = slurm_two_nodes, tmp_path_factory.mktemp("two_node_reference")
    run = folder / "run"
    env = dict(make_env(), SLURM_CONF=str(cluster.conf), M2DAS_RUN=str(run), M2DAS_DATA=str(tiny_data),
               M2DAS_VENV=str(Path(sys.executable).parent.parent))
    job = cluster_run_env(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--time=10", f"--output={folder}/job-%j.out",
                           str(REPO / "slurm" / "m2das-venv.sbatch"), *train_argv_for(run, tiny_data, LONG_EPOCHS)],
                          env).strip().split(";")[0]
    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
             f"reference job {job}", lambda: (folder / f"job-{job}.out").read_text()[-3000:] + cluster.logs())
    assert cluster.job(job)["JobState"] == "COMPLETED", (folder / f"job-{job}.out").read_text()[-3000:]
    assert {r["host"] for r in starts(run)} == {"m2dasn1"} and len(starts(run)) == 1
    return load_model_tensors(run / f"checkpoint-{LONG_EPOCHS}.pth")


def test_two_nodes_preempted_killed_requeued_and_node_down_finish_exactly(slurm_two_nodes, tiny_data,
                                                                          two_node_reference, tmp_path):
    """One gloo rank on each of two hosts (own network namespace, name and address each).

    Four disturbances of one job, each caught by a different route of the one
    requeue policy or by SLURM itself; the weights are those of an undisturbed
    two-node run.
    """
    cluster, run = slurm_two_nodes, tmp_path / "run"
    t0 = time.time()
    job = submit(cluster, run, tiny_data, "--nodes", "2", "--gpus-per-node", "1", epochs=LONG_EPOCHS)
    diag = diagnostics(cluster, run, job)

    # 1. Preemption warning (USR2 to every task): the trainer saves, submitit's checkpoint() requeues.
    wait_for_progress(run, 1, 3, 240, diag)
    running = status_of(run, cluster)
    assert re.search(rf"queue      job {job} RUNNING on m2dasn\[1-2\], \S+ left", running), running
    cluster.run("scancel", "--signal=USR2", job)
    wait_for(lambda: cluster.job(job).get("JobState") == "PENDING", 90, "the requeue", diag)
    pending = status_of(run, cluster)
    assert re.search(rf"queue      job {job} PENDING \(\w+\)", pending), pending
    wait_requeued(cluster, job, 1, 90, diag)
    # 2. Killed without warning (SIGKILL to both tasks): the batch script's teardown requeues.
    wait_for_progress(run, 2, 3, 240, diag)
    kill_tasks(job, 2)
    wait_requeued(cluster, job, 2, 90, diag)
    # 3. SLURM requeues it itself (as on preemption with PreemptMode=REQUEUE): SIGTERM, then kill.
    wait_for_progress(run, 3, 3, 240, diag)
    cluster.run("scontrol", "requeue", job)
    wait_requeued(cluster, job, 3, 90, diag)
    # 4. The second node goes DOWN mid-run: SLURM kills the job and requeues it; once the node is
    #    back (RESUME) and the job released, it finishes.
    wait_for_progress(run, 4, 3, 240, diag)
    cluster.run("scontrol", "update", "NodeName=m2dasn2", "State=DOWN", "Reason=m2das-test")
    wait_requeued(cluster, job, 4, 120, diag)

    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
             f"job {job} to finish", diag)
    assert cluster.job(job)["JobState"] == "COMPLETED", diag()
    print(f"two-node SLURM run with 4 interruptions finished in {time.time() - t0:.0f}s")

    s = starts(run)
    assert [r.get("job_id") for r in s] == [job] * 5 and [r.get("restart_count") for r in s] == [0, 1, 2, 3, 4]
    assert {r.get("host") for r in s} <= {"m2dasn1", "m2dasn2"}, s
    assert all(r.get("resumed_step", 0) > 0 for r in s[1:]), s
    assert "SIGUSR2" in s[1]["last_stop_reason"] and "killed without warning" in s[2]["last_stop_reason"]
    # SLURM signals the surviving tasks of a failed node (SIGTERM): they may still save.
    assert "SIGTERM" in s[3]["last_stop_reason"] and s[4]["last_stop_reason"]
    assert "DUE TO NODE FAILURE" in (run / "slurm" / f"{job}_0_log.err").read_text()
    requeues = [r for r in read_jsonl(run / "launcher.jsonl") if r.get("event") == "requeue"]
    assert [r["by"] for r in requeues] == ["submitit", "sbatch-teardown"], requeues
    assert_same_weights(load_model_tensors(run / f"checkpoint-{LONG_EPOCHS}.pth"), two_node_reference)
    # Killed starts leave no step twice: not in log.jsonl, not in what TensorBoard shows.
    logged = [r["step"] for r in read_jsonl(run / "log.jsonl")]
    assert logged == list(range(1, logged[-1] + 1)), logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "events"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == logged
    done = status_of(run, cluster)
    assert "state      finished" in done and "5 (4 restarts)" in done, done


def test_sbatch_template_forwards_signal_and_requeues(slurm_cluster, tiny_data, reference_weights, tmp_path):
    """slurm/m2das-venv.sbatch without submitit, the policy asked through `python -m m2das.cluster.requeue`.

    USR2 to the batch shell (what --signal=B:USR2@120 delivers) while the tasks are
    still starting: they ignore it until the trainer's handlers are in, the shell
    repeats it, the trainer saves and exits 75, the script requeues itself. Then
    SIGKILL to the tasks (srun exits 137): requeued too."""
    from slurm_fixture import train_argv_for

    cluster, run = slurm_cluster, tmp_path / "run"
    venv = Path(sys.executable).parent.parent
    env = dict(make_env(), SLURM_CONF=str(cluster.conf), M2DAS_RUN=str(run), M2DAS_DATA=str(tiny_data),
               M2DAS_VENV=str(venv))
    # The template's GPU request replaced on the command line by the CPU layout of cpu-test.
    out = cluster_run_env(["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                           "--time=10", f"--output={tmp_path}/job-%j.out", str(REPO / "slurm" / "m2das-venv.sbatch"),
                           *train_argv_for(run, tiny_data)], env)
    job = out.strip().split(";")[0]
    log = tmp_path / f"job-{job}.out"

    def diag():
        return (log.read_text()[-4000:] if log.exists() else "no job output") + "\n" + cluster.logs()

    wait_for(lambda: len(job_task_pids(job)) == 2, 120, "the tasks to start", diag)
    assert not starts(run), "the trainer is past start-up; the signal would not test it"
    cluster.run("scancel", "--batch", "--signal=USR2", job)
    wait_requeued(cluster, job, 1, 90, diag)
    wait_for_progress(run, 2, 3, 240, diag)
    kill_tasks(job, 2)
    wait_requeued(cluster, job, 2, 90, diag)
    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
             f"job {job} to finish", diag)
    assert cluster.job(job)["JobState"] == "COMPLETED", diag()
    text = log.read_text()
    assert "received SIGUSR2" in text and text.count("requeueing job") == 2 and "training finished" in text, text
    s = starts(run)
    assert len(s) == 3 and "SIGUSR2" in s[1]["last_stop_reason"] and s[1]["resumed_step"] > 0, s
    assert "killed without warning" in s[2]["last_stop_reason"]
    decisions = [(r["by"], r["event"]) for r in read_jsonl(run / "launcher.jsonl")]
    assert decisions == [("sbatch-template", "requeue")] * 2 + [("sbatch-template", "finished")], decisions
    assert_same_weights(load_model_tensors(run / f"checkpoint-{TINY_EPOCHS}.pth"), reference_weights)


def cluster_run_env(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_requeue_cap_ends_the_job_with_a_message(slurm_cluster, tiny_data, tmp_path):
    """With --max-requeues 0 the preemption still saves, but the job is not requeued and says why."""
    cluster, run = slurm_cluster, tmp_path / "run"
    job = submit(cluster, run, tiny_data, "--max-requeues", "0")
    diag = diagnostics(cluster, run, job)
    wait_for_progress(run, 1, 1, 240, diag)
    cluster.run("scancel", "--signal=USR2", job)
    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 120,
             f"job {job} to end", diag)
    assert cluster.job(job)["Restarts"] == "0", diag()
    cap = [r for r in read_jsonl(run / "launcher.jsonl") if r.get("event") == "requeue_cap"]
    assert len(cap) == 1 and "--max-requeues 0" in cap[0]["message"], diag()
    assert "not requeued" in (run / "slurm" / f"{job}_0_log.err").read_text()
    from m2das.cluster.requeue import start_events

    stops = [r for r in start_events(run) if r.get("event") == "stopped"]
    assert stops, diag()  # the checkpoint was still written: last.pth, or checkpoint-E.pth when the stop
    # landed on an epoch's last step (that file is the save then)
    import torch

    from m2das import runfolder

    saved = [int(torch.load(p, map_location="cpu", weights_only=True)["step"])
             for p in runfolder.checkpoint_files(run)]
    assert stops[-1]["step"] in saved, (stops, saved)


def test_srun_args_reach_the_job_step(slurm_cluster, tiny_data, tmp_path):
    """--srun-args is handed to srun (pyxis' --container-image goes the same way): with
    srun's --label every line a task writes carries its task id. --dry-run printed the
    very script that was submitted."""
    cluster, run = slurm_cluster, tmp_path / "run"
    dry = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "slurm", "--run-dir", str(run), "--time", "10", "--srun-args=--label --kill-on-bad-exit=1",
                          "--dry-run", "--", *user_trainer_flags(tiny_data)], capture_output=True, text=True,
                         cwd=REPO, env=dict(make_env(), SLURM_CONF=str(cluster.conf)))
    assert dry.returncode == 0, dry.stderr
    job = submit(cluster, run, tiny_data, "--srun-args=--label --kill-on-bad-exit=1")
    diag = diagnostics(cluster, run, job)
    wait_for_progress(run, 1, 1, 240, diag)
    cluster.run("scancel", job)
    wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 120,
             f"job {job} to end", diag)
    for task in (0, 1):
        # stdout holds only what the task printed (srun's own messages go to stderr).
        lines = (run / "slurm" / f"{job}_{task}_log.out").read_text().splitlines()
        assert any("Starting with JobEnvironment" in ln for ln in lines), lines[:5]
        assert all(ln.startswith(f"{task}: ") for ln in lines), [ln for ln in lines if ln[:3] != f"{task}: "][:5]
    script = (run / "slurm" / f"{job}_submission.sh").read_text()
    assert "--kill-on-bad-exit=1 --label --kill-on-bad-exit=1" in script, script
    assert dry.stdout.split("_submission.sh):\n", 1)[1] == script + "\n"


def test_bad_flags_never_reach_the_queue(slurm_cluster, tiny_data, tmp_path):
    """Misplaced, unknown and control-character flags: exit 2 at submit time, no job in squeue."""
    cluster = slurm_cluster

    def jobs():
        return set(cluster.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())

    before = jobs()
    for bad in (["--", "--epochs", "1", "--partition", "debug"], ["--epochs", "1", "--dry-run"],
                ["--", "--epoch", "1"], ["--job-name", "two\nlines"], ["--partition", "debug\r"],
                ["--model", "m2d_as_vit_huge"]):
        out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test",
                              "--cluster", "slurm", "--run-dir", str(tmp_path / "run"), *bad],
                             env=dict(make_env(), SLURM_CONF=str(cluster.conf)), capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (bad, out.stderr)
    assert jobs() == before
    assert not (tmp_path / "run").exists()


def test_bad_input_in_a_task_is_never_requeued(slurm_cluster, tiny_data, tmp_path):
    """Both SLURM routes: the tasks exit 2 (the run folder was started with another
    configuration); srun, having killed the slower task, says 137 or 143, but each task's own
    code reaches the policy and the job is not requeued."""
    cluster = slurm_cluster
    runs = {}
    for route in ("submitit", "template"):
        run = runs[route] = tmp_path / route
        run.mkdir()
        (run / "config.json").write_text('{"model": "m2d_as_vit_base", "epochs": 300}')
        (run / "last.pth").write_bytes(b"saved")  # a checkpoint: its configuration stands
    job = submit(cluster, runs["submitit"], tiny_data)
    env = dict(make_env(), SLURM_CONF=str(cluster.conf), M2DAS_RUN=str(runs["template"]),
               M2DAS_DATA=str(tiny_data), M2DAS_VENV=str(Path(sys.executable).parent.parent))
    from slurm_fixture import train_argv_for

    tjob = cluster_run_env(["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                            "--time=10", f"--output={tmp_path}/job-%j.out", str(REPO / "slurm" / "m2das-venv.sbatch"),
                            *train_argv_for(runs["template"], tiny_data)], env).strip().split(";")[0]
    for j, run in ((job, runs["submitit"]), (tjob, runs["template"])):
        wait_for(lambda: cluster.job(j).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 180,
                 f"job {j} to end", diagnostics(cluster, run, j))
        assert cluster.job(j)["Restarts"] == "0"
        decisions = [r for r in read_jsonl(run / "launcher.jsonl") if r.get("start_id")]
        assert [r["event"] for r in decisions] == ["failed"] and 2 in decisions[0]["exit_codes"], decisions
    shown = status_of(runs["submitit"], cluster)  # the crash's own line, from the task logs
    assert re.search(r"^error      .*(another configuration|exit 2)", shown, re.M), shown
