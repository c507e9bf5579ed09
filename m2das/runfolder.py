"""The run-folder contract: file names, event names, exit codes and the one-trainer lock.

Everything that reads or writes a run folder (the trainer, the checkpointer,
`m2das status`, the launchers, the sbatch templates through
`python -m m2das.runfolder`) takes these facts from here, so a name changes in
one place. Torch-free on purpose: status and the launchers import it on login
nodes.
"""

import contextlib
import json
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from m2das.fileio import read_jsonl

# -- exit codes of `m2das train` (and of the launchers that wrap it) ---------------
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad input, configuration or run folder: rerunning cannot help, never requeued
EXIT_DIVERGED = 3  # weights or loss became non-finite: rerunning fails the same way, never requeued
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: saved (or nothing lost) and stopped; rerun the same command to resume
EXIT_CODES = {EXIT_OK: "finished", EXIT_BAD_INPUT: "bad input or run folder (not requeued)",
              EXIT_DIVERGED: "diverged (not requeued)", EXIT_RESUMABLE: "stopped, resumable (requeued)"}

# -- file names inside RUN/ ---------------------------------------------------------
CONFIG = "config.json"
CLASSES = "classes.json"
NORM_STATS = "norm_stats.json"
VALIDATED = "validated.json"
LAST = "last.pth"
PREVIOUS = "last.prev.pth"
LOG = "log.jsonl"
RESTARTS = "restarts.jsonl"
LAUNCHER = "launcher.jsonl"
EVENTS_DIR = "events"
LOGS_DIR = "logs"
LOCK = "trainer.lock"
EPOCH_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")
# Temporaries of fileio.atomic_write (".NAME.RANDOM.tmp") and the hard link made
# before last.pth is replaced; a kill mid-write leaves them behind.
TEMPORARY_RE = re.compile(r"^\..+\.tmp$|^\.last\.prev\.pth\.link$")
MARKER_FILES = (CONFIG, LAUNCHER, RESTARTS, LOG)  # any of them makes a folder a run folder
# Appended to or written into (never replaced whole): a symbolic link planted under one of these
# names is refused (fileio.refuse_links), as writing through it would change a file elsewhere.
WRITTEN_IN_PLACE = (LOG, RESTARTS, LAUNCHER, EVENTS_DIR, LOGS_DIR)

# -- events in restarts.jsonl (the trainer's) and launcher.jsonl (submit, a job's start, requeue's decisions) --
EVENT_START = "start"  # a trainer's start; in launcher.jsonl, a job's or attempt's start
EVENT_SUBMIT = "submit"  # launcher.jsonl: a job sent to SLURM or this machine (`m2das submit`)
EVENT_STOPPED = "stopped"
EVENT_DIVERGED = "diverged"
EVENT_FINISHED = "finished"
EVENT_SAVE_FAILED = "save_failed"
EVENT_CONFIG_CHANGED = "config_changed"
EVENT_CHECKPOINT_SKIPPED = "checkpoint_skipped"  # a checkpoint that did not load; an older one was resumed

# -- what a launcher tells the ranks it starts --------------------------------------
# The restart count (0 first) a launcher sets where SLURM_RESTART_COUNT is not: recorded in the start event,
# and why a stop's line says the launcher resumes. Shell: `python -m m2das.runfolder LAUNCHER_ATTEMPT_ENV`.
LAUNCHER_ATTEMPT_ENV = "M2DAS_LAUNCHER_ATTEMPT"


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth"


def saved_epochs(names) -> list:
    """The epochs E of the `checkpoint-E.pth` among file names or paths (a folder listing, a bucket's)."""
    return [int(m.group(1)) for m in (EPOCH_CHECKPOINT_RE.match(Path(n).name) for n in names) if m]


