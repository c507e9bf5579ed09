"""`m2das status RUN_DIR`: where a run stands, from its files alone.

Reads config.json, log.jsonl, restarts.jsonl, launcher.jsonl and the
checkpoint files' names and times, and asks SLURM (squeue, else sacct) about
the run's newest job when those commands exist; it never loads a checkpoint or
imports torch, so it answers in a fraction of a second on a login node, while
the run is training, waiting in the queue, or finished.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from m2das import remote, runfolder
from m2das.cliargs import DefaultsFormatter
from m2das.cluster import requeue
from m2das.fileio import is_url, read_jsonl

RECENT_LOG_ROWS = 20


def _ts(value):
    """Seconds since the epoch from a float or an ISO-8601 string (None when neither)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        return dt.timestamp()
    return None


def _when(ts) -> str:
    if ts is None:
        return "?"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


QUEUE_TIMEOUT_S = 5
FAILED_STATES = ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE")
ERROR_LINE = re.compile(r"(^|\s)(error:|\w*(Error|Exception)\b:?|Killed|killed)")
ERROR_TAIL_BYTES = 65536


def _run(cmd) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QUEUE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def queue_info(job_id) -> dict | None:
    """The job's state, pending reason, nodes and time left from squeue; else state and nodes from sacct."""
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r|%N|%L"])
    if out and out.strip():
        state, reason, nodes, left = (out.strip().splitlines()[0].split("|") + [""] * 4)[:4]
        return {"job_id": str(job_id), "state": state, "reason": reason if reason not in ("", "None") else None,
                "nodes": nodes or None, "time_left": left if left not in ("", "INVALID", "N/A") else None,
                "source": "squeue"}
    out = _run(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State,NodeList"])
    if out and out.strip():
        state, _, nodes = out.strip().splitlines()[-1].partition("|")
        return {"job_id": str(job_id), "state": state.split()[0] if state else "?", "reason": None,
                "nodes": nodes or None, "time_left": None, "source": "sacct"}
    return None


def _error_rank(line: str) -> int:
    """How telling an error line is: the trainer's own > an exception > a scheduler's note."""
    if re.search(r"m2das \w+: error:", line):
        return 3
    if re.match(r"\s*(\w+\.)*\w*(Error|Exception)\b", line):
        return 2
    return 1 if ERROR_LINE.search(line) and "most recent call last" not in line else 0


def last_error_line(run: Path) -> dict | None:
    """The most telling, newest error line in the rank logs (local: logs/, SLURM: slurm/)."""
    files = list((run / runfolder.LOGS_DIR).glob("rank*.log")) + list((run / "slurm").glob("*_log.err")) + \
        list((run / "slurm").glob("*_log.out"))
    best, best_key = None, None
    for f in files:
        try:
            st = f.stat()
            with open(f, "rb") as fh:
                fh.seek(max(0, st.st_size - ERROR_TAIL_BYTES))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        for i, ln in enumerate(lines):
            rank = _error_rank(ln)
            key = (rank, st.st_mtime, i)
            if rank and (best_key is None or key > best_key):
                best, best_key = {"file": str(f), "line": ln.strip()[:300], "mtime": st.st_mtime}, key
    return best


def _start_key(job_id, restart_count):
    """(SLURM job id, restart): local supervisor starts have no SLURM job id."""
    job = None if job_id in (None, "") or str(job_id).startswith("local-") else str(job_id)
    return job, int(restart_count or 0)


def local_checkpoints(run: Path) -> list:
    """name, mtime and bytes of each checkpoint file in a local run folder."""
    found = []
    for p in runfolder.checkpoint_files(run):
        try:
            st = p.stat()
        except OSError:
            continue
        found.append({"name": p.name, "mtime": st.st_mtime, "bytes": st.st_size})
    return found


def failed_launch(launcher: list, starts: list) -> dict | None:
    """The launcher's newest decision when it is "failed" and nothing was submitted or started since."""
    newest = [(i, r) for i, r in enumerate(launcher) if r.get("event") in (*requeue.EXIT_FOR, runfolder.EVENT_SUBMIT, runfolder.EVENT_START)]
    if not newest or newest[-1][1].get("event") != requeue.FAILED:
        return None
    row = newest[-1][1]
    decided = _ts(row.get("time"))
    if decided is not None and any((_ts(r.get("time")) or 0) > decided for r in starts):
        return None  # the trainer was started again by hand since
    return row


def failed_text(row: dict) -> str:
    codes = sorted({int(c) for c in row.get("exit_codes") or [] if isinstance(c, int) and c != 0})
    known = [c for c in codes if c in (runfolder.EXIT_BAD_INPUT, runfolder.EXIT_DIVERGED)]
    if known:
        meaning = runfolder.EXIT_CODES[known[0]].replace(" (", "; ").rstrip(")")
        return f"failed: exit {known[0]} ({meaning})"
    if codes:
        return f"failed: exit codes {codes}; not requeued"
    return f"failed: {row.get('message') or 'see the logs'}"


def collect(run_dir, now=None, queue=True, checkpoints=None) -> dict:
    """Everything `m2das status` shows, as a dict (also what `--json` prints).

    `checkpoints`: the listing of a run folder kept elsewhere (object storage), instead of the local files.
    """
    run = Path(run_dir)
    now = time.time() if now is None else now
    try:
        cfg = json.loads((run / runfolder.CONFIG).read_text())
    except (OSError, ValueError):
        cfg = {}
    logs = read_jsonl(run / runfolder.LOG)
    monitored = [r for r in logs if "monitor_map" in r]  # quality rows of m2das.monitor carry no loss
    logs = [r for r in logs if "monitor_map" not in r]
    restarts = read_jsonl(run / runfolder.RESTARTS)
    launcher = read_jsonl(run / runfolder.LAUNCHER)

    epochs = cfg.get("epochs")
    world = cfg.get("world_size")
    last = logs[-1] if logs else {}
    total_steps = cfg.get("total_steps") or last.get("total_steps")
    step = last.get("step")
    finished_rows = [r for r in restarts if r.get("event") == runfolder.EVENT_FINISHED]
    if finished_rows and isinstance(finished_rows[-1].get("step"), int):  # log lines come every --log_every steps
        step = max(step or 0, finished_rows[-1]["step"])
        last = {**last, "epoch": epochs - 1} if isinstance(epochs, int) and epochs > 0 else last
    out = {"run_dir": str(run), "epochs": epochs, "world_size": world, "model": cfg.get("model"),
           "epoch": last.get("epoch"), "step": step, "total_steps": total_steps,
           "loss": last.get("loss"), "last_log_time": _ts(last.get("time"))}
    out["monitor"] = {k: v for k, v in monitored[-1].items() if k.startswith("monitor_") or k in ("epoch", "step")} \
        if monitored else None

    # Speed: the newest rows of the current start only (a restart's gap is not training time).
    starts = [r for r in restarts if r.get("event", runfolder.EVENT_START) == runfolder.EVENT_START]
    since = _ts(starts[-1].get("time")) if starts else None
    recent = [r for r in logs[-RECENT_LOG_ROWS:] if since is None or (_ts(r.get("time")) or 0) >= since]
    rates = [r["samples_per_s"] for r in recent if isinstance(r.get("samples_per_s"), (int, float))]
    out["samples_per_s_rank0"] = sum(rates) / len(rates) if rates else None
    out["samples_per_s"] = out["samples_per_s_rank0"] * world if rates and world else None
    steps_per_s = None
    if len(recent) >= 2:
        dt = (_ts(recent[-1].get("time")) or 0) - (_ts(recent[0].get("time")) or 0)
        ds = (recent[-1].get("step") or 0) - (recent[0].get("step") or 0)
        if dt > 0 and ds > 0:
            steps_per_s = ds / dt
    out["steps_per_s"] = steps_per_s

    # Checkpoints.
    listed = local_checkpoints(run) if checkpoints is None else checkpoints
    ckpts = [{**c, "age_s": now - c["mtime"] if c.get("mtime") is not None else None} for c in listed]
    ckpts.sort(key=lambda c: c["mtime"] or 0, reverse=True)
    out["checkpoints"] = ckpts
    finished_file = epochs is not None and runfolder.epoch_checkpoint_name(epochs) in {c["name"] for c in ckpts}
    finished_event = bool(finished_rows)
    diverged = any(r.get("event") == runfolder.EVENT_DIVERGED for r in restarts)
    out["finished"] = bool(finished_file or finished_event)

    # State.
    failed = failed_launch(launcher, starts)
    if out["finished"]:
        state = "finished"
    elif diverged and (not starts or _ts(starts[-1].get("time")) or 0) <= max(
            (_ts(r.get("time")) or 0) for r in restarts if r.get("event") == runfolder.EVENT_DIVERGED):
        state = "diverged (loss non-finite); not requeued"
    elif failed is not None:
        state = failed_text(failed)
    elif restarts and restarts[-1].get("event") == runfolder.EVENT_STOPPED:
        why = restarts[-1].get("signal") or restarts[-1].get("reason") or "a signal"
        state = f"stopped on {why}, waiting to be resumed"
    elif out["last_log_time"] is not None:
        state = f"running? last log line {_duration(now - out['last_log_time'])} ago"
    elif starts:
        state = "started, no log line yet"
    else:
        state = "not started yet (queued?)"
    # torchrun says 1 for a clean stop and a killed rank alike: its ranks' own exit records tell them apart.
    decision, codes, group = requeue.decide_torchrun(run, 1, 0)
    out["torchrun"] = {"exit_codes": codes, "decision": decision.action, "reason": decision.reason} if group else None
    if group and not out["finished"] and state.startswith(("running?", "started")):
        state = f"ended under torchrun (rank exit codes {codes}): {decision.action}, {decision.reason}"
    caps = [r for r in launcher if r.get("event") == requeue.CAP]
    if caps and not out["finished"]:
        state += "; requeue cap reached: " + str(caps[-1].get("message", ""))
    out["state"] = state

    remaining = (total_steps - step) if (total_steps and step is not None) else None
    out["eta_s"] = 0 if out["finished"] else (remaining / steps_per_s if remaining is not None and steps_per_s else None)

    out["starts"] = [{"time": _ts(r.get("time")), "job_id": r.get("job_id"), "restart_count": r.get("restart_count"),
                      "host": r.get("host"), "resumed_from": r.get("resumed_from"),
                      "resumed_step": r.get("resumed_step"), "last_stop_reason": r.get("last_stop_reason")}
                     for r in starts]
    out["stops"] = [{"time": _ts(r.get("time")), "signal": r.get("signal"), "reason": r.get("reason"),
                     "step": r.get("step")}
                    for r in restarts if r.get("event") == runfolder.EVENT_STOPPED]
    out["requeues"] = [{"time": _ts(r.get("time")), "job_id": r.get("job_id"), "by": r.get("by"),
                        "reason": r.get("reason"), "restart_count": r.get("restart_count")}
                       for r in launcher if r.get("event") == requeue.REQUEUE]
    # A start killed before the trainer wrote its start record still shows in the launcher's log.
    recorded = {_start_key(r.get("job_id"), r.get("restart_count")) for r in starts}
    out["unrecorded_starts"] = sum(1 for r in out["requeues"]
                                   if _start_key(r["job_id"], r["restart_count"]) not in recorded)
    out["job_ids"] = sorted({str(r["job_id"]) for r in launcher + starts if r.get("job_id")})
    submits = [r for r in launcher if r.get("event") == runfolder.EVENT_SUBMIT]
    out["submitted"] = [{"time": _ts(r.get("time")), "cluster": r.get("cluster"), "job_id": r.get("job_id"),
                         "preset": r.get("preset")} for r in submits]
    slurm_jobs = [r.get("job_id") for r in submits if r.get("cluster") == "slurm" and r.get("job_id")]
    out["queue"] = queue_info(slurm_jobs[-1]) if queue and slurm_jobs else None
    decisions = [r for r in launcher if r.get("event") in requeue.EXIT_FOR]
    crashed = (decisions and decisions[-1]["event"] == requeue.FAILED) or \
        (out["queue"] is not None and out["queue"]["state"].startswith(FAILED_STATES))
    out["error"] = last_error_line(run) if crashed and not out["finished"] else None
    return out


def render(s: dict, now=None) -> str:
    now = time.time() if now is None else now
    lines = [f"run        {s['run_dir']}", f"state      {s['state']}"]
    q = s.get("queue")
    if q:
        text = f"queue      job {q['job_id']} {q['state']}"
        if q["reason"] and q["state"] == "PENDING":
            text += f" ({q['reason']})"
        if q["nodes"] and q["state"] != "PENDING":
            text += f" on {q['nodes']}"
        if q["time_left"] and q["state"] == "RUNNING":
            text += f", {q['time_left']} left"
        lines.append(text)
    if s.get("error"):
        lines.append(f"error      {s['error']['line']}  ({s['error']['file']})")
    if s["step"] is not None:
        total = f"/{s['total_steps']}" if s["total_steps"] else ""
        pct = f" ({100.0 * s['step'] / s['total_steps']:.1f}%)" if s["total_steps"] else ""
        ep = f"epoch {s['epoch'] + 1}" + (f" of {s['epochs']}" if s["epochs"] else "") \
            if isinstance(s["epoch"], int) else "epoch ?"
        lines.append(f"progress   {ep}, step {s['step']}{total}{pct}")
    else:
        lines.append("progress   no training step logged yet")
    if s["loss"] is not None:
        lines.append(f"loss       {s['loss']:.4f} (last log line)")
    m = s.get("monitor")
    if m:
        knn = f", kNN acc {m['monitor_knn_acc']:.3f}" if m.get("monitor_knn_acc") is not None else ""
        lines.append(f"quality    mAP {m['monitor_map']:.4f}, RankMe {m['monitor_rankme']:.1f}{knn} after epoch "
                     f"{m['epoch']} ({m.get('monitor_clips')} held-out clips, {m['monitor_seconds']:.1f} s)")
    if s["samples_per_s_rank0"] is not None:
        world = s["world_size"] or 1
        lines.append(f"speed      {s['samples_per_s_rank0']:.1f} samples/s per rank x {world} ranks"
                     f" = {s['samples_per_s']:.1f} samples/s"
                     + (f", {s['steps_per_s']:.3f} steps/s" if s["steps_per_s"] else ""))
    if s["finished"]:
        lines.append("ETA        done")
    elif s["eta_s"] is not None:
        lines.append(f"ETA        {_duration(s['eta_s'])} of training at the recent speed "
                     f"(~{_when(now + s['eta_s'])}, queue waits not included)")
    if s["checkpoints"]:
        c = s["checkpoints"][0]
        lines.append(f"checkpoint {c['name']}, written {_duration(c['age_s'])} ago ({_size(c['bytes'])})"
                     + (f"; {len(s['checkpoints'])} in the folder" if len(s["checkpoints"]) > 1 else ""))
    else:
        lines.append("checkpoint none yet")
    n = len(s["starts"])
    lines.append(f"starts     {n} ({max(n - 1, 0)} restarts); job ids: {', '.join(s['job_ids']) or '-'}")
    if s["unrecorded_starts"]:
        lines.append(f"           and {s['unrecorded_starts']} start(s) requeued before the trainer recorded them")
    for st in s["starts"][-10:]:
        where = (f"resumed from {Path(st['resumed_from']).name} at step {st['resumed_step']}"
                 if st["resumed_from"] else "fresh start")
        why = f"; previous stop: {st['last_stop_reason']}" if st["last_stop_reason"] else ""
        job = f"job {st['job_id']}" + (f" restart {st['restart_count']}" if st["restart_count"] not in (None, "")
                                       else "") if st["job_id"] else "no SLURM job"
        lines.append(f"  {_when(st['time'])}  {job} on {st['host'] or '?'}: {where}{why}")
    if n > 10:
        lines.append(f"  ... {n - 10} earlier starts in restarts.jsonl")
    if s.get("torchrun"):
        t = s["torchrun"]
        lines.append(f"ranks      exit codes {t['exit_codes']} (torchrun): {t['decision']}, {t['reason']}")
    if s["requeues"]:
        by = {}
        for r in s["requeues"]:
            by[r["by"] or "?"] = by.get(r["by"] or "?", 0) + 1
        lines.append("requeues   " + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())))
    return "\n".join(lines)


