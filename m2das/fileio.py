"""File primitives: atomic writes (a kill at any instant leaves the old file or the new one), JSON lines, URLs."""

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (there is no way to read it without setting it)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def is_url(path) -> bool:
    """A location fsspec opens (s3://, gs://, file://, ...) rather than a plain path."""
    return "://" in str(path)


def url_fs(url):
    """(fsspec filesystem, path inside it); credentials come from the backend's usual environment and files."""
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def fsync_dir(folder) -> None:
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object; on success it replaces `path` (fsync, rename, fsync dir).

    The temporary file sits in the destination folder so the rename never
    crosses file systems; on error it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; others must read a shared folder
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def append_jsonl(path, obj) -> None:
    """One self-contained line per call; a torn last line is skipped by readers."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


def read_jsonl(path) -> list:
    """Rows (dicts) of a JSON-lines file; a torn last line from a kill mid-write is skipped."""
    rows = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows
