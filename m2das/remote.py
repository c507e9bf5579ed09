"""Run folders in object storage (`--output_dir s3://bucket/runs/NAME`, or any fsspec URL).

The trainer works in a local staging folder with every guarantee of a local
run folder, and this module mirrors it to the URL so that a job on another
node resumes from there:

- At start, the small files, the rolling checkpoints and the newest epoch
  checkpoint are fetched into the staging folder; the local checkpointer then
  ranks, verifies and loads them as usual.
- Epoch checkpoints are uploaded under their own names (`checkpoint-E.pth`,
  written once, so a plain PUT is atomic). The rolling checkpoint is replaced
  often and object stores cannot rename: each one is uploaded as a uniquely
  named object under `objects/`, then the small pointer `last.pth.json` is
  written last (the one before it is kept as `last.prev.pth.json`). Objects
  no pointer names are deleted only after both pointers are written, so at
  every instant the objects both pointers name exist.
- The lock is an object created with a conditional PUT (create only if
  absent, which S3 and compatible servers honour), refreshed by a heartbeat
  and judged stale by the same rules as the local lock.

Credentials come from each backend's usual environment variables and
configuration files (for S3: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
~/.aws/...), never from flags. Torch-free: `m2das status` uses it too.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from m2das import events, runfolder
from m2das.fileio import read_jsonl, url_fs

SMALL_FILES = (runfolder.CONFIG, runfolder.CLASSES, runfolder.NORM_STATS, runfolder.VALIDATED, runfolder.LOG,
               runfolder.RESTARTS, runfolder.LAUNCHER)
POINTER_SUFFIX = ".json"  # last.pth.json names the object that holds last.pth
OBJECTS_DIR = "objects"


def staging_for(url: str) -> Path:
    """The local working copy of a remote run folder: the same path on every node (M2DAS_STAGING_DIR)."""
    base = Path(os.environ.get("M2DAS_STAGING_DIR") or Path(tempfile.gettempdir()) / "m2das-staging")
    return base / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]


class RemoteError(Exception):
    """Object storage refused or failed; one line naming the URL."""


def _fs(url: str):
    try:
        return url_fs(url)
    except (ImportError, ValueError) as e:
        raise RemoteError(f"{url}: no storage backend for this URL ({e}); install its fsspec package "
                          f"(s3fs for s3://, gcsfs for gs://)") from None


class RemoteRunFolder(runfolder.LockWatch):
    def __init__(self, url: str, staging: Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = _fs(self.url)
        self.staging = Path(staging) if staging else Path(tempfile.mkdtemp(prefix="m2das-run-"))
        self._lock_token = None
        self._stop = threading.Event()
        self.took_over = None
        self._uploaded = set()  # (inode, size, mtime_ns) of the checkpoint files in the bucket
        self._small_files_uploaded = False

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read_pointer(self, name: str):
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            return json.loads(self.fs.cat_file(self._key(name + POINTER_SUFFIX)))
        return None

    # -- start-up ------------------------------------------------------------------------
    def hydrate(self, checkpoints: bool = True) -> list:
        """Fetch what a restart needs into the staging folder; returns the names fetched.

        The staging folder is emptied first: the bucket is the truth, and a copy left on this node by
        an earlier run of the same URL must not be resumed from.
        """
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        fetched = []
        try:
            for name in SMALL_FILES:
                with contextlib.suppress(FileNotFoundError):
                    data = self.fs.cat_file(self._key(name))
                    (self.staging / name).write_bytes(data)
                    fetched.append(name)
            if not checkpoints:
                return fetched
            for name in (runfolder.LAST, runfolder.PREVIOUS):
                pointer = self._read_pointer(name)
                if pointer is not None:
                    self.fetch(f"{OBJECTS_DIR}/{pointer['object']}", self.staging / name)
                    fetched.append(name)
            epochs = runfolder.saved_epochs(self._list())
            if epochs:
                name = runfolder.epoch_checkpoint_name(max(epochs))
                self.fetch(name, self.staging / name)
                fetched.append(name)
        except OSError as e:
            raise RemoteError(f"{self.url}: cannot read the run folder ({type(e).__name__}: {e})") from None
        for name in fetched:
            self._mark_uploaded(self.staging / name)  # a copy of what the bucket holds
        return fetched

    def _mark_uploaded(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            st = path.stat()
            self._uploaded.add((st.st_ino, st.st_size, st.st_mtime_ns))

    def _all_uploaded(self) -> bool:
        """Every checkpoint in the staging folder (last.prev.pth is a renamed last.pth) is in the bucket."""
        for p in runfolder.checkpoint_files(self.staging):
            st = p.stat()
            if (st.st_ino, st.st_size, st.st_mtime_ns) not in self._uploaded:
                return False
        return self._small_files_uploaded

    def _list(self) -> list:
        try:
            return self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []

    def fetch(self, name: str, dest: Path) -> None:
        """Download one object of the run folder to `dest`, atomically."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        self.fs.get_file(self._key(name), str(tmp))
        os.replace(tmp, dest)

    # -- publishing ----------------------------------------------------------------------
    def publish_checkpoint(self, path: Path, step: int) -> None:
        """Upload a checkpoint the local checkpointer has just completed (raises OSError/RemoteError)."""
        path = Path(path)
        if path.name != runfolder.LAST:
            self.fs.put_file(str(path), self._key(path.name))
            self._mark_uploaded(path)
            events.log(f"uploaded checkpoint {path.name} (step {step}) to {self.url}/{path.name}")
            self._prune_local_epoch_checkpoints(keep=path)
        else:
            obj = f"last-{step:09d}-{uuid.uuid4().hex[:8]}.pth"
            self.fs.put_file(str(path), self._key(f"{OBJECTS_DIR}/{obj}"))
            previous = self._read_pointer(runfolder.LAST)
            if previous is not None:
                self.fs.pipe_file(self._key(runfolder.PREVIOUS + POINTER_SUFFIX), json.dumps(previous).encode())
            self.fs.pipe_file(self._key(runfolder.LAST + POINTER_SUFFIX),
                              json.dumps({"object": obj, "step": step, "bytes": path.stat().st_size}).encode())
            self._mark_uploaded(path)
            events.log(f"uploaded checkpoint {path.name} (step {step}) to {self.url}/{OBJECTS_DIR}/{obj} "
                       f"(named by {self.url}/{runfolder.LAST}{POINTER_SUFFIX})")
            keep = {obj} | ({previous["object"]} if previous else set())
            for key in self.fs.ls(self._key(OBJECTS_DIR), detail=False):
                if Path(key).name not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(key)
        self.publish_small_files()

    def _prune_local_epoch_checkpoints(self, keep: Path) -> None:
        """Staging keeps only the newest epoch checkpoint; the others are safe in the bucket."""
        for p in runfolder.checkpoint_files(self.staging):
            if runfolder.EPOCH_CHECKPOINT_RE.match(p.name) and p != keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    def publish_small_files(self) -> None:
        self._small_files_uploaded = False
        for name in SMALL_FILES:
            local = self.staging / name
            if local.exists():
                self.fs.put_file(str(local), self._key(name))
        events = self.staging / runfolder.EVENTS_DIR
        if events.is_dir():
            for f in events.iterdir():
                if f.is_file():
                    self.fs.put_file(str(f), self._key(f"{runfolder.EVENTS_DIR}/{f.name}"))
        self._small_files_uploaded = True

    # -- the lock ------------------------------------------------------------------------
    def acquire(self) -> "RemoteRunFolder":
        heartbeat_s, _ = runfolder.lock_timing()  # a bad setting is refused before anything is touched
        me = {**runfolder.holder_record(), "url": self.url}
        key = self._key(runfolder.LOCK)
        for _ in range(5):
            try:
                with self.fs.open(key, "xb") as f:  # conditional PUT: only if absent
                    f.write(json.dumps(me).encode())
                holder, _ = self._read_lock(key)
                if (holder or {}).get("token") != me["token"]:  # a store that ignored the condition
                    raise runfolder.RunLocked(f"{key}: another trainer wrote the lock at the same moment "
                                              f"({runfolder.describe(holder or {})}); this store may not honour "
                                              f"conditional writes, so run one trainer per folder by hand")
                self._lock_token = me["token"]
                self._start_heartbeat(key, me, heartbeat_s)
                events.show_as(self.staging, self.url)  # messages name the bucket, not this node's copy
                return self
            except FileExistsError:
                pass
            holder, age = self._read_lock(key)
            if holder is None:
                continue
            why = runfolder.stale_reason(holder, age, job_id=me["job_id"], host=me["host"])
            if why is None:
                raise runfolder.RunLocked(runfolder.locked_message(self.url, holder, age))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(key)
            self.took_over = f"{runfolder.describe(holder)}: {why}"
        raise runfolder.RunLocked(f"{key}: could not take the lock after repeated races with another trainer")

    def _read_lock(self, key: str):
        """(holder, age of the object) or (None, None) when absent; an empty or garbled object is a holder
        we know nothing of ({}), judged by its age like a silent one."""
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(key)  # a listing cached earlier must not hide a newer lock
        try:
            info = self.fs.info(key)
        except FileNotFoundError:
            return None, None
        modified = info.get("LastModified") or info.get("mtime") or info.get("created")
        when = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or time.time())
        try:
            holder = json.loads(self.fs.cat_file(key))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            holder = {}
        return (holder if isinstance(holder, dict) else {}), time.time() - when

    def _start_heartbeat(self, key: str, me: dict, heartbeat_s: float) -> None:
        """Refresh the lock object each beat, after checking it still names us; stop the trainer if not."""
        def beat():
            while not self._stop.wait(heartbeat_s):
                try:
                    holder, _ = self._read_lock(key)
                except Exception:  # the store did not answer (whatever its client raises): the next beat asks again
                    continue
                why = runfolder.lost_reason(holder, me["token"], f"{self.url}/{runfolder.LOCK}")
                if why is not None:
                    self._lose(why)
                    return
                with contextlib.suppress(OSError):
                    self.fs.pipe_file(key, json.dumps(me).encode())

        threading.Thread(target=beat, name="m2das-remote-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        key = self._key(runfolder.LOCK)
        try:
            holder, _ = self._read_lock(key)
        except OSError:
            holder = None  # the store did not answer: the lock goes stale by its age
        if holder and holder.get("token") == self._lock_token:
            with contextlib.suppress(OSError):
                self.fs.rm_file(key)
        self._remove_staging_if_clean()

    def _remove_staging_if_clean(self) -> None:
        """A run that finished or stopped with everything in the bucket leaves no copy on this node.

        After a failure the copy stays for a look; the next start empties it anyway (hydrate).
        """
        rows = [r for r in read_jsonl(self.staging / runfolder.RESTARTS) if r.get("event")]
        ended = rows and rows[-1]["event"] in (runfolder.EVENT_FINISHED, runfolder.EVENT_STOPPED)
        try:
            clean = ended and self._all_uploaded()
        except OSError:
            clean = False
        if clean:
            shutil.rmtree(self.staging, ignore_errors=True)
            events.log(f"removed the staging copy {self.staging} (everything is in {self.url})", local_paths=True)
        elif rows:
            events.log(f"kept the staging copy {self.staging}: not everything reached {self.url}", local_paths=True)


def fetch_for_reading(url: str, checkpoints: bool = True, epoch: int | None = None) -> Path:
    """A local copy of a remote run folder, in a folder of the same name (export parses it): its small
    files (for status), and its newest checkpoints or checkpoint-`epoch`.pth (for export)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    folder = RemoteRunFolder(url, Path(tempfile.mkdtemp(prefix="m2das-read-")) / name)
    folder.hydrate(checkpoints=checkpoints and epoch is None)
    if epoch is not None:
        wanted = runfolder.epoch_checkpoint_name(epoch)
        try:
            folder.fetch(wanted, folder.staging / wanted)
        except FileNotFoundError:
            raise RemoteError(f"{url}/{wanted}: no such checkpoint") from None
        except OSError as e:
            raise RemoteError(f"{url}/{wanted}: cannot be read ({type(e).__name__}: {e})") from None
    return folder.staging
