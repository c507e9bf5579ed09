"""Range checks of a packed folder's manifest and index (m2das/data/packed.py reads them).

The index's CRC32 catches damage, not a crafted or mis-generated index: numpy's
negative indexing would read shard -1, label -1 or offset -5000 silently, and a
shard name with `../` would read outside the folder. Every field is checked once
at load, vectorised (`m2das bench data` prints the cost for two million rows).
Torch-free.
"""

import numpy as np

from m2das.data.stats import norm_stats_problem


_FIELDS = {"dtype": str, "n_mels": int, "samples": int, "classes": list, "weighted": bool, "index": dict,
           "shards": list}
_FILE_FIELDS = {"name": str, "bytes": int, "crc32": int}  # the index's entry; a shard's adds "samples"


def plain_name(name) -> bool:
    """A file name inside the packed folder: no `../`, no absolute path, no folder at all."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def manifest_problem(manifest: dict, dtypes: tuple) -> str | None:
    """What makes a manifest unreadable (a missing key, a wrong type, a path leaving the folder), or None."""
    def missing(entry: dict, fields: dict, where: str) -> str | None:
        for key, kind in fields.items():
            if not isinstance(entry.get(key), kind) or (kind is int and isinstance(entry[key], bool)):
                return f"{where}{key!r} is missing or not of type {kind.__name__}"
        return None

    problem = missing(manifest, _FIELDS, "")
    if problem:
        return problem
    if manifest["dtype"] not in dtypes or manifest["n_mels"] < 1 or manifest["samples"] < 1 or not manifest["shards"]:
        return (f"dtype {manifest['dtype']!r}, n_mels {manifest['n_mels']}, {manifest['samples']} samples, "
                f"{len(manifest['shards'])} shards: expected one of {dtypes} and positive counts")
    entries = [("index: ", manifest["index"], _FILE_FIELDS)] + [
        (f"shard {k}: ", e, {**_FILE_FIELDS, "samples": int}) for k, e in enumerate(manifest["shards"])]
    for where, entry, fields in entries:
        problem = missing(entry, fields, where) if isinstance(entry, dict) else f"{where}not an object"
        if problem:
            return problem
        if not plain_name(entry["name"]):
            return f"{where}file name {entry['name']!r} leaves the packed folder (only plain file names are read)"
        if entry["bytes"] < 0:
            return f"{where}{entry['bytes']} bytes"
    stats = manifest.get("norm_stats")
    if stats is not None:
        try:
            return norm_stats_problem(float(stats["mean"]), float(stats["std"]))
        except (KeyError, TypeError, ValueError):
            return f"norm_stats {stats!r} is not {{mean, std}}"
    return None


INDEX_ARRAYS = {"names": "u", "shard": "i", "offset": "i", "frames": "i", "label_offsets": "i", "label_ids": "i",
                "weights": "f"}  # the arrays of index.npz and their numpy kinds (u: bytes of the names)


def index_problem(a: dict, files: list, manifest: dict) -> str | None:
    """Vectorised checks of every row of the index: each field within its range, or what is not (with a row).

    Negative numbers would otherwise index from the end (a wrong shard, label or byte
    range, silently), and a range past a shard's end would fail mid-epoch.
    """
    for key, kind in INDEX_ARRAYS.items():
        if key not in a or a[key].ndim != 1 or a[key].dtype.kind not in (kind, "u" if kind == "i" else kind):
            return f"array {key!r} is missing or not a 1-D {'integer' if kind != 'f' else 'float'} array"
    n, shards = manifest["samples"], manifest["shards"]
    lengths = {"names": len(files), "shard": len(a["shard"]), "offset": len(a["offset"]),
               "frames": len(a["frames"]), "weights": len(a["weights"]), "label_offsets": len(a["label_offsets"]) - 1}
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        return f"rows per array {wrong}, the manifest records {n} samples"
    shard = a["shard"].astype(np.int64, copy=False)
    frames = a["frames"].astype(np.int64, copy=False)
    offset = a["offset"].astype(np.int64, copy=False)
    label_offsets = a["label_offsets"].astype(np.int64, copy=False)
    ids = a["label_ids"]

    def first(bad: np.ndarray, what: str) -> str | None:
        if not bad.any():
            return None
        i = int(np.flatnonzero(bad)[0])
        return f"row {i} ({files[i] if i < len(files) else 'end'}): {what}"

    problem = first((shard < 0) | (shard >= len(shards)), f"shard outside 0..{len(shards) - 1}") \
        or first(frames < 1, "frames below 1") or first(offset < 0, "negative byte offset")
    if problem:
        return problem
    row = manifest["n_mels"] * np.dtype(manifest["dtype"]).itemsize
    size = np.array([e["bytes"] for e in shards], dtype=np.int64)[shard]
    fits = np.minimum(frames, size // row)  # bounded first: a crafted 2**62 frames cannot overflow to a pass
    problem = first((frames > fits) | (offset > size - fits * row), "its bytes run past the end of its shard")
    if problem:
        return problem
    counts = np.bincount(shard, minlength=len(shards))
    recorded = np.array([e["samples"] for e in shards])
    if not np.array_equal(counts, recorded):
        k = int(np.flatnonzero(counts != recorded)[0])
        return f"shard {k} holds {counts[k]} rows of the index, the manifest records {recorded[k]}"
    if label_offsets[0] != 0 or label_offsets[-1] != len(ids):
        return f"label offsets run from {label_offsets[0]} to {label_offsets[-1]}, expected 0 to {len(ids)}"
    problem = first(np.diff(label_offsets) < 0, "label offsets go backwards")
    if problem:
        return problem
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(manifest["classes"])):
        return f"label ids span {ids.min()}..{ids.max()}, the manifest lists {len(manifest['classes'])} classes"
    if manifest["weighted"]:
        return first(~(np.isfinite(a["weights"]) & (a["weights"] >= 0)), "weight negative, NaN or inf")
    return None
