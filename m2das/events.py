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


def log(msg: str, rank: int = 0, *, prog: str | None = "m2das", stream=None, stderr: bool = False,
        clock: bool = True, local_paths: bool = False) -> None:
    """`[prog HH:MM:SS] msg` on stdout (or `stream`), from rank 0 only; without the clock `prog: msg`
    (or the bare message without a prog), as prepare and pack print on stderr (`stderr`,
    looked up at each call). local_paths: a line about
    the staging copy itself (object storage)."""
    if rank == 0:
        for local, shown in () if local_paths else _SHOWN_AS.items():
            msg = msg.replace(local, shown)
        if clock:
            line = f"[{prog} {datetime.datetime.now():%H:%M:%S}] {msg}"
        else:
            line = f"{prog}: {msg}" if prog else msg
        print(line, file=stream or (sys.stderr if stderr else sys.stdout), flush=True)


def record(run_dir, event: str, **fields) -> dict:
    """Append one event row to RUN/restarts.jsonl; returns the row."""
    row = {"time": time.time(), "event": event, **fields}
    append_jsonl(Path(run_dir) / runfolder.RESTARTS, row)
    return row