def summary_line(s: dict) -> str:
    """One line per run, for `m2das status RUNS_DIR`."""
    parts = [s["state"]]
    if s["step"] is not None:
        pct = f" ({100.0 * s['step'] / s['total_steps']:.1f}%)" if s["total_steps"] else ""
        parts.append(f"step {s['step']}" + (f"/{s['total_steps']}" if s["total_steps"] else "") + pct)
    if s["checkpoints"]:
        c = s["checkpoints"][0]
        parts.append(f"checkpoint {c['name']} {_duration(c['age_s'])} ago")
    if s.get("error"):
        parts.append(s["error"]["line"])
    return f"{Path(s['run_dir']).name}  " + "; ".join(parts)


def is_run_folder(path: Path) -> bool:
    return any((path / n).exists() for n in runfolder.MARKER_FILES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="m2das status", description="Progress of a run folder, or one line per run "
                                "of a folder of runs; with SLURM's squeue/sacct on PATH also the job's state, "
                                "pending reason, nodes and time left.",
                                epilog=f"exit codes: 0 shown; 2 not a run folder; {runfolder.EXIT_RESUMABLE} the "
                                "object store did not answer (ask again later)",
                                formatter_class=DefaultsFormatter)
    p.add_argument("run_dir", help="the run folder (the launcher prints it; --output_dir of m2das train), "
                   "or a folder of run folders (e.g. runs/)")
    p.add_argument("--json", action="store_true", help="print the collected fields as JSON")
    p.add_argument("--no-queue", "--no_queue", action="store_true", help="do not ask squeue/sacct")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not is_url(args.run_dir):
        return show(args, Path(args.run_dir), None)
    try:  # object storage: a copy of its small files (removed after), the bucket's checkpoint listing
        with remote.reading_copy(args.run_dir, checkpoints=False) as folder:
            listing = folder.checkpoints()
            for warning in folder.warnings:
                print(f"m2das status: warning: {warning}", file=sys.stderr)
            return show(args, folder.staging, listing)
    except remote.StoreUnavailable as e:
        print(f"m2das status: {e}; ask again later (exit {runfolder.EXIT_RESUMABLE})", file=sys.stderr)
        return runfolder.EXIT_RESUMABLE
    except remote.RemoteError as e:
        print(f"m2das status: error: {e}", file=sys.stderr)
        return runfolder.EXIT_BAD_INPUT


