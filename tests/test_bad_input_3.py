"""A run folder never writes through a planted symbolic link, and bad input is one line with exit 2.

The rule (m2das/fileio.py): a file written whole replaces a link (its target untouched); a file
appended to, or a folder written into, is refused while it is a link: one line naming it, exit 2.
"""

import os
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


# -- downstream: wrong weights, NaN input, an unwritable --out, classes only in test ------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one can write to, root included: a read-only tmpfs where mount works; otherwise a
    chmod 555 folder (non-root) or, as root without mount, a path under a regular file (ENOTDIR)."""
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        (tmp_path / "a_file").write_text("")
        yield tmp_path / "a_file" / "sub"
        return
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    """A tiny checkpoint and eval lists of LMS files: train/valid/test of classes a and b (list.csv),
    and the same with a class c that only the test split has (list_c.csv)."""
    import numpy as np
    from pretrained_fixture import make_checkpoint

    root = tmp_path_factory.mktemp("downstream")
    rng = np.random.default_rng(0)
    (root / "lms").mkdir()
    rows = ["file_name,label,split"]
    for i, (label, split) in enumerate([("a", "train"), ("b", "train"), ("a", "train"), ("b", "train"),
                                        ("a", "valid"), ("b", "valid"), ("a", "test"), ("b", "test")]):
        np.save(root / "lms" / f"{i}.npy", (rng.standard_normal((1, 80, 112)) - 5).astype(np.float32))
        rows.append(f"lms/{i}.npy,{label},{split}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    (root / "list_c.csv").write_text("\n".join(rows[:-1] + [rows[-1].replace(",b,", ",c,")]) + "\n")
    ckpt = make_checkpoint(root / "runs")
    wrong = root / "m2d_as_vit_base-80x608p16x16p16k-x" / "checkpoint-1.pth"  # the name says another size
    wrong.parent.mkdir()
    import torch

    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, wrong)
    return {"root": root, "ckpt": ckpt, "wrong": wrong}


def eval_argv(d, tmp_path, weights, *extra, data="list.csv"):
    return [str(weights), "--data", str(d["root"] / data), "--cache_dir", str(tmp_path / "cache"),
            "--seeds", "42", "--epochs", "2", "--device", "cpu", "--no_progress", *extra]


@pytest.mark.parametrize("command", ["embed", "eval"])
def test_weights_of_another_size_are_one_line(command, downstream, tmp_path, capsys):
    from m2das.downstream import embed, linear_eval

    d = downstream
    rc = embed.main([str(d["root"] / "lms"), str(tmp_path / "out.npz"), "--weights", str(d["wrong"]),
                     "--no_progress"]) if command == "embed" else \
        linear_eval.main(eval_argv(d, tmp_path, d["wrong"], "--out", str(tmp_path / "r.json")))
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{d['wrong']}: these weights do not fit" in err and "pos_embed" in err
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "r.json").exists()


def test_embed_refuses_an_lms_holding_nan(downstream, tmp_path, capsys):
    import numpy as np
    from m2das.downstream import embed

    folder = tmp_path / "lms"
    folder.mkdir()
    good = np.load(downstream["root"] / "lms" / "0.npy")
    np.save(folder / "good.npy", good)
    good[0, 3, 5] = np.nan
    np.save(folder / "bad.npy", good)
    rc = embed.main([str(folder), str(tmp_path / "out.npz"), "--weights", str(downstream["ckpt"]), "--no_progress"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and f"{folder / 'bad.npy'}: 1 NaN/inf" in err, err
    assert not (tmp_path / "out.npz").exists()


def test_eval_out_in_a_read_only_folder_is_one_line_before_any_work(downstream, tmp_path, read_only_dir, capsys):
    from m2das.downstream import linear_eval

    out = read_only_dir / "r.json"
    rc = linear_eval.main(eval_argv(downstream, tmp_path, downstream["ckpt"], "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and f"--out {out}: cannot write there" in err, err
    assert not (tmp_path / "cache").exists()  # refused before the embeddings were computed


def test_eval_warns_about_classes_only_the_test_split_has(downstream, tmp_path, capsys):
    from m2das.downstream import linear_eval

    rc = linear_eval.main(eval_argv(downstream, tmp_path, downstream["ckpt"], "--out", str(tmp_path / "r.json"),
                                    data="list_c.csv"))
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "r.json").is_file(), err
    assert "1 class(es) appear in test but never in train (e.g. c)" in err


# -- data: pack and prepare into a read-only or full folder, a metadata URL prepare cannot fetch ---------

@pytest.fixture
def full_dir(tmp_path):
    """A 64 KiB tmpfs: a real file system that fills up."""
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "full", "64k") as folder:
        yield folder


@pytest.mark.parametrize("where", ["read_only", "full"])
def test_pack_into_a_read_only_or_full_folder_is_one_line(where, request, tmp_path, capsys):
    from conftest import write_lms_folder
    from m2das.data import pack

    data = write_lms_folder(tmp_path / "data", n_files=8)  # 8 x 80 x ~200 float32: more than 64 KiB
    (data / "norm_stats.json").write_text('{"mean": -7.0, "std": 4.0}')  # not computed again here
    out = request.getfixturevalue(f"{where}_dir") / "packed"
    rc = pack.main([str(data), "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_BAD_INPUT and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("m2das pack: error: ") and "pass --out in a writable folder" in err[-1], err
    assert ("no space left on the device of" if where == "full" else "cannot write") in err[-1]


def test_prepare_names_a_full_disk_and_refuses_a_metadata_url_it_cannot_fetch(tmp_path, full_dir, capsys):
    import numpy as np
    import soundfile as sf
    from m2das.data import prepare

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", np.zeros(16000 * 3, np.float32), 16000)  # its LMS (~96 KB) cannot fit in 64 KiB
    rc = prepare.main([str(audio), str(full_dir / "data"), "--device", "cpu", "--workers", "1", "--no-progress",
                       "--steps", "lms"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith(f"m2das prepare: no space left on the device of {full_dir / 'data'}"), err
    rc = prepare.main([str(audio), str(tmp_path / "data"), "--metadata-url", "ftp://example.org/csv"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "ftp:// is not a way to fetch" in err, err
    assert not (tmp_path / "data").exists()


def test_a_file_deleted_after_the_list_was_validated_is_one_line(tmp_path, capsys):
    from conftest import write_lms_folder
    from m2das import config, runsetup, train
    from m2das.data.dataset import read_samples

    data = write_lms_folder(tmp_path / "data", n_files=8)
    (data / "norm_stats.json").write_text('{"mean": -7.0, "std": 4.0}')
    run = tmp_path / "run"
    argv = ["--data_path", str(data), "--output_dir", str(run), "--epochs", "1", "--batch_size", "4", *TINY_TRAIN]
    cfg = config.parse_args(argv)
    run.mkdir()
    runsetup.validate_once(read_samples(cfg.data_path, cfg.csv_main, None), cfg, run)  # validated.json: all ok
    assert (run / runfolder.VALIDATED).is_file()
    gone = data / "audioset_lms" / "clip003.npy"
    gone.unlink()
    rc = train.main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert f"{gone}: No such file or directory (it was there when the list was validated)" in err


# -- status: an unreadable run folder; bytes that are not UTF-8 in its logs -------------------------------

def test_status_of_an_unreadable_run_folder_is_one_line(tmp_path):
    """Root reads everything: the command runs without the capabilities that let it (setpriv)."""
    import shutil
    import subprocess
    from conftest import REPO, m2das_cmd

    run = tmp_path / "run"
    run.mkdir()
    (run / runfolder.CONFIG).write_text("{}")
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root, an unreadable folder needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    run.chmod(0)
    try:
        out = subprocess.run(prefix + m2das_cmd("status", run, "--no-queue"), capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    finally:
        run.chmod(0o755)
    assert out.returncode == EXIT_BAD_INPUT and out.stderr.count("\n") == 1, out.stderr
    assert f"cannot read {run}" in out.stderr and "Permission denied" in out.stderr and "chmod" in out.stderr


def test_lines_that_are_not_utf8_are_skipped_with_a_warning(tmp_path, capsys):
    import json
    from m2das.cluster import status

    run = tmp_path / "run"
    run.mkdir()
    (run / runfolder.CONFIG).write_text(json.dumps({"epochs": 2, "world_size": 1}))
    start = {"event": runfolder.EVENT_START, "time": 1000.0, "resumed_step": 0}
    (run / runfolder.RESTARTS).write_bytes(json.dumps(start).encode() + b"\n\xff\xfe{\"event\": \x80}\n")
    rows = [{"step": s, "epoch": 0, "time": 1000.0 + s, "loss": 1.0} for s in (1, 2)]
    (run / runfolder.LOG).write_bytes(json.dumps(rows[0]).encode() + b"\n\xc3\x28 torn\n" + json.dumps(rows[1]).encode()
                                      + b"\n")
    assert status.main([str(run), "--json", "--no-queue"]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["step"] == 2 and len(shown["starts"]) == 1, shown
    for name in (runfolder.LOG, runfolder.RESTARTS):
        assert f"warning: {run / name}: skipped 1 line(s) that are not UTF-8 text" in err
    assert fileio.read_jsonl(run / runfolder.LOG) == rows  # the trainer's resume reads them the same way
