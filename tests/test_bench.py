import json
import re

import torch

from conftest import run_m2das
from m2das.model import create_model


def test_bench_train_reports_throughput_flops_and_mfu(tmp_path):
    out = tmp_path / "result.json"
    r = run_m2das("bench", "train", "--model", "m2d_as_vit_tiny", "--input_size", "80x208", "--batch_size", "2",
                  "--steps", "2", "--warmup", "1", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "machine:" in r.stdout and "samples/s" in r.stdout and "TFLOP/s" in r.stdout
    assert "EMA update: python loop" in r.stdout and "of a large matmul measured here" in r.stdout
    matmul = re.search(r"matmul measured here \(([0-9.]+) (GFLOP|TFLOP)/s\)", r.stdout)
    assert matmul and float(matmul[1]) > 0, r.stdout  # a CPU's rate in GFLOP/s, never "0.0 TFLOP/s"
    result = json.loads(out.read_text())
    assert result["precision"] == "fp32" and result["batch_size"] == 2 and result["torch"] == torch.__version__
    assert 0 < result["mfu_of_matmul"] and result["samples_per_s"] > 0 and "mfu" in result


def test_flop_count_of_base_matches_a_hand_count():
    with __import__("torch").device("meta"):
        m = create_model("m2d_as_vit_base")
    f = m.flops_per_sample()
    # One ViT-B block on n tokens: 2 * n * 768^2 * 12 (qkv 3, proj 1, mlp 8) + 4 * n^2 * 768 (attention).
    block = lambda n, d=768: 2 * n * d * d * 12 + 4 * n * n * d  # noqa: E731
    assert f["target"] == 12 * block(1 + 133)
    assert f["online"] > 12 * block(1 + 57) + 8 * block(1 + 190, 512)
    assert m.train_flops_per_sample() == 3 * f["online"] + f["target"]


def test_unknown_benchmark_is_an_error():
    r = run_m2das("bench", "nope")
    assert r.returncode == 2 and "unknown benchmark" in r.stderr


def test_bench_checkpoint_reports_what_the_integrity_check_costs(tmp_path):
    r = run_m2das("bench", "checkpoint", "--model", "m2d_as_vit_tiny", "--repeats", "1", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "full state:" in r.stdout and "CRC32 check" in r.stdout and "GB/s" in r.stdout
    assert not list(tmp_path.iterdir()), "the benchmark cleans up its file"


def test_bench_data_compares_loose_and_packed_reads(tmp_path):
    r = run_m2das("bench", "data", "--files", "12", "--index-rows", "1000", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {" ".join(line.split()[:3]): line.split() for line in r.stdout.splitlines()
            if line.startswith(("loose", "packed"))}
    assert set(rows) == {f"{d} {c}" for d in ("loose .npy", "packed float32", "packed float16")
                         for c in ("cold", "warm")}
    assert "validation:" in r.stdout and "machine:" in r.stdout
    assert not list(tmp_path.iterdir()), "the benchmark cleans up its files"
