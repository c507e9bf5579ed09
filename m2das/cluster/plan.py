"""The login-node half of a submit: the launcher's flags, the presets, and the Plan.

Everything decided before a job is queued lives here: how argv splits into
launcher and trainer flags, the checks of both (with `m2das train`'s own
parser, so a typo fails now and not after the queue wait), the batch split
over the ranks, and the run folder. Torch- and numpy-free: it runs on login
nodes with only submitit installed.
"""

import argparse
import re
from pathlib import Path

from m2das import runfolder
from m2das.cliargs import DefaultsFormatter, Parser
from m2das.cluster import requeue
from m2das.fileio import LinkRefused, read_jsonl, refuse_links
from m2das.runfolder import EXIT_CODES

# GPU presets insist on CUDA: a job landing on a node without a visible GPU fails
# at once instead of training on the CPU for weeks.
GPU = ["--device", "cuda"]
# Per-GPU batch x accumulation x GPUs = 2048 in every GPU preset (the paper's
# effective batch, LR 2.4e-3 with blr 3e-4). `ranks` is ranks per node, `cpus`
# the CPUs SLURM gives each rank (--cpus-per-gpu), `about` the --help line.
PRESETS = {
    # The paper's run: 4 GPUs x 512 per GPU, no accumulation.
    "48gb": dict(ranks=4, gpu=True, batch_size=512, accum_iter=1, cpus=10, trainer=GPU, about="paper"),
    # Half the per-GPU batch fits 24 GB; two accumulation steps keep 2048.
    "24gb": dict(ranks=4, gpu=True, batch_size=256, accum_iter=2, cpus=10, trainer=GPU, about="24 GB cards"),
    # 80 GB cards: bounded by the 48gb fit (512 per GPU, accum 1) until a
    # benchmark (`m2das bench train`) shows a larger per-GPU batch fits; with
    # accum already 1 there is nothing to trade for fewer steps on 4 GPUs.
    "80gb": dict(ranks=4, gpu=True, batch_size=512, accum_iter=1, cpus=10, trainer=GPU, about="80 GB cards"),
    # Tests: the tiny model on two CPU ranks over gloo, fits a 2-CPU node without GPUs.
    "cpu-test": dict(ranks=2, gpu=False, batch_size=4, accum_iter=1, cpus=1, about="tiny model, CPU ranks",
                     trainer=["--model", "m2d_as_vit_tiny", "--device", "cpu", "--input_size", "80x208",
                              "--num_workers", "0", "--epochs", "2", "--save_freq", "1",
                              "--warmup_epochs", "1", "--log_every", "1", "--stats_files", "64"],
                     finetune=["--device", "cpu", "--num_workers", "0", "--save_freq", "1", "--log_every", "1"]),
}
COMMANDS = ("train", "finetune")  # what a job runs: `m2das train` or `m2das finetune`, same requeue rules


def _presets_text():
    return "; ".join(f"{name}: {p['ranks']}x{p['batch_size']} accum {p['accum_iter']} ({p['about']})"
                     for name, p in PRESETS.items())


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
    p = Parser(
        prog="python launch/submit.py", allow_abbrev=False,
        usage="%(prog)s [launcher flags] [--] [trainer flags]",
        description="Submit M2D-AS pre-training. Trainer flags (everything after `--`, or from "
                    "the first flag the launcher does not know) override the preset's; they are checked "
                    "with `m2das train`'s parser before anything is queued. Every flag is also "
                    "accepted with underscores (--run_dir).",
        epilog=_exit_codes_text(),
        formatter_class=DefaultsFormatter)

    def add(group, name, **kw):
        """--name-with-hyphens, also spelled --name_with_underscores."""
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        kw.setdefault("help", "(default: %(default)s)")
        group.add_argument(*names, **kw)

    a = lambda name, **kw: add(p, name, **kw)  # noqa: E731
    a("--preset", choices=sorted(PRESETS), default="48gb",
      help=_presets_text())
    a("--cluster", choices=("slurm", "local", "debug"), default="slurm",
      help="slurm: sbatch via submitit; local: detached supervisor on this machine; debug: in-process")
    a("--command", choices=COMMANDS, default="train",
      help="train: pre-training; finetune: `m2das finetune WEIGHTS --task T ...` (its flags after `--`; the "
           "task's batch is split over the ranks)")
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
      help="CPUs per task (= per GPU); default: the preset's ("
           + ", ".join(f"{name} {p['cpus']}" for name, p in PRESETS.items()) + ")")
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


