"""`m2das train`: the M2D-AS pre-training loop.

`train_step` is one batch: set LR (at accumulation boundaries) -> forward
under autocast -> backward -> (every accum_iter batches) unscale, clip,
optimizer step, EMA update of the target. `run_loop` calls it and, after each
optimizer step, `step_boundary`: check for divergence, log, run the quality
monitor, and let the checkpointer save or end the run.

Everything a resumed run needs is either in the checkpoint (weights, optimizer,
scaler, position) or a pure function of (seed, epoch, position) (data order,
crops, masks, LR, EMA tau), so resuming is exact. The run folder's set-up
before the first step is m2das.runsetup's.
"""

import contextlib
import datetime
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from m2das import config, events, loggers, machine, runfolder, storeerrors
from m2das.checkpoint import Checkpointer, Outcome, Progress, RNGState, resume_hint
from m2das.ckptfile import CheckpointError, describe_weights, load_weight_file
from m2das.config import TrainConfig
from m2das.data.dataset import DataListError, ResumableSampler, make_dataset, make_loader
from m2das.events import log
from m2das.fileio import append_jsonl, is_url
from m2das.model import create_model
from m2das.monitor import Monitor
from m2das.monitor import record as record_quality
from m2das.remote import RemoteRunFolder
from m2das.runfolder import ENCODER_PREFIXES, EXIT_BAD_INPUT, EXIT_RESUMABLE
from m2das.runsetup import (TrainError, discard_unstarted, load_data, on_rank0, open_run_dir, print_config,
                            record_start, shows_progress, tensorboard_writer, trim_log)
from m2das.schedule import ema_decay, learning_rate
from m2das.signals import EXIT_ABORTED, StopRequest

FAULT_INJECTION_ENV = "M2DAS_TEST_SIGTERM_AT_STEP"  # tests: a real SIGTERM delivered inside that step


# -- set-up ---------------------------------------------------------------------

def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    try:
        device = machine.resolve_device(cfg.device, local_rank)
    except machine.DeviceError as e:
        raise TrainError(str(e)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the cores instead of each taking all
        torch.set_num_threads(machine.cores_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                        os.environ.get("WORLD_SIZE", 1)))))
    return device


def init_distributed(env: dict, device: torch.device):
    """Default group for gradients; a gloo group for the per-step stop flag (no GPU sync)."""
    if env["world_size"] == 1:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env["rank"], world_size=env["world_size"],
                            timeout=datetime.timedelta(minutes=30))
    return dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


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


def autocast_dtype(cfg: TrainConfig, device) -> torch.dtype | None:
    """bf16 wherever --bf16 asks (CUDA or CPU); fp16 with loss scaling on CUDA otherwise; fp32 on the CPU."""
    if cfg.bf16:
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def build_model(cfg: TrainConfig, num_classes: int, stats: dict, lr: float, device):
    """Model, optimizer and loss scaler; the same init on every rank (DDP also broadcasts it)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, input_size=cfg.input_size, patch_size=cfg.patch_size,
                         num_classes=num_classes, mask_ratio=cfg.mask_ratio, loss_off=cfg.loss_off)
    model.norm_stats.copy_(torch.tensor([stats["mean"], stats["std"]]))
    model.to(device)
    optimizer = build_optimizer(model, lr, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    return model, optimizer, scaler


def init_from(model, path, model_name: str) -> None:
    """Copy matching weights from a published checkpoint; a fresh schedule starts from them.

    A file of another model size would leave the encoder at its random init and
    train for hours on nothing: refused, naming what the file holds.
    """
    try:
        raw = load_weight_file(path)
    except CheckpointError as e:
        raise TrainError(f"--init_from {e}") from None
    source = raw.get("model", raw)
    own = model.state_dict()
    encoder = [k for k in own if k.startswith(ENCODER_PREFIXES)]
    clash = [k for k in encoder if k not in source or tuple(source[k].shape) != tuple(own[k].shape)]
    clash += [k for k in source if k.startswith(ENCODER_PREFIXES) and k not in own]
    if clash:
        k = clash[0]
        there = list(source[k].shape) if k in source else "absent"
        here = list(own[k].shape) if k in own else "absent"
        raise TrainError(f"--init_from {path}: it holds {describe_weights(raw)}, which does not fit --model "
                         f"{model_name} ({len(clash)} encoder tensors differ, e.g. {k}: {there} there, {here} "
                         f"here); pass the --model (and --patch_size) it was trained with, or another file")
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


class LossMeter:
    """Loss sums on the device between log lines: no host sync inside the step."""

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
                "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
                "batch_s": elapsed / self.batches if self.batches else None}


def eta_text(seconds: float | None) -> str:
    """Compact time left for a log line: 2d03h, 1h23m, 4m05s (? before any step was timed)."""
    if seconds is None:
        return "?"
    d, rest = divmod(int(max(seconds, 0)), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# -- the loop ---------------------------------------------------------------------

@dataclass
class Run:
    """What the loop works with; built once by `train`, then read (and `lr`, `tau` set) by the step."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: Progress
    ckpt: Checkpointer
    stop: StopRequest
    meter: LossMeter
    monitor: Monitor
    writer: object
    logger: loggers.NoLogger
    abs_lr: float
    batches_per_epoch: int
    total_steps: int
    amp_dtype: torch.dtype | None
    stop_self_at: int = 0
    lr: float = 0.0
    tau: float = 0.0
    monitor_clock: float = 0.0


