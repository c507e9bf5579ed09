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
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from m2das import EXIT_DIVERGED, EXIT_RESUMABLE, checkpoint, config
from m2das.data import DataListError, LMSDataset, ResumableSampler, default_workers, make_loader, read_list, validate
from m2das.fileio import append_jsonl, read_jsonl, write_json
from m2das.model import create_model
from m2das.schedule import ema_decay, learning_rate
from m2das.signals import StopRequest
from m2das.stats import NORM_STATS_FILE, compute_norm_stats, read_norm_stats, write_norm_stats

EXIT_BAD_INPUT = 2


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


def prepare_run_dir(cfg: dict, world_size: int) -> Path:
    """Fix the run folder and its config.json; refuse to continue a different configuration."""
    run_dir = Path(cfg["output_dir"]) if cfg["output_dir"] else config.default_output_dir(cfg, world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / "config.json"
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        diffs = config.config_differences(saved, cfg)
        if diffs and not cfg["force_config"]:
            raise TrainError(f"{saved_path}: this run folder was started with another configuration "
                             f"({'; '.join(diffs)}); use another --output_dir or pass --force_config")
    if not saved_path.exists() or cfg["force_config"]:
        write_json(saved_path, {**cfg, "output_dir": str(run_dir), "world_size": world_size})
    return run_dir


def load_samples(cfg: dict, run_dir: Path):
    """Read the list, pin the class vocabulary in the run folder, validate once per list version."""
    classes_path = run_dir / "classes.json"
    classes = json.loads(classes_path.read_text()) if classes_path.exists() else None
    samples = read_list(cfg["csv_main"], cfg["data_path"], classes)
    if classes is None:
        write_json(classes_path, samples.classes)
    if cfg["weighted"] and samples.weights is None:
        raise TrainError(f"{cfg['csv_main']}: --weighted needs a weight column (file_name,label,weight)")
    return samples


def validate_once(samples, cfg: dict, run_dir: Path) -> None:
    """Validation reads every file header: skip it when this exact list was already validated."""
    st = os.stat(cfg["csv_main"])
    stamp = {"csv": str(Path(cfg["csv_main"]).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "root": str(Path(cfg["data_path"]).resolve()), "rows": len(samples)}
    stamp_path = run_dir / "validated.json"
    if cfg["skip_validation"] or (stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp):
        return
    log(f"checking {len(samples)} listed files under {cfg['data_path']} ...")
    validate(samples, cfg["csv_main"], cfg["input_size"][0],
             progress=lambda n, total: log(f"  checked {n}/{total}") if total >= 20000 else None)
    write_json(stamp_path, stamp)


def resolve_norm_stats(cfg: dict, samples, run_dir: Path) -> dict:
    """Run folder first (a resumed run keeps its numbers), then the data folder, else compute once."""
    for path in (run_dir / NORM_STATS_FILE, Path(cfg["data_path"]) / NORM_STATS_FILE):
        if path.exists():
            stats = {**read_norm_stats(path), "source": str(path)}
            break
    else:
        log(f"computing normalisation statistics from {cfg['stats_files']} random crops (seed 0) ...")
        paths = [samples.root / f for f in samples.files]
        stats = {**compute_norm_stats(paths, cfg["stats_files"], cfg["input_size"][1]), "source": "computed"}
        if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0):
            raise TrainError(f"{cfg['csv_main']}: normalisation statistics came out as {stats['mean']}/"
                             f"{stats['std']}: some LMS files hold NaN/inf; rerun `m2das prepare` on them")
    if not (run_dir / NORM_STATS_FILE).exists():
        write_norm_stats(run_dir / NORM_STATS_FILE, stats)
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
    state = checkpoint.load(path) if Path(path).suffix == ".pth" else torch.load(path, map_location="cpu")
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


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


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

    def read(self) -> dict:
        loss, online, offline = (self.sums / max(self.batches, 1)).tolist()
        elapsed = time.perf_counter() - self.t0
        return {"loss": loss, "loss_online": online, "loss_offline": offline,
                "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0}


def train(cfg: dict, env: dict) -> int:
    device = pick_device(cfg, env["local_rank"])
    flag_group = init_distributed(env, device)
    stop = StopRequest().install()
    try:
        return _train(cfg, env, device, flag_group, stop)
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, env, device, flag_group, stop) -> int:
    rank, world = env["rank"], env["world_size"]
    run_dir = Path(on_rank0(lambda: str(prepare_run_dir(cfg, world)), rank))
    samples = on_rank0(lambda: load_samples(cfg, run_dir), rank)
    on_rank0(lambda: validate_once(samples, cfg, run_dir), rank)
    stats = on_rank0(lambda: resolve_norm_stats(cfg, samples, run_dir), rank)
    derived = config.resolve(cfg, world, len(samples))
    batches_per_epoch = derived["steps_per_epoch"] * cfg["accum_iter"]  # whole optimizer steps only
    if batches_per_epoch == 0:
        raise TrainError(f"{cfg['csv_main']}: {len(samples)} files give no full step of "
                         f"{cfg['batch_size']} x {cfg['accum_iter']} x {world}; lower --batch_size")
    total_batches = batches_per_epoch * cfg["epochs"]
    if rank == 0:  # the derived numbers, for `m2das status` and humans
        saved = json.loads((run_dir / "config.json").read_text())
        write_json(run_dir / "config.json", {**saved, **derived, "global_batch": derived["effective_batch_size"]})
    log(f"run folder {run_dir}; {len(samples)} files, {len(samples.classes)} classes, "
        f"{derived['steps_per_epoch']} steps/epoch, effective batch {derived['effective_batch_size']}, "
        f"lr {derived['abs_lr']:.3g}, norm stats {stats['mean']:.4f}/{stats['std']:.4f} ({stats['source']})", rank)

    # Model and optimizer (same init on every rank; DDP also broadcasts it).
    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["model"], input_size=cfg["input_size"], patch_size=cfg["patch_size"],
                         num_classes=len(samples.classes), mask_ratio=cfg["mask_ratio"], loss_off=cfg["loss_off"])
    model.norm_stats.copy_(torch.tensor([stats["mean"], stats["std"]]))
    model.to(device)
    optimizer = build_optimizer(model, derived["abs_lr"], cfg["weight_decay"], device)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg["bf16"] else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and not cfg["bf16"])

    # Resume or start.
    state, resumed_from = find_resume_state(cfg, run_dir, rank)
    epoch, batch_in_epoch, step = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, batch_in_epoch, step = state["epoch"], state.get("batch_in_epoch", 0), state["step"]
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
        log(f"resumed from {resumed_from} at epoch {epoch}, batch {batch_in_epoch}, step {step}", rank)
    elif cfg["init_from"]:
        init_from(model, cfg["init_from"])
        model.norm_stats.copy_(torch.tensor([stats["mean"], stats["std"]]))
    if rank == 0:
        append_jsonl(run_dir / "restarts.jsonl", start_record(run_dir, resumed_from, step))
    del state

    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        gradient_as_bucket_view=True)
    sampler = ResumableSampler(len(samples), cfg["batch_size"], rank, world, cfg["seed"],
                               samples.weights if cfg["weighted"] else None)
    loader = make_loader(LMSDataset(samples, cfg["input_size"][1], cfg["seed"]), sampler, cfg["batch_size"],
                         default_workers(cfg["num_workers"], world), pin_memory=device.type == "cuda")
    writer = tensorboard_writer(run_dir, rank)
    saver = checkpoint.BackgroundWriter()
    metrics = Metrics(device)
    last_save = time.monotonic()

    def full_state(epoch_, batch_):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch_, "batch_in_epoch": batch_, "step": step,
                "args": {**cfg, "output_dir": str(run_dir)}, "norm_stats": stats, "rng": rng_state(device),
                "classes": samples.classes}

    def losses_finite() -> bool:
        return bool(torch.isfinite(metrics.sums).all())

    def diverged() -> int:
        msg = (f"loss became non-finite before step {step} (epoch {epoch}); stopping. The last good "
               f"checkpoint in {run_dir} is the resume point: lower --blr or use --bf16, then rerun")
        log(msg, rank)
        if rank == 0:
            append_jsonl(run_dir / "restarts.jsonl", {"time": time.time(), "event": "diverged", "step": step})
        return EXIT_DIVERGED

    log(f"training epochs {epoch}..{cfg['epochs'] - 1} on {device} x {world}", rank)
    while epoch < cfg["epochs"]:
        sampler.set_position(epoch, batch_in_epoch)
        model.train()
        for lms, labels in loader:
            i = batch_in_epoch
            s = epoch * batches_per_epoch + i  # global batch index
            if i >= batches_per_epoch:
                break
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
            batch_in_epoch += 1
            if not last_micro:
                continue

            tau = ema_decay(s, total_batches, cfg["ema_decay_init"], cfg["ema_decay"])
            optimizer_step(model, optimizer, scaler, cfg["clip_grad"], tau)
            step += 1

            # Step boundary: the only place the loop stops or saves.
            at_epoch_end = batch_in_epoch == batches_per_epoch
            pos = (epoch + 1, 0) if at_epoch_end else (epoch, batch_in_epoch)
            stop_now, save_due = agree(stop.requested,
                                       time.monotonic() - last_save >= cfg["ckpt_interval_min"] * 60,
                                       flag_group, rank)
            if step % cfg["log_every"] == 0 or stop_now:
                if not losses_finite():
                    return diverged()
                if step % cfg["log_every"] == 0:
                    report(metrics, run_dir, writer, rank, epoch, step, derived["steps_per_epoch"] * cfg["epochs"],
                           lr, tau)
            if stop_now:
                if not losses_finite():
                    return diverged()
                saver.wait()
                if rank == 0:
                    checkpoint.save(full_state(*pos), run_dir / checkpoint.LAST)
                    append_jsonl(run_dir / "restarts.jsonl",
                                 {"time": time.time(), "event": "stopped", "signal": stop.name, "step": step})
                if dist.is_initialized():
                    dist.barrier(group=flag_group)
                log(f"{stop.name or 'stop'} received: saved {run_dir / checkpoint.LAST} at step {step} "
                    f"(epoch {pos[0]}, batch {pos[1]}); rerun the same command to resume (exit {EXIT_RESUMABLE})",
                    rank)
                stop.hand_over()
                return EXIT_RESUMABLE
            if save_due:
                if not losses_finite():
                    return diverged()
                if rank == 0:
                    saver.submit(checkpoint.to_cpu(full_state(*pos)), run_dir / checkpoint.LAST)
                last_save = time.monotonic()

        # End of epoch.
        epoch, batch_in_epoch = epoch + 1, 0
        if epoch % cfg["save_freq"] == 0 or epoch == cfg["epochs"]:
            if not losses_finite():
                return diverged()
            if rank == 0:
                saver.wait()
                path = run_dir / checkpoint.epoch_checkpoint_name(epoch)
                checkpoint.save(full_state(epoch, 0), path)
                log(f"saved {path}", rank)
            last_save = time.monotonic()

    saver.wait()
    if rank == 0:
        append_jsonl(run_dir / "restarts.jsonl", {"time": time.time(), "event": "finished", "step": step})
        if writer is not None:
            writer.close()
    log(f"finished {cfg['epochs']} epochs ({step} steps); weights: "
        f"{run_dir / checkpoint.epoch_checkpoint_name(cfg['epochs'])}", rank)
    return 0


