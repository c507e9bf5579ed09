"""What a new user sees before and while a run goes: warnings that explain a plan with no steps,
stop messages that fit the launcher, and log lines that say when the run will end."""

import json

from conftest import run_m2das


def test_print_config_warns_when_the_list_is_missing(tmp_path):
    r = run_m2das("train", "--print_config", "--data_path", tmp_path / "nowhere")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_steps"] is None
    assert r.stderr.count("\n") == 1
    assert f"warning: no list found at {tmp_path / 'nowhere' / 'files_as_weighted.csv'}" in r.stderr


def test_print_config_warns_when_the_list_gives_no_full_step(lms_data):
    r = run_m2das("train", "--print_config", "--data_path", lms_data, "--batch_size", "64",
                  env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_steps"] == 0
    assert "warning:" in r.stderr and "48 files give no full step of 64 x 1 x 1; lower --batch_size" in r.stderr
    r = run_m2das("train", "--print_config", "--data_path", lms_data, "--batch_size", "8", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["total_steps"] == 6 * 300