def train_step(run: Run, lms, labels) -> bool:
    """One batch; True when it completed an optimizer step (every accum_iter batches)."""
    cfg, p = run.cfg, run.progress
    i = p.batch_in_epoch
    s = p.epoch * run.batches_per_epoch + i  # global batch index
    if i % cfg.accum_iter == 0:
        run.lr = learning_rate(p.epoch + i / run.batches_per_epoch, run.abs_lr, cfg.min_lr, cfg.warmup_epochs,
                               cfg.epochs)
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr
    lms = lms.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    last_micro = (i + 1) % cfg.accum_iter == 0
    sync = contextlib.nullcontext() if last_micro or run.world == 1 else run.ddp.no_sync()
    with sync, torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        mask = run.model.mask_order(lms.shape[0], mask_generator(run.device, cfg.seed, run.rank, s), run.device)
        out = run.ddp(lms, labels, mask)  # the mask drawn outside: a compiled forward has no graph break
        run.scaler.scale(out["loss"] / cfg.accum_iter).backward()
    run.meter.add(out, lms.shape[0])
    p.batch_in_epoch += 1
    if not last_micro:
        return False
    if p.step + 1 == run.stop_self_at:
        os.kill(os.getpid(), signal.SIGTERM)
    run.tau = ema_decay(s, run.batches_per_epoch * cfg.epochs, cfg.ema_decay_init, cfg.ema_decay)
    optimizer_step(run.model, run.optimizer, run.scaler, cfg.clip_grad, run.tau)
    p.step += 1
    if p.batch_in_epoch == run.batches_per_epoch:
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    return True


def step_boundary(run: Run, epoch: int, epoch_ended: bool) -> Outcome | None:
    """After an optimizer step, the only place the loop checks, logs, monitors, stops or saves."""
    p, stop = run.progress, run.stop
    log_due = p.step % run.cfg.log_every == 0
    if log_due or stop.requested:
        outcome = run.ckpt.diverged(run.meter.sums)
        if outcome is not None:
            return outcome
        if log_due:
            report(run, epoch)
    if epoch_ended and run.monitor.due(p.epoch) and not stop.requested:
        quality = run.monitor.run(run.ddp, p.epoch)  # every rank encodes its share
        if run.rank == 0:
            row = record_quality(quality, run.run_dir, run.writer, p.epoch, p.step,
                                 time.monotonic() - run.monitor_clock)
            run.logger.log({f"monitor/{k}": v for k, v in row.items() if isinstance(v, float)}, p.step)
            log(f"quality after epoch {p.epoch}: mAP {row['monitor_map']:.4f}, RankMe "
                f"{row['monitor_rankme']:.1f}, kNN {row['monitor_knn_acc']:.3f} "
                f"({row['monitor_seconds']:.1f} s, {100 * row['monitor_share']:.2f}% of training time)")
        run.monitor_clock = time.monotonic()
    return run.ckpt.step_boundary(stop.reason, epoch_ended)


