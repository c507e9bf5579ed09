"""Bad data is named: log-mels outside the physical range, crafted packed indexes and manifests,
and bit rot under a restored mtime. Real files; the CLIs (`m2das train`, `pack`, `prepare`) called through
their main() with argv, as the command line calls them: exit code and stderr are theirs."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

from conftest import TINY_TRAIN, write_lms_folder
from m2das import train
from m2das.data import packed
from m2das.data.dataset import DataListError, make_dataset, read_list, read_samples, validate_packed
from m2das.data.pack import main as pack_main, sample_bytes
from m2das.data.stats import read_norm_stats
from m2das.datafolder import FILE_LIST, NORM_STATS, WEIGHTED_LIST
from m2das.runfolder import EXIT_BAD_INPUT


def huge(path, value=1e30):
    """An LMS file of the right shape and dtype, every value finite but far beyond any log-mel."""
    np.save(path, np.full(np.load(path).shape, value, dtype=np.float32))


def train_main(data, run, *extra) -> int:
    return train.main([*TINY_TRAIN, "--data_path", str(data), "--output_dir", str(run), "--batch_size", "2",
                       "--epochs", "1", *extra])


@pytest.fixture(scope="module")
def packed_once(tmp_path_factory):
    """8 clips in 4 shards, packed once for the module (tests work on copies)."""
    data = write_lms_folder(tmp_path_factory.mktemp("bad-data") / "data", n_files=8)
    (data / NORM_STATS).write_text('{"mean": -7.0, "std": 4.0}\n')
    assert pack_main([str(data), "--shard-size", "140K"]) == 0
    return data / "packed"


def copy_of(folder, to):
    shutil.copytree(folder, to)
    return to


def test_a_log_mel_of_1e30_is_named_with_exit_2_by_train_pack_and_stats(tmp_path, capsys):
    from m2das.data.prepare import main as prepare_main

    data = write_lms_folder(tmp_path / "data", n_files=6)
    victim = data / "audioset_lms" / "clip003.npy"
    huge(victim)
    # train without prepare's statistics: the stats step meets the file (it used to pin mean 3.7e37)
    assert train_main(data, tmp_path / "run") == EXIT_BAD_INPUT
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{victim}: value 1e+30 in the LMS, outside the log-mel range" in errors[0]
    assert not (tmp_path / "run" / NORM_STATS).exists()
    # with statistics in place, the crop check the trainer's workers run (it used to end in exit 3)
    samples = read_list(data / WEIGHTED_LIST, data)
    with pytest.raises(DataListError, match=f"{victim}: value 1e\\+30"):
        make_dataset(samples, 208, 0)[(0, 0, 3)]
    # m2das prepare's stats step
    (data / FILE_LIST).write_text("file_name\n" + "".join(f"{n}\n" for n in samples.files))
    (tmp_path / "audio").mkdir()
    capsys.readouterr()
    assert prepare_main([str(tmp_path / "audio"), str(data), "--steps", "stats", "--stats-files", "40",
                         "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{victim}: value 1e+30" in err[0] and not (data / NORM_STATS).exists()
    # m2das pack, with its statistics computed and with them given; -3e38 on the low side
    assert pack_main([str(data)]) == EXIT_BAD_INPUT
    assert f"{victim}: value 1e+30" in capsys.readouterr().err
    (data / NORM_STATS).write_text('{"mean": -7.0, "std": 4.0}\n')
    huge(victim, -3e38)
    assert pack_main([str(data), "--dtype", "float16"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{victim}: value -3e+38" in err[-1] and not (data / "packed" / packed.MANIFEST).exists()
    # statistics a broken file already pinned are refused, naming their file
    (data / NORM_STATS).write_text('{"mean": 3.7e37, "std": 1e30}\n')
    with pytest.raises(ValueError, match=f"{data / NORM_STATS}: mean 3.7e\\+37"):
        read_norm_stats(data / NORM_STATS)
    # the paper's range passes at both ends
    np.save(victim, np.linspace(-16, 10, 80 * 200, dtype=np.float32).reshape(1, 80, 200))
    frames, data_bytes = sample_bytes(victim, np.dtype("float16"))
    assert frames == 200 and len(data_bytes) == 80 * 200 * 2


def rewrite_index(folder, **changes):
    """Change index arrays and re-record the index's CRC32: a crafted index that passes the checksum."""
    with np.load(folder / packed.INDEX) as z:
        arrays = {k: z[k] for k in z.files}
    for key, edit in changes.items():
        arrays[key] = edit(arrays[key].copy())
    packed.write_index(folder / packed.INDEX, arrays)
    blob = (folder / packed.INDEX).read_bytes()
    edit_manifest(folder, lambda m: m["index"].update(bytes=len(blob), crc32=zlib.crc32(blob)))


def edit_manifest(folder, edit):
    manifest = json.loads((folder / packed.MANIFEST).read_text())
    edit(manifest)
    (folder / packed.MANIFEST).write_text(json.dumps(manifest))


def at(i, value):
    def edit(a):
        a[i] = value
        return a
    return edit


