"""Fine-tuning data: the task settings of Table VI, AudioSet's lists from a data folder, ESC-50,
SPCV2 and VC1 from their publishers' folders (their audio turned into LMS once, in a cache), and
the batch augmentations (mixup, SpecAugment, random resize crop, time-column masking).

Every random number of a batch comes from one NumPy generator seeded by
(seed, rank, global batch index, purpose), never from a global generator, so a
run resumed mid-epoch augments exactly as an uninterrupted one.
"""

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m2das import datafolder
from m2das.data import labels
from m2das.data.dataset import SampleList
from m2das.downstream import tasks as task_sets
from m2das.downstream.ft_config import AUDIOSET_TASKS, TASK_LMS_DIR, TASKS, TaskSettings
from m2das.fileio import atomic_write

BALANCED = "balanced_train_segments.csv"
UNBALANCED = "unbalanced_train_segments.csv"
class FinetuneDataError(ValueError):
    """A data folder that cannot give the task's lists; the message names the file and the fix."""


@dataclass
class TaskData:
    train: SampleList
    test: SampleList
    missing: dict        # split -> listed clips with no LMS file in the data folder
    weights_source: str | None = None
    valid: SampleList | None = None  # a task with a validation split: it picks the epoch whose test score counts


# -- AudioSet lists from the files present ---------------------------------------------------

def lms_files(data_path: Path) -> list:
    """LMS files of a prepared data folder, relative to it: its file list, else a walk of the LMS folder."""
    listed = data_path / datafolder.FILE_LIST
    if listed.is_file():
        with open(listed, newline="") as f:
            return [row["file_name"] for row in csv.DictReader(f) if row.get("file_name")]
    root = data_path / datafolder.LMS_DIR
    if not root.is_dir():
        raise FinetuneDataError(f"{data_path}: no {datafolder.FILE_LIST} and no {datafolder.LMS_DIR}/ folder; "
                                f"make the data folder with `m2das prepare AUDIO_DIR {data_path}`")
    return sorted(str(p.relative_to(data_path)) for p in root.rglob("*.npy"))


def _segments(metadata: Path, name: str, required: bool) -> dict:
    path = metadata / name
    if not path.is_file():
        if required:
            raise FinetuneDataError(f"{path}: AudioSet segment list not found; put the release's {name} there "
                                    f"or pass --metadata DIR")
        return {}
    return labels.read_segments(path)[0]


def _sample_list(data_path: Path, rows: list, classes: list, weights=None) -> SampleList:
    index = {m: i for i, m in enumerate(classes)}
    ids = [[index[m] for m in mids.split(",") if m in index] for _, mids in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(i) for i in ids])
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int32, count=int(offsets[-1]))
    return SampleList(data_path, [name for name, _ in rows], classes, offsets, flat, weights)


def audioset_task(task: str, data_path, metadata=None) -> TaskData:
    """balanced_train -> AS20K train, unbalanced + balanced -> AS2M train, eval_segments -> test.

    Only clips whose LMS file is in the data folder are used; the clips each list names
    but the folder lacks are counted. A clip in the eval list is never trained on.
    """
    data_path = Path(data_path)
    metadata = Path(metadata) if metadata else data_path / datafolder.METADATA_DIR
    eval_map = _segments(metadata, labels.EVAL_SEGMENTS, True)
    train_map = dict(_segments(metadata, BALANCED, True))
    if task == "as2m":
        unbalanced = _segments(metadata, UNBALANCED, False)
        train_map = {**unbalanced, **train_map}
    class_file = metadata / labels.CLASS_FILE
    classes = labels.read_class_mids(class_file) if class_file.is_file() else \
        sorted({m for table in (eval_map, train_map) for v in table.values() for m in v.split(",")})
    train_rows, test_rows, seen = [], [], set()
    for name in lms_files(data_path):
        ytid = labels.ytid_of(name, eval_map)
        if ytid is not None:
            test_rows.append((name, eval_map[ytid]))
            seen.add(("test", ytid))
            continue
        ytid = labels.ytid_of(name, train_map)
        if ytid is not None:
            train_rows.append((name, train_map[ytid]))
            seen.add(("train", ytid))
    missing = {"train": len(set(train_map) - set(eval_map)) - sum(1 for s, _ in seen if s == "train"),
               "test": len(eval_map) - sum(1 for s, _ in seen if s == "test")}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        if not rows:
            raise FinetuneDataError(f"{data_path}: none of the {split} clips of {task} has an LMS file there; "
                                    f"run `m2das prepare` on the AudioSet audio (or check --metadata {metadata})")
    weights, source = None, None
    if TASKS[task].balanced:
        weights, source = balanced_weights(data_path, train_rows)
    return TaskData(_sample_list(data_path, train_rows, classes, weights), _sample_list(data_path, test_rows, classes),
                    missing, source)