def run_loop(run: Run, loader, sampler) -> Outcome | None:
    """Epochs of train_step until done (None) or until the step boundary ends the run (its Outcome)."""
    p = run.progress
    while p.epoch < run.cfg.epochs:
        epoch = p.epoch
        sampler.set_position(epoch, p.batch_in_epoch)
        run.model.train()
        for lms, labels in loader:
            if not train_step(run, lms, labels):
                continue
            epoch_ended = p.epoch > epoch
            outcome = step_boundary(run, epoch, epoch_ended)
            if outcome is not None:
                return outcome
            if epoch_ended:
                break
        if p.epoch == epoch:
            raise RuntimeError(f"the data loader ended before epoch {epoch + 1} was complete")
    return None


def report(run: Run, epoch: int) -> None:
    m = run.meter.read()
    run.meter.reset()
    if run.rank != 0:
        return
    step, total_steps, lr, tau = run.progress.step, run.total_steps, run.lr, run.tau
    batch_s = m.pop("batch_s")  # the rate since the last log line: the ETA follows speed changes
    eta_s = None if batch_s is None else (total_steps - step) * run.cfg.accum_iter * batch_s
    row = {"time": time.time(), "epoch": epoch, "step": step, "total_steps": total_steps, "lr": lr, "tau": tau,
           **m, "eta_s": eta_s}
    append_jsonl(run.run_dir / runfolder.LOG, row)
    log(f"epoch {epoch + 1} step {step}/{total_steps} loss {m['loss']:.4f} (online {m['loss_online']:.4f}, "
        f"offline {m['loss_offline']:.4f}) lr {lr:.3e} tau {tau:.6f} {m['samples_per_s']:.1f} samples/s, "
        f"ETA {eta_text(eta_s)}")
    scalars = {f"train/{k}": row[k] for k in ("loss", "loss_online", "loss_offline", "lr", "tau", "samples_per_s")}
    if run.writer is not None:
        for k, v in scalars.items():
            run.writer.add_scalar(k, v, step)
    run.logger.log(scalars, step)


