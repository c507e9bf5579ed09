"""The training monitor and its metrics: values on inputs worked out by hand, and a real run on LMS files."""

import json
import math
import time

import numpy as np
import pytest
import torch

from m2das.metrics import (average_precision, knn_accuracy, mean_average_precision, rankme, torch_knn_accuracy,
                           torch_knn_hits, torch_mean_average_precision, torch_rankme)
from m2das.monitor import Monitor, center_start, record

CLASSES = ["/m/a", "/m/b", "/m/c"]


def test_average_precision_on_hand_worked_examples():
    # ranks 1..4 hold +, -, +, -: precision at the two hits is 1/1 and 2/3.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    # a tie between a positive and a negative counts as one threshold: precision 1/2.
    assert average_precision([0.5, 0.5], [0, 1]) == 0.5
    assert average_precision([0.5, 0.5], [1, 0]) == 0.5
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.9, 0.5], [0.1, 0.2, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])  # class 2 has no positive: left out of the mean
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_rankme_on_known_spectra():
    assert rankme(np.eye(6)) == pytest.approx(6, rel=1e-5)
    assert rankme(np.outer(np.arange(1, 9), np.ones(4))) == pytest.approx(1, rel=1e-5)
    # singular values 3 and 1: p = (0.75, 0.25), effective rank exp(entropy).
    z = np.zeros((5, 3))
    z[0, 0], z[1, 1] = 3, 1
    p = np.array([0.75, 0.25])
    assert rankme(z) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    wide = np.random.default_rng(0).standard_normal((4, 50))  # fewer rows than columns: the smaller Gram
    assert rankme(wide) == pytest.approx(rankme(wide.T), rel=1e-9)


def test_knn_accuracy_on_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    labels = np.repeat(np.arange(3), 10)
    z = centres[labels] + rng.standard_normal((30, 3)) * 0.1
    onehot = np.eye(3)[labels]
    assert knn_accuracy(z, onehot, k=5) == 1.0
    assert knn_accuracy(z, np.eye(3)[np.roll(labels, 10)], k=5) == 1.0  # relabelled consistently
    assert knn_accuracy(z, np.eye(3)[rng.permutation(labels)], k=5) < 0.7  # labels unrelated to the clusters


def test_torch_twins_give_the_numpy_numbers_on_random_embeddings():
    """The device versions the monitor uses against the NumPy references, on random embeddings and scores."""
    rng = np.random.default_rng(1)
    n, dim, classes = 1200, 96, 40
    z = rng.standard_normal((n, dim)).astype(np.float32)
    targets = (rng.random((n, classes)) < 0.03).astype(np.float32)
    targets[np.arange(n), rng.integers(0, classes, n)] = 1
    targets[:, 7] = 0  # a class without positives stays out of the mean
    clustered = z + 6 * np.eye(classes, dim, dtype=np.float32)[targets.argmax(axis=1)]  # accuracy far from 0
    for emb in (z, clustered):
        assert torch_knn_accuracy(torch.from_numpy(emb), torch.from_numpy(targets), 10, block=500) == \
            knn_accuracy(emb, targets, 10)
    assert knn_accuracy(clustered, targets, 10) > 0.5
    # rows split as ranks split them: the hits add up to all rows' hits
    zt, tt = torch.from_numpy(clustered), torch.from_numpy(targets)
    shares = [int(torch_knn_hits(zt, tt, 10, torch.arange(r, n, 3))) for r in range(3)]
    assert sum(shares) == int(torch_knn_hits(zt, tt, 10)) == round(knn_accuracy(clustered, targets, 10) * n)
    for emb in (z, z[:50], clustered @ rng.standard_normal((dim, dim)).astype(np.float32) ** 3):
        assert torch_rankme(torch.from_numpy(emb)) == pytest.approx(rankme(emb.astype(np.float64)), rel=1e-9)
    scores = rng.random((n, classes)).astype(np.float32)
    scores[:, :10] = np.round(scores[:, :10], 1)  # ties between positives and negatives
    assert torch_mean_average_precision(torch.from_numpy(scores), tt, classes_per_chunk=16) == \
        pytest.approx(mean_average_precision(scores, targets), rel=1e-12)


def test_center_crop_is_fixed():
    assert center_start(1001, 608) == 196 and center_start(100, 608) == 0


