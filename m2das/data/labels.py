"""AudioSet labels and sampling weights for `files_as_weighted.csv`.

Reads Google's release CSVs (or the same tables after a spreadsheet
round-trip), maps file names to YouTube IDs in both common naming styles, and
computes AudioMAE's per-file sampling weights. Files whose ID is in no list are
left out and counted instead of crashing the run.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

from m2das.fileio import atomic_write

EVAL_SEGMENTS = "eval_segments.csv"
SEGMENT_FILES = (EVAL_SEGMENTS, "balanced_train_segments.csv",
                 "unbalanced_train_segments.csv")  # read in this order; the last read wins
CLASS_FILE = "class_labels_indices.csv"
OPTIONAL_FILES = ("unbalanced_train_segments.csv",)
METADATA_FILES = SEGMENT_FILES + (CLASS_FILE,)
DEFAULT_URL_BASE = "https://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv"
URL_ENV = "M2DAS_AUDIOSET_URL"
URL_SCHEMES = ("https", "http", "s3", "gs", "file")  # http only from this machine (check_url)
YTID_LENGTH = 11
SEGMENT_HEADER = "# YTID, start_seconds, end_seconds, positive_labels"
CLASS_HEADER = "index,mid,display_name"
# Fewest rows a downloaded list may have when its header states no count (the release: 20,371
# eval, 22,160 balanced, 2,041,789 unbalanced segments, 527 classes).
MIN_ROWS = {EVAL_SEGMENTS: 10000, "balanced_train_segments.csv": 10000,
            "unbalanced_train_segments.csv": 1000000, CLASS_FILE: 500}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
_NAME_SEPARATORS = set("_. ")


class MetadataError(RuntimeError):
    """Metadata missing or unusable; the message says which file to put where."""


def read_segments(path) -> tuple[dict[str, str], int]:
    """YTID -> comma-joined MIDs from one segment list, and the number of rows skipped.

    Accepts the release format (comment lines, ", " separators, quoted label
    lists) and what a spreadsheet writes back (no comments, maybe a header row,
    "," separators, unquoted single labels, a BOM).
    """
    labels: dict[str, str] = {}
    bad = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f, skipinitialspace=True):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            ytid = row[0].strip()
            if ytid.upper() == "YTID":
                continue
            mids = [m.strip() for field in row[3:] for m in field.split(",") if m.strip()]
            if len(row) < 4 or not mids:
                bad += 1
                continue
            labels[ytid] = ",".join(mids)
    return labels, bad


def read_class_mids(path) -> list[str]:
    """MIDs in class-index order from class_labels_indices.csv."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        if reader.fieldnames is None or "mid" not in [n.strip() for n in reader.fieldnames]:
            raise MetadataError(f"{path}: no 'mid' column; expected the release's "
                                f"'index,mid,display_name' header")
        reader.fieldnames = [n.strip() for n in reader.fieldnames]
        return [row["mid"].strip() for row in reader if row.get("mid")]


def load_label_map(metadata_dir, warn=print) -> dict[str, str]:
    """Eval, balanced, then unbalanced into one map; a YTID listed twice keeps the last value."""
    metadata_dir = Path(metadata_dir)
    label_map: dict[str, str] = {}
    for name in SEGMENT_FILES:
        path = metadata_dir / name
        if not path.is_file():
            if name in OPTIONAL_FILES:
                warn(f"warning: {path} not found; going on with the other lists "
                     f"(put it there for the ~2M unbalanced labels)")
                continue
            raise MetadataError(missing_message([path], metadata_dir))
        part, bad = read_segments(path)
        if bad:
            warn(f"warning: {path}: skipped {bad} malformed rows")
        label_map.update(part)
    return label_map


