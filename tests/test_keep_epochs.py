"""--keep_epochs N: a long run with --save_freq 1 leaves its newest N epoch checkpoints, not one per epoch."""

from conftest import TINY_TRAIN, run_m2das


def test_keep_epochs_leaves_the_newest_epoch_checkpoints(lms_data, tmp_path):
    run = tmp_path / "run"
    r = run_m2das("train", *TINY_TRAIN, "--data_path", lms_data, "--output_dir", run, "--batch_size", "8",
                  "--epochs", "4", "--save_freq", "1", "--keep_epochs", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.glob("checkpoint-*.pth")) == ["checkpoint-3.pth", "checkpoint-4.pth"]
    assert r.stdout.count("saved ") >= 4  # every epoch was saved before the older ones were dropped
