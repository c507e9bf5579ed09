import json
import re

import pytest
import torch

from conftest import run_m2das
from m2das.data.dataset import DataListError
from m2das.model import create_model


def test_bench_train_reports_throughput_flops_and_mfu(tmp_path):
    out = tmp_path / "result.json"
    r = run_m2das("bench", "train", "--model", "m2d_as_vit_tiny", "--input_size", "80x208", "--batch_size", "2",
                  "--steps", "2", "--warmup", "1", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "machine:" in r.stdout and "samples/s" in r.stdout and "TFLOP/s" in r.stdout
    assert "EMA update: python loop" in r.stdout and "of a large matmul measured here" in r.stdout
    matmul = re.search(r"matmul measured here \(median ([0-9.]+) (GFLOP|TFLOP)/s, min ([0-9.]+) (GFLOP|TFLOP)/s "
                       r"over 3 measurements", r.stdout)
    assert matmul and float(matmul[1]) > 0 and float(matmul[3]) > 0, r.stdout  # never "0.0 TFLOP/s"
    result = json.loads(out.read_text())
    # Measured between the timed windows (ceiling, step, ceiling, step, ceiling): min <= median.
    assert len(result["matmul_tflops_all"]) == 3 and result["matmul_tflops_min"] == min(result["matmul_tflops_all"])
    assert 0 < result["matmul_tflops_min"] <= result["matmul_tflops"] <= max(result["matmul_tflops_all"])
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


def test_bench_checkpoint_compares_a_bare_save_the_synchronous_save_and_the_in_loop_stall(tmp_path):
    r = run_m2das("bench", "checkpoint", "--model", "m2d_as_vit_tiny", "--repeats", "1", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "full state:" in r.stdout and "machine:" in r.stdout
    for row in ("bare torch.save", "synchronous save (before)", "background save: in-loop stall", "stop's save",
                "finite check (before)", "finite check (now)", "CRC32 check (before)", "CRC32 check (now)"):
        assert f"  {row}" in r.stdout, row
    assert "x a bare torch.save" in r.stdout
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


def test_gpu_rate_comes_from_the_flop_count_and_the_target_mfu():
    from m2das.tools import bench

    with torch.device("meta"):
        flops = create_model("m2d_as_vit_base", num_classes=527).train_flops_per_sample()
    rate = bench.TARGET_MFU * bench.DENSE_BF16_PEAK_TFLOPS["H100 SXM"] * 1e12 / flops
    assert bench.GPU_SAMPLES_PER_S == bench.gpu_samples_per_s() == round(rate)  # not a number typed in


def test_bench_startup_measures_both_checks_on_real_files(tmp_path):
    """Each variant's measurement (what `m2das bench startup` runs in a process per variant), in-process."""
    from m2das.data.dataset import read_list
    from m2das.tools import bench_startup

    csv = bench_startup.write_rows(tmp_path, 1200)
    samples = read_list(csv, tmp_path)
    assert len(samples) == 1200 and all((tmp_path / name).stat().st_size == 128 + 80 * 4 * bench_startup.FRAMES
                                        for name in samples.files[::100])
    for variant in bench_startup.VARIANTS:
        r = bench_startup.child(variant, str(csv), str(tmp_path))
        assert r["peak_rss_mb"] > 0 and 0 < r["first_progress_s"] <= r["check_s"], (variant, r)
    (tmp_path / samples.files[-1]).unlink()  # the bounded check is the real validate: it finds a missing file
    with pytest.raises(DataListError, match="1 unusable entry"):
        bench_startup.child("bounded", str(csv), str(tmp_path))