def ytid_of(file_name: str, label_map) -> str | None:
    """The YouTube ID of a file, or None when it is in no list.

    Two naming styles exist: `--PJHxphWEs_30.000.wav` (ID = first 11
    characters) and `Y--PJHxphWEs.wav` (a `Y` prefix). A real ID may itself start
    with `Y`, so the candidate found in the label map wins; when both are found,
    the one followed by a separator (or the end of the name) wins, and the plain
    rule breaks a remaining tie.
    """
    stem = Path(file_name).stem
    plain = stem[:YTID_LENGTH]
    prefixed = stem[1:YTID_LENGTH + 1] if stem.startswith("Y") and len(stem) > YTID_LENGTH else None
    plain_found = len(plain) == YTID_LENGTH and plain in label_map
    prefixed_found = prefixed is not None and prefixed in label_map
    if plain_found and prefixed_found:
        plain_fits = len(stem) == YTID_LENGTH or stem[YTID_LENGTH] in _NAME_SEPARATORS
        prefixed_fits = len(stem) == YTID_LENGTH + 1 or stem[YTID_LENGTH + 1] in _NAME_SEPARATORS
        return prefixed if prefixed_fits and not plain_fits else plain
    if plain_found:
        return plain
    if prefixed_found:
        return prefixed
    return None


def sample_weights(label_lists: list[list[str]]) -> list[float]:
    """AudioMAE's rule: w_c = 1000 / (count_c + 100); weight = (sum of w_c) ** (1 / 1.5)."""
    classes = [sorted(set(mids)) for mids in label_lists]
    count = Counter(c for mids in classes for c in mids)
    label_weight = {c: 1000.0 / (n + 100.0) for c, n in count.items()}
    return [sum(label_weight[c] for c in mids) ** (1.0 / 1.5) for mids in classes]


def write_weighted_list(path, file_names, label_map, class_mids=None) -> dict:
    """Write file_name,label,weight for the files that have labels; return counts."""
    rows, without = [], []
    for name in file_names:
        ytid = ytid_of(name, label_map)
        if ytid is None:
            without.append(name)
        else:
            rows.append((name, label_map[ytid]))
    weights = sample_weights([label.split(",") for _, label in rows])
    write_csv(path, ["file_name", "label", "weight"],
              ([name, label, repr(w)] for (name, label), w in zip(rows, weights)))
    used = {c for _, label in rows for c in label.split(",")}
    known = set(class_mids or [])
    return {
        "labelled": len(rows),
        "without_labels": len(without),
        "without_labels_examples": without[:5],
        "classes_used": len(used),
        "classes_without_files": len(known - used) if known else None,
        "unknown_mids": sorted(used - known) if known else [],
    }