def trainer_parser(command="train"):
    """`m2das train`'s (or `m2das finetune`'s) own parser, raising UsageError instead of exiting."""
    if command == "finetune":
        from m2das.downstream import ft_config

        parser = ft_config.build_parser()
    else:
        from m2das import config

        parser = config.build_parser()

    def error(message):
        raise UsageError(f"trainer flags: {message}")

    parser.error = error
    return parser


def check_trainer_argv(preset_argv, user_argv, command="train"):
    """Parse preset + user trainer flags as `m2das train` will; returns the flags the user set.

    Misplaced launcher flags and unknown flags fail here, at submit time, not
    after the queue wait.
    """
    if "--print_config" in user_argv or "--print-config" in user_argv:
        raise UsageError("--print_config is not for a job; run `m2das train --print_config <trainer flags>` "
                         "to see the resolved configuration")
    parser = trainer_parser(command)
    _, unknown = parser.parse_known_args(list(preset_argv) + list(user_argv))
    if unknown:
        launcher = launcher_flags()
        flag = next((t for t in unknown if t.startswith("-")), unknown[0])
        if flag.split("=", 1)[0] in launcher:
            raise UsageError(f"{flag} is a launcher flag but comes after the trainer flags; {PLACEMENT}")
        raise UsageError(f"{flag}: not a flag of `m2das {command}` nor of the launcher (see `m2das {command} "
                         f"--help`); {PLACEMENT}")
    given = trainer_parser(command)
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
        self.command = getattr(args, "command", "train")
        if self.command == "finetune":
            preset = {**preset, "trainer": preset.get("finetune", GPU if preset["gpu"] else [])}
        given = check_trainer_argv(preset["trainer"], user_argv, self.command)
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
        if self.command == "finetune":
            self._finetune(preset, given, user_argv)
            return
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

    def _finetune(self, preset, given, user_argv):
        """The task's batch split over the ranks (the reference fine-tunes on one GPU); the run folder
        `m2das finetune` itself would pick, under --runs-dir."""
        from m2das.downstream import ft_config

        try:
            cfg = ft_config.parse_args(list(preset["trainer"]) + list(user_argv))
        except ft_config.ConfigError as e:
            raise UsageError(f"trainer flags: {e}") from None
        base = list(preset["trainer"])
        self.scale_note = "batch flag given: not rescaled" if "batch_size" in given else ""
        if "batch_size" not in given and self.world_size > 1:
            per_rank, rem = divmod(cfg["batch_size"], self.world_size)
            if rem or not per_rank:
                raise UsageError(f"{cfg['task']}'s batch {cfg['batch_size']} cannot be split evenly over "
                                 f"{self.world_size} ranks; choose --gpus-per-node dividing it, or pass --batch_size")
            base += ["--batch_size", str(per_rank)]
            self.scale_note = f"{cfg['task']}'s batch {cfg['batch_size']} over {self.world_size} ranks: {per_rank} each"
        user_out = given.get("output_dir")
        user_argv = _drop_flag(user_argv, ("--output_dir", "--output-dir"))
        if self.args.run_dir and user_out and Path(self.args.run_dir).resolve() != Path(user_out).resolve():
            raise UsageError("--run-dir and --output_dir disagree; give one of them")
        self.user_argv = user_argv
        default = ft_config.default_output_dir(cfg["task"], cfg["fold"], cfg["weights"], cfg["seed"],
                                               self.args.runs_dir)
        self.run_dir = Path(self.args.run_dir or user_out or default).resolve()
        self.train_argv = base + user_argv + ["--output_dir", str(self.run_dir)]

    def _default_run_dir(self, argv):
        """The trainer's own run name, so `m2das train` reruns find it."""
        from m2das import config

        cfg = config.parse_args([*argv, "--runs_dir", self.args.runs_dir])  # the launcher's --runs-dir wins
        return config.default_output_dir(cfg, self.world_size)

    def refuse_held_run_dir(self):
        """One trainer per run folder: a live one holding it means this submit would be refused later."""
        try:
            holder = runfolder.live_holder(self.run_dir)
        except runfolder.LockSettingError as e:
            raise UsageError(str(e)) from None
        if holder:
            raise UsageError(f"{self.run_dir} is in use by a live trainer ({holder}); wait for it, stop it, "
                             f"or pass another --run-dir")
        try:  # the launchers append to its logs: a symbolic link planted there would send them elsewhere
            refuse_links(self.run_dir, runfolder.WRITTEN_IN_PLACE)
        except LinkRefused as e:
            raise UsageError(str(e)) from None

    def refuse_finished_run(self):
        """A run whose last event is `finished` would be queued only to print "all epochs done"."""
        from m2das import config

        if self.command != "train":  # pre-training runs only; finetune's flags are not the trainer's
            return
        rows = read_jsonl(self.run_dir / runfolder.RESTARTS)
        if not rows or rows[-1].get("event") != runfolder.EVENT_FINISHED:
            return
        try:
            done = int(_read_json(self.run_dir / runfolder.CONFIG).get("epochs"))
        except (TypeError, ValueError):
            return
        wanted = config.parse_args(list(self.train_argv)).epochs
        if wanted <= done:
            raise UsageError(f"{self.run_dir} has finished all {done} epochs ({runfolder.RESTARTS}); "
                             f"pass --epochs above {done} to train longer, or another --run-dir for a new run")


