"""`m2das train`: the M2D-AS pre-training loop.

The step, in order: set LR (at accumulation boundaries) -> forward under
autocast -> backward -> (every accum_iter batches) unscale, clip, optimizer
step, EMA update of the target -> check for a stop request -> log / save.

Everything a resumed run needs is either in the checkpoint (weights, optimizer,
scaler, position) or a pure function of (seed, epoch, position) (data order,
crops, masks, LR, EMA tau), so resuming is exact.
"""

import contextlib
import datetime
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from m2das import config, remote, runfolder
from m2das.data import packed
from m2das.checkpoint import Checkpointer, CheckpointError, Progress, RNGState, load_weight_file
from m2das.data.dataset import (DataListError, ResumableSampler, default_workers, make_dataset, make_loader, read_samples,
                        validate, validate_packed)
from m2das.fileio import append_jsonl, atomic_write, is_url, read_jsonl, write_json
from m2das.model import create_model
from m2das.monitor import Monitor
from m2das.monitor import record as record_quality
from m2das.remote import RemoteError, RemoteRunFolder
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RESUMABLE, RunLock, RunLocked
from m2das.schedule import ema_decay, learning_rate
from m2das.signals import StopRequest
from m2das.data.recipe import record_recipe
from m2das.data.stats import compute_norm_stats, read_norm_stats, write_norm_stats
from m2das.datafolder import NORM_STATS


class TrainError(Exception):
    """A problem the user must fix before training can start; printed as one line."""


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"[m2das {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- set-up ---------------------------------------------------------------------

def pick_device(cfg: dict, local_rank: int) -> torch.device:
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    # CPU ranks share the cores they were given instead of each taking all of them.
    if "OMP_NUM_THREADS" not in os.environ:
        world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or cores // world  # SLURM: this task's share
        torch.set_num_threads(max(1, min(share, cores)))
    return torch.device("cpu")


def init_distributed(env: dict, device: torch.device):
    """Default group for gradients; a gloo group for the per-step stop flag (no GPU sync)."""
    if env["world_size"] == 1:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env["rank"], world_size=env["world_size"],
                            timeout=datetime.timedelta(minutes=30))
    return dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


def broadcast(obj, rank: int):
    """rank 0's value of `obj` on every rank (identity when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn, rank: int):
    """Run fn on rank 0 and give every rank its result, or its error as a TrainError."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (TrainError, DataListError, ValueError, OSError) as e:
            error = str(e)
    result, error = broadcast((result, error), rank)
    if error:
        raise TrainError(error)
    return result


