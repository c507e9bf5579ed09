import json
import re

from conftest import run_m2das

# "pre-training margin +0.122 mAP (95% CI -0.022 to +0.299): trained 0.795 vs random init 0.673, 3 seeds,
#  12 held-out test clips -> verdict"
PROBE_LINE = re.compile(r"linear probe +pre-training margin ([+-]\d\.\d{3}) mAP \(95% CI ([+-]\d\.\d{3}) to "
                        r"([+-]\d\.\d{3})\): trained (\d\.\d{3}) vs random init (\d\.\d{3}), (\d+) seeds, "
                        r"(\d+) held-out test clips -> (.+) \((.+)\)$", re.M)


def test_demo_runs_the_whole_job_and_resumes_exactly(tmp_path):
    r = run_m2das("demo", "--out", tmp_path / "demo", "--clips", "24", "--heldout", "30", "--epochs", "3",
                  timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "sending SIGTERM to the trainer" in out and "trainer exited 75" in out
    assert re.search(r"resumed from .*last\.pth at step [1-9]\d*", out)
    assert "bit-identical to an uninterrupted run" in out
    data = tmp_path / "demo" / "data"
    for name in ("files_audioset.csv", "files_as_weighted.csv", "files_as_eval.csv", "norm_stats.json"):
        assert (data / name).exists(), name
    assert len(list((data / "audioset_lms").glob("*.npy"))) == 24 + 30
    assert (tmp_path / "demo" / "run" / "checkpoint-3.pth").exists()

    # The held-out clips never reach pre-training: none of them is in the training list.
    train_list = (data / "files_as_weighted.csv").read_text().splitlines()[1:]
    heldout = (data / "files_as_eval.csv").read_text().splitlines()[1:]
    assert len(train_list) == 24 and len(heldout) == 30
    assert not {row.split(",")[0] for row in train_list} & {row.split(",")[0] for row in heldout}

    # The summary's probe line agrees with itself and with the result file it names.
    m = PROBE_LINE.search(out)
    assert m, out[-2000:]
    margin, lo, hi, trained, random = map(float, m.groups()[:5])
    seeds, test_clips, verdict, result_file = int(m[6]), int(m[7]), m[8], m[9]
    assert abs(margin - (trained - random)) <= 0.0015  # each printed to 3 decimals
    assert lo <= margin <= hi
    assert seeds == 3 and test_clips == 12  # 4 of every 10 held-out clips are test clips
    assert verdict.startswith("pre-training helps") == (lo > 0)
    result = json.loads(open(result_file).read())
    assert len(result["trained"]) == len(result["random"]) == len(result["seeds"]) == 3
    assert result["counts"] == {"train": 12, "valid": 6, "test": 12}
    assert abs(result["margin"] - margin) <= 0.0005 and [round(v, 3) for v in result["ci"]] == [lo, hi]
