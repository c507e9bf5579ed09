"""`m2das finetune WEIGHTS --task as20k --data_path DATA --output_dir RUN`: the paper's Table VI
fine-tuning as a cluster job.

It keeps pre-training's contract: the run folder's names, config.json, the
lock, restarts.jsonl events, log.jsonl, TensorBoard scalars, the checkpointer
(full-state last.pth, CRC-checked, code-free loading, `--resume auto`), a stop
signal saved at the step boundary with exit 75, DDP over several ranks, and
`m2das status RUN`. A resumed run is bit-identical to an uninterrupted one:
data order and crops are functions of (seed, epoch, position), augmentation
and column masks of (seed, rank, global batch index).

After every epoch the whole test list is scored (mAP on AudioSet's eval set,
accuracy elsewhere). A task with a validation split (SPCV2, VC1) reports the test
score of the epoch best on validation, as EVAR does; one without (AudioSet, an
ESC-50 fold) reports the best epoch's test score ("best epoch on eval", as the
reference tool reports it) and the last epoch's.
"""

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from m2das import events, runfolder
from m2das.checkpoint import Checkpointer, CheckpointError, Outcome, Progress, RNGState
from m2das.data.dataset import DataListError, ResumableSampler, make_dataset, make_loader
from m2das.data.stats import crop_or_pad
from m2das.downstream import ft_data
from m2das.downstream.ft_config import OVERRIDES, PROG, ConfigError, parse_args
from m2das.downstream.ft_data import FinetuneDataError, augment, batch_rng, kept_columns, targets_of
from m2das.downstream.ft_model import build_net, encoder_args, build_optimizer, finetune_lr, loss_fn
from m2das.downstream.protocol import macro_map
from m2das.downstream.weights import WeightsError
from m2das.events import log
from m2das.fileio import append_jsonl, write_json
from m2das.machine import DeviceError, loader_workers, resolve_device
from m2das.metrics import accuracy
from m2das.runfolder import EXIT_BAD_INPUT, RunLock, RunLocked
from m2das.runsetup import (TrainError, broadcast, on_rank0, read_json_file, record_start, refuse_planted_links,
                            shows_progress, tensorboard_writer, trim_log)
from m2das.signals import StopRequest
from m2das.train import FAULT_INJECTION_ENV, init_distributed

SUMMARY = "finetune_result.json"  # RUN/: the scores, the missing-clip counts, how the model was picked
# What makes a run folder another run when it changes (the rest may change on resume).
IDENTITY_KEYS = ("weights", "task", "fold", "data_path", "metadata", "seed", "bf16") + OVERRIDES
SELECT_ON_EVAL = "best epoch on eval, as the paper's tool reports it (no validation split)"
SELECT_BY_VALID = "test score of the epoch best on the validation split, as the paper's tool reports it"
MASK_PURPOSE = 3  # batch_rng purpose of the column masks (0-2: mixup, SpecAugment, RRC)


def settings_of(cfg: dict) -> ft_data.TaskSettings:
    return ft_data.TaskSettings(**{k: cfg[k] for k in ft_data.TaskSettings.__dataclass_fields__})


# -- set-up --------------------------------------------------------------------------------

def open_run_dir(cfg: dict, world: int):
    """Lock the run folder and check config.json: another identity needs --force_config."""
    run_dir = Path(cfg["output_dir"])
    try:
        lock = RunLock(run_dir).acquire()
    except RunLocked as e:
        raise TrainError(str(e)) from None
    try:
        refuse_planted_links(run_dir)
        if lock.took_over:
            log(f"took over the run folder from a dead holder ({lock.took_over})")
        path = run_dir / runfolder.CONFIG
        record = {**cfg, "output_dir": str(run_dir), "world_size": world, "command": "finetune"}
        if path.exists():
            saved = read_json_file(path, "restore it, or pass --force_config to rewrite it from these flags")
            changed = [f"{k}: {saved.get(k)!r} -> {cfg.get(k)!r}" for k in IDENTITY_KEYS if saved.get(k) != cfg.get(k)]
            if changed and not cfg["force_config"]:
                raise TrainError(f"{path}: this run folder was started with another configuration "
                                 f"({'; '.join(changed)}); use another --output_dir or pass --force_config")
            if changed:
                events.record(run_dir, runfolder.EVENT_CONFIG_CHANGED, changes=changed)
        write_json(path, record)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


