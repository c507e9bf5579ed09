"""`m2das <command>`: one entry point, each command a module of its own.

Commands are imported lazily so `m2das status` does not pay for importing torch.
COMMANDS is the one list of commands: `m2das --commands` prints it for the
container's entry point (docker/entrypoint.sh), which keeps none of its own.
"""

import contextlib
import importlib
import sys

from m2das.signals import EXIT_ABORTED, StartInterrupted, hold_early

COMMANDS = {
    "train": ("m2das.train", "Pre-train M2D-AS (single process, torchrun, or a launcher rank)."),
    "prepare": ("m2das.data.prepare", "Audio folder -> LMS .npy files, lists, labels, weights, norm stats."),
    "demo": ("m2das.tools.demo", "Synthesise a tiny corpus, train, interrupt, resume: the whole job in minutes."),
    "pack": ("m2das.data.pack", "Data folder -> a few large time-major shards + index: one read per crop, any fsspec URL."),
    "submit": ("m2das.cluster.submit", "Send a training job to SLURM or this machine (= python launch/submit.py)."),
    "status": ("m2das.cluster.status", "Progress of a run folder: step, checkpoints, speed, restarts, ETA."),
    "bench": ("m2das.tools.bench", "Benchmarks: `bench train`, `bench prepare`, `bench checkpoint`, "
                                   "`bench data`, `bench data-remote`, `bench startup`, `bench monitor`."),
    "export": ("m2das.downstream.export", "Run or checkpoint -> weights the M2D runtime and EVAR load (encoder and AudioSet head)."),
    "embed": ("m2das.downstream.embed", "Folder of audio or LMS files -> clip embeddings (.npz)."),
    "eval": ("m2das.downstream.linear_eval", "Linear evaluation, Table V protocol: --task, --suite paper or --data LIST.csv."),
    "finetune": ("m2das.downstream.finetune", "Fine-tune a pre-trained encoder on a Table VI task (AudioSet, ESC-50, SPCV2, VC1), resumable."),
}


def command_lines() -> list:
    """`NAME  description` per command: what `m2das --commands` prints, one a line."""
    return [f"{name:<8} {text}" for name, (_, text) in COMMANDS.items()]


def usage() -> str:
    lines = ["usage: m2das <command> [options]", "", "commands:"]
    lines += [f"  {line}" for line in command_lines()]
    lines += ["", "`m2das <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command is a mistake: usage on stderr, exit 2 (as argparse does)
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--commands":
        print("\n".join(command_lines()))
        return 0
    if argv[0] in ("-V", "--version"):
        from m2das import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"m2das: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "train":
        from m2das import config, runfolder

        config.parse_args(rest)  # --help and flag errors answer before torch is imported
        try:
            runfolder.lock_timing()  # so do unsafe run-lock settings (M2DAS_LOCK_STALE_S, ...)
        except runfolder.LockSettingError as e:
            print(f"m2das train: error: {e}", file=sys.stderr)
            return runfolder.EXIT_BAD_INPUT
        hold_early()  # a stop signal during the seconds torch takes to import is held, not fatal
    try:
        module = importlib.import_module(COMMANDS[name][0])
        if name == "bench" and not rest:  # a benchmark must be named: usage on stderr, exit 2
            with contextlib.redirect_stdout(sys.stderr):
                module.main(["--help"])
            return 2
        return int(module.main(rest) or 0)
    except StartInterrupted as e:  # a Ctrl-C while `train` starts (only it holds signals early)
        print(f"m2das {name}: {e} (exit {EXIT_ABORTED})", file=sys.stderr)
        return EXIT_ABORTED
