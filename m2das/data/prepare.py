"""`m2das prepare`: a folder of AudioSet audio -> a training-ready data folder.

Steps (each restartable, each usable alone):
  lms     audio -> DATA/audioset_lms/<same relative path>.npy, float32 [1, 80, T],
          and DATA/lms_recipe.json: how they were made (another recipe is never mixed in)
  list    DATA/files_audioset.csv: every output that exists and loads
  labels  DATA/files_as_weighted.csv: labels and sampling weights from AudioSet's lists
  stats   DATA/norm_stats.json: normalisation mean/std (read by the trainer)

Every output is written atomically, existing LMS files are kept, and a file that
cannot be converted is recorded in DATA/prepare_failures.csv instead of stopping
the run, so a run killed at any moment is finished by running it again.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import fcntl
import functools
import multiprocessing
import os
import posixpath
import re
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from m2das.fileio import atomic_write, write_json
from m2das.data.lmsfile import LMS_DIR, OTHER_RECIPE_OUTPUTS, RECIPE_FILE, check_lms_file, describe_recipe, read_recipe
from m2das.data.stats import NORM_STATS_FILE
from m2das.data.labels import read_csv_rows, write_csv

STEPS = ("lms", "list", "labels", "stats")
FILE_LIST = "files_audioset.csv"
WEIGHTED_LIST = "files_as_weighted.csv"
FAILURES = "prepare_failures.csv"
NORM_STATS = NORM_STATS_FILE  # named by the run-folder contract, via m2das.data.stats
METADATA_SUBDIR = "metadata"
LOCK_FILE = ".prepare.lock"
DEFAULT_AUDIO_DIR = "/audio"
DEFAULT_DATA_DIR = "/data"
# Extensions taken as audio. Formats libsndfile cannot decode (m4a, webm) are
# still attempted so that they show up in the failure list instead of vanishing.
AUDIO_EXTENSIONS = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
                    ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64", ".m4a", ".mp4", ".webm"}
_TMP_NAME = re.compile(r"^\..+\.npy\..+\.tmp$")  # what fileio.atomic_write leaves when killed
_TMP_ANY = re.compile(r"^\..+\.(csv|json)\..+\.tmp$")


class PrepareError(RuntimeError):
    """Fatal for the whole run; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, mininterval=1.0,
                smoothing=0.05, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------- the lms step


class Job(NamedTuple):
    """One input file. The folders are shared string objects, so a million jobs cost little."""

    audio_dir: str
    data_dir: str
    rel: str  # input path relative to AUDIO_DIR, posix

    @property
    def src(self) -> str:
        return os.path.join(self.audio_dir, self.rel)

    @property
    def out_rel(self) -> str:
        return output_name(self.rel)

    @property
    def out(self) -> str:
        return os.path.join(self.data_dir, self.out_rel)


def output_name(rel_audio_path: str) -> str:
    """a/b.wav -> audioset_lms/a/b.npy, relative to DATA_DIR (only the last suffix is replaced)."""
    return posixpath.join(LMS_DIR, posixpath.splitext(rel_audio_path)[0] + ".npy")


def find_audio(audio_dir, data_dir) -> tuple[list[Job], list[tuple[str, str]], int]:
    """Audio files under `audio_dir` in sorted order, (path, reason) for the ones that cannot be
    converted (clashing names, unreadable folders), and the count of ignored files.

    Symlinked folders are followed, each real folder (device, inode) once: a link
    back up the tree (`a/loop -> ..`) adds nothing instead of looping 40 levels deep.
    """
    audio_dir, data_dir = os.path.abspath(audio_dir), os.path.abspath(data_dir)
    jobs, clashes, ignored = [], [], 0
    st = os.stat(audio_dir)
    visited = {(st.st_dev, st.st_ino)}

    def unreadable(e: OSError) -> None:
        rel = Path(os.path.relpath(e.filename, audio_dir)).as_posix() if e.filename else "."
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        clashes.append((f"{rel}/", f"folder not readable ({reason}); its files are not converted: "
                                   f"make it readable (chmod a+rx) and rerun"))
        _log(f"warning: cannot read folder {e.filename} ({reason}); its files are not converted")

    def first_visit(root: str, name: str) -> bool:
        try:
            st = os.stat(os.path.join(root, name))
        except OSError:
            return True  # os.walk reports it through `unreadable`
        key = (st.st_dev, st.st_ino)
        if key in visited:
            return False
        visited.add(key)
        return True

    for root, dirs, files in os.walk(audio_dir, onerror=unreadable, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and first_visit(root, d)]
        prefix = Path(os.path.relpath(root, audio_dir)).as_posix()
        stems: dict = {}  # outputs can only clash inside one folder
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in AUDIO_EXTENSIONS:
                ignored += 1
                continue
            rel = name if prefix == "." else f"{prefix}/{name}"
            printable = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if printable != rel:  # its name could not be written to the UTF-8 lists
                clashes.append((printable, "file name is not valid UTF-8; rename it "
                                           "(e.g. with convmv)"))
                continue
            if stem in stems:
                clashes.append((rel, f"same output {output_name(rel)} as {stems[stem]}; "
                                     f"rename one of them"))
                continue
            stems[stem] = rel
            jobs.append(Job(audio_dir, data_dir, rel))
    return jobs, clashes, ignored