class ScoreBook:
    """Test (and validation) score after each epoch; saved in the checkpoint so the pick survives restarts."""

    def __init__(self):
        self.scores: list = []
        self.valid: list = []

    def state_dict(self) -> dict:
        return {"scores": list(self.scores), "valid": list(self.valid)}

    def load_state_dict(self, state: dict) -> None:
        self.scores = [float(s) for s in state["scores"]]
        self.valid = [float(s) for s in state.get("valid", [])]

    def summary(self) -> dict:
        """best: the test score of the first epoch best on validation, else the best test score."""
        if not self.scores:
            return {"best": None, "best_epoch": None, "last": None}
        best = int(np.argmax(self.valid if self.valid else self.scores))
        out = {"best": self.scores[best], "best_epoch": best + 1, "last": self.scores[-1]}
        return {**out, "best_valid": self.valid[best]} if self.valid else out


# -- evaluation ------------------------------------------------------------------------------

def evaluate(net, samples, st, norm, device, rank: int, world: int, batch_size: int, amp) -> float | None:
    """Score every test clip (its first `frames` frames, unaugmented, unmasked); rank 0 gets the number."""
    ids = np.arange(rank, len(samples), world)
    outs = []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            x = np.stack([crop_or_pad(np.load(samples.root / samples.files[i], mmap_mode="r"), st.frames, 0)
                          for i in chunk]).astype(np.float32)
            x = (torch.from_numpy(x).to(device) - norm[0]) / norm[1]
            with amp():
                outs.append(net(x).float().cpu().numpy())
    net.train()
    scores = np.concatenate(outs) if outs else np.zeros((0, len(samples.classes)), dtype=np.float32)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (ids, scores))
        ids = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])[np.argsort(ids)]
        ids = np.sort(ids)
    if rank != 0:
        return None
    targets = targets_of(samples, ids)
    return macro_map(scores, targets) if st.multi_label else accuracy(scores, targets.argmax(axis=1))


# -- the loop --------------------------------------------------------------------------------

def finetune(cfg: dict, env: dict) -> int:
    try:
        device = resolve_device(cfg["device"], env["local_rank"])
    except DeviceError as e:
        raise TrainError(str(e)) from None
    if device.type == "cuda":  # NCCL and the default stream on this rank's GPU
        torch.cuda.set_device(device)
    flag_group = init_distributed(env, device)
    stop = StopRequest().install()
    lock = None
    try:
        rank, world = env["rank"], env["world_size"]

        def take():
            nonlocal lock
            run_dir, lock = open_run_dir(cfg, world)
            return str(run_dir)

        run_dir = Path(on_rank0(take, rank))
        if lock is not None:  # a lock removed or taken under us stops the run as a signal would
            lock.on_lost(lambda why: stop.request(f"run lock lost ({why})"))
        if dist.is_initialized():
            dist.barrier(group=flag_group)
        return _finetune(cfg, env, device, flag_group, stop, run_dir)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def load_data(cfg: dict, run_dir: Path, rank: int):
    """The task's lists (rank 0 reads, every rank gets them) and the class vocabulary pinned in the run folder."""
    def read():
        cache = cfg["lms_cache"] or run_dir / ft_data.TASK_LMS_DIR
        data = ft_data.load_task(cfg["task"], cfg["data_path"], cfg["metadata"], cache, cfg["fold"],
                                 cfg["num_workers"])
        classes_path = run_dir / runfolder.CLASSES
        if classes_path.exists():
            pinned = read_json_file(classes_path, "it pins the label vocabulary: restore it")
            if pinned != data.train.classes:
                raise TrainError(f"{classes_path}: the task's classes changed since this run started; "
                                 f"use another --output_dir")
        else:
            write_json(classes_path, data.train.classes)
        return data

    return on_rank0(read, rank)


