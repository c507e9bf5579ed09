"""Rank 0's set-up of a run folder before the first step, and its bookkeeping files.

Take the folder (locked, or staged from object storage), check config.json
against the flags, read and validate the list once per version, fix the
normalisation statistics, record each start in restarts.jsonl and trim a
killed start's log lines. Every other rank gets rank 0's answer (or its
error, as a TrainError) through `on_rank0`.
"""

import contextlib
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import torch.distributed as dist

from m2das import config, events, remote, runfolder, storeerrors
from m2das.config import TrainConfig
from m2das.data import packed
from m2das.data.dataset import DataListError, ListedPaths, read_samples, validate, validate_packed
from m2das.data.recipe import record_recipe
from m2das.data.stats import compute_norm_stats, read_norm_stats, write_norm_stats
from m2das.datafolder import NORM_STATS, RECIPE_FILE
from m2das.events import log
from m2das.fileio import LinkRefused, atomic_write, is_url, read_jsonl, refuse_links, write_json
from m2das.remote import RemoteError, RemoteRunFolder
from m2das.runfolder import RunLock, RunLocked


class TrainError(Exception):
    """A problem the user must fix before training can start; printed as one line."""


def broadcast(obj, rank: int):
    """rank 0's value of `obj` on every rank (identity when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn, rank: int):
    """Run fn on rank 0 and give every rank its result, or its error as a TrainError; an object store
    that did not answer stays that (rank 0 keeps the error itself, the others get a StoreUnavailable)."""
    result, error, transient, failed = None, None, False, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            transient = storeerrors.is_transient(e)
            if not transient and not isinstance(e, (TrainError, DataListError, ValueError, OSError)):
                raise
            error, failed = str(e), e
    result, error, transient = broadcast((result, error, transient), rank)
    if transient:
        raise failed if failed is not None else remote.StoreUnavailable(error)
    if error:
        raise TrainError(error)
    return result


def read_json_file(path: Path, role: str):
    """A small JSON file of the run folder, or a TrainError naming it and what to do."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: cannot be read ({type(e).__name__}: {e}); {role}") from None


def take_run_dir(cfg: TrainConfig, world_size: int):
    """(local folder, lock, mirror): a local run folder is locked in place; a URL (object storage)
    is locked there and staged in a local folder that the mirror uploads."""
    try:
        if is_url(cfg.output_dir):
            remote.store_wait_s()  # a bad setting is refused before anything is touched
            mirror = RemoteRunFolder(cfg.output_dir, remote.staging_for(cfg.output_dir))

            def take():
                with remote.store_errors(mirror.url, "while taking the lock"):
                    mirror.acquire()
            remote.while_unavailable(take, "to take the lock")  # an outage burns no requeue at once
            try:
                fetched = remote.while_unavailable(mirror.hydrate, "to read the run folder")
            except BaseException:
                mirror.close(upload=False)
                raise
            log(f"run folder {mirror.url}, staged in {mirror.staging}; fetched {', '.join(fetched) or 'nothing'}",
                local_paths=True)
            return mirror.staging, mirror, mirror
        run_dir = Path(cfg.output_dir) if cfg.output_dir else config.default_output_dir(cfg, world_size)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, RunLock(run_dir).acquire(), None
    except (RunLocked, RemoteError) as e:
        raise TrainError(str(e)) from None


