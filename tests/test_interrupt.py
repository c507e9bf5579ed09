"""Ctrl-C, a wrong --init_from file and a missing GPU, as users meet them: real processes and signals."""

import os
import signal
import subprocess
import time

import torch

from conftest import TINY_TRAIN, m2das_cmd, run_m2das
from m2das import EXIT_BAD_INPUT, EXIT_RESUMABLE
from m2das.fileio import read_jsonl
from m2das.model import create_model
from m2das.signals import EXIT_ABORTED
from test_train import wait_for_step


def tiny(data, run, *extra):
    return ["train", *TINY_TRAIN, "--data_path", data, "--output_dir", run, "--batch_size", "2", "--epochs", "1",
            "--save_freq", "1", *extra]


def start(data, run):
    # Its own process group, as a terminal's Ctrl-C reaches every process of the foreground job.
    return subprocess.Popen(m2das_cmd(*tiny(data, run)), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_first_ctrl_c_saves_and_exits_75_and_the_rerun_resumes_there(lms_data, tmp_path):
    run = tmp_path / "run"
    proc = start(lms_data, run)
    wait_for_step(run, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "Ctrl-C (SIGINT) received: saved" in out and "rerun the same command to resume" in out
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["step"] >= 3
    assert [r["event"] for r in read_jsonl(run / "restarts.jsonl")][-1] == "stopped"

    r = run_m2das(*tiny(lms_data, run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {run / 'last.pth'} at step {state['step']}" in r.stdout
    start_row = [row for row in read_jsonl(run / "restarts.jsonl") if row["event"] == "start"][-1]
    assert start_row["last_stop_reason"] == "signal SIGINT" and start_row["resumed_step"] == state["step"]


def test_a_second_ctrl_c_aborts_at_once_with_130(lms_data, tmp_path):
    run = tmp_path / "run"
    proc = start(lms_data, run)
    # config.json is written once the handlers are in place; seconds of start-up (statistics, model,
    # TensorBoard) follow before the first step could save, so both presses land before any save.
    deadline = time.time() + 120
    while not (run / "config.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    # The second press once the first is taken (two pending signals would merge into one), long
    # before the first step boundary could save.
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Ctrl-C: saving at the next step"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == EXIT_ABORTED == 130, out
    assert "second Ctrl-C" in out and "Traceback" not in out
    assert "stopped" not in [r["event"] for r in read_jsonl(run / "restarts.jsonl")] and not (run / "last.pth").exists()


def test_init_from_a_checkpoint_of_another_model_size_is_refused(lms_data, tmp_path):
    weights = tmp_path / "tiny.pth"
    model = create_model("m2d_as_vit_tiny", input_size=[80, 208], num_classes=4)
    torch.save({"model": model.state_dict(), "args": {"model": "m2d_as_vit_tiny", "input_size": [80, 208],
                                                      "patch_size": [16, 16]}}, weights)
    run = tmp_path / "run"
    r = run_m2das(*tiny(lms_data, run, "--model", "m2d_as_vit_base", "--init_from", weights))
    assert r.returncode == EXIT_BAD_INPUT, r.stdout + r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "m2d_as_vit_tiny (a ViT encoder of width 64, depth 2" in err and "--model m2d_as_vit_base" in err
    assert not list(run.glob("*.pth")) and not (run / "log.jsonl").exists(), "nothing was trained"


def test_device_cuda_without_a_gpu_is_one_line_exit_2(lms_data, tmp_path):
    if torch.cuda.is_available():
        return  # the machine has a GPU: tests/test_cuda.py trains on it
    r = run_m2das(*tiny(lms_data, tmp_path / "run", "--device", "gpu"))
    assert r.returncode == EXIT_BAD_INPUT and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "m2das train: error: --device cuda but no CUDA device is visible; use --device cpu"