def _finetune(cfg, env, device, flag_group, stop, run_dir: Path) -> int:
    rank, world = env["rank"], env["world_size"]
    st = settings_of(cfg)
    data = load_data(cfg, run_dir, rank)
    train, test = data.train, data.test
    batches_per_epoch = len(train) // (st.batch_size * world)
    if batches_per_epoch == 0:
        raise TrainError(f"{cfg['data_path']}: {len(train)} training clips give no full batch of "
                         f"{st.batch_size} x {world} ranks; lower --batch_size")
    total_steps = batches_per_epoch * st.epochs
    try:
        torch.manual_seed(cfg["seed"])  # the head's init
        net = build_net(cfg["weights"], st.frames, len(train.classes), st).to(device)
    except (WeightsError, ValueError) as e:
        raise TrainError(f"{cfg['weights']}: {e}" if str(cfg["weights"]) not in str(e) else str(e)) from None
    norm = net.encoder.norm_stats.detach().clone()
    optimizer = build_optimizer(net, st, st.lr)
    progress, book = Progress(), ScoreBook()
    ckpt = Checkpointer(run_dir, {"model": net, "optimizer": optimizer, "rng": RNGState(device),
                                  "progress": progress, "scores": book},
                        {"args": {**cfg, "output_dir": str(run_dir), **encoder_args(net.encoder)},
                         "classes": train.classes, "norm_stats": {"mean": float(norm[0]), "std": float(norm[1])}},
                        rank=rank, epochs=st.epochs, save_freq=cfg["save_freq"],
                        interval_s=cfg["ckpt_interval_min"] * 60, log=lambda m: log(m, rank), flag_group=flag_group)
    resume(ckpt, cfg, rank)
    if rank == 0:
        config = read_json_file(run_dir / runfolder.CONFIG, "restore it")
        write_json(run_dir / runfolder.CONFIG, {**config, "total_steps": total_steps, "train_clips": len(train),
                                                "test_clips": len(test), "missing": data.missing})
    log(f"{cfg['task']}: {len(train)} training clips, {len(test)} test clips, {len(train.classes)} classes; "
        f"missing from {cfg['data_path']}: {data.missing['train']} train, {data.missing['test']} test"
        + (f"; sampling weights: {data.weights_source}" if data.weights_source else ""), rank)

    ddp = net if world == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = ResumableSampler(len(train), st.batch_size, rank, world, cfg["seed"], train.weights)
    loader = make_loader(make_dataset(train, st.frames, cfg["seed"]), sampler, st.batch_size,
                         loader_workers(cfg["num_workers"], world), pin_memory=device.type == "cuda")
    writer = tensorboard_writer(run_dir, rank, progress.step)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16,  # noqa: E731
                                 enabled=device.type == "cuda" and cfg["bf16"])

    def end(outcome: Outcome) -> int:
        log(outcome.message, rank)
        if rank == 0:
            why = {"signal": stop.name} if stop.name else {"reason": stop.reason} if stop.reason else {}
            events.record(run_dir, outcome.event, step=progress.step, **why)
        if outcome.event == runfolder.EVENT_STOPPED:
            stop.hand_over()
        return outcome.exit_code

    def score(samples):
        value = evaluate(ddp.module if world > 1 else net, samples, st, norm.to(device), device, rank, world,
                         cfg["eval_batch_size"], amp)
        return float(broadcast(value, rank))

    def score_epoch(epoch: int) -> None:
        if data.valid is not None:
            book.valid.append(score(data.valid))
        value = score(test)
        book.scores.append(value)
        if rank == 0:
            s = book.summary()
            name = "mAP" if st.multi_label else "accuracy"
            row = {"time": time.time(), "epoch": epoch, "step": progress.step, "eval": value,
                   "eval_best": s["best"], "eval_best_epoch": s["best_epoch"]}
            valid = f"valid {book.valid[-1]:.4f}, " if book.valid else ""
            if book.valid:
                row["valid"] = book.valid[-1]
            append_jsonl(run_dir / runfolder.LOG, row)
            if writer is not None:
                writer.add_scalar("eval/score", value, progress.step)
                if book.valid:
                    writer.add_scalar("eval/valid", book.valid[-1], progress.step)
            log(f"epoch {epoch} {valid}test {name} {value:.4f} (counted: {s['best']:.4f} at epoch {s['best_epoch']})")

    if len(book.scores) < progress.epoch:  # stopped after an epoch's last step, before its score
        score_epoch(progress.epoch)
    if progress.epoch < st.epochs:
        log(f"fine-tuning epochs {progress.epoch + 1}..{st.epochs} on {device} x {world}", rank)
    stop_self_at = int(os.environ.get(FAULT_INJECTION_ENV, 0))
    sums, count, t0 = torch.zeros(1, device=device), 0, time.perf_counter()
    while progress.epoch < st.epochs:
        epoch = progress.epoch
        sampler.set_position(epoch, progress.batch_in_epoch)
        net.train()
        for lms, labels in loader:
            i = progress.batch_in_epoch
            s = epoch * batches_per_epoch + i  # global batch index
            lr = finetune_lr(epoch + i / batches_per_epoch, st.lr, st.warmup_epochs, st.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = (lms.to(device, non_blocking=True) - norm[0].to(device)) / norm[1].to(device)
            x, y = augment(x, labels.to(device, non_blocking=True), st, cfg["seed"], rank, s)
            keep = kept_columns(x.shape[0], net.columns, st.training_mask, batch_rng(cfg["seed"], rank, s,
                                MASK_PURPOSE)) if st.training_mask > 0 else None
            with amp():
                logits = ddp(x, keep)
            loss = loss_fn(logits, y, st.multi_label)
            loss.backward()
            if progress.step + 1 == stop_self_at:  # a real signal, delivered inside that step
                os.kill(os.getpid(), signal.SIGTERM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums += loss.detach().float()
            count += 1
            progress.step += 1
            progress.batch_in_epoch += 1
            epoch_ended = progress.batch_in_epoch == batches_per_epoch
            if epoch_ended:
                progress.epoch, progress.batch_in_epoch = epoch + 1, 0

            if progress.step % cfg["log_every"] == 0 or stop.requested or epoch_ended:
                outcome = ckpt.diverged(sums)
                if outcome is not None:
                    return end(outcome)
                if progress.step % cfg["log_every"] == 0:
                    if rank == 0:
                        rate = count * st.batch_size / max(time.perf_counter() - t0, 1e-9)
                        report(run_dir, writer, epoch, progress.step, total_steps, lr, float(sums) / count, rate)
                    sums.zero_()
                    count, t0 = 0, time.perf_counter()
            if epoch_ended and not stop.requested:
                score_epoch(progress.epoch)
            outcome = ckpt.step_boundary(stop.reason, epoch_ended)
            if outcome is not None:
                return end(outcome)
            if epoch_ended:
                break
        if progress.epoch == epoch:
            raise RuntimeError(f"the data loader ended before epoch {epoch + 1} was complete")

    ckpt.finish()
    final = runfolder.final_weights(run_dir, st.epochs)
    selection = SELECT_BY_VALID if data.valid is not None else SELECT_ON_EVAL
    result = {**book.summary(), "metric": "mAP" if st.multi_label else "accuracy", "task": cfg["task"],
              "fold": cfg["fold"], "selection": selection, "scores": book.scores, "valid_scores": book.valid,
              "missing": data.missing, "train_clips": len(train), "test_clips": len(test),
              "valid_clips": len(data.valid) if data.valid is not None else 0}
    if rank == 0:
        write_json(run_dir / SUMMARY, result)
        if writer is not None:
            writer.close()
        if final.exists():
            events.record(run_dir, runfolder.EVENT_FINISHED, step=progress.step)
        log(f"{cfg['task']} {result['metric']}: {result['best']:.4f} at epoch {result['best_epoch']} ({selection}), "
            f"last epoch {result['last']:.4f}; missing clips: "
            f"{data.missing['train']} train, {data.missing['test']} test; {run_dir / SUMMARY}")
    return 0


def resume(ckpt: Checkpointer, cfg: dict, rank: int) -> None:
    """Clean the folder, load the state to continue from, record the start."""
    run_dir, progress = ckpt.run_dir, ckpt.progress
    if rank == 0:
        ckpt.prepare_folder()
    if dist.is_initialized():
        dist.barrier(group=ckpt.flag_group)
    try:
        resumed_from = ckpt.resume(cfg["resume"], shows_progress(run_dir))
    except CheckpointError as e:
        raise TrainError(f"--resume {e}" if cfg["resume"] not in ("auto", "none") else str(e)) from None
    if resumed_from is not None:
        log(f"resumed from {resumed_from} at step {progress.step}", rank)
    if rank == 0:
        trim_log(run_dir, progress.step)
        record_start(run_dir, resumed_from, progress.step)


def report(run_dir: Path, writer, epoch: int, step: int, total_steps: int, lr: float, loss: float,
           rate: float) -> None:
    row = {"time": time.time(), "epoch": epoch, "step": step, "total_steps": total_steps, "lr": lr, "loss": loss,
           "samples_per_s": rate}
    append_jsonl(run_dir / runfolder.LOG, row)
    log(f"epoch {epoch + 1} step {step}/{total_steps} loss {loss:.4f} lr {lr:.3e} {rate:.1f} samples/s")
    if writer is not None:
        for k in ("loss", "lr", "samples_per_s"):
            writer.add_scalar(f"train/{k}", row[k], step)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        return finetune(cfg, {"world_size": int(os.environ.get("WORLD_SIZE", 1)),
                              "rank": int(os.environ.get("RANK", 0)),
                              "local_rank": int(os.environ.get("LOCAL_RANK", 0))})
    except (TrainError, ConfigError, DataListError, FinetuneDataError, CheckpointError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
