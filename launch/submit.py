#!/usr/bin/env python3
"""Submit M2D-AS pre-training to SLURM (submitit), a workstation, or run it in-process.

    python launch/submit.py --preset 48gb --cluster slurm --partition gpu -- --epochs 100

Argument rule: the launcher's own flags come first. Everything after a bare
`--`, or else from the first flag the launcher does not know, is passed to the
trainer verbatim and appended after the preset's trainer flags, so it wins
(argparse keeps the last value). `--output_dir` is the exception: the launcher
fixes the run folder at submit time and always passes it itself.

One task per GPU: SLURM starts `gpus_per_node` tasks on every node (or two CPU
ranks for `cpu-test`); each task sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT from submitit's JobEnvironment and calls
`m2das.train.main` in-process, so submitit's signal handler and the trainer's
live in the same process (see the stop/resume protocol in docs).
"""

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from m2das.fileio import append_jsonl  # noqa: E402
from m2das import EXIT_DIVERGED, EXIT_RESUMABLE  # noqa: E402  (75: saved on a signal; 3: loss diverged)

DEFAULT_MAX_REQUEUES = 100

# GPU presets insist on CUDA: a job landing on a node without a visible GPU fails
# at once instead of training on the CPU for weeks.
GPU = ["--device", "cuda"]
# Per-GPU batch x accumulation x GPUs = 2048 in every GPU preset (the paper's
# effective batch, LR 2.4e-3 with blr 3e-4). `ranks` is ranks per node.
PRESETS = {
    # The paper's run: 4 GPUs x 512 per GPU, no accumulation.
    "48gb": dict(ranks=4, gpu=True, batch_size=512, accum_iter=1, trainer=GPU),
    # Half the per-GPU batch fits 24 GB; two accumulation steps keep 2048.
    "24gb": dict(ranks=4, gpu=True, batch_size=256, accum_iter=2, trainer=GPU),
    # 80 GB cards: bounded by the 48gb fit (512 per GPU, accum 1) until a
    # benchmark (`m2das bench train`) shows a larger per-GPU batch fits; with
    # accum already 1 there is nothing to trade for fewer steps on 4 GPUs.
    "80gb": dict(ranks=4, gpu=True, batch_size=512, accum_iter=1, trainer=GPU),
    # Tests: the tiny model on two CPU ranks over gloo, fits a 2-CPU node without GPUs.
    "cpu-test": dict(ranks=2, gpu=False, batch_size=4, accum_iter=1,
                     trainer=["--model", "m2d_as_vit_tiny", "--device", "cpu", "--input_size", "80x208",
                              "--num_workers", "0", "--epochs", "2", "--save_freq", "1",
                              "--warmup_epochs", "1", "--log_every", "1", "--stats_files", "64"]),
}


class UsageError(Exception):
    """A mistake in the command line; printed as one line, exit code 2."""


# ---------------------------------------------------------------- arguments
def build_parser():
    p = argparse.ArgumentParser(
        prog="python launch/submit.py", allow_abbrev=False,
        usage="%(prog)s [launcher flags] [--] [trainer flags]",
        description="Submit M2D-AS pre-training. Trainer flags (everything after `--`, or from "
                    "the first flag the launcher does not know) override the preset's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="48gb",
      help="48gb: 4x512 accum 1 (paper); 24gb: 4x256 accum 2; 80gb: 4x512 accum 1; cpu-test: tiny, 2 CPU ranks")
    a("--cluster", choices=("slurm", "local", "debug"), default="slurm",
      help="slurm: sbatch via submitit; local: detached supervisor on this machine; debug: in-process")
    a("--foreground", action="store_true",
      help="local: run the supervisor in this process until training ends (a container's entry point); "
           "exits 0 finished, 75 stopped, 3 diverged")
    a("--nodes", type=int, default=1, help="nodes; the effective batch stays the preset's")
    a("--gpus-per-node", type=int, default=None, help="ranks per node (default: the preset's)")
    a("--run-dir", default=None,
      help="run folder (default: the trainer's name under --runs-dir, reusing an unfinished run of the same config)")
    a("--runs-dir", default="runs", help="parent of the default run folder")
    a("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
      help="stop requeueing / restarting after this many restarts")
    a("--python", default=None, help="interpreter the job runs (default: this one)")
    a("--dry-run", action="store_true", help="print what would be submitted and exit")
    s = p.add_argument_group("slurm")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--time", default="24:00:00", help="time limit per job start (D-HH:MM:SS, HH:MM:SS or minutes)")
    s.add_argument("--constraint", default=None)
    s.add_argument("--cpus-per-gpu", type=int, default=None,
                   help="CPUs per task (= per GPU); default 10 for GPU presets, 1 for cpu-test")
    s.add_argument("--mem-per-gpu", type=float, default=None, help="GB of host memory per task (default: cluster's)")
    s.add_argument("--mail-user", default=None)
    s.add_argument("--mail-type", default=None, help="e.g. END,FAIL,REQUEUE")
    s.add_argument("--job-name", default=None, help="default m2das-PRESET")
    s.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit that USR2 is sent (time to save a checkpoint)")
    s.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run in the batch script before srun (repeatable), e.g. 'module load cuda'")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option (repeatable), e.g. --sbatch reservation=foo --sbatch exclusive")
    s.add_argument("--srun-args", action="append", default=[], metavar="ARGS",
                   help="extra srun options, shell-split (repeatable; write --srun-args=...), e.g. pyxis: "
                        "--srun-args='--container-image=/path/m2das.sqsh --container-mounts=/data:/data'")
    return p


