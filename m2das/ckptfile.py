"""The checkpoint file format: how a state is written and read back, whoever wrote it.

Written atomically (temporary file, fsync, rename; the previous `last.pth`
hard-linked to `last.prev.pth` first), with disk-full and I/O errors turned
into one line. Read back running no code (tensors, plain types and a short
allow-list only), after checking the zip container's CRC32s, which detect
bytes changed after writing. torch writes every record stored, never
compressed, so a compressed record (a file crafted to expand in memory) is
refused from the zip directory alone, before any record is read. Files of m2das 0.1.0 (numpy RNG state pickled)
and published M2D files (an argparse.Namespace) open too. Downstream code
reads weights through this module without the training policy in
m2das.checkpoint.
"""

import argparse
import contextlib
import errno
import mmap
import os
import re
import shutil
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from m2das import runfolder
from m2das.fileio import atomic_write, fsync_dir

FORMAT = "m2das-full-state-2"  # marks a full-state file; reference-format files lack it
PUBLISHED_ALLOWED = (argparse.Namespace,)  # what published M2D checkpoints pickle besides tensors
# Full-state files of m2das 0.1.0 pickled numpy's RNG state: a uint32 array, which these rebuild
# from bytes and a dtype (data only, no callable of the file's choosing).
_np_core = getattr(np, "_core", None) or np.core
LEGACY_ALLOWED = (_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))
LEGACY_KEYS = ("optimizer", "epoch", "batch_in_epoch", "step", "rng")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local file header: signature ... name length, extra length
CRC_THREADS = min(8, len(os.sched_getaffinity(0)))  # CRC32 of a file's records: past 8 the memory bus is the limit


class CheckpointError(Exception):
    """A checkpoint that must not or cannot be used; the trainer exits 2 with this one line."""


class SaveFailed(Exception):
    """A save that did not complete; the previous checkpoint is intact."""


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _describe_failure(e: BaseException, path: Path, need: int) -> str:
    free = shutil.disk_usage(path.parent).free
    errors = [e] + [c for c in (e.__cause__, e.__context__) if c is not None]
    codes = {getattr(x, "errno", None) for x in errors}
    if codes & {errno.ENOSPC, errno.EDQUOT} or free < need:
        return (f"no space left in {path.parent} to write {path.name}: {free / 1e9:.2f} GB free, a checkpoint "
                f"needs about {need / 1e9:.2f} GB; free space (or raise the quota) and rerun")
    return f"could not write {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})"


def save_file(state: dict, path) -> None:
    """Atomically write `state` to `path`; before replacing last.pth, keep it as last.prev.pth.

    At every instant a complete checkpoint exists under a known name. Raises
    SaveFailed with one line (disk full named as such) and leaves the old files.
    """
    path = Path(path)
    if path.name == runfolder.LAST and path.exists():
        prev, link = path.with_name(runfolder.PREVIOUS), path.with_name(f".{runfolder.PREVIOUS}.link")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        try:
            os.link(path, link)
            os.replace(link, prev)
            fsync_dir(path.parent)
        except OSError:  # file systems without hard links: last.pth itself is still replaced atomically
            pass
    need = tensor_bytes(state)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except Exception as e:  # torch's zip writer hides ENOSPC behind RuntimeError("unexpected pos ...")
        raise SaveFailed(_describe_failure(e, path, need)) from e


def _check_records(z: zipfile.ZipFile, path) -> None:
    """Refuse compressed records and records reaching past the file's end, from the directory alone:
    a stored record's size is bounded by the bytes on disk, a deflated one's is not."""
    size = os.fstat(z.fp.fileno()).st_size
    for info in z.infolist():
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{path}: refused, record {info.filename} is compressed ({info.compress_size} "
                                  f"bytes that expand to {info.file_size}); torch writes records uncompressed, "
                                  f"so this file was altered or crafted: use the original checkpoint")
        if info.header_offset + info.compress_size > size:
            raise CheckpointError(f"{path}: damaged (record {info.filename} reaches past the end of the file, "
                                  f"truncated?)")


