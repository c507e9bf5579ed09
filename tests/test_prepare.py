"""`m2das prepare` end to end on real audio files, real AudioSet metadata and real processes."""

import contextlib
import csv
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from m2das.data import labels
from m2das.data.audio import lms_from_file
from m2das.data.prepare import PrepareError, main, run_lms, run_prepare
from m2das.data.stats import compute_norm_stats, read_norm_stats

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "audioset"
UNBALANCED = """# Segments csv
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--ZhevVpy1s, 50.000, 60.000, "/m/04rlf"
---1_cCGK4M, 0.000, 10.000, "/m/01g50p,/m/0284vy3"
-0-2d2ugvJE, 30.000, 40.000, "/m/09x0r"
"""


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The real release files (linked, not copied) plus a small unbalanced list."""
    folder = tmp_path_factory.mktemp("metadata")
    for name in ("class_labels_indices.csv", "balanced_train_segments.csv", "eval_segments.csv"):
        (folder / name).symlink_to(SHARED / name)
    (folder / "unbalanced_train_segments.csv").write_text(UNBALANCED)
    return folder


def tone(seconds, rate, channels=1, freq=440.0, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    x = 0.3 * np.sin(2 * np.pi * freq * np.arange(n) / rate)[:, None] + 0.05 * rng.standard_normal((n, channels))
    return x.astype(np.float32)


def write(path, data, rate, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, **kw)
    return path


def make_corpus(audio: Path) -> None:
    """The mix users arrive with: both name styles, rates, channels, lengths and broken files."""
    write(audio / "--PJHxphWEs_30.000.wav", tone(3, 44100, 2, seed=1), 44100, subtype="PCM_16")
    write(audio / "sub" / "Y--ZhevVpy1s.flac", tone(2, 48000, 1, 880, seed=2), 48000)
    write(audio / "sub" / "deeper" / "YY-CDakgc2Lc.wav", tone(10, 16000, 1, 300, seed=3), 16000)
    write(audio / "--4gqARaEJE_0.000.wav", np.zeros((16000, 2), np.float32), 16000)  # silent
    write(audio / "zzzzzzzzzzz_0.000.wav", tone(1, 16000, seed=4), 16000)  # in no list
    write(audio / "short" / "--BfvyPmVMo.wav", tone(0.3, 22050, seed=5), 22050)
    bad = audio / "bad"
    write(bad / "zerolen.wav", np.zeros((0, 1), np.float32), 16000)
    (bad / "empty.wav").write_bytes(b"")
    (bad / "corrupt.wav").write_bytes((audio / "--PJHxphWEs_30.000.wav").read_bytes()[:30])
    (bad / "text.wav").write_text("<html>404 not found</html>\n")
    nan = tone(1, 16000, seed=6)
    nan[100] = np.nan
    write(bad / "nan.wav", nan, 16000, subtype="FLOAT")
    (audio / "notes.txt").write_text("downloaded with some tool\n")


GOOD = ["--4gqARaEJE_0.000", "--PJHxphWEs_30.000", "short/--BfvyPmVMo", "sub/Y--ZhevVpy1s",
        "sub/deeper/YY-CDakgc2Lc", "zzzzzzzzzzz_0.000"]
BAD = {"bad/corrupt.wav": "unreadable", "bad/empty.wav": "empty", "bad/nan.wav": "NaN or inf",
       "bad/text.wav": "unreadable", "bad/zerolen.wav": "empty"}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(data: Path) -> dict:
    """Every file of a data folder (but the lock) -> its bytes."""
    return {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.rglob("*"))
            if p.is_file() and p.name != ".prepare.lock"}


def test_full_run_on_a_mixed_folder(tmp_path, metadata):
    audio, data = tmp_path / "audio", tmp_path / "data"
    make_corpus(audio)
    s = run_prepare(audio, data, metadata_dir=metadata, device="cpu", workers=2,
                    stats_files=40, progress=False)
    assert s["ok"], s
    assert (s["converted"], s["skipped_existing"], s["failed"], s["ignored_non_audio"]) == (6, 0, 5, 1)
    assert s["silent"] == 1
    assert s["hours_converted"] == pytest.approx((3 + 2 + 10 + 1 + 1 + 0.3) / 3600)

    # 1. LMS files mirror the input tree and equal the single-file conversion
    for stem in GOOD:
        out = data / "audioset_lms" / f"{stem}.npy"
        lms = np.load(out)
        assert lms.dtype == np.float32 and lms.shape[:2] == (1, 80)
        src = next(audio.glob(f"{stem}.*"))
        np.testing.assert_array_equal(lms, lms_from_file(src)[0])
    assert np.load(data / "audioset_lms/sub/deeper/YY-CDakgc2Lc.npy").shape == (1, 80, 1001)
    assert np.load(data / "audioset_lms/short/--BfvyPmVMo.npy").shape == (1, 80, 611)
    failures = {r["file"]: r["reason"] for r in read_rows(data / "prepare_failures.csv")}
    assert set(failures) == set(BAD)
    for name, reason in BAD.items():
        assert reason in failures[name]
    assert not (data / "audioset_lms" / "bad").exists()

    # 2. the list holds exactly the outputs, sorted, relative to the data folder
    listed = [r["file_name"] for r in read_rows(data / "files_audioset.csv")]
    assert listed == sorted(f"audioset_lms/{stem}.npy" for stem in GOOD)
    assert s["listed"] == 6 and s["invalid_outputs"] == 0

    # 3. labels: both name styles, unbalanced overrides balanced, the unlisted file left out
    rows = {r["file_name"]: r for r in read_rows(data / "files_as_weighted.csv")}
    assert list(read_rows(data / "files_as_weighted.csv")[0]) == ["file_name", "label", "weight"]
    expect = {
        "audioset_lms/--PJHxphWEs_30.000.npy": "/m/09x0r,/t/dd00088",
        "audioset_lms/sub/Y--ZhevVpy1s.npy": "/m/04rlf",
        "audioset_lms/sub/deeper/YY-CDakgc2Lc.npy": "/m/02qldy,/m/09x0r",
        "audioset_lms/--4gqARaEJE_0.000.npy": "/m/068hy,/m/07q6cd_,/m/0bt9lr,/m/0jbk",
        "audioset_lms/short/--BfvyPmVMo.npy": "/m/03l9g",
    }
    assert {k: v["label"] for k, v in rows.items()} == expect
    assert s["labelled"] == 5 and s["without_labels"] == 1
    assert s["classes"] == 527 and s["classes_without_files"] == 527 - 9
    # by hand: /m/09x0r is in two files (1000 / 102), every other class in one (1000 / 101)
    one, two = 1000 / 101, 1000 / 102
    hand = {
        "audioset_lms/--PJHxphWEs_30.000.npy": (two + one) ** (2 / 3),
        "audioset_lms/sub/Y--ZhevVpy1s.npy": one ** (2 / 3),
        "audioset_lms/sub/deeper/YY-CDakgc2Lc.npy": (one + two) ** (2 / 3),
        "audioset_lms/--4gqARaEJE_0.000.npy": (4 * one) ** (2 / 3),
        "audioset_lms/short/--BfvyPmVMo.npy": one ** (2 / 3),
    }
    for name, w in hand.items():
        assert float(rows[name]["weight"]) == pytest.approx(w, rel=1e-12)
    assert float(rows["audioset_lms/--4gqARaEJE_0.000.npy"]["weight"]) == pytest.approx(11.6187, abs=1e-4)

    # 4. stats: the shared rule on the listed files, readable by the trainer
    stats = read_norm_stats(data / "norm_stats.json")
    again = compute_norm_stats([data / n for n in listed], num_files=40)
    assert stats == json.loads(json.dumps(again))
    assert stats["list_size"] == 6 and stats["std"] > 0

    # a rerun converts nothing and changes nothing
    before = snapshot(data)
    s2 = run_prepare(audio, data, metadata_dir=metadata, device="cpu", workers=1,
                     stats_files=40, progress=False)
    assert (s2["converted"], s2["skipped_existing"], s2["failed"]) == (0, 6, 5)
    assert snapshot(data) == before


def test_weights_hand_example():
    weights = labels.sample_weights([["a", "b"], ["a"], ["b", "c"], ["a"]])
    # counts: a 3, b 2, c 1 -> 1000/103, 1000/102, 1000/101
    a, b, c = 9.70873786407767, 9.803921568627452, 9.900990099009901
    assert weights == pytest.approx([(a + b) ** (1 / 1.5), a ** (1 / 1.5),
                                     (b + c) ** (1 / 1.5), a ** (1 / 1.5)], rel=1e-12)
    assert weights[1] == pytest.approx(4.5510, abs=1e-4)


def test_list_precedence_eval_balanced_unbalanced(tmp_path):
    head = "# Segments csv\n# num_ytids=0\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (tmp_path / "eval_segments.csv").write_text(
        head + 'AAAAAAAAAAA, 0.000, 10.000, "/m/e1"\nBBBBBBBBBBB, 0.000, 10.000, "/m/e2"\n'
        'CCCCCCCCCCC, 0.000, 10.000, "/m/e3,/m/e4"\n')
    (tmp_path / "balanced_train_segments.csv").write_text(
        head + 'AAAAAAAAAAA, 0.000, 10.000, "/m/b1"\nBBBBBBBBBBB, 0.000, 10.000, "/m/b2"\n')
    (tmp_path / "unbalanced_train_segments.csv").write_text(
        head + 'AAAAAAAAAAA, 0.000, 10.000, "/m/u1,/m/u2"\n')
    m = labels.load_label_map(tmp_path)
    assert m == {"AAAAAAAAAAA": "/m/u1,/m/u2", "BBBBBBBBBBB": "/m/b2", "CCCCCCCCCCC": "/m/e3,/m/e4"}
    (tmp_path / "unbalanced_train_segments.csv").unlink()
    warnings = []
    m = labels.load_label_map(tmp_path, warn=warnings.append)
    assert m["AAAAAAAAAAA"] == "/m/b1"
    assert len(warnings) == 1 and "unbalanced_train_segments.csv not found" in warnings[0]
    (tmp_path / "eval_segments.csv").unlink()
    with pytest.raises(labels.MetadataError, match="eval_segments.csv"):
        labels.load_label_map(tmp_path)


def test_spreadsheet_round_trip_reads_the_same(tmp_path):
    release, _ = labels.read_segments(SHARED / "balanced_train_segments.csv")
    assert len(release) == 22160
    assert release["--PJHxphWEs"] == "/m/09x0r,/t/dd00088"
    # what a spreadsheet saves: header row, "," separators, quotes only where needed, CRLF, BOM
    with open(tmp_path / "b.csv", "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["YTID", "start_seconds", "end_seconds", "positive_labels"])
        for ytid, mids in release.items():
            w.writerow([ytid, "30", "40", mids])
    text = (tmp_path / "b.csv").read_bytes().decode("utf-8-sig")
    assert "--ZhevVpy1s,30,40,/m/012xff\r\n" in text  # an unquoted single label
    again, bad = labels.read_segments(tmp_path / "b.csv")
    assert again == release and bad == 0


def test_ytid_name_styles_against_real_lists():
    m, _ = labels.read_segments(SHARED / "balanced_train_segments.csv")
    assert "Y-CDakgc2Lc" in m  # real IDs can start with Y
    assert labels.ytid_of("--PJHxphWEs_30.000.npy", m) == "--PJHxphWEs"
    assert labels.ytid_of("Y--PJHxphWEs.npy", m) == "--PJHxphWEs"
    assert labels.ytid_of("Y--PJHxphWEs_30.000_40.000.npy", m) == "--PJHxphWEs"
    assert labels.ytid_of("Y-CDakgc2Lc_30.000.npy", m) == "Y-CDakgc2Lc"
    assert labels.ytid_of("Y-CDakgc2Lc.npy", m) == "Y-CDakgc2Lc"
    assert labels.ytid_of("YY-CDakgc2Lc.npy", m) == "Y-CDakgc2Lc"
    assert labels.ytid_of("zzzzzzzzzzz.npy", m) is None
    assert labels.ytid_of("short.npy", m) is None
    # both readings are real IDs: the separator after the ID decides
    both = {"YabcdefghiJ": "x", "abcdefghiJK": "y"}
    assert labels.ytid_of("YabcdefghiJK.npy", both) == "abcdefghiJK"
    assert labels.ytid_of("YabcdefghiJK_0.000.npy", both) == "abcdefghiJK"
    assert labels.ytid_of("YabcdefghiJ_0.000.npy", both) == "YabcdefghiJ"


def test_two_inputs_with_one_output_name(tmp_path):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a" / "x.wav", tone(1, 16000), 16000)
    write(audio / "a" / "x.flac", tone(1, 16000, seed=9), 16000)
    s = run_prepare(audio, data, device="cpu", workers=1, steps="lms,list", progress=False)
    assert (s["converted"], s["failed"], s["listed"]) == (1, 1, 1)
    (row,) = read_rows(data / "prepare_failures.csv")
    assert row["file"] == "a/x.wav" and "rename one of them" in row["reason"]


def test_broken_output_is_left_out_of_the_list(tmp_path, capsys):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a.wav", tone(1, 16000), 16000)
    write(audio / "b.wav", tone(1, 16000), 16000)
    run_prepare(audio, data, device="cpu", workers=1, steps="lms", progress=False)
    (data / "audioset_lms" / "b.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(data / "audioset_lms" / "c.npy", np.zeros((80, 10), np.float32))  # wrong shape
    whole = (data / "audioset_lms" / "a.npy").read_bytes()
    (data / "audioset_lms" / "d.npy").write_bytes(whole[:-100])  # truncated by a copy tool
    np.save(data / "audioset_lms" / "e.npy", np.zeros((1, 80, 7), np.float64))  # wrong dtype
    s = run_prepare(audio, data, steps="list", progress=False)
    assert s["listed"] == 1 and s["invalid_outputs"] == 4
    assert [r["file_name"] for r in read_rows(data / "files_audioset.csv")] == ["audioset_lms/a.npy"]
    assert "delete it and rerun" in capsys.readouterr().err


def test_exit_codes(tmp_path, capsys, metadata):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "only_bad.wav", np.zeros((0, 1), np.float32), 16000)
    assert main([str(audio), str(data), "--device", "cpu", "--no-progress",
                 "--metadata", str(metadata)]) == 1
    assert "no usable LMS file" in capsys.readouterr().err
    assert not (data / "files_as_weighted.csv").exists() and not (data / "norm_stats.json").exists()
    assert main([str(tmp_path / "nowhere"), str(data), "--no-progress"]) == 2
    assert "audio folder" in capsys.readouterr().err
    assert main([str(audio), str(data), "--steps", "lms,bogus"]) == 2
    assert main([str(audio), str(tmp_path / "fresh"), "--steps", "labels",
                 "--metadata", str(metadata)]) == 2
    assert "run the list step first" in capsys.readouterr().err
    assert main([str(audio), str(data), "--device", "tpu", "--no-progress"]) == 2
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    assert main([str(audio), str(tmp_path / "a_file" / "data"), "--no-progress"]) == 2
    assert "cannot write to the data folder" in capsys.readouterr().err


def test_one_prepare_per_data_folder(tmp_path, capsys):
    import fcntl

    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a.wav", tone(1, 16000), 16000)
    data.mkdir()
    with open(data / ".prepare.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running prepare holds it
        assert main([str(audio), str(data), "--device", "cpu", "--no-progress"]) == 1
        assert "another `m2das prepare` is running" in capsys.readouterr().err
        assert not (data / "audioset_lms").exists()
    assert main([str(audio), str(data), "--device", "cpu", "--no-progress",
                 "--steps", "lms,list"]) == 0


def test_offline_without_metadata_exits_2_and_says_what_to_put_where(tmp_path, capsys, monkeypatch):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "--PJHxphWEs_30.000.wav", tone(1, 16000), 16000)
    monkeypatch.setenv(labels.URL_ENV, "http://127.0.0.1:9/unreachable")
    rc = main([str(audio), str(data), "--device", "cpu", "--workers", "1", "--no-progress",
               "--stats-files", "20"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot download AudioSet metadata" in err
    for name in ("eval_segments.csv", "balanced_train_segments.csv", "class_labels_indices.csv"):
        assert name in err
    assert str(data / "metadata") in err and "--metadata DIR" in err
    # everything but the labels is done, kept and usable
    assert read_norm_stats(data / "norm_stats.json")["list_size"] == 1
    assert (data / "audioset_lms" / "--PJHxphWEs_30.000.npy").is_file()
    assert read_rows(data / "files_audioset.csv") == [{"file_name": "audioset_lms/--PJHxphWEs_30.000.npy"}]
    assert not list((data / "metadata").glob("*.csv"))
    rc = main([str(audio), str(data), "--steps", "labels", "--metadata-url", "http://127.0.0.1:9"])
    assert rc == 2 and "http://127.0.0.1:9" in capsys.readouterr().err


def test_metadata_is_downloaded_once_into_the_data_folder(tmp_path, capsys):
    served = tmp_path / "release"
    served.mkdir()
    for name in ("class_labels_indices.csv", "balanced_train_segments.csv", "eval_segments.csv"):
        (served / name).symlink_to(SHARED / name)  # no unbalanced list: a 404 to live with
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "Y--PJHxphWEs.wav", tone(1, 16000), 16000)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        rc = main([str(audio), str(data), "--device", "cpu", "--workers", "1", "--no-progress",
                   "--steps", "lms,list,labels", "--metadata-url", url])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0, capsys.readouterr().err
    assert "could not download unbalanced_train_segments.csv" in capsys.readouterr().err
    for name in ("class_labels_indices.csv", "balanced_train_segments.csv", "eval_segments.csv"):
        assert (data / "metadata" / name).read_bytes() == (SHARED / name).read_bytes()
    # the server is gone: the cached copies are used, only the optional list is retried
    rc = main([str(audio), str(data), "--steps", "labels", "--metadata-url", url])
    assert rc == 0
    (row,) = read_rows(data / "files_as_weighted.csv")
    assert row["file_name"] == "audioset_lms/Y--PJHxphWEs.npy"
    assert row["label"] == "/m/09x0r,/t/dd00088"
    # a mirror on a shared file system works the same way (fsspec)
    mirror_data = tmp_path / "data2"
    rc = main([str(audio), str(mirror_data), "--device", "cpu", "--workers", "1", "--no-progress",
               "--steps", "lms,list,labels", "--metadata-url", served.as_uri()])
    assert rc == 0
    assert read_rows(mirror_data / "files_as_weighted.csv") == [row]
    assert (mirror_data / "metadata" / "eval_segments.csv").read_bytes() == (SHARED / "eval_segments.csv").read_bytes()


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "m2das", "prepare", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_run_then_rerun_equals_one_clean_run(tmp_path, metadata, capsys):
    audio = tmp_path / "audio"
    n = 32
    for i in range(n):
        write(audio / f"d{i % 3}" / f"{i:03d}xxxxxxxx_0.000.wav", tone(10, 44100, 1, 200 + 20 * i, seed=i),
              44100, subtype="PCM_16")
    write(audio / "--PJHxphWEs_30.000.wav", tone(10, 44100, 2), 44100)
    (audio / "zz").mkdir()
    (audio / "zz" / "broken.wav").write_text("not audio")  # the last file of the run
    args = ["--metadata", metadata, "--device", "cpu", "--workers", "2", "--stats-files", "30"]
    killed = tmp_path / "killed"
    killed.mkdir()
    # as left by an earlier complete run: must survive a run stopped before reaching the file
    (killed / "prepare_failures.csv").write_text("file,reason\nzz/broken.wav,seen earlier\n")
    lms_dir = killed / "audioset_lms"

    def run_until(outputs, sig, group):
        proc = _cli(audio, killed, *args, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(lms_dir.rglob("*.npy"))) < outputs:
            time.sleep(0.005)
        (os.killpg if group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        done = list(lms_dir.rglob("*.npy"))
        assert outputs <= len(done) < n, "the signal must land in the middle of the run"
        return proc.returncode, err, done

    # SIGTERM (docker stop, scancel): a clean stop with a hint, the workers go with it
    rc, err, done = run_until(2, signal.SIGTERM, group=False)
    assert rc == 130 and "rerun the same command" in err
    assert len(done) < n - 8, "stopped too late to tell"
    assert read_rows(killed / "prepare_failures.csv") == [{"file": "zz/broken.wav",
                                                          "reason": "seen earlier"}]
    # SIGKILL of the whole run, workers included, like a lost node
    rc, err, done = run_until(len(done) + 3, signal.SIGKILL, group=True)
    assert rc == -signal.SIGKILL
    for path in done:  # nothing half-written under a final name
        assert np.load(path).shape == (1, 80, 1001)
    assert not (killed / "files_as_weighted.csv").exists()

    (killed / ".files_audioset.csv.k1ll3d.tmp").write_text("file_name\naudioset_lms/")  # as a kill leaves
    assert main([str(audio), str(killed), *map(str, args), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"skipped (existing) {len(done)}" in out and "failed             1" in out

    clean = tmp_path / "clean"
    s = run_prepare(audio, clean, metadata_dir=metadata, device="cpu", workers=2,
                    stats_files=30, progress=False)
    assert s["converted"] == n + 1 and s["labelled"] == 1
    assert snapshot(killed) == snapshot(clean)
    assert not [p for p in killed.rglob("*.tmp")]


def test_batched_path_gives_the_same_files_as_per_file_workers(tmp_path):
    """The GPU pipeline (decode in workers, resample + STFT in batches), run here on the CPU."""
    audio = tmp_path / "audio"
    write(audio / "a.wav", tone(10, 44100, 2, seed=1), 44100, subtype="PCM_16")
    write(audio / "b.wav", tone(10, 44100, 2, seed=2), 44100, subtype="PCM_16")
    write(audio / "c.flac", tone(7.5, 48000, 1, seed=3), 48000)
    write(audio / "d.wav", tone(2, 16000, 1, seed=4), 16000)
    write(audio / "e.wav", np.zeros((0, 1), np.float32), 16000)
    per_file = run_lms(audio, tmp_path / "one", device="cpu", workers=2, progress=False)
    batched = run_lms(audio, tmp_path / "batch", device="cpu", workers=2, progress=False,
                      batched=True, batch_size=3)
    for s in (per_file, batched):
        assert (s["converted"], s["failed"]) == (4, 1)
        assert s["hours_converted"] == pytest.approx(29.5 / 3600)
    one, batch = snapshot(tmp_path / "one"), snapshot(tmp_path / "batch")
    assert one["prepare_failures.csv"] == batch["prepare_failures.csv"]
    assert sorted(one) == sorted(batch)
    for name in one:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(tmp_path / "batch" / name),
                                       np.load(tmp_path / "one" / name), atol=1e-4)


def test_bench_prepare_reports_files_per_core(capsys):
    from m2das.machine import cpu_name
    from m2das.tools.bench import prepare_main

    assert prepare_main(["--files", "3", "--workers", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert cpu_name() in out and f"{os.cpu_count()} cores" in out
    assert "cpu, new (soxr HQ): 3 clips (10 s, 44.1 kHz, stereo, 16-bit wav)" in out
    assert "cpu, old (torchaudio Resample defaults): 3 clips" in out and "files/s per core" in out


def _upper_or_die(name: str) -> str:
    """Runs in a worker process: a name starting with "crash" kills that process for real."""
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    return name.upper()


def test_robust_map_isolates_the_input_that_kills_its_worker():
    from m2das.data.convert import CRASHED, robust_map

    names = [f"f{i}" for i in range(10)] + ["crash-me"] + [f"g{i}" for i in range(10)]
    got = dict(robust_map(_upper_or_die, names, workers=2))
    assert got == {**{n: n.upper() for n in names if n != "crash-me"}, "crash-me": CRASHED}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_worker_killed_mid_run_costs_no_file(tmp_path):
    """The OOM killer takes a worker: the run neither hangs nor loses or fails a file."""
    audio, data = tmp_path / "audio", tmp_path / "data"
    n = 20
    for i in range(n):
        write(audio / f"{i:03d}.wav", tone(10, 44100, 1, 300 + 10 * i, seed=i), 44100, subtype="PCM_16")
    victims = []

    def kill_one_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not victims:
            if len(list((data / "audioset_lms").glob("*.npy"))) >= 2:
                # workers are children of the worker server, itself a child of this process
                workers = [w for server in _children(os.getpid()) for w in _children(server)]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    victims.append(workers[0])
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    s = run_lms(audio, data, device="cpu", workers=2, progress=False)
    killer.join()
    assert victims, "no worker was killed"
    assert (s["converted"], s["failed"]) == (n, 0)
    for i in range(n):
        assert np.load(data / "audioset_lms" / f"{i:03d}.npy").shape == (1, 80, 1001)


def test_file_names_beyond_ascii(tmp_path):
    """UTF-8 names go through; a name that is not UTF-8 is a failure the lists can still hold."""
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "Ünïcødé_ß" / "--PJHxphWEs_30.000.wav", tone(1, 16000), 16000)
    write(audio / "tmp.wav", tone(1, 16000), 16000)
    os.rename(audio / "tmp.wav", os.fsencode(audio) + b"/caf\xe9.wav")  # latin-1 bytes on disk
    s = run_prepare(audio, data, device="cpu", workers=1, steps="lms,list", progress=False)
    assert (s["converted"], s["failed"], s["listed"]) == (1, 1, 1)
    listed = (data / "files_audioset.csv").read_bytes().decode("utf-8")
    assert listed == "file_name\naudioset_lms/Ünïcødé_ß/--PJHxphWEs_30.000.npy\n"
    (row,) = read_rows(data / "prepare_failures.csv")
    assert row == {"file": "caf\\xe9.wav", "reason": "file name is not valid UTF-8; rename it (e.g. with convmv)"}
    (data / "prepare_failures.csv").read_bytes().decode("utf-8")


# ---------------------------------------------------------------- real-world trees


def test_a_symlink_loop_is_walked_once(tmp_path):
    audio = tmp_path / "audio"
    write(audio / "a" / "x.wav", tone(1, 16000), 16000)
    write(audio / "b" / "y.wav", tone(1, 16000, seed=1), 16000)
    (audio / "a" / "loop").symlink_to("..")  # a/loop/a/loop/... for 40 levels if followed blindly
    (audio / "c").symlink_to("b")  # the same folder under two names: converted once
    (audio / "d").mkdir()
    (audio / "d" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    write(tmp_path / "elsewhere" / "z.wav", tone(1, 16000, seed=2), 16000)  # outside: followed
    s = run_lms(audio, tmp_path / "data", device="cpu", workers=1, progress=False)
    assert (s["audio_files"], s["converted"], s["failed"]) == (3, 3, 0)
    outputs = sorted(p.relative_to(tmp_path / "data").as_posix()
                     for p in (tmp_path / "data").rglob("*.npy"))
    assert outputs == ["audioset_lms/a/x.npy", "audioset_lms/b/y.npy", "audioset_lms/d/linked/z.npy"]


def unprivileged(cmd: list) -> list:
    """`cmd` as it runs for a user without the right to read other people's files.

    Root reads everything: there, the command runs without the two capabilities
    that override file permissions (setpriv), so chmod 0 files are refused for real.
    """
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]


def test_unreadable_folder_and_file_are_in_the_failure_list(tmp_path):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "ok.wav", tone(1, 16000), 16000)
    write(audio / "locked" / "inside.wav", tone(1, 16000, seed=1), 16000)
    write(audio / "secret.wav", tone(1, 16000, seed=2), 16000)
    os.chmod(audio / "secret.wav", 0)
    os.chmod(audio / "locked", 0)
    try:
        r = subprocess.run(unprivileged([sys.executable, "-m", "m2das", "prepare", str(audio), str(data),
                                         "--steps", "lms", "--device", "cpu", "--workers", "1",
                                         "--no-progress"]),
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                           text=True, timeout=120)
    finally:
        os.chmod(audio / "locked", 0o755)
    assert r.returncode == 0, r.stderr
    failures = {row["file"]: row["reason"] for row in read_rows(data / "prepare_failures.csv")}
    assert set(failures) == {"locked/", "secret.wav"}
    assert failures["locked/"].startswith("folder not readable (permission denied)")
    assert failures["secret.wav"].startswith("permission denied")
    assert [p.name for p in (data / "audioset_lms").rglob("*.npy")] == ["ok.npy"]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def test_workers_and_forkserver_exit_after_the_main_process_is_killed(tmp_path):
    audio = tmp_path / "audio"
    clip = tone(0.5, 22050, 2)
    for i in range(300):  # a second or more of work left when the first output appears
        write(audio / f"{i:03d}.wav", clip, 22050, subtype="PCM_16")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "m2das", "prepare", audio, tmp_path / "data",
                             "--steps", "lms", "--device", "cpu", "--workers", "2", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    helpers = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((tmp_path / "data").rglob("*.npy")):
            time.sleep(0.01)
        helpers = _descendants(proc.pid)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert len(helpers) >= 3, "expected the forkserver and its two workers"  # + resource tracker
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as an OOM killer would
        proc.wait(timeout=30)
        assert len(list((tmp_path / "data").rglob("*.npy"))) < 300, "killed too late to tell"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [p for p in helpers if Path(f"/proc/{p}").exists()]:
            time.sleep(0.05)
        left = [p for p in helpers if Path(f"/proc/{p}").exists()]
        assert not left, f"{len(left)} helper processes outlived the killed main process"
    finally:
        for pid in [proc.pid, *helpers]:  # never leave them to the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the LMS recipe of a data folder


def test_a_folder_of_the_references_recipe_without_a_record_is_taken_as_it_is(tmp_path, capsys):
    """The reference's wav_to_lms.py writes soxr-HQ LMS and no lms_recipe.json: `m2das prepare` tells
    them from old m2das output by content, adds the new clips and records the paper's recipe."""
    from m2das.data.recipe import record_recipe

    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a16k.wav", tone(7, 16000, seed=1), 16000)
    write(audio / "b44k.wav", tone(7, 44100, 2, seed=2), 44100, subtype="PCM_16")
    run_lms(audio, data, device="cpu", workers=1, progress=False)
    (data / "lms_recipe.json").unlink()  # as the reference leaves it
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    write(audio / "c48k.flac", tone(7, 48000, seed=3), 48000)
    old = snapshot(data)
    capsys.readouterr()
    s = run_lms(audio, data, device="cpu", workers=1, progress=False)
    assert (s["converted"], s["reconverted"], s["other_recipe_outputs"]) == (1, 0, 0)
    assert all((data / name).read_bytes() == data_ for name, data_ in old.items())  # kept as they are
    record = json.loads((data / "lms_recipe.json").read_text())
    assert record["recipe"]["resampler"] == "soxr" and record["recipe"]["resampler_quality"] == "HQ"
    assert "warning" not in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert record_recipe(tmp_path / "run", copy) is None  # the trainer: no false warning


