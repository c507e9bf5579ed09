"""`m2das submit` (= `python launch/submit.py`): send M2D-AS pre-training to SLURM, this machine, or run it in-process.

    python launch/submit.py --preset 48gb --cluster slurm --partition gpu -- --epochs 100

Argument rule: the launcher's own flags come first. Everything after a bare
`--`, or else from the first flag the launcher does not know, is passed to the
trainer verbatim and appended after the preset's trainer flags, so it wins
(argparse keeps the last value). `--output_dir` is the exception: the launcher
fixes the run folder at submit time and always passes it itself. The trainer's
flags are checked with the trainer's own parser before anything is queued.

The rooms: plan.py decides (flags, presets, batch split, run folder),
slurm.py holds the submitit job, local.py the workstation supervisor; this
module ties them together and logs the submission.
"""

import datetime
import shlex
import socket
import sys

from m2das import runfolder
from m2das.cluster import local, slurm
from m2das.cluster.plan import (Plan, UsageError, build_parser, refuse_control_characters, reuse_earlier_submit,
                                split_argv)
from m2das.fileio import append_jsonl
from m2das.runfolder import EXIT_BAD_INPUT


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
    launcher_argv, user_argv = split_argv(argv)
    try:
        refuse_control_characters(launcher_argv)
    except UsageError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = build_parser().parse_args(launcher_argv)
    try:
        args, user_argv, reused = reuse_earlier_submit(args, launcher_argv, user_argv)
        if reused:
            print(reused, flush=True)
        plan = Plan(args, user_argv)
        plan.refuse_finished_run()
        print(f"preset {args.preset}: {plan.world_size} ranks ({plan.nodes} node(s) x {plan.ranks_per_node})"
              + (f"; {plan.scale_note}" if plan.scale_note else ""), flush=True)
        print(f"trainer: m2das {plan.command} " + shlex.join(plan.train_argv), flush=True)
        if args.cluster == "debug":
            return local.run_debug(plan)
        job_id = slurm.submit_slurm(plan) if args.cluster == "slurm" else local.submit_local(plan)
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
        "event": runfolder.EVENT_SUBMIT, "cluster": args.cluster, "job_id": str(job_id), "preset": args.preset,
        "nodes": plan.nodes, "ranks_per_node": plan.ranks_per_node, "train_argv": plan.train_argv,
        "user_argv": plan.user_argv, "launcher_argv": launcher_argv,
        "launcher_args": vars(args), "host": socket.gethostname()})
    print(follow_text(plan, str(job_id)), flush=True)
    if args.cluster == "local" and args.foreground:
        return local.Supervisor(local.local_spec(plan)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