def split_argv(argv):
    """(launcher argv, trainer argv): split at `--`, else at the first flag the launcher does not know."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    known = set()
    for action in build_parser()._actions:
        known.update(action.option_strings)
    for i, tok in enumerate(argv):
        if tok.startswith("-") and tok.split("=", 1)[0] not in known and not _is_number(tok):
            return argv[:i], argv[i:]
    return argv, []


def _is_number(tok):
    try:
        float(tok)
        return True
    except ValueError:
        return False


def parse_time_minutes(text):
    """SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UsageError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    d, a, b, c = m.groups()
    if d is not None:  # D-HH[:MM[:SS]]
        secs = int(d) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:
        secs = int(a) * 60 + int(b)
    else:
        secs = int(a) * 60
    return max(1, -(-secs // 60))


def scale_batch(batch, accum, preset_ranks, ranks):
    """Keep batch x accum x ranks: per-rank batch never above the preset's (memory), accum minimal.

    Returns (batch, accum, note) where note says what changed.
    """
    effective = batch * accum * preset_ranks
    if ranks == preset_ranks:
        return batch, accum, ""
    for new_accum in range(1, effective + 1):
        per_rank, rem = divmod(effective, ranks * new_accum)
        if rem == 0 and per_rank <= batch:
            note = (f"effective batch {effective} over {ranks} ranks: per-rank batch {batch} -> {per_rank}, "
                    f"accum_iter {accum} -> {new_accum}")
            return per_rank, new_accum, note
        if per_rank == 0:
            break
    raise UsageError(f"effective batch {effective} cannot be split evenly over {ranks} ranks; "
                     f"choose --nodes/--gpus-per-node dividing it, or pass --batch_size/--accum_iter")


def _flag_value(argv, name):
    """Last value of `--name V` / `--name=V` in argv, or None."""
    value = None
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(name + "="):
            value = tok.split("=", 1)[1]
    return value


def _drop_flag(argv, name):
    out, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == name:
            skip = True
            continue
        if tok.startswith(name + "="):
            continue
        out.append(tok)
    return out


class Plan:
    """Everything decided at submit time: ranks, batch split, run folder, trainer argv."""

    def __init__(self, args, user_argv):
        preset = PRESETS[args.preset]
        if args.nodes < 1:
            raise UsageError("--nodes must be at least 1")
        if args.foreground and args.cluster != "local":
            raise UsageError(f"--foreground applies to --cluster local only, not --cluster {args.cluster}")
        if args.srun_args and args.cluster != "slurm":
            raise UsageError(f"--srun-args applies to --cluster slurm only, not --cluster {args.cluster}")
        self.args = args
        self.preset = preset
        self.gpu = preset["gpu"]
        self.ranks_per_node = args.gpus_per_node or preset["ranks"]
        if args.cluster == "debug":
            self.ranks_per_node, nodes = 1, 1
        elif args.cluster == "local":
            nodes = 1
            if args.nodes != 1:
                raise UsageError("--cluster local runs on this machine only; drop --nodes")
        else:
            nodes = args.nodes
        self.nodes = nodes
        self.world_size = nodes * self.ranks_per_node
        if _flag_value(user_argv, "--batch_size") or _flag_value(user_argv, "--accum_iter"):
            batch, accum, self.scale_note = preset["batch_size"], preset["accum_iter"], "batch flags given: not rescaled"
        else:
            batch, accum, self.scale_note = scale_batch(preset["batch_size"], preset["accum_iter"],
                                                        preset["ranks"], self.world_size)
        base = list(preset["trainer"]) + ["--batch_size", str(batch), "--accum_iter", str(accum)]
        user_out = _flag_value(user_argv, "--output_dir")
        user_argv = _drop_flag(user_argv, "--output_dir")
        if args.run_dir and user_out and Path(args.run_dir).resolve() != Path(user_out).resolve():
            raise UsageError("--run-dir and --output_dir disagree; give one of them")
        self.user_argv = user_argv
        self.run_dir = Path(args.run_dir or user_out or self._default_run_dir(base + user_argv)).resolve()
        self.train_argv = base + user_argv + ["--output_dir", str(self.run_dir)]

    def _default_run_dir(self, argv):
        """The trainer's own run name (so `m2das train` reruns find it), else preset + time."""
        try:
            from m2das import config
            cfg = config.parse_args(argv)
            cfg["runs_dir"] = self.args.runs_dir
            return config.default_output_dir(cfg, self.world_size)
        except Exception:  # trainer config unavailable or changed: still a fixed, unique folder
            stamp = datetime.datetime.now().strftime("%y%m%d-%H%M%S")
            return Path(self.args.runs_dir) / f"m2das-{self.args.preset}-{stamp}"


# ---------------------------------------------------------------- job side
def _append_jsonl(path, row):
    append_jsonl(path, {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **row})


def _master_port(job_id, restart):
    """Same on every task of one start, different after a requeue (no stale socket clashes)."""
    digits = int(re.sub(r"\D", "", str(job_id)) or 0)
    return 15000 + (digits * 31 + int(restart) * 7919) % 20000


class TrainJob:
    """The submitit callable: one per task (= GPU); resumable through `checkpoint`."""

    def __init__(self, train_argv, run_dir, max_requeues=DEFAULT_MAX_REQUEUES, cpu_threads=None):
        self.train_argv = list(train_argv)
        self.run_dir = str(run_dir)
        self.max_requeues = int(max_requeues)
        self.cpu_threads = cpu_threads  # CPU presets: one intra-op thread pool per allocated CPU

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        os.environ.update(
            RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
            MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(_master_port(env.job_id, restart)))
        if env.global_rank == 0:
            _append_jsonl(Path(self.run_dir) / "launcher.jsonl", {
                "event": "start", "job_id": env.job_id, "restart_count": restart,
                "host": socket.gethostname(), "world_size": env.num_tasks})
        if self.cpu_threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(self.cpu_threads))
        from m2das import train

        rc = int(train.main(list(self.train_argv)) or 0)
        if rc == EXIT_DIVERGED:
            raise RuntimeError(f"loss diverged (exit {EXIT_DIVERGED}); not requeued. See {self.run_dir}/log.jsonl")
        if rc not in (0, EXIT_RESUMABLE):
            raise RuntimeError(f"trainer exited with code {rc}; see the task logs in {self.run_dir}/slurm")
        if rc == EXIT_RESUMABLE and env.global_rank == 0:
            # SIGTERM (scancel, SLURM's own requeue or preemption): submitit does not requeue on it.
            print(f"m2das: saved and stopped (exit {EXIT_RESUMABLE}); a preempted job is requeued by SLURM, "
                  f"a cancelled one continues with `python launch/submit.py --run-dir {self.run_dir} ...`",
                  file=sys.stderr, flush=True)
        return rc

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 after the trainer saved: requeue with the same argv.

        The trainer resumes (`--resume auto`) from what it just wrote. Returning
        None tells submitit not to requeue (cap reached).
        """
        import submitit

        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        job_id = os.environ.get("SLURM_JOB_ID", "")
        log = Path(self.run_dir) / "launcher.jsonl"
        if restart >= self.max_requeues:
            msg = (f"m2das: not requeued: {restart} restarts reached --max-requeues {self.max_requeues}; "
                   f"resubmit with `python launch/submit.py --run-dir {self.run_dir} ...` to continue")
            print(msg, file=sys.stderr, flush=True)
            _append_jsonl(log, {"event": "requeue_cap", "job_id": job_id, "restart_count": restart,
                                "message": msg})
            return None
        _append_jsonl(log, {"event": "requeue", "by": "submitit", "job_id": job_id,
                            "restart_count": restart, "requeue_id": f"{job_id}.{restart}"})
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.train_argv, self.run_dir, self.max_requeues, self.cpu_threads))


def kill_requeue_lines(run_dir, max_requeues):
    """Batch-script lines after srun: requeue a job whose tasks were SIGKILLed (OOM, kill -9).

    SLURM requeues by itself on node failure and preemption, but a task killed
    by SIGKILL just fails the job. srun exits 137 then. Skipped when rank 0
    already requeued through submitit for this start.
    """
    log = shlex.quote(str(Path(run_dir) / "launcher.jsonl"))
    return [
        "m2das_rc=$?",
        'm2das_restart="${SLURM_RESTART_COUNT:-0}"',
        'if [ "$m2das_rc" -eq 137 ] && ! grep -qF "\\"requeue_id\\": \\"$SLURM_JOB_ID.$m2das_restart\\"" '
        f"{log} 2>/dev/null; then",
        f'  if [ "$m2das_restart" -lt {int(max_requeues)} ]; then',
        '    echo "m2das: tasks were killed (SIGKILL); requeueing job $SLURM_JOB_ID to resume from the newest checkpoint" >&2',
        '    printf \'{"by": "sbatch-teardown", "event": "requeue", "job_id": "%s", "reason": "SIGKILL", '
        f'"requeue_id": "%s.%s", "restart_count": %s, "time": "%s"}}\\n\' "$SLURM_JOB_ID" "$SLURM_JOB_ID" '
        f'"$m2das_restart" "$m2das_restart" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" >> {log}',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  else",
        f'    echo "m2das: tasks were killed but {int(max_requeues)} restarts reached --max-requeues; not requeued" >&2',
        "  fi",
        "fi",
        'exit "$m2das_rc"',
    ]


# ---------------------------------------------------------------- executors
def submit_slurm(plan):
    from submitit import SlurmExecutor

    a = plan.args
    folder = plan.run_dir / "slurm"
    cpus = a.cpus_per_gpu or (10 if plan.gpu else 1)
    extra = {"requeue": True}
    srun_args = []
    for item in a.srun_args:
        try:
            srun_args += shlex.split(item)
        except ValueError as e:
            raise UsageError(f"--srun-args {item!r}: {e}") from None
    for item in a.sbatch:
        key, eq, value = item.partition("=")
        if not key:
            raise UsageError(f"--sbatch {item!r}: expected KEY=VALUE or KEY")
        extra[key.lstrip("-").replace("-", "_")] = value if eq else True
    params = dict(
        job_name=a.job_name or f"m2das-{a.preset}",
        time=parse_time_minutes(a.time),
        nodes=plan.nodes,
        ntasks_per_node=plan.ranks_per_node,
        cpus_per_task=cpus,
        signal_delay_s=a.signal_delay,
        setup=list(a.setup),
        srun_args=["--kill-on-bad-exit=1", *srun_args],
        additional_parameters=extra,
        teardown=kill_requeue_lines(plan.run_dir, a.max_requeues),
    )
    if plan.gpu:
        params["gpus_per_node"] = plan.ranks_per_node
    if a.mem_per_gpu:
        params["mem"] = f"{int(a.mem_per_gpu * plan.ranks_per_node * 1024)}M"
    for key, value in (("partition", a.partition), ("account", a.account), ("qos", a.qos),
                       ("constraint", a.constraint), ("mail_user", a.mail_user), ("mail_type", a.mail_type)):
        if value:
            params[key] = value
    if a.dry_run:
        from submitit.slurm.slurm import _make_sbatch_string

        print(_make_sbatch_string(command="<python> -u -m submitit.core._submit " + str(folder),
                                  folder=str(folder), **params))
        return None
    try:
        ex = SlurmExecutor(folder=str(folder), max_num_timeout=a.max_requeues, python=a.python)
    except RuntimeError as e:
        raise UsageError(f"{e} (use --cluster local on a workstation)") from None
    ex.update_parameters(**params)
    job_fn = TrainJob(plan.train_argv, plan.run_dir, a.max_requeues, None if plan.gpu else cpus)
    job = ex.submit(job_fn)
    return job.job_id


def submit_local(plan):
    """Detached supervisor: survives the terminal, reruns the ranks after a stop or a kill.

    With --foreground only the spec is written; `main` runs the supervisor in
    this process once the submission is logged.
    """
    a = plan.args
    logs = plan.run_dir / "logs"
    spec = {"train_argv": plan.train_argv, "run_dir": str(plan.run_dir), "ranks": plan.ranks_per_node,
            "gpu": plan.gpu, "max_restarts": a.max_requeues, "cwd": os.getcwd(),
            "python": a.python or sys.executable, "foreground": a.foreground}
    if a.dry_run:
        print(json.dumps(spec, indent=2))
        return None
    logs.mkdir(parents=True, exist_ok=True)
    spec_path = logs / "local-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    if a.foreground:
        return f"local-{os.getpid()}"
    with open(logs / "supervisor.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_supervise", str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd())
    return f"local-{proc.pid}"


def run_debug(plan):
    """In-process, one rank: quickest way to see a configuration start (and fail) at your desk."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if plan.args.dry_run:
        print(shlex.join(["m2das", "train", *plan.train_argv]))
        return 0
    from m2das import train

    return int(train.main(list(plan.train_argv)) or 0)


# ---------------------------------------------------------------- local supervisor
class Supervisor:
    """Runs one process per rank and reruns them while they stop resumably or get killed.

    Rerun when any rank exits 75 (saved on a signal) or dies from a signal
    (SIGKILL, OOM killer); stop on success, divergence (3), another error, a
    SIGTERM/SIGINT/SIGHUP to the supervisor itself (graceful stop: SIGTERM
    forwarded, ranks save, no rerun), or after `max_restarts` restarts.
    Detached, it runs in its own session; in the foreground (`--foreground`)
    it is the launcher process itself and also appends its lines to
    logs/supervisor.log.
    """

    def __init__(self, spec):
        self.spec = spec
        self.run_dir = Path(spec["run_dir"])
        self.foreground = bool(spec.get("foreground"))
        self.procs = []
        self.stopping = False

    def _forward(self, signum, _frame):
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.stopping = True
            signum = signal.SIGTERM
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _log(self, msg, **row):
        line = f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] m2das supervisor: {msg}"
        print(line, flush=True)
        if self.foreground:  # detached, stdout already is this file
            with open(self.run_dir / "logs" / "supervisor.log", "a") as f:
                f.write(line + "\n")
        _append_jsonl(self.run_dir / "launcher.jsonl", {"job_id": f"local-{os.getpid()}", "message": msg, **row})

    def _start(self, attempt):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = []
        for rank in range(self.spec["ranks"]):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.spec["ranks"]), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), M2DAS_LAUNCHER_ATTEMPT=str(attempt))
            if not self.spec["gpu"]:
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.spec["ranks"])))
            log = open(self.run_dir / "logs" / f"rank{rank}.log", "ab")
            self.procs.append(subprocess.Popen(
                [self.spec["python"], "-u", "-m", "m2das", "train", *self.spec["train_argv"]],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.spec["cwd"],
                # Foreground: a terminal's Ctrl-C reaches the ranks only as the forwarded SIGTERM
                # (the trainer saves on SIGTERM, not on SIGINT).
                process_group=0 if self.foreground else None))
            log.close()

    def _wait(self, grace_s=20.0):
        """Exit codes of all ranks; once one fails, the rest get SIGTERM, then SIGKILL after a grace."""
        failed_at = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                return codes
            bad = [c for c in codes if c is not None and c not in (0, EXIT_RESUMABLE)]
            done75 = [c for c in codes if c == EXIT_RESUMABLE]
            if done75 and failed_at is None and not bad:
                grace_s = max(grace_s, 60.0)  # the others are finishing the same stop; give them time
                failed_at = time.time()
            elif bad and failed_at is None:
                failed_at = time.time()
                for p in self.procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if failed_at is not None and time.time() - failed_at > grace_s:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)

    def run(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._forward)
        cap = int(self.spec["max_restarts"])
        attempt = 0
        while True:
            self._log(f"start {attempt} ({self.spec['ranks']} ranks)", event="start", restart_count=attempt,
                      host=socket.gethostname(), pid=os.getpid())
            self._start(attempt)
            codes = self._wait()
            if all(c == 0 for c in codes):
                self._log("training finished", event="finished", exit_codes=codes)
                return 0
            if EXIT_DIVERGED in codes:
                self._log("loss diverged (exit 3); not restarted", event="diverged", exit_codes=codes)
                return EXIT_DIVERGED
            # A rank killed by a signal makes the whole start resumable: the others
            # fail on the broken collective as a consequence.
            resumable = any(c < 0 for c in codes) or all(c in (0, EXIT_RESUMABLE) for c in codes)
            if not resumable:
                self._log(f"a rank failed with exit codes {codes}; not restarted, see {self.run_dir}/logs",
                          event="failed", exit_codes=codes)
                return 1
            if self.stopping:
                fg = " --foreground" if self.foreground else ""
                self._log(f"stopped on request; rerun `python launch/submit.py --cluster local{fg} --run-dir "
                          f"{self.run_dir} ...` to resume", event="stopped", exit_codes=codes)
                return EXIT_RESUMABLE
            if attempt >= cap:
                self._log(f"not restarted: {attempt} restarts reached --max-requeues {cap}",
                          event="requeue_cap", exit_codes=codes)
                return EXIT_RESUMABLE
            attempt += 1
            why = "killed by a signal" if any(c < 0 for c in codes) else "stopped resumably (75)"
            self._log(f"ranks {why}, exit codes {codes}; restarting from the newest checkpoint",
                      event="requeue", by="supervisor", exit_codes=codes)


