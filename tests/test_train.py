"""The trainer as users run it: real processes, real signals, real files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY_TRAIN, m2das_cmd, run_m2das
from m2das import EXIT_DIVERGED, EXIT_RESUMABLE
from m2das.fileio import read_jsonl

PAPER = ["--input_size", "80x608", "--patch_size", "16x16", "--epochs", "300", "--batch_size", "512",
         "--accum_iter", "1", "--save_freq", "50", "--seed", "3", "--loss_off", "1."]


def final_model(run_dir, epoch):
    return torch.load(run_dir / f"checkpoint-{epoch}.pth", map_location="cpu")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"trainer exited early: {proc.communicate()}"
        # read_jsonl skips a line the trainer is still writing
        if any(row["step"] >= step for row in read_jsonl(run_dir / "log.jsonl")):
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def test_print_config_for_the_paper_command_line(tmp_path):
    r = run_m2das("train", *PAPER, "--data_path", tmp_path / "nowhere", "--print_config",
                  env={"WORLD_SIZE": "4"})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["effective_batch_size"] == 2048 and cfg["world_size"] == 4
    assert cfg["abs_lr"] == pytest.approx(3e-4 * 2048 / 256)
    assert cfg["epochs"] == 300 and cfg["seed"] == 3 and cfg["loss_off"] == 1.0
    assert cfg["list_found"] is False and not (tmp_path / "nowhere").exists()
    assert cfg["output_dir"].split("/")[-1].startswith("m2d_as_vit_base-80x608p16x16p16k-")
    # 24 GB variant: 256 x accum 2 on 4 GPUs is the same effective batch.
    r = run_m2das("train", *PAPER, "--batch_size", "256", "--accum_iter", "2", "--print_config",
                  env={"WORLD_SIZE": "4"})
    assert json.loads(r.stdout)["abs_lr"] == pytest.approx(2.4e-3)


def test_print_config_counts_steps_from_the_list(lms_data):
    r = run_m2das("train", "--data_path", lms_data, "--batch_size", "8", "--accum_iter", "2", "--epochs", "10",
                  "--print_config", env={"WORLD_SIZE": "1"})
    cfg = json.loads(r.stdout)
    assert cfg["num_files"] == 48 and cfg["batches_per_epoch"] == 6
    assert cfg["steps_per_epoch"] == 3 and cfg["total_steps"] == 30


def train_args(data, run_dir, *extra):
    return ["train", *TINY_TRAIN, "--data_path", data, "--output_dir", run_dir, "--batch_size", "2",
            "--epochs", "2", "--save_freq", "1", *extra]


def test_sigterm_mid_epoch_then_resume_is_bit_identical(lms_data, tmp_path):
    reference = tmp_path / "reference"
    r = run_m2das(*train_args(lms_data, reference, "--num_workers", "1"))
    assert r.returncode == 0, r.stderr

    run = tmp_path / "interrupted"
    # Its own process group, signalled as a cluster does: the DataLoader worker gets it too.
    proc = subprocess.Popen(m2das_cmd(*train_args(lms_data, run, "--num_workers", "1")), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE, out
    state = torch.load(run / "last.pth", weights_only=True)
    assert 0 < state["batch_in_epoch"] < 24 and state["epoch"] == 0, "stopped mid-epoch"
    assert "SIGTERM received" in out and "rerun the same command to resume" in out

    r = run_m2das(*train_args(lms_data, run, "--num_workers", "1"))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {run / 'last.pth'} at step {state['step']} (epoch 1, batch {state['batch_in_epoch']})" \
        in r.stdout
    assert "checking" not in r.stdout, "the list is validated once per version, not at every restart"
    assert_same_weights(final_model(reference, 2), final_model(run, 2))
    starts = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    assert [s["event"] for s in starts] == ["start", "stopped", "start", "finished"]
    assert starts[2]["last_stop_reason"] == "signal SIGTERM" and starts[2]["resumed_step"] == state["step"]


def test_reference_checkpoint_format_and_logs(lms_data, tmp_path):
    run = tmp_path / "run"
    r = run_m2das(*train_args(lms_data, run))
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(run / "checkpoint-2.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["args"]["batch_size"] == 2
    assert torch.equal(ckpt["model"]["norm_stats"],
                       torch.tensor([ckpt["norm_stats"]["mean"], ckpt["norm_stats"]["std"]], dtype=torch.float32))
    assert (run / "checkpoint-1.pth").exists()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 48 and {"loss", "loss_online", "loss_offline", "lr", "tau", "samples_per_s"} <= set(rows[-1])
    assert list((run / "events").iterdir()), "TensorBoard events"
    assert "samples/s" in r.stdout


def test_restart_with_another_configuration_is_refused(lms_data, tmp_path):
    run = tmp_path / "run"
    assert run_m2das(*train_args(lms_data, run, "--epochs", "1")).returncode == 0
    r = run_m2das(*train_args(lms_data, run, "--epochs", "1", "--seed", "4"))
    assert r.returncode == 2 and "seed: 3 -> 4" in r.stderr and "--force_config" in r.stderr
    # The cures for divergence (LR, precision) are resume-safe changes when the folder is named.
    r = run_m2das(*train_args(lms_data, run, "--epochs", "1", "--blr", "1e-4"))
    assert r.returncode == 0 and "configuration changed on resume: blr: 0.0003 -> 0.0001" in r.stdout, r.stderr
    assert json.loads((run / "config.json").read_text())["blr"] == 1e-4


def test_a_non_finite_update_leaves_only_finite_checkpoints(lms_data, tmp_path):
    run = tmp_path / "run"
    # An absurd LR breaks the weights in one update, while that step's loss (computed before it) is finite.
    r = run_m2das(*train_args(lms_data, run, "--lr", "1e4", "--ckpt_interval_min", "0"))
    assert r.returncode == EXIT_DIVERGED, r.stdout + r.stderr
    assert "non-finite" in r.stdout and "Traceback" not in r.stderr
    for path in run.glob("*.pth"):
        state = torch.load(path)
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{path.name} holds non-finite tensors: {bad[:3]}"
    events = [json.loads(line)["event"] for line in (run / "restarts.jsonl").read_text().splitlines()]
    assert events[-1] == "diverged"


def test_two_process_gloo_run_stops_together_and_resumes_exactly(lms_data, tmp_path):
    def torchrun(run_dir, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "-m", "m2das", *map(str, train_args(lms_data, run_dir, "--epochs", "1", "--accum_iter", "2"))]

    reference = tmp_path / "reference"
    r = subprocess.run(torchrun(reference, 29731), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "effective batch 8" in r.stdout  # 2 per rank x accum 2 x 2 ranks

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(torchrun(run, 29732), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    state = torch.load(run / "last.pth", weights_only=True)
    assert 0 < state["batch_in_epoch"] < 12, out
    # torchrun says 1; the ranks' own records (75 each) make the documented decision "requeue".
    decide = subprocess.run([sys.executable, "-m", "m2das.cluster.requeue", "decide", "--run", str(run), "--torchrun",
                             str(proc.returncode)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != EXIT_RESUMABLE and decide.stdout.strip() == "requeue", \
        (proc.returncode, decide.stderr, out)
    r = subprocess.run(torchrun(run, 29733), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_weights(final_model(reference, 1), final_model(run, 1))


def test_init_from_loads_matching_weights_and_starts_a_fresh_schedule(lms_data, tmp_path):
    first = tmp_path / "first"
    assert run_m2das(*train_args(lms_data, first, "--epochs", "1")).returncode == 0
    r = run_m2das(*train_args(lms_data, tmp_path / "second", "--epochs", "1", "--init_from",
                              first / "checkpoint-1.pth"))
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stdout and "resumed" not in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "second" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1


def test_sigkill_without_warning_resumes_from_the_interval_checkpoint(lms_data, tmp_path):
    reference = tmp_path / "reference"
    assert run_m2das(*train_args(lms_data, reference, "--epochs", "1")).returncode == 0
    run = tmp_path / "killed"
    # An interval of 0 minutes saves at every step (in a background thread): the node-failure path.
    args = train_args(lms_data, run, "--epochs", "1", "--ckpt_interval_min", "0")
    proc = subprocess.Popen(m2das_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run, 8, proc)
    proc.kill()
    proc.wait()
    r = run_m2das(*args)
    assert r.returncode == 0, r.stderr
    resumed = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()][-2]
    assert resumed["resumed_step"] >= 1 and resumed["last_stop_reason"].startswith("killed without warning")
    assert_same_weights(final_model(reference, 1), final_model(run, 1))
