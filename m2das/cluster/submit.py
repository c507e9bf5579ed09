"""Submit M2D-AS pre-training to SLURM (submitit), a workstation, or run it in-process.

    python launch/submit.py --preset 48gb --cluster slurm --partition gpu -- --epochs 100

Argument rule: the launcher's own flags come first. Everything after a bare
`--`, or else from the first flag the launcher does not know, is passed to the
trainer verbatim and appended after the preset's trainer flags, so it wins
(argparse keeps the last value). `--output_dir` is the exception: the launcher
fixes the run folder at submit time and always passes it itself. The trainer's
flags are checked with the trainer's own parser before anything is queued.

One task per GPU: SLURM starts `gpus_per_node` tasks on every node (or two CPU
ranks for `cpu-test`); each task sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT from submitit's JobEnvironment and calls
`m2das.train.main` in-process, so submitit's signal handler and the trainer's
live in the same process (see the stop/resume protocol in docs). When to
requeue is decided by m2das/cluster/requeue.py on every route.
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

from m2das import runfolder
from m2das.cluster import requeue
from m2das.fileio import append_jsonl
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_CODES, EXIT_RESUMABLE

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding m2das/, for child processes

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
PLACEMENT = ("launcher flags go first: python launch/submit.py [launcher flags] -- [trainer flags] "
             "(see --help)")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UsageError(Exception):
    """A mistake in the command line; printed as one line, exit code 2."""


# ---------------------------------------------------------------- arguments
def _exit_codes_text():
    return "exit codes: " + "; ".join(f"{c} {t}" for c, t in sorted(EXIT_CODES.items())) + \
        " (--foreground and --cluster debug end with the trainer's code; submitting ends with 0 or 2)"


def build_parser():
    p = argparse.ArgumentParser(
        prog="python launch/submit.py", allow_abbrev=False,
        usage="%(prog)s [launcher flags] [--] [trainer flags]",
        description="Submit M2D-AS pre-training. Trainer flags (everything after `--`, or from "
                    "the first flag the launcher does not know) override the preset's; they are checked "
                    "with `m2das train`'s parser before anything is queued. Every flag is also "
                    "accepted with underscores (--run_dir).",
        epilog=_exit_codes_text(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(group, name, **kw):
        """--name-with-hyphens, also spelled --name_with_underscores."""
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        kw.setdefault("help", "(default: %(default)s)")
        group.add_argument(*names, **kw)

    a = lambda name, **kw: add(p, name, **kw)  # noqa: E731
    a("--preset", choices=sorted(PRESETS), default="48gb",
      help="48gb: 4x512 accum 1 (paper); 24gb: 4x256 accum 2; 80gb: 4x512 accum 1; cpu-test: tiny, 2 CPU ranks")
    a("--cluster", choices=("slurm", "local", "debug"), default="slurm",
      help="slurm: sbatch via submitit; local: detached supervisor on this machine; debug: in-process")
    a("--foreground", action="store_true",
      help="local: run the supervisor in this process until training ends, rank 0's lines on stdout "
           "(a container's entry point)")
    a("--nodes", type=int, default=1, help="nodes; the effective batch stays the preset's")
    a("--gpus-per-node", type=int, default=None, help="ranks per node (default: the preset's)")
    a("--run-dir", default=None,
      help="run folder (default: the trainer's name under --runs-dir, reusing an unfinished run of the same config)")
    a("--runs-dir", default="runs", help="parent of the default run folder")
    a("--max-requeues", type=int, default=requeue.MAX_REQUEUES,
      help="stop requeueing / restarting after this many restarts")
    a("--python", default=None, help="interpreter the job runs (default: this one)")
    a("--dry-run", action="store_true", help="print exactly what would be submitted (the batch script) and exit")
    g = p.add_argument_group("slurm")
    s = lambda name, **kw: add(g, name, **kw)  # noqa: E731
    s("--partition", default=None)
    s("--account", default=None)
    s("--qos", default=None)
    s("--time", default="24:00:00", help="time limit per job start (D-HH:MM:SS, HH:MM:SS or minutes)")
    s("--constraint", default=None)
    s("--cpus-per-gpu", type=int, default=None,
      help="CPUs per task (= per GPU); default 10 for GPU presets, 1 for cpu-test")
    s("--mem-per-gpu", type=float, default=None, help="GB of host memory per task (default: cluster's)")
    s("--mail-user", default=None)
    s("--mail-type", default=None, help="e.g. END,FAIL,REQUEUE")
    s("--job-name", default=None, help="default m2das-PRESET")
    s("--signal-delay", type=int, default=requeue.LEAD_S,
      help=f"seconds before the time limit that SIG{requeue.SIGNAL} is sent (time to save a checkpoint)")
    s("--setup", action="append", default=[], metavar="CMD",
      help="shell line run in the batch script before srun (repeatable), e.g. 'module load cuda'")
    s("--sbatch", action="append", default=[], metavar="KEY=VALUE",
      help="extra sbatch option (repeatable), e.g. --sbatch reservation=foo --sbatch exclusive")
    s("--srun-args", action="append", default=[], metavar="ARGS",
      help="extra srun options, shell-split (repeatable; write --srun-args=...), e.g. pyxis: "
           "--srun-args='--container-image=/path/m2das.sqsh --container-mounts=/data:/data'")
    return p


def launcher_flags():
    return {opt for action in build_parser()._actions for opt in action.option_strings}


def split_argv(argv):
    """(launcher argv, trainer argv): split at `--`, else at the first flag the launcher does not know."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    known = launcher_flags()
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


