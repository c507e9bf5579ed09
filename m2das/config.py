"""Training flags (the reference's names, so the paper's command line runs verbatim) and
the values derived from them (world size, effective batch, absolute LR, steps).

The parser holds every default; `parse_args` turns its result into a frozen
TrainConfig, so a misspelt field is an AttributeError at the line that reads
it and every field can be found by name. config.json is its dataclasses.asdict.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

from m2das import loggers, machine, runfolder
from m2das.cliargs import DefaultsFormatter, Parser
from m2das.datafolder import WEIGHTED_LIST
from m2das.runfolder import folder_name

# Flags that change what is trained; a restart with any of them different is
# a different run. The rest (workers, logging, resume, ...) may change freely.
IDENTITY_KEYS = (
    "model", "input_size", "patch_size", "epochs", "batch_size", "accum_iter", "seed", "loss_off",
    "blr", "lr", "min_lr", "warmup_epochs", "mask_ratio", "ema_decay_init", "ema_decay",
    "clip_grad", "weight_decay", "weighted", "bf16", "init_from",
    "stats_files",
)
# Identity flags that may change when a run is resumed on purpose (--output_dir
# names the folder): the usual cures for a diverged run. They still name the run.
RESUME_SAFE_KEYS = ("blr", "lr", "min_lr", "bf16", "clip_grad")


def size_pair(text: str):
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FxT such as 80x608, got {text!r}") from None
    return [a, b]


def count(text: str) -> int:
    """An int flag that counts (0 or more): a negative one is refused, not read as 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def positive(text: str) -> int:
    """An int flag that must be 1 or more (a batch, an epoch count, a period): 0 would divide by zero or
    train nothing, so it is refused with the flag's name rather than failing hours later."""
    value = count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return value