def checkpoint_files(run_dir) -> list:
    """Every checkpoint file of a run folder (rolling and per-epoch), in no particular order."""
    run_dir = Path(run_dir)
    found = [run_dir / n for n in (LAST, PREVIOUS) if (run_dir / n).exists()]
    with contextlib.suppress(OSError):
        found += [p for p in run_dir.iterdir() if EPOCH_CHECKPOINT_RE.match(p.name)]
    return found


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def fallback_cost(run_dir, name: str, resumed_step: int) -> dict:
    """What resuming at `resumed_step` instead of checkpoint `name` (which cannot be read) costs, as far as
    the run folder recorded it: the step `name` was saved at (an epoch checkpoint's epoch x steps per
    epoch; last.pth's from the stop that wrote it, when nothing was logged past it), else the step the log
    reached. Returns step, steps_lost, logged_step (None where unknown) and `cost`, a phrase for the warning."""
    run_dir = Path(run_dir)
    logged = max((r["step"] for r in read_jsonl(run_dir / LOG) if isinstance(r.get("step"), int)), default=None)
    step, source = None, ""
    epoch = saved_epochs([name])
    per_epoch = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        per_epoch = json.loads((run_dir / CONFIG).read_text()).get("steps_per_epoch")
    if epoch and isinstance(per_epoch, int) and per_epoch > 0:
        step, source = epoch[0] * per_epoch, f"epoch {epoch[0]} x {per_epoch} steps"
    elif name == LAST:
        stops = [r["step"] for r in read_jsonl(run_dir / RESTARTS)
                 if r.get("event") == EVENT_STOPPED and isinstance(r.get("step"), int)]
        if stops and (logged is None or logged <= stops[-1]):
            step, source = stops[-1], f"the stop recorded in {RESTARTS}"
    if step is not None:
        lost = max(step - resumed_step, 0)
        cost = f"it was saved at step {step} ({source}): {_steps(lost)} trained again"
    elif logged is not None and logged > resumed_step:
        lost = None
        cost = f"its step is unknown; {LOG} reached step {logged}: up to {_steps(logged - resumed_step)} trained again"
    else:
        lost, cost = None, "its step is unknown"
    return {"step": step, "steps_lost": lost, "logged_step": logged, "cost": cost}


def final_weights(run_dir, epochs: int) -> Path:
    return Path(run_dir) / epoch_checkpoint_name(epochs)


# -- run-folder names: the convention the published runtime and EVAR parse sizes from --------
# `{model}-{F}x{T}p{pf}x{pt}p16k-{date}-{tag}`: they read the model name, input size and
# patch size from the weight file's parent folder.
_FOLDER_RE = re.compile(r"^(?P<model>[^-]+)-(?P<f>\d+)x(?P<t>\d+)p(?P<pf>\d+)x(?P<pt>\d+)(?:p(?P<sr>\d+k))?(?:-|$)")


# The weight keys they keep: the encoder's (the runtime's loader also reads the AudioSet head's shape).
ENCODER_KEYS = ("cls_token", "pos_embed", "norm_stats")
ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")
HEAD_PREFIX = "offline_predictor."


def parse_folder_name(name: str) -> dict | None:
    """`m2d_as_vit_base-80x608p16x16p16k-...` -> model, input_size, patch_size, sr; None if it does not parse."""
    m = _FOLDER_RE.match(name)
    if not m:
        return None
    return {"model": m["model"], "input_size": [int(m["f"]), int(m["t"])],
            "patch_size": [int(m["pf"]), int(m["pt"])], "sr": m["sr"] or "16k"}


def folder_name(model: str, input_size, patch_size, date: str, tag: str) -> str:
    (f, t), (pf, pt) = input_size, patch_size
    return f"{model}-{f}x{t}p{pf}x{pt}p16k-{date}-{tag}"


# -- the lock: one trainer per run folder -------------------------------------------
# flock/fcntl locks are unreliable on NFS and Lustre, so the lock is a file made by
# a hard link (atomic on every POSIX file system, NFS included) and kept fresh by a
# heartbeat (its modification time). A holder that died without cleaning up is
# recognised three ways: the same SLURM job id (a requeued job takes over at once),
# the same host with the pid gone, or a heartbeat older than the staleness setting.
# The holder checks at every heartbeat that the lock still names it: one removed or
# taken by another trainer stops it resumably (its on_lost callback, the stop path).
LOCK_HEARTBEAT_ENV = "M2DAS_LOCK_HEARTBEAT_S"  # seconds between heartbeats (tests shorten it)
LOCK_STALE_ENV = "M2DAS_LOCK_STALE_S"  # seconds without heartbeat after which a holder counts as dead
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_STALE_S = 600.0
MIN_STALE_HEARTBEATS = 3  # a live holder that misses a beat or two (a slow NFS) must not be taken over
LOCK_LOST_GRACE_S = 120.0  # a holder that lost its lock has this long after its next heartbeat to save and go


