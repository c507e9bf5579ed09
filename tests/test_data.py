import re

import numpy as np
import pytest

from conftest import run_m2das, write_lms_folder
from m2das.data.dataset import DataListError, LMSDataset, ResumableSampler, read_list, validate
from m2das.data.stats import compute_norm_stats, crop_or_pad


def test_sampler_shards_are_disjoint_and_drop_the_last_incomplete_batch():
    ranks = [list(ResumableSampler(50, 4, r, 3, seed=7)) for r in range(3)]
    assert all(len(r) == 4 * 4 for r in ranks)  # 50 // (4 * 3) = 4 batches per rank
    items = [i for r in ranks for (_, _, i) in r]
    assert len(set(items)) == len(items) == 48
    # Same (seed, epoch) -> same order; a new epoch -> a new order.
    assert list(ResumableSampler(50, 4, 0, 3, seed=7)) == ranks[0]
    s = ResumableSampler(50, 4, 0, 3, seed=7)
    s.set_position(1)
    assert [i for _, _, i in s] != [i for _, _, i in ranks[0]]


def test_sampler_resumes_mid_epoch_with_the_same_tail():
    full = ResumableSampler(40, 4, 1, 2, seed=3)
    full.set_position(2)
    tail = ResumableSampler(40, 4, 1, 2, seed=3)
    tail.set_position(2, start_batch=3)
    assert list(tail) == list(full)[3 * 4:]


def test_weighted_sampler_follows_weights():
    weights = np.array([0.0] * 10 + [1.0] * 10)
    s = ResumableSampler(20, 5, 0, 1, seed=0, weights=weights)
    assert all(i >= 10 for _, _, i in s)


def test_crop_is_a_function_of_seed_epoch_position(lms_data):
    samples = read_list(lms_data / "files_as_weighted.csv", lms_data)
    ds = LMSDataset(samples, 100, seed=1)
    a, la = ds[(0, 5, 3)]
    b, _ = ds[(0, 5, 3)]
    c, _ = ds[(1, 5, 3)]
    assert a.shape == (1, 80, 100) and la.shape == (len(samples.classes),)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert la.sum() == len(samples.labels_of(3))
    # The crop is a window of the file.
    full = np.load(lms_data / samples.files[3])
    starts = [s for s in range(full.shape[-1] - 100 + 1) if np.array_equal(full[..., s:s + 100], a.numpy())]
    assert starts


def test_short_clip_is_zero_padded_on_the_right():
    x = np.ones((1, 80, 5), dtype=np.float32)
    y = crop_or_pad(x, 8, 0)
    assert y.shape == (1, 80, 8) and np.all(y[..., :5] == 1) and np.all(y[..., 5:] == 0)


def test_norm_stats_fixed_seed_is_reproducible(lms_data):
    paths = sorted((lms_data / "audioset_lms").glob("*.npy"))
    a = compute_norm_stats(paths, num_files=30, frames=100, seed=0)
    b = compute_norm_stats(paths, num_files=30, frames=100, seed=0)
    assert a == b
    assert a["mean"] == pytest.approx(-7, abs=0.2) and a["std"] == pytest.approx(4, abs=0.2)
    # the trainer's lazy root / name per drawn file gives the numbers a list of every path gives
    from m2das.data.dataset import ListedPaths

    class Counted(ListedPaths):
        made = 0

        def __getitem__(self, i):
            Counted.made += 1
            return super().__getitem__(i)

    names = [p.relative_to(lms_data).as_posix() for p in paths]
    assert compute_norm_stats(Counted(lms_data, names), num_files=30, frames=100, seed=0) == a
    assert Counted.made == 30  # one Path per drawn file, none per row of the list


def test_validation_names_missing_and_truncated_files(tmp_path):
    data = write_lms_folder(tmp_path / "data", n_files=10)
    (data / "audioset_lms" / "clip002.npy").unlink()
    victim = data / "audioset_lms" / "clip005.npy"
    victim.write_bytes(victim.read_bytes()[:1000])  # a copy cut short
    samples = read_list(data / "files_as_weighted.csv", data)
    with pytest.raises(DataListError) as err:
        validate(samples, data / "files_as_weighted.csv", 80)
    msg = str(err.value)
    assert "2 unusable entries" in msg and "clip002.npy: missing" in msg and "clip005.npy: unreadable" in msg


