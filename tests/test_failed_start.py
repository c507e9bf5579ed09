"""A start that fails before its first step leaves nothing that stands in the way of the corrected command."""

import json

from conftest import TINY_TRAIN, run_m2das, write_lms_folder


def test_the_corrected_command_takes_over_a_folder_that_never_reached_a_checkpoint(tmp_path):
    data_a = write_lms_folder(tmp_path / "a", n_files=24, classes=("/m/a", "/m/b"))
    data_b = write_lms_folder(tmp_path / "b", n_files=24, seed=1, classes=("/m/x", "/m/y", "/m/z"))
    run = tmp_path / "runs" / "fixme"
    common = ["train", *TINY_TRAIN, "--output_dir", run, "--epochs", "1", "--save_freq", "1"]
    # 24 files give no full step of 64: exit 2, and the message says to lower --batch_size.
    r = run_m2das(*common, "--data_path", data_a, "--batch_size", "64")
    assert r.returncode == 2 and "lower --batch_size" in r.stderr, r.stderr
    assert json.loads((run / "config.json").read_text())["batch_size"] == 64
    assert json.loads((run / "classes.json").read_text()) == ["/m/a", "/m/b"]
    # The corrected command (another batch size, and the data meant all along) is not refused as
    # "started with another configuration", and the vocabulary pinned from the wrong data is gone.
    r = run_m2das(*common, "--data_path", data_b, "--batch_size", "8")
    assert r.returncode == 0, r.stderr
    assert "never reached a checkpoint: taking this start's configuration (batch_size: 64 -> 8)" in r.stdout
    assert json.loads((run / "config.json").read_text())["batch_size"] == 8
    assert json.loads((run / "classes.json").read_text()) == ["/m/x", "/m/y", "/m/z"]
    assert (run / "checkpoint-1.pth").exists()
    # Once there is a checkpoint, the folder is protected again.
    r = run_m2das(*common, "--data_path", data_b, "--batch_size", "4")
    assert r.returncode == 2 and "started with another configuration" in r.stderr, r.stderr


def test_a_failed_start_without_output_dir_leaves_no_dated_folder(tmp_path, lms_data):
    runs = tmp_path / "runs"
    r = run_m2das("train", *TINY_TRAIN, "--runs_dir", runs, "--data_path", tmp_path / "nowhere", "--epochs", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    r = run_m2das("train", *TINY_TRAIN, "--runs_dir", runs, "--data_path", lms_data, "--epochs", "1",
                  "--batch_size", "64")
    assert r.returncode == 2 and "lower --batch_size" in r.stderr, r.stderr
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