def open_run_dir(cfg: TrainConfig, world_size: int):
    """Fix the run folder, take its lock, check config.json; returns (run_dir, lock, mirror).

    A restart may change only resume-safe flags (config.RESUME_SAFE_KEYS) and
    only when the folder is named with --output_dir; anything else needs
    --force_config.
    """
    run_dir, lock, mirror = take_run_dir(cfg, world_size)
    try:
        refuse_planted_links(run_dir)
        if lock.took_over:
            log(f"took over the run folder from a dead holder ({lock.took_over})")
        saved_path = run_dir / runfolder.CONFIG
        record = {**cfg.asdict(), "output_dir": cfg.output_dir if mirror else str(run_dir), "world_size": world_size}
        if saved_path.exists() and not shows_progress(run_dir):
            take_new_configuration(run_dir, saved_path, record)
        elif saved_path.exists():
            saved = read_json_file(saved_path, "restore it, or pass --force_config to rewrite it from these flags")
            hard, safe = config.config_differences(saved, cfg)
            if hard and not cfg.force_config:
                raise TrainError(f"{saved_path}: this run folder was started with another configuration "
                                 f"({'; '.join(hard)}); use another --output_dir or pass --force_config")
            if safe and not cfg.output_dir and not cfg.force_config:
                raise TrainError(f"{saved_path}: {'; '.join(safe)}: name the folder with --output_dir {run_dir} "
                                 f"to change these on resume")
            if hard or safe:
                log(f"configuration changed on resume: {'; '.join(hard + safe)}")
                events.record(run_dir, runfolder.EVENT_CONFIG_CHANGED, changes=hard + safe)
                write_json(saved_path, {**saved, **record})
        else:
            write_json(saved_path, record)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock, mirror


def refuse_planted_links(run_dir) -> None:
    """A log, event file or folder planted as a symbolic link: one line naming it, before anything is written."""
    try:
        refuse_links(run_dir, runfolder.WRITTEN_IN_PLACE)
    except LinkRefused as e:
        raise TrainError(str(e)) from None


DATA_PINS = (runfolder.CLASSES, runfolder.NORM_STATS, runfolder.VALIDATED, RECIPE_FILE)


def take_new_configuration(run_dir: Path, saved_path: Path, record: dict) -> None:
    """A folder whose starts never reached a checkpoint holds nothing to protect: the corrected command
    (the flags the last error asked to change) takes it over, and what was pinned from other data goes."""
    saved = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(saved_path.read_text())
    if not isinstance(saved, dict):
        saved = {}
    hard, safe = config.config_differences(saved, record)
    data_moved = any(saved.get(k) != record.get(k) for k in ("data_path", "csv_main"))
    if hard or safe or data_moved:
        log(f"{run_dir} never reached a checkpoint: taking this start's configuration"
            + (f" ({'; '.join(hard + safe)})" if hard or safe else ""))
    if data_moved:
        for name in DATA_PINS:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    write_json(saved_path, record)