def balanced_weights(data_path: Path, rows: list):
    """Sampling weights from the pre-training list's weight column; AudioMAE's rule over these rows
    for a folder without one (the same rule prepare uses)."""
    listed = data_path / datafolder.WEIGHTED_LIST
    if listed.is_file():
        with open(listed, newline="") as f:
            table = {r["file_name"]: r.get("weight") for r in csv.DictReader(f)}
        try:
            weights = np.array([float(table[name]) for name, _ in rows], dtype=np.float64)
            if np.all(np.isfinite(weights) & (weights >= 0)) and weights.sum() > 0:
                return weights, str(listed)
        except (KeyError, TypeError, ValueError):
            pass
    return np.array(labels.sample_weights([mids.split(",") for _, mids in rows]), dtype=np.float64), \
        "computed (AudioMAE's rule over the training clips)"


def load_task(task: str, data_path, metadata=None, cache=None, fold: int = 1, workers: int = 1) -> TaskData:
    """The task's lists: AudioSet's from a prepared data folder, the others from their own folder,
    their LMS written under `cache` (default DATA_PATH/task_lms)."""
    if task in AUDIOSET_TASKS:
        return audioset_task(task, data_path, metadata)
    return audio_task(task, data_path, cache or Path(data_path) / TASK_LMS_DIR, fold, workers)


# -- ESC-50, SPCV2, VC1 from their audio -------------------------------------------------------

def audio_task(task: str, data_path, cache, fold: int = 1, workers: int = 1) -> TaskData:
    """The split m2das.downstream.tasks reads, as EVAR's fine-tuning uses it.

    A fold task (ESC-50) trains on every other fold and has no validation split (EVAR's
    finetune.py then picks the epoch on the test fold); SPCV2 and VC1 keep theirs.
    """
    try:
        data = task_sets.load_task(task, data_path)
    except task_sets.TaskError as e:
        raise FinetuneDataError(str(e)) from None
    if not 1 <= fold <= len(data.folds):
        raise FinetuneDataError(f"--fold {fold}: {data.spec.title} has {len(data.folds)} fold(s); pass 1.."
                                f"{len(data.folds)}")
    part = data.folds[fold - 1]
    train = sorted(part.train + part.valid) if data.spec.n_folds > 1 else part.train
    valid = [] if data.spec.n_folds > 1 else part.valid
    clip = round(data.spec.clip_seconds * 16000)
    wanted = sorted(set(train) | set(valid) | set(part.test))
    names = cache_lms(data, wanted, Path(cache), clip, workers)
    index = {c: i for i, c in enumerate(data.classes)}

    def samples(ids):
        offsets = np.arange(len(ids) + 1, dtype=np.int64)
        flat = np.array([index[data.labels[i]] for i in ids], dtype=np.int32)
        return SampleList(Path(cache), [names[i] for i in ids], list(data.classes), offsets, flat, None)

    return TaskData(samples(train), samples(part.test), {"train": 0, "test": 0}, None,
                    samples(valid) if valid else None)


def cache_lms(data, ids, cache: Path, clip_samples: int, workers: int) -> dict:
    """Clip index -> its LMS file under `cache` (relative), written once: the whole clip at 16 kHz,
    zero-padded to the task's clip length (EVAR's unit_sec), LMS without further padding
    (the runtime's recipe). Training crops `frames` at random from it, testing takes its start."""
    from m2das.downstream.embed import InputError, read_clip, samples_16k

    def one(i):
        rel = str(Path(data.files[i]).relative_to(data.root).with_suffix(".npy"))
        dest = cache / rel
        if not dest.exists():
            lms = read_clip(data.files[i], max(samples_16k(data.files[i]), clip_samples))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(dest) as f:
                np.save(f, lms)
        return i, rel

    try:
        with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
            return dict(pool.map(one, ids))
    except InputError as e:
        raise FinetuneDataError(f"{e}; replace the file from the data set's download") from None