def write_eval_folder(root, n=24, seed=0):
    """DATA/eval_lms/*.npy, two classes that differ in loudness, and files_as_eval.csv."""
    rng = np.random.default_rng(seed)
    (root / "eval_lms").mkdir(parents=True)
    rows = ["file_name,label"]
    for i in range(n):
        cls = i % 2
        lms = (rng.standard_normal((1, 80, int(rng.integers(150, 260)))) - 9 + 6 * cls).astype(np.float32)
        np.save(root / "eval_lms" / f"e{i:03d}.npy", lms)
        rows.append(f'eval_lms/e{i:03d}.npy,"{CLASSES[cls]}{",/m/unknown" if i == 0 else ""}"')
    (root / "files_as_eval.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tiny(tmp_path):
    from m2das.model import create_model

    data = write_eval_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = create_model("m2d_as_vit_tiny", input_size=[80, 208], num_classes=len(CLASSES))
    model.norm_stats.copy_(torch.tensor([-6.0, 3.5]))
    cfg = {"monitor_every": 2, "monitor_list": None, "data_path": str(data), "input_size": [80, 208]}
    return model, cfg, data


def test_monitor_metrics_on_real_lms_files_leave_random_state_alone(tiny, tmp_path):
    model, cfg, data = tiny
    mon = Monitor(cfg, CLASSES, torch.device("cpu"), knn_k=3, workers=2)  # crops read by two processes
    assert [e for e in range(1, 7) if mon.due(e)] == [2, 4, 6]
    assert mon.targets.shape == (24, 3) and mon.targets[0].tolist() == [1, 0, 0]  # /m/unknown ignored

    model.train()
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    first = mon.run(model, 2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert json.dumps(np.random.get_state()[1].tolist()) == json.dumps(np_state[1].tolist())
    assert model.training  # mode restored
    assert set(first) == {"monitor_map", "monitor_rankme", "monitor_knn_acc", "monitor_seconds", "monitor_clips"}
    assert 0 < first["monitor_map"] <= 1 and 1 <= first["monitor_rankme"] <= 24 and first["monitor_clips"] == 24
    assert first["monitor_knn_acc"] > 0.9  # loudness separates the two classes even at random init
    second = Monitor(cfg, CLASSES, torch.device("cpu"), knn_k=3, workers=0).run(model, 2)  # in this process
    (data / "eval_lms").rename(data / "moved")  # the crops of the first check are kept: nothing is read again
    third = mon.run(model, 2)
    assert {k: v for k, v in second.items() if k != "monitor_seconds"} == \
           {k: v for k, v in first.items() if k != "monitor_seconds"} == \
           {k: v for k, v in third.items() if k != "monitor_seconds"}

    # A head that ignores its input scores every clip alike: each AP is the class's prevalence (12 of 24).
    with torch.no_grad():
        model.offline_predictor.weight.zero_()
    assert mon.run(model, 4)["monitor_map"] == pytest.approx(0.5)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "events"))
    row = record(first, tmp_path, writer, epoch=2, step=10, train_seconds=100.0)
    writer.close()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [row] and row["step"] == 10 and 0 < row["monitor_share"] < 0.5
    assert any((tmp_path / "events").iterdir())