def show(args, run: Path, listing) -> int:
    """Print one run folder, or one line per run of a folder of runs (`listing`: a bucket's checkpoints)."""
    try:
        return _show(args, run, listing)
    except PermissionError as e:  # another user's run folder, or a folder on the way to it
        print(f"m2das status: error: cannot read {e.filename or run} ({e.strerror}); status needs read access "
              f"to the run folder: ask its owner (chmod -R a+rX), or run status as them", file=sys.stderr)
        return runfolder.EXIT_BAD_INPUT


def _show(args, run: Path, listing) -> int:
    if not run.is_dir():
        print(f"m2das status: error: {run} is not a folder; pass the run folder the launcher printed",
              file=sys.stderr)
        return 2
    runs = [run] if is_run_folder(run) else sorted(d for d in run.iterdir() if d.is_dir() and is_run_folder(d))
    if not runs:
        print(f"m2das status: error: {run} has no config.json, log.jsonl or launcher.jsonl, nor run folders "
              "that have; is it a run folder?", file=sys.stderr)
        return 2
    shown = [collect(r, queue=not args.no_queue, checkpoints=listing) for r in runs]
    if runs == [run]:
        shown[0]["run_dir"] = args.run_dir
    try:
        if args.json:
            print(json.dumps(shown[0] if runs == [run] else shown, indent=2, sort_keys=True), flush=True)
        else:
            print(render(shown[0]) if runs == [run] else "\n".join(summary_line(s) for s in shown), flush=True)
    except BrokenPipeError:  # `m2das status RUN | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
