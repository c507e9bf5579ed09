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
- The store's failures come out as StoreUnavailable (it did not answer: a
  resumable stop) or RemoteError (it refused: bad input), named by the object's
  URL (m2das.storeerrors). A trainer that stops waits a while for the store to
  answer again (close()), so a short outage leaves no lock and loses no save.

Credentials come from each backend's usual environment variables and
configuration files (for S3: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
~/.aws/...), never from flags. Torch-free: `m2das status` uses it too.
"""

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from m2das import events, runfolder
from m2das.datafolder import RECIPE_FILE
from m2das.fileio import read_jsonl, url_fs
from m2das.storeerrors import RemoteError, StoreUnavailable, store_errors

SMALL_FILES = (runfolder.CONFIG, runfolder.CLASSES, runfolder.NORM_STATS, runfolder.VALIDATED, RECIPE_FILE,
               runfolder.LOG, runfolder.RESTARTS, runfolder.LAUNCHER)
POINTER_SUFFIX = ".json"  # last.pth.json names the object that holds last.pth
OBJECTS_DIR = "objects"


def staging_for(url: str) -> Path:
    """The local working copy of a remote run folder: the same path on every node (M2DAS_STAGING_DIR)."""
    base = Path(os.environ.get("M2DAS_STAGING_DIR") or Path(tempfile.gettempdir()) / "m2das-staging")
    return base / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]


STORE_WAIT_ENV = "M2DAS_STORE_WAIT_S"  # how long a stopping trainer waits for the store to come back
STORE_WAIT_S = 120.0  # ... to upload its logs and release the lock object (a short outage leaves no lock)


def store_wait_s() -> float:
    """STORE_WAIT_ENV in seconds (>= 0); a bad value is a RemoteError naming the variable."""
    raw = os.environ.get(STORE_WAIT_ENV, "").strip()
    try:
        wait = float(raw) if raw else STORE_WAIT_S
    except ValueError:
        wait = -1.0
    if not wait >= 0:
        raise RemoteError(f"{STORE_WAIT_ENV}={raw!r}: not a number of seconds >= 0; unset it for the default "
                          f"({STORE_WAIT_S:.0f} s)")
    return wait


def while_unavailable(fn, why: str, log=events.log):
    """fn() again while the store does not answer, for up to STORE_WAIT_ENV seconds (said once, with
    `why` it waits); then its StoreUnavailable. A short outage costs a wait, not a requeue."""
    wait = store_wait_s()
    deadline, said = time.monotonic() + wait, False
    while True:
        try:
            return fn()
        except StoreUnavailable as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not said:  # the setting, not what is left of it after the first try's timeout
                log(f"{e}; waiting up to {wait:.0f} s ({STORE_WAIT_ENV}) for it {why}")
                said = True
            time.sleep(min(2.0, left))


def modified_time(entry: dict):
    """The modification time (epoch seconds) of a listing entry or info() answer, whatever the backend."""
    when = entry.get("LastModified") or entry.get("mtime") or entry.get("created") or entry.get("updated")
    if isinstance(when, str):  # gcsfs and others: ISO 8601
        with contextlib.suppress(ValueError):
            when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    if hasattr(when, "timestamp"):
        return (when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)).timestamp()
    with contextlib.suppress(TypeError, ValueError):
        return float(when)
    return None


def _fs(url: str):
    try:
        return url_fs(url)
    except (ImportError, ValueError) as e:
        raise RemoteError(f"{url}: no storage backend for this URL ({e}); install its fsspec package "
                          f"(s3fs for s3://, gcsfs for gs://)") from None


def _signature(path: Path):
    """(inode, size, mtime_ns) of a local file, or None: tells a file from its replacement."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _StoreFS:
    """An fsspec filesystem whose failures are StoreUnavailable or RemoteError naming the object's URL;
    absent and existing objects still raise FileNotFoundError / FileExistsError, which callers read."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            url, remote_args = "the object store", args[1:2] if name in ("put_file", "put") else args[:1]
            if remote_args and isinstance(remote_args[0], str):  # put_file(local, remote): name the object
                url = self._fs.unstrip_protocol(remote_args[0])
            with store_errors(url, keep=(FileNotFoundError, FileExistsError)):
                return attr(*args, **kwargs)
        return call


class RemoteRunFolder(runfolder.LockWatch):
    def __init__(self, url: str, staging: Path | None = None):
        self.url = url.rstrip("/")
        fs, self.root = _fs(self.url)
        self.fs = _StoreFS(fs)
        self._own_staging = staging is None  # a temporary folder of ours: removed on release when unused
        self.staging = Path(staging) if staging else Path(tempfile.mkdtemp(prefix="m2das-run-"))
        self.warnings = []  # what was skipped in the bucket (garbled pointers, missing objects)
        self._lock_token = None
        self._stop = threading.Event()
        self.took_over = None
        self._uploaded = set()  # (inode, size, mtime_ns) of the checkpoint files in the bucket
        self._pending = {}  # name -> (step, signature) of a checkpoint whose upload failed
        self._small_files_uploaded = False

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read_pointer(self, name: str):
        """The pointer {object, step, bytes} to `name`'s object, or None when absent or garbled (warned)."""
        try:
            pointer = json.loads(self.fs.cat_file(self._key(name + POINTER_SUFFIX)))
        except FileNotFoundError:
            return None
        except ValueError as e:
            pointer = f"not JSON ({e})"
        if not (isinstance(pointer, dict) and isinstance(pointer.get("object"), str)
                and re.fullmatch(r"[\w.-]+", pointer["object"])):
            self._warn(f"{self.url}/{name}{POINTER_SUFFIX} is not a checkpoint pointer "
                       f"({pointer if isinstance(pointer, str) else 'no object name'}); ignoring it")
            return None
        return pointer

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

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
                if pointer is None:
                    continue
                try:
                    self.fetch(f"{OBJECTS_DIR}/{pointer['object']}", self.staging / name)
                except FileNotFoundError:  # the other pointer, or an epoch checkpoint, is the fallback
                    self._warn(f"{self.url}/{name}{POINTER_SUFFIX} names {OBJECTS_DIR}/{pointer['object']} "
                               f"(step {pointer.get('step', 'unknown')}), which is missing; skipping it")
                    continue
                fetched.append(name)
            epochs = runfolder.saved_epochs(e["name"] for e in self.listing())
            if epochs:
                name = runfolder.epoch_checkpoint_name(max(epochs))
                self.fetch(name, self.staging / name)
                fetched.append(name)
        except (StoreUnavailable, RemoteError):
            raise
        except OSError as e:
            raise RemoteError(f"{self.url}: cannot read the run folder ({type(e).__name__}: {e})") from None
        finally:
            for message in self.warnings:
                events.log(f"warning: {message}")
        for name in fetched:
            self._mark_uploaded(self.staging / name)  # a copy of what the bucket holds
        return fetched

    def _mark_uploaded(self, path: Path) -> None:
        signature = _signature(path)
        if signature is not None:
            self._uploaded.add(signature)

    def _all_uploaded(self) -> bool:
        """Every checkpoint in the staging folder (last.prev.pth is a renamed last.pth) is in the bucket."""
        for p in runfolder.checkpoint_files(self.staging):
            if _signature(p) not in self._uploaded:
                return False
        return self._small_files_uploaded

    def listing(self) -> list:
        """The run folder's top level in the bucket: {name, mtime, bytes} per entry ([] when absent)."""
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return [{"name": Path(e["name"]).name, "mtime": modified_time(e), "bytes": int(e.get("size") or 0)}
                for e in entries]

    def checkpoints(self) -> list:
        """The checkpoints the bucket holds ({name, mtime, bytes}): epoch checkpoints under their names,
        the rolling ones through their pointers (what `m2das status` shows)."""
        found = []
        for entry in self.listing():
            name = entry["name"]
            if runfolder.EPOCH_CHECKPOINT_RE.match(name):
                found.append(entry)
            elif name in (runfolder.LAST + POINTER_SUFFIX, runfolder.PREVIOUS + POINTER_SUFFIX):
                pointer = self._read_pointer(name[:-len(POINTER_SUFFIX)])
                if pointer is not None:
                    found.append({**entry, "name": name[:-len(POINTER_SUFFIX)],
                                  "bytes": int(pointer.get("bytes") or 0)})
        return found

    def fetch(self, name: str, dest: Path) -> None:
        """Download one object of the run folder to `dest`, atomically."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        self.fs.get_file(self._key(name), str(tmp))
        os.replace(tmp, dest)

    # -- publishing ----------------------------------------------------------------------
    def publish_checkpoint(self, path: Path, step: int) -> None:
        """Upload a checkpoint the local checkpointer has just completed (raises StoreUnavailable,
        RemoteError, OSError); one that failed is uploaded again by close() once the store answers."""
        path = Path(path)
        try:
            self._publish(path, step)
        except BaseException:
            self._pending[path.name] = (step, _signature(path))
            raise
        self._pending.pop(path.name, None)

    def _publish_pending(self) -> None:
        for name, (step, signature) in sorted(self._pending.items()):
            path = self.staging / name
            if signature in self._uploaded or signature is None or _signature(path) != signature:
                del self._pending[name]  # uploaded since, or replaced by a newer save
                continue
            self.publish_checkpoint(path, step)

    def _publish(self, path: Path, step: int) -> None:
        if path.name != runfolder.LAST:
            self.fs.put_file(str(path), self._key(path.name))
            self._mark_uploaded(path)
            events.log(f"uploaded checkpoint {path.name} (step {step}) to {self.url}/{path.name}")
            self._prune_local_epoch_checkpoints(keep=path)
        else:
            obj = f"last-{step:09d}-{uuid.uuid4().hex[:8]}.pth"
            self.fs.put_file(str(path), self._key(f"{OBJECTS_DIR}/{obj}"))
            previous = self._read_pointer(runfolder.LAST)
            if previous is not None and self.fs.exists(self._key(f"{OBJECTS_DIR}/{previous['object']}")):
                self.fs.pipe_file(self._key(runfolder.PREVIOUS + POINTER_SUFFIX), json.dumps(previous).encode())
            else:  # a pointer to a missing object is no fallback: the older one stays, and its object
                previous = self._read_pointer(runfolder.PREVIOUS)
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

    def close(self, upload: bool = True, log=events.log) -> None:
        """Upload a failed save and the logs (`upload`), then release the lock. A store that does not
        answer is waited for (up to STORE_WAIT_ENV seconds), so that a short outage still leaves the
        bucket complete and unlocked; past that the lock object stays and goes stale by its age."""
        def settle():
            if upload:
                self._publish_pending()  # a checkpoint whose upload failed: nothing is lost
                self.publish_small_files()
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.info(self._key(runfolder.LOCK))  # only: does the store answer?
        try:
            while_unavailable(settle, "to upload the logs and release the lock", log)
        except StoreUnavailable as e:
            log(f"warning: could not upload the logs nor release the lock in {self.url}: {e}; the next "
                f"start takes the lock over once it is stale")
            self._stop.set()  # no heartbeat: the lock object ages and goes stale
            return
        except (RemoteError, OSError) as e:
            log(f"warning: could not upload the logs to {self.url}: {e}")
        try:
            self.release()
        except Exception as e:  # the store failed between the two: the lock goes stale by its age
            log(f"warning: could not release the lock {self.url}/{runfolder.LOCK}: {e}")

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
        """A run that ended (finished, stopped, failed) with everything in the bucket leaves no copy on
        this node: the bucket holds all of it. A copy holding what the bucket lacks (a checkpoint whose
        upload failed) stays for a look; the next start on this node empties it anyway (hydrate)."""
        if self._own_staging and self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()  # the unused temporary folder of a lock taken by hand
            return
        rows = [r for r in read_jsonl(self.staging / runfolder.RESTARTS) if r.get("event")]
        try:
            clean = self._all_uploaded()
        except OSError:
            clean = False
        if clean:
            shutil.rmtree(self.staging, ignore_errors=True)
            events.log(f"removed the staging copy {self.staging} (everything is in {self.url})", local_paths=True)
        elif rows:
            events.log(f"kept the staging copy {self.staging}: not everything reached {self.url}", local_paths=True)


@contextlib.contextmanager
def reading_copy(url: str, checkpoints: bool = True, epoch: int | None = None):
    """A local copy of a remote run folder for the block, in a folder of the same name (export parses it):
    its small files (for status), and its newest checkpoints or checkpoint-`epoch`.pth (for export).
    Yields the RemoteRunFolder (its .staging is the copy); the copy is removed after the block."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    tmp = Path(tempfile.mkdtemp(prefix="m2das-read-"))
    try:
        folder = RemoteRunFolder(url, tmp / name)
        folder.hydrate(checkpoints=checkpoints and epoch is None)
        if epoch is not None:
            wanted = runfolder.epoch_checkpoint_name(epoch)
            try:
                folder.fetch(wanted, folder.staging / wanted)
            except FileNotFoundError:
                raise RemoteError(f"{url}/{wanted}: no such checkpoint") from None
            except (StoreUnavailable, RemoteError):
                raise
            except OSError as e:
                raise RemoteError(f"{url}/{wanted}: cannot be read ({type(e).__name__}: {e})") from None
        yield folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