def train(cfg: TrainConfig, env: dict) -> int:
    device = pick_device(cfg, env["local_rank"])
    flag_group = init_distributed(env, device)
    stop = StopRequest().install()
    lock = mirror = node_copy = None
    try:
        rank = env["rank"]

        def open_and_keep_lock():
            nonlocal lock, mirror
            run_dir, lock, mirror = open_run_dir(cfg, env["world_size"])
            return str(run_dir)

        run_dir = Path(on_rank0(open_and_keep_lock, rank))
        if not is_url(cfg.output_dir):
            _RANK_EXIT["run_dir"] = run_dir
        if lock is not None:  # a lock removed or taken under us stops the run as a signal would
            lock.on_lost(lambda why: stop.request(f"run lock lost ({why})"))
        if is_url(cfg.output_dir) and rank != 0 and env["local_rank"] == 0 and \
                not (run_dir / runfolder.CONFIG).exists():  # another node: its own read-only copy
            node_copy = RemoteRunFolder(cfg.output_dir, run_dir)
            node_copy.hydrate()
        if dist.is_initialized():
            dist.barrier(group=flag_group)
        return _train(cfg, env, device, flag_group, stop, run_dir, mirror)
    except Exception:
        if lock is not None and mirror is None and not cfg.output_dir:  # a dated folder of a failed start
            discard_unstarted(lock.run_dir)
        raise
    finally:
        stop.restore()
        if mirror is not None:  # uploads the logs and releases the lock, waiting out a short outage
            mirror.close()
        elif lock is not None:
            lock.release()
        if node_copy is not None:  # this node's read-only copy: the bucket holds it all
            shutil.rmtree(node_copy.staging, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_or_start(ckpt: Checkpointer, cfg: TrainConfig, model, stats: dict, rank: int) -> None:
    """Clean the folder, load the state to continue from (or --init_from weights), record the start."""
    run_dir, progress = ckpt.run_dir, ckpt.progress
    if rank == 0:
        removed = ckpt.prepare_folder()
        if removed:
            log(f"removed {len(removed)} temporaries of killed writes: {', '.join(removed)}")
    if dist.is_initialized():
        dist.barrier(group=ckpt.flag_group)
    try:
        resumed_from = ckpt.resume(cfg.resume, shows_progress(run_dir))
        if resumed_from is not None:
            ckpt.save_missed_epoch_checkpoint()
    except CheckpointError as e:
        raise TrainError(f"--resume {e}" if cfg.resume not in ("auto", "none") else str(e)) from None
    if resumed_from is not None:
        where = "all epochs done" if progress.epoch >= cfg.epochs else \
            f"epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}"
        log(f"resumed from {resumed_from} at step {progress.step} ({where})", rank)
    elif cfg.init_from:
        init_from(model, cfg.init_from, cfg.model)
        model.norm_stats.copy_(torch.tensor([stats["mean"], stats["std"]]))
    if rank == 0:
        ckpt.warn_if_low_space()
        trim_log(run_dir, progress.step)
        record_start(run_dir, resumed_from, progress.step)


def _train(cfg: TrainConfig, env, device, flag_group, stop, run_dir: Path, mirror) -> int:
    rank, world = env["rank"], env["world_size"]
    samples, stats, derived = load_data(cfg, run_dir, rank, world)
    model, optimizer, scaler = build_model(cfg, len(samples.classes), stats, derived["abs_lr"], device)

    # The checkpointer owns what is saved and loaded, and when.
    progress = Progress()
    ckpt = Checkpointer(run_dir, {"model": model, "optimizer": optimizer, "scaler": scaler,
                                  "rng": RNGState(device), "progress": progress},
                        {"args": {**cfg.asdict(), "output_dir": cfg.output_dir if mirror else str(run_dir)},
                         "norm_stats": stats, "classes": samples.classes},
                        rank=rank, epochs=cfg.epochs, save_freq=cfg.save_freq,
                        interval_s=cfg.ckpt_interval_min * 60, log=lambda m: log(m, rank), flag_group=flag_group,
                        publish=mirror.publish_checkpoint if mirror else None, keep_epochs=cfg.keep_epochs)
    resume_or_start(ckpt, cfg, model, stats, rank)

    loggers_open = []  # rank 0's logger stays on rank 0 (an error is every rank's, through on_rank0)
    on_rank0(lambda: loggers_open.append(loggers.open_logger(cfg.logger, run_dir, rank, cfg.asdict())), rank)
    experiment_logger = loggers_open[0] if loggers_open else loggers.NoLogger()  # a crash: wandb's exit hook

    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        gradient_as_bucket_view=True)
    sampler = ResumableSampler(len(samples), cfg.batch_size, rank, world, cfg.seed,
                               samples.weights if cfg.weighted else None)
    loader = make_loader(make_dataset(samples, cfg.input_size[1], cfg.seed), sampler, cfg.batch_size,
                         machine.loader_workers(cfg.num_workers, world), pin_memory=device.type == "cuda")
    run = Run(cfg=cfg, rank=rank, world=world, device=device, run_dir=run_dir, model=model, ddp=ddp,
              optimizer=optimizer, scaler=scaler, progress=progress, ckpt=ckpt, stop=stop,
              meter=LossMeter(device), writer=tensorboard_writer(run_dir, rank, progress.step),
              logger=experiment_logger,
              monitor=Monitor(cfg.asdict(), samples.classes, device, rank, world),  # no training randomness
              abs_lr=derived["abs_lr"], batches_per_epoch=derived["steps_per_epoch"] * cfg.accum_iter,
              total_steps=derived["total_steps"], amp_dtype=autocast_dtype(cfg, device),
              stop_self_at=int(os.environ.get(FAULT_INJECTION_ENV, 0)), monitor_clock=time.monotonic())

    if progress.epoch < cfg.epochs:
        log(f"training epochs {progress.epoch + 1}..{cfg.epochs} on {device} x {world}", rank)
    outcome = run_loop(run, loader, sampler)
    if outcome is not None:
        log(outcome.message, rank)
        if rank == 0:
            why = {"signal": stop.name} if stop.name else {"reason": stop.reason} if stop.reason else {}
            events.record(run_dir, outcome.event, step=progress.step, **why)
        experiment_logger.close(failed=outcome.event == runfolder.EVENT_DIVERGED)
        if outcome.event == runfolder.EVENT_STOPPED:
            stop.hand_over()
        return outcome.exit_code

    ckpt.finish()
    final = runfolder.final_weights(run_dir, cfg.epochs)
    if rank == 0:
        if run.writer is not None:
            run.writer.close()
        if final.exists():  # "finished" only once the final weights are on disk
            events.record(run_dir, runfolder.EVENT_FINISHED, step=progress.step)
    if not final.exists():
        raise TrainError(f"{final}: the final weights are missing; rerun the same command to write them")
    experiment_logger.close()
    log(f"finished {cfg.epochs} epochs ({progress.step} steps); weights: {final}", rank)
    return 0