def refuse_control_characters(argv):
    """A newline or other control character would end up inside the batch script."""
    for tok in argv:
        if CONTROL.search(tok):
            raise UsageError(f"{tok!r}: control characters (newline, tab, ...) are not allowed in arguments")


def trainer_parser():
    """`m2das train`'s own parser, raising UsageError instead of exiting."""
    from m2das import config

    parser = config.build_parser()

    def error(message):
        raise UsageError(f"trainer flags: {message}")

    parser.error = error
    return parser


def check_trainer_argv(preset_argv, user_argv):
    """Parse preset + user trainer flags as `m2das train` will; returns the flags the user set.

    Misplaced launcher flags and unknown flags fail here, at submit time, not
    after the queue wait.
    """
    if "--print_config" in user_argv or "--print-config" in user_argv:
        raise UsageError("--print_config is not for a job; run `m2das train --print_config <trainer flags>` "
                         "to see the resolved configuration")
    parser = trainer_parser()
    _, unknown = parser.parse_known_args(list(preset_argv) + list(user_argv))
    if unknown:
        launcher = launcher_flags()
        flag = next((t for t in unknown if t.startswith("-")), unknown[0])
        if flag.split("=", 1)[0] in launcher:
            raise UsageError(f"{flag} is a launcher flag but comes after the trainer flags; {PLACEMENT}")
        raise UsageError(f"{flag}: not a flag of `m2das train` nor of the launcher (see `m2das train --help`); "
                         f"{PLACEMENT}")
    given = trainer_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    return vars(given.parse_args(list(user_argv)))


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


def _drop_flag(argv, names):
    """argv without `--name V` / `--name=V` for every spelling in names."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in names:
            skip = True
            continue
        if tok.split("=", 1)[0] in names:
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
        refuse_control_characters(user_argv)
        given = check_trainer_argv(preset["trainer"], user_argv)
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
        if "batch_size" in given or "accum_iter" in given:
            batch, accum, self.scale_note = preset["batch_size"], preset["accum_iter"], "batch flags given: not rescaled"
        else:
            batch, accum, self.scale_note = scale_batch(preset["batch_size"], preset["accum_iter"],
                                                        preset["ranks"], self.world_size)
        base = list(preset["trainer"]) + ["--batch_size", str(batch), "--accum_iter", str(accum)]
        user_out = given.get("output_dir")
        user_argv = _drop_flag(user_argv, ("--output_dir", "--output-dir"))
        if args.run_dir and user_out and Path(args.run_dir).resolve() != Path(user_out).resolve():
            raise UsageError("--run-dir and --output_dir disagree; give one of them")
        self.user_argv = user_argv
        self.run_dir = Path(args.run_dir or user_out or self._default_run_dir(base + user_argv)).resolve()
        self.train_argv = base + user_argv + ["--output_dir", str(self.run_dir)]

    def _default_run_dir(self, argv):
        """The trainer's own run name, so `m2das train` reruns find it."""
        from m2das import config

        cfg = config.parse_args(argv)
        cfg["runs_dir"] = self.args.runs_dir
        return config.default_output_dir(cfg, self.world_size)

    def refuse_held_run_dir(self):
        """One trainer per run folder: a live one holding it means this submit would be refused later."""
        holder = runfolder.live_holder(self.run_dir)
        if holder:
            raise UsageError(f"{self.run_dir} is in use by a live trainer ({holder}); wait for it, stop it, "
                             f"or pass another --run-dir")


