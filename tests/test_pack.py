"""`m2das pack` and packed folders in the trainer: real files, real subprocesses, a real SIGKILL."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN, run_m2das, write_lms_folder
from m2das.data import packed
from m2das.data.dataset import DataListError, make_dataset, read_samples, validate_packed
from m2das.data.stats import compute_norm_stats, write_norm_stats
from m2das.datafolder import NORM_STATS


def data_folder(root: Path, n_files: int = 12) -> Path:
    """A prepared folder with its norm stats, as `m2das prepare` leaves it."""
    data = write_lms_folder(root, n_files=n_files)
    paths = sorted((data / "audioset_lms").glob("*.npy"))
    write_norm_stats(data / NORM_STATS, compute_norm_stats(paths, num_files=50, frames=208))
    return data


def pack(data, *args, env=None):
    r = run_m2das("pack", data, *args, env=env)
    assert r.returncode == 0, r.stderr
    return r


def folder_bytes(folder: Path) -> dict:
    """Every file's bytes, but the verification cache (it records file times)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != packed.VERIFIED}


def train(data, run, *extra):
    return run_m2das("train", *TINY_TRAIN, "--data_path", data, "--output_dir", run, "--batch_size", "2",
                     "--epochs", "1", *extra)


def test_training_on_packed_data_equals_loose_files_and_resumes_exactly(tmp_path):
    data = data_folder(tmp_path / "data")
    pack(data, "--shard-size", "150K")  # several shards, a few samples each
    loose, pk = tmp_path / "loose", tmp_path / "packed"
    r = train(data, loose)
    assert r.returncode == 0, r.stderr
    r = train(data / "packed", pk, "--num_workers", "1")  # a worker process opens its own shard handles
    assert r.returncode == 0, r.stderr
    assert "shards" in r.stdout  # validation read the index and the shards
    a = torch.load(loose / "checkpoint-1.pth", map_location="cpu")["model"]
    b = torch.load(pk / "checkpoint-1.pth", map_location="cpu")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "float32 packed batches must equal loose ones bit for bit"
    assert json.loads((pk / "classes.json").read_text()) == json.loads((loose / "classes.json").read_text())
    stopped = tmp_path / "stopped"  # exact resume on packed data: SIGTERM in step 3, rerun, same weights
    r = run_m2das("train", *TINY_TRAIN, "--data_path", data / "packed", "--output_dir", stopped, "--batch_size", "2",
                  "--epochs", "1", env={"M2DAS_TEST_SIGTERM_AT_STEP": "3"})
    assert r.returncode == 75, r.stderr
    assert train(data / "packed", stopped).returncode == 0
    c = torch.load(stopped / "checkpoint-1.pth", map_location="cpu")["model"]
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_packed_crops_equal_loose_crops_for_every_length(tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "MAX_OPEN", 2)  # more shards than open files: the reader closes the oldest
    data = data_folder(tmp_path / "data", n_files=12)
    pack(data, "--shard-size", "100K")
    loose = read_samples(data, data / "files_as_weighted.csv")
    pk = read_samples(data / "packed", None)
    assert pk.files == loose.files and pk.classes == loose.classes
    assert np.array_equal(pk.weights, loose.weights)
    for frames in (100, 208, 400):  # crop inside, crop of a longer clip, right zero padding
        a, b = make_dataset(loose, frames, 3), make_dataset(pk, frames, 3)
        for i in range(len(loose)):
            (xa, ya), (xb, yb) = a[(2, i, i)], b[(2, i, i)]
            assert xa.numpy().tobytes() == xb.numpy().tobytes() and torch.equal(ya, yb)
    assert len(b.reader._fds) == 2