def read_json_file(path: Path, role: str):
    """A small JSON file of the run folder, or a TrainError naming it and what to do."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: cannot be read ({type(e).__name__}: {e}); {role}") from None


def take_run_dir(cfg: dict, world_size: int):
    """(local folder, lock, mirror): a local run folder is locked in place; a URL (object storage)
    is locked there and staged in a local folder that the mirror uploads."""
    try:
        if is_url(cfg["output_dir"]):
            mirror = RemoteRunFolder(cfg["output_dir"], remote.staging_for(cfg["output_dir"])).acquire()
            try:
                fetched = mirror.hydrate()
            except BaseException:
                mirror.release()
                raise
            log(f"run folder {mirror.url}, staged in {mirror.staging}; fetched {', '.join(fetched) or 'nothing'}")
            return mirror.staging, mirror, mirror
        run_dir = Path(cfg["output_dir"]) if cfg["output_dir"] else config.default_output_dir(cfg, world_size)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, RunLock(run_dir).acquire(), None
    except (RunLocked, RemoteError) as e:
        raise TrainError(str(e)) from None


def open_run_dir(cfg: dict, world_size: int):
    """Fix the run folder, take its lock, check config.json; returns (run_dir, lock, mirror).

    A restart may change only resume-safe flags (config.RESUME_SAFE_KEYS) and
    only when the folder is named with --output_dir; anything else needs
    --force_config.
    """
    run_dir, lock, mirror = take_run_dir(cfg, world_size)
    try:
        if lock.took_over:
            log(f"took over the run folder from a dead holder ({lock.took_over})")
        saved_path = run_dir / runfolder.CONFIG
        record = {**cfg, "output_dir": cfg["output_dir"] if mirror else str(run_dir), "world_size": world_size}
        if saved_path.exists():
            saved = read_json_file(saved_path, "restore it, or pass --force_config to rewrite it from these flags")
            hard, safe = config.config_differences(saved, cfg)
            if hard and not cfg["force_config"]:
                raise TrainError(f"{saved_path}: this run folder was started with another configuration "
                                 f"({'; '.join(hard)}); use another --output_dir or pass --force_config")
            if safe and not cfg["output_dir"] and not cfg["force_config"]:
                raise TrainError(f"{saved_path}: {'; '.join(safe)}: name the folder with --output_dir {run_dir} "
                                 f"to change these on resume")
            if hard or safe:
                log(f"configuration changed on resume: {'; '.join(hard + safe)}")
                append_jsonl(run_dir / runfolder.RESTARTS, {"time": time.time(),
                             "event": runfolder.EVENT_CONFIG_CHANGED, "changes": hard + safe})
                write_json(saved_path, {**saved, **record})
        else:
            write_json(saved_path, record)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock, mirror


def load_samples(cfg: dict, run_dir: Path):
    """Read the list, pin the class vocabulary in the run folder, validate once per list version."""
    classes_path = run_dir / runfolder.CLASSES
    classes = read_json_file(classes_path, "it pins the label vocabulary: restore it, or delete it to take the "
                             "list's classes again") if classes_path.exists() else None
    samples = read_samples(cfg["data_path"], cfg["csv_main"], classes)  # a CSV list or a packed folder's index
    if classes is None:
        write_json(classes_path, samples.classes)
    if cfg["weighted"] and samples.weights is None:
        raise TrainError(f"{cfg['csv_main']}: --weighted needs a weight column (file_name,label,weight)")
    return samples


def validate_once(samples, cfg: dict, run_dir: Path) -> None:
    """Validation reads every file header: skip it when this exact list was already validated.

    A packed folder is stamped by its index and shard fingerprints (m2das.data.dataset.validate_packed).
    """
    if cfg["skip_validation"]:
        return
    stamp_path = run_dir / runfolder.VALIDATED
    if hasattr(samples, "manifest"):
        previous = None
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(stamp_path.read_text())
        write_json(stamp_path, validate_packed(samples, previous, log, cfg["input_size"][0]))
        return
    st = os.stat(cfg["csv_main"])
    stamp = {"csv": str(Path(cfg["csv_main"]).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "root": str(Path(cfg["data_path"]).resolve()), "rows": len(samples), "weighted": cfg["weighted"]}
    with contextlib.suppress(OSError, ValueError):  # only a cache: unreadable means "check again"
        if json.loads(stamp_path.read_text()) == stamp:
            return
    log(f"checking {len(samples)} listed files under {cfg['data_path']} ...")
    validate(samples, cfg["csv_main"], cfg["input_size"][0], weighted=cfg["weighted"],
             progress=lambda n, total: log(f"  checked {n}/{total}") if total >= 20000 else None)
    write_json(stamp_path, stamp)


def resolve_norm_stats(cfg: dict, samples, run_dir: Path) -> dict:
    """Run folder first (a resumed run keeps its numbers), then the data (a packed folder's manifest,
    else the data folder's file), else compute once; the run folder keeps what was used."""
    def read(path: Path) -> dict:
        try:
            return {**read_norm_stats(path), "source": str(path)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{path}: cannot be read ({type(e).__name__}: {e}); restore it, or delete it "
                             f"to take the statistics again") from None

    own, data_file = run_dir / NORM_STATS, Path(cfg["data_path"]) / NORM_STATS
    if own.exists():
        return read(own)
    if getattr(samples, "norm_stats", None):
        stats = {**samples.norm_stats, "source": f"{cfg['data_path']}/{packed.MANIFEST}"}
    elif data_file.exists():
        stats = read(data_file)
    else:
        log(f"computing normalisation statistics from {cfg['stats_files']} random crops (seed 0) ...")
        paths = [samples.root / f for f in samples.files]
        stats = {**compute_norm_stats(paths, cfg["stats_files"], cfg["input_size"][1]), "source": "computed"}
        if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0):
            raise TrainError(f"{cfg['csv_main']}: normalisation statistics came out as {stats['mean']}/"
                             f"{stats['std']}: some LMS files hold NaN/inf; rerun `m2das prepare` on them")
    write_norm_stats(own, stats)
    return stats


def param_groups(model, weight_decay: float):
    """Weight decay on matrices only: 1-D tensors and biases get none; frozen ones are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def optimizer_step(model, optimizer, scaler, clip_grad: float, tau: float) -> None:
    """Unscale, clip, step, then let the target follow the online encoder (no host sync with bf16/fp32)."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    model.update_target(tau)


