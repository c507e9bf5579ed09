"""The training list -> validated samples -> deterministic, resumable batches.

Every random choice here is a pure function of (seed, epoch, position), never of
which worker loads a sample or when the process started, so a run resumed
mid-epoch sees exactly the batches an uninterrupted run would have seen.
"""

import atexit
import collections
import contextlib
import os
import signal
import weakref
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from m2das.datafolder import PACKED_DIR, WEIGHTED_LIST
from m2das.fileio import is_url
from m2das.data.lmsfile import WrongShape, check_lms_file
from m2das.data.stats import NonFiniteLMS, crop_or_pad, crop_start, finite_crop


class DataListError(ValueError):
    """The list or the files it names cannot be trained on; the message says what to fix.

    Its constructor takes the one message string, so a DataLoader worker's
    re-raise in the main process keeps the type (and the trainer's exit 2).
    """


@dataclass
class SampleList:
    root: Path
    files: list            # paths relative to root
    classes: list          # sorted MIDs: the label vocabulary
    label_offsets: np.ndarray  # CSR: labels of file i are label_ids[offsets[i]:offsets[i+1]]
    label_ids: np.ndarray
    weights: np.ndarray | None

    def __len__(self):
        return len(self.files)

    def labels_of(self, i: int) -> np.ndarray:
        return self.label_ids[self.label_offsets[i]:self.label_offsets[i + 1]]


class ListedPaths(Sequence):
    """root / files[i], made only when asked for: the normalisation statistics draw a few thousand
    files of a list of millions, and a Path per row would cost hundreds of MB at first start."""

    def __init__(self, root: Path, files: list):
        self.root, self.files = Path(root), files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.root / self.files[i]


def split_labels(value) -> list:
    if not isinstance(value, str):
        return []
    return [m.strip() for m in value.split(",") if m.strip()]


