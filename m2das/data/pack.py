"""`m2das pack DATA_DIR`: a prepared data folder -> a few large time-major shards plus one index.

The trainer reads the result with `--data_path PACKED_DIR` and nothing else: the
index carries the list (file names, labels, weights) and the folder its norm
statistics. A crop becomes one contiguous read of the crop's bytes, and an epoch
opens as many files as there are shards. The format is described in m2das/data/packed.py.

Restartable: shards are written in list order, each to a temporary name and
renamed (m2das.fileio.atomic_write), then recorded in the journal. A rerun
keeps each recorded shard whose LMS files are unchanged (names, sizes, times)
and whose bytes still match (size, CRC32), rewrites the rest, and gives the same
bytes as an uninterrupted pack. The manifest is written last.

float16 (opt-in) halves the bytes; on LMS values (ln-mel in [-16, 10]) the
rounding error is at most 2**-8 = 0.0039 (half an ulp of float16 in [8, 16)).
"""

import argparse
import collections
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m2das import events
from m2das.data import packed
from m2das.fileio import atomic_write, write_failure, write_json
from m2das.data.lmsfile import N_MELS
from m2das.data.packed import INDEX, JOURNAL, MANIFEST, VERIFIED, PackError
from m2das.datafolder import NORM_STATS, PACKED_DIR, RECIPE_FILE, WEIGHTED_LIST

DEFAULT_SHARD_SIZE = "2G"  # AudioSet in float32 (640 GB) -> about 320 shards
READERS = 8  # LMS files read at once while packing (I/O-bound: threads suffice)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2G or 500M, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the shard size must be positive, got {text!r}")
    return value


log = functools.partial(events.log, prog="m2das pack", stderr=True, clock=False)


def read_journal(out: Path) -> list:
    """Finished shards in order; reading stops at the first torn or foreign line."""
    entries = []
    try:
        lines = (out / JOURNAL).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return entries
    for n, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(entry, dict) or entry.get("name") != packed.shard_name(n):
            break
        entries.append(entry)
    return entries


def write_journal(out: Path, entries: list) -> None:
    with atomic_write(out / JOURNAL, "w") as f:
        f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)