def test_train_refuses_a_bad_list_before_any_step(tmp_path):
    data = write_lms_folder(tmp_path / "data", n_files=10)
    (data / "audioset_lms" / "clip003.npy").unlink()
    np.save(data / "audioset_lms" / "clip004.npy", np.zeros((1, 64, 100), np.float32))  # wrong shape
    r = run_m2das("train", "--model", "m2d_as_vit_tiny", "--data_path", data, "--output_dir", tmp_path / "run",
                  "--batch_size", "2", "--epochs", "1", "--num_workers", "0")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "2 unusable entries" in err[0] and "clip003.npy: missing" in err[0] and "shape [1, 64, 100]" in err[0]
    assert not list((tmp_path / "run").glob("*.pth"))


def test_list_without_labels_column_is_a_clear_error(tmp_path):
    csv = tmp_path / "files_audioset.csv"
    csv.write_text("file_name\naudioset_lms/a.npy\n")
    with pytest.raises(DataListError, match="missing column"):
        read_list(csv, tmp_path)


def test_a_file_with_no_frames_is_rejected_at_validation(tmp_path):
    data = write_lms_folder(tmp_path / "data", n_files=6)
    np.save(data / "audioset_lms" / "clip002.npy", np.zeros((1, 80, 0), np.float32))  # T = 0
    samples = read_list(data / "files_as_weighted.csv", data)
    with pytest.raises(DataListError) as err:
        validate(samples, data / "files_as_weighted.csv", 80)
    msg = str(err.value)
    assert "1 unusable entry" in msg and "clip002.npy: expected float32 [1, 80, T] with T >= 1" in msg


def test_all_zero_weights_are_refused_before_sampling(tmp_path):
    data = write_lms_folder(tmp_path / "data", n_files=6)
    csv = data / "files_as_weighted.csv"
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + ",0" for r in rows[1:]]) + "\n")
    samples = read_list(csv, data)
    validate(samples, csv, 80)  # uniform sampling does not read the weights
    with pytest.raises(DataListError, match="every weight is 0"):
        validate(samples, csv, 80, weighted=True)
    with pytest.raises(DataListError, match="every weight is 0"):
        ResumableSampler(len(samples), 2, 0, 1, seed=0, weights=samples.weights)


def test_a_nan_crop_stops_training_with_exit_2_naming_the_file(tmp_path):
    """Checked in the DataLoader worker, one isfinite per crop; not mistaken for divergence (exit 3)."""
    from conftest import TINY_TRAIN

    data = write_lms_folder(tmp_path / "data", n_files=8)
    victim = data / "audioset_lms" / "clip005.npy"
    lms = np.load(victim)
    lms[:] = np.nan
    np.save(victim, lms)
    (data / "norm_stats.json").write_text('{"mean": -7.0, "std": 4.0}\n')
    r = run_m2das("train", *TINY_TRAIN, "--num_workers", "1", "--data_path", data, "--output_dir",
                  tmp_path / "run", "--batch_size", "2", "--epochs", "1", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "learning rate" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{victim}: NaN or inf values in the LMS" in errors[0]


def test_validation_checks_a_bounded_window_in_list_order_and_reports_as_it_goes(tmp_path, monkeypatch):
    """A file deleted at the first progress call, far down the list, is still found missing: the rows
    past the window in flight had not been checked yet (a pool fed every row at once would have)."""
    from m2das.data import dataset

    monkeypatch.setattr(dataset, "VALIDATE_CHUNK", 2)
    monkeypatch.setattr(dataset, "VALIDATE_IN_FLIGHT", 1)
    monkeypatch.setattr(dataset, "PROGRESS_EVERY", 4)
    data = write_lms_folder(tmp_path / "data", n_files=24)
    samples = read_list(data / "files_as_weighted.csv", data)
    seen = []

    def progress(done, total):
        if not seen:
            (data / "audioset_lms" / "clip023.npy").unlink()
        seen.append((done, total))

    with pytest.raises(DataListError) as err:
        validate(samples, data / "files_as_weighted.csv", 80, workers=1, progress=progress)
    assert seen == [(n, 24) for n in range(4, 25, 4)]
    assert "1 unusable entry" in str(err.value) and "clip023.npy: missing" in str(err.value)

    for name in ("clip015.npy", "clip001.npy", "clip007.npy"):  # removed out of order, reported in list order
        (data / "audioset_lms" / name).unlink()
    with pytest.raises(DataListError) as err:
        validate(samples, data / "files_as_weighted.csv", 80, workers=3)
    assert "4 unusable entries" in str(err.value)
    named = re.findall(r"(audioset_lms/clip\d+\.npy): missing", str(err.value))
    assert named == [f"audioset_lms/clip{i:03d}.npy" for i in (1, 7, 15, 23)]