# ---------------------------------------------------------------- main
def follow_text(plan, job_id):
    run = plan.run_dir
    lines = [f"job id:     {job_id}", f"run folder: {run}", f"progress:   m2das status {run}"]
    if plan.args.cluster == "slurm":
        lines += [f"rank 0 log: tail -f {run}/slurm/{job_id}_0_log.out {run}/slurm/{job_id}_0_log.err",
                  f"queue:      squeue -j {job_id}",
                  f"stop:       scancel {job_id}   (a later submit with --run-dir {run} resumes)"]
    else:
        pid = job_id.split("-", 1)[1]
        lines += [f"rank 0 log: tail -f {run}/logs/rank0.log   (supervisor: {run}/logs/supervisor.log)",
                  f"stop:       kill -TERM {pid}"
                  + ("   (or Ctrl-C / docker stop; " if plan.args.foreground else "   (")
                  + "ranks save, no restart; resubmit with --run-dir to resume)"]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_supervise"]:
        spec = json.loads(Path(argv[1]).read_text())
        return Supervisor(spec).run()
    launcher_argv, user_argv = split_argv(argv)
    args = build_parser().parse_args(launcher_argv)
    try:
        plan = Plan(args, user_argv)
        print(f"preset {args.preset}: {plan.world_size} ranks ({plan.nodes} node(s) x {plan.ranks_per_node})"
              + (f"; {plan.scale_note}" if plan.scale_note else ""), flush=True)
        print("trainer: m2das train " + shlex.join(plan.train_argv), flush=True)
        if args.cluster == "debug":
            return run_debug(plan)
        if args.cluster == "slurm":
            try:
                import cloudpickle

                if __name__ != "__main__":  # pickle TrainJob by value: the job needs no import path
                    cloudpickle.register_pickle_by_value(sys.modules[__name__])
            except (ImportError, AttributeError):
                pass
            job_id = submit_slurm(plan)
        else:
            job_id = submit_local(plan)
    except UsageError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"submit.py: error: {e}; is SLURM installed here (sbatch on PATH)?", file=sys.stderr)
        return 2
    if job_id is None:  # dry run
        return 0
    _append_jsonl(plan.run_dir / "launcher.jsonl", {
        "event": "submit", "cluster": args.cluster, "job_id": str(job_id), "preset": args.preset,
        "nodes": plan.nodes, "ranks_per_node": plan.ranks_per_node, "train_argv": plan.train_argv,
        "launcher_argv": launcher_argv, "host": socket.gethostname()})
    print(follow_text(plan, str(job_id)), flush=True)
    if args.cluster == "local" and args.foreground:
        spec = json.loads((plan.run_dir / "logs" / "local-spec.json").read_text())
        return Supervisor(spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
