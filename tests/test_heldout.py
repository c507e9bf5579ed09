"""`m2das prepare` writes files_as_eval.csv from eval_segments.csv, and --hold-out-eval keeps those clips out of training."""

import csv

from conftest import run_m2das

from m2das.tools.demo import make_corpus


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_lists_eval_segments_and_holds_them_out_when_asked(tmp_path):
    audio, meta = make_corpus(tmp_path / "corpus", clips=6, heldout=3)  # the last three are in eval_segments.csv
    eval_ids = {line.split(",")[0] for line in (meta / "eval_segments.csv").read_text().splitlines()
                if not line.startswith("#")}
    assert len(eval_ids) == 3

    plain = tmp_path / "plain"
    r = run_m2das("prepare", audio, plain, "--metadata", meta, "--device", "cpu", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    evaluated = rows(plain / "files_as_eval.csv")
    assert sorted(evaluated[0]) == ["file_name", "label"] and len(evaluated) == 3
    assert all(any(i in row["file_name"] for i in eval_ids) for row in evaluated)
    assert len(rows(plain / "files_as_weighted.csv")) == 9  # by default they stay in the training list

    held = tmp_path / "held"
    r = run_m2das("prepare", audio, held, "--metadata", meta, "--device", "cpu", "--workers", "1", "--no-progress",
                  "--hold-out-eval")
    assert r.returncode == 0, r.stderr
    train = rows(held / "files_as_weighted.csv")
    assert len(train) == 6 and rows(held / "files_as_eval.csv") == evaluated
    assert not {r["file_name"] for r in train} & {r["file_name"] for r in evaluated}
    assert all(float(r["weight"]) > 0 for r in train)
