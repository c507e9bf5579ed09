"""The nine tasks of the paper's Table V, read from each data set as its publisher distributes it.

`load_task(name, folder)` turns a data set's own folder (same file names, folder layout and
metadata columns as the download) into files, labels and the train/valid/test partitions the
paper's evaluation tool (nttcslab/eval-audio-repr, "EVAR") used, so a score here is comparable
to Table V. Where EVAR fixed a split by a random draw it ships only as a list, the list is either
restated here as compact facts (CREMA-D's speakers, GTZAN's fault-filtered lists) or, where it is
too large to restate (VoxForge, Surge), read from EVAR's own file placed in the data folder.

`present_tasks(DIR)` is the layout of `--suite paper`: one folder per task named by its key,
DIR/esc50, DIR/us8k, ... ; each holds the data set as unpacked, either directly or inside the
publisher's single top folder (DIR/esc50/ESC-50-master/meta/esc50.csv and
DIR/esc50/meta/esc50.csv both work).

Torch-free: only the standard library.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "valid", "test")
VALID_FRACTION = 0.1  # EVAR: share of the training folds held out for early stopping (fold tasks)
VALID_ATTEMPTS = 100  # EVAR: redraws until the held-out share holds every class
DEFAULT_SEED = 42  # EVAR's first of its three runs (42, 43, 44)


class TaskError(ValueError):
    """A task folder that cannot be read; the one-line message names the file expected and the fix."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # key: folder name under a --suite paper folder
    title: str  # as in Table V
    clip_seconds: float  # EVAR's unit_sec: clips are cut/padded to this length
    multilabel: bool  # all nine are single-label -> metric accuracy
    paper_score: float  # M2D-AS, Table V (linear evaluation, %)
    split_source: str  # where the split comes from, one sentence
    n_folds: int = 1  # >1: leave-one-fold-out cross-validation, score = mean over folds
    marker: str = ""  # the file (or folder) that identifies the data set's top folder
    fix: str = ""  # how to get that folder right
    expected_clips: int | None = None  # clips the paper's list holds (None: not known here)


@dataclass
class Fold:
    """One train/valid/test partition: indices into TaskData.files.

    valid_drawn: valid was drawn at random from the training folds (ESC-50, US8K), as EVAR
    does; EVAR then fits its standardiser on train + valid (all training folds) and trains
    the linear layer on train only.
    """
    name: str
    train: list[int]
    valid: list[int]
    test: list[int]
    valid_drawn: bool = False


@dataclass
class TaskData:
    spec: TaskSpec
    root: Path
    files: list[Path]
    labels: list[str]
    classes: list[str]
    folds: list[Fold] = field(default_factory=list)


_EVAR = "nttcslab/eval-audio-repr"
_FOLD_VALID = (f"valid = {VALID_FRACTION:.0%} of the other folds' clips (rounded up) drawn at random and redrawn "
               f"until it holds every class, {_EVAR}'s rule for fold tasks (lineareval -> TorchMLPClassifier2.fit"
               " -> train_test_sure_split); the draw here is seeded by (seed, fold), EVAR's by its global RNG,"
               " so the clips held out differ while the rule is the same")

TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("esc50", "ESC-50", 5.0, False, 96.1,
             "The 5 official folds of meta/esc50.csv (column fold), each the test set once; " + _FOLD_VALID + ".",
             n_folds=5, marker="meta/esc50.csv", expected_clips=2000,
             fix="unpack ESC-50-master.zip (github.com/karolpiczak/ESC-50) into this folder"),
    TaskSpec("us8k", "US8K", 4.0, False, 89.8,
             "The 10 official folds of metadata/UrbanSound8K.csv (column fold), each the test set once; "
             + _FOLD_VALID + ".",
             n_folds=10, marker="metadata/UrbanSound8K.csv", expected_clips=8732,
             fix="unpack UrbanSound8K.tar.gz (urbansounddataset.weebly.com) into this folder"),
    TaskSpec("spcv2", "SPCV2", 1.0, False, 95.7,
             "The official validation_list.txt and testing_list.txt of Speech Commands v0.02; every other clip"
             " in a word folder (not _background_noise_) is train, as EVAR's make_metadata.py spcv2 does.",
             marker="testing_list.txt", expected_clips=105829,
             fix="unpack speech_commands_v0.02.tar.gz into this folder"),
    TaskSpec("vc1", "VC1", 8.2, False, 68.3,
             "The official VoxCeleb1 identification split iden_split.txt (1 = train, 2 = valid, 3 = test);"
             " label = speaker id.",
             marker="iden_split.txt", expected_clips=153516,
             fix="unzip vox1_dev_wav.zip and vox1_test_wav.zip here (they make wav/) and put the VoxCeleb1"
                 " meta file iden_split.txt beside wav/"),
    TaskSpec("voxforge", "VoxForge", 5.8, False, 98.4,
             f"{_EVAR}'s evar/metadata/voxforge.csv (file_name,label,split): a session-disjoint 70/15/15 split"
             " its authors drew once at random and ship as a list, so the list itself is read, from the data"
             " folder; label = language.",
             marker="voxforge.csv", expected_clips=176428,
             fix=f"put {_EVAR}'s evar/metadata/voxforge.csv beside the unpacked VoxForge session folders"
                 " (its file_name column names them)"),
    TaskSpec("cremad", "CREMA-D", 2.5, False, 73.1,
             f"The speaker-disjoint split of {_EVAR}'s evar/metadata/cremad.csv (after NOSS: 63 train, 9 valid,"
             " 19 test actors), restated here as its actor lists; label = the emotion in the file name. EVAR's"
             " list holds 7438 of the publisher's 7442 clips; which 4 it leaves out is not known here, so all"
             " clips present are used.",
             marker="AudioWAV", expected_clips=7438,
             fix="put CREMA-D's AudioWAV/ (github.com/CheyneyComputerScience/CREMA-D) or its .wav files here"),
    TaskSpec("gtzan", "GTZAN", 30.0, False, 86.9,
             "The fault-filtered lists of github.com/jongpillee/music_dataset_split GTZAN_split (train 443,"
             " valid 197, test 290 clips; the other 70 unused), which EVAR uses; restated here as index ranges"
             " (the three list files, when put in the folder, are read instead).",
             marker="blues", expected_clips=930,
             fix="unpack genres.tar.gz (GTZAN) here: genres/<genre>/<genre>.000NN.au or .wav"),
    TaskSpec("nsynth", "NSynth", 4.0, False, 75.2,
             "The official nsynth-train, nsynth-valid and nsynth-test sets (examples.json in each);"
             " label = instrument_family_str.",
             marker="nsynth-train/examples.json", expected_clips=305979,
             fix="unpack nsynth-train/valid/test.jsonwav.tar.gz into this folder"),
    TaskSpec("surge", "Surge", 4.0, False, 41.7,
             f"{_EVAR}'s evar/predefined/dataset_surge_tone_splits.csv (tone,split): tones (presets) drawn"
             " once at random by its authors, ~10% test and ~10% valid, shipped as a list and read from the"
             " data folder; label = the file's stem (its pitch).",
             marker="dataset_surge_tone_splits.csv",
             fix=f"put {_EVAR}'s evar/predefined/dataset_surge_tone_splits.csv beside the Surge tone folders"),
)}


# ---------------------------------------------------------------- finding the data set's own folder


def _has_marker(name: str, folder: Path) -> bool:
    if name == "cremad":  # the publisher's AudioWAV/ folder, or its clips copied flat
        return (folder / "AudioWAV").is_dir() or next(folder.glob("[0-9][0-9][0-9][0-9]_*_*_*.wav"), None) is not None
    if name == "gtzan":  # genres.tar.gz holds genres/<genre>/; EVAR renames genres/ to gtzan/
        return (folder / "blues").is_dir() or (folder / "genres" / "blues").is_dir()
    return (folder / TASKS[name].marker).exists()


