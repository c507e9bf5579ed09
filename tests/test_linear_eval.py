"""The Table V protocol of `m2das eval`: its numbers, the tie rule, the metric, the interval, the cache,
and `--suite paper` on stand-ins of two of the paper's tasks (real files, a real subprocess)."""

import json

import numpy as np
import pytest
from conftest import run_m2das
from pretrained_fixture import make_checkpoint, write_corpus, write_eval_list
from task_standins import make_standin

from m2das.downstream import protocol
from m2das.downstream.linear_eval import evaluate, parser
from m2das.downstream.protocol import Settings, confidence_interval, macro_map, train_linear


def test_the_defaults_are_table_v_and_the_cli_uses_them():
    s = Settings()
    assert (s.lr, s.max_epochs, s.patience, s.max_batch, s.weight_decay, s.seeds) == (3e-5, 200, 20, 200, 1e-8,
                                                                                      (42, 43, 44))
    assert protocol.BETAS == (0.9, 0.999)
    assert s.batch_size(57) == 57 and s.batch_size(5000) == 200
    args = parser().parse_args(["W", "--data", "x.csv"])
    assert (args.lr, args.epochs, args.early_stop_epochs, args.batch_size, tuple(args.seeds)) == \
        (s.lr, s.max_epochs, s.patience, s.max_batch, s.seeds)
    help_text = parser().format_help()
    for fact in ("lr 3e-5", "weight decay 1e-8", "min(200", "200 epochs", "20 epochs", "seeds 42, 43, 44",
                 "95% confidence"):
        assert fact in " ".join(help_text.split()), fact


def separable(n_per_class=10, dim=16):
    """Train and valid clips around three far-apart centres."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, dim)) * 4
    y = np.repeat(np.arange(3), n_per_class)
    return [((centres[y] + rng.standard_normal((len(y), dim))).astype(np.float32), y) for _ in range(2)]


def test_a_tie_with_the_best_counts_as_improvement():
    """Validation accuracy reaches 1.0 early and stays there: each tie moves the best epoch on and restarts
    the patience, so training runs to the last epoch and keeps its weights. A strict '>' rule would
    have stopped `patience` epochs after the first 1.0 and kept that epoch's weights."""
    (x, y), (xv, yv) = separable()
    settings = Settings(lr=1e-2, max_epochs=40, patience=3)
    fit = train_linear(x, y, xv, yv, 3, False, 42, settings)
    first_perfect = next(e for e in range(1, 41)
                         if train_linear(x, y, xv, yv, 3, False, 42, Settings(lr=1e-2, max_epochs=e)).valid == 1.0)
    assert first_perfect + settings.patience < 40
    assert fit.valid == 1.0 and fit.best_epoch == fit.epochs_run == 40


def test_early_stop_after_patience_epochs_without_improvement():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 8)).astype(np.float32), rng.integers(0, 3, 30)
    xv, yv = rng.standard_normal((30, 8)).astype(np.float32), rng.integers(0, 3, 30)  # noise: no progress
    fit = train_linear(x, y, xv, yv, 3, False, 42, Settings(lr=1e-4, max_epochs=200, patience=5))
    assert fit.epochs_run == fit.best_epoch + 5 < 200


def test_map_scores_a_class_without_positives_zero():
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)  # class 2: none
    perfect = targets + 0.1
    assert macro_map(perfect, targets) == pytest.approx(2 / 3)
    from m2das.metrics import mean_average_precision

    assert mean_average_precision(perfect, targets) == pytest.approx(1.0)  # AudioSet's rule skips it


def test_confidence_interval_is_students_t_over_runs():
    from scipy import stats

    for values in ([0.91, 0.93, 0.96], list(np.linspace(0.5, 0.9, 12)), list(np.linspace(0.1, 0.4, 40))):
        mean, half = confidence_interval(values)
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert mean == pytest.approx(np.mean(values))
        assert half == pytest.approx((hi - lo) / 2, rel=2e-3)
    assert confidence_interval([0.8]) == (0.8, 0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("le")
    clips = write_corpus(root / "audio", per_class=4, seconds=1.0)
    return {"root": root, "ckpt": make_checkpoint(root / "runs", clips, steps=5),
            "list": write_eval_list(root / "list.csv", clips, root)}


def test_embeddings_are_computed_once_for_all_seeds_and_reruns(tiny, tmp_path):
    quick = Settings(max_epochs=5)
    first = evaluate(tiny["ckpt"], tiny["list"], out=tmp_path / "a.json", settings=quick, device="cpu",
                     cache_dir=tmp_path / "cache", progress=False)
    assert not first["embeddings_cached"] and len(first["runs"]) == 3
    assert sorted({f["seed"] for f in first["folds"]}) == [42, 43, 44]
    other_seeds = evaluate(tiny["ckpt"], tiny["list"], out=tmp_path / "b.json",
                           settings=Settings(max_epochs=5, seeds=(7,)), device="cpu",
                           cache_dir=tmp_path / "cache", progress=False)
    assert other_seeds["embeddings_cached"] and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = evaluate(tiny["ckpt"], tiny["list"], out=tmp_path / "c.json", settings=quick, device="cpu",
                     cache_dir=tmp_path / "cache", progress=False)
    assert again["embeddings_cached"] and again["runs"] == first["runs"]
    cut = evaluate(tiny["ckpt"], tiny["list"], out=tmp_path / "d.json", settings=quick, clip_seconds=0.5,
                   device="cpu", cache_dir=tmp_path / "cache", progress=False)
    assert not cut["embeddings_cached"]  # another clip length is another set of clips


def test_suite_paper_prints_the_table_beside_the_papers_row(tiny, tmp_path):
    data = tmp_path / "tasks"
    make_standin("spcv2", data / "spcv2", per_class=3, seconds=0.5)
    make_standin("cremad", data / "cremad", per_class=3, seconds=1.0)
    out = tmp_path / "suite.json"
    r = run_m2das("eval", tiny["ckpt"], "--suite", "paper", "--data_root", data, "--device", "cpu",
                  "--cache_dir", tmp_path / "cache", "--out", out, "--epochs", "10", "--no_progress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "|  | SPCV2 | CREMA-D | Avg. (2 of 9) |"
    ours = next(line for line in lines if line.startswith("| this model"))
    assert ours.count("±") == 2
    assert "| M2D-AS (paper, Table V) | 95.7 | 73.1 | 84.4 |" in lines
    assert "not under" in r.stdout and "esc50" in r.stdout
    saved = json.loads(out.read_text())
    assert [t["task"] for t in saved["tasks"]] == ["spcv2", "cremad"]
    assert all(len(t["runs"]) == 3 and t["clip_seconds"] in (1.0, 2.5) for t in saved["tasks"])
    assert saved["tasks"][0]["time_frames"] == 7 and saved["tasks"][1]["time_frames"] == 16  # 1 s, 2.5 s clips
    assert out.with_suffix(".md").read_text().splitlines()[-1] == "| M2D-AS (paper, Table V) | 95.7 | 73.1 | 84.4 |"


def test_suite_and_task_errors_are_one_line(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_m2das("eval", tiny["ckpt"], "--suite", "paper", "--data_root", tmp_path / "empty")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "none of the paper's tasks" in r.stderr
    r = run_m2das("eval", tiny["ckpt"], "--task", "esc50", "--data_root", tmp_path / "empty")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "esc50.csv" in r.stderr, r.stderr
    r = run_m2das("eval", tiny["ckpt"], "--task", "esc50")
    assert r.returncode == 2 and "--data_root" in r.stderr