def test_a_folder_of_the_old_recipe_is_refused_then_reconverted(tmp_path, capsys):
    """Old folders (torchaudio resampling, no recipe record) never mix silently with new files."""
    from m2das.data.audio import LEGACY_RESAMPLER
    from m2das.data.recipe import record_recipe

    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a16k.wav", tone(7, 16000, seed=1), 16000)
    write(audio / "b44k.wav", tone(7, 44100, 2, seed=2), 44100, subtype="PCM_16")
    run_lms(audio, data, device="cpu", workers=1, progress=False, resampler=LEGACY_RESAMPLER)
    (data / "lms_recipe.json").unlink()  # as written before the record existed
    np.save(data / "audioset_lms" / "gone.npy", np.zeros((1, 80, 611), np.float32))  # its audio deleted
    write(audio / "c48k.flac", tone(7, 48000, seed=3), 48000)  # new since then
    old = snapshot(data)
    old_copy = tmp_path / "old_data"
    shutil.copytree(data, old_copy)
    (tmp_path / "old_run").mkdir()

    with pytest.raises(PrepareError) as err:
        run_lms(audio, data, device="cpu", workers=1, progress=False)
    assert err.value.code == 2
    assert "torchaudio" in str(err.value) and "--reconvert" in str(err.value)
    assert snapshot(data) == old  # refused before anything was written
    capsys.readouterr()
    assert main([str(audio), str(data), "--steps", "lms", "--device", "cpu", "--workers", "1",
                 "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    s = run_lms(audio, data, device="cpu", workers=1, progress=False, reconvert=True)
    assert (s["converted"], s["reconverted"], s["other_recipe_outputs"]) == (2, 1, 1)
    lms = data / "audioset_lms"
    assert (lms / "a16k.npy").read_bytes() == old["audioset_lms/a16k.npy"]  # 16 kHz: same either way
    assert (lms / "b44k.npy").read_bytes() != old["audioset_lms/b44k.npy"]
    for name in ("b44k.wav", "c48k.flac"):
        np.testing.assert_array_equal(np.load(lms / name.replace(Path(name).suffix, ".npy")),
                                      lms_from_file(audio / name)[0])
    record = json.loads((data / "lms_recipe.json").read_text())
    assert record["recipe"]["resampler"] == "soxr" and record["recipe"]["resampler_quality"] == "HQ"
    assert record["other_recipe_outputs"] == ["audioset_lms/gone.npy"]
    # a rerun is at peace with the folder, and says what is left
    s = run_lms(audio, data, device="cpu", workers=1, progress=False)
    assert (s["converted"], s["other_recipe_outputs"]) == (0, 1)
    assert "rerun with --reconvert" in capsys.readouterr().err

    # the trainer's side: the run pins the recipe and warns about the file left over
    run = tmp_path / "run"
    run.mkdir()
    # without the audio the trainer cannot tell; it assumes the common case, the reference's recipe
    assert record_recipe(tmp_path / "old_run", old_copy) is None
    assert json.loads((tmp_path / "old_run" / "lms_recipe.json").read_text())["recipe"]["resampler"] == "soxr"
    warning = record_recipe(run, data)
    assert "1 LMS files" in warning and "gone.npy" in warning
    assert json.loads((run / "lms_recipe.json").read_text())["recipe"] == record["recipe"]
    (lms / "gone.npy").unlink()
    s = run_lms(audio, data, device="cpu", workers=1, progress=False, reconvert=True)
    assert s["other_recipe_outputs"] == 0
    assert record_recipe(run, data) is None
    # the data folder changes recipe under a running run: warned as mixing
    record["recipe"]["resampler_quality"] = "VHQ"
    (data / "lms_recipe.json").write_text(json.dumps(record))
    assert "mixes recipes" in record_recipe(run, data)


def test_prepare_without_folders_prints_its_usage(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: m2das prepare" in err and "AUDIO_DIR" in err and "DATA_DIR" in err


def test_stats_step_names_a_file_with_nan(tmp_path, capsys):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a.wav", tone(7, 16000), 16000)
    run_prepare(audio, data, device="cpu", workers=1, steps="lms,list", progress=False)
    lms = np.load(data / "audioset_lms" / "a.npy")
    lms[0, 3, 100:700] = np.nan  # inside every 608-frame crop
    np.save(data / "audioset_lms" / "a.npy", lms)
    capsys.readouterr()
    assert main([str(audio), str(data), "--steps", "stats", "--stats-files", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.npy: NaN or inf" in err[0]
    assert not (data / "norm_stats.json").exists()


# ---------------------------------------------------------------- AudioSet lists


def test_metadata_is_fetched_over_https_only():
    assert labels.DEFAULT_URL_BASE.startswith("https://")
    with pytest.raises(labels.MetadataError, match="plain http is refused"):
        labels.fetch_metadata("/nonexistent", "http://storage.googleapis.com/us_audioset")
    labels.check_url("http://127.0.0.1:8000/csv")  # loopback: never crosses a network


def test_a_bad_downloaded_list_is_refused_with_one_line(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "class_labels_indices.csv").symlink_to(SHARED / "class_labels_indices.csv")
    (mirror / "balanced_train_segments.csv").symlink_to(SHARED / "balanced_train_segments.csv")
    (mirror / "eval_segments.csv").write_text("<html><body>Access denied</body></html>\n")
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "--PJHxphWEs_30.000.wav", tone(1, 16000), 16000)
    run_prepare(audio, data, device="cpu", workers=1, steps="lms,list", progress=False)
    args = [str(audio), str(data), "--steps", "labels", "--metadata-url", mirror.as_uri()]
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("m2das prepare:")]
    assert len(err) == 1 and "eval_segments.csv: not an AudioSet list" in err[0]
    assert "<html>" in err[0]
    assert not (data / "metadata" / "eval_segments.csv").exists()  # nothing bad is kept
    # a download cut short: fewer rows than its header states
    head = (SHARED / "eval_segments.csv").read_text().splitlines()[:1000]
    (mirror / "eval_segments.csv").write_text("\n".join(head) + "\n")
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("m2das prepare:")]
    assert len(err) == 1 and "997 rows where its header states num_segs=20371" in err[0]
    assert not (data / "metadata" / "eval_segments.csv").exists()
    (mirror / "eval_segments.csv").unlink()
    (mirror / "eval_segments.csv").symlink_to(SHARED / "eval_segments.csv")
    assert main(args) == 0  # the good list is taken
    assert (data / "metadata" / "eval_segments.csv").read_bytes() == (SHARED / "eval_segments.csv").read_bytes()


# ---------------------------------------------------------------- flags and inputs


def test_flags_take_hyphens_and_underscores(tmp_path, capsys):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a.wav", tone(7, 16000), 16000)
    assert main([str(audio), str(data), "--steps", "lms,list", "--device", "cpu", "--workers", "1",
                 "--no_progress"]) == 0
    for flag, count in (("--stats_files", 7), ("--stats-files", 9)):
        assert main([str(audio), str(data), "--steps", "stats", "--no-progress", flag, str(count)]) == 0
        assert read_norm_stats(data / "norm_stats.json")["num_files"] == count
    capsys.readouterr()
    assert main([str(audio), str(data), "--steps", "stats", "--stats_files", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "m2das prepare: --stats-files 0: expected at least 1 (default 5000)"]


def test_a_wrong_metadata_folder_is_refused_before_any_step(tmp_path, capsys, metadata):
    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "--PJHxphWEs_30.000.wav", tone(7, 16000), 16000)  # a clip of the lists
    wrong = tmp_path / "not_metadata"
    wrong.mkdir()
    (wrong / "eval_segments.csv").symlink_to(metadata / "eval_segments.csv")
    assert main([str(audio), str(data), "--device", "cpu", "--workers", "1", "--no-progress",
                 "--metadata", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "class_labels_indices.csv" in err and str(wrong) in err
    assert not data.exists()  # not one LMS file converted before the refusal
    assert main([str(audio), str(data), "--device", "cpu", "--workers", "1", "--no-progress",
                 "--metadata", str(metadata), "--stats-files", "5"]) == 0


def test_device_spellings(tmp_path, capsys):
    """`gpu` means cuda, as in train; anything else is one line and exit 2 before any work."""
    import torch

    audio, data = tmp_path / "audio", tmp_path / "data"
    write(audio / "a.wav", tone(7, 16000), 16000)
    assert main([str(audio), str(data), "--device", "foo", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "'foo'" in err[0]
    rc = main([str(audio), str(data), "--steps", "lms", "--device", "gpu", "--workers", "1", "--no-progress"])
    if torch.cuda.is_available():
        assert rc == 0 and (data / "audioset_lms" / "a.npy").is_file()
    else:
        assert rc == 2 and "no CUDA device is visible" in capsys.readouterr().err
        assert not data.exists()
