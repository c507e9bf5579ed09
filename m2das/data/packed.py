"""Reading a packed data folder (written by `m2das pack`), from a local path or any fsspec URL.

Layout of PACKED_DIR (names are the constants below):

    packed.json         manifest: format, dtype, n_mels, classes, norm stats, and per shard
                        its name, samples, bytes and CRC32; the index file's bytes and CRC32
    index.npz           per sample: file name, shard, byte offset, frames, labels (CSR), weight
    shard-00000.bin ... samples back to back, each time-major [T, n_mels], little-endian
    norm_stats.json     the data folder's normalisation statistics (read by the trainer)
    pack-journal.jsonl  one line per finished shard: what a killed pack restarts from
    verified.json       a cache: (size, mtime) of each shard when its CRC32 last matched

Nothing in the manifest or index is trusted: every field is range-checked at load
(m2das/data/packcheck.py), and only plain file names inside the folder are read.

Why flat shards and a flat index rather than zarr/tensorstore chunks or litdata's
chunks: a time crop of a time-major sample is one contiguous byte range, so a local
read is one pread of exactly the crop and a remote read one HTTP range request. A
chunked array would either need one chunk per clip (two million objects again) or
read whole chunks around each crop; litdata reads whole chunks too and brings its
own loader and sampler, while the trainer's exact-resume sampler needs random access
by index. The index is a zip of .npy arrays: 2 million rows load in about a second
(see `m2das bench data`), without a database. Torch-free.
"""

import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from m2das import storeerrors
from m2das.data.packcheck import index_problem, manifest_problem
from m2das.fileio import is_url, url_fs

MANIFEST = "packed.json"
INDEX = "index.npz"
JOURNAL = "pack-journal.jsonl"
VERIFIED = "verified.json"
FORMAT = "m2das-packed"
VERSION = 1
DTYPES = ("float32", "float16")
CHUNK = 8 << 20  # bytes per read when checksumming a shard
MAX_OPEN = 256  # shard files one process keeps open (AudioSet at the default 2 GB: about 320 shards)