def find_root(name: str, folder) -> Path:
    """The folder itself, or its single subfolder, that holds the data set as unpacked."""
    spec = _spec(name)
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskError(f"{folder}: no such folder; {spec.fix}")
    if _has_marker(name, folder):
        return folder
    below = [d for d in sorted(folder.iterdir()) if d.is_dir() and _has_marker(name, d)]
    if len(below) == 1:
        return below[0]
    if len(below) > 1:
        raise TaskError(f"{folder}: {len(below)} subfolders look like {spec.title} ({below[0].name}, "
                        f"{below[1].name}); keep one")
    raise TaskError(f"{folder / spec.marker}: not found (nor one folder down); {spec.fix}")


def present_tasks(data_root) -> list[str]:
    """Tasks (in Table V order) whose folder DIR/<name>/ exists and is not empty; load_task says
    what is missing in one that is incomplete."""
    root = Path(data_root)
    return [n for n in TASKS if (root / n).is_dir() and any((root / n).iterdir())]


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- shared pieces


def _missing(paths) -> list[Path]:
    """Paths that do not exist, listing each folder once (VoxCeleb1 and NSynth list ~10^5 files)."""
    listings: dict[Path, set] = {}
    out = []
    for p in paths:
        d = p.parent
        if d not in listings:
            try:
                listings[d] = set(os.listdir(d))
            except OSError:
                listings[d] = set()
        if p.name not in listings[d]:
            out.append(p)
    return out


def _require(paths, source, fix: str) -> None:
    gone = _missing(paths)
    if gone:
        raise TaskError(f"{source}: {len(gone)} listed file(s) missing, e.g. {gone[0]}; {fix}")