def read_list(csv_path, root, classes: list | None = None) -> SampleList:
    """Read file_name,label[,weight]; labels become indices into the sorted MID set.

    `classes` pins the vocabulary (a resumed run keeps the one it started with).
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataListError(f"{csv_path}: list not found; run `m2das prepare AUDIO_DIR DATA_DIR` "
                            f"or pass --data_path/--csv_main")
    try:
        df = pd.read_csv(csv_path, dtype={"file_name": str, "label": str}, keep_default_na=False)
    except Exception as e:  # pandas raises many types for malformed CSVs
        raise DataListError(f"{csv_path}: unreadable CSV ({e})") from e
    missing = {"file_name", "label"} - set(df.columns)
    if missing:
        raise DataListError(f"{csv_path}: missing column(s) {sorted(missing)}; expected file_name,label,weight "
                            f"(make it with `m2das prepare ... --steps labels`)")
    if len(df) == 0:
        raise DataListError(f"{csv_path}: the list is empty")
    labels = [split_labels(v) for v in df["label"]]
    vocab = sorted({m for row in labels for m in row}) if classes is None else list(classes)
    index = {m: i for i, m in enumerate(vocab)}
    unknown = sorted({m for row in labels for m in row if m not in index})
    if unknown:
        raise DataListError(f"{csv_path}: {len(unknown)} label(s) not in this run's class list, e.g. {unknown[:3]}; "
                            f"the list changed since the run started (use a new --output_dir)")
    offsets = np.zeros(len(labels) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(row) for row in labels])
    ids = np.fromiter((index[m] for row in labels for m in row), dtype=np.int32, count=int(offsets[-1]))
    weights = None
    if "weight" in df.columns:
        weights = pd.to_numeric(df["weight"], errors="coerce").to_numpy(dtype=np.float64)
    return SampleList(Path(root), list(df["file_name"]), vocab, offsets, ids, weights)


def check_file(path: Path, freq_bins: int) -> str | None:
    """Why `path` cannot be trained on, or None when it can."""
    if not path.exists():
        return "missing"
    try:
        check_lms_file(path, freq_bins)
    except WrongShape as e:
        return str(e)
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable ({e})"
    return None


def check_weights(weights: np.ndarray | None, where) -> None:
    """Weighted sampling needs finite, non-negative weights with a positive sum."""
    if weights is None:
        raise DataListError(f"{where}: --weighted needs a weight column (file_name,label,weight)")
    if len(weights) and np.all(np.isfinite(weights) & (weights >= 0)) and not weights.sum() > 0:
        raise DataListError(f"{where}: --weighted, but every weight is 0; rebuild the list with "
                            f"`m2das prepare ... --steps labels` or train without --weighted")


VALIDATE_CHUNK = 256       # file headers one pool task checks
VALIDATE_IN_FLIGHT = 4     # tasks queued per worker: bounds memory whatever the list's length
PROGRESS_EVERY = 10_000    # files between two progress calls at least; a twentieth of a longer list


def check_files(root: Path, names, freq_bins: int) -> list:
    """(position in `names`, why) for each file of this chunk that cannot be trained on."""
    return [(k, why) for k, name in enumerate(names) if (why := check_file(root / name, freq_bins))]


def validate(samples: SampleList, csv_path, freq_bins: int, workers: int = 16, progress=None,
             weighted: bool = False) -> None:
    """Check every listed file before the first step; raise one error naming the first offenders.

    Files must hold at least one frame; with `weighted`, the weights must allow sampling.
    At most `workers * VALIDATE_IN_FLIGHT` chunks are queued and results are taken in list order, so
    memory stays flat for millions of rows and `progress(done, total)` is called as the check goes.
    """
    if weighted:
        check_weights(samples.weights, csv_path)
    unlabelled = np.flatnonzero(np.diff(samples.label_offsets) == 0)
    shown = [(samples.files[i], "no labels") for i in unlabelled[:5]]
    count = len(unlabelled)
    if samples.weights is not None and not np.all(np.isfinite(samples.weights) & (samples.weights >= 0)):
        bad = int(np.sum(~(np.isfinite(samples.weights) & (samples.weights >= 0))))
        shown.append((f"{bad} row(s)", "weight is not a non-negative number"))
        count += 1

    total, limit = len(samples), workers * VALIDATE_IN_FLIGHT
    every = max(PROGRESS_EVERY, total // 20)  # 2 million rows: 20 lines, not 200
    starts = range(0, total, VALIDATE_CHUNK)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for start in starts:
            pending.append((start, pool.submit(check_files, samples.root,
                                               samples.files[start:start + VALIDATE_CHUNK], freq_bins)))
            while len(pending) >= limit or (pending and start == starts[-1]):
                first, future = pending.popleft()
                found = future.result()
                count += len(found)
                shown.extend((samples.files[first + k], why) for k, why in found[:max(0, 5 - len(shown))])
                done = min(first + VALIDATE_CHUNK, total)
                if progress is not None and (done // every > first // every or done == total):
                    progress(done, total)
    if count:
        names = "; ".join(f"{name}: {why}" for name, why in shown[:5])
        raise DataListError(f"{csv_path}: {count} unusable entr{'y' if count == 1 else 'ies'} "
                            f"under {samples.root} (first: {names}); rerun `m2das prepare` or fix the list")


class LMSDataset(Dataset):
    """Keys are (epoch, position, index); the crop start is drawn from (seed, epoch, position)."""

    def __init__(self, samples: SampleList, frames: int, seed: int):
        self.samples, self.frames, self.seed = samples, frames, seed

    def __len__(self):
        return len(self.samples)

    def crop(self, i: int, rng: np.random.Generator):
        """(crop of sample i, the name to blame if it holds NaN/inf)."""
        path = self.samples.root / self.samples.files[i]
        try:
            lms = np.load(path, mmap_mode="r")  # reads the crop only
        except OSError as e:  # gone or unreadable since the list was validated (RUN/validated.json says so)
            raise DataListError(f"{path}: {e.strerror or e} (it was there when the list was validated); "
                                f"restore it, or remove it from the list (a changed list is checked again)") from None
        return crop_or_pad(lms, self.frames, crop_start(lms.shape[-1], self.frames, rng)), \
            self.samples.root / self.samples.files[i]

    def __getitem__(self, key):
        epoch, position, i = key
        rng = np.random.default_rng([self.seed, epoch, position])
        x, path = self.crop(i, rng)
        try:
            x = finite_crop(x, path)
        except NonFiniteLMS as e:  # a broken file, not a learning-rate problem: stop with exit 2
            raise DataListError(str(e)) from None
        y = np.zeros(len(self.samples.classes), dtype=np.float32)
        y[self.samples.labels_of(i)] = 1.0
        return torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(y)


class PackedDataset(LMSDataset):
    """LMSDataset over a packed folder: the same crop start and padding, one contiguous read per crop."""

    def __init__(self, samples, frames: int, seed: int):
        from m2das.data.packed import ShardReader

        super().__init__(samples, frames, seed)
        self.reader = ShardReader(samples.root)

    _ready: dict = {}  # (index, crop start) -> crop fetched ahead by __getitems__

    def crop(self, i: int, rng: np.random.Generator):
        from m2das.data.packed import PackError, read_crop, unavailable

        start = crop_start(int(self.samples.frames[i]), self.frames, rng)
        x = self._ready.get((i, start))
        try:
            x = read_crop(self.samples, self.reader, i, start, self.frames) if x is None else x
        except (PackError, OSError) as e:  # a store that did not answer: a resumable stop, not bad input
            raise unavailable(e, self.samples.describe(i)) or DataListError(str(e)) from None
        return x, self.samples.describe(i)

    def __getitems__(self, keys):
        """A batch at once (the DataLoader calls this): over a URL its range requests run concurrently,
        not one round trip per sample. The crops are the ones __getitem__ draws."""
        from m2das.data.packed import PackError, read_crops, unavailable

        if not is_url(self.samples.root):
            return [self[key] for key in keys]
        wanted = [(i, crop_start(int(self.samples.frames[i]), self.frames,
                                 np.random.default_rng([self.seed, epoch, position]))) for epoch, position, i in keys]
        try:
            self._ready = dict(zip(wanted, read_crops(self.samples, self.reader, wanted, self.frames)))
        except (PackError, OSError) as e:
            raise unavailable(e, self.samples.root) or DataListError(str(e)) from None
        try:
            return [self[key] for key in keys]
        finally:
            self._ready = {}


def read_samples(data_path, csv_path, classes: list | None = None):
    """What to train on: a packed folder's index (it is its own list), else the CSV list.

    `m2das train --data_path PACKED_DIR` needs no other data flag; a --csv_main
    other than the default cannot pick from a packed folder (pack that list instead).
    """
    from m2das.data import packed

    try:
        found = packed.is_packed(data_path)
    except packed.PackError as e:
        raise DataListError(str(e)) from None
    if not found and is_url(data_path):
        raise DataListError(f"{data_path}: no {packed.MANIFEST} there; from a URL only packed folders are read "
                            f"(`m2das pack DATA_DIR`, then upload DATA_DIR/{PACKED_DIR})")
    if not found:
        return read_list(csv_path, data_path, classes)
    if csv_path is not None and str(csv_path) != str(Path(data_path) / WEIGHTED_LIST):
        raise DataListError(f"{data_path} is a packed folder, it carries its own list: drop --csv_main {csv_path}, "
                            f"or pack that list with `m2das pack DATA_DIR --list {csv_path}`")
    try:
        return packed.load_packed(data_path, classes)
    except packed.PackError as e:
        raise DataListError(str(e)) from None


def make_dataset(samples, frames: int, seed: int) -> LMSDataset:
    from m2das.data.packed import PackedSamples

    return (PackedDataset if isinstance(samples, PackedSamples) else LMSDataset)(samples, frames, seed)


def validate_packed(samples, stamp: dict | None, log=None, freq_bins: int | None = None, every: int = 0,
                    start: int = 0) -> dict:
    """Seconds for millions of samples: the index (CRC32-checked on load), every shard's size, and
    the CRC32 of the shards that changed since last verified, or of all of them when start number
    `start` is due under --verify_shards `every` (packed.full_read_due). Returns the new stamp for
    RUN/validated.json; raises DataListError naming the first damaged shard.
    """
    from m2das.data import packed

    if freq_bins is not None and freq_bins != samples.n_mels:
        raise DataListError(f"{packed.join(samples.root, packed.MANIFEST)}: packed LMS have {samples.n_mels} mel "
                            f"bins, the model expects {freq_bins}; set --input_size {samples.n_mels}xT")
    same = stamp if stamp and stamp.get("index_crc32") == samples.manifest["index"]["crc32"] else {}
    t0 = time.monotonic()
    shown = (lambda k, n, name: log(f"  {name}: CRC32 matches the index ({k}/{n} shards)")) if log else None
    full = packed.full_read_due(same, start, every)
    if full and log is not None:
        log(f"reading every shard of {samples.root} (--verify_shards {every}, start {start + 1})")
    try:
        shards = packed.verify_shards(samples, same.get("shards"), shown, full)
    except packed.PackError as e:
        raise DataListError(str(e)) from None
    if log is not None:
        log(f"checked {samples.root}: {len(samples)} samples in {len(shards)} shards, "
            f"{time.monotonic() - t0:.1f} s")
    return packed.stamp_of(samples, shards, start if full else same.get(packed.FULL_READ_KEY))


class ResumableSampler(Sampler):
    """This rank's share of a per-epoch order, starting from any batch of the epoch.

    The order is a permutation (or, with weights, draws with replacement) from a
    generator seeded by (seed, epoch); it is the same on every rank and each
    rank takes every world_size-th element. The incomplete last batch is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int,
                 weights: np.ndarray | None = None):
        self.n, self.batch_size, self.rank, self.world = num_items, batch_size, rank, world_size
        self.seed, self.weights = seed, weights
        if weights is not None:
            check_weights(np.asarray(weights, dtype=np.float64), "the training list")
        self.batches_per_epoch = num_items // (batch_size * world_size)
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(self.n)
        return rng.choice(self.n, size=self.n, replace=True, p=self.weights / self.weights.sum())

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        used = self.batches_per_epoch * self.batch_size * self.world
        positions = np.arange(used)[self.rank::self.world]
        for pos in positions[self.start_batch * self.batch_size:]:
            yield self.epoch, int(pos), int(order[pos])

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def quiet_worker(_worker_id: int):
    """Workers ignore the stop signals: the main process decides when to stop.

    A cluster signals every process of the job; a worker dying on SIGTERM
    would crash the main process before it could save.
    """
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes are stopped before the interpreter exits.

    When an error leaves the training loop (a NaN crop, a missing file) the
    iterator can outlive it in a reference cycle; at exit multiprocessing then
    SIGTERMs its workers, which ignore SIGTERM (quiet_worker), and waits for
    them for ever. Stopping them first, the DataLoader's own way, ends the run.
    """

    def __iter__(self):
        it = super().__iter__()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(it)
        return it


@atexit.register  # runs before multiprocessing's own exit hook, which was registered earlier
def _stop_loader_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        with contextlib.suppress(Exception):
            it._shutdown_workers()


def make_loader(dataset: LMSDataset, sampler: ResumableSampler, batch_size: int, num_workers: int,
                pin_memory: bool):
    kwargs = dict(batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                  pin_memory=pin_memory)
    if num_workers > 0:
        kwargs.update(worker_init_fn=quiet_worker, prefetch_factor=4, multiprocessing_context="fork"
                      if os.name == "posix" else None)
    return _Loader(dataset, **kwargs)