def write_csv(path, header, rows) -> None:
    """Atomic, UTF-8 whatever the locale, undecodable file-name bytes kept, "\n" line ends."""
    with atomic_write(path, "wb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # atomic_write syncs and closes the file itself


def read_csv_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def missing_message(paths, metadata_dir, url_base=None, reason=None) -> str:
    where = Path(metadata_dir)
    lines = []
    if reason:
        lines.append(f"cannot download AudioSet metadata from {url_base or DEFAULT_URL_BASE} "
                     f"({reason}).")
    lines.append(f"Missing: {', '.join(Path(p).name for p in paths)}. Put these files from the "
                 f"AudioSet release ({DEFAULT_URL_BASE}/<name>) into {where}/ "
                 f"(or any folder passed with --metadata DIR); "
                 f"{', '.join(OPTIONAL_FILES)} is optional.")
    return " ".join(lines)


def _open_url(url: str, timeout: float):
    """fsspec for any URL it can serve (file://, a mounted mirror, gs://, http with aiohttp);
    the standard library for http(s) when aiohttp is not installed."""
    import fsspec

    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("http", "https"):
        if importlib.util.find_spec("aiohttp") is None:
            return urllib.request.urlopen(url, timeout=timeout)
        import aiohttp

        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        return fsspec.open(url, "rb", client_kwargs={"timeout": limits}).open()
    return fsspec.open(url, "rb").open()


def check_url(url_base: str | None) -> str:
    """The lists' URL (the flag, else the environment, else the release); MetadataError for a scheme
    prepare does not fetch from, or plain http across a network: a tampered list would silently
    mislabel the training data."""
    url_base = (url_base or os.environ.get(URL_ENV) or DEFAULT_URL_BASE).rstrip("/")
    parts = urllib.parse.urlsplit(url_base)
    if "://" in url_base and parts.scheme not in URL_SCHEMES:
        raise MetadataError(f"{url_base}: {parts.scheme}:// is not a way to fetch the AudioSet lists; use "
                            f"{', '.join(s + '://' for s in URL_SCHEMES)} or a mirror folder")
    if parts.scheme == "http" and (parts.hostname or "") not in LOOPBACK_HOSTS:
        raise MetadataError(f"{url_base}: plain http is refused for the AudioSet lists; use "
                            f"https:// (or a mirror folder / file:// URL)")
    return url_base


def check_downloaded_list(name: str, f, url: str) -> int:
    """Rows of a downloaded list, after checking its header and row count; MetadataError otherwise.

    A segment list must carry the release's comment header; when it states
    num_segs, the rows must number exactly that (a cut-off download fails here).
    """
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
    first, stated, rows, header_ok = None, None, 0, False
    for line in text:
        line = line.strip()
        if first is None:
            first = line
        if name == CLASS_FILE and not header_ok and rows == 0:
            header_ok = [c.strip() for c in line.split(",")] == CLASS_HEADER.split(",")
            if not header_ok:
                break
            continue
        if line.startswith("#"):
            header_ok = header_ok or " ".join(line.split()) == SEGMENT_HEADER
            found = re.search(r"num_segs=(\d+)", line)
            stated = int(found.group(1)) if found else stated
        elif line:
            if not header_ok:
                break
            rows += 1
    text.detach()
    expected = CLASS_HEADER if name == CLASS_FILE else SEGMENT_HEADER
    if not header_ok:
        shown = (first or "")[:60]
        raise MetadataError(f"{url}: not an AudioSet list: expected the header '{expected}', got "
                            f"'{shown}'; check --metadata-url / {URL_ENV}, or put the release's "
                            f"{name} into the metadata folder")
    if stated is not None and rows != stated:
        raise MetadataError(f"{url}: {rows} rows where its header states num_segs={stated} "
                            f"(download cut off?); run prepare again to download it again")
    if stated is None and rows < MIN_ROWS.get(name, 1):
        raise MetadataError(f"{url}: only {rows} rows (the release has at least "
                            f"{MIN_ROWS[name]}); run prepare again to download it again")
    return rows


def fetch_metadata(dest_dir, url_base=None, timeout: float = 30.0, warn=print) -> Path:
    """Download the release CSVs missing from `dest_dir` (once; present files are kept).

    Every download is checked (check_downloaded_list) before it is kept.
    Raises MetadataError naming the files to put where when a required file cannot
    be had, or naming the list that came back wrong; a missing unbalanced list only warns.
    """
    dest_dir = Path(dest_dir)
    url_base = check_url(url_base)
    missing_required, first_error = [], None
    # required files first: when they cannot be had, the optional one is not tried
    for name in sorted(METADATA_FILES, key=lambda n: n in OPTIONAL_FILES):
        path = dest_dir / name
        if path.is_file():
            continue
        if missing_required:
            if name not in OPTIONAL_FILES:
                missing_required.append(path)
            continue
        url = f"{url_base}/{name}"
        warn(f"downloading {url} -> {path}")
        try:
            with _open_url(url, timeout) as src, atomic_write(path, "w+b") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
                dst.flush()
                dst.seek(0)
                check_downloaded_list(name, dst, url)  # raising here keeps nothing
        except MetadataError as e:
            if name not in OPTIONAL_FILES:
                raise
            warn(f"warning: {e}; going on without it")
        except Exception as e:  # offline, DNS, HTTP errors: all mean "not available"
            reason = " ".join(str(e).split()) or type(e).__name__
            first_error = first_error or reason
            if name in OPTIONAL_FILES:
                warn(f"warning: could not download {name} ({reason}); going on without it")
            else:
                missing_required.append(path)
    if missing_required:
        raise MetadataError(missing_message(missing_required, dest_dir, url_base, first_error))
    return dest_dir


def check_metadata_dir(metadata_dir) -> Path:
    metadata_dir = Path(metadata_dir)
    missing = [metadata_dir / n for n in METADATA_FILES
               if n not in OPTIONAL_FILES and not (metadata_dir / n).is_file()]
    if missing:
        raise MetadataError(missing_message(missing, metadata_dir))
    return metadata_dir


__all__ = ["read_segments", "read_class_mids", "load_label_map", "ytid_of", "sample_weights",
           "write_weighted_list", "fetch_metadata", "check_metadata_dir", "MetadataError",
           "METADATA_FILES", "SEGMENT_FILES", "CLASS_FILE", "URL_ENV", "DEFAULT_URL_BASE"]
