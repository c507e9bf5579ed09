"""Tiny stand-ins for the nine Table V data sets, laid out exactly as their publishers distribute them.

`make_standin(name, root)` writes real short audio (a sine whose pitch depends on the class,
with a per-file phase and a little noise, so a linear probe on embeddings can separate the
classes) under the publisher's file names, folder layout and metadata columns, and returns the
folder to give to `load_task`. Torch-free: numpy and soundfile only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from m2das.downstream.tasks import CREMAD_TEST_ACTORS, CREMAD_VALID_ACTORS, GTZAN_LISTS, SPLITS

SR = 16000

# Real class names (and ids) of each data set, in the order the stand-ins use them.
ESC50_CLASSES = [("dog", 0, True), ("rooster", 1, True), ("pig", 2, False), ("cow", 3, False), ("frog", 4, False)]
US8K_CLASSES = [(0, "air_conditioner"), (1, "car_horn"), (2, "children_playing"), (3, "dog_bark"), (4, "drilling")]
SPCV2_WORDS = ["yes", "no", "up", "down", "left"]
VOXFORGE_LANGS = ["de", "en", "es", "fr", "it", "ru"]
CREMAD_EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
CREMAD_SENTENCES = ["DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI"]
GTZAN_GENRES = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]
NSYNTH_FAMILIES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "vocal"]
SURGE_PITCHES = [48, 55, 60, 67, 72]


def tone(cls: int, k: int, seconds: float) -> np.ndarray:
    """Class `cls` -> a sine at 200 * 2**(0.75 cls) Hz; `k` varies phase and noise between files."""
    rng = np.random.default_rng(7919 * cls + k)
    t = np.arange(max(1, int(round(seconds * SR)))) / SR
    x = 0.5 * np.sin(2 * np.pi * 200.0 * 2 ** (0.75 * cls) * t + rng.uniform(0, 2 * np.pi))
    return (x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _write(path: Path, cls: int, k: int, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(cls, k, seconds), SR)  # format from the suffix: .wav, .au, .ogg


def _csv(path: Path, header: list, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _esc50(root, n, per_class, seconds):
    rows = []
    for fold in range(1, 6):
        for c, (category, target, esc10) in enumerate(ESC50_CLASSES[:n]):
            for k in range(per_class):
                src = 100000 + 1000 * target + 10 * fold + k
                name = f"{fold}-{src}-A-{target}.wav"
                _write(root / "audio" / name, c, src, seconds)
                rows.append([name, fold, target, category, esc10, src, "A"])
    _csv(root / "meta" / "esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)


def _us8k(root, n, per_class, seconds):
    rows = []
    for fold in range(1, 11):
        for c, (class_id, name) in enumerate(US8K_CLASSES[:n]):
            for k in range(per_class):
                fs_id = 10000 + 100 * fold + 10 * class_id + k
                slice_name = f"{fs_id}-{class_id}-0-{k}.wav"
                _write(root / "audio" / f"fold{fold}" / slice_name, c, fs_id, seconds)
                rows.append([slice_name, fs_id, 0.0, seconds, 1, fold, class_id, name])
    _csv(root / "metadata" / "UrbanSound8K.csv",
         ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)


def _spcv2(root, n, per_class, seconds):
    lists = {"valid": [], "test": []}
    for c, word in enumerate(SPCV2_WORDS[:n]):
        for s, split in enumerate(SPLITS):
            for k in range(per_class):
                rel = f"{word}/{0x1a2b3c00 + 64 * c + 8 * s + k:08x}_nohash_{k}.wav"
                _write(root / rel, c, 100 * s + k, seconds)
                if split != "train":
                    lists[split].append(rel)
    _write(root / "_background_noise_" / "white_noise.wav", n, 0, seconds)
    (root / "validation_list.txt").write_text("".join(r + "\n" for r in lists["valid"]))
    (root / "testing_list.txt").write_text("".join(r + "\n" for r in lists["test"]))
    (root / "LICENSE").write_text("CC BY 4.0\n")


def _vc1(root, n, per_class, seconds):
    lines = []
    for c in range(n):
        speaker = f"id{10001 + c}"
        for s in range(3):
            video = f"v{c}{s}xYzAbC1"[:11]
            for k in range(per_class):
                rel = f"{speaker}/{video}/{k + 1:05d}.wav"
                _write(root / "wav" / rel, c, 100 * s + k, seconds)
                lines.append(f"{s + 1} {rel}")
    (root / "iden_split.txt").write_text("".join(line + "\n" for line in lines))


def _voxforge(root, n, per_class, seconds):
    rows = []
    for c, lang in enumerate(VOXFORGE_LANGS[:n]):
        for s, split in enumerate(SPLITS):  # sessions never shared between splits
            session = f"speaker{c}{s}-20080504-{lang}{s}"
            for k in range(per_class):
                rel = f"{session}/wav/a{k + 1:04d}.wav"
                _write(root / rel, c, 100 * s + k, seconds)
                rows.append([rel, lang, split])
    _csv(root / "voxforge.csv", ["file_name", "label", "split"], rows)


def _cremad(root, n, per_class, seconds):
    train = sorted(set(range(1001, 1092)) - CREMAD_VALID_ACTORS - CREMAD_TEST_ACTORS)
    actors = [train[0], sorted(CREMAD_VALID_ACTORS)[0], sorted(CREMAD_TEST_ACTORS)[0]]
    for a, actor in enumerate(actors):
        for c, emotion in enumerate(CREMAD_EMOTIONS[:n]):
            for k in range(per_class):
                _write(root / "AudioWAV" / f"{actor}_{CREMAD_SENTENCES[k]}_{emotion}_XX.wav", c, 100 * a + k, seconds)


def _gtzan(root, n, per_class, seconds):
    lists = {s: [] for s in SPLITS}
    for c, genre in enumerate(GTZAN_GENRES[:n]):
        for number in range(3 * per_class + 1):  # the last one is in no list: fault-filtered out
            rel = f"{genre}/{genre}.{number:05d}"
            _write(root / "genres" / f"{rel}.au", c, number, seconds)
            if number < 3 * per_class:
                lists[SPLITS[number // per_class]].append(f"{rel}.wav")  # the lists name .wav copies
    for split, name in zip(SPLITS, GTZAN_LISTS):
        (root / name).write_text("".join(r + "\n" for r in lists[split]))


def _nsynth(root, n, per_class, seconds):
    for s, part in enumerate(("train", "valid", "test")):
        examples = {}
        for c, family in enumerate(NSYNTH_FAMILIES[:n]):
            for k in range(per_class):
                pitch = 40 + 5 * k
                note = f"{family}_acoustic_{s:03d}-{pitch:03d}-100"
                _write(root / f"nsynth-{part}" / "audio" / f"{note}.wav", c, 100 * s + k, seconds)
                examples[note] = {
                    "note": 1000 * s + 10 * c + k, "note_str": note, "instrument": c,
                    "instrument_str": f"{family}_acoustic_{s:03d}", "pitch": pitch, "velocity": 100,
                    "sample_rate": 16000, "qualities": [0] * 10, "qualities_str": [],
                    "instrument_family": c, "instrument_family_str": family,
                    "instrument_source": 0, "instrument_source_str": "acoustic"}
        path = root / f"nsynth-{part}" / "examples.json"
        path.write_text(json.dumps(examples, indent=2))


def _surge(root, n, per_class, seconds):
    rows = []
    for s, split in enumerate(SPLITS):
        for k in range(per_class):  # tones (presets), each played at every pitch
            tone_name = f"surge-patches-Standin-{split}-{k}-velocity64"
            rows.append([tone_name, split])
            for c, pitch in enumerate(SURGE_PITCHES[:n]):
                _write(root / tone_name / f"{pitch}.ogg", c, 100 * s + k, seconds)
    _csv(root / "dataset_surge_tone_splits.csv", ["tone", "split"], rows)


_MAKERS = {"esc50": _esc50, "us8k": _us8k, "spcv2": _spcv2, "vc1": _vc1, "voxforge": _voxforge,
           "cremad": _cremad, "gtzan": _gtzan, "nsynth": _nsynth, "surge": _surge}
MAX_CLASSES = {"esc50": len(ESC50_CLASSES), "us8k": len(US8K_CLASSES), "spcv2": len(SPCV2_WORDS), "vc1": 10,
               "voxforge": len(VOXFORGE_LANGS), "cremad": len(CREMAD_EMOTIONS), "gtzan": len(GTZAN_GENRES),
               "nsynth": len(NSYNTH_FAMILIES), "surge": len(SURGE_PITCHES)}


def make_standin(name: str, root, per_class: int = 2, seconds: float = 0.1, n_classes: int = 3) -> Path:
    """Write a stand-in for task `name` into `root` (created); -> root, the folder for load_task.

    per_class clips of each class go into each fold (ESC-50, US8K) or each split (the others; for
    Surge: tones per split, each at every pitch). A --suite paper folder is DIR/<name> for each task.
    """
    if not 1 <= n_classes <= MAX_CLASSES[name]:
        raise ValueError(f"{name}: n_classes must be 1..{MAX_CLASSES[name]}")
    if name == "cremad" and per_class > len(CREMAD_SENTENCES):
        raise ValueError(f"cremad: per_class must be at most {len(CREMAD_SENTENCES)} (one clip per sentence)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _MAKERS[name](root, n_classes, per_class, seconds)
    return root
