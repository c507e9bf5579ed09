"""A run folder never writes through a planted symbolic link, and bad input is one line with exit 2.

The rule (m2das/fileio.py): a file written whole replaces a link (its target untouched); a file
appended to, or a folder written into, is refused while it is a link: one line naming it, exit 2.
"""

import os
import sys
from pathlib import Path

import pytest

from conftest import TINY_TRAIN
from m2das import fileio, runfolder
from m2das.runfolder import EXIT_BAD_INPUT


def plant(link: Path, outside: Path, as_dir: bool) -> bytes | list:
    """A symbolic link at `link` to a file (or folder) outside the run folder; returns what it holds."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if as_dir:
        outside.mkdir()
        (outside / "keep.txt").write_text("someone else's\n")
        link.symlink_to(outside, target_is_directory=True)
        return sorted(os.listdir(outside))
    outside.write_bytes(b"someone else's file\n")
    link.symlink_to(outside)
    return outside.read_bytes()


def held(outside: Path, as_dir: bool):
    return sorted(os.listdir(outside)) if as_dir else outside.read_bytes()


@pytest.mark.parametrize("name", [runfolder.LOG, runfolder.RESTARTS, runfolder.EVENTS_DIR])
def test_train_refuses_a_planted_link_before_writing(name, tmp_path, lms_data, capsys):
    from m2das import train

    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    before = plant(run / name, outside, name == runfolder.EVENTS_DIR)
    rc = train.main(["--data_path", str(lms_data), "--csv_main", str(lms_data / "files_as_weighted.csv"),
                     "--output_dir", str(run), "--epochs", "1", *TINY_TRAIN])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert f"{run / name} is a symbolic link" in err and "remove the link" in err
    assert held(outside, name == runfolder.EVENTS_DIR) == before
    assert (run / name).is_symlink() and not (run / runfolder.LAST).exists()


def test_an_append_never_follows_a_link_and_a_whole_write_replaces_it(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    before = plant(tmp_path / "log.jsonl", outside, False)
    with pytest.raises(fileio.LinkRefused, match="remove the link"):
        fileio.append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    fileio.write_json(tmp_path / "log.jsonl", {"step": 1})
    assert outside.read_bytes() == before and not (tmp_path / "log.jsonl").is_symlink()


def test_the_local_launcher_replaces_a_planted_spec_link(tmp_path, lms_data):
    from m2das.cluster import local, plan

    run, outside = tmp_path / "run", tmp_path / "elsewhere.json"
    before = plant(run / runfolder.LOGS_DIR / "local-spec.json", outside, False)
    args = plan.build_parser().parse_args(["--preset", "cpu-test", "--cluster", "local", "--foreground",
                                           "--run-dir", str(run)])
    job = plan.Plan(args, ["--data_path", str(lms_data), "--epochs", "1"])
    assert local.submit_local(job) == f"local-{os.getpid()}"
    spec = run / runfolder.LOGS_DIR / "local-spec.json"
    assert outside.read_bytes() == before and not spec.is_symlink()
    assert fileio.json.loads(spec.read_text())["run_dir"] == str(run)


def test_the_local_launcher_refuses_a_planted_launcher_log(tmp_path, lms_data, capsys):
    from m2das.cluster import submit

    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    before = plant(run / runfolder.LOGS_DIR, outside, True)
    rc = submit.main(["--preset", "cpu-test", "--cluster", "local", "--run-dir", str(run), "--",
                      "--data_path", str(lms_data), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "remove the link" in err, err
    assert held(outside, True) == before and not (run / runfolder.LAUNCHER).exists()