class RunLocked(Exception):
    """Another live trainer holds the run folder."""


class LockSettingError(RunLocked, ValueError):
    """M2DAS_LOCK_STALE_S / M2DAS_LOCK_HEARTBEAT_S cannot keep one trainer per folder; one line."""


def _seconds_setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise LockSettingError(f"{name}={raw!r}: expected a positive number of seconds (the run lock cannot be "
                               f"switched off); unset it for the default {default:g}")
    return value


def lock_timing() -> tuple:
    """(heartbeat, staleness) in seconds, read at each use so a bad value is one line where it matters."""
    beat = _seconds_setting(LOCK_HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)
    stale = _seconds_setting(LOCK_STALE_ENV, DEFAULT_STALE_S)
    if stale < MIN_STALE_HEARTBEATS * beat:
        raise LockSettingError(f"{LOCK_STALE_ENV}={stale:g}: must be at least {MIN_STALE_HEARTBEATS} heartbeats "
                               f"({MIN_STALE_HEARTBEATS * beat:g} s with {LOCK_HEARTBEAT_ENV}={beat:g}), or a live "
                               f"trainer could be taken over; raise it or unset it for the default "
                               f"{DEFAULT_STALE_S:g}")
    return beat, stale


def stale_after_s() -> float:
    return lock_timing()[1]


def holder_record() -> dict:
    """Who takes a lock: written into it so a refused trainer can name the holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.time(), "token": uuid.uuid4().hex}


def read_lock(run_dir):
    """(holder dict, heartbeat age in seconds) or (None, None) when nobody holds the folder."""
    path = Path(run_dir) / LOCK
    try:
        age = time.time() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):  # torn or unreadable: a holder we know nothing of, judged by its age
        holder = {}
    return (holder if isinstance(holder, dict) else {}), age


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def stale_reason(holder: dict, age: float, job_id=None, host=None) -> str | None:
    """Why a recorded holder no longer counts (None: it is alive as far as we can tell)."""
    host = host or socket.gethostname()
    stale_s = stale_after_s()
    if job_id and holder.get("job_id") and str(holder["job_id"]) == str(job_id):
        return f"same SLURM job {job_id} (requeued)"
    if holder.get("host") == host and holder.get("pid") and not _pid_alive(holder["pid"]):
        return f"pid {holder['pid']} is gone"
    if age is not None and age > stale_s:
        return f"no heartbeat for {age:.0f} s (> {stale_s:.0f} s, {LOCK_STALE_ENV})"
    return None


def describe(holder: dict, age: float | None = None) -> str:
    if not holder:  # an empty or garbled lock: nothing to name but its age
        return "an unreadable lock" + (f", written {age:.0f} s ago" if age is not None else "")
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    beat = f", heartbeat {age:.0f} s ago" if age is not None else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}{beat}"


def locked_message(where, holder: dict, age) -> str:
    return (f"{where} is in use by another trainer ({describe(holder, age)}); wait for it, cancel it, or use "
            f"another --output_dir. A holder that died without cleaning up is ignored after {stale_after_s():.0f} "
            f"s without heartbeat ({LOCK}, {LOCK_STALE_ENV})")


def live_holder(run_dir, job_id=None):
    """A description of the live trainer holding `run_dir`, or None (free or stale). For launchers."""
    holder, age = read_lock(run_dir)
    if holder is None or stale_reason(holder, age, job_id=job_id) is not None:
        return None
    return describe(holder, age)


def lost_reason(holder, token: str, where) -> str | None:
    """Why a holder's lock is no longer its own (None: it still is); `holder` as read back, None if absent."""
    if holder is None:
        return f"{where} was removed"
    if holder.get("token") != token:
        return f"{where} now names another trainer ({describe(holder)})"
    return None