# -- per-sample targets and the deterministic eval crop --------------------------------------

def targets_of(samples: SampleList, ids) -> np.ndarray:
    y = np.zeros((len(ids), len(samples.classes)), dtype=np.float32)
    for row, i in enumerate(ids):
        y[row, samples.labels_of(int(i))] = 1.0
    return y


# -- batch augmentations ------------------------------------------------------------------------

def batch_rng(seed: int, rank: int, batch_index: int, purpose: int) -> np.random.Generator:
    """The generator of one batch's augmentation draws: a pure function of its position."""
    return np.random.default_rng([seed, rank, batch_index, purpose])


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator):
    """Per-sample lambda ~ Beta(alpha, alpha); partner = a random permutation of the batch."""
    if alpha <= 0:
        return x, y
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=x.shape[0])).float().to(x.device)
    partner = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)

    def mix(t):
        shape = (-1,) + (1,) * (t.dim() - 1)
        return t * lam.view(shape) + t[partner] * (1 - lam.view(shape))

    return mix(x), mix(y)


def mask_span(size: int, mask_param: int, rng: np.random.Generator):
    """torchaudio's mask_along_axis: width = floor(u * param), start = floor(v * (size - u * param))."""
    value = rng.random() * mask_param
    start = int(rng.random() * (size - value))
    return start, start + int(value)


def spec_augment(x: torch.Tensor, freq_mask: int, time_mask: int, rng: np.random.Generator) -> torch.Tensor:
    """One frequency and one time mask per sample of [B, 1, F, T], filled with 0 (the mean after normalising)."""
    if freq_mask <= 0 and time_mask <= 0:
        return x
    x = x.clone()
    for b in range(x.shape[0]):
        if freq_mask > 0:
            lo, hi = mask_span(x.shape[-2], freq_mask, rng)
            x[b, ..., lo:hi, :] = 0
        if time_mask > 0:
            lo, hi = mask_span(x.shape[-1], time_mask, rng)
            x[b, ..., lo:hi] = 0
    return x


def random_resize_crop(x: torch.Tensor, rng: np.random.Generator, virtual=(1.0, 1.5), freq_scale=(0.6, 1.5),
                       time_scale=(0.6, 1.5)) -> torch.Tensor:
    """BYOL-A's RRC: the LMS centred on a zero canvas `virtual` times its size, a random
    (freq_scale x time_scale) window of the canvas, resized back (bicubic, align_corners)."""
    _, _, fh, tw = x.shape
    ch, cw = int(fh * virtual[0]), int(tw * virtual[1])
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        canvas = x.new_zeros((x.shape[1], ch, cw))
        top, left = (ch - fh) // 2, (cw - tw) // 2
        canvas[:, top:top + fh, left:left + tw] = x[b]
        h = int(np.clip(int(rng.uniform(*freq_scale) * fh), 1, ch))
        w = int(np.clip(int(rng.uniform(*time_scale) * tw), 1, cw))
        i = int(rng.integers(0, ch - h + 1)) if ch > h else 0
        j = int(rng.integers(0, cw - w + 1)) if cw > w else 0
        crop = canvas[None, :, i:i + h, j:j + w]
        out[b] = F.interpolate(crop, size=(fh, tw), mode="bicubic", align_corners=True)[0]
    return out


def kept_columns(batch: int, columns: int, ratio: float, rng: np.random.Generator) -> torch.Tensor:
    """[B, keep] sorted time-column indices left after dropping `ratio` of them per sample."""
    keep = max(1, int(columns * (1 - ratio)))
    return torch.from_numpy(np.sort(np.stack([rng.permutation(columns)[:keep] for _ in range(batch)]), axis=1))


def augment(x: torch.Tensor, y: torch.Tensor, st: TaskSettings, seed: int, rank: int, batch_index: int):
    """mixup -> SpecAugment -> RRC on a normalised batch, in the reference tool's order."""
    x, y = mixup(x, y, st.mixup, batch_rng(seed, rank, batch_index, 0))
    x = spec_augment(x, st.freq_mask, st.time_mask, batch_rng(seed, rank, batch_index, 1))
    if st.rrc:
        x = random_resize_crop(x, batch_rng(seed, rank, batch_index, 2))
    return x, y
