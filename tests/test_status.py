"""`m2das status RUN`: progress, checkpoint age, speed, restarts and ETA from a run folder's files."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from m2das.cluster import status

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(tmp_path, now, finished=False):
    """A run folder as the trainer and the launcher leave it after one requeue."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 10, "world_size": 4, "model": "m2d_as_vit_base"}))
    # 100 steps per epoch, one log line every 10 steps, 2 steps/s, 50 samples/s on rank 0.
    t_start2 = now - 100
    logs = [{"time": now - 500 + 5 * i, "epoch": i // 10, "step": 10 * (i + 1), "total_steps": 1000,
             "loss": 2.0, "samples_per_s": 40.0} for i in range(40)]          # first start, up to step 400
    logs += [{"time": t_start2 + 5 * (i + 1), "epoch": 3 + i // 10, "step": 310 + 10 * (i + 1),
              "total_steps": 1000, "loss": 1.5, "samples_per_s": 50.0} for i in range(19)]  # to step 500
    write_jsonl(run / "log.jsonl", logs)
    rows = [{"event": "start", "time": now - 510, "host": "n1", "job_id": "77", "restart_count": None,
             "resumed_from": None, "resumed_step": 0, "last_stop_reason": None},
            {"event": "start", "time": t_start2, "host": "n2", "job_id": "77", "restart_count": "1",
             "resumed_from": str(run / "last.pth"), "resumed_step": 310,
             "last_stop_reason": "killed without warning (no clean stop recorded)"}]
    if finished:
        rows.append({"event": "finished", "time": now, "step": 1000})
    write_jsonl(run / "restarts.jsonl", rows)
    write_jsonl(run / "launcher.jsonl", [
        {"event": "submit", "time": "2026-01-01T00:00:00+00:00", "cluster": "slurm", "job_id": "77", "preset": "48gb"},
        {"event": "requeue", "by": "sbatch-teardown", "job_id": "77", "restart_count": 0, "reason": "SIGKILL"}])
    for name, age in (("last.pth", 120), ("checkpoint-3.pth", 300)):
        p = run / name
        p.write_bytes(b"x" * 2048)
        os.utime(p, (now - age, now - age))
    (run / "log.jsonl").open("a").write('{"time": 1, "step"')  # a torn last line (killed mid-write)
    return run


def test_collect_progress_speed_eta_and_restarts(tmp_path):
    now = time.time()
    s = status.collect(make_run(tmp_path, now), now=now)
    assert (s["epoch"], s["step"], s["total_steps"]) == (4, 500, 1000)
    # Speed from the current start only (the first start ran at 40/s).
    assert s["samples_per_s_rank0"] == 50.0 and s["samples_per_s"] == 200.0
    assert abs(s["steps_per_s"] - 2.0) < 1e-6
    assert abs(s["eta_s"] - 250.0) < 1e-3
    assert s["checkpoints"][0]["name"] == "last.pth" and abs(s["checkpoints"][0]["age_s"] - 120) < 1
    assert [st["restart_count"] for st in s["starts"]] == [None, "1"]
    assert s["job_ids"] == ["77"] and s["requeues"][0]["by"] == "sbatch-teardown"
    assert not s["finished"]


def test_render_says_what_a_user_asks(tmp_path):
    now = time.time()
    text = status.render(status.collect(make_run(tmp_path, now), now=now), now=now)
    assert "epoch 5 of 10, step 500/1000 (50.0%)" in text
    assert "200.0 samples/s" in text
    assert "checkpoint last.pth, written 2m 0s ago" in text
    assert "2 (1 restarts)" in text and "resumed from last.pth at step 310" in text
    assert "ETA        4m 10s" in text


def test_finished_run(tmp_path):
    now = time.time()
    s = status.collect(make_run(tmp_path, now, finished=True), now=now)
    assert s["finished"] and s["state"] == "finished" and s["eta_s"] == 0