def discard_unstarted(run_dir) -> bool:
    """Remove a dated run folder whose start failed before it was recorded (no start, no checkpoint):
    a failed start without --output_dir leaves nothing behind. True when removed."""
    run_dir = Path(run_dir)
    if (run_dir / runfolder.RESTARTS).exists() or runfolder.checkpoint_files(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


def load_samples(cfg: TrainConfig, run_dir: Path):
    """Read the list, pin the class vocabulary in the run folder, validate once per list version."""
    classes_path = run_dir / runfolder.CLASSES
    classes = read_json_file(classes_path, "it pins the label vocabulary: restore it, or delete it to take the "
                             "list's classes again") if classes_path.exists() else None
    samples = read_samples(cfg.data_path, cfg.csv_main, classes)  # a CSV list or a packed folder's index
    if classes is None:
        write_json(classes_path, samples.classes)
    if cfg.weighted and samples.weights is None:
        raise TrainError(f"{cfg.csv_main}: --weighted needs a weight column (file_name,label,weight)")
    return samples


def validate_once(samples, cfg: TrainConfig, run_dir: Path) -> None:
    """Validation reads every file header: skip it when this exact list was already validated.

    A packed folder is stamped by its index and shard fingerprints (m2das.data.dataset.validate_packed).
    """
    if cfg.skip_validation:
        return
    stamp_path = run_dir / runfolder.VALIDATED
    if hasattr(samples, "manifest"):
        previous = None
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(stamp_path.read_text())
        starts = sum(r.get("event") == runfolder.EVENT_START for r in read_jsonl(run_dir / runfolder.RESTARTS))
        write_json(stamp_path, validate_packed(samples, previous, log, cfg.input_size[0], cfg.verify_shards, starts))
        return
    st = os.stat(cfg.csv_main)
    stamp = {"csv": str(Path(cfg.csv_main).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "root": str(Path(cfg.data_path).resolve()), "rows": len(samples), "weighted": cfg.weighted}
    with contextlib.suppress(OSError, ValueError):  # only a cache: unreadable means "check again"
        if json.loads(stamp_path.read_text()) == stamp:
            return
    log(f"checking {len(samples)} listed files under {cfg.data_path} ...")
    validate(samples, cfg.csv_main, cfg.input_size[0], weighted=cfg.weighted,
             progress=lambda n, total: log(f"  checked {n}/{total}") if total >= 20000 else None)
    write_json(stamp_path, stamp)


def resolve_norm_stats(cfg: TrainConfig, samples, run_dir: Path) -> dict:
    """Run folder first (a resumed run keeps its numbers), then the data (a packed folder's manifest,
    else the data folder's file), else compute once; the run folder keeps what was used."""
    def read(path: Path) -> dict:
        try:
            return {**read_norm_stats(path), "source": str(path)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{path}: cannot be read ({type(e).__name__}: {e}); restore it, or delete it "
                             f"to take the statistics again") from None

    own, data_file = run_dir / NORM_STATS, Path(cfg.data_path) / NORM_STATS
    if own.exists():
        return read(own)
    if getattr(samples, "norm_stats", None):
        stats = {**samples.norm_stats, "source": f"{cfg.data_path}/{packed.MANIFEST}"}
    elif data_file.exists():
        stats = read(data_file)
    else:
        log(f"computing normalisation statistics from {cfg.stats_files} random crops (seed 0) ...")
        paths = ListedPaths(samples.root, samples.files)  # a Path per drawn file, not per row
        stats = {**compute_norm_stats(paths, cfg.stats_files, cfg.input_size[1]), "source": "computed"}
        if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0):
            raise TrainError(f"{cfg.csv_main}: normalisation statistics came out as {stats['mean']}/"
                             f"{stats['std']}: some LMS files hold NaN/inf; rerun `m2das prepare` on them")
    write_norm_stats(own, stats)
    return stats


def load_data(cfg: TrainConfig, run_dir: Path, rank: int, world: int):
    """The list, checked once per version, its statistics, and the numbers derived from its size."""
    samples = on_rank0(lambda: load_samples(cfg, run_dir), rank)
    on_rank0(lambda: validate_once(samples, cfg, run_dir), rank)
    mixed = on_rank0(lambda: record_recipe(run_dir, cfg.data_path), rank)  # pins the LMS recipe on first start
    if mixed:
        log(f"warning: {mixed}", rank)
    stats = on_rank0(lambda: resolve_norm_stats(cfg, samples, run_dir), rank)
    derived = config.resolve(cfg, world, len(samples))
    if derived["steps_per_epoch"] == 0:
        raise TrainError(f"{cfg.csv_main}: {len(samples)} files give no full step of "
                         f"{cfg.batch_size} x {cfg.accum_iter} x {world}; lower --batch_size")
    if rank == 0:  # the derived numbers, for `m2das status` and humans
        saved = read_json_file(run_dir / runfolder.CONFIG, "restore it")
        write_json(run_dir / runfolder.CONFIG, {**saved, **derived, "global_batch": derived["effective_batch_size"]})
    log(f"run folder {run_dir}; {len(samples)} files, {len(samples.classes)} classes, "
        f"{derived['steps_per_epoch']} steps/epoch, effective batch {derived['effective_batch_size']}, "
        f"lr {derived['abs_lr']:.3g}, norm stats {stats['mean']:.4f}/{stats['std']:.4f} ({stats['source']})", rank)
    return samples, stats, derived


def shows_progress(run_dir: Path) -> bool:
    """Was a checkpoint ever written here (a file, a resume from one, a saved stop)?

    Log lines alone do not count: a run killed before its first save has
    nothing to resume from and rightly starts again.
    """
    if runfolder.checkpoint_files(run_dir):
        return True
    return any((r.get("resumed_step") or 0) > 0 or (r.get("event") == runfolder.EVENT_STOPPED and r.get("step"))
               for r in read_jsonl(run_dir / runfolder.RESTARTS))


def trim_log(run_dir: Path, step: int) -> None:
    """Drop log lines past the resume step (a killed start's), so no step is logged twice."""
    path = run_dir / runfolder.LOG
    rows = read_jsonl(path)
    keep = [r for r in rows if (r.get("step") or 0) <= step]
    if len(keep) < len(rows):
        with atomic_write(path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)


def tensorboard_writer(run_dir: Path, rank: int, step: int):
    """TensorBoard scalars; events past `step` (from a start that was killed) are purged."""
    if rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log(f"TensorBoard logging off ({e})")
        return None
    refuse_planted_links(run_dir)  # events/ planted since the start was checked
    return SummaryWriter(str(run_dir / runfolder.EVENTS_DIR), purge_step=step + 1)


def record_start(run_dir: Path, resumed_from, step: int) -> dict:
    """The start event, with why the previous start ended as far as the folder tells."""
    ends = {runfolder.EVENT_STOPPED: None, runfolder.EVENT_FINISHED: "finished", runfolder.EVENT_DIVERGED: "diverged"}
    previous = [r for r in read_jsonl(run_dir / runfolder.RESTARTS)
                if r.get("event") in ends or r.get("event") == runfolder.EVENT_START]
    last_stop = previous[-1] if previous else None
    reason = None
    if last_stop is not None:
        event = last_stop.get("event")
        reason = (last_stop.get("reason") or f"signal {last_stop.get('signal')}") if event == runfolder.EVENT_STOPPED \
            else ends.get(event) or \
            "killed without warning (no clean stop recorded)"
    count = os.environ.get("SLURM_RESTART_COUNT", os.environ.get(runfolder.LAUNCHER_ATTEMPT_ENV))
    return events.record(run_dir, runfolder.EVENT_START, host=socket.gethostname(),
                         job_id=os.environ.get("SLURM_JOB_ID"), restart_count=int(count) if count else 0,
                         resumed_from=resumed_from, resumed_step=step, last_stop_reason=reason, pid=os.getpid())


def print_config(cfg: TrainConfig, world_size: int) -> int:
    """What would run, without touching devices; the list (or packed manifest) is only counted if present."""
    rows = config.count_list_rows(cfg.csv_main)
    with contextlib.suppress(packed.PackError, OSError, ImportError):
        if packed.is_packed(cfg.data_path):
            rows = int(packed.read_manifest(cfg.data_path)["samples"])
    derived = config.resolve(cfg, world_size, rows)
    if rows is None:  # the JSON's null steps would otherwise pass for a plan
        print(f"m2das train: warning: no list found at {cfg.csv_main}; steps are unknown until it exists "
              f"(pass --data_path or --csv_main)", file=sys.stderr)
    elif derived["steps_per_epoch"] == 0:
        print(f"m2das train: warning: {cfg.csv_main}: {rows} files give no full step of {cfg.batch_size} x "
              f"{cfg.accum_iter} x {world_size}; lower --batch_size", file=sys.stderr)
    run_dir = cfg.output_dir or str(config.default_output_dir(cfg, world_size))
    stats_sources = [Path(run_dir) / NORM_STATS, Path(cfg.data_path) / NORM_STATS]
    norm = next((str(p) for p in stats_sources if p.exists()), None) or \
        f"computed at first start from {cfg.stats_files} random crops (seed 0), saved in the run folder"
    out = {**cfg.asdict(), **derived, "output_dir": run_dir, "norm_stats_source": norm,
           "list_found": rows is not None}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
