"""The one requeue policy: how a start of the trainer ended and what happens next.

Every launcher route asks `decide` and nothing else: the submitit job
(`launch/submit.py`, in `TrainJob.checkpoint` and after the trainer returns),
the SIGKILL/OOM teardown of the submitit batch script, the local supervisor,
and the sbatch templates (`slurm/m2das-common.sh`, through
`python -m m2das.cluster.requeue decide ...`). The defaults below are declared here
only; the sbatch templates' `#SBATCH --signal` line is held to them by a test.

Torch-free: launchers and batch scripts import it on login nodes.
"""

import datetime
import os
import signal
import sys
from pathlib import Path

from m2das import runfolder
from m2das.cliargs import DefaultsFormatter, Parser
from m2das.fileio import append_jsonl, read_jsonl
from m2das.machine import master_port  # the one MASTER_PORT rule, for `port`
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE
from m2das.runfolder import record_task_exit  # noqa: F401  (the launchers' name for it)

# -- defaults, declared once ----------------------------------------------------------
# The warning SLURM sends before the time limit, on both routes (submitit and the
# templates): USR2, because submitit requeues on USR2 and ignores USR1, so one
# signal serves both; 120 s leaves a ViT-B full state (~1.7 GB) time to be written
# at the next optimizer step on a slow shared file system.
SIGNAL = "USR2"
LEAD_S = 120
MAX_REQUEUES = 100  # restarts of one job (SLURM_RESTART_COUNT) or local supervisor before giving up

# -- decisions --------------------------------------------------------------------------
FINISHED = "finished"      # every rank exited 0: nothing to do
DIVERGED = "diverged"      # loss or weights non-finite: a rerun fails the same way
FAILED = "failed"          # an error a rerun cannot fix (bad input, a crash): look at the logs
REQUEUE = "requeue"        # stopped resumably or killed: start again from the newest checkpoint
CAP = "requeue_cap"        # would requeue, but the cap is reached
STOPPED = "stopped"        # stopped on the user's request: resumable, but not restarted
# The launcher's exit code for each decision (the trainer's codes, see runfolder.EXIT_CODES).
EXIT_FOR = {FINISHED: EXIT_OK, DIVERGED: EXIT_DIVERGED, FAILED: 1, REQUEUE: EXIT_RESUMABLE,
            CAP: EXIT_RESUMABLE, STOPPED: EXIT_RESUMABLE}
SIGKILL_CODES = (-9, 128 + 9)  # a rank's own -9, or a shell's/srun's 137


class Decision(tuple):
    """(action, reason): `action` is one of the names above, `reason` a phrase for logs."""

    def __new__(cls, action, reason):
        return super().__new__(cls, (action, reason))

    action = property(lambda self: self[0])
    reason = property(lambda self: self[1])


def killed(code: int) -> bool:
    """Ended by a signal: negative from Popen, or 128+N from a shell or srun."""
    return code < 0 or 128 < code < 160


def decide(codes, restart_count: int, max_requeues: int = MAX_REQUEUES, *, signalled: bool = False,
           last_event: str | None = None, stop_requested: bool = False) -> Decision:
    """What to do after one start of the trainer.

    codes: the exit code of every rank (or srun's one code); restart_count: the
    restarts already made; signalled: a stop signal reached the job (preemption,
    time limit); last_event: the trainer's last event in restarts.jsonl for this
    start, which beats a code when srun --kill-on-bad-exit killed a slower rank;
    stop_requested: the user asked to stop (SIGTERM/Ctrl-C to the supervisor).

    Exit 2 (bad input, a run folder held by another trainer) and 3 (diverged) are
    never requeued: a rerun fails the same way.
    """
    codes = [int(c) for c in codes]
    if last_event == runfolder.EVENT_FINISHED or (codes and all(c == EXIT_OK for c in codes)):
        return Decision(FINISHED, "training finished")
    if last_event == runfolder.EVENT_DIVERGED or EXIT_DIVERGED in codes:
        return Decision(DIVERGED, f"loss diverged (exit {EXIT_DIVERGED}); not requeued")
    if EXIT_BAD_INPUT in codes:
        return Decision(FAILED, f"bad input or run folder refused (exit {EXIT_BAD_INPUT}); not requeued")
    # A rank killed by a signal makes the whole start resumable: the others fail
    # on the broken collective as a consequence (exit 1).
    resumable = (signalled or last_event == runfolder.EVENT_STOPPED or any(killed(c) for c in codes)
                 or (codes and all(c in (EXIT_OK, EXIT_RESUMABLE) for c in codes)))
    if not resumable:
        return Decision(FAILED, f"a rank failed with exit codes {codes}; not requeued")
    why = ("killed (SIGKILL: out of memory or kill -9)" if any(c in SIGKILL_CODES for c in codes)
           else "killed by a signal" if any(killed(c) for c in codes)
           else f"stopped resumably (exit {EXIT_RESUMABLE})")
    if stop_requested:
        return Decision(STOPPED, f"{why} on request; not restarted")
    if restart_count >= max_requeues:
        return Decision(CAP, f"{why}, but {restart_count} restarts reached --max-requeues {max_requeues}; "
                             "not requeued")
    return Decision(REQUEUE, f"{why}; requeued to resume from the newest checkpoint")