CRAFTED = {  # what is changed -> what the error says
    "shard -1": (dict(shard=at(5, -1)), "row 5 (audioset_lms/clip005.npy): shard outside 0..", packed.INDEX),
    "label -1": (dict(label_ids=at(0, -1)), "label ids span -1..", packed.INDEX),
    "offset -5000": (dict(offset=at(2, -5000)), "row 2 (audioset_lms/clip002.npy): negative byte offset",
                     packed.INDEX),
    "past the shard's end": (dict(offset=at(1, 90_000)), "row 1 (audioset_lms/clip001.npy): its bytes run past",
                             packed.INDEX),
    "weight NaN": (dict(weights=at(4, np.nan)), "row 4 (audioset_lms/clip004.npy): weight", packed.INDEX),
    "label offsets backwards": (dict(label_offsets=at(3, 100)), "label offsets go backwards", packed.INDEX),
    "a row missing": (dict(frames=lambda a: a[:-1]), "rows per array {'frames': 7}, the manifest records 8",
                      packed.INDEX),
    "frames 2**62": (dict(frames=lambda a: np.full(len(a), 2 ** 62, dtype=np.int64)), "row 0 (audioset_lms/clip000"
                     ".npy): its bytes run past", packed.INDEX),
}
MANIFESTS = {
    "missing key": (lambda m: m.pop("n_mels"), "'n_mels' is missing"),
    "missing shard key": (lambda m: m["shards"][1].pop("bytes"), "shard 1: 'bytes' is missing"),
    "../ shard": (lambda m: m["shards"][0].update(name="../data/audioset_lms/clip000.npy"), "leaves the packed"),
    "absolute shard": (lambda m: m["shards"][0].update(name="/etc/passwd"), "'/etc/passwd' leaves the packed"),
    "../ index": (lambda m: m["index"].update(name="../files_as_weighted.csv"), "leaves the packed folder"),
    "norm stats 3.7e37": (lambda m: m["norm_stats"].update(mean=3.7e37), "mean 3.7e+37 / std"),
}


def test_a_crafted_index_or_manifest_is_refused_naming_the_file(tmp_path, packed_once, capsys):
    original = packed_once
    assert packed.load_packed(original).shard[5] >= 0 and len(packed.read_manifest(original)["shards"]) > 1
    for n, (what, (changes, message, name)) in enumerate({**CRAFTED, **{
            k: (None, msg, packed.MANIFEST) for k, (_, msg) in MANIFESTS.items()}}.items()):
        folder = copy_of(original, tmp_path / f"crafted{n}")
        if changes is None:
            edit_manifest(folder, MANIFESTS[what][0])
        else:
            rewrite_index(folder, **changes)
        with pytest.raises(packed.PackError) as e:
            packed.load_packed(folder)
        text = str(e.value)
        assert text.startswith(f"{folder / name}: ") and message in text and "m2das pack" in text, (what, text)
        assert "\n" not in text
    # the trainer: one line, exit 2, nothing read from outside the folder
    folder = copy_of(original, tmp_path / "crafted-cli")
    edit_manifest(folder, MANIFESTS["../ shard"][0])
    capsys.readouterr()
    assert train_main(folder, tmp_path / "run") == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{folder / packed.MANIFEST}: shard 0: file name" in lines[0], lines


def flip_keeping_mtime(shard, at_byte=1000):
    """Bit rot: one byte changed, size and modification time as before."""
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(at_byte)
        byte = f.read(1)
        f.seek(at_byte)
        f.write(bytes([byte[0] ^ 0x10]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_mtime_ns == st.st_mtime_ns


def test_bit_rot_under_a_restored_mtime_is_caught_on_demand_and_on_schedule(tmp_path, packed_once, capsys):
    folder = copy_of(packed_once, tmp_path / "packed")
    samples = read_samples(folder, None)
    stamp = validate_packed(samples, None, every=3, start=0)  # the run's first start reads every shard
    assert stamp[packed.FULL_READ_KEY] == 0
    shard = folder / "shard-00002.bin"
    flip_keeping_mtime(shard)
    for start in (1, 2):  # what the default and the off-schedule starts do not catch: the fingerprint matches
        assert validate_packed(samples, stamp, every=3, start=start) == stamp
    assert validate_packed(samples, None) == {**stamp, packed.FULL_READ_KEY: None}  # verified.json from pack
    with pytest.raises(DataListError, match="shard-00002.bin: damaged shard \\(CRC32"):
        validate_packed(samples, stamp, every=3, start=3)  # three starts since the last full read
    # the trainer's schedule counts the run folder's starts: --verify_shards 2 reads all at starts 1 and 3
    from m2das import config, events, runfolder
    from m2das.runsetup import validate_once

    scheduled, run = copy_of(packed_once, tmp_path / "scheduled"), tmp_path / "scheduled-run"
    run.mkdir()
    cfg = config.parse_args([*TINY_TRAIN, "--data_path", str(scheduled), "--verify_shards", "2"])
    samples = read_samples(scheduled, None)
    validate_once(samples, cfg, run)
    flip_keeping_mtime(scheduled / "shard-00001.bin")
    events.record(run, runfolder.EVENT_START)
    validate_once(samples, cfg, run)  # the second start: fingerprints only
    events.record(run, runfolder.EVENT_START)
    with pytest.raises(DataListError, match="shard-00001.bin: damaged shard"):
        validate_once(samples, cfg, run)
    # on demand, from the command line: --verify_shards 1 reads every shard at this start
    capsys.readouterr()
    assert train_main(folder, tmp_path / "run", "--verify_shards", "1") == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{shard}: damaged shard (CRC32" in lines[0], err
    assert "reading every shard" in out


def test_a_truncated_index_behind_a_matching_crc32_is_one_line(tmp_path, packed_once):
    """Not a zipfile traceback."""
    folder = copy_of(packed_once, tmp_path / "packed")
    blob = (folder / packed.INDEX).read_bytes()[:200]
    (folder / packed.INDEX).write_bytes(blob)
    edit_manifest(folder, lambda m: m["index"].update(bytes=len(blob), crc32=zlib.crc32(blob)))
    with pytest.raises(packed.PackError, match=f"{folder / packed.INDEX}: not a readable index"):
        packed.load_packed(folder)