def init_from(model, path) -> None:
    """Copy matching weights from a published checkpoint; a fresh schedule starts from them."""
    try:
        state = load_weight_file(path)
    except CheckpointError as e:
        raise TrainError(f"--init_from {e}") from None
    source = state.get("model", state)
    own = model.state_dict()
    matched = {k: v for k, v in source.items()
               if k in own and k != "norm_stats" and tuple(v.shape) == tuple(own[k].shape)}
    if not any(k.startswith("target_blocks.") for k in matched):
        # Encoder-only weights: start the target as a copy of the online encoder.
        for k, v in list(matched.items()):
            if k.startswith("blocks.") or k.startswith("norm."):
                matched["target_" + k] = v
    skipped = sorted(set(own) - set(matched) - {"norm_stats"})
    model.load_state_dict({**own, **matched})
    log(f"--init_from {path}: loaded {len(matched)} tensors, kept our init for {len(skipped)}"
        + (f" (e.g. {', '.join(skipped[:4])})" if skipped else ""))


def mask_generator(device, seed: int, rank: int, batch_index: int) -> torch.Generator:
    """Masks depend only on (seed, rank, global batch index): nothing to carry across restarts."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(1, np.uint64)[0]))
    return g


# -- the loop ---------------------------------------------------------------------

class Metrics:
    """Sums on the device between log lines: no host sync inside the step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(3, device=self.device)
        self.batches = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict, batch: int):
        self.sums += torch.stack([out["loss"].detach(), out["loss_online"].detach(),
                                  out["loss_offline"].detach()]).float()
        self.batches += 1
        self.samples += batch

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sums).all())

    def read(self) -> dict:
        loss, online, offline = (self.sums / max(self.batches, 1)).tolist()
        elapsed = time.perf_counter() - self.t0
        return {"loss": loss, "loss_online": online, "loss_offline": offline,
                "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0}


def train(cfg: dict, env: dict) -> int:
    device = pick_device(cfg, env["local_rank"])
    flag_group = init_distributed(env, device)
    stop = StopRequest().install()
    lock = mirror = None
    try:
        rank, world = env["rank"], env["world_size"]

        def open_and_keep_lock():
            nonlocal lock, mirror
            run_dir, lock, mirror = open_run_dir(cfg, world)
            return str(run_dir)

        run_dir = Path(on_rank0(open_and_keep_lock, rank))
        if is_url(cfg["output_dir"]) and rank != 0 and env["local_rank"] == 0 and \
                not (run_dir / runfolder.CONFIG).exists():  # another node: its own read-only copy
            RemoteRunFolder(cfg["output_dir"], run_dir).hydrate()
        if dist.is_initialized():
            dist.barrier(group=flag_group)
        return _train(cfg, env, device, flag_group, stop, run_dir, mirror)
    finally:
        stop.restore()
        if mirror is not None:
            try:
                mirror.publish_small_files()
            except OSError as e:
                log(f"warning: could not upload the logs to {mirror.url}: {e}")
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def load_data(cfg: dict, run_dir: Path, rank: int, world: int):
    """The list, checked once per version, its statistics, and the numbers derived from its size."""
    samples = on_rank0(lambda: load_samples(cfg, run_dir), rank)
    on_rank0(lambda: validate_once(samples, cfg, run_dir), rank)
    mixed = on_rank0(lambda: record_recipe(run_dir, cfg["data_path"]), rank)  # pins the LMS recipe on first start
    if mixed:
        log(f"warning: {mixed}", rank)
    stats = on_rank0(lambda: resolve_norm_stats(cfg, samples, run_dir), rank)
    derived = config.resolve(cfg, world, len(samples))
    if derived["steps_per_epoch"] == 0:
        raise TrainError(f"{cfg['csv_main']}: {len(samples)} files give no full step of "
                         f"{cfg['batch_size']} x {cfg['accum_iter']} x {world}; lower --batch_size")
    if rank == 0:  # the derived numbers, for `m2das status` and humans
        saved = read_json_file(run_dir / runfolder.CONFIG, "restore it")
        write_json(run_dir / runfolder.CONFIG, {**saved, **derived, "global_batch": derived["effective_batch_size"]})
    log(f"run folder {run_dir}; {len(samples)} files, {len(samples.classes)} classes, "
        f"{derived['steps_per_epoch']} steps/epoch, effective batch {derived['effective_batch_size']}, "
        f"lr {derived['abs_lr']:.3g}, norm stats {stats['mean']:.4f}/{stats['std']:.4f} ({stats['source']})", rank)
    return samples, stats, derived


def build_model(cfg: dict, num_classes: int, stats: dict, lr: float, device):
    """Model, optimizer and loss scaler; the same init on every rank (DDP also broadcasts it)."""
    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["model"], input_size=cfg["input_size"], patch_size=cfg["patch_size"],
                         num_classes=num_classes, mask_ratio=cfg["mask_ratio"], loss_off=cfg["loss_off"])
    model.norm_stats.copy_(torch.tensor([stats["mean"], stats["std"]]))
    model.to(device)
    optimizer = build_optimizer(model, lr, cfg["weight_decay"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and not cfg["bf16"])
    return model, optimizer, scaler


def resume_or_start(ckpt: Checkpointer, cfg: dict, model, stats: dict, rank: int) -> None:
    """Clean the folder, load the state to continue from (or --init_from weights), record the start."""
    run_dir, progress = ckpt.run_dir, ckpt.progress
    if rank == 0:
        removed = ckpt.prepare_folder()
        if removed:
            log(f"removed {len(removed)} temporaries of killed writes: {', '.join(removed)}")
    if dist.is_initialized():
        dist.barrier(group=ckpt.flag_group)
    try:
        resumed_from = ckpt.resume(cfg["resume"], shows_progress(run_dir))
        if resumed_from is not None:
            ckpt.save_missed_epoch_checkpoint()
    except CheckpointError as e:
        raise TrainError(f"--resume {e}" if cfg["resume"] not in ("auto", "none") else str(e)) from None
    if resumed_from is not None:
        where = "all epochs done" if progress.epoch >= cfg["epochs"] else \
            f"epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}"
        log(f"resumed from {resumed_from} at step {progress.step} ({where})", rank)
    elif cfg["init_from"]:
        init_from(model, cfg["init_from"])
        model.norm_stats.copy_(torch.tensor([stats["mean"], stats["std"]]))
    if rank == 0:
        ckpt.warn_if_low_space()
        trim_log(run_dir, progress.step)
        append_jsonl(run_dir / runfolder.RESTARTS, start_record(run_dir, resumed_from, progress.step))


def _train(cfg, env, device, flag_group, stop, run_dir: Path, mirror) -> int:
    rank, world = env["rank"], env["world_size"]
    samples, stats, derived = load_data(cfg, run_dir, rank, world)
    batches_per_epoch = derived["steps_per_epoch"] * cfg["accum_iter"]  # whole optimizer steps only
    total_batches, total_steps = batches_per_epoch * cfg["epochs"], derived["total_steps"]
    model, optimizer, scaler = build_model(cfg, len(samples.classes), stats, derived["abs_lr"], device)
    use_amp, amp_dtype = device.type == "cuda", (torch.bfloat16 if cfg["bf16"] else torch.float16)

    # The checkpointer owns what is saved and loaded, and when.
    progress = Progress()
    ckpt = Checkpointer(run_dir, {"model": model, "optimizer": optimizer, "scaler": scaler,
                                  "rng": RNGState(device), "progress": progress},
                        {"args": {**cfg, "output_dir": cfg["output_dir"] if mirror else str(run_dir)},
                         "norm_stats": stats, "classes": samples.classes},
                        rank=rank, epochs=cfg["epochs"], save_freq=cfg["save_freq"],
                        interval_s=cfg["ckpt_interval_min"] * 60, log=lambda m: log(m, rank), flag_group=flag_group,
                        publish=mirror.publish_checkpoint if mirror else None)
    resume_or_start(ckpt, cfg, model, stats, rank)

    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        gradient_as_bucket_view=True)
    sampler = ResumableSampler(len(samples), cfg["batch_size"], rank, world, cfg["seed"],
                               samples.weights if cfg["weighted"] else None)
    loader = make_loader(make_dataset(samples, cfg["input_size"][1], cfg["seed"]), sampler, cfg["batch_size"],
                         default_workers(cfg["num_workers"], world), pin_memory=device.type == "cuda")
    writer = tensorboard_writer(run_dir, rank, progress.step)
    metrics = Metrics(device)
    monitor = Monitor(cfg, samples.classes, device, rank, world)  # quality checks: no training randomness
    monitor_clock = time.monotonic()

    def end(event: str, message: str, code: int) -> int:
        log(message, rank)
        if rank == 0:
            append_jsonl(run_dir / runfolder.RESTARTS, {"time": time.time(), "event": event, "step": progress.step,
                                                        **({"signal": stop.name} if stop.name else {})})
        return code

    if progress.epoch < cfg["epochs"]:
        log(f"training epochs {progress.epoch + 1}..{cfg['epochs']} on {device} x {world}", rank)
    stop_self_at = int(os.environ.get("M2DAS_TEST_SIGTERM_AT_STEP", 0))  # fault injection for tests
    while progress.epoch < cfg["epochs"]:
        epoch = progress.epoch
        sampler.set_position(epoch, progress.batch_in_epoch)
        model.train()
        for lms, labels in loader:
            i = progress.batch_in_epoch
            s = epoch * batches_per_epoch + i  # global batch index
            if i % cfg["accum_iter"] == 0:
                lr = learning_rate(epoch + i / batches_per_epoch, derived["abs_lr"], cfg["min_lr"],
                                   cfg["warmup_epochs"], cfg["epochs"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
            lms = lms.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            last_micro = (i + 1) % cfg["accum_iter"] == 0
            sync = contextlib.nullcontext() if last_micro or world == 1 else ddp.no_sync()
            with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = ddp(lms, labels, mask_generator(device, cfg["seed"], rank, s))
                scaler.scale(out["loss"] / cfg["accum_iter"]).backward()
            metrics.add(out, lms.shape[0])
            progress.batch_in_epoch += 1
            if not last_micro:
                continue

            if progress.step + 1 == stop_self_at:  # a real signal, delivered inside that step
                os.kill(os.getpid(), signal.SIGTERM)
            tau = ema_decay(s, total_batches, cfg["ema_decay_init"], cfg["ema_decay"])
            optimizer_step(model, optimizer, scaler, cfg["clip_grad"], tau)
            progress.step += 1
            epoch_ended = progress.batch_in_epoch == batches_per_epoch
            if epoch_ended:
                progress.epoch, progress.batch_in_epoch = epoch + 1, 0

            # Step boundary: the only place the loop logs, stops or saves.
            if progress.step % cfg["log_every"] == 0 or stop.requested:
                if not metrics.finite():
                    return end(runfolder.EVENT_DIVERGED, diverged_message(progress, run_dir), EXIT_DIVERGED)
                if progress.step % cfg["log_every"] == 0:
                    report(metrics, run_dir, writer, rank, epoch, progress.step, total_steps, lr, tau)
            if epoch_ended and monitor.due(progress.epoch) and not stop.requested:
                quality = monitor.run(ddp, progress.epoch)  # every rank encodes its share
                if rank == 0:
                    row = record_quality(quality, run_dir, writer, progress.epoch, progress.step,
                                         time.monotonic() - monitor_clock)
                    log(f"quality after epoch {progress.epoch}: mAP {row['monitor_map']:.4f}, RankMe "
                        f"{row['monitor_rankme']:.1f}, kNN {row['monitor_knn_acc']:.3f} "
                        f"({row['monitor_seconds']:.1f} s, {100 * row['monitor_share']:.2f}% of training time)")
                monitor_clock = time.monotonic()
            outcome = ckpt.step_boundary(stop.requested, epoch_ended)
            if outcome is not None:
                kind, detail = outcome
                if kind == "diverged":
                    return end(runfolder.EVENT_DIVERGED, detail, EXIT_DIVERGED)
                if kind == "save_failed":
                    return end(runfolder.EVENT_SAVE_FAILED, f"stopping: {detail}; the previous checkpoint is "
                               f"intact, rerun the same command to resume (exit {EXIT_RESUMABLE})", EXIT_RESUMABLE)
                code = end(runfolder.EVENT_STOPPED, f"{stop.name or 'stop'} received: saved {detail} at step "
                           f"{progress.step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}); rerun "
                           f"the same command to resume (exit {EXIT_RESUMABLE})", EXIT_RESUMABLE)
                stop.hand_over()
                return code
            if epoch_ended:
                break
        if progress.epoch == epoch:
            raise RuntimeError(f"the data loader ended before epoch {epoch + 1} was complete")

    ckpt.finish()
    final = runfolder.final_weights(run_dir, cfg["epochs"])
    if rank == 0:
        if writer is not None:
            writer.close()
        if final.exists():  # "finished" only once the final weights are on disk
            append_jsonl(run_dir / runfolder.RESTARTS,
                         {"time": time.time(), "event": runfolder.EVENT_FINISHED, "step": progress.step})
    if not final.exists():
        raise TrainError(f"{final}: the final weights are missing; rerun the same command to write them")
    log(f"finished {cfg['epochs']} epochs ({progress.step} steps); weights: {final}", rank)
    return 0


def diverged_message(progress: Progress, run_dir: Path) -> str:
    return (f"loss became non-finite before step {progress.step} (epoch {progress.epoch + 1}); stopping without "
            f"saving. The newest checkpoint in {run_dir} is the resume point: lower --blr (or --lr) or use "
            f"--bf16 with --output_dir {run_dir}; those flags may change on resume")


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


def report(metrics: Metrics, run_dir: Path, writer, rank: int, epoch: int, step: int, total_steps: int,
           lr: float, tau: float) -> None:
    m = metrics.read()
    metrics.reset()
    if rank != 0:
        return
    row = {"time": time.time(), "epoch": epoch, "step": step, "total_steps": total_steps, "lr": lr, "tau": tau,
           **m}
    append_jsonl(run_dir / runfolder.LOG, row)
    log(f"epoch {epoch + 1} step {step}/{total_steps} loss {m['loss']:.4f} (online {m['loss_online']:.4f}, "
        f"offline {m['loss_offline']:.4f}) lr {lr:.3e} tau {tau:.6f} {m['samples_per_s']:.1f} samples/s")
    if writer is not None:
        for k in ("loss", "loss_online", "loss_offline", "lr", "tau", "samples_per_s"):
            writer.add_scalar(f"train/{k}", row[k], step)


def tensorboard_writer(run_dir: Path, rank: int, step: int):
    """TensorBoard scalars; events past `step` (from a start that was killed) are purged."""
    if rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log(f"TensorBoard logging off ({e})")
        return None
    return SummaryWriter(str(run_dir / runfolder.EVENTS_DIR), purge_step=step + 1)


def start_record(run_dir: Path, resumed_from, step: int) -> dict:
    previous = [r for r in read_jsonl(run_dir / runfolder.RESTARTS)
                if r.get("event") in (runfolder.EVENT_STOPPED, runfolder.EVENT_START)]
    last_stop = previous[-1] if previous else None
    reason = None
    if last_stop is not None:
        reason = f"signal {last_stop.get('signal')}" if last_stop.get("event") == runfolder.EVENT_STOPPED else \
            "killed without warning (no clean stop recorded)"
    count = os.environ.get("SLURM_RESTART_COUNT", os.environ.get("M2DAS_LAUNCHER_ATTEMPT"))
    return {"time": time.time(), "event": runfolder.EVENT_START, "host": socket.gethostname(),
            "job_id": os.environ.get("SLURM_JOB_ID"), "restart_count": int(count) if count else 0,
            "resumed_from": resumed_from, "resumed_step": step, "last_stop_reason": reason,
            "pid": os.getpid()}


def print_config(cfg: dict, env: dict) -> int:
    """What would run, without touching devices; the list (or packed manifest) is only counted if present."""
    rows = config.count_list_rows(cfg["csv_main"])
    with contextlib.suppress(packed.PackError, OSError, ImportError):
        if packed.is_packed(cfg["data_path"]):
            rows = int(packed.read_manifest(cfg["data_path"])["samples"])
    derived = config.resolve(cfg, env["world_size"], rows)
    run_dir = cfg["output_dir"] or str(config.default_output_dir(cfg, env["world_size"]))
    stats_sources = [Path(run_dir) / NORM_STATS, Path(cfg["data_path"]) / NORM_STATS]
    norm = next((str(p) for p in stats_sources if p.exists()), None) or \
        f"computed at first start from {cfg['stats_files']} random crops (seed 0), saved in the run folder"
    out = {**cfg, **derived, "output_dir": run_dir, "norm_stats_source": norm,
           "list_found": rows is not None}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def main(argv=None) -> int:
    cfg = config.parse_args(sys.argv[1:] if argv is None else argv)
    env = config.dist_env()
    if cfg["print_config"]:
        return print_config(cfg, env)
    try:
        return train(cfg, env)
    except (TrainError, DataListError) as e:
        print(f"m2das train: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def one_line(e: Exception) -> str:
    """The message itself, also when a DataLoader worker wrapped it in its traceback text."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return lines[-1].split(": ", 1)[-1] if lines[-1].startswith(type(e).__module__) else lines[-1]
    return " ".join(lines)
