"""The SLURM route: the submitit job each task runs, and its submission.

One task per GPU: SLURM starts `gpus_per_node` tasks on every node (or two CPU
ranks for `cpu-test`); each task sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT from submitit's JobEnvironment and calls
`m2das.train.main` in-process, so submitit's signal handler and the trainer's
live in the same process (see the stop/resume protocol in docs). What to do
after a start is decided by m2das/cluster/requeue.py, here and in the batch
script's teardown lines. submitit is imported only when a job is built or run.
"""

import contextlib
import datetime
import io
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from m2das import machine, runfolder
from m2das.cluster import requeue
from m2das.cluster.plan import UsageError, parse_time_minutes
from m2das.fileio import append_jsonl
from m2das.runfolder import EXIT_RESUMABLE


def _restart_count():
    return int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)


class TrainJob:
    """The submitit callable: one per task (= GPU); resumable through `checkpoint`."""

    def __init__(self, train_argv, run_dir, max_requeues=requeue.MAX_REQUEUES, cpu_threads=None, command="train"):
        self.command = command  # plan.COMMANDS: which m2das command's main runs in this task
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
            MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(machine.master_port(env.job_id, restart)))
        if env.global_rank == 0:
            append_jsonl(Path(self.run_dir) / runfolder.LAUNCHER, {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "event": runfolder.EVENT_START, "job_id": env.job_id, "restart_count": restart,
                "host": socket.gethostname(), "world_size": env.num_tasks})
        if self.cpu_threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(self.cpu_threads))
        try:
            rc = int(command_main(getattr(self, "command", "train"))(list(self.train_argv)) or 0)
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
                  f"a cancelled one continues with `python launch/submit.py --run-dir {self.run_dir}`",
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
            print(f"m2das: {decision.reason}; resubmit with `python launch/submit.py --run-dir {self.run_dir}` "
                  f"to continue", file=sys.stderr, flush=True)
            return None
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.train_argv, self.run_dir, self.max_requeues, self.cpu_threads,
                     getattr(self, "command", "train")))


def command_main(command):
    """The in-process entry point of `m2das COMMAND` (imported in the job, never on the login node)."""
    if command == "finetune":
        from m2das.downstream import finetune

        return finetune.main
    from m2das import train

    return train.main


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


def _executor_class():
    from submitit import SlurmExecutor

    class DryRunExecutor(SlurmExecutor):
        """Builds the very batch script a submit writes, on a machine without srun."""

        @classmethod
        def affinity(cls):
            return 1

    return SlurmExecutor, DryRunExecutor


def cluster_partitions():
    """Partition names `sinfo` reports, or None where sinfo cannot tell (not installed, no controller)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    return names if out.returncode == 0 and names else None


def refuse_unknown_partition(partition):
    """A --partition the cluster lacks: one line now instead of sbatch's failure wrapped in a traceback."""
    known = cluster_partitions() if partition else None
    if known is not None and partition not in known:
        raise UsageError(f"--partition {partition}: this cluster has no such partition (sinfo lists: "
                         f"{', '.join(sorted(known))})")


def _sbatch_error(e):
    """submitit's FailedJobError text -> sbatch's own error line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if "sbatch: error" in ln] or lines[-1:] or ["sbatch failed"]
    return said[-1].split("sbatch: error:", 1)[-1].strip()


def submit_slurm(plan):
    a = plan.args
    folder = plan.run_dir / "slurm"
    cpus = a.cpus_per_gpu or plan.preset["cpus"]
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
    refuse_unknown_partition(a.partition)
    _pickle_by_value()
    job_fn = TrainJob(plan.train_argv, plan.run_dir, a.max_requeues, None if plan.gpu else cpus, plan.command)
    from submitit.core.utils import FailedJobError

    try:  # submitit prints sbatch's stderr when it fails: its reason comes in our one line instead
        with contextlib.redirect_stderr(io.StringIO()):
            job = ex.submit(job_fn)
    except FailedJobError as e:
        raise UsageError(f"sbatch refused the job: {_sbatch_error(e)} (see `sinfo` for partitions, "
                         f"`sacctmgr show assoc user=$USER` for accounts and QOS)") from None
    return job.job_id


def _pickle_by_value():
    """TrainJob travels by value (cloudpickle): the job needs this module's code, not its import path."""
    try:
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    except (ImportError, AttributeError, ValueError):
        pass