def test_a_killed_pack_rerun_equals_a_clean_pack(tmp_path):
    data = data_folder(tmp_path / "data")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    pack(data, "--out", clean, "--shard-size", "100K")
    r = run_m2das("pack", data, "--out", resumed, "--shard-size", "100K",
                  env={"M2DAS_TEST_PACK_KILL_IN_SHARD": "4"})  # SIGKILLs itself while writing shard 4
    assert r.returncode == -signal.SIGKILL
    assert not (resumed / packed.MANIFEST).exists()
    assert list(resumed.glob(".shard-00004.bin.*.tmp")), "killed in the middle of a shard"
    with open(resumed / "shard-00001.bin", "r+b") as f:  # and a finished shard damaged since
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    r = pack(data, "--out", resumed, "--shard-size", "100K")
    assert "shard-00000.bin kept (verified)" in r.stderr and "shard-00001.bin written" in r.stderr
    assert "shard-00002.bin kept (verified)" in r.stderr and "shard-00004.bin written" in r.stderr
    assert folder_bytes(resumed) == folder_bytes(clean)
    r = pack(data, "--out", resumed, "--shard-size", "100K")  # a finished pack: everything kept
    assert " written:" not in r.stderr
    assert folder_bytes(resumed) == folder_bytes(clean)


def test_a_damaged_shard_stops_training_with_one_line_naming_it(tmp_path):
    data = data_folder(tmp_path / "data", n_files=8)
    pack(data, "--shard-size", "100K")
    shutil.copytree(data / "packed", tmp_path / "copy")
    flipped, truncated = data / "packed" / "shard-00002.bin", tmp_path / "copy" / "shard-00001.bin"
    with open(flipped, "r+b") as f:  # same size, one byte changed
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(truncated, truncated.stat().st_size - 320)
    for shard in (flipped, truncated):
        r = train(shard.parent, tmp_path / f"run-{shard.parent.name}")
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(shard) in lines[0] and "damaged shard" in lines[0], r.stderr


def test_validation_rechecks_a_shard_changed_after_it_was_validated(tmp_path):
    data = data_folder(tmp_path / "data", n_files=8)
    pack(data, "--shard-size", "100K")
    samples = read_samples(data / "packed", None)
    stamp = validate_packed(samples, None)
    assert validate_packed(samples, stamp) == stamp
    shard = data / "packed" / "shard-00001.bin"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(DataListError, match="shard-00001.bin: damaged shard"):
        validate_packed(samples, stamp)


def test_float16_halves_the_bytes_within_the_documented_error(tmp_path):
    data = data_folder(tmp_path / "data", n_files=4)
    rng = np.random.default_rng(1)
    for path in sorted((data / "audioset_lms").glob("*.npy")):  # the LMS range: ln(eps) = -15.9 .. 10
        lms = np.load(path)
        np.save(path, rng.uniform(-16, 10, size=lms.shape).astype(np.float32))
    pack(data, "--out", tmp_path / "p32")
    pack(data, "--out", tmp_path / "p16", "--dtype", "float16")
    size = {d: sum(p.stat().st_size for p in (tmp_path / d).glob("shard-*.bin")) for d in ("p32", "p16")}
    assert size["p16"] * 2 == size["p32"]
    loose, half = read_samples(data, data / "files_as_weighted.csv"), read_samples(tmp_path / "p16", None)
    a, b = make_dataset(loose, 208, 3), make_dataset(half, 208, 3)
    err = max(float((a[(0, i, i)][0] - b[(0, i, i)][0]).abs().max()) for i in range(len(loose)))
    assert 0 < err <= 2 ** -8  # 0.0039: half an ulp of float16 in [8, 16)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    data = data_folder(tmp_path / "data", n_files=4)
    (data / "audioset_lms" / "clip002.npy").unlink()
    r = run_m2das("pack", data)
    assert r.returncode == 2 and "clip002.npy: missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (data / "packed").exists()
    bad = np.zeros((1, 80, 200), dtype=np.float32)
    bad[0, 3, 7] = np.nan
    np.save(data / "audioset_lms" / "clip002.npy", bad)
    r = run_m2das("pack", data)
    assert r.returncode == 2 and "clip002.npy: NaN or inf" in r.stderr.strip().splitlines()[-1]
    r = run_m2das("pack", tmp_path / "nowhere")
    assert r.returncode == 2 and "no such data folder" in r.stderr


