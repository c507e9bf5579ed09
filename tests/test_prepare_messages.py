"""What `m2das prepare` tells a user: the container's permission fix, and a stats bar that counts crops."""

from conftest import run_m2das
from m2das.tools.demo import make_corpus


def test_an_unwritable_data_folder_names_the_container_fix(tmp_path):
    audio, meta = make_corpus(tmp_path / "corpus", clips=2)
    r = run_m2das("prepare", audio, "/proc/m2das-data", "--metadata", meta, "--device", "cpu", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "/proc/m2das-data" in r.stderr and '--user "$(id -u):$(id -g)"' in r.stderr


def test_the_stats_bar_counts_crops_not_files(tmp_path):
    audio, meta = make_corpus(tmp_path / "corpus", clips=3)
    r = run_m2das("prepare", audio, tmp_path / "data", "--metadata", meta, "--device", "cpu", "--workers", "1",
                  "--stats-files", "7")
    assert r.returncode == 0, r.stderr
    stats_bar = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("stats")]
    assert stats_bar and "7/7" in stats_bar[-1] and "crop" in stats_bar[-1] and "file" not in stats_bar[-1], stats_bar
