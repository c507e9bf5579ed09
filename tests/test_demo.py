import re

from conftest import run_m2das


def test_demo_runs_the_whole_job_and_resumes_exactly(tmp_path):
    r = run_m2das("demo", "--out", tmp_path / "demo", "--clips", "24", "--epochs", "3", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "sending SIGTERM to the trainer" in out and "trainer exited 75" in out
    assert re.search(r"resumed from .*last\.pth at step [1-9]\d*", out)
    assert "bit-identical to an uninterrupted run" in out
    data = tmp_path / "demo" / "data"
    for name in ("files_audioset.csv", "files_as_weighted.csv", "norm_stats.json"):
        assert (data / name).exists(), name
    assert len(list((data / "audioset_lms").glob("*.npy"))) == 24
    assert (tmp_path / "demo" / "run" / "checkpoint-3.pth").exists()