def sources_digest(paths: list) -> str:
    """Names, sizes and modification times of a shard's LMS files: a re-prepared file is packed again."""
    h = hashlib.sha1()
    for path in paths:
        st = os.stat(path)
        h.update(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def kept_shard(out: Path, entry: dict | None, first: int, plan: dict, paths: list) -> bool:
    """Is the journal's shard the one this pack would write, from the same files, with its bytes intact?"""
    if entry is None or entry.get("first") != first or any(entry.get(k) != v for k, v in plan.items()):
        return False
    if entry.get("sources") != sources_digest(paths[first:first + entry.get("count", 0)]):
        return False
    path = out / entry["name"]
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
    except OSError:
        return False
    return packed.crc32_of(packed.read_chunks(path, entry["bytes"])) == entry["crc32"]


def sample_bytes(path, dtype: np.dtype) -> tuple:
    """(frames, time-major bytes) of one LMS file; NaN, inf and values past LMS_BOUND refused here, not
    mid-training (within the bound float16 cannot overflow)."""
    from m2das.data.stats import NonFiniteLMS, finite_crop

    try:
        lms = finite_crop(np.load(path, allow_pickle=False), path)
    except NonFiniteLMS as e:
        raise PackError(str(e)) from None
    tm = np.ascontiguousarray(lms[0].T).astype(dtype.newbyteorder("<"), copy=False)
    return lms.shape[-1], tm.tobytes()


def read_ahead(pool, paths: list, first: int, dtype, window: int):
    """sample_bytes of paths[first:], in order, with up to `window` files being read at once."""
    pending, i = collections.deque(), first
    try:
        while True:
            while len(pending) < window and i < len(paths):
                pending.append(pool.submit(sample_bytes, paths[i], dtype))
                i += 1
            if not pending:
                return
            yield pending.popleft().result()
    finally:  # the shard is full: reads past its end are dropped
        for future in pending:
            future.cancel()


def write_shard(out: Path, number: int, paths: list, first: int, limit: int, dtype, pool, kill_at: int) -> dict:
    """Samples from `first` until the next one would pass `limit` bytes (at least one) -> one shard."""
    name = packed.shard_name(number)
    frames, size, crc = [], 0, 0
    with atomic_write(out / name) as f:
        samples = read_ahead(pool, paths, first, dtype, 2 * READERS)
        for t, data in samples:
            if frames and size + len(data) > limit:
                break
            f.write(data)
            crc = zlib.crc32(data, crc)
            frames.append(int(t))
            size += len(data)
            if kill_at == number and len(frames) == 1:  # fault injection for tests: die mid-shard
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        samples.close()
    return {"name": name, "first": first, "count": len(frames), "bytes": size, "crc32": crc, "frames": frames,
            "sources": sources_digest(paths[first:first + len(frames)])}


def norm_stats_for(data_dir: Path, paths: list) -> dict:
    """The data folder's norm_stats.json, else the trainer's default rule computed on the listed files."""
    from m2das.data.stats import compute_norm_stats, read_norm_stats

    source = data_dir / NORM_STATS
    if source.exists():
        try:
            return read_norm_stats(source)
        except ValueError as e:
            raise PackError(str(e)) from None
    log(f"{source} not found: computing the statistics the trainer would (5000 crops, seed 0)")
    try:
        return compute_norm_stats(paths)
    except ValueError as e:  # a NaN or out-of-range crop, named
        raise PackError(str(e)) from None


def pack(data_dir, out=None, list_path=None, shard_size: int = parse_size(DEFAULT_SHARD_SIZE),
         dtype: str = "float32", workers: int = 16) -> dict:
    """Pack the list's files; returns the manifest. Raises DataListError / PackError on bad input."""
    from m2das.data.dataset import read_list, validate

    data_dir = Path(data_dir)
    out = Path(out) if out else data_dir / PACKED_DIR
    list_path = Path(list_path) if list_path else data_dir / WEIGHTED_LIST
    if not data_dir.is_dir():
        raise PackError(f"{data_dir}: no such data folder; make it with `m2das prepare AUDIO_DIR {data_dir}`")
    samples = read_list(list_path, data_dir)
    t0 = time.monotonic()
    validate(samples, list_path, N_MELS, workers=workers,
             progress=lambda n, total: log(f"checked {n}/{total} files") if total >= 20000 else None)
    paths = [data_dir / name for name in samples.files]
    stats = norm_stats_for(data_dir, paths)
    log(f"{len(paths)} files checked in {time.monotonic() - t0:.1f} s; packing into {out} "
        f"({dtype}, shards of at most {shard_size / 1e6:.3g} MB)")

    try:
        out.mkdir(parents=True, exist_ok=True)
        with one_pack_at_a_time(out):
            for stale in out.glob(".*.tmp"):  # temporaries of a killed pack
                stale.unlink()
            return write_all(out, data_dir, samples, paths, stats, shard_size, dtype)
    except OSError as e:  # read-only or full: the shards written so far stay; a rerun keeps them
        raise PackError(f"{write_failure(e, out)}; free space there or pass --out in a writable folder") from None


@contextlib.contextmanager
def one_pack_at_a_time(out: Path):
    """An flock on the folder itself (no lock file to ship): two packs would delete each other's temporaries."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PackError(f"{out}: another `m2das pack` is writing this folder; wait for it or "
                            f"choose another --out") from None
        yield
    finally:
        os.close(fd)


def write_all(out: Path, data_dir: Path, samples, paths: list, stats: dict, shard_size: int, dtype: str) -> dict:
    """The shards (kept or written), then the index and manifest."""
    dt = np.dtype(dtype)
    plan = {"dtype": dtype, "n_mels": N_MELS, "shard_size": shard_size}
    journal, entries = read_journal(out), []
    write_journal(out, journal)  # without a torn last line, so appends start on a line of their own
    kill_at = int(os.environ.get("M2DAS_TEST_PACK_KILL_IN_SHARD", -1))
    first, t0, written_bytes = 0, time.monotonic(), 0
    pool = ThreadPoolExecutor(max_workers=READERS)  # file reads overlap; writes stay in list order
    while first < len(paths):
        k = len(entries)
        previous = journal[k] if k < len(journal) else None
        if kept_shard(out, previous, first, plan, paths):
            entry, what = previous, "kept (verified)"
        else:
            entry = {**write_shard(out, k, paths, first, shard_size, dt, pool, kill_at), **plan}
            if k < len(journal):  # a damaged or foreign shard replaced; later ones are still checked
                journal[k] = entry
                write_journal(out, journal)
            else:
                journal.append(entry)
                with open(out / JOURNAL, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            written_bytes += entry["bytes"]
            what = "written"
        entries.append(entry)
        first += entry["count"]
        rate = written_bytes / max(time.monotonic() - t0, 1e-9) / 1e6
        log(f"{entry['name']} {what}: {first}/{len(paths)} samples, {rate:.0f} MB/s")
    pool.shutdown()
    write_journal(out, entries)  # drops lines past the last shard (a shorter list since)
    for extra in sorted(out.glob("shard-*.bin"))[len(entries):]:
        extra.unlink()
    return finish(out, data_dir, samples, entries, stats, dtype)


def finish(out: Path, data_dir: Path, samples, entries: list, stats: dict, dtype: str) -> dict:
    """Index, copied side files, then the manifest (last: a folder with a manifest is complete)."""
    frames = np.concatenate([np.asarray(e["frames"], dtype=np.int32) for e in entries])
    shard = np.concatenate([np.full(e["count"], k, dtype=np.int32) for k, e in enumerate(entries)])
    row = N_MELS * np.dtype(dtype).itemsize
    starts = np.concatenate([[0], np.cumsum(frames, dtype=np.int64)[:-1] * row])
    first_of_shard = np.array([starts[e["first"]] for e in entries], dtype=np.int64)
    offset = starts - first_of_shard[shard]
    arrays = {"names": np.frombuffer("\n".join(samples.files).encode("utf-8"), dtype=np.uint8),
              "shard": shard, "offset": offset.astype(np.int64), "frames": frames,
              "label_offsets": samples.label_offsets.astype(np.int64), "label_ids": samples.label_ids.astype(np.int32),
              "weights": np.zeros(len(samples)) if samples.weights is None else samples.weights.astype(np.float64)}
    packed.write_index(out / INDEX, arrays)
    blob = (out / INDEX).read_bytes()
    write_json(out / NORM_STATS, stats)
    if (data_dir / RECIPE_FILE).exists():
        with atomic_write(out / RECIPE_FILE) as f:
            with open(data_dir / RECIPE_FILE, "rb") as src:
                shutil.copyfileobj(src, f)
    manifest = {"format": packed.FORMAT, "version": packed.VERSION, "dtype": dtype, "n_mels": N_MELS,
                "samples": len(samples), "classes": samples.classes, "weighted": samples.weights is not None,
                "norm_stats": stats, "index": {"name": INDEX, "bytes": len(blob), "crc32": zlib.crc32(blob)},
                "shards": [{"name": e["name"], "samples": e["count"], "bytes": e["bytes"], "crc32": e["crc32"]}
                           for e in entries]}
    write_json(out / MANIFEST, manifest)
    # Every shard's CRC32 was just computed: validation need not read them again while unchanged.
    write_json(out / VERIFIED, {e["name"]: packed.fingerprint(out / e["name"]) for e in entries})
    return manifest


def main(argv=None) -> int:
    from m2das.cliargs import Parser
    from m2das.data.dataset import DataListError
    from m2das.runfolder import EXIT_BAD_INPUT

    p = Parser(prog="m2das pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="exit codes: 0 packed; 2 bad input (the message names the file and the fix)")
    p.add_argument("data_dir", help="a prepared data folder (m2das prepare)")
    p.add_flag("--out", default=None, help=f"packed folder (default DATA_DIR/{PACKED_DIR})")
    p.add_flag("--list", default=None, help=f"list to pack (default DATA_DIR/{WEIGHTED_LIST})")
    p.add_flag("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
               help=f"bytes per shard, e.g. 2G or 500M (default {DEFAULT_SHARD_SIZE})")
    p.add_flag("--dtype", choices=packed.DTYPES, default="float32",
               help="float16 halves the bytes; error on LMS values at most 0.0039 (default float32)")
    p.add_flag("--workers", type=int, default=16, help="threads checking file headers (default 16)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = pack(args.data_dir, args.out, args.list, args.shard_size, args.dtype, args.workers)
    except (DataListError, PackError) as e:
        print(f"m2das pack: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    total = sum(s["bytes"] for s in manifest["shards"])
    out = args.out or os.path.join(args.data_dir, PACKED_DIR)
    log(f"done: {manifest['samples']} samples in {len(manifest['shards'])} shards ({total / 1e9:.2f} GB); "
        f"train with `m2das train --data_path {out}`")
    return 0
