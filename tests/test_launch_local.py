"""`launch/submit.py --cluster local`: the detached supervisor reruns the ranks after a
preemption signal, a stop signal to the trainer, and a SIGKILL, and the run ends with
the weights of an uninterrupted run."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_fixture import (REPO, TINY_EPOCHS, assert_same_weights, load_model_tensors, make_env,  # noqa: F401
                           read_jsonl, reference_weights, starts, tiny_data, user_trainer_flags, wait_for,
                           wait_for_progress)

from m2das.cluster import plan, requeue  # noqa: E402
from m2das.runfolder import EXIT_RESUMABLE  # noqa: E402


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children(pid):
    """Live child pids of `pid` (the supervisor's rank processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return sorted(out)


def submit_local(run, data, *extra):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test",
                          "--cluster", "local", "--run-dir", str(run), *extra, "--", *user_trainer_flags(data)],
                         env=make_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"job id:\s+local-(\d+)", out.stdout)
    assert m, out.stdout
    return int(m.group(1))


def logs(run):
    def text():
        parts = []
        for p in sorted((run / "logs").glob("*.log")):
            parts.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-25:]))
        return "\n".join(parts)
    return text


@pytest.fixture
def supervisors():
    """Supervisors started by a test; any still running at the end are stopped (by pid)."""
    pids = []
    yield pids
    for pid in pids:
        for child in children(pid):
            os.kill(child, signal.SIGKILL)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_local_supervisor_resumes_after_signals_and_kill(tiny_data, reference_weights, tmp_path, supervisors):
    run = tmp_path / "run"
    t0 = time.time()
    sup = submit_local(run, tiny_data)
    supervisors.append(sup)
    diag = logs(run)

    # 1. Preemption signal to the supervisor while the ranks are still starting (importing torch):
    #    they ignore it until the trainer's handlers are in, the supervisor repeats it, and
    #    the first start saves and exits 75 instead of dying from SIGUSR2 without a record.
    wait_for(lambda: len(children(sup)) == 2, 60, "the supervisor to start the ranks", diag)
    assert not starts(run), "ranks already past start-up; the signal would not test it"
    os.kill(sup, signal.SIGUSR2)
    wait_for(lambda: any(e.get("event") == "requeue" for e in read_jsonl(run / "launcher.jsonl")), 120,
             "the first start to stop", diag)
    first = [e for e in read_jsonl(run / "launcher.jsonl") if e.get("event") == "requeue"][0]
    assert first["exit_codes"] == [EXIT_RESUMABLE] * 2, first
    # 2. SIGTERM straight to the trainer processes (an outside agent): same.
    wait_for_progress(run, 2, 3, 240, diag)
    ranks = children(sup)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    # 3. SIGKILL to both ranks: nothing saved, rerun from the newest checkpoint.
    wait_for_progress(run, 3, 3, 240, diag)
    ranks = children(sup)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)

    wait_for(lambda: not _alive(sup), 300, "the supervisor to finish", diag)
    print(f"local run with 3 interruptions finished in {time.time() - t0:.0f}s")
    events = read_jsonl(run / "launcher.jsonl")
    assert events[-1]["event"] == "finished", diag()
    assert [e.get("by") for e in events if e.get("event") == "requeue"] == ["supervisor"] * 3
    s = starts(run)
    assert len(s) == 4 and all(r.get("resumed_step", 0) > 0 for r in s[1:]), s
    assert "SIGUSR2" in s[1]["last_stop_reason"] and "SIGTERM" in s[2]["last_stop_reason"]
    assert "killed without warning" in s[3]["last_stop_reason"]
    assert_same_weights(load_model_tensors(run / f"checkpoint-{TINY_EPOCHS}.pth"), reference_weights)
    status = subprocess.run([sys.executable, "-m", "m2das", "status", str(run)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert "starts     4 (3 restarts)" in status.stdout and "requeues   supervisor: 3" in status.stdout, \
        status.stdout


@pytest.mark.slow
def test_local_stop_request_and_restart_cap(tiny_data, tmp_path, supervisors):
    """SIGTERM to the supervisor stops without a rerun; a kill past --max-requeues is not rerun."""
    run = tmp_path / "run"
    sup = submit_local(run, tiny_data, "--max-requeues", "0")
    supervisors.append(sup)
    diag = logs(run)
    wait_for_progress(run, 1, 9, 240, diag)  # past the first epoch checkpoint (8 steps per epoch)
    ranks = children(sup)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(sup), 60, "the supervisor to give up", diag)
    events = read_jsonl(run / "launcher.jsonl")
    assert events[-1]["event"] == "requeue_cap" and "--max-requeues 0" in events[-1]["message"], events[-1]
    assert len(starts(run)) == 1

    sup = submit_local(run, tiny_data)  # same folder: resumes
    supervisors.append(sup)
    wait_for_progress(run, 2, 2, 240, diag)
    os.kill(sup, signal.SIGTERM)
    wait_for(lambda: not _alive(sup), 90, "the supervisor to stop", diag)
    events = read_jsonl(run / "launcher.jsonl")
    assert events[-1]["event"] == "stopped", events[-1]
    assert read_jsonl(run / "restarts.jsonl")[-1]["event"] == "stopped"
    assert len(starts(run)) == 2 and starts(run)[1]["resumed_step"] >= 8


@pytest.mark.slow
def test_foreground_stop_then_rerun_finishes_exactly(tiny_data, reference_weights, tmp_path, supervisors):
    """--foreground (a container's entry point): the launcher is the supervisor; SIGTERM to it
    (docker stop) saves and exits 75 without a rerun, and the same command again finishes."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster", "local",
           "--foreground", "--run-dir", str(run), "--", *user_trainer_flags(tiny_data)]
    diag = logs(run)
    t0 = time.time()
    with open(tmp_path / "launcher.out", "wb") as out:
        proc = subprocess.Popen(cmd, env=make_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    supervisors.append(proc.pid)
    wait_for_progress(run, 1, 3, 240, diag)
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == EXIT_RESUMABLE, diag()
    assert not [p for p in ranks if _alive(p)], "ranks outlived the foreground launcher"
    shown = (tmp_path / "launcher.out").read_text()
    # The stop saves last.pth, or the epoch checkpoint when it lands on an epoch's last step.
    saved = re.search(r"received: saved (\S+) at step", shown)
    assert saved and Path(saved.group(1)).name in ("last.pth", "checkpoint-1.pth"), shown[-3000:]
    assert Path(saved.group(1)).exists()
    events = read_jsonl(run / "launcher.jsonl")
    assert events[-1]["event"] == "stopped" and events[-1]["job_id"] == f"local-{proc.pid}", events[-1]
    assert "on request" in (run / "logs" / "supervisor.log").read_text()  # same log file as detached
    assert "on request" in shown  # and on stdout (docker logs)
    assert re.search(r"\] epoch 1 step 3/\d+ loss", shown), shown[-3000:]  # rank 0's progress too

    again = subprocess.run(cmd, env=make_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stdout[-3000:] + diag()
    print(f"foreground stop and rerun finished in {time.time() - t0:.0f}s")
    s = starts(run)
    assert len(s) == 2 and s[1]["resumed_step"] >= 3 and "SIGTERM" in s[1]["last_stop_reason"], s
    assert read_jsonl(run / "launcher.jsonl")[-1]["event"] == "finished"
    assert_same_weights(load_model_tensors(run / f"checkpoint-{TINY_EPOCHS}.pth"), reference_weights)


def test_foreground_and_srun_args_belong_to_their_cluster(tmp_path):
    for flags in (["--cluster", "slurm", "--foreground"], ["--cluster", "local", "--srun-args=--label"]):
        out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", *flags,
                              "--run-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and flags[-1].split("=")[0] in out.stderr, \
            out.stderr
    assert not (tmp_path / "logs").exists()  # refused before anything was written


def test_argument_rule_and_batch_split():
    """Launcher flags first; `--` or the first unknown flag starts the trainer's, which win."""
    assert plan.split_argv(["--preset", "24gb", "--", "--epochs", "100"]) == (["--preset", "24gb"],
                                                                              ["--epochs", "100"])
    assert plan.split_argv(["--preset", "24gb", "--nodes", "2", "--epochs", "100", "--bf16"]) == (
        ["--preset", "24gb", "--nodes", "2"], ["--epochs", "100", "--bf16"])
    # --nodes keeps the effective batch 2048: 24gb on 8 GPUs drops accumulation, 48gb halves the per-GPU batch.
    assert plan.scale_batch(256, 2, 4, 8)[:2] == (256, 1)
    assert plan.scale_batch(512, 1, 4, 8)[:2] == (256, 1)
    assert plan.scale_batch(512, 1, 4, 2)[:2] == (512, 2)  # fewer GPUs: accumulate instead
    with pytest.raises(plan.UsageError, match="cannot be split evenly over 12"):
        plan.scale_batch(512, 1, 4, 12)
    args = plan.build_parser().parse_args(["--preset", "48gb", "--nodes", "2", "--run-dir", "/tmp/r"])
    job = plan.Plan(args, ["--epochs", "100", "--output_dir", "/tmp/r"])
    assert job.world_size == 8 and job.train_argv[-2:] == ["--output_dir", "/tmp/r"]
    assert job.train_argv[job.train_argv.index("--batch_size") + 1] == "256"
    assert job.train_argv.index("--epochs") > job.train_argv.index("--batch_size")  # user flags come last
    assert [plan.parse_time_minutes(t) for t in ("90", "2:00:00", "1-00:00:00", "00:30")] == [90, 120, 1440, 1]


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "48gb", "--nodes", "3",
                          "--dry-run", "--run-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--nodes" in out.stderr, out.stderr


def test_sbatch_templates_are_shellcheck_clean():
    import shutil

    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: apt-get install -y shellcheck")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 4, scripts
    out = subprocess.run([shellcheck, "--external-sources", "--shell=bash", *scripts], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
def test_debug_cluster_trains_in_process(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "debug", "--run-dir", str(run), "--", "--data_path", str(tiny_data), "--epochs", "1"],
                         env=make_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # One rank instead of two: the per-rank batch is kept and accumulation doubles it back to 8.
    assert "accum_iter 1 -> 2" in out.stdout
    assert (run / "checkpoint-1.pth").exists()


@pytest.mark.slow
def test_a_finished_run_is_refused_and_run_dir_alone_resumes_its_preset(tiny_data, tmp_path):
    """The printed "--run-dir RUN" hint, typed as printed, reuses the recorded preset and trainer flags;
    a finished run is refused at submit time instead of queued to print "all epochs done"."""
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "local", "--foreground", "--run-dir", str(run), "--", *user_trainer_flags(tiny_data, 1)],
                         env=make_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert read_jsonl(run / "restarts.jsonl")[-1]["event"] == "finished"
    again = launcher("--cluster", "local", "--run-dir", run)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stdout + again.stderr
    assert "has finished all 1 epochs" in again.stderr and "--epochs above 1" in again.stderr
    assert "reusing --preset cpu-test and the flags of the submit" in again.stdout, again.stdout
    longer = launcher("--run-dir", run, "--dry-run", "--", "--epochs", "2")
    assert longer.returncode == 0, longer.stderr
    trainer = shlex.split(next(ln for ln in longer.stdout.splitlines() if ln.startswith("trainer: ")))[3:]
    assert trainer[trainer.index("--model") + 1] == "m2d_as_vit_tiny"  # the cpu-test preset, not 48gb
    assert trainer[trainer.index("--data_path") + 1] == str(tiny_data)  # the recorded trainer flags
    assert trainer[len(trainer) - 1 - trainer[::-1].index("--epochs") + 1] == "2"  # the new flag wins
    assert "the supervisor would run this spec" in longer.stdout  # --cluster local reused too
    assert "preset cpu-test: 2 ranks" in longer.stdout
    other = launcher("--preset", "48gb", "--run-dir", run, "--", "--epochs", "2")
    assert other.returncode == 2 and "was submitted with --preset cpu-test" in other.stderr, other.stderr


def test_a_gpu_preset_on_a_machine_without_gpus_is_refused_before_launching(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, whatever the machine has
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--cluster", "local", "--preset",
                          "48gb", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stdout + out.stderr
    assert "no GPU is visible" in out.stderr and "--preset cpu-test" in out.stderr
    assert "job id" not in out.stdout and not (tmp_path / "run" / "logs").exists()


def launcher(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("args, words", [
    (["--preset", "24gb", "--nodes", "2", "--epochs", "100", "--dry-run"], ["--dry-run is a launcher flag",
                                                                           "launcher flags go first"]),
    (["--preset", "cpu-test", "--", "--epochs", "1", "--partition", "gpu"], ["--partition is a launcher flag"]),
    (["--preset", "cpu-test", "--epochs", "1", "--no-such-flag", "3"], ["--no-such-flag: not a flag"]),
    (["--preset", "cpu-test", "--model", "m2d_as_vit_huge"], ["unknown model 'm2d_as_vit_huge'", "m2d_as_vit_base"]),
    (["--preset", "cpu-test", "--epochs", "x"], ["--epochs", "expected a whole number, got 'x'"]),
    (["--preset", "cpu-test", "--job-name", "a\nb"], ["control characters"]),
    (["--preset", "cpu-test", "--", "--data_path", "d\te"], ["control characters"]),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, args, words):
    for cluster in ("local", "slurm"):
        out = launcher("--cluster", cluster, "--run-dir", tmp_path / "run", *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert all(w in out.stderr for w in words), out.stderr
    assert not (tmp_path / "run").exists()


def test_hyphens_and_underscores_help_and_dry_run(tmp_path):
    out = launcher("--preset", "cpu-test", "--cluster", "local", "--run_dir", tmp_path / "run", "--max_requeues", "4",
                   "--dry_run", "--", "--batch-size", "2", "--log-every", "5")
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout.split("# the supervisor would run this spec:\n", 1)[1])
    assert spec["max_restarts"] == 4 and spec["run_dir"] == str(tmp_path / "run")
    assert spec["train_argv"][-6:] == ["--batch-size", "2", "--log-every", "5", "--output_dir", str(tmp_path / "run")]
    assert "batch flags given: not rescaled" in out.stdout  # --batch-size counts as --batch_size
    text = launcher("--help").stdout
    for words in ("(default: 48gb)", f"(default: {requeue.LEAD_S})", "exit codes: 0 ", "2 bad input",
                  "3 diverged", "75 stopped"):
        assert words in " ".join(text.split()), words
    # The printed trainer command is quoted: what the shell reads back is what runs.
    out = launcher("--preset", "cpu-test", "--cluster", "debug", "--run-dir", tmp_path / "a b", "--dry-run")
    cmd = next(ln for ln in out.stdout.splitlines() if ln.startswith("m2das train "))
    assert shlex.split(cmd)[-1] == str(tmp_path / "a b")


def test_a_run_folder_held_by_a_live_trainer_is_refused(tmp_path):
    from m2das.runfolder import RunLock

    run = tmp_path / "run"
    with RunLock(run):  # held by this (live) process
        out = launcher("--preset", "cpu-test", "--cluster", "local", "--run-dir", run)
    assert out.returncode == 2 and "in use by a live trainer" in out.stderr and out.stderr.count("\n") == 1
    assert not (run / "logs").exists()


@pytest.mark.slow
def test_bad_input_in_a_rank_is_not_rerun_and_status_shows_why(tiny_data, tmp_path):
    """Exit 2 from the ranks (here: the run folder was started with another configuration)
    ends the supervisor at once with 2; `m2das status` shows the error line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "m2d_as_vit_base", "epochs": 300}))
    (run / "last.pth").write_bytes(b"saved")  # it got as far as a checkpoint, so its configuration stands
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "local", "--foreground", "--run-dir", str(run), "--", *user_trainer_flags(tiny_data)],
                         env=make_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr
    events = [e for e in read_jsonl(run / "launcher.jsonl") if e.get("by") == "supervisor"]
    assert [(e["event"], e["exit_codes"]) for e in events] == [("failed", [2, 2])], events
    assert "m2das train: error:" in out.stdout  # rank 0's own line, on the launcher's stdout
    status = subprocess.run([sys.executable, "-m", "m2das", "status", str(run)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert re.search(r"^error      m2das train: error: .*another configuration", status.stdout, re.M), status.stdout
