"""`m2das train --logger wandb`: off by default, one line when the package is missing, and an offline
run that holds the trainer's scalars and keeps its id when the run folder is resumed."""

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

from conftest import TINY_TRAIN, run_m2das
from m2das import EXIT_RESUMABLE, loggers

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason=f"wandb is not installed ({loggers.INSTALL_HINT})")

# A process in which `wandb` is not installed: its import machinery finds no such module.
WITHOUT_WANDB = """
import sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "wandb":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
from m2das.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte file header, then 32 KiB blocks of chunks, each with a
    7-byte header (CRC32, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending, pos = pending + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def offline_runs(wandb_dir: Path) -> dict:
    """run id -> [(step, train/loss)] over every offline run folder (one per process) under WANDB_DIR."""
    import json

    runs = {}
    for file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append((items[loggers.STEP_KEY], items["train/loss"]))
        runs.setdefault(run_id, []).extend(rows)
    return runs


def test_a_missing_logger_package_is_one_line_before_any_work(lms_data, tmp_path):
    import subprocess

    run = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--data_path", str(lms_data), "--output_dir", str(run), "--logger", "wandb"]
    r = subprocess.run([sys.executable, "-c", WITHOUT_WANDB, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--logger wandb needs the wandb package" in r.stderr and "pip install 'm2das[logger]'" in r.stderr
    assert not run.exists()


def test_without_the_flag_nothing_is_logged_there(lms_data, tmp_path):
    r = run_m2das("train", *TINY_TRAIN, "--data_path", lms_data, "--output_dir", tmp_path / "run", "--batch_size",
                  "8", "--epochs", "1", env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "wb").exists() and not (tmp_path / "run" / "wandb").exists()


@needs_wandb
def test_offline_wandb_run_holds_the_scalars_and_a_resume_keeps_its_id(lms_data, tmp_path):
    from m2das.fileio import read_jsonl

    run, wandb_dir = tmp_path / "run", tmp_path / "wb"
    wandb_dir.mkdir()
    args = ("train", *TINY_TRAIN, "--data_path", lms_data, "--output_dir", run, "--batch_size", "8",
            "--epochs", "2", "--logger", "wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    r = run_m2das(*args, env={**env, "M2DAS_TEST_SIGTERM_AT_STEP": "4"})
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    r = run_m2das(*args, env=env)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr

    runs = offline_runs(wandb_dir)
    assert list(runs) == [loggers.run_id(run)], runs.keys()  # both starts wrote to one run
    logged = dict(runs[loggers.run_id(run)])
    assert sorted(logged) == list(range(1, 13))  # 48 files / 8 = 6 steps an epoch, a row a step
    for row in read_jsonl(run / "log.jsonl"):  # the same numbers as the trainer's own log
        assert logged[row["step"]] == pytest.approx(row["loss"])
    assert len(list(wandb_dir.glob("wandb/offline-run-*"))) == 2