def test_cli_without_torch_and_errors(tmp_path):
    run = make_run(tmp_path, time.time())
    code = ("import sys; from m2das import cli; rc = cli.main(['status', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'status imported torch'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "progress   epoch 5 of 10" in out.stdout
    out = subprocess.run([sys.executable, "-m", "m2das", "status", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "is not a folder" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert status.main([str(empty)]) == 2
    out = subprocess.run([sys.executable, "-m", "m2das", "status", "--json", str(run)], capture_output=True,
                         text=True, cwd=REPO)
    assert json.loads(out.stdout)["step"] == 500


def test_crashed_run_shows_the_last_error_line(tmp_path):
    run = make_run(tmp_path, time.time())
    logs = run / "logs"
    logs.mkdir()
    (logs / "rank0.log").write_text("[m2das 10:00:00] epoch 1 step 3/48 loss 2.1\n"
                                    "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                    "RuntimeError: CUDA error: an illegal memory access was encountered\n")
    (logs / "rank1.log").write_text("[m2das 10:00:00] fine\n")
    with open(run / "launcher.jsonl", "a") as f:
        f.write(json.dumps({"event": "failed", "by": "supervisor", "job_id": "local-1", "restart_count": 0}) + "\n")
    text = status.render(status.collect(run))
    assert "error      RuntimeError: CUDA error: an illegal memory access" in text and "rank0.log" in text


def test_a_start_requeued_before_it_was_recorded_is_counted(tmp_path):
    now = time.time()
    run = make_run(tmp_path, now)
    with open(run / "launcher.jsonl", "a") as f:  # restart 2 was requeued before its start record
        f.write(json.dumps({"event": "requeue", "by": "submitit", "job_id": "77", "restart_count": 2}) + "\n")
    s = status.collect(run, now=now)
    assert s["unrecorded_starts"] == 1
    assert "and 1 start(s) requeued before the trainer recorded them" in status.render(s, now=now)


def test_piped_into_head_exits_cleanly(tmp_path):
    run = make_run(tmp_path, time.time())
    out = subprocess.run(f"{sys.executable} -m m2das status {run} | head -n 1", shell=True, capture_output=True,
                         text=True, cwd=REPO)
    assert out.stdout.startswith("run ") and out.stderr == "", out.stderr


def m2das_status(*args, env=None):
    return subprocess.run([sys.executable, "-m", "m2das", "status", "--no-queue", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})})


def test_a_finished_run_shows_its_last_step_and_a_resubmit_says_the_previous_one_finished(tmp_path):
    """Log lines come every --log_every steps (the last one at 10 of 12); a finished run still shows
    12/12, and running the same command again records that the previous start finished."""
    from conftest import TINY_TRAIN, run_m2das, write_lms_folder

    data = write_lms_folder(tmp_path / "data", n_files=24)
    run = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--log_every", "5", "--data_path", data, "--output_dir", run,
            "--batch_size", "2", "--epochs", "1"]
    for _ in range(2):
        r = run_m2das(*argv)
        assert r.returncode == 0, r.stderr
    assert [row["step"] for row in status.read_jsonl(run / "log.jsonl")][-1] == 10
    out = m2das_status(run)
    assert out.returncode == 0, out.stderr
    assert "progress   epoch 1 of 1, step 12/12 (100.0%)" in out.stdout, out.stdout
    assert "previous stop: finished" in out.stdout and "killed without warning" not in out.stdout, out.stdout
    s = json.loads(m2das_status("--json", run).stdout)
    assert s["state"] == "finished" and [st["last_stop_reason"] for st in s["starts"]] == [None, "finished"]


def test_a_launch_whose_ranks_all_exited_2_says_failed_and_why(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--preset", "cpu-test", "--cluster",
                          "local", "--foreground", "--run-dir", str(run), "--", "--data_path", str(tmp_path / "nowhere"),
                          "--epochs", "1"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr
    shown = m2das_status(run)
    assert shown.returncode == 0, shown.stderr
    assert "state      failed: exit 2 (bad input or run folder; not requeued)" in shown.stdout, shown.stdout
    assert "not started yet" not in shown.stdout
    error = next(ln for ln in shown.stdout.splitlines() if ln.startswith("error "))
    assert "m2das train: error:" in error and "nowhere" in error, shown.stdout


def test_a_run_folder_in_object_storage_shows_the_checkpoints_in_the_bucket(tmp_path, s3_server):
    import fsspec

    from m2das import remote

    fs = fsspec.filesystem("s3")
    bucket = f"m2das-status-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/runs/tiny"
    staging = tmp_path / "staging"
    now = time.time()
    made = make_run(tmp_path, now)  # its small files, as the trainer leaves them
    staging.mkdir()
    for name in ("config.json", "log.jsonl", "restarts.jsonl"):
        (staging / name).write_bytes((made / name).read_bytes())
    mirror = remote.RemoteRunFolder(url, staging)
    (staging / "checkpoint-1.pth").write_bytes(b"e" * 4096)
    mirror.publish_checkpoint(staging / "checkpoint-1.pth", 100)
    time.sleep(1.1)  # the store's times have whole seconds: last.pth is the newer one
    (staging / "last.pth").write_bytes(b"r" * 3000)
    mirror.publish_checkpoint(staging / "last.pth", 150)
    shown = m2das_status(url, env=s3_server)
    assert shown.returncode == 0, shown.stderr
    assert "checkpoint none yet" not in shown.stdout, shown.stdout
    line = next(ln for ln in shown.stdout.splitlines() if ln.startswith("checkpoint "))
    assert line.startswith("checkpoint last.pth, written ") and "(2.9 KB); 2 in the folder" in line, line
    s = json.loads(m2das_status("--json", url, env=s3_server).stdout)
    assert sorted((c["name"], c["bytes"]) for c in s["checkpoints"]) == [("checkpoint-1.pth", 4096),
                                                                         ("last.pth", 3000)]


def test_a_folder_of_runs_lists_them_one_line_each(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    now = time.time()
    make_run(runs, now).rename(runs / "first")
    make_run(runs, now, finished=True).rename(runs / "second")
    (runs / "not-a-run").mkdir()
    out = m2das_status(runs)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("first  running?") and "step 500/1000 (50.0%)" in lines[0]
    assert lines[1].startswith("second  finished") and "checkpoint last.pth" in lines[1], lines
    listed = json.loads(m2das_status("--json", runs).stdout)
    assert [Path(s["run_dir"]).name for s in listed] == ["first", "second"]
