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


def test_the_stated_export_size_is_the_default_export_of_vit_base():
    """The README and `export --help` give the ViT-B export's size: count it from the model's own
    tensors (on the meta device, nothing allocated) with the keys the export keeps."""
    import re
    from pathlib import Path

    import torch

    from m2das.downstream.weights import is_encoder_key
    from m2das.model import create_model
    from m2das.runfolder import HEAD_PREFIX

    with torch.device("meta"):
        state = create_model("m2d_as_vit_base").state_dict()
    kept = [v for k, v in state.items() if is_encoder_key(k) or k.startswith(HEAD_PREFIX)]
    megabytes = sum(v.numel() * v.element_size() for v in kept) / 1e6
    help_text = " ".join(run_m2das("export", "--help").stdout.split())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    for where, text in (("export --help", help_text), ("README.md", readme)):
        stated = re.findall(r"about (\d+) MB for ViT-B", text)
        assert stated, f"{where} gives no ViT-B export size"
        assert all(abs(int(n) - megabytes) < 5 for n in stated), (where, stated, megabytes)


def test_a_stop_under_slurm_or_the_launcher_says_who_resumes(lms_data, tmp_path):
    """A SIGTERM inside a real step: under SLURM the job requeues itself, under the local launcher the
    supervisor restarts the run; neither asks the user to rerun the command."""
    from conftest import TINY_TRAIN
    from m2das import EXIT_RESUMABLE, runfolder

    run = tmp_path / "run"
    args = ("train", *TINY_TRAIN, "--data_path", lms_data, "--output_dir", run, "--batch_size", "8", "--epochs", "2")
    r = run_m2das(*args, env={"SLURM_JOB_ID": "4242", "M2DAS_TEST_SIGTERM_AT_STEP": "2"})
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_RESUMABLE, out
    assert "SIGTERM received: saved" in out and "SLURM job 4242 requeues itself and resumes here" in out
    r = run_m2das(*args, env={runfolder.LAUNCHER_ATTEMPT_ENV: "1", "M2DAS_TEST_SIGTERM_AT_STEP": "4"})
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_RESUMABLE and "resumed from" in out, out
    assert "the launcher restarts the run and resumes here" in out and "rerun the same command" not in out


def test_log_lines_give_the_eta_from_the_recent_rate(lms_data, tmp_path):
    """Each log line ends in "ETA 1h23m"-style time left: the steps left times the rate since the last
    line (an optimizer step of accum_iter batches), so the last line says 0m00s."""
    import re
    import statistics

    from conftest import TINY_TRAIN
    from m2das.fileio import read_jsonl

    run = tmp_path / "run"
    r = run_m2das("train", *TINY_TRAIN, "--data_path", lms_data, "--output_dir", run, "--batch_size", "4",
                  "--accum_iter", "2", "--epochs", "2")
    assert r.returncode == 0, r.stdout + r.stderr

    def seconds(text):
        parts = dict((unit, int(n)) for n, unit in re.findall(r"(\d+)([dhms])", text))
        return parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)

    lines = [line for line in (r.stdout + r.stderr).splitlines() if " samples/s, ETA " in line]
    rows = read_jsonl(run / "log.jsonl")
    assert len(lines) == len(rows) == 12  # 48 files / (4 x 2) = 6 steps an epoch, a line a step
    etas = [re.search(r"ETA ((?:\d+[dhms])+)$", line) for line in lines]
    assert all(etas), lines
    for eta, row in zip(etas, rows):
        assert seconds(eta[1]) == int(row["eta_s"])  # the line shows what log.jsonl keeps
    assert etas[-1][1] == "0m00s" and rows[0]["eta_s"] > 0
    # The rate behind the ETA is the time one step took: compare with the log rows' own clock.
    ratios = [rows[i]["eta_s"] / (row["total_steps"] - row["step"]) / (row["time"] - rows[i - 1]["time"])
              for i, row in enumerate(rows) if 0 < i < len(rows) - 1]
    assert 0.5 < statistics.median(ratios) < 2, ratios