def check_records(path) -> None:
    """_check_records for a file that may or may not be a zip (a legacy pickle has no records)."""
    try:
        with zipfile.ZipFile(path) as z:
            _check_records(z, path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a zip container: torch.load reads it as a legacy pickle, or says why it cannot


def verify_integrity(path) -> None:
    """Check every record of the zip container against its stored CRC32 (torch writes them).

    The records are read through a memory map and checked by a few threads at once (zlib's crc32
    releases the GIL), since a full-state file holds one record per tensor.
    """
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            _check_records(z, path)
            infos = [i for i in z.infolist() if i.file_size]
            if not infos:
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    spans = [(i, _data_start(m, i, path)) for i in infos]
                    workers = min(CRC_THREADS, len(spans))
                    with ThreadPoolExecutor(workers) as pool:
                        crcs = list(pool.map(lambda span: zlib.crc32(view[span[1]:span[1] + span[0].file_size]),
                                             spans))
                finally:
                    view.release()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged or not a torch zip checkpoint ({e})") from e
    bad = next((info.filename for info, crc in zip(infos, crcs) if crc != info.CRC), None)
    if bad is not None:
        raise CheckpointError(f"{path}: damaged (CRC32 mismatch in {bad}: bytes changed after it was written)")


def _data_start(m, info: zipfile.ZipInfo, path) -> int:
    """Where a record's bytes begin: after its local header, whose name and extra field (torch pads
    there to align tensors) may differ in length from the central directory's."""
    header = m[info.header_offset:info.header_offset + _LOCAL_HEADER.size]
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: damaged (bad local header of {info.filename})")
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + info.file_size > len(m):
        raise CheckpointError(f"{path}: damaged (record {info.filename} reaches past the end of the file, truncated?)")
    return start


def safe_load(path, mmap: bool = False, allowed=(), require_model: bool = True) -> dict:
    """torch.load that runs no code: only tensors, plain types and the `allowed` classes; compressed
    records (a decompression bomb) refused before torch reads any."""
    check_records(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise CheckpointError(f"{path}: refused, loading it would run code (it needs {unsafe.group(1)}); "
                                  f"m2das loads only tensors and plain types") from None
        detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {detail})") from None
    if require_model and (not isinstance(state, dict) or "model" not in state):
        raise CheckpointError(f"{path}: not an M2D / m2das checkpoint (no 'model' entry)")
    return state


def load_file(path, mmap: bool = False, verify: bool = True) -> dict:
    """A full-state m2das checkpoint, integrity-checked (verify=False: the caller checked it); anything
    else is a CheckpointError."""
    if verify:
        verify_integrity(path)
    # Published classes allowed so a published file gets the right advice below.
    return as_full_state(safe_load(path, mmap=mmap, allowed=PUBLISHED_ALLOWED + LEGACY_ALLOWED), path)


def as_full_state(state: dict, path) -> dict:
    """The state if it is a full-state m2das checkpoint (an m2das 0.1.0 one converted), else CheckpointError."""
    if state.get("format") == FORMAT:
        return state
    if all(k in state for k in LEGACY_KEYS) and isinstance(state["rng"].get("numpy"), tuple):
        _, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        state["rng"] = {"torch": state["rng"]["torch"], "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
                        **({"cuda": state["rng"]["cuda"]} if "cuda" in state["rng"] else {})}
        return {**state, "format": FORMAT}
    raise CheckpointError(f"{path}: not a full-state m2das checkpoint (no optimizer position); "
                          f"to continue pre-training from published weights use --init_from {path}")


def load_weight_file(path) -> dict:
    """Any M2D / M2D-AS / m2das checkpoint or encoder-only file, integrity-checked, running no code.

    Published checkpoints pickle an argparse.Namespace; that one class is allowed, nothing else.
    """
    if zipfile.is_zipfile(path):
        verify_integrity(path)
    return safe_load(path, allowed=PUBLISHED_ALLOWED, require_model=False)


def describe_weights(raw) -> str:
    """What model a weight file holds, for messages: its saved model name and sizes when it has them,
    and its encoder's width and depth read from the tensors."""
    args = raw.get("args") if isinstance(raw, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    state = raw.get("model", raw) if isinstance(raw, dict) else {}
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    width = next((int(v.shape[0]) for k, v in state.items() if k.startswith("blocks.") and k.endswith("norm1.weight")),
                 None)
    shape = f"a ViT encoder of width {width}, depth {max(blocks) + 1}" if blocks and width else "no ViT encoder"
    if args.get("model"):
        sizes = ", ".join(f"{k} {'x'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                          for k in ("input_size", "patch_size") if (v := args.get(k)) is not None)
        return f"{args['model']} ({shape}{', ' + sizes if sizes else ''})"
    return shape
