"""The workstation route: a supervisor that runs one process per rank on this machine.

`submit_local` writes the spec (RUN/logs/local-spec.json) and starts the
supervisor detached (`python -m m2das.cluster.local SPEC`, in its own session,
so it outlives the terminal), or runs it in the launcher process with
--foreground (a container's entry point). The supervisor forwards signals to
the ranks and reruns them as m2das/cluster/requeue.py decides. `run_debug`
runs a single rank in-process. Torch is imported by the ranks, never here.
"""

import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from m2das import machine, runfolder
from m2das.cluster import requeue
from m2das.cluster.plan import UsageError
from m2das.fileio import append_jsonl, open_append, write_json
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_RESUMABLE

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding m2das/, for the detached supervisor


def local_spec(plan):
    a = plan.args
    return {"command": plan.command, "train_argv": plan.train_argv, "run_dir": str(plan.run_dir),
            "ranks": plan.ranks_per_node,
            "gpu": plan.gpu, "max_restarts": a.max_requeues, "cwd": os.getcwd(),
            "python": a.python or sys.executable, "foreground": a.foreground}


def visible_gpus():
    """How many NVIDIA GPUs a rank here could use, torch-free: CUDA_VISIBLE_DEVICES narrows the driver's list.

    The driver's list comes from /proc/driver/nvidia/gpus (one folder per GPU), else `nvidia-smi -L`.
    """
    gpus = 0
    with contextlib.suppress(OSError):
        gpus = len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    if not gpus:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
            gpus = sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for tok in visible.split(","):
            tok = tok.strip()
            if not tok or tok.startswith("-"):
                break  # CUDA stops at the first invalid entry
            ids.append(tok)
        gpus = min(gpus, len(ids))
    return gpus


def refuse_missing_gpus(plan):
    """A GPU preset on a machine without enough GPUs: say so now, not when the ranks fail a minute later."""
    if not plan.gpu:
        return
    have = visible_gpus()
    if have < plan.ranks_per_node:
        where = "no GPU is visible" if have == 0 else f"only {have} GPU(s) are visible"
        raise UsageError(f"--preset {plan.args.preset} runs {plan.ranks_per_node} GPU rank(s) but {where} here "
                         f"(/proc/driver/nvidia, nvidia-smi, CUDA_VISIBLE_DEVICES); "
                         + ("use --preset cpu-test on this machine" if have == 0 else
                            f"pass --gpus-per-node {have}"))


def submit_local(plan):
    """Detached supervisor: survives the terminal, reruns the ranks after a stop or a kill.

    With --foreground only the spec is written; `submit.main` runs the supervisor in
    this process once the submission is logged.
    """
    spec = local_spec(plan)
    if plan.args.dry_run:
        print("# the supervisor would run this spec:")
        print(json.dumps(spec, indent=2))
        return None
    plan.refuse_held_run_dir()
    refuse_missing_gpus(plan)
    logs = plan.run_dir / runfolder.LOGS_DIR
    spec_path = logs / "local-spec.json"
    write_json(spec_path, spec)  # written whole: a planted link is replaced, its target untouched
    if plan.args.foreground:
        return f"local-{os.getpid()}"
    with open_append(logs / "supervisor.log", "ab") as out:
        path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-m", "m2das.cluster.local", str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": path})
    return f"local-{proc.pid}"


def run_debug(plan):
    """In-process, one rank: quickest way to see a configuration start (and fail) at your desk."""
    if plan.args.dry_run:
        print(shlex.join(["m2das", plan.command, *plan.train_argv]))
        return 0
    plan.refuse_held_run_dir()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(machine.free_port()))
    from m2das.cluster.slurm import command_main

    return int(command_main(plan.command)(list(plan.train_argv)) or 0)


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
            with open_append(self.logs / "supervisor.log") as f:
                f.write(line + "\n")
        append_jsonl(self.run_dir / runfolder.LAUNCHER, {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "job_id": f"local-{os.getpid()}", "message": msg, **row})

    def _start(self, attempt):
        port = machine.free_port()
        self.procs, self.pending = [], None
        rank0 = self.logs / "rank0.log"
        self.rank0_offset = rank0.stat().st_size if rank0.exists() else 0
        for rank in range(self.spec["ranks"]):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.spec["ranks"]), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{runfolder.LAUNCHER_ATTEMPT_ENV: str(attempt)})
            if not self.spec["gpu"]:
                env.setdefault("OMP_NUM_THREADS", str(max(1, machine.usable_cores() // self.spec["ranks"])))
            with open_append(self.logs / f"rank{rank}.log", "ab") as log:
                self.procs.append(subprocess.Popen(
                    [self.spec["python"], "-u", "-m", "m2das", self.spec.get("command", "train"),
                     *self.spec["train_argv"]],
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
            self._log(f"start {attempt} ({self.spec['ranks']} ranks)", event=runfolder.EVENT_START, restart_count=attempt,
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
                msg += f"; rerun `python launch/submit.py --cluster local{fg} --run-dir {self.run_dir}` to resume"
            self._log(msg, event=d.action, by="supervisor", restart_count=attempt, exit_codes=codes,
                      start_id=requeue.start_id(f"local-{os.getpid()}", attempt))
            if d.action != requeue.REQUEUE:
                return requeue.EXIT_FOR[d.action] if EXIT_BAD_INPUT not in codes else EXIT_BAD_INPUT
            attempt += 1


def main(argv=None) -> int:
    """`python -m m2das.cluster.local SPEC`: the detached supervisor that submit_local starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m m2das.cluster.local RUN/logs/local-spec.json (started by `m2das submit "
              "--cluster local`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return Supervisor(json.loads(Path(argv[0]).read_text())).run()


if __name__ == "__main__":
    sys.exit(main())
