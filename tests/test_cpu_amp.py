"""Mixed precision on the CPU: `--device cpu --bf16` trains under bf16 autocast and resumes exactly."""

import torch

from conftest import TINY_TRAIN, run_m2das
from m2das import EXIT_RESUMABLE
from m2das.fileio import read_jsonl
from test_train import assert_same_weights, final_model


def bf16_args(data, run):
    return ["train", *TINY_TRAIN, "--data_path", data, "--output_dir", run, "--batch_size", "2", "--epochs", "1",
            "--save_freq", "1", "--device", "cpu", "--bf16", "--lr", "1e-3", "--warmup_epochs", "0.5",
            "--log_every", "4"]


def test_cpu_bf16_run_learns_and_resumes_bit_identically(lms_data, tmp_path):
    reference = tmp_path / "reference"
    r = run_m2das(*bf16_args(lms_data, reference))
    assert r.returncode == 0, r.stdout + r.stderr
    losses = [row["loss"] for row in read_jsonl(reference / "log.jsonl")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, f"the loss did not fall: {losses}"

    run = tmp_path / "interrupted"
    r = run_m2das(*bf16_args(lms_data, run), env={"M2DAS_TEST_SIGTERM_AT_STEP": "10"})
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    assert torch.load(run / "last.pth", weights_only=True)["step"] == 10
    r = run_m2das(*bf16_args(lms_data, run))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    assert_same_weights(final_model(reference, 1), final_model(run, 1))
    # Every log line but the one averaging across the restart (steps 11-12 only) is the reference's.
    resumed = {row["step"]: row["loss"] for row in read_jsonl(run / "log.jsonl") if row["step"] != 12}
    assert resumed == {row["step"]: row["loss"] for row in read_jsonl(reference / "log.jsonl") if row["step"] != 12}