def test_a_packed_folder_is_its_own_list(tmp_path):
    data = data_folder(tmp_path / "data", n_files=4)
    pack(data)
    assert packed.is_packed(data / "packed") and not packed.is_packed(data)
    with pytest.raises(DataListError, match="carries its own list"):
        read_samples(data / "packed", tmp_path / "other.csv")
    with pytest.raises(DataListError, match="from a URL only packed folders are read"):
        read_samples("memory://m2das-test/nothing-here", None)
    os.remove(data / "packed" / packed.INDEX)
    with pytest.raises(DataListError, match="index.npz: cannot be read"):
        read_samples(data / "packed", None)


def test_a_packed_folder_in_s3_reads_and_trains_like_a_local_one(tmp_path, s3_server):
    import fsspec

    data = data_folder(tmp_path / "data", n_files=8)
    pack(data, "--shard-size", "100K")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("m2das-test-data")
    fs.put(str(data / "packed") + "/", "m2das-test-data/packed", recursive=True)
    url = "s3://m2das-test-data/packed"
    local, remote = read_samples(data / "packed", None), read_samples(url, None)
    a, b = make_dataset(local, 208, 3), make_dataset(remote, 208, 3)
    for i in range(len(local)):  # range requests give the same crops
        assert torch.equal(a[(0, i, i)][0], b[(0, i, i)][0])
    keys = [(1, p, i) for p, i in enumerate(reversed(range(len(local))))]
    batch = b.__getitems__(keys)  # what the DataLoader calls: concurrent range requests
    assert all(torch.equal(x, a[k][0]) and torch.equal(y, a[k][1]) for (x, y), k in zip(batch, keys))
    stamp = validate_packed(remote, None)
    assert validate_packed(remote, stamp) == stamp
    r = train(url, tmp_path / "run", "--num_workers", "1")  # the trainer, and a worker process, over S3
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoint-1.pth").exists()
    fs.pipe("m2das-test-data/packed/shard-00001.bin", b"\0" * 10)  # replaced by a short object
    with pytest.raises(DataListError, match="shard-00001.bin: damaged shard"):
        validate_packed(remote, stamp)


def test_a_re_prepared_file_is_packed_again_and_a_busy_folder_refused(tmp_path):
    import fcntl

    data = data_folder(tmp_path / "data", n_files=6)
    pack(data, "--shard-size", "100K")
    target = data / "audioset_lms" / "clip003.npy"
    np.save(target, np.full((1, 80, 170), -3.0, dtype=np.float32))  # prepare --reconvert wrote it anew
    r = pack(data, "--shard-size", "100K")
    assert "shard-00002.bin written" in r.stderr  # clip003 lies in shard 2; the others are kept
    assert "shard-00001.bin kept (verified)" in r.stderr and "shard-00003.bin kept (verified)" in r.stderr
    samples = read_samples(data / "packed", None)
    x, _ = make_dataset(samples, 208, 0)[(0, 0, 3)]
    assert torch.all(x[..., :170] == -3.0) and torch.all(x[..., 170:] == 0)
    fd = os.open(data / "packed", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = run_m2das("pack", data)
    finally:
        os.close(fd)
    assert r.returncode == 2 and "another `m2das pack` is writing" in r.stderr


def test_flags_take_hyphens_and_underscores(tmp_path):
    from m2das.data.pack import main

    data = data_folder(tmp_path / "data", n_files=4)
    assert main([str(data), "--out", str(tmp_path / "a"), "--shard_size", "100K", "--dtype", "float16"]) == 0
    assert main([str(data), "--out", str(tmp_path / "b"), "--shard-size", "100K", "--dtype", "float16"]) == 0
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert len(packed.read_manifest(tmp_path / "a")["shards"]) > 1  # the size took effect in both spellings