class PackError(ValueError):
    """A packed folder that cannot be read or does not match its index; one line naming the file."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def join(root, name: str) -> str:
    root = str(root)
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name)


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = url_fs(path)
    return fs.exists(inner)


def read_whole(path) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, inner = url_fs(path)
    return fs.cat_file(inner)


def is_packed(data_path) -> bool:
    """Does `data_path` hold a packed folder (its manifest)? PackError when a URL cannot be reached."""
    if not is_url(data_path):
        return os.path.exists(join(data_path, MANIFEST))
    try:
        return exists(join(data_path, MANIFEST))
    except ImportError as e:
        raise PackError(f"{data_path}: no fsspec backend for it ({e}); install it, e.g. pip install s3fs "
                        f"for s3://, gcsfs for gs://") from None
    except (OSError, ValueError) as e:
        raise unavailable(e, data_path) or PackError(f"{data_path}: cannot be reached ({type(e).__name__}: {e}); "
                                                     f"check the URL and the store's credentials in the environment") from e


def unavailable(e: BaseException, path):
    """A StoreUnavailable naming `path` when `e` says the object store behind that URL did not answer,
    else None: an outage is a resumable stop (exit 75), never a damaged pack (exit 2)."""
    if not is_url(path) or not storeerrors.is_transient(e):
        return None
    return storeerrors.store_failure(e, str(path), "reading the packed data")


def crc32_of(chunks) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc


def read_chunks(path, size: int):
    """The bytes of `path` in CHUNK-sized pieces (range reads for a URL)."""
    if not is_url(path):
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        return
    fs, inner = url_fs(path)
    for start in range(0, size, CHUNK):
        yield fs.cat_file(inner, start=start, end=min(start + CHUNK, size))


def fingerprint(path) -> list:
    """[size, version] of a file: local mtime_ns, else the store's ETag / modification time.

    A shard whose fingerprint equals the one recorded when its CRC32 last matched
    is not read again; any change (a copy, an edit, a truncation) reads it once.
    """
    if not is_url(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    fs, inner = url_fs(path)
    info = fs.info(inner)
    version = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated")
                    if info.get(k) is not None), None)
    return [int(info["size"]), version]


# ---------------------------------------------------------------- the index


@dataclass
class PackedSamples:
    """The same fields as m2das.data.dataset.SampleList (the trainer uses either), plus where each sample lies."""

    root: str
    files: list
    classes: list
    label_offsets: np.ndarray
    label_ids: np.ndarray
    weights: np.ndarray | None
    shard: np.ndarray      # shard number of sample i
    offset: np.ndarray     # byte offset of sample i in its shard
    frames: np.ndarray     # T of sample i
    manifest: dict = field(repr=False)

    def __len__(self):
        return len(self.files)

    def labels_of(self, i: int) -> np.ndarray:
        return self.label_ids[self.label_offsets[i]:self.label_offsets[i + 1]]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"]).newbyteorder("<")

    @property
    def n_mels(self) -> int:
        return int(self.manifest["n_mels"])

    @property
    def norm_stats(self) -> dict | None:
        return self.manifest.get("norm_stats")

    def shard_path(self, number: int) -> str:
        return join(self.root, self.manifest["shards"][number]["name"])

    def describe(self, i: int) -> str:
        return f"{self.shard_path(int(self.shard[i]))} (sample {self.files[i]})"


def write_index(path, arrays: dict) -> None:
    """A zip of .npy arrays, like np.savez_compressed, but byte-for-byte reproducible (fixed dates)."""
    from m2das.fileio import atomic_write

    with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue())


def read_manifest(root) -> dict:
    path = join(root, MANIFEST)
    try:
        manifest = json.loads(read_whole(path))
    except (OSError, ValueError) as e:
        raise unavailable(e, path) or PackError(f"{path}: unreadable packed manifest ({e}); pack the data "
                                                f"folder again with `m2das pack DATA_DIR --out {root}`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{path}: not an m2das packed manifest; pack again with `m2das pack`")
    if manifest.get("version") != VERSION:
        raise PackError(f"{path}: packed format version {manifest.get('version')}, this m2das reads "
                        f"version {VERSION}; pack again with this version's `m2das pack`")
    problem = manifest_problem(manifest, DTYPES)
    if problem:
        raise PackError(f"{path}: {problem}; pack again with `m2das pack DATA_DIR --out {root}`")
    return manifest


def load_packed(root, classes: list | None = None) -> PackedSamples:
    """The manifest and index of a packed folder, the index checked against its CRC32 and its ranges.

    `classes` pins the label vocabulary (a resumed run keeps the one it started with).
    """
    root = str(root)
    manifest = read_manifest(root)
    path = join(root, manifest["index"]["name"])
    try:
        blob = read_whole(path)
    except OSError as e:
        raise unavailable(e, path) or PackError(f"{path}: cannot be read ({e}); pack again with "
                                                f"`m2das pack DATA_DIR --out {root}`") from e
    if len(blob) != manifest["index"]["bytes"] or zlib.crc32(blob) != manifest["index"]["crc32"]:
        raise PackError(f"{path}: damaged ({len(blob)} bytes, CRC32 differs from {MANIFEST}); pack again "
                        f"with `m2das pack DATA_DIR --out {root}`")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        files = a["names"].tobytes().decode("utf-8").split("\n") if "names" in a else []
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise PackError(f"{path}: not a readable index ({type(e).__name__}: {e}); pack again with "
                        f"`m2das pack DATA_DIR --out {root}`") from None
    problem = index_problem(a, files, manifest)
    if problem:
        raise PackError(f"{path}: {problem}; pack again with `m2das pack DATA_DIR --out {root}`")
    ids = a["label_ids"]
    vocab = manifest["classes"]
    if classes is not None and list(classes) != vocab:
        index = {m: i for i, m in enumerate(classes)}
        unknown = sorted(m for m in vocab if m not in index)
        if unknown:
            raise PackError(f"{join(root, MANIFEST)}: {len(unknown)} label(s) not in this run's class list, e.g. "
                            f"{unknown[:3]}; the data changed since the run started (use a new --output_dir)")
        ids = np.array([index[m] for m in vocab], dtype=np.int32)[ids] if len(ids) else ids
        vocab = list(classes)
    return PackedSamples(root, files, vocab, a["label_offsets"], ids.astype(np.int32),
                         a["weights"] if manifest["weighted"] else None, a["shard"], a["offset"], a["frames"],
                         manifest)


# ---------------------------------------------------------------- validation


def damaged(path, why: str, root) -> PackError:
    return PackError(f"{path}: damaged shard ({why}); pack again with `m2das pack DATA_DIR --out {root}` "
                     f"(finished shards are kept) or restore the file")


def verify_shards(samples: PackedSamples, known: dict | None = None, progress=None, full: bool = False) -> dict:
    """Check every shard's size; its CRC32 only when its fingerprint is not a known-good one, or always (`full`).

    `known` maps shard names to fingerprints at which the CRC32 matched (from
    `m2das pack`, a previous validation or the run folder's stamp). A fingerprint
    is the size and mtime (ETag remotely): bit rot under an unchanged mtime passes
    it, and only `full` (--verify_shards) reads it. Returns the fingerprints now
    known good; `progress(k, n, name)` follows each CRC32 read.
    Raises PackError naming the first damaged shard.
    """
    known = dict(known) if isinstance(known, dict) and not full else {}
    local_cache = None if is_url(samples.root) else join(samples.root, VERIFIED)
    if local_cache and not full:
        try:
            known = {**json.loads(read_whole(local_cache)), **known}
        except (OSError, ValueError, TypeError):  # only a cache: unreadable means "read the shards"
            pass
    good, checked = {}, 0
    shards = samples.manifest["shards"]
    for k, entry in enumerate(shards):
        path = samples.shard_path(k)
        try:
            fp = fingerprint(path)
        except OSError as e:
            raise unavailable(e, path) or damaged(path, "missing", samples.root) from None
        if fp[0] != entry["bytes"]:
            raise damaged(path, f"{fp[0]} bytes, the index records {entry['bytes']}", samples.root)
        if known.get(entry["name"]) != fp:
            crc = crc32_of(read_chunks(path, fp[0]))
            if crc != entry["crc32"]:
                raise damaged(path, f"CRC32 {crc:08x}, the index records {entry['crc32']:08x}", samples.root)
            checked += 1
            if progress is not None:
                progress(k + 1, len(shards), entry["name"])
        good[entry["name"]] = fp
    if local_cache and checked:
        try:
            from m2das.fileio import write_json

            write_json(local_cache, good)
        except OSError:  # a read-only data folder: the run folder's stamp still remembers
            pass
    return good


FULL_READ_KEY = "all_shards_read_at_start"  # in RUN/validated.json: the start whose validation read every shard


def full_read_due(stamp: dict | None, start: int, every: int) -> bool:
    """Read every shard's CRC32 at this start (0 = the run's first)? With `every` N > 0: at the first
    start and then once N starts have passed since the last full read; 0 never (fingerprints only)."""
    if every <= 0:
        return False
    last = (stamp or {}).get(FULL_READ_KEY)
    return not isinstance(last, int) or start - last >= every


def stamp_of(samples: PackedSamples, shards: dict, full_read_at: int | None = None) -> dict:
    """What RUN/validated.json records for a packed folder: its index, each shard's fingerprint,
    and the start at which every shard was last read in full."""
    return {"packed": samples.root, "index_crc32": samples.manifest["index"]["crc32"], "rows": len(samples),
            "shards": shards, FULL_READ_KEY: full_read_at}


# ---------------------------------------------------------------- reading crops


class ShardReader:
    """Byte ranges of a packed folder's shards, opened lazily by whichever process reads.

    Picklable: a DataLoader worker gets the root only and opens its own file
    descriptors (or fsspec filesystem), one per shard it touches, at most MAX_OPEN. Locally each
    read is one pread, with readahead off (POSIX_FADV_RANDOM) so a cold read
    fetches the crop and not the neighbouring samples; remotely one range request,
    from S3 through a presigned URL (m2das.data.s3ranges) unless `presigned` is off,
    else through fsspec. Nothing is cached beyond the open handles, so memory stays bounded.
    """

    def __init__(self, root, presigned: bool = True):
        self.root, self.presigned = str(root), presigned
        self._pid, self._fds, self._fs, self.ranges = None, {}, None, None

    def __getstate__(self):
        return {"root": self.root, "presigned": self.presigned}

    def __setstate__(self, state):
        self.__init__(state["root"], state.get("presigned", True))

    def read(self, name: str, start: int, length: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker: never share the parent's handles
            self._pid, self._fds, self._fs = os.getpid(), {}, None
        if is_url(self.root):
            return self.read_many([(name, start, length)])[0]
        else:
            fd = self._fds.get(name)
            if fd is None:
                if len(self._fds) >= MAX_OPEN:  # many small shards: stay under the open-file limit
                    os.close(self._fds.pop(next(iter(self._fds))))
                fd = self._fds[name] = os.open(os.path.join(self.root, name), os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            parts, done = [], 0
            while done < length:
                part = os.pread(fd, length - done, start + done)
                if not part:
                    break
                parts.append(part)
                done += len(part)
            data = b"".join(parts) if len(parts) != 1 else parts[0]
        return self._checked(data, name, start, length)

    def read_many(self, requests: list) -> list:
        """read() of many (name, start, length); over a URL, concurrent range requests (fsspec cat_ranges)."""
        if not is_url(self.root):
            return [self.read(*r) for r in requests]
        if self._pid != os.getpid() or self._fs is None:
            from m2das.data import s3ranges

            self._pid, self._fds, self._fs = os.getpid(), {}, url_fs(self.root)
            self.ranges = s3ranges.PresignedRanges(self._fs[0], self.root) \
                if self.presigned and s3ranges.usable(self._fs[0]) else None
        fs, inner = self._fs
        paths = [inner.rstrip("/") + "/" + name for name, _, _ in requests]
        blobs = self.ranges.get([(path, start, n) for path, (_, start, n) in zip(paths, requests)]) \
            if self.ranges is not None else None
        if blobs is None:  # not S3, or that path failed: s3fs reads (and raises its own error types)
            blobs = fs.cat_ranges(paths, [start for _, start, _ in requests], [start + n for _, start, n in requests],
                                  on_error="raise")
        return [self._checked(data, *r) for data, r in zip(blobs, requests)]

    def _checked(self, data: bytes, name: str, start: int, length: int) -> bytes:
        if len(data) != length:
            raise PackError(f"{join(self.root, name)}: ends before byte {start + length}; the shard is damaged, "
                            f"pack again with `m2das pack`")
        return data


def crop_range(samples: PackedSamples, i: int, start: int, frames: int) -> tuple:
    """(shard name, byte offset, bytes, rows) of the crop of sample i from frame `start`."""
    row = samples.n_mels * samples.dtype.itemsize
    n = min(frames, int(samples.frames[i]) - start)
    return (samples.manifest["shards"][int(samples.shard[i])]["name"], int(samples.offset[i]) + start * row,
            n * row, n)


def to_crop(samples: PackedSamples, data: bytes, rows: int, frames: int) -> np.ndarray:
    """Time-major bytes -> [1, n_mels, frames] float32, zero-padded on the right.

    The same window and padding as m2das.data.stats.crop_or_pad on the [1, n_mels, T]
    file, so float32 packs give bit-identical crops.
    """
    out = np.zeros((1, samples.n_mels, frames), dtype=np.float32)
    out[0, :, :rows] = np.frombuffer(data, dtype=samples.dtype).reshape(rows, samples.n_mels).T
    return out


def read_crop(samples: PackedSamples, reader: ShardReader, i: int, start: int, frames: int) -> np.ndarray:
    """[1, n_mels, frames] float32 of sample i from frame `start`: one contiguous read."""
    name, offset, length, rows = crop_range(samples, i, start, frames)
    return to_crop(samples, reader.read(name, offset, length), rows, frames)


def read_crops(samples: PackedSamples, reader: ShardReader, wanted: list, frames: int) -> list:
    """read_crop for each (i, start) of a batch; over a URL all range requests are in flight at once."""
    if not is_url(samples.root):
        return [read_crop(samples, reader, i, start, frames) for i, start in wanted]
    ranges = [crop_range(samples, i, start, frames) for i, start in wanted]
    blobs = reader.read_many([(name, offset, length) for name, offset, length, _ in ranges])
    return [to_crop(samples, data, rows, frames) for data, (_, _, _, rows) in zip(blobs, ranges)]