# -- records ------------------------------------------------------------------------
def start_events(run_dir, **match) -> list:
    """The trainer's events (restarts.jsonl) after its last start record.

    With `match` (e.g. job_id=..., restart_count=... or pid=...), only when that
    start record is the start in question: a start that died before recording
    itself must not inherit the previous start's "stopped".
    """
    rows = read_jsonl(Path(run_dir) / runfolder.RESTARTS)
    starts = [i for i, r in enumerate(rows) if r.get("event") == runfolder.EVENT_START]
    if not starts:
        return []
    start = rows[starts[-1]]
    if any(str(start.get(k)) != str(v) for k, v in match.items()):
        return []
    return rows[starts[-1] + 1:]


def last_event(run_dir, **match) -> str | None:
    events = start_events(run_dir, **match)
    return events[-1].get("event") if events else None


def start_id(job_id, restart_count) -> str:
    return f"{job_id}.{restart_count}"


def already_decided(run_dir, job_id, restart_count) -> bool:
    """Did a route already record a decision for this start (e.g. submitit's checkpoint())?"""
    sid = start_id(job_id, restart_count)
    return any(r.get("start_id") == sid for r in read_jsonl(Path(run_dir) / runfolder.LAUNCHER))


# srun and torchrun return one code for all tasks: each task leaves its own (runfolder.TASK_EXITS).
def task_exits_dir(run_dir) -> Path:
    return runfolder.task_exits_dir(run_dir)


def task_exits(run_dir, job_id, restart_count) -> list:
    """The exit codes the tasks of one start recorded (those that lived to record one)."""
    codes = []
    for path in sorted(task_exits_dir(run_dir).glob(f"{start_id(job_id, restart_count)}.*")):
        try:
            codes.append(int(path.read_text()))
        except (OSError, ValueError):
            pass
    return codes


def torchrun_codes(run_dir, torchrun_code: int, since: float | None = None):
    """(codes, group, rank 0's pid) of the newest torchrun start whose ranks left exit records. Records
    written before `since` (default: the trainer's last start record) are an earlier start's and do not
    count. A rank of its world that left none was killed (SIGKILL, out of memory): it counts as -9.
    No records: torchrun's own code alone."""
    group, rows = runfolder.torchrun_exits(run_dir)
    if since is None:
        starts = [r.get("time") for r in read_jsonl(Path(run_dir) / runfolder.RESTARTS)
                  if r.get("event") == runfolder.EVENT_START and isinstance(r.get("time"), (int, float))]
        since = starts[-1] if starts else None
    rows = [r for r in rows if since is None or (r.get("time") or 0) >= since]
    if not rows:
        return [int(torchrun_code)], None, None
    world = max(int(r.get("world") or 1) for r in rows)
    codes = [int(r["code"]) for r in rows] + [SIGKILL_CODES[0]] * max(world - len(rows), 0)
    return codes, group, next((r.get("pid") for r in rows if r.get("rank") == 0), None)


def decide_torchrun(run_dir, torchrun_code: int, restart_count: int, max_requeues: int = MAX_REQUEUES, *,
                    signalled: bool = False, since: float | None = None):
    """The decision after `torchrun ... -m m2das train`: from what its ranks recorded, not from its own
    code (1 both for a clean stop and for a killed rank). Returns (Decision, codes, group)."""
    codes, group, pid = torchrun_codes(run_dir, torchrun_code, since)
    events = start_events(run_dir, pid=pid) if pid else []
    # Ctrl-C reaches torchrun's ranks from the terminal: the user's stop, saved, and not to be restarted.
    by_user = any(r.get("event") == runfolder.EVENT_STOPPED and r.get("signal") == signal.SIGINT.name for r in events)
    return decide(codes, restart_count, max_requeues, signalled=signalled, stop_requested=by_user,
                  last_event=events[-1].get("event") if events else None), codes, group


