"""File primitives: atomic writes (a kill at any instant leaves the old file or the new one), JSON lines, URLs."""

import contextlib
import errno
import json
import os
import shutil
import sys
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


def check_writable(folder) -> None:
    """Make `folder` and a scratch file in it (OSError if either fails): a long job learns before its
    work, not after, that it could not save the result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def full_disk_error(e: OSError, path, need: int) -> OSError:
    """`e` as ENOSPC when it is one: numpy's short write ("N requested and M written") carries no errno,
    so the free space beside `path` decides then; any other error is returned as it is."""
    if e.errno is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(path).parent).free < need:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return e


def write_failure(e: OSError, folder) -> str:
    """A failed write into `folder` in words: a full disk said as such, else the file and the reason."""
    e = full_disk_error(e, Path(folder) / ".", 1 << 20)
    where = e.filename or folder
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {folder}" + (f" (writing {where})" if str(where) != str(folder) else "")
    return f"cannot write {where} ({e.strerror or e})"


def write_json(path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


class LinkRefused(OSError):
    """A file or folder of ours found as a symbolic link: writing through it would change a file elsewhere.

    The rule: a file written whole (atomic_write) replaces a link, its target untouched; a file
    appended to, or a folder written into, is refused while it is a link.
    """


def link_message(path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"{path} is a symbolic link (to {target}); remove the link (this folder writes only its own files)"


def refuse_links(folder, names) -> None:
    """LinkRefused for the first of folder/NAME that is a symbolic link (appended to or written into)."""
    for name in names:
        if os.path.islink(Path(folder) / name):
            raise LinkRefused(link_message(Path(folder) / name))


def open_append(path, mode: str = "a"):
    """`open(path, mode)` for appending, refusing a symbolic link (O_NOFOLLOW) with LinkRefused."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkRefused(link_message(path)) from None
        raise
    return os.fdopen(fd, mode)


def append_jsonl(path, obj) -> None:
    """One self-contained line per call; a torn last line is skipped by readers. A link is refused."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open_append(path) as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


_WARNED_UNDECODABLE = set()


def read_jsonl(path) -> list:
    """Rows (dicts) of a JSON-lines file; a torn last line from a kill mid-write is skipped, and so is a
    line that is not UTF-8 (with one warning per file): a damaged line must not stop a resume."""
    rows, undecodable = [], 0
    with contextlib.suppress(OSError), open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                undecodable += 1
                continue
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    if undecodable and str(path) not in _WARNED_UNDECODABLE:
        _WARNED_UNDECODABLE.add(str(path))
        print(f"warning: {path}: skipped {undecodable} line(s) that are not UTF-8 text", file=sys.stderr)
    return rows