def agree(stop_requested: bool, save_due: bool, group, rank: int):
    """Every rank stops (or saves) at the same step: any rank's stop, rank 0's clock for saves."""
    if not dist.is_initialized():
        return stop_requested, save_due
    flags = torch.tensor([float(stop_requested), float(save_due and rank == 0)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags[0]), bool(flags[1])


def report(metrics: Metrics, run_dir: Path, writer, rank: int, epoch: int, step: int, total_steps: int,
           lr: float, tau: float) -> None:
    m = metrics.read()
    metrics.reset()
    if rank != 0:
        return
    row = {"time": time.time(), "epoch": epoch, "step": step, "total_steps": total_steps, "lr": lr, "tau": tau,
           **m}
    append_jsonl(run_dir / "log.jsonl", row)
    log(f"epoch {epoch} step {step}/{total_steps} loss {m['loss']:.4f} (online {m['loss_online']:.4f}, "
        f"offline {m['loss_offline']:.4f}) lr {lr:.3e} tau {tau:.6f} {m['samples_per_s']:.1f} samples/s")
    if writer is not None:
        for k in ("loss", "loss_online", "loss_offline", "lr", "tau", "samples_per_s"):
            writer.add_scalar(f"train/{k}", row[k], step)


def tensorboard_writer(run_dir: Path, rank: int):
    if rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log(f"TensorBoard logging off ({e})")
        return None
    return SummaryWriter(str(run_dir / "events"))


def find_resume_state(cfg: dict, run_dir: Path, rank: int):
    mode = cfg["resume"]
    if mode == "none":
        return None, None
    if mode == "auto":
        state, path = checkpoint.load_latest(run_dir)
        return state, (str(path) if path else None)
    try:
        return checkpoint.load(mode), mode
    except Exception as e:
        raise TrainError(f"--resume {mode}: cannot load ({type(e).__name__}: {e})") from e


def start_record(run_dir: Path, resumed_from, step: int) -> dict:
    previous = [r for r in read_jsonl(run_dir / "restarts.jsonl") if r.get("event") in ("stopped", "start")]
    last_stop = previous[-1] if previous else None
    reason = None
    if last_stop is not None:
        reason = f"signal {last_stop.get('signal')}" if last_stop.get("event") == "stopped" else \
            "killed without warning (no clean stop recorded)"
    count = os.environ.get("SLURM_RESTART_COUNT", os.environ.get("M2DAS_LAUNCHER_ATTEMPT"))
    return {"time": time.time(), "event": "start", "host": socket.gethostname(),
            "job_id": os.environ.get("SLURM_JOB_ID"), "restart_count": int(count) if count else 0,
            "resumed_from": resumed_from, "resumed_step": step, "last_stop_reason": reason,
            "pid": os.getpid()}


def print_config(cfg: dict, env: dict) -> int:
    """What would run, without touching devices; the list is only counted if present."""
    rows = config.count_list_rows(cfg["csv_main"])
    derived = config.resolve(cfg, env["world_size"], rows)
    run_dir = cfg["output_dir"] or str(config.default_output_dir(cfg, env["world_size"]))
    stats_sources = [Path(run_dir) / NORM_STATS_FILE, Path(cfg["data_path"]) / NORM_STATS_FILE]
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
        print(f"m2das train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