def test_monitor_time_share_against_training_steps(tiny):
    """The monitor's cost next to the training it interrupts (printed; the paper-scale share is in docs/performance.md)."""
    model, cfg, data = tiny
    mon = Monitor(cfg, CLASSES, torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(8, 1, 80, 208) * 3 - 6, torch.zeros(8, 3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(6):
        loss = model(x, y, gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_sample_train = (time.perf_counter() - t0) / 48
    m = mon.run(model, 2)
    per_clip_monitor = m["monitor_seconds"] / m["monitor_clips"]
    print(f"monitor {per_clip_monitor * 1e3:.1f} ms/clip vs training {per_sample_train * 1e3:.1f} ms/sample")
    assert per_clip_monitor < per_sample_train  # a forward pass without masking costs less than a training step


def test_missing_monitor_list_is_a_one_line_error(tiny):
    from m2das.data.dataset import DataListError

    model, cfg, data = tiny
    with pytest.raises(DataListError, match="files_as_eval.csv"):
        Monitor({**cfg, "monitor_list": str(data / "nope.csv")}, CLASSES, torch.device("cpu"))
    (data / "eval_lms" / "e003.npy").unlink()
    with pytest.raises(DataListError, match="e003.npy: missing"):
        Monitor(cfg, CLASSES, torch.device("cpu"))
    assert Monitor({**cfg, "monitor_every": 0}, CLASSES, torch.device("cpu")).due(2) is False


def test_status_shows_quality_and_keeps_the_loss_of_training_rows(tmp_path):
    from m2das.fileio import append_jsonl
    from m2das.cluster.status import collect, render

    (tmp_path / "config.json").write_text(json.dumps({"epochs": 4, "world_size": 1}))
    append_jsonl(tmp_path / "log.jsonl", {"time": time.time(), "epoch": 1, "step": 20, "total_steps": 40,
                                         "loss": 1.25, "samples_per_s": 10.0})
    record({"monitor_map": 0.4321, "monitor_rankme": 55.5, "monitor_knn_acc": 0.5, "monitor_seconds": 3.0,
            "monitor_clips": 24}, tmp_path, None, epoch=2, step=20)
    s = collect(tmp_path)
    assert s["loss"] == 1.25 and s["step"] == 20 and s["monitor"]["monitor_map"] == 0.4321
    text = render(s)
    assert "mAP 0.4321, RankMe 55.5, kNN acc 0.500 after epoch 2" in text and "loss       1.2500" in text


def tiny_model():
    from m2das.model import create_model

    torch.manual_seed(0)
    model = create_model("m2d_as_vit_tiny", input_size=[80, 208], num_classes=len(CLASSES))
    model.norm_stats.copy_(torch.tensor([-6.0, 3.5]))
    return model


def sharded_rank(rank: int, port: int, data: str, results) -> None:
    """One of two forked gloo ranks: the monitor over its share, the result (or the error) to the parent."""
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        cfg = {"monitor_every": 1, "monitor_list": None, "data_path": data, "input_size": [80, 208]}
        mon = Monitor(cfg, CLASSES, torch.device("cpu"), rank, 2, knn_k=3, workers=0)
        results.put((rank, mon.run(tiny_model(), 1)))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the parent shows it
        results.put((rank, repr(e)))


def test_two_gloo_ranks_share_the_clips_and_rank_0_gets_the_single_process_numbers(tmp_path):
    """Each rank encodes and queries its share (13 and 12 of 25 clips); rank 0 reports what one process would."""
    import multiprocessing

    from m2das.machine import free_port

    data = write_eval_folder(tmp_path / "odd", n=25, seed=3)
    cfg = {"monitor_every": 1, "monitor_list": None, "data_path": str(data), "input_size": [80, 208]}
    single = Monitor(cfg, CLASSES, torch.device("cpu"), knn_k=3, workers=0).run(tiny_model(), 1)
    ctx = multiprocessing.get_context("fork")  # after the single run: the ranks import nothing again
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=sharded_rank, args=(r, port, str(data), results)) for r in range(2)]
    for p in procs:
        p.start()
    sharded = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0] and sharded[1] == {}, sharded
    assert single["monitor_clips"] == sharded[0]["monitor_clips"] == 25
    for key in ("monitor_map", "monitor_rankme", "monitor_knn_acc"):
        assert sharded[0][key] == pytest.approx(single[key], rel=1e-5), key


def test_bench_monitor_times_before_and_after_in_one_run(tmp_path, capsys):
    """`m2das bench monitor` on a few real files: both ways, the same values, and the 4-GPU projection."""
    from m2das.tools import bench_monitor

    assert bench_monitor.main(["--clips", "40", "--frames", "230", "--dim", "48", "--workers", "1",
                               "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cold: before (one at a time, this process)" in out and "after (1 workers)" in out
    assert "  before: " in out and "after, first check:" in out and "after, later checks:" in out
    values = out.split("values before / after: ", 1)[1].splitlines()[0]
    for part in values.split(", "):
        name, before, _, after = part.split()
        assert float(before) == pytest.approx(float(after), rel=1e-6), part
    assert "the floor: encoding and the kNN product are" in out
    assert "metrics at D = 48" in out and "projection: one check of 40 clips on 4 GPUs" in out
    assert "% of wall time" in out and "ViT-B 34.0 GFLOP/clip" in out
    assert not list(tmp_path.iterdir()), "the benchmark cleans up its files"