_RANK_EXIT = {}  # "run_dir": where this rank leaves its exit code under torchrun, once the folder is open


def main(argv=None) -> int:
    """`m2das train`; a rank started by torchrun also leaves its exit code in the run folder, since torchrun's
    own code (1 for a clean stop too) cannot tell a requeue from a failure (m2das.cluster.requeue --torchrun)."""
    code = 1  # what an exception ends the process with
    try:
        code = _main(argv)
        return code
    finally:
        if _RANK_EXIT.get("run_dir"):
            runfolder.record_torchrun_exit(_RANK_EXIT["run_dir"], code)


def _main(argv=None) -> int:
    cfg = config.parse_args(sys.argv[1:] if argv is None else argv)
    env = config.dist_env()
    if cfg.print_config:
        return print_config(cfg, env["world_size"])
    try:
        loggers.require(cfg.logger)  # before the run folder is touched
        return train(cfg, env)
    except (TrainError, DataListError, loggers.LoggerError) as e:
        print(f"m2das train: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # a second Ctrl-C (the first one saves and exits 75)
        print(f"m2das train: {e or 'interrupted'}; the newest checkpoint in the run folder is the resume point "
              f"(exit {EXIT_ABORTED})", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as e:  # the object store: did not answer (resumable) or refused (bad input)
        failure = store_failure(cfg, e)
        if failure is None:
            raise
        if isinstance(failure, storeerrors.StoreUnavailable):
            print(f"m2das train: stopped: {one_line(failure)}; {resume_hint()} (exit {EXIT_RESUMABLE})",
                  file=sys.stderr)
            return EXIT_RESUMABLE
        print(f"m2das train: error: {one_line(failure)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def store_failure(cfg: TrainConfig, e: Exception):
    """An error of the object store the run reads or writes, naming the URL (the data's or the run
    folder's, whichever the error names); None for any other error."""
    urls = [u for u in (cfg.data_path, cfg.output_dir) if is_url(u)]
    if not urls:
        return None
    url = next((u for u in urls if u.split("://", 1)[1].rstrip("/") in str(e)), urls[-1])
    return storeerrors.store_failure(e, url)


def one_line(e: Exception) -> str:
    """The message itself, also when a DataLoader worker wrapped it in its traceback text."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return lines[-1].split(": ", 1)[-1] if lines[-1].startswith(type(e).__module__) else lines[-1]
    return " ".join(lines)