def existing_outputs(data_dir) -> set[str]:
    """Outputs already written (relative to DATA_DIR); removes temporaries a killed run left."""
    found = set()
    data_dir = str(data_dir)
    for root, _, files in os.walk(os.path.join(data_dir, LMS_DIR)):
        prefix = Path(os.path.relpath(root, data_dir)).as_posix()
        for name in files:
            if _TMP_NAME.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
            elif name.endswith(".npy"):
                found.add(f"{prefix}/{name}")
    return found


def save_lms(path, lms: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, lms)


def _checked(lms: np.ndarray) -> np.ndarray:
    from m2das.data.audio import AudioError

    if not np.isfinite(lms).all():
        raise AudioError("the LMS has NaN or inf values")
    return lms


def convert_one(job: Job, resampler: str | None = None) -> tuple[str, str, str, float, bool]:
    """Convert one file: (rel, "ok"|"failed", reason, seconds of audio, silent).

    Per-file problems are returned, not raised; a failure to write (disk full,
    permissions) raises, because it would fail for every file after it.
    """
    job, wave, seconds, silent, reason = load_16k(job, resampler)
    if wave is None:
        return job.rel, "failed", reason, 0.0, False
    from m2das.data.audio import lms_batch_16k

    return write_output(job, lms_batch_16k([wave])[0], seconds, silent)


def write_output(job: Job, lms: np.ndarray, seconds: float, silent: bool):
    """Save a finished LMS (after its finite check): the result row convert_one returns."""
    try:
        lms = _checked(lms)
    except Exception as e:
        return job.rel, "failed", str(e), 0.0, False
    save_lms(job.out, lms)
    return job.rel, "ok", "", seconds, silent


def load_16k(job: Job, resampler: str | None = None):
    """Decode, mix to mono and resample on the CPU: (job, float32 16-kHz wave or None, seconds,
    silent, reason). The part of a conversion that runs in worker processes on every path."""
    from m2das.data.audio import RESAMPLER, AudioError, load_audio, mono, resample_16k

    try:
        wave, sr = load_audio(job.src)
        x = resample_16k(mono(wave), sr, resampler or RESAMPLER)
        if not np.isfinite(x).all():
            raise AudioError("NaN or inf samples after resampling")
    except AudioError as e:
        return job, None, 0.0, False, str(e)
    except Exception as e:  # a conversion error in one file must not stop the others
        return job, None, 0.0, False, f"conversion error: {type(e).__name__}: {e}"
    return job, x, wave.shape[1] / sr, not np.any(wave), ""