def model_names() -> tuple:
    """The model registry's names (m2das/model.py MODEL_SIZES), read without importing torch.

    `m2das train --help`, `--print_config` and the launcher parse flags on login
    nodes; importing torch for a list of three names would cost seconds.
    """
    import ast

    tree = ast.parse((Path(__file__).with_name("model.py")).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_SIZES" for t in node.targets):
            return tuple(k.value for k in node.value.keys)
    raise RuntimeError("m2das/model.py has no MODEL_SIZES")


def model_name(text: str) -> str:
    names = model_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose one of {', '.join(names)}")
    return text


def _exit_codes_epilog() -> str:
    from m2das.runfolder import EXIT_CODES

    return "exit codes: " + "; ".join(f"{c} {t}" for c, t in sorted(EXIT_CODES.items()))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="m2das train", allow_abbrev=False,  # a typo is an error, not another flag's prefix
        description="M2D-AS pre-training. Defaults are the paper's run (300 epochs, 512 per GPU, "
                    "seed 3, loss_off 1). Rerunning the same command resumes the run. Flags are spelled "
                    "with underscores, as in the paper's command line; hyphens are accepted too.",
        epilog=_exit_codes_epilog(),
        formatter_class=DefaultsFormatter,
    )

    def a(name, *more, **kw):
        """--flag_name, also accepted as --flag-name."""
        alias = name.replace("_", "-")
        kw.setdefault("help", "(default: %(default)s)")
        p.add_argument(name, *more, *([alias] if alias != name else []), **kw)

    a("--model", type=model_name, default="m2d_as_vit_base", help=" | ".join(model_names()))
    a("--input_size", type=size_pair, default=[80, 608], help="FxT of the training crop (default 80x608)")
    a("--patch_size", type=size_pair, default=[16, 16])
    a("--epochs", type=positive, default=300)
    a("--batch_size", type=positive, default=512, help="per process (GPU)")
    a("--accum_iter", type=positive, default=1, help="batches per optimizer step")
    a("--save_freq", type=positive, default=50, help="write checkpoint-{epoch}.pth every N epochs")
    a("--keep_epochs", type=count, default=0,
      help="keep only the newest N checkpoint-{epoch}.pth, deleting older ones as new ones land; 0: keep all")
    a("--seed", type=int, default=3)
    a("--loss_off", type=float, default=1.0, help="weight of the offline (AudioSet label) loss")
    a("--data_path", default="data", help="data root: the list's file names are relative to it; or a packed "
      "folder (m2das pack), local or an fsspec URL, which needs no other data flag")
    a("--csv_main", default=None, help=f"list with file_name,label[,weight] (default DATA_PATH/{WEIGHTED_LIST})")
    a("--output_dir", default=None, help="run folder (default runs/{model}-{F}x{T}p{pf}x{pt}p16k-{YYMMDD}-{config})")
    a("--runs_dir", default="runs", help="parent of the default run folder")
    a("--bf16", action="store_true", help="bf16 autocast instead of fp16 + loss scaling")
    a("--num_workers", type=count, default=8, help="DataLoader workers per process")
    a("--blr", type=float, default=3e-4, help="base LR: lr = blr * effective batch / 256")
    a("--lr", type=float, default=None, help="absolute LR (overrides --blr)")
    a("--min_lr", type=float, default=0.0)
    a("--warmup_epochs", type=float, default=20)
    a("--mask_ratio", type=float, default=0.7)
    a("--ema_decay_init", type=float, default=0.99995)
    a("--ema_decay", type=float, default=0.99999)
    a("--clip_grad", type=float, default=3.0)
    a("--weight_decay", type=float, default=0.05)
    a("--weighted", action="store_true", help="sample by the list's weight column (the paper samples uniformly)")
    a("--init_from", default=None, help="start a fresh schedule from the weights of an M2D / M2D-AS checkpoint")
    a("--resume", default="auto", help="auto (newest valid checkpoint in the run folder) | none | PATH")
    a("--ckpt_interval_min", type=float, default=30, help="minutes between rolling full-state saves")
    a("--log_every", type=positive, default=50, help="optimizer steps between log lines")
    a("--stats_files", type=count, default=5000, help="files drawn for normalisation statistics")
    a("--device", type=machine.device_flag, default="auto", help=machine.DEVICE_HELP)
    a("--force_config", action="store_true", help="continue a run folder whose config.json differs")
    a("--skip_validation", action="store_true", help="do not check every listed file before training")
    a("--verify_shards", type=count, default=0, metavar="N", help="packed data: read every shard's CRC32 at the "
      "run's first start and every N starts after (1: this start and each one); 0: only shards whose size or "
      "mtime changed (default: %(default)s)")
    a("--print_config", action="store_true", help="print the resolved configuration as JSON and exit")
    a("--logger", choices=loggers.NAMES, default="none", help="an experiment logger beside TensorBoard "
      f"(rank 0; WANDB_PROJECT, WANDB_MODE=offline as wandb reads them; {loggers.INSTALL_HINT})")
    from m2das.monitor import add_monitor_flags  # --monitor_every, --monitor_list (torch-free)

    add_monitor_flags(a)
    return p


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`m2das train`'s flags, in the parser's order (defaults live in build_parser only)."""
    model: str
    input_size: list
    patch_size: list
    epochs: int
    batch_size: int
    accum_iter: int
    save_freq: int
    keep_epochs: int
    seed: int
    loss_off: float
    data_path: str
    csv_main: str
    output_dir: str | None
    runs_dir: str
    bf16: bool
    num_workers: int
    blr: float
    lr: float | None
    min_lr: float
    warmup_epochs: float
    mask_ratio: float
    ema_decay_init: float
    ema_decay: float
    clip_grad: float
    weight_decay: float
    weighted: bool
    init_from: str | None
    resume: str
    ckpt_interval_min: float
    log_every: int
    stats_files: int
    device: str
    force_config: bool
    skip_validation: bool
    verify_shards: int
    print_config: bool
    logger: str
    monitor_every: int
    monitor_list: str | None

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def parse_args(argv) -> TrainConfig:
    values = vars(build_parser().parse_args(argv))
    if values["csv_main"] is None:
        values["csv_main"] = str(Path(values["data_path"]) / WEIGHTED_LIST)
    return TrainConfig(**values)


def dist_env() -> dict:
    """World size and ranks as torchrun (or the launcher) set them."""
    return {
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "rank": int(os.environ.get("RANK", 0)),
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
    }


def count_list_rows(csv_path) -> int | None:
    """Data rows of a list without parsing it (None when it is absent)."""
    try:
        with open(csv_path, "rb") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return None


def resolve(cfg: TrainConfig, world_size: int, num_files: int | None) -> dict:
    """The numbers a user wants to see before committing days of GPU time."""
    effective = cfg.batch_size * cfg.accum_iter * world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * effective / 256
    out = {"world_size": world_size, "effective_batch_size": effective, "abs_lr": lr,
           "num_files": num_files, "batches_per_epoch": None, "steps_per_epoch": None,
           "total_batches": None, "total_steps": None}
    if num_files is not None:
        batches = num_files // (cfg.batch_size * world_size)
        out.update(batches_per_epoch=batches, steps_per_epoch=batches // cfg.accum_iter,
                   total_batches=batches * cfg.epochs, total_steps=batches // cfg.accum_iter * cfg.epochs)
    return out


def short_config(cfg: TrainConfig, world_size: int) -> str:
    """A compact, dash-free tag of the run; a hash keeps distinct configs apart."""
    ident = json.dumps(identity(cfg), sort_keys=True)
    digest = hashlib.sha1(ident.encode()).hexdigest()[:6]
    eff = cfg.batch_size * cfg.accum_iter * world_size
    loss_off = f"{cfg.loss_off:g}".replace(".", "p")
    return f"M2DASe{cfg.epochs}b{eff}s{cfg.seed}off{loss_off}h{digest}"


def run_name(cfg: TrainConfig, world_size: int, date: datetime.date | None = None) -> str:
    """{model}-{F}x{T}p{pf}x{pt}p16k-{YYMMDD}-{config}: the form the published runtime parses."""
    date = date or datetime.date.today()
    return folder_name(cfg.model, cfg.input_size, cfg.patch_size, f"{date:%y%m%d}",
                       short_config(cfg, world_size))


def default_output_dir(cfg: TrainConfig, world_size: int) -> Path:
    """An unfinished run of the same configuration if there is one, else a new dated folder.

    Without this a plain rerun the next day would start over in a new folder.
    """
    runs = Path(cfg.runs_dir)
    pattern = folder_name(cfg.model, cfg.input_size, cfg.patch_size, "*", short_config(cfg, world_size))
    unfinished = [d for d in sorted(runs.glob(pattern)) if not runfolder.final_weights(d, cfg.epochs).exists()]
    return unfinished[-1] if unfinished else runs / run_name(cfg, world_size)


def identity(cfg) -> dict:
    """The identity flags of a TrainConfig or of a saved config.json (missing ones as None)."""
    values = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    return {k: values.get(k) for k in IDENTITY_KEYS}


def config_differences(saved, cfg):
    """(changes that make it another run, resume-safe changes), each as "key: old -> new" lines."""
    old, new = identity(saved), identity(cfg)
    changed = [k for k in IDENTITY_KEYS if old[k] != new[k]]
    text = {k: f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed}
    return ([text[k] for k in changed if k not in RESUME_SAFE_KEYS],
            [text[k] for k in changed if k in RESUME_SAFE_KEYS])
