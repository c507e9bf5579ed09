"""The CUDA path on a real GPU: mixed precision, exact resume, the fp16 overflow path, prepare's GPU LMS.

Skipped, with the reason, where no CUDA device is visible (CI is CPU-only). On
a GPU machine: `python -m pytest -m cuda tests/test_cuda.py -v`, and keep the
log as bench/results/cuda-tests-<device>.log.
"""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY_TRAIN, run_m2das, write_lms_folder
from m2das import EXIT_RESUMABLE
from m2das.fileio import read_jsonl

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (CI is CPU-only)")]


def train_args(data, run, *extra):
    return ["train", *TINY_TRAIN, "--device", "cuda", "--data_path", data, "--output_dir", run,
            "--batch_size", "8", "--epochs", "3", "--save_freq", "1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_lms_folder(tmp_path_factory.mktemp("cuda") / "data", n_files=64)


def final(run, epoch=3):
    return torch.load(run / f"checkpoint-{epoch}.pth")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_run_has_finite_falling_loss(data, tmp_path, precision):
    run = tmp_path / precision
    r = run_m2das(*train_args(data, run, *(["--bf16"] if precision == "bf16" else [])))
    assert r.returncode == 0, r.stdout + r.stderr
    losses = [row["loss"] for row in read_jsonl(run / "log.jsonl") if "loss" in row]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    state = final(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if precision == "fp16":  # the overflow path: GradScaler skipped steps and lowered its scale
        assert state["scaler"]["scale"] < 65536.0, state["scaler"]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sigterm_mid_epoch_resumes_to_the_same_weights(data, tmp_path, precision):
    flags = ["--bf16"] if precision == "bf16" else []
    reference = tmp_path / "reference"
    assert run_m2das(*train_args(data, reference, *flags)).returncode == 0
    run = tmp_path / "interrupted"
    r = run_m2das(*train_args(data, run, *flags), env={"M2DAS_TEST_SIGTERM_AT_STEP": "13"})
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    r = run_m2das(*train_args(data, run, *flags))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    a, b = final(reference)["model"], final(run)["model"]
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"{precision}: largest difference after resume {worst:.3g}")
    assert worst == 0.0, f"resume is not bit-identical on CUDA ({precision}): largest difference {worst:.3g}"


def test_init_from_and_print_config_on_cuda(data, tmp_path):
    first = tmp_path / "first"
    assert run_m2das(*train_args(data, first, "--epochs", "1")).returncode == 0
    r = run_m2das(*train_args(data, tmp_path / "second", "--epochs", "1", "--init_from", first / "checkpoint-1.pth"))
    assert r.returncode == 0 and "--init_from" in r.stdout, r.stdout + r.stderr
    r = run_m2das(*train_args(data, tmp_path / "third", "--print_config"))
    assert r.returncode == 0 and json.loads(r.stdout)["device"] == "cuda", r.stderr


def test_prepare_on_the_gpu_gives_the_cpu_lms(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i, (rate, channels) in enumerate([(16000, 1), (44100, 2), (48000, 1), (22050, 2)]):
        t = np.arange(int(3.3 * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t)[:, None] + 0.05 * rng.standard_normal((len(t), channels))
        sf.write(str(audio / f"clip{i}.wav"), tone.astype(np.float32), rate)
    outputs = {}
    for device in ("cpu", "cuda"):
        data = tmp_path / device
        r = run_m2das("prepare", audio, data, "--device", device, "--steps", "lms", "--no-progress", "--workers", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        outputs[device] = {p.name: np.load(p) for p in sorted(data.rglob("*.npy"))}
    assert outputs["cpu"].keys() == outputs["cuda"].keys() and len(outputs["cpu"]) == 4
    for name, cpu in outputs["cpu"].items():
        gpu = outputs["cuda"][name]
        loud = cpu > np.log(1e-4)
        assert np.abs(gpu - cpu)[loud].max() <= 1e-3 and np.abs(gpu - cpu).mean() <= 1e-4, name