def _read_csv(path: Path, columns: set, fix: str) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"{path}: not found; {fix}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = {c.strip() for c in reader.fieldnames or []}
        lacking = columns - header
        if lacking:
            raise TaskError(f"{path}: missing column(s) {', '.join(sorted(lacking))}; expected the publisher's"
                            f" file with columns {', '.join(sorted(columns))}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _read_lines(path: Path, fix: str) -> list[str]:
    if not path.is_file():
        raise TaskError(f"{path}: not found; {fix}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def draw_valid(pool: list[int], labels: list[str], seed: int) -> tuple[list[int], list[int]]:
    """EVAR's validation set for a fold task: ceil(10%) of the training folds at random, redrawn
    (at most 100 times) until it holds every class of the pool. -> (train, valid), both sorted."""
    n_valid = math.ceil(VALID_FRACTION * len(pool))
    want = {labels[i] for i in pool}
    rng = random.Random(seed)
    for _ in range(VALID_ATTEMPTS):
        order = pool[:]
        rng.shuffle(order)
        valid = order[:n_valid]
        if {labels[i] for i in valid} == want:
            return sorted(order[n_valid:]), sorted(valid)
    raise TaskError(f"{len(pool)} training clips of {len(want)} classes: no draw of {n_valid} for validation in "
                    f"{VALID_ATTEMPTS} held every class; the data set needs more clips per class")


def _fold_tasks(files, labels, folds, n_folds, seed, source, fix) -> list[Fold]:
    found = sorted(set(folds))
    if found != list(range(1, n_folds + 1)):
        raise TaskError(f"{source}: folds {found} found, expected 1..{n_folds}; {fix}")
    out = []
    for k in range(1, n_folds + 1):
        test = [i for i, f in enumerate(folds) if f == k]
        pool = [i for i, f in enumerate(folds) if f != k]
        train, valid = draw_valid(pool, labels, seed * 1000 + k)
        out.append(Fold(f"fold{k}", train, valid, test, valid_drawn=True))
    return out


def _split_fold(splits: list[str]) -> list[Fold]:
    idx = {s: [i for i, v in enumerate(splits) if v == s] for s in SPLITS}
    return [Fold("official", idx["train"], idx["valid"], idx["test"])]


def _int(value: str, path: Path, column: str, fix: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TaskError(f"{path}: column {column} holds {value!r}, not a whole number; {fix}") from None


# ---------------------------------------------------------------- the nine readers


def _esc50(root: Path, seed: int):
    spec = TASKS["esc50"]
    meta = root / "meta" / "esc50.csv"
    rows = _read_csv(meta, {"filename", "fold", "target", "category"}, spec.fix)
    files = [root / "audio" / r["filename"] for r in rows]
    _require(files, meta, spec.fix)
    labels = [r["category"] for r in rows]
    folds = [_int(r["fold"], meta, "fold", spec.fix) for r in rows]
    return files, labels, _fold_tasks(files, labels, folds, spec.n_folds, seed, meta, spec.fix)


def _us8k(root: Path, seed: int):
    spec = TASKS["us8k"]
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = _read_csv(meta, {"slice_file_name", "fold", "classID", "class"}, spec.fix)
    folds = [_int(r["fold"], meta, "fold", spec.fix) for r in rows]
    files = [root / "audio" / f"fold{k}" / r["slice_file_name"] for r, k in zip(rows, folds)]
    _require(files, meta, spec.fix)
    labels = [r["class"] for r in rows]
    return files, labels, _fold_tasks(files, labels, folds, spec.n_folds, seed, meta, spec.fix)


def _spcv2(root: Path, seed: int):
    spec = TASKS["spcv2"]
    valid = set(_read_lines(root / "validation_list.txt", spec.fix))
    test = set(_read_lines(root / "testing_list.txt", spec.fix))
    # Word folders start with a lower-case letter; _background_noise_ does not.
    rels = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("[a-z]*/*.wav"))
    have = set(rels)
    for listed, name in ((valid, "validation_list.txt"), (test, "testing_list.txt")):
        gone = sorted(listed - have)
        if gone:
            raise TaskError(f"{root / name}: {len(gone)} listed file(s) missing, e.g. {root / gone[0]}; {spec.fix}")
    splits = ["test" if r in test else "valid" if r in valid else "train" for r in rels]
    return [root / r for r in rels], [r.split("/")[0] for r in rels], _split_fold(splits)


def _vc1(root: Path, seed: int):
    spec = TASKS["vc1"]
    path = root / "iden_split.txt"
    files, labels, splits = [], [], []
    for n, line in enumerate(_read_lines(path, spec.fix), 1):
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("1", "2", "3"):
            raise TaskError(f"{path}:{n}: {line!r} is not '<1|2|3> idNNNNN/<video>/<nnnnn>.wav'; {spec.fix}")
        files.append(root / "wav" / parts[1])
        labels.append(parts[1].split("/")[0])
        splits.append(SPLITS[int(parts[0]) - 1])
    _require(files, path, spec.fix)
    return files, labels, _split_fold(splits)


def _listed(root: Path, name: str, seed: int):
    """A list file with columns file_name,label,split (EVAR's metadata format), paths relative to root."""
    spec = TASKS[name]
    path = root / spec.marker
    rows = _read_csv(path, {"file_name", "label", "split"}, spec.fix)
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise TaskError(f"{path}: split value(s) {bad[:3]}; expected train, valid or test ({spec.fix})")
    files = [root / r["file_name"] for r in rows]
    _require(files, path, "unpack every archive the list names")
    return files, [r["label"] for r in rows], _split_fold([r["split"] for r in rows])


# CREMA-D actors by split, as in EVAR's evar/metadata/cremad.csv (actors 1001-1091; the rest are train).
CREMAD_VALID_ACTORS = frozenset({1009, 1011, 1022, 1034, 1039, 1047, 1066, 1070, 1082})
CREMAD_TEST_ACTORS = frozenset({1001, 1004, 1017, 1019, 1020, 1025, 1026, 1029, 1033, 1035, 1042, 1044, 1050,
                                1053, 1056, 1058, 1060, 1069, 1083})
CREMAD_ACTORS = range(1001, 1092)
_CREMAD_NAME = re.compile(r"(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})\.wav")  # actor_sentence_emotion_level


def _cremad(root: Path, seed: int):
    spec = TASKS["cremad"]
    folder = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
    files, labels, splits = [], [], []
    for p in sorted(folder.glob("*.wav")):
        m = _CREMAD_NAME.fullmatch(p.name)
        if not m:
            continue
        actor = int(m.group(1))
        if actor not in CREMAD_ACTORS:
            raise TaskError(f"{p}: actor {actor} is not one of CREMA-D's 1001-1091; {spec.fix}")
        files.append(p)
        labels.append(m.group(3))
        splits.append("test" if actor in CREMAD_TEST_ACTORS else "valid" if actor in CREMAD_VALID_ACTORS
                      else "train")
    if not files:
        raise TaskError(f"{folder}: no CREMA-D clips (<actor>_<sentence>_<emotion>_<level>.wav); {spec.fix}")
    return files, labels, _split_fold(splits)


# GTZAN fault-filtered split (Kereliuk et al. 2015) as distributed in github.com/jongpillee/music_dataset_split
# (GTZAN_split/{train,valid,test}_filtered.txt, MIT licence, (c) 2017 Jongpil Lee): clip numbers per genre.
GTZAN_SPLIT = {  # genre: (train, valid, test)
    "blues": ("29-49 73-97", "0-11 50-60", "12-28 61-72 98-99"),
    "classical": ("30-33 43-48 50-67 80-99", "0-10 68-76", "11-29 34-41 49 77-79"),
    "country": ("19-26 28-29 65-99", "0-7 9-18 27 41-42 45 49", "30-40 43-44 46-48 50-51 53-64"),
    "disco": ("5 15-20 22-37 39-45 47 49 53-54 56-57 59 61 70 73-74 89",
              "0 2-4 6-14 46 48 52 67-68 72 75 90 95",
              "1 21 58 62-66 69 76-88 91-94 96-97 99"),
    "hiphop": ("2-25 28-29 31-38 41-42 55-61 77-80", "81-98", "0 26-27 30 40 43-45 51-54 62-75 99"),
    "jazz": ("0-1 11-24 41 47-72", "2-10 25-32", "73-99"),
    "metal": ("2-3 5 21 24 35 46-57 59-66 69 71-72 79-80 84 86 89-99",
              "0-1 6-11 16-20 36-37 68 76-77 81-82",
              "12-15 22-23 25-33 38-39 67 70 73-75 78 83 85 87-88"),
    "pop": ("2-9 11-12 16-20 23-29 31-36 38-42 44 46 49-50 80 97-99",
            "10 53 55 58-62 81 83-86",
            "0-1 13-14 43 63-66 69-79 82 88-96"),
    "reggae": ("0-2 4 6 9 11-12 14-32 42-45 49-51 54-60 63 69",
               "61-62 70 72 74 76-78 85 92-99",
               "34-40 46-48 52-53 64-68 71 79 82-84 87-90"),
    "rock": ("0-9 16-26 57-70 91-99", "38 49-56 71-85", "10-15 27-37 39-48 86-90"),
}


def _numbers(ranges: str) -> list[int]:
    out = []
    for part in ranges.split():
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


def gtzan_split() -> dict[str, str]:
    """'<genre>/<genre>.000NN' -> split, the 930 clips of the fault-filtered lists."""
    return {f"{g}/{g}.{n:05d}": split for g, lists in GTZAN_SPLIT.items()
            for split, ranges in zip(SPLITS, lists) for n in _numbers(ranges)}


GTZAN_LISTS = tuple(f"{s}_filtered.txt" for s in SPLITS)  # the lists' own names, lines '<genre>/<genre>.000NN.wav'


def _gtzan_lists(root: Path) -> dict[str, str] | None:
    """The split from the three list files when the folder holds them, else None (use GTZAN_SPLIT)."""
    paths = [root / name for name in GTZAN_LISTS]
    if not any(p.is_file() for p in paths):
        return None
    out = {}
    for split, path in zip(SPLITS, paths):
        for line in _read_lines(path, "put all three of " + ", ".join(GTZAN_LISTS) + " here, or none"):
            out[line.rsplit(".", 1)[0]] = split
    return out


def _gtzan(root: Path, seed: int):
    spec = TASKS["gtzan"]
    base = root if (root / "blues").is_dir() else root / "genres"
    found = {}
    for p in base.glob("*/*.*"):
        if p.suffix.lower() in (".au", ".wav"):
            found.setdefault(f"{p.parent.name}/{p.stem}", p)
    wanted = _gtzan_lists(root) or gtzan_split()
    gone = [k for k in wanted if k not in found]
    if gone:
        raise TaskError(f"{base / gone[0]}.au (or .wav): missing ({len(gone)} of the split's {len(wanted)} clips);"
                        f" {spec.fix}")
    keys = sorted(wanted)
    return [found[k] for k in keys], [k.split("/")[0] for k in keys], _split_fold([wanted[k] for k in keys])


def _nsynth(root: Path, seed: int):
    spec = TASKS["nsynth"]
    files, labels, splits = [], [], []
    for split, part in zip(SPLITS, ("train", "valid", "test")):
        path = root / f"nsynth-{part}" / "examples.json"
        if not path.is_file():
            raise TaskError(f"{path}: not found; {spec.fix}")
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise TaskError(f"{path}: not JSON ({e}); unpack nsynth-{part}.jsonwav.tar.gz again") from None
        names = sorted(examples)
        for n in names:
            if "instrument_family_str" not in examples[n]:
                raise TaskError(f"{path}: note {n} has no instrument_family_str; {spec.fix}")
        part_files = [root / f"nsynth-{part}" / "audio" / f"{n}.wav" for n in names]
        _require(part_files, path, spec.fix)
        files += part_files
        labels += [examples[n]["instrument_family_str"] for n in names]
        splits += [split] * len(names)
    return files, labels, _split_fold(splits)


def _surge(root: Path, seed: int):
    spec = TASKS["surge"]
    path = root / spec.marker
    tone_split = {r["tone"]: r["split"] for r in _read_csv(path, {"tone", "split"}, spec.fix)}
    bad = sorted(set(tone_split.values()) - set(SPLITS))
    if bad:
        raise TaskError(f"{path}: split value(s) {bad[:3]}; expected train, valid or test ({spec.fix})")
    files = sorted(p for p in root.glob("*/*.*") if p.suffix.lower() in (".ogg", ".wav"))
    if not files:
        raise TaskError(f"{root}: no <tone>/<pitch>.ogg files; unpack the Surge data set (zenodo.org/record/4677097)"
                        " into this folder")
    unknown = sorted({p.parent.name for p in files} - set(tone_split))
    if unknown:
        raise TaskError(f"{root / unknown[0]}: tone not in {path.name} ({len(unknown)} such); {spec.fix}")
    return files, [p.stem for p in files], _split_fold([tone_split[p.parent.name] for p in files])


_READERS = {"esc50": _esc50, "us8k": _us8k, "spcv2": _spcv2, "vc1": _vc1,
            "voxforge": lambda root, seed: _listed(root, "voxforge", seed), "cremad": _cremad,
            "gtzan": _gtzan, "nsynth": _nsynth, "surge": _surge}


def load_task(name: str, data_root, seed: int = DEFAULT_SEED) -> TaskData:
    """Read task `name` from its data set's folder (or a folder holding that folder).

    seed only matters for ESC-50 and US8K, whose validation clips are drawn per (seed, fold)."""
    spec = _spec(name)
    root = find_root(name, data_root)
    files, labels, folds = _READERS[name](root, seed)
    if not files:
        raise TaskError(f"{root}: no clips found; {spec.fix}")
    for fold in folds:
        for split in SPLITS:
            if not getattr(fold, split):
                raise TaskError(f"{root}: {spec.title} {fold.name} has no {split} clips; {spec.fix}")
    return TaskData(spec, root, files, labels, sorted(set(labels)), folds)


def task_folder(data_root, name: str) -> Path:
    """Where --suite paper looks for task `name`: DIR/<name>."""
    _spec(name)
    return Path(data_root) / name