def unfinished_trainer(run_dir, me: dict, heartbeat_s: float):
    """The trainer restarts.jsonl says may still train here without the lock (removed under it), or None.

    Its last start has no end row and: on this host its pid lives; elsewhere the folder changed within
    two heartbeats. Such a trainer stops at its next heartbeat; a newcomer waits for it (wait_for_unfinished).
    """
    run_dir = Path(run_dir)
    ends = (EVENT_STOPPED, EVENT_FINISHED, EVENT_DIVERGED)
    rows = [r for r in read_jsonl(run_dir / RESTARTS) if r.get("event") in ends + (EVENT_START,)]
    if not rows or rows[-1].get("event") != EVENT_START:
        return None
    start = rows[-1]
    if start.get("host") == me["host"]:
        pid = start.get("pid")
        return start if isinstance(pid, int) and pid != me["pid"] and _pid_alive(pid) else None
    changed = 0.0
    for name in (LOG, RESTARTS, LAST):
        with contextlib.suppress(OSError):
            changed = max(changed, (run_dir / name).stat().st_mtime)
    return start if time.time() - changed < 2 * heartbeat_s else None


def wait_for_unfinished(run_dir, me: dict, heartbeat_s: float, say=None) -> str | None:
    """Wait (holding the lock) until a trainer that lost its lock has stopped; what was waited for, if any."""
    start = unfinished_trainer(run_dir, me, heartbeat_s)
    if start is None:
        return None
    who = f"host {start.get('host', '?')}, pid {start.get('pid', '?')}"
    say = say or (lambda line: print(f"m2das: {line}", flush=True))
    say(f"{run_dir}: a trainer ({who}) still runs here without the lock; waiting for it to stop at its next "
        f"heartbeat before training")
    patience = 2 * heartbeat_s + LOCK_LOST_GRACE_S
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        time.sleep(min(1.0, heartbeat_s / 4))
        if unfinished_trainer(run_dir, me, heartbeat_s) is None:
            return f"waited for {who} to stop"
    say(f"warning: {run_dir}: {who} did not stop within {patience:.0f} s of losing the lock; "
                   f"going on (its pid may belong to another program now)")
    return f"{who} did not stop"


class LockWatch:
    """What a lock holder does once its heartbeat finds the lock gone or another's: tell the trainer once."""

    lost = None  # why the lock stopped being ours, once a heartbeat saw it
    _on_lost = None

    def on_lost(self, callback) -> None:
        """Call `callback(reason)` when the lock is lost (at once if it already is): the trainer's stop path."""
        self._on_lost = callback
        if self.lost is not None:
            callback(self.lost)

    def _lose(self, why: str) -> None:
        self.lost = why
        if self._on_lost is not None:
            self._on_lost(why)
        else:
            print(f"m2das: warning: the run lock was lost: {why}", file=sys.stderr, flush=True)