def _read_json(path):
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def last_submit(run_dir):
    """The newest `submit` row of RUN/launcher.jsonl, or None."""
    rows = [r for r in read_jsonl(Path(run_dir) / runfolder.LAUNCHER) if r.get("event") == runfolder.EVENT_SUBMIT]
    return rows[-1] if rows else None


def given_launcher_flags(launcher_argv):
    """The launcher flags this command line sets itself (destinations), defaults left out."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(launcher_argv))))


NOT_REUSED = ("dry_run",)  # per-command, never carried over from an earlier submit


def reuse_earlier_submit(args, launcher_argv, user_argv):
    """--run-dir naming a submitted run: flags not given now come from its last submit (launcher.jsonl).

    So the printed "resubmit with --run-dir RUN" hint resumes the same preset and trainer
    flags instead of the default preset. A different --preset is refused (the trainer would
    refuse the changed configuration after the queue wait). Returns (args, user_argv, note).
    """
    if not args.run_dir:
        return args, user_argv, ""
    row = last_submit(args.run_dir)
    if row is None or not row.get("preset") in PRESETS:
        return args, user_argv, ""
    given = given_launcher_flags(launcher_argv)
    if "preset" in given and args.preset != row["preset"]:
        raise UsageError(f"{args.run_dir} was submitted with --preset {row['preset']}; resume it with that preset "
                         f"(or no --preset), or pass another --run-dir for a --preset {args.preset} run")
    earlier = row.get("launcher_args") or vars(build_parser().parse_args(list(row.get("launcher_argv") or [])))
    for key, value in earlier.items():
        if key not in given and key not in NOT_REUSED and key != "run_dir":
            setattr(args, key, value)
    recorded = row.get("user_argv")
    if recorded is None:  # older records: the trainer argv less the preset's part and --output_dir
        preset = PRESETS[row["preset"]]["trainer"]
        recorded = list(row.get("train_argv") or [])[len(preset) + 4:-2]
    recorded = _drop_flag(recorded, ("--output_dir", "--output-dir"))
    note = (f"reusing --preset {args.preset} and the flags of the submit of {row.get('time', '?')} "
            f"({runfolder.LAUNCHER})")
    return args, list(recorded) + list(user_argv), note