def _worker_init(main_pid: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    if main_pid is not None:
        exit_with(main_pid)


def exit_with(pid: int) -> None:
    """End this process as soon as process `pid` is gone, even if it was SIGKILLed.

    A pool worker blocks reading its job queue, whose write end it holds itself,
    and the forkserver lives as long as any worker: without this, both would
    sleep for ever on a login node after the main process is killed.
    """
    import threading

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll instead
        fd = None

    def watch():
        import select

        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # alive, another user's process
                    continue
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-main", daemon=True).start()


def _mp_context():
    """Workers forked from a clean server process that has imported torch but run nothing.

    Plain fork is not safe here: a caller that already ran torch ops (the demo,
    a test session, the GPU path) has OpenMP/CUDA state that can deadlock a
    forked child. spawn would be safe too but imports torch once per worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["m2das.data.audio", "m2das.data.prepare"])
    return ctx


CRASHED = "worker process died while converting it (out of memory?); convert or remove the file"


def robust_map(fn, jobs, workers: int):
    """Yield (job, fn(job)) in completion order over `workers` processes.

    A worker that dies (the kernel's OOM killer, a crash in a decoder) would
    hang a multiprocessing.Pool for ever. Here the jobs it may have been
    running are retried one at a time in a fresh process, so the file that
    kills a worker on its own is the only one reported, as (job, CRASHED).
    Exceptions raised by `fn` propagate.
    """
    from concurrent.futures.process import BrokenProcessPool

    todo, suspects = collections.deque(jobs), collections.deque()
    while todo or suspects:
        alone = bool(suspects)
        source = suspects if alone else todo
        limit = 1 if alone else 4 * workers
        pool = concurrent.futures.ProcessPoolExecutor(1 if alone else workers, _mp_context(),
                                                      initializer=_worker_init,
                                                      initargs=(os.getpid(),))
        try:
            in_flight: dict = {}
            broken = False
            while (source or in_flight) and not broken:
                while source and len(in_flight) < limit:
                    job = source.popleft()
                    in_flight[pool.submit(fn, job)] = job
                done, _ = concurrent.futures.wait(in_flight, return_when="FIRST_COMPLETED")
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        if alone:
                            yield job, CRASHED
                        else:
                            suspects.append(job)
                        continue
                    yield job, result
            suspects.extend(in_flight.values())  # lost with the broken pool: retry alone
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on a stop: no new file is started


def _convert_cpu(jobs, workers, on_result, resampler=None):
    convert = functools.partial(convert_one, resampler=resampler)
    if workers <= 1:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                on_result(convert(job))
        finally:
            torch.set_num_threads(previous)
        return
    for job, result in robust_map(convert, jobs, workers):
        on_result((job.rel, "failed", CRASHED, 0.0, False) if result is CRASHED else result)


def _convert_gpu(jobs, workers, device, batch_size, on_result, resampler=None):
    """Decode and resample (soxr) in CPU workers, STFT and mel in batches on the device, write in
    threads. The waveforms the device gets are those of the per-file path, so are the LMS."""
    import torch

    from m2das.data.audio import lms_batch_16k

    writer = concurrent.futures.ThreadPoolExecutor(max(2, min(8, workers)))
    pending: list = []

    def flush(batch):
        waves = [torch.from_numpy(wave) for _, wave, _, _ in batch]
        for (job, _, seconds, silent), lms in zip(batch, lms_batch_16k(waves, device)):
            pending.append(writer.submit(write_output, job, lms, seconds, silent))

    def drain(block=False):
        # bounded: when the disk is slower than the device, wait for it instead of piling up
        while pending and (block or pending[0].done() or len(pending) > 4 * batch_size):
            on_result(pending.pop(0).result())

    try:
        batch = []
        load = functools.partial(load_16k, resampler=resampler)
        for job, loaded in robust_map(load, jobs, max(1, workers)):
            _, wave, seconds, silent, reason = ((job, None, 0.0, False, CRASHED) if loaded is CRASHED
                                                else loaded)
            if wave is None:
                on_result((job.rel, "failed", reason, 0.0, False))
                continue
            batch.append((job, wave, seconds, silent))
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
                drain()
        flush(batch)
        drain(block=True)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrepareError("--device cuda: no CUDA device is visible here; use --device cpu "
                           "(or run the container with --gpus all)", 2)
    if device != "cpu" and not device.startswith("cuda"):
        raise PrepareError(f"--device {device}: expected auto, cpu or cuda", 2)
    return device


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def read_failures(data_dir) -> list[tuple[str, str]]:
    path = Path(data_dir) / FAILURES
    if not path.is_file():
        return []
    return [(r["file"], r["reason"]) for r in read_csv_rows(path) if r.get("file")]


def write_failures(data_dir, failures) -> Path:
    path = Path(data_dir) / FAILURES
    write_csv(path, ["file", "reason"], sorted(failures))
    return path


# ---------------------------------------------------------------- the recipe of a data folder


def recipe_record(recipe: dict, other_outputs=()) -> dict:
    """What DATA/lms_recipe.json holds: the recipe, the versions that made it, and the outputs
    still made with another recipe (listed so that the trainer can warn about them)."""
    import importlib.metadata

    from m2das import __version__

    record = {"recipe": recipe, "m2das_version": __version__,
              OTHER_RECIPE_OUTPUTS: sorted(other_outputs)}
    if recipe.get("resampler") == "soxr":
        record["soxr_version"] = importlib.metadata.version("soxr")
    return record


def recorded_recipe(data_dir, has_outputs: bool) -> dict | None:
    """The data folder's record; a folder with LMS files but no record predates the record and
    was resampled by torchaudio at its defaults (the legacy recipe)."""
    from m2das.data.audio import LEGACY_RESAMPLER, lms_recipe

    try:
        record = read_recipe(data_dir)
    except ValueError as e:
        raise PrepareError(str(e), 2) from None
    if record is None and has_outputs:
        record = {"recipe": lms_recipe(LEGACY_RESAMPLER), "m2das_version": "0.1.0 or older",
                  OTHER_RECIPE_OUTPUTS: [], "inferred": True}
    return record


def _resampled(job: Job) -> bool:
    """Whether the output of `job` went through the resampler (its source is not 16 kHz)."""
    import soundfile as sf

    from m2das.data.audio import SAMPLE_RATE

    try:
        return sf.info(job.src).samplerate != SAMPLE_RATE
    except Exception:  # unreadable now: converting it again records why
        return True


def plan_recipe(jobs, done: set, record: dict | None, data_dir: Path, recipe: dict,
                reconvert: bool, progress: bool) -> tuple[list[Job], set[str]]:
    """(jobs whose existing output is of another recipe and must be converted again, all outputs
    of another recipe). Refuses (exit 2) a folder of another recipe unless `reconvert`: its
    old files must not mix silently with new ones."""
    if record is None:
        return [], set()
    old = record["recipe"]
    if old == recipe:
        stale = set(record.get(OTHER_RECIPE_OUTPUTS) or []) & done
        if stale and not reconvert:
            _log(f"warning: {len(stale)} LMS files in {data_dir} were made with another recipe "
                 f"(listed in {RECIPE_FILE}); rerun with --reconvert to convert them again")
            return [], stale
    else:
        what = (f"{data_dir} holds {len(done)} LMS files made with {describe_recipe(old)} "
                f"(m2das {record.get('m2das_version', '?')}); this m2das makes the paper's LMS "
                f"with {describe_recipe(recipe)}")
        if not reconvert:
            raise PrepareError(f"{what}. Rerun with --reconvert to convert the affected files "
                               f"again (16-kHz inputs are kept as they are), or pass an empty "
                               f"DATA_DIR", 2)
        _log(f"{what}: converting the affected files again (--reconvert)")
        resampler_keys = {"resampler", "resampler_quality"}
        only_resampler = ({k: v for k, v in old.items() if k not in resampler_keys}
                          == {k: v for k, v in recipe.items() if k not in resampler_keys})
        candidates = [j for j in jobs if j.out_rel in done]
        with _progress(len(candidates), "recipe", progress) as bar:
            stale = set()
            for job in candidates:
                if not only_resampler or _resampled(job):
                    stale.add(job.out_rel)
                bar.update(1)
        stale |= done - {j.out_rel for j in jobs}  # no input here: cannot tell, cannot redo
    redo = [j for j in jobs if j.out_rel in stale]
    orphans = stale - {j.out_rel for j in redo}
    if orphans:
        _log(f"warning: {len(orphans)} LMS files of another recipe have no input in this "
             f"AUDIO_DIR (e.g. {sorted(orphans)[0]}); they stay, listed in {RECIPE_FILE}: "
             f"delete them, or rerun with the AUDIO_DIR they came from")
    return (redo if reconvert else []), stale


def run_lms(audio_dir, data_dir, device: str = "auto", workers: int | None = None,
            batch_size: int = 32, progress: bool = True, batched: bool | None = None,
            reconvert: bool = False, resampler: str | None = None) -> dict:
    """Convert every audio file that has no output yet; record the ones that fail.

    `batched` (default: on a GPU) decodes and resamples in worker processes and
    runs STFT and mel in batches on `device`; otherwise each worker converts whole
    files. Either way the LMS recipe is recorded in DATA/lms_recipe.json, and a
    folder made with another recipe is refused unless `reconvert`, which converts
    its affected files again. `resampler` other than the default is for benchmarks.
    """
    from m2das.data.audio import RESAMPLER, lms_recipe

    audio_dir, data_dir = Path(audio_dir), Path(data_dir)
    if not audio_dir.is_dir():
        raise PrepareError(f"audio folder {audio_dir} does not exist; pass AUDIO_DIR or mount "
                           f"your audio there (docker run -v /path/to/audio:{DEFAULT_AUDIO_DIR})", 2)
    device = resolve_device(device)
    workers = default_workers() if workers is None else max(1, int(workers))
    resampler = resampler or RESAMPLER
    recipe = lms_recipe(resampler)
    jobs, clashes, ignored = find_audio(audio_dir, data_dir)
    done = existing_outputs(data_dir)
    record = recorded_recipe(data_dir, bool(done))
    redo, stale = plan_recipe(jobs, done, record, data_dir, recipe, reconvert, progress)
    redo_names = {j.out_rel for j in redo}
    if not done or (not stale and record.get("inferred")):
        write_json(data_dir / RECIPE_FILE, recipe_record(recipe))  # before the first new file
        record = recipe_record(recipe)
    todo = [j for j in jobs if j.out_rel not in done or j.out_rel in redo_names]
    summary = {"audio_files": len(jobs) + sum(not c[0].endswith("/") for c in clashes),
               "ignored_non_audio": ignored,
               "skipped_existing": len(jobs) - len(todo), "converted": 0, "failed": 0,
               "silent": 0, "hours_converted": 0.0, "device": device, "workers": workers,
               "reconverted": 0, "other_recipe_outputs": len(stale),
               "recipe": describe_recipe(recipe)}
    _log(f"lms: {len(jobs)} audio files in {audio_dir}, {summary['skipped_existing']} already "
         f"converted, {len(todo)} to do on {device} ({workers} workers"
         f"{f', {len(redo)} of them again for the new recipe' if redo else ''})")
    failures = list(clashes)
    attempted: set = set()
    seconds = 0.0
    bar = _progress(len(todo), "lms", progress)

    def on_result(result):
        nonlocal seconds
        rel, status, reason, secs, silent = result
        attempted.add(rel)
        if status == "ok":
            summary["converted"] += 1
            out_rel = output_name(rel)
            if out_rel in stale:
                stale.discard(out_rel)
                summary["reconverted"] += 1
            summary["silent"] += int(silent)
            seconds += secs
        else:
            failures.append((rel, reason))
            bar.set_postfix(failed=len(failures), refresh=False)
        bar.update(1)

    started = time.monotonic()
    try:
        if not (device != "cpu" if batched is None else batched):
            _convert_cpu(todo, workers, on_result, resampler)
        else:
            _convert_gpu(todo, workers, device, batch_size, on_result, resampler)
        if record["recipe"] != recipe or set(record.get(OTHER_RECIPE_OUTPUTS) or []) != stale:
            # every file of the old recipe that could be redone has been tried
            write_json(data_dir / RECIPE_FILE, recipe_record(recipe, stale))
        summary["other_recipe_outputs"] = len(stale)
    finally:
        bar.close()
        summary["failed"] = len(failures)
        summary["hours_converted"] = seconds / 3600.0
        summary["lms_seconds"] = time.monotonic() - started
        # an interrupted run keeps what earlier runs found about the files it did not reach
        unreached = {j.rel for j in todo} - attempted
        failures += [row for row in read_failures(data_dir) if row[0] in unreached]
        summary["failures_file"] = str(write_failures(data_dir, failures))
    for rel, reason in sorted(failures)[:5]:
        _log(f"  failed: {audio_dir / rel}: {reason}")
    if len(failures) > 5:
        _log(f"  ... {len(failures) - 5} more in {summary['failures_file']}")
    return summary


# ---------------------------------------------------------------- list, labels, stats


def write_file_list(data_dir, progress: bool = True) -> dict:
    """files_audioset.csv from the outputs on disk, so it never names a missing or broken file."""
    from m2das.data.audio import duration_from_frames

    data_dir = Path(data_dir)
    lms_dir = data_dir / LMS_DIR
    names = []  # (path, path relative to DATA_DIR)
    for root, dirs, files in os.walk(lms_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        prefix = Path(os.path.relpath(root, data_dir)).as_posix()
        names += [(os.path.join(root, n), f"{prefix}/{n}") for n in files
                  if n.endswith(".npy") and not n.startswith(".")]
    good, bad, seconds = [], [], 0.0
    with _progress(len(names), "list", progress) as bar:
        for path, rel in names:
            try:
                seconds += duration_from_frames(check_lms_file(path))
                good.append(rel)
            except (OSError, ValueError, EOFError) as e:
                bad.append((path, " ".join(str(e).split())))
            bar.update(1)
    good.sort()
    out = data_dir / FILE_LIST
    write_csv(out, ["file_name"], ([n] for n in good))
    for path, reason in bad[:5]:
        _log(f"  unusable output {path}: {reason}; delete it and rerun to convert it again")
    return {"listed": len(good), "invalid_outputs": len(bad), "hours_listed": seconds / 3600.0,
            "file_list": str(out)}


def read_file_list(data_dir) -> list[str]:
    path = Path(data_dir) / FILE_LIST
    if not path.is_file():
        raise PrepareError(f"{path} not found; run the list step first (--steps list)", 2)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "file_name":
            raise PrepareError(f"{path}: first line must be 'file_name'; rerun --steps list", 2)
        return [row[0] for row in reader if row and row[0]]


def run_labels(data_dir, metadata_dir=None, url_base=None, hold_out_eval: bool = False) -> dict:
    """files_as_weighted.csv; metadata from `metadata_dir`, else downloaded once into DATA/metadata."""
    from m2das.data import heldout, labels

    data_dir = Path(data_dir)
    try:
        if metadata_dir is None:
            metadata_dir = labels.fetch_metadata(data_dir / METADATA_SUBDIR, url_base, warn=_log)
        else:
            metadata_dir = labels.check_metadata_dir(metadata_dir)
        label_map = labels.load_label_map(metadata_dir, warn=_log)
        class_mids = labels.read_class_mids(Path(metadata_dir) / labels.CLASS_FILE)
    except labels.MetadataError as e:
        raise PrepareError(str(e), 2) from None
    names = read_file_list(data_dir)
    out = data_dir / WEIGHTED_LIST
    result = labels.write_weighted_list(out, names, label_map, class_mids)
    result.update({"weighted_list": str(out), "metadata_dir": str(metadata_dir),
                   "label_map_size": len(label_map), "classes": len(class_mids)})
    # files_as_eval.csv for the training monitor; --hold-out-eval also drops those clips from training.
    result.update(heldout.write_eval_list(data_dir, metadata_dir, WEIGHTED_LIST, hold_out_eval))
    if result["unknown_mids"]:
        _log(f"warning: {len(result['unknown_mids'])} label MIDs are not in "
             f"{labels.CLASS_FILE}, e.g. {result['unknown_mids'][:3]}")
    return result


def run_stats(data_dir, num_files: int | None = None, seed: int | None = None,
              progress: bool = True) -> dict:
    """norm_stats.json with the shared rule of m2das.data.stats (fixed seed, so reruns agree)."""
    from m2das.data import stats

    data_dir = Path(data_dir)
    names = read_file_list(data_dir)
    if not names:
        raise PrepareError(f"{data_dir / FILE_LIST} is empty: nothing to compute statistics from", 1)
    num_files = stats.DEFAULT_STATS_FILES if num_files is None else num_files
    seed = stats.DEFAULT_STATS_SEED if seed is None else seed
    with _progress(num_files, "stats", progress) as bar:
        try:
            result = stats.compute_norm_stats([os.path.join(data_dir, n) for n in names],
                                              num_files=num_files, seed=seed,
                                              progress=lambda n, total: bar.update(1))
        except stats.NonFiniteLMS as e:
            raise PrepareError(str(e), 2) from None
    out = data_dir / NORM_STATS
    stats.write_norm_stats(out, result)
    return {"norm_stats": str(out), "mean": result["mean"], "std": result["std"]}


# ---------------------------------------------------------------- the whole run


@contextlib.contextmanager
def _lock(data_dir):
    """One prepare per data folder: two would delete each other's temporary files."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        f = open(data_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise PrepareError(f"cannot write to the data folder {data_dir} ({e.strerror or e}); "
                           f"pass a writable DATA_DIR (in docker: mount it with -v)", 2) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PrepareError(f"another `m2das prepare` is running on {data_dir}; wait for it "
                               f"or stop it", 1) from None
        _remove_stale_temps(data_dir)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(data_dir: Path) -> None:
    """Temporaries of lists, stats and downloads that a killed run left (LMS ones: existing_outputs)."""
    for folder in (data_dir, data_dir / METADATA_SUBDIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if _TMP_ANY.match(path.name):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()


def parse_steps(steps) -> list[str]:
    if isinstance(steps, str):
        steps = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise PrepareError(f"--steps {','.join(steps)}: choose from {','.join(STEPS)}", 2)
    return [s for s in STEPS if s in steps]


def run_prepare(audio_dir, data_dir, metadata_dir=None,
                device: str = "auto", workers: int | None = None, steps=STEPS,
                url_base: str | None = None, stats_files: int | None = None,
                batch_size: int = 32, progress: bool = True, reconvert: bool = False,
                hold_out_eval: bool = False) -> dict:
    """Run the chosen steps; return the summary. Raises PrepareError (with .code) when fatal."""
    steps = parse_steps(steps)
    data_dir = Path(data_dir)
    started = time.monotonic()
    summary: dict = {"steps": steps, "data_dir": str(data_dir)}
    with _lock(data_dir):
        if "lms" in steps:
            summary.update(run_lms(audio_dir, data_dir, device, workers, batch_size, progress,
                                   reconvert=reconvert))
        if "list" in steps:
            summary.update(write_file_list(data_dir, progress))
        nothing_listed = summary.get("listed") == 0  # labels and stats would have no input
        labels_error = None
        if "labels" in steps and not nothing_listed:
            try:
                summary.update(run_labels(data_dir, metadata_dir, url_base, hold_out_eval))
            except PrepareError as e:  # missing metadata: still finish the stats, then report
                labels_error = e
        if "stats" in steps and not nothing_listed:
            summary.update(run_stats(data_dir, stats_files, progress=progress))
        if labels_error is not None:
            raise labels_error
    summary["seconds"] = time.monotonic() - started
    summary["ok"], summary["reason"] = _usable(summary)
    return summary


def _usable(s: dict) -> tuple[bool, str]:
    if "listed" in s and s["listed"] == 0:
        return False, (f"no usable LMS file in {s['data_dir']}/{LMS_DIR} (see "
                       f"{FAILURES} for files that failed)")
    if "labelled" in s and s["labelled"] == 0:
        return False, ("no file has a label in the AudioSet lists (the LMS files and "
                       f"{FILE_LIST} are fine for plain M2D); check the file names: the YouTube "
                       "ID must be their first 11 characters, or follow a leading 'Y'")
    if "converted" in s and "listed" not in s and s["converted"] + s["skipped_existing"] == 0:
        return False, "no audio file was converted"
    return True, ""


def format_summary(s: dict) -> str:
    lines = ["", "m2das prepare summary"]
    if "converted" in s:
        lines.append(f"  converted          {s['converted']} ({s['hours_converted']:.2f} h of audio, "
                     f"{s['silent']} silent) on {s['device']}")
        lines.append(f"  skipped (existing) {s['skipped_existing']}")
        if s["reconverted"] or s["other_recipe_outputs"]:
            lines.append(f"  reconverted        {s['reconverted']} (new LMS recipe), "
                         f"{s['other_recipe_outputs']} of another recipe left")
        lines.append(f"  failed             {s['failed']}  -> {s['failures_file']}")
        lines.append(f"  LMS folder         {Path(s['data_dir']) / LMS_DIR} ({s['recipe']}, "
                     f"recorded in {RECIPE_FILE})")
        if s["ignored_non_audio"]:
            lines.append(f"  ignored non-audio  {s['ignored_non_audio']} (by extension)")
    if "listed" in s:
        lines.append(f"  listed             {s['listed']} ({s['hours_listed']:.2f} h) -> "
                     f"{s['file_list']}")
        if s["invalid_outputs"]:
            lines.append(f"  unusable outputs   {s['invalid_outputs']} (not in the list)")
    if "labelled" in s:
        lines.append(f"  labelled           {s['labelled']} -> {s['weighted_list']}")
        lines.append(f"  without labels     {s['without_labels']} (YTID in no list; left out)"
                     + (f", e.g. {', '.join(s['without_labels_examples'][:3])}"
                        if s["without_labels"] else ""))
        lines.append(f"  classes with no file {s['classes_without_files']} of {s['classes']}")
    if "norm_stats" in s:
        lines.append(f"  norm stats         mean {s['mean']:.4f} std {s['std']:.4f} -> "
                     f"{s['norm_stats']}")
    lines.append(f"  time               {s['seconds']:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m2das prepare",
        description="Audio folder -> LMS .npy files, files_audioset.csv, files_as_weighted.csv, "
                    "norm_stats.json. Rerun to finish an interrupted run; done files are kept.")
    p.add_argument("audio_dir", metavar="AUDIO_DIR",
                   help=f"folder of AudioSet clips, any depth (in the container: {DEFAULT_AUDIO_DIR})")
    p.add_argument("data_dir", metavar="DATA_DIR",
                   help=f"output data folder (in the container: {DEFAULT_DATA_DIR})")
    p.add_argument("--metadata", metavar="DIR", default=None,
                   help="folder with eval_segments.csv, balanced_train_segments.csv, "
                        "[unbalanced_train_segments.csv], class_labels_indices.csv; "
                        f"default: DATA_DIR/{METADATA_SUBDIR}, downloading what is missing")
    p.add_argument("--metadata-url", metavar="URL", default=None,
                   help="where to download the lists from: a URL or a mirror folder (env "
                        "M2DAS_AUDIOSET_URL; default Google's AudioSet release)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all CPU cores)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (default all)")
    p.add_argument("--stats-files", type=int, default=None,
                   help="random crops for the normalisation statistics (default 5000)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per GPU batch (default 32)")
    p.add_argument("--reconvert", action="store_true",
                   help=f"DATA_DIR was made with another LMS recipe (see {RECIPE_FILE}): convert "
                        f"its affected files again (without it, such a folder is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--hold-out-eval", action="store_true",
                   help="keep clips of eval_segments.csv out of files_as_weighted.csv (they are always "
                        "listed in files_as_eval.csv, the training monitor's default list)")
    return p


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no folders are assumed outside the container (its entry point passes them)
        parser.print_help(sys.stderr)
        _log("\nm2das prepare: pass AUDIO_DIR and DATA_DIR")
        return 2
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        summary = run_prepare(args.audio_dir, args.data_dir, args.metadata, args.device,
                              args.workers, args.steps, args.metadata_url, args.stats_files,
                              args.batch_size, not args.no_progress, args.reconvert,
                              hold_out_eval=args.hold_out_eval)
    except PrepareError as e:
        _log(f"m2das prepare: {e}")
        return e.code
    except KeyboardInterrupt:
        _log("m2das prepare: interrupted; finished files are kept, rerun the same command to "
             "go on")
        return 130
    except OSError as e:  # disk full, read-only mount: every later file would fail the same way
        where = f" {e.filename}" if e.filename else ""
        _log(f"m2das prepare: cannot write{where}: {e.strerror or e}; fix it and rerun the same "
             f"command (finished files are kept)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    if not summary["ok"]:
        _log(f"m2das prepare: {summary['reason']}")
        return 1
    return 0


# ---------------------------------------------------------------- benchmark


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def make_bench_clips(folder, count: int, seconds: float = 10.0, sample_rate: int = 44100,
                     seed: int = 0) -> list[Path]:
    """Stereo 16-bit wav clips of noise plus tones, the typical downloaded AudioSet file."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    paths = []
    for i in range(count):
        tone = np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        wave = 0.3 * tone[:, None] + 0.05 * rng.standard_normal((t.size, 2))
        path = Path(folder) / f"bench{i:05d}_0.000.wav"
        sf.write(str(path), wave.astype(np.float32), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def bench_main(argv=None) -> int:
    """`m2das bench prepare`: files/s of the lms step on generated 10-s 44.1-kHz stereo clips,
    the paper's recipe (soxr HQ) next to the old one (torchaudio's Resample) in the same run."""
    import tempfile

    import torch

    p = argparse.ArgumentParser(prog="m2das bench prepare",
                                description="Time the lms step on clips generated here.")
    p.add_argument("--files", type=int, default=None, help="clips (default 32 per worker)")
    p.add_argument("--workers", type=int, default=None, help="default: all CPU cores")
    p.add_argument("--device", default="auto", help="auto (CPU, then GPU if present)|cpu|cuda")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:  # called with the sub-command still in front
        argv = argv[1:]
    args = p.parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers
    files = args.files or 32 * workers
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device != "auto":
            _log("m2das bench prepare: no CUDA device visible")
            return 2
        devices.remove("cuda")
    from m2das.data.audio import LEGACY_RESAMPLER, RESAMPLER, RESAMPLER_QUALITY

    variants = [(f"new ({RESAMPLER} {RESAMPLER_QUALITY})", RESAMPLER),
                (f"old ({LEGACY_RESAMPLER} Resample defaults)", LEGACY_RESAMPLER)]
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({default_workers()} usable), "
          f"load average {load} before the run")
    with tempfile.TemporaryDirectory(prefix="m2das-bench-") as tmp:
        audio = Path(tmp) / "audio"
        audio.mkdir()
        make_bench_clips(audio, files)
        warm = Path(tmp) / "warm"
        warm.mkdir()
        for clip in sorted(audio.iterdir())[:workers * 2]:
            (warm / clip.name).symlink_to(clip)
        for device in devices:
            name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
            rates = {}
            for label, resampler in variants:
                tag = f"{device}-{resampler}"
                # warm-up on a few clips: worker server start, CUDA context, filter kernels
                run_lms(warm, Path(tmp) / f"warm-{tag}", device=device, workers=workers,
                        progress=False, resampler=resampler)
                s = run_lms(audio, Path(tmp) / f"data-{tag}", device=device, workers=workers,
                            progress=False, resampler=resampler)
                rates[label] = s["converted"] / s["lms_seconds"]
                print(f"{device}, {label}: {files} clips (10 s, 44.1 kHz, stereo, 16-bit wav) in "
                      f"{s['lms_seconds']:.2f} s with {workers} workers: {rates[label]:.1f} "
                      f"files/s, {rates[label] / workers:.2f} files/s per core ({name})")
            new, old = (rates[label] for label, _ in variants)
            print(f"{device}: the paper's recipe runs at {new / old:.2f}x the old one's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
