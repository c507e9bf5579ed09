"""The crash-safe conversion engine of `m2das prepare`'s lms step: audio files -> LMS files.

Each input is a Job; each conversion ends as one Converted record, whether the
file was written or why it was not. Per-file problems are records, not
exceptions; a failure to write (disk full, permissions) raises, because every
later file would fail the same way. Workers are processes forked from a clean
server, and a worker that dies (the OOM killer, a crashing decoder) costs only
the file that killed it (robust_map).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
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

from m2das import events
from m2das.datafolder import LMS_DIR
from m2das.fileio import atomic_write, full_disk_error

# Extensions taken as audio. Formats libsndfile cannot decode (m4a, webm) are
# still attempted so that they show up in the failure list instead of vanishing.
AUDIO_EXTENSIONS = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
                    ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64", ".m4a", ".mp4", ".webm"}
_TMP_NAME = re.compile(r"^\..+\.npy\..+\.tmp$")  # what fileio.atomic_write leaves when killed
CRASHED = "worker process died while converting it (out of memory?); convert or remove the file"


log = functools.partial(events.log, prog=None, stderr=True, clock=False)  # prepare's stderr lines


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "file"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=1.0,
                smoothing=0.05, dynamic_ncols=True, file=sys.stderr)


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
        log(f"warning: cannot read folder {e.filename} ({reason}); its files are not converted")

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


class Converted(NamedTuple):
    """The outcome of one file: `error` is empty when `out` (relative to DATA_DIR) was written."""

    rel: str  # input path relative to AUDIO_DIR
    out: str
    error: str = ""
    seconds: float = 0.0  # of audio converted
    silent: bool = False

    @property
    def ok(self) -> bool:
        return not self.error


class Decoded(NamedTuple):
    """A file decoded, mixed to mono and resampled to 16 kHz (wave None: `error` says why)."""

    job: Job
    wave: np.ndarray | None
    seconds: float = 0.0
    silent: bool = False
    error: str = ""


def failed(job: Job, error: str) -> Converted:
    return Converted(job.rel, job.out_rel, error)


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
    try:
        with atomic_write(path, "wb") as f:
            np.save(f, lms)
    except OSError as e:
        raise full_disk_error(e, path, lms.nbytes + 4096) from e


def _checked(lms: np.ndarray) -> np.ndarray:
    from m2das.data.audio import AudioError

    if not np.isfinite(lms).all():
        raise AudioError("the LMS has NaN or inf values")
    return lms


def convert_one(job: Job, resampler: str | None = None) -> Converted:
    """Convert one file. Per-file problems are in the record, not raised; a failure to write
    (disk full, permissions) raises, because it would fail for every file after it.
    """
    decoded = load_16k(job, resampler)
    if decoded.wave is None:
        return failed(job, decoded.error)
    from m2das.data.audio import lms_batch_16k

    return write_output(decoded, lms_batch_16k([decoded.wave])[0])


def write_output(decoded: Decoded, lms: np.ndarray) -> Converted:
    """Save a finished LMS (after its finite check)."""
    try:
        lms = _checked(lms)
    except Exception as e:
        return failed(decoded.job, str(e))
    save_lms(decoded.job.out, lms)
    return Converted(decoded.job.rel, decoded.job.out_rel, "", decoded.seconds, decoded.silent)


def load_16k(job: Job, resampler: str | None = None) -> Decoded:
    """Decode, mix to mono and resample on the CPU: the part of a conversion that runs in worker
    processes on every path."""
    from m2das.data.audio import RESAMPLER, AudioError, load_audio, mono, resample_16k

    try:
        wave, sr = load_audio(job.src)
        x = resample_16k(mono(wave), sr, resampler or RESAMPLER)
        if not np.isfinite(x).all():
            raise AudioError("NaN or inf samples after resampling")
    except AudioError as e:
        return Decoded(job, None, error=str(e))
    except Exception as e:  # a conversion error in one file must not stop the others
        return Decoded(job, None, error=f"conversion error: {type(e).__name__}: {e}")
    return Decoded(job, x, wave.shape[1] / sr, not np.any(wave))


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
    ctx.set_forkserver_preload(["m2das.data.audio", __name__])  # this module: what the workers run
    return ctx


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


def convert_cpu(jobs, workers, on_result, resampler=None) -> None:
    """Whole files in each worker process; every outcome goes to on_result(Converted)."""
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
        on_result(failed(job, CRASHED) if result is CRASHED else result)


def convert_batched(jobs, workers, device, batch_size, on_result, resampler=None) -> None:
    """Decode and resample (soxr) in CPU workers, STFT and mel in batches on the device, write in
    threads. The waveforms the device gets are those of the per-file path, so are the LMS."""
    import torch

    from m2das.data.audio import lms_batch_16k

    writer = concurrent.futures.ThreadPoolExecutor(max(2, min(8, workers)))
    pending: list = []

    def flush(batch):
        waves = [torch.from_numpy(decoded.wave) for decoded in batch]
        for decoded, lms in zip(batch, lms_batch_16k(waves, device)):
            pending.append(writer.submit(write_output, decoded, lms))

    def drain(block=False):
        # bounded: when the disk is slower than the device, wait for it instead of piling up
        while pending and (block or pending[0].done() or len(pending) > 4 * batch_size):
            on_result(pending.pop(0).result())

    try:
        batch = []
        load = functools.partial(load_16k, resampler=resampler)
        for job, decoded in robust_map(load, jobs, max(1, workers)):
            if decoded is CRASHED or decoded.wave is None:
                on_result(failed(job, CRASHED if decoded is CRASHED else decoded.error))
                continue
            batch.append(decoded)
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


