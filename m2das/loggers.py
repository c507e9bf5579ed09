"""An experiment logger beside TensorBoard, off unless `m2das train --logger wandb` asks for it.

Torch-free, and the logger's package is imported only when a run uses it, so
`m2das train --help` and runs without one never pay for it. Rank 0 logs. The
run's id comes from its run folder (its name and the time of its first start),
so every resume of the folder, on any machine, continues the same logger run.
"""

import hashlib
import importlib.util
import os
from pathlib import Path

from m2das import runfolder
from m2das.fileio import read_jsonl

NAMES = ("none", "wandb")
EXTRA = "logger"  # pyproject.toml's optional dependencies that hold the loggers' packages
INSTALL_HINT = f"pip install 'm2das[{EXTRA}]'"
DEFAULT_PROJECT = "m2das"  # when WANDB_PROJECT is not set
STEP_KEY = "step"  # the x axis of every scalar: the optimizer step, also after a resume


class LoggerError(ValueError):
    """The asked-for logger cannot run; one line naming the fix."""


def require(name: str) -> None:
    """Fail before any work when the logger's package is missing (a lookup, no import)."""
    if name == "none":
        return
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if not found:
        raise LoggerError(f"--logger {name} needs the {name} package, which is not installed: {INSTALL_HINT}")


def run_id(run_dir) -> str:
    """Stable for a run folder across resumes; two folders of the same name started apart differ."""
    run_dir = Path(run_dir)
    starts = [r for r in read_jsonl(run_dir / runfolder.RESTARTS) if r.get("event") == runfolder.EVENT_START]
    first = repr(starts[0].get("time")) if starts else ""
    return "m2das-" + hashlib.sha1(f"{run_dir.name}\n{first}".encode()).hexdigest()[:16]


class NoLogger:
    """What ranks other than 0, and runs without --logger, log to."""

    def log(self, scalars: dict, step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class WandbLogger(NoLogger):
    """Weights & Biases; WANDB_MODE=offline writes the run under WANDB_DIR (default: the run folder)
    for a later `wandb sync`, the usual case on compute nodes without internet."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), id=run_id(run_dir),
                                  name=Path(run_dir).name, resume="allow", config=config,
                                  dir=os.environ.get("WANDB_DIR") or str(run_dir))
        except Exception as e:  # wandb's own errors (no API key, no network) have no common base
            raise LoggerError(f"--logger wandb: wandb.init failed ({type(e).__name__}: {e}); run `wandb login`, "
                              f"set WANDB_API_KEY, or set WANDB_MODE=offline and `wandb sync` later") from None
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)  # a resume re-logs steps: no monotonic-step warnings

    def log(self, scalars: dict, step: int) -> None:
        self.run.log({**scalars, STEP_KEY: step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_logger(name: str, run_dir, rank: int, config: dict) -> NoLogger:
    if name == "none" or rank != 0:
        return NoLogger()
    require(name)
    return WandbLogger(Path(run_dir), config)
