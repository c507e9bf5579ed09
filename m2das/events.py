"""How commands talk: one log-line helper and one writer for the run folder's restarts.jsonl events.

Log lines carry a clock so a long job's output can be read against its files;
restart events carry `time` as Unix seconds (a float), the one timestamp
format `m2das status` and the requeue policy read back.
"""

import datetime
import sys
import time
from pathlib import Path

from m2das import runfolder
from m2das.fileio import append_jsonl


_SHOWN_AS = {}  # local folder -> what messages call it (a staged run folder's URL)


def show_as(local, shown: str) -> None:
    """Log lines name `local` and files in it by `shown` (object storage: the bucket, not the staging copy)."""
    _SHOWN_AS[str(local).rstrip("/")] = shown.rstrip("/")


def log(msg: str, rank: int = 0, *, prog: str = "m2das", stream=None, local_paths: bool = False) -> None:
    """`[prog HH:MM:SS] msg` on stdout (or `stream`), from rank 0 only; local_paths: a line about the copy itself."""
    if rank == 0:
        for local, shown in () if local_paths else _SHOWN_AS.items():
            msg = msg.replace(local, shown)
        print(f"[{prog} {datetime.datetime.now():%H:%M:%S}] {msg}", file=stream or sys.stdout, flush=True)


def record(run_dir, event: str, **fields) -> dict:
    """Append one event row to RUN/restarts.jsonl; returns the row."""
    row = {"time": time.time(), "event": event, **fields}
    append_jsonl(Path(run_dir) / runfolder.RESTARTS, row)
    return row
