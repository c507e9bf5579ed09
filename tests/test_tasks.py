"""The nine Table V tasks read from stand-ins laid out as their publishers distribute them."""

import math
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from task_standins import (CREMAD_EMOTIONS, ESC50_CLASSES, GTZAN_GENRES, NSYNTH_FAMILIES, SPCV2_WORDS,
                           SURGE_PITCHES, US8K_CLASSES, VOXFORGE_LANGS, make_standin, tone)

from m2das.downstream.tasks import (CREMAD_TEST_ACTORS, CREMAD_VALID_ACTORS, TASKS, TaskError, draw_valid,
                                    find_root, gtzan_split, load_task, present_tasks, task_folder)

# Table V of the paper (M2D-AS row) and EVAR's clip length per task.
TABLE_V = {"esc50": (5.0, 96.1), "us8k": (4.0, 89.8), "spcv2": (1.0, 95.7), "vc1": (8.2, 68.3),
           "voxforge": (5.8, 98.4), "cremad": (2.5, 73.1), "gtzan": (30.0, 86.9), "nsynth": (4.0, 75.2),
           "surge": (4.0, 41.7)}
N = 3  # classes per stand-in
PER = 2  # clips per class in each fold / split
CLASSES = {"esc50": [c for c, _, _ in ESC50_CLASSES[:N]], "us8k": [c for _, c in US8K_CLASSES[:N]],
           "spcv2": SPCV2_WORDS[:N], "vc1": [f"id{10001 + c}" for c in range(N)], "voxforge": VOXFORGE_LANGS[:N],
           "cremad": CREMAD_EMOTIONS[:N], "gtzan": GTZAN_GENRES[:N], "nsynth": NSYNTH_FAMILIES[:N],
           "surge": [str(p) for p in SURGE_PITCHES[:N]]}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One --suite paper folder holding all nine stand-ins: DIR/<name>/."""
    root = tmp_path_factory.mktemp("suite")
    for name in TASKS:
        make_standin(name, root / name, per_class=PER, n_classes=N)
    return root


def test_the_nine_tasks_and_their_table_v_facts():
    assert list(TASKS) == list(TABLE_V)
    for name, spec in TASKS.items():
        assert (spec.clip_seconds, spec.paper_score) == TABLE_V[name], name
        assert spec.multilabel is False and spec.name == name
        assert spec.split_source.endswith(".") and len(spec.split_source) > 40
    assert round(sum(s.paper_score for s in TASKS.values()) / 9, 1) == 80.6  # the paper's average
    assert (TASKS["esc50"].n_folds, TASKS["us8k"].n_folds) == (5, 10)
    assert all(s.n_folds == 1 for n, s in TASKS.items() if n not in ("esc50", "us8k"))


@pytest.mark.parametrize("name", [n for n in TABLE_V if n not in ("esc50", "us8k")])
def test_official_split_tasks(suite, name):
    data = load_task(name, suite / name)
    assert data.spec is TASKS[name]
    assert data.classes == sorted(CLASSES[name])
    assert len(data.files) == len(data.labels) == 3 * N * PER
    assert all(f.is_absolute() and f.is_file() for f in data.files)
    [fold] = data.folds
    assert fold.name == "official" and not fold.valid_drawn
    assert sorted(fold.train + fold.valid + fold.test) == list(range(len(data.files)))
    for split in ("train", "valid", "test"):
        assert Counter(data.labels[i] for i in getattr(fold, split)) == {c: PER for c in CLASSES[name]}, split


def _split_of(data):
    [fold] = data.folds
    return {data.files[i]: s for s in ("train", "valid", "test") for i in getattr(fold, s)}


def test_spcv2_lists_decide_and_background_noise_is_left_out(suite):
    data = load_task("spcv2", suite / "spcv2")
    split = _split_of(data)
    root = suite / "spcv2"
    for listed, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        for rel in (root / name).read_text().split():
            assert split[root / rel] == listed
    assert not any("_background_noise_" in str(f) for f in data.files)
    assert data.labels == [f.parent.name for f in data.files]


def test_vc1_reads_iden_split(suite):
    data = load_task("vc1", suite / "vc1")
    split = _split_of(data)
    for line in (suite / "vc1" / "iden_split.txt").read_text().splitlines():
        code, rel = line.split()
        assert split[suite / "vc1" / "wav" / rel] == {"1": "train", "2": "valid", "3": "test"}[code]
    assert data.labels == [f.relative_to(suite / "vc1" / "wav").parts[0] for f in data.files]


def test_cremad_split_follows_the_actor(suite):
    data = load_task("cremad", suite / "cremad")
    for f, s in _split_of(data).items():
        actor = int(f.name[:4])
        assert s == ("test" if actor in CREMAD_TEST_ACTORS else "valid" if actor in CREMAD_VALID_ACTORS else "train")
    assert len(CREMAD_VALID_ACTORS) == 9 and len(CREMAD_TEST_ACTORS) == 19
    assert not CREMAD_VALID_ACTORS & CREMAD_TEST_ACTORS  # 91 - 28 = 63 train actors


def test_gtzan_reads_au_and_leaves_unlisted_clips_out(suite):
    data = load_task("gtzan", suite / "gtzan")
    assert data.root == suite / "gtzan"
    assert all(f.suffix == ".au" for f in data.files)
    assert not any(f.stem.endswith(f".{3 * PER:05d}") for f in data.files)  # in no list -> unused
    listed = {}
    for s in ("train", "valid", "test"):
        for line in (suite / "gtzan" / f"{s}_filtered.txt").read_text().split():
            listed[line[:-4]] = s
    assert {f"{f.parent.name}/{f.stem}": s for f, s in _split_of(data).items()} == listed


def test_gtzan_fault_filtered_split_without_list_files(tmp_path):
    split = gtzan_split()
    assert Counter(split.values()) == {"train": 443, "valid": 197, "test": 290}
    # First and last lines of the published lists.
    assert (split["blues/blues.00029"], split["blues/blues.00000"], split["blues/blues.00012"]) == \
        ("train", "valid", "test")
    assert (split["rock/rock.00099"], split["rock/rock.00085"], split["rock/rock.00090"]) == ("train", "valid", "test")
    assert "jazz/jazz.00033" not in split and len(split) == 930
    for genre in GTZAN_GENRES:  # all 1000 clips as genres.tar.gz holds them (content does not matter here)
        (tmp_path / "genres" / genre).mkdir(parents=True)
        for n in range(100):
            (tmp_path / "genres" / genre / f"{genre}.{n:05d}.au").touch()
    data = load_task("gtzan", tmp_path)
    assert len(data.files) == 930 and data.classes == GTZAN_GENRES
    assert {f"{f.parent.name}/{f.stem}": s for f, s in _split_of(data).items()} == split
    (tmp_path / "genres" / "jazz" / "jazz.00080.au").unlink()
    with pytest.raises(TaskError, match=r"jazz\.00080\.au \(or \.wav\): missing \(1 of the split's 930"):
        load_task("gtzan", tmp_path)


def test_surge_split_is_by_tone(suite):
    data = load_task("surge", suite / "surge")
    rows = dict(line.split(",") for line in (suite / "surge" / "dataset_surge_tone_splits.csv").read_text()
                .splitlines()[1:])
    assert all(rows[f.parent.name] == s for f, s in _split_of(data).items())
    assert all(f.suffix == ".ogg" for f in data.files)
    assert data.labels == [f.stem for f in data.files]


def test_nsynth_label_is_instrument_family(suite):
    data = load_task("nsynth", suite / "nsynth")
    for f, s in _split_of(data).items():
        assert f.parent.parent.name == {"train": "nsynth-train", "valid": "nsynth-valid", "test": "nsynth-test"}[s]
    assert data.labels == [f.stem.split("_")[0] for f in data.files]


@pytest.mark.parametrize("name,folds", [("esc50", 5), ("us8k", 10)])
def test_fold_tasks(suite, name, folds):
    data = load_task(name, suite / name)
    assert data.classes == sorted(CLASSES[name])
    assert len(data.files) == folds * N * PER and all(f.is_file() for f in data.files)
    fold_of = [int(f.name.split("-")[0]) if name == "esc50" else int(f.parent.name[4:]) for f in data.files]
    assert [f.name for f in data.folds] == [f"fold{k}" for k in range(1, folds + 1)]
    for k, fold in enumerate(data.folds, 1):
        assert fold.valid_drawn
        assert fold.test == [i for i, f in enumerate(fold_of) if f == k]
        pool = [i for i, f in enumerate(fold_of) if f != k]
        assert sorted(fold.train + fold.valid) == pool and not set(fold.train) & set(fold.valid)
        assert len(fold.valid) == math.ceil(0.1 * len(pool))
        assert {data.labels[i] for i in fold.valid} == set(CLASSES[name])
    # The draw is a function of the seed: the same seed gives the same clips, EVAR's next seeds others.
    again = load_task(name, suite / name)
    assert [f.valid for f in again.folds] == [f.valid for f in data.folds]
    other = load_task(name, suite / name, seed=43)
    assert [f.valid for f in other.folds] != [f.valid for f in data.folds]
    assert [f.test for f in other.folds] == [f.test for f in data.folds]


def test_esc50_labels_come_from_the_category_column(suite):
    data = load_task("esc50", suite / "esc50")
    target_of = {c: t for c, t, _ in ESC50_CLASSES}
    assert all(int(f.stem.split("-")[-1]) == target_of[label] for f, label in zip(data.files, data.labels))


def test_draw_valid_holds_every_class_or_refuses():
    labels = ["a", "b", "c"] * 10
    train, valid = draw_valid(list(range(30)), labels, seed=1)
    assert len(valid) == 3 and {labels[i] for i in valid} == {"a", "b", "c"}
    assert sorted(train + valid) == list(range(30))
    with pytest.raises(TaskError, match="9 training clips of 3 classes: no draw of 1 for validation in 100"):
        draw_valid(list(range(9)), labels[:9], seed=1)  # ceil(0.9) = 1 clip can never hold 3 classes


def test_standin_audio_is_real_and_classes_differ(suite):
    data = load_task("esc50", suite / "esc50")
    peaks = {}
    for f, label in zip(data.files, data.labels):
        x, sr = sf.read(f)
        assert sr == 16000 and len(x) == 1600
        peaks.setdefault(label, set()).add(int(np.argmax(np.abs(np.fft.rfft(x)))))
    assert all(len(p) == 1 for p in peaks.values())  # one pitch per class ...
    assert len({next(iter(p)) for p in peaks.values()}) == N  # ... and a different one for each class
    assert np.allclose(sf.read(data.files[0])[0], tone(0, int(data.files[0].name.split("-")[1]), 0.1), atol=1e-3)


def test_present_tasks_and_one_folder_down(tmp_path):
    make_standin("esc50", tmp_path / "esc50" / "ESC-50-master")  # the publisher's top folder kept
    make_standin("gtzan", tmp_path / "gtzan")
    (tmp_path / "us8k").mkdir()  # empty: not present
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("x")
    assert present_tasks(tmp_path) == ["esc50", "gtzan"]
    data = load_task("esc50", task_folder(tmp_path, "esc50"))
    assert data.root == tmp_path / "esc50" / "ESC-50-master" and len(data.folds) == 5
    assert load_task("esc50", tmp_path / "esc50" / "ESC-50-master").files == data.files
    assert present_tasks(tmp_path / "nothing-here") == []


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_layouts_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError) as e:
        load_task("esc50", tmp_path / "empty")
    assert _one_line(e) == (f"{tmp_path / 'empty' / 'meta' / 'esc50.csv'}: not found (nor one folder down); "
                            "unpack ESC-50-master.zip (github.com/karolpiczak/ESC-50) into this folder")
    with pytest.raises(TaskError, match="no such folder"):
        load_task("us8k", tmp_path / "absent")
    with pytest.raises(TaskError, match="unknown task 'esc10'; choose from esc50, us8k"):
        load_task("esc10", tmp_path)

    root = make_standin("esc50", tmp_path / "esc50", per_class=2)
    victim = sorted((root / "audio").iterdir())[3]
    victim.unlink()
    with pytest.raises(TaskError) as e:
        load_task("esc50", root)
    assert _one_line(e) == (f"{root / 'meta' / 'esc50.csv'}: 1 listed file(s) missing, e.g. {victim}; "
                            "unpack ESC-50-master.zip (github.com/karolpiczak/ESC-50) into this folder")
    meta = root / "meta" / "esc50.csv"
    meta.write_text(meta.read_text().replace("category", "label", 1))
    with pytest.raises(TaskError, match=r"esc50\.csv: missing column\(s\) category"):
        load_task("esc50", root)

    surge = make_standin("surge", tmp_path / "surge")
    (surge / "dataset_surge_tone_splits.csv").unlink()
    with pytest.raises(TaskError) as e:
        load_task("surge", surge)
    assert "dataset_surge_tone_splits.csv: not found" in _one_line(e) and "eval-audio-repr" in str(e.value)

    spc = make_standin("spcv2", tmp_path / "spcv2")
    gone = (spc / "testing_list.txt").read_text().split()[0]
    (spc / gone).unlink()
    with pytest.raises(TaskError, match=r"testing_list\.txt: 1 listed file\(s\) missing"):
        load_task("spcv2", spc)

    two = tmp_path / "two"
    make_standin("cremad", two / "a")
    make_standin("cremad", two / "b")
    with pytest.raises(TaskError, match="2 subfolders look like CREMA-D"):
        load_task("cremad", two)


def test_find_root_and_task_folder(tmp_path):
    root = make_standin("nsynth", tmp_path / "nsynth" / "nsynth")
    assert find_root("nsynth", tmp_path / "nsynth") == root
    assert task_folder(tmp_path, "vc1") == tmp_path / "vc1"
