"""`m2das finetune`'s settings: each task's recipe (Table VI) and the command's flags.

Torch- and numpy-free, so the launcher checks a fine-tuning job's flags on a login node
with this very parser before anything is queued.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

from m2das import datafolder, runfolder
from m2das.cliargs import Parser
from m2das.downstream import tasks as task_sets

PROG = "m2das finetune"


class ConfigError(ValueError):
    """A flag value the parser's types let through but the run cannot use; one line, exit 2."""


OVERRIDES = ("frames", "optim", "lr", "epochs", "warmup_epochs", "batch_size", "mixup", "freq_mask", "time_mask",
             "rrc", "training_mask")
AUDIOSET_TASKS = ("as20k", "as2m")
AUDIO_TASKS = ("esc50", "spcv2", "vc1")  # read by m2das.downstream.tasks from the data set's own folder
TASK_LMS_DIR = "task_lms"  # RUN/task_lms/: the LMS of each clip of an audio task, made once
MIN_LR = 1e-7  # the cosine schedule's floor (timm CosineLRScheduler lr_min of the reference tool)
HEAD_STD = 0.01  # the linear head's init N(0, 0.01), bias 0


@dataclass(frozen=True)
class TaskSettings:
    """One task's fine-tuning recipe (the M2D repository's util/ft-*.sh on EVAR's finetune.py)."""
    frames: int
    optim: str           # sgd | lars | adamw
    lr: float
    epochs: int
    warmup_epochs: float
    batch_size: int
    mixup: float         # Beta(a, a); 0: off
    freq_mask: int
    time_mask: int
    rrc: bool
    training_mask: float  # share of time columns dropped before the blocks while training
    multi_label: bool
    balanced: bool = False  # class-balanced sampling (the pre-training list's weight column)
    freeze_embed: bool = False
    weight_decay: float = 0.0
    betas: tuple = field(default=(0.9, 0.95))
    # False: the pre-trained positional grid is kept and its first columns used (EVAR's dur_frames None,
    # clips shorter than the pre-training crop); True: resized to `frames` (dur_frames set).
    interpolate_pos: bool = True


TASKS = {
    "as20k": TaskSettings(1001, "sgd", 0.5, 200, 5, 64, 0.3, 30, 192, True, 0.5, True),
    "as2m": TaskSettings(1001, "lars", 2.0, 70, 15, 64, 0.5, 30, 192, False, 0.5, True, balanced=True),
    # util/ft-esc50.sh: 5 s at dur_frames 501, patch embedding frozen, no mixup.
    "esc50": TaskSettings(501, "sgd", 0.5, 200, 5, 128, 0.0, 15, 48, True, 0.5, False, freeze_embed=True),
    # util/ft-spc.sh: dur_frames None, so the 1-s clip's 101 frames on the pre-trained grid.
    "spcv2": TaskSettings(101, "sgd", 0.5, 200, 5, 128, 0.3, 30, 48, True, 0.5, False, interpolate_pos=False),
    # util/ft-vc1.sh: AdamW (EVAR's weight decay 1e-4, betas (0.9, 0.95)), 50 epochs of 8.2 s at 821 frames.
    "vc1": TaskSettings(821, "adamw", 5e-4, 50, 5, 64, 0.0, 30, 48, False, 0.0, False, weight_decay=1e-4),
}


def build_parser() -> Parser:
    p = Parser(prog=PROG, allow_abbrev=False,
               description="Fine-tune a pre-trained encoder on a task as the paper's Table VI does. Task "
                           "defaults are the paper's; each flag below overrides one. Rerunning the same command "
                           "resumes the run.",
               epilog="exit codes: " + "; ".join(f"{c} {t}" for c, t in sorted(runfolder.EXIT_CODES.items())))
    p.add_argument("weights", help="run folder, checkpoint or exported encoder (anything `m2das export` reads)")
    p.add_flag("--task", choices=sorted(TASKS), default="as20k")
    p.add_flag("--data_path", default="data",
               help=f"as20k, as2m: data folder made by `m2das prepare` (DATA/{datafolder.LMS_DIR}); esc50, spcv2, "
                    f"vc1: the data set's folder as its publisher distributes it")
    p.add_flag("--fold", type=int, default=1, help="esc50: the fold tested (1-5); the others: 1")
    p.add_flag("--lms_cache", default=None,
               help=f"esc50, spcv2, vc1: folder for the clips' LMS, made once (default RUN/{TASK_LMS_DIR})")
    p.add_flag("--metadata", default=None,
               help=f"folder with AudioSet's segment CSVs (default DATA/{datafolder.METADATA_DIR})")
    p.add_flag("--output_dir", default=None,
               help="run folder (default runs/finetune-{task}[-fold{fold}]-{weights}-s{seed})")
    p.add_flag("--seed", type=int, default=43, help="the reference's first fine-tuning seed")
    for name, kind in (("frames", int), ("optim", str), ("lr", float), ("epochs", int), ("warmup_epochs", float),
                       ("batch_size", int), ("mixup", float), ("freq_mask", int), ("time_mask", int),
                       ("training_mask", float)):
        p.add_flag(f"--{name}", type=kind, default=None, help="(default: the task's)")
    p.add_flag("--rrc", choices=("on", "off"), default=None, help="random resize crop (default: the task's)")
    p.add_flag("--eval_batch_size", type=int, default=64)
    p.add_flag("--num_workers", type=int, default=8, help="DataLoader workers per process")
    p.add_flag("--save_freq", type=int, default=50, help="write checkpoint-{epoch}.pth every N epochs")
    p.add_flag("--ckpt_interval_min", type=float, default=30, help="minutes between rolling full-state saves")
    p.add_flag("--log_every", type=int, default=50, help="optimizer steps between log lines")
    p.add_flag("--bf16", action="store_true", help="bf16 autocast (CUDA); default fp32 as the reference")
    p.add_flag("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_flag("--resume", default="auto", help="auto (newest valid checkpoint in the run folder) | none | PATH")
    p.add_flag("--force_config", action="store_true", help="continue a run folder whose config.json differs")
    return p


def parse_args(argv) -> dict:
    """Flags -> one flat configuration: the task's settings with the given flags over them."""
    args = vars(build_parser().parse_args(argv))
    task = asdict(TASKS[args["task"]])
    for key in OVERRIDES:
        if args.get(key) is not None:
            task[key] = (args[key] == "on") if key == "rrc" else args[key]
    cfg = {**args, **task, "model": Path(str(args["weights"])).name}
    if cfg["output_dir"] is None:
        cfg["output_dir"] = default_output_dir(cfg["task"], cfg["fold"], cfg["weights"], cfg["seed"])
    for key in ("frames", "epochs", "batch_size", "eval_batch_size", "save_freq", "log_every", "fold"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key} {cfg[key]}: must be at least 1")
    return cfg


def default_output_dir(task: str, fold: int, weights, seed: int, runs_dir="runs") -> str:
    """RUNS/finetune-{task}[-fold{fold}]-{weights' stem}-s{seed}; the fold only for fold tasks."""
    folds = task_sets.TASKS[task].n_folds if task in task_sets.TASKS else 1
    part = f"-fold{fold}" if folds > 1 else ""
    return str(Path(runs_dir) / f"finetune-{task}{part}-{Path(str(weights)).stem}-s{seed}")