def record(run_dir, decision: Decision, by: str, job_id, restart_count, **extra) -> None:
    """One line in RUN/launcher.jsonl: the event is the decision's action."""
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "event": decision.action, "by": by, "job_id": str(job_id), "restart_count": int(restart_count),
           "start_id": start_id(job_id, restart_count), "message": decision.reason, **extra}
    append_jsonl(Path(run_dir) / runfolder.LAUNCHER, row)


# -- command line, for the sbatch templates -----------------------------------------
def _cli(argv) -> int:
    p = Parser(
        prog="python -m m2das.cluster.requeue",
        description="The requeue policy for batch scripts. `decide` prints one word (requeue, requeue_cap, "
                    "finished, diverged, failed, stopped) and records it in RUN/launcher.jsonl; `task-exit` "
                    "records one task's exit code for it; `port` prints "
                    "MASTER_PORT for SLURM_JOB_ID and SLURM_RESTART_COUNT; `defaults` prints SIGNAL LEAD_S "
                    "MAX_REQUEUES.",
        formatter_class=DefaultsFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decide", help="decide after srun returned")
    d.add_argument("--run", required=True, help="the run folder")
    d.add_argument("--by", default="sbatch-template", help="who asks (recorded)")
    d.add_argument("--job-id", "--job_id", default=os.environ.get("SLURM_JOB_ID", ""))
    d.add_argument("--restart", type=int, default=int(os.environ.get("SLURM_RESTART_COUNT") or 0))
    d.add_argument("--max-requeues", "--max_requeues", default="",
                   help=f"empty: {MAX_REQUEUES}")
    d.add_argument("--signalled", action="store_true", help="a stop signal reached the batch shell")
    d.add_argument("--once", action="store_true",
                   help="say `decided` and record nothing when this start already has a decision")
    d.add_argument("--torchrun", action="store_true",
                   help="CODES is torchrun's exit code: decide from the codes its ranks recorded in the run folder "
                        "(a rank that recorded none was killed), as torchrun says 1 for a clean stop too")
    d.add_argument("codes", nargs="+", type=int, help="exit codes (srun's); the tasks' recorded ones are added")
    t = sub.add_parser("task-exit", help="record one task's exit code (SLURM_PROCID) for `decide`")
    t.add_argument("--run", default=os.environ.get("M2DAS_RUN", ""), help="the run folder (default $M2DAS_RUN)")
    t.add_argument("code", type=int)
    sub.add_parser("port", help="MASTER_PORT of this start")
    sub.add_parser("defaults", help="SIGNAL LEAD_S MAX_REQUEUES")
    args = p.parse_args(argv)
    if args.cmd == "port":
        print(master_port(os.environ.get("SLURM_JOB_ID", "0"), os.environ.get("SLURM_RESTART_COUNT") or 0))
        return 0
    if args.cmd == "task-exit":
        if args.run:
            record_task_exit(args.run, os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT") or 0,
                             os.environ.get("SLURM_PROCID", 0), args.code)
        return 0
    if args.cmd == "defaults":
        print(SIGNAL, LEAD_S, MAX_REQUEUES)
        return 0
    if args.once and already_decided(args.run, args.job_id, args.restart):
        print("decided")
        return 0
    try:
        cap = int(args.max_requeues) if str(args.max_requeues).strip() else MAX_REQUEUES
    except ValueError:
        print(f"python -m m2das.cluster.requeue: error: --max-requeues {args.max_requeues!r}: expected a whole number",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.torchrun:
        decision, codes, group = decide_torchrun(args.run, args.codes[0], args.restart, cap, signalled=args.signalled)
    else:
        codes, group = args.codes + task_exits(args.run, args.job_id, args.restart), None
        decision = decide(codes, args.restart, cap, signalled=args.signalled,
                          last_event=last_event(args.run, job_id=args.job_id, restart_count=args.restart))
    record(args.run, decision, args.by, args.job_id, args.restart, exit_codes=codes)
    if group:  # decided: the next start's records must not be mixed with these
        for path in task_exits_dir(args.run).glob(f"{group}.*"):
            path.unlink(missing_ok=True)
    print(f"m2das: job {args.job_id} restart {args.restart}: {decision.reason}", file=sys.stderr)
    print(decision.action)
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