class RunLock(LockWatch):
    """Held by rank 0 for a trainer's whole life; a second trainer gets RunLocked at once."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.me = holder_record()
        self.took_over = None
        self._stop = threading.Event()
        self._thread = None
        self.heartbeat_s = DEFAULT_HEARTBEAT_S

    def acquire(self) -> "RunLock":
        self.heartbeat_s, _ = lock_timing()  # a bad setting is refused before anything is touched
        self.run_dir.mkdir(parents=True, exist_ok=True)
        broken = False
        for _ in range(5):
            if self._try_link():
                self._start_heartbeat()
                try:
                    if not broken:  # a lock just broken as stale has judged its holder gone already
                        wait_for_unfinished(self.run_dir, self.me, self.heartbeat_s)
                except BaseException:
                    self.release()
                    raise
                return self
            holder, age = read_lock(self.run_dir)
            if holder is None:
                continue  # released between our link and our read: try again
            why = stale_reason(holder, age, job_id=self.me["job_id"], host=self.me["host"])
            if why is None:
                raise RunLocked(locked_message(self.run_dir, holder, age))
            self._break(holder, why)
            broken = True
        raise RunLocked(f"{self.path}: could not take the lock after repeated races with another trainer")

    def _try_link(self) -> bool:
        tmp = self.run_dir / f".{LOCK}.{self.me['token']}.tmp"
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: exclusive create is the next best thing.
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _break(self, holder: dict, why: str) -> None:
        """Move a stale lock aside; if a live one slipped in meanwhile, put it back."""
        aside = self.run_dir / f".{LOCK}.stale.{self.me['token']}.tmp"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        with contextlib.suppress(OSError, ValueError):
            moved = json.loads(aside.read_text())
            if moved.get("token") != holder.get("token"):
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                aside.unlink()
                return
        self.took_over = f"{describe(holder)}: {why}"
        with contextlib.suppress(OSError):
            aside.unlink()

    def _check(self) -> str | None:
        """One heartbeat: the lock still names us (then refresh it), or why it does not."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            holder = None
        except OSError:
            return None  # a file-system hiccup: the next beat looks again
        except ValueError:
            holder = {}
        why = lost_reason(holder if isinstance(holder, dict) or holder is None else {}, self.me["token"], self.path)
        if why is None:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                why = f"{self.path} was removed"
            except OSError:
                pass
        return why

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                why = self._check()
                if why is not None:
                    self._lose(why)
                    return

        self._thread = threading.Thread(target=beat, name="m2das-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        holder, _ = read_lock(self.run_dir)
        if holder is not None and holder.get("token") == self.me["token"]:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# -- each rank's exit code: srun and torchrun report one code for all ranks ----------------
# srun says 137/143 once one task exits 2 and it kills the others; torchrun says 1 both for a clean
# stop (every rank 75) and for a killed rank. Each rank therefore leaves its own code under
# RUN/logs/task-exits/ (SLURM: JOB.RESTART.RANK; torchrun: torchrun.RUN_ID.RESTART.RANK), and the
# requeue policy (m2das.cluster.requeue) decides from those.
TASK_EXITS = "task-exits"
TORCHRUN_PREFIX = "torchrun."
TORCHRUN_RUN_ID_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every rank it starts


def task_exits_dir(run_dir) -> Path:
    return Path(run_dir) / LOGS_DIR / TASK_EXITS


def record_task_exit(run_dir, job_id, restart_count, rank, code) -> None:
    folder = task_exits_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_id}.{restart_count}.{int(rank)}").write_text(f"{int(code)}\n")


def record_torchrun_exit(run_dir, code: int, environ=None) -> bool:
    """A rank started by torchrun leaves its exit code, rank, world size and pid (True when it did)."""
    environ = os.environ if environ is None else environ
    run_id = environ.get(TORCHRUN_RUN_ID_ENV)
    if not run_id or not Path(run_dir).is_dir():
        return False
    group = f"{TORCHRUN_PREFIX}{re.sub(r'[^A-Za-z0-9_-]', '_', run_id)}.{environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    rank = int(environ.get("RANK", 0))
    folder = task_exits_dir(run_dir)
    with contextlib.suppress(OSError):  # a record is an aid to the requeue decision, never a reason to fail
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{group}.{rank}").write_text(json.dumps(
            {"code": int(code), "rank": rank, "world": int(environ.get("WORLD_SIZE", 1)), "pid": os.getpid(),
             "time": time.time()}) + "\n")
        return True
    return False


def torchrun_exits(run_dir) -> tuple:
    """(group, records) of the newest torchrun start that left exit records, or (None, [])."""
    groups = {}
    with contextlib.suppress(OSError):
        for path in task_exits_dir(run_dir).glob(f"{TORCHRUN_PREFIX}*"):
            with contextlib.suppress(OSError, ValueError):
                row = json.loads(path.read_text())
                if isinstance(row, dict) and isinstance(row.get("code"), int):
                    groups.setdefault(path.name.rsplit(".", 1)[0], []).append({**row, "path": str(path)})
    if not groups:
        return None, []
    group = max(groups, key=lambda g: max(r.get("time") or 0 for r in groups[g]))
    return group, sorted(groups[group], key=lambda r: r.get("rank", 0))


def print_fact(facts: dict, module: str, example: str, argv=None) -> int:
    """`python -m MODULE NAME`: print a contract's constant for shell scripts; usage and exit 2 otherwise."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not re.fullmatch(r"[A-Z_]+", argv[0]) or argv[0] not in facts:
        print(f"usage: python -m {module} NAME   (a constant of {module.replace('.', '/')}.py, e.g. {example})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    print(facts[argv[0]])
    return 0


def main(argv=None) -> int:
    """`python -m m2das.runfolder NAME`: a run-folder fact for shell scripts (e.g. LAUNCHER, EXIT_RESUMABLE)."""
    return print_fact(globals(), "m2das.runfolder", "LAUNCHER", argv)


if __name__ == "__main__":
    sys.exit(main())