# ---------------------------------------------------------------- job side
def _restart_count():
    return int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)


class TrainJob:
    """The submitit callable: one per task (= GPU); resumable through `checkpoint`."""

    def __init__(self, train_argv, run_dir, max_requeues=requeue.MAX_REQUEUES, cpu_threads=None):
        self.train_argv = list(train_argv)
        self.run_dir = str(run_dir)
        self.max_requeues = int(max_requeues)
        self.cpu_threads = cpu_threads  # CPU presets: one intra-op thread pool per allocated CPU

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        restart = _restart_count()
        os.environ.update(
            RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
            MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(requeue.master_port(env.job_id, restart)))
        if env.global_rank == 0:
            append_jsonl(Path(self.run_dir) / runfolder.LAUNCHER, {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "event": "start", "job_id": env.job_id, "restart_count": restart,
                "host": socket.gethostname(), "world_size": env.num_tasks})
        if self.cpu_threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(self.cpu_threads))
        from m2das import train

        try:
            rc = int(train.main(list(self.train_argv)) or 0)
        except SystemExit as e:  # submitit's requeue path ends a task this way
            code = e.code if isinstance(e.code, int) else 1
            requeue.record_task_exit(self.run_dir, env.job_id, restart, env.global_rank, code)
            raise
        except BaseException:
            requeue.record_task_exit(self.run_dir, env.job_id, restart, env.global_rank, 1)
            raise
        # srun reports one code; once this task exits 2 it kills the others (137/143): the
        # teardown's decision adds each task's own code.
        requeue.record_task_exit(self.run_dir, env.job_id, restart, env.global_rank, rc)
        decision = requeue.decide([rc], restart, self.max_requeues)
        if decision.action in (requeue.DIVERGED, requeue.FAILED):
            raise RuntimeError(f"{decision.reason}. See {self.run_dir}/{runfolder.LOG} and the task logs in "
                               f"{self.run_dir}/slurm")
        if rc == EXIT_RESUMABLE and env.global_rank == 0:
            # SIGTERM (scancel, SLURM's own requeue or preemption): submitit does not requeue on it.
            print(f"m2das: saved and stopped (exit {EXIT_RESUMABLE}); a preempted job is requeued by SLURM, "
                  f"a cancelled one continues with `python launch/submit.py --run-dir {self.run_dir} ...`",
                  file=sys.stderr, flush=True)
        return rc

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 on SIGUSR2, after the trainer saved: requeue with the same argv.

        The trainer resumes (`--resume auto`) from what it just wrote. Returning
        None tells submitit not to requeue (the policy says no).
        """
        import submitit

        restart, job_id = _restart_count(), os.environ.get("SLURM_JOB_ID", "")
        decision = requeue.decide([EXIT_RESUMABLE], restart, self.max_requeues, signalled=True)
        requeue.record(self.run_dir, decision, "submitit", job_id, restart)
        if decision.action != requeue.REQUEUE:
            print(f"m2das: {decision.reason}; resubmit with `python launch/submit.py --run-dir {self.run_dir} ...` "
                  f"to continue", file=sys.stderr, flush=True)
            return None
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.train_argv, self.run_dir, self.max_requeues, self.cpu_threads))


def teardown_lines(run_dir, max_requeues, python):
    """Batch-script lines after srun: ask the policy about srun's code; requeue if it says so.

    Covers what submitit cannot see: tasks killed by SIGKILL (OOM killer, kill -9)
    just fail the job (srun exits 137). `--once` skips a start that submitit's
    checkpoint() already decided.
    """
    decide = shlex.join([*python, "-m", "m2das.cluster.requeue", "decide", "--once", "--by", "sbatch-teardown",
                         "--run", str(run_dir), "--max-requeues", str(int(max_requeues))])
    return [
        "m2das_rc=$?",
        f'if [ "$({decide} "$m2das_rc")" = {requeue.REQUEUE} ]; then',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$m2das_rc"',
    ]


# ---------------------------------------------------------------- executors
def _executor_class():
    from submitit import SlurmExecutor

    class DryRunExecutor(SlurmExecutor):
        """Builds the very batch script a submit writes, on a machine without srun."""

        @classmethod
        def affinity(cls):
            return 1

    return SlurmExecutor, DryRunExecutor


def submit_slurm(plan):
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
    python = shlex.split(a.python) if a.python else [sys.executable]
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
        teardown=teardown_lines(plan.run_dir, a.max_requeues, python),
    )
    if plan.gpu:
        params["gpus_per_node"] = plan.ranks_per_node
    if a.mem_per_gpu:
        params["mem"] = f"{int(a.mem_per_gpu * plan.ranks_per_node * 1024)}M"
    for key, value in (("partition", a.partition), ("account", a.account), ("qos", a.qos),
                       ("constraint", a.constraint), ("mail_user", a.mail_user), ("mail_type", a.mail_type)):
        if value:
            params[key] = value
    real, dry = _executor_class()
    try:
        ex = (dry if a.dry_run else real)(folder=str(folder), max_num_timeout=a.max_requeues,
                                          python=shlex.join(python))
    except RuntimeError as e:
        raise UsageError(f"{e} (use --cluster local on a workstation)") from None
    ex.update_parameters(**params)
    if a.dry_run:
        print(f"# sbatch would be given this script ({folder}/%j_submission.sh):")
        print(ex._make_submission_file_text(ex._submitit_command_str, "dry-run"))
        return None
    plan.refuse_held_run_dir()
    job_fn = TrainJob(plan.train_argv, plan.run_dir, a.max_requeues, None if plan.gpu else cpus)
    job = ex.submit(job_fn)
    return job.job_id


def local_spec(plan):
    a = plan.args
    return {"train_argv": plan.train_argv, "run_dir": str(plan.run_dir), "ranks": plan.ranks_per_node,
            "gpu": plan.gpu, "max_restarts": a.max_requeues, "cwd": os.getcwd(),
            "python": a.python or sys.executable, "foreground": a.foreground}


def submit_local(plan):
    """Detached supervisor: survives the terminal, reruns the ranks after a stop or a kill.

    With --foreground only the spec is written; `main` runs the supervisor in
    this process once the submission is logged.
    """
    spec = local_spec(plan)
    if plan.args.dry_run:
        print("# the supervisor would run this spec:")
        print(json.dumps(spec, indent=2))
        return None
    plan.refuse_held_run_dir()
    logs = plan.run_dir / runfolder.LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    spec_path = logs / "local-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    if plan.args.foreground:
        return f"local-{os.getpid()}"
    with open(logs / "supervisor.log", "ab") as out:
        path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-m", "m2das.cluster.submit", "--_supervise", str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": path})
    return f"local-{proc.pid}"


def run_debug(plan):
    """In-process, one rank: quickest way to see a configuration start (and fail) at your desk."""
    if plan.args.dry_run:
        print(shlex.join(["m2das", "train", *plan.train_argv]))
        return 0
    plan.refuse_held_run_dir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from m2das import train

    return int(train.main(list(plan.train_argv)) or 0)


# ---------------------------------------------------------------- local supervisor
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FORWARDED = STOP_SIGNALS + (signal.SIGUSR1, signal.SIGUSR2)
IGNORED_AT_START = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _ignore_stop_signals():
    """In a rank before exec: stop signals are ignored until the trainer installs its handlers.

    A signal that arrives before would otherwise kill the rank without a record;
    the supervisor repeats it until the ranks have exited.
    """
    for sig in IGNORED_AT_START:
        signal.signal(sig, signal.SIG_IGN)


class Supervisor:
    """Runs one process per rank and reruns them as m2das.cluster.requeue decides.

    A SIGTERM/SIGINT/SIGHUP to the supervisor itself is a stop request (SIGTERM
    forwarded, ranks save, no rerun); USR1/USR2 are forwarded as they are (a
    preemption warning: save, then rerun). Detached, it runs in its own session;
    in the foreground (`--foreground`) it is the launcher process itself, also
    appends its lines to logs/supervisor.log and copies rank 0's output to
    stdout, so `docker logs` shows training.
    """

    RESEND_S = 2.0

    def __init__(self, spec):
        self.spec = spec
        self.run_dir = Path(spec["run_dir"])
        self.logs = self.run_dir / runfolder.LOGS_DIR
        self.foreground = bool(spec.get("foreground"))
        self.procs = []
        self.stopping = False
        self.pending = None  # the last forwarded signal, repeated until the ranks exit
        self.rank0_offset = 0

    def _forward(self, signum, _frame):
        if signum in STOP_SIGNALS:
            self.stopping = True
            signum = signal.SIGTERM
        self.pending = signum
        self._send(signum)

    def _send(self, signum):
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
            with open(self.logs / "supervisor.log", "a") as f:
                f.write(line + "\n")
        append_jsonl(self.run_dir / runfolder.LAUNCHER, {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "job_id": f"local-{os.getpid()}", "message": msg, **row})

    def _start(self, attempt):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs, self.pending = [], None
        rank0 = self.logs / "rank0.log"
        self.rank0_offset = rank0.stat().st_size if rank0.exists() else 0
        for rank in range(self.spec["ranks"]):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.spec["ranks"]), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), M2DAS_LAUNCHER_ATTEMPT=str(attempt))
            if not self.spec["gpu"]:
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.spec["ranks"])))
            with open(self.logs / f"rank{rank}.log", "ab") as log:
                self.procs.append(subprocess.Popen(
                    [self.spec["python"], "-u", "-m", "m2das", "train", *self.spec["train_argv"]],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.spec["cwd"], preexec_fn=_ignore_stop_signals,
                    # Foreground: a terminal's Ctrl-C reaches the ranks only as the forwarded SIGTERM
                    # (the trainer saves on SIGTERM, not on SIGINT).
                    process_group=0 if self.foreground else None))

    def _echo_rank0(self):
        """Foreground: rank 0's new output to stdout (its progress lines)."""
        if not self.foreground:
            return
        try:
            with open(self.logs / "rank0.log", "rb") as f:
                f.seek(self.rank0_offset)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1  # whole lines only
        if cut:
            sys.stdout.buffer.write(data[:cut])
            sys.stdout.flush()
            self.rank0_offset += cut

    def _wait(self, grace_s=20.0):
        """Exit codes of all ranks; once one fails, the rest get SIGTERM, then SIGKILL after a grace."""
        failed_at, resent = None, time.time()
        while True:
            self._echo_rank0()
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                self._echo_rank0()
                return codes
            if self.pending is not None and time.time() - resent > self.RESEND_S:
                self._send(self.pending)  # a rank still starting up ignored it
                resent = time.time()
            bad = [c for c in codes if c is not None and c not in (0, EXIT_RESUMABLE)]
            done75 = [c for c in codes if c == EXIT_RESUMABLE]
            if done75 and failed_at is None and not bad:
                grace_s = max(grace_s, 60.0)  # the others are finishing the same stop; give them time
                failed_at = time.time()
            elif bad and failed_at is None:
                failed_at = time.time()
                self._send(signal.SIGTERM)
            if failed_at is not None and time.time() - failed_at > grace_s:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)

    def run(self):
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        cap = int(self.spec["max_restarts"])
        attempt = 0
        while True:
            self._log(f"start {attempt} ({self.spec['ranks']} ranks)", event="start", restart_count=attempt,
                      host=socket.gethostname(), pid=os.getpid())
            self._start(attempt)
            codes = self._wait()
            pid0 = self.procs[0].pid
            d = requeue.decide(codes, attempt, cap, stop_requested=self.stopping,
                               last_event=requeue.last_event(self.run_dir, pid=pid0))
            msg = d.reason + f" (exit codes {codes})"
            if d.action == requeue.FAILED:
                msg += f"; see {self.logs}"
            elif d.action in (requeue.STOPPED, requeue.CAP):
                fg = " --foreground" if self.foreground else ""
                msg += f"; rerun `python launch/submit.py --cluster local{fg} --run-dir {self.run_dir} ...` to resume"
            self._log(msg, event=d.action, by="supervisor", restart_count=attempt, exit_codes=codes,
                      start_id=requeue.start_id(f"local-{os.getpid()}", attempt))
            if d.action != requeue.REQUEUE:
                return requeue.EXIT_FOR[d.action] if EXIT_BAD_INPUT not in codes else EXIT_BAD_INPUT
            attempt += 1


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
    try:
        refuse_control_characters(launcher_argv)
    except UsageError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
        return EXIT_BAD_INPUT
    except FileNotFoundError as e:
        print(f"submit.py: error: {e}; is SLURM installed here (sbatch on PATH)?", file=sys.stderr)
        return EXIT_BAD_INPUT
    if job_id is None:  # dry run
        return 0
    append_jsonl(plan.run_dir / runfolder.LAUNCHER, {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "event": "submit", "cluster": args.cluster, "job_id": str(job_id), "preset": args.preset,
        "nodes": plan.nodes, "ranks_per_node": plan.ranks_per_node, "train_argv": plan.train_argv,
        "launcher_argv": launcher_argv, "host": socket.gethostname()})
    print(follow_text(plan, str(job_id)), flush=True)
    if args.cluster == "local" and args.foreground:
        return Supervisor(local_spec(plan)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
