"""A flaky object store: the real S3 server on 127.0.0.1 behind a proxy that the tests cut.

A store that does not answer is a resumable stop (exit 75, one line naming the URL, the lock object
released once the store is back); a store that refuses (a malformed bucket name) is bad input (exit 2).
"""

import json
import os
import subprocess
import threading

import pytest

from conftest import REPO, TINY_TRAIN, m2das_cmd, run_m2das, write_lms_folder
from m2das import remote, runfolder
from m2das.datafolder import RECIPE_FILE
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_RESUMABLE
from storeproxy import StoreProxy


@pytest.fixture
def store(s3_server, tmp_path):
    """(fs, bucket URL, proxy, environment whose endpoint is the proxy)."""
    import fsspec

    proxy = StoreProxy(int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    fs = fsspec.filesystem("s3")
    name = f"m2das-faults-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    fs.mkdir(name)
    env = {**s3_server, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
           "M2DAS_STAGING_DIR": str(tmp_path / "staging"), remote.STORE_WAIT_ENV: "120"}
    yield fs, f"s3://{name}", proxy, env
    proxy.close()


def train_args(data, out, *extra):
    return ["train", *TINY_TRAIN, "--data_path", data, "--output_dir", out, "--batch_size", "4", "--epochs", "2",
            *extra]


def run_until_stopped(argv, env, proxy, cut_at: str):
    """Run the trainer, cut the store when a stdout line contains `cut_at`, and bring it back once the
    trainer says it waits for it; returns (exit code, stdout lines, stderr)."""
    p = subprocess.Popen(m2das_cmd(*argv), cwd=REPO, env={**os.environ, **env}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []
    threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True).start()
    lines = []
    try:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if cut_at in line and proxy.mode == "pass" and len(lines) > 1:
                proxy.set("refuse")
            if "waiting up to" in line:
                proxy.set("pass")
        rc = p.wait(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    p.stderr.close()
    return rc, lines, "".join(err)


def test_store_down_at_start_stops_resumably_and_a_malformed_bucket_is_bad_input(store, tmp_path, capsys,
                                                                                   monkeypatch):
    """`m2das train`'s main in this process (it fails before any training, on the real client and store)."""
    from s3fs import S3FileSystem

    from m2das import train

    fs, url, proxy, env = store
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(remote.STORE_WAIT_ENV, "1")  # the outage outlasts the wait
    S3FileSystem.clear_instance_cache()  # new clients, through the proxy
    try:
        data = write_lms_folder(tmp_path / "data", n_files=12)
        run_url = f"{url}/runs/down-at-start"
        proxy.set("refuse")
        assert train.main([str(a) for a in train_args(data, run_url)[1:]]) == EXIT_RESUMABLE
        out, err = capsys.readouterr()
        said = err.strip().splitlines()
        assert len(said) == 1 and run_url in said[0] and "did not answer" in said[0], said
        assert f"waiting up to 1 s ({remote.STORE_WAIT_ENV}) for it to take the lock" in out, out
        proxy.set("pass")
        assert not fs.exists(f"{run_url}/{runfolder.LOCK}")
        bad = "s3://Bad_Bucket!/runs/x"
        assert train.main([str(a) for a in train_args(data, bad)[1:]]) == EXIT_BAD_INPUT
        said = capsys.readouterr().err.strip().splitlines()
        assert len(said) == 1 and bad in said[0] and "bucket name" in said[0], said
    finally:
        S3FileSystem.clear_instance_cache()


def test_store_down_during_a_stop_save_uploads_it_once_back_and_releases_the_lock(store, tmp_path):
    fs, url, proxy, env = store
    data = write_lms_folder(tmp_path / "data", n_files=12)
    run_url = f"{url}/runs/stop-save"
    rc, lines, err = run_until_stopped(train_args(data, run_url), {**env, "M2DAS_TEST_SIGTERM_AT_STEP": "3"},
                                       proxy, cut_at="step 2/")
    out = "\n".join(lines)
    assert rc == EXIT_RESUMABLE, out + err
    assert "Traceback" not in err, err
    failed = [ln for ln in lines if "could not be uploaded" in ln]
    assert len(failed) == 1 and f"{run_url}/objects/last-" in failed[0] and "did not answer" in failed[0], out
    # The store came back while the trainer waited: the stop save, the logs, and no lock.
    assert f"uploaded checkpoint last.pth (step 3) to {run_url}/objects/" in out, out
    assert json.loads(fs.cat_file(f"{run_url}/last.pth.json"))["step"] == 3
    assert not fs.exists(f"{run_url}/{runfolder.LOCK}") and fs.exists(f"{run_url}/{RECIPE_FILE}")
    events = [json.loads(r)["event"] for r in fs.cat_file(f"{run_url}/{runfolder.RESTARTS}").decode().splitlines()]
    assert runfolder.EVENT_SAVE_FAILED in events, events  # recorded, then uploaded with the logs
    assert not any((tmp_path / "staging").iterdir()), list((tmp_path / "staging").iterdir())


def test_store_down_while_reading_packed_crops_stops_resumably_naming_the_data(store, tmp_path):
    from m2das.data.pack import pack

    fs, url, proxy, env = store
    data = write_lms_folder(tmp_path / "data", n_files=12)
    pack(data, shard_size=100_000, workers=1)
    data_url, run_url = f"{url}/data/packed", f"{url}/runs/reading"
    fs.put(str(data / "packed") + "/", data_url, recursive=True)
    rc, lines, err = run_until_stopped(train_args(data_url, run_url), env, proxy, cut_at="step 2/")
    assert rc == EXIT_RESUMABLE, "\n".join(lines) + err
    said = err.strip().splitlines()
    assert len(said) == 1 and data_url in said[0] and "did not answer" in said[0], err
    assert not fs.exists(f"{run_url}/{runfolder.LOCK}")
    rows = fs.cat_file(f"{run_url}/{runfolder.RESTARTS}").decode().splitlines()
    assert json.loads(rows[-1])["event"] == runfolder.EVENT_START  # uploaded after the outage


def test_pointer_to_a_missing_object_falls_back_and_garbage_pointers_are_named(store, tmp_path, capsys):
    fs, url, proxy, env = store
    run_url = f"{url}/runs/pointers"
    fs.pipe_file(f"{run_url}/objects/last-000000004-aaaa.pth", b"older")
    fs.pipe_file(f"{run_url}/last.prev.pth.json", json.dumps({"object": "last-000000004-aaaa.pth", "step": 4}).encode())
    fs.pipe_file(f"{run_url}/last.pth.json", json.dumps({"object": "last-000000008-gone.pth", "step": 8}).encode())
    folder = remote.RemoteRunFolder(run_url, tmp_path / "staging")
    assert folder.hydrate() == [runfolder.PREVIOUS]
    assert (tmp_path / "staging" / runfolder.PREVIOUS).read_bytes() == b"older"
    out = capsys.readouterr().out
    assert f"{run_url}/last.pth.json names objects/last-000000008-gone.pth (step 8), which is missing" in out
    # The next rolling save keeps the good pointer as the fallback, and its object with it.
    new = tmp_path / "new.pth"
    new.write_bytes(b"newer")
    (tmp_path / "staging" / runfolder.LAST).write_bytes(b"newer")
    folder.publish_checkpoint(tmp_path / "staging" / runfolder.LAST, 9)
    assert json.loads(fs.cat_file(f"{run_url}/last.prev.pth.json"))["step"] == 4
    assert fs.cat_file(f"{run_url}/objects/last-000000004-aaaa.pth") == b"older"
    fs.pipe_file(f"{run_url}/last.pth.json", b"{not json")
    again = remote.RemoteRunFolder(run_url, tmp_path / "again")
    assert again.hydrate() == [runfolder.PREVIOUS]
    assert f"warning: {run_url}/last.pth.json is not a checkpoint pointer (not JSON" in capsys.readouterr().out


def test_status_and_export_of_an_unreachable_bucket_are_resumable_and_leave_no_copy(store, tmp_path):
    fs, url, proxy, env = store
    run_url = f"{url}/runs/shown"
    fs.pipe_file(f"{run_url}/{runfolder.CONFIG}", json.dumps({"epochs": 2, "model": "m2d_as_vit_tiny"}).encode())
    reads = tmp_path / "tmp"
    reads.mkdir()
    env = {**env, "TMPDIR": str(reads)}
    r = run_m2das("status", run_url, "--no-queue", env=env)
    assert r.returncode == 0 and run_url in r.stdout, r.stdout + r.stderr
    proxy.set("refuse")
    export = subprocess.Popen(m2das_cmd("export", run_url, "--epoch", "1", "--out", tmp_path / "x"), cwd=REPO,
                              env={**os.environ, **env}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = run_m2das("status", run_url, "--no-queue", env=env)
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and run_url in r.stderr and "did not answer" in r.stderr
    _, err = export.communicate(timeout=120)
    assert export.returncode == EXIT_RESUMABLE and len(err.strip().splitlines()) == 1 and run_url in err, err
    assert not list(reads.glob("m2das-read-*")), list(reads.iterdir())


def test_a_store_error_a_dataloader_worker_could_not_rebuild_is_still_a_resumable_stop():
    import torch
    from botocore.exceptions import EndpointConnectionError

    from m2das import storeerrors

    class Unreachable(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt/data/packed/shard-00000.bin")

    with pytest.raises(Exception) as caught:
        next(iter(torch.utils.data.DataLoader(Unreachable(), num_workers=1)))
    assert not isinstance(caught.value, EndpointConnectionError)  # the worker's text in another type
    failure = storeerrors.store_failure(caught.value, "s3://bkt/data/packed")
    assert isinstance(failure, storeerrors.StoreUnavailable), caught.value
    assert str(failure).startswith("s3://bkt/data/packed: the object store did not answer (botocore.exceptions."
                                   "EndpointConnectionError: Could not connect to the endpoint URL"), failure


def test_packed_reads_while_the_store_fails_are_resumable_not_bad_input(store, tmp_path, monkeypatch):
    """The packed reader and its validation in this process, while the store cuts connections or answers
    503 (s3fs's OSError EBUSY): each failure is the store's (exit 75), never a PackError or DataListError."""
    from s3fs import S3FileSystem

    from m2das import storeerrors
    from m2das.data import packed
    from m2das.data.dataset import DataListError, make_dataset, read_samples, validate_packed
    from m2das.data.pack import pack
    from m2das.data.stats import write_norm_stats
    from m2das.datafolder import NORM_STATS

    fs, url, proxy, env = store
    data = write_lms_folder(tmp_path / "data", n_files=4)
    write_norm_stats(data / NORM_STATS, {"mean": -7.0, "std": 4.0})  # not 5000 crops computed
    pack(data, shard_size=100_000, workers=1)
    data_url = f"{url}/data/packed"
    fs.put(str(data / "packed") + "/", data_url, recursive=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()  # new clients, through the proxy
    try:
        samples = read_samples(data_url, None)
        dataset = make_dataset(samples, 64, 0)
        assert len(dataset.__getitems__([(0, 0, 0), (0, 1, 1)])) == 2  # connections open, then cut
        calls = {"is_packed": lambda: packed.is_packed(data_url), "read_samples": lambda: read_samples(data_url, None),
                 "validate_packed": lambda: validate_packed(samples, None),
                 "crops": lambda: dataset.__getitems__([(0, 0, 2)]), "crop": lambda: dataset[(0, 0, 3)]}
        for mode in ("unavailable", "drop"):
            proxy.set(mode)
            for what, call in calls.items():
                with pytest.raises(Exception) as caught:
                    call()
                e = caught.value
                assert not isinstance(e, (packed.PackError, DataListError)), (mode, what, repr(e))
                assert isinstance(storeerrors.store_failure(e, data_url), storeerrors.StoreUnavailable), (mode, what)
                if isinstance(e, OSError):  # s3fs's EBUSY and the like: named here, the object's URL first
                    assert isinstance(e, storeerrors.StoreUnavailable), (mode, what, repr(e))
                    assert str(e).startswith(data_url) and "did not answer" in str(e), (mode, what, e)
            proxy.set("pass")
        assert packed.is_packed(data_url) and validate_packed(samples, None)["rows"] == len(samples)
    finally:
        S3FileSystem.clear_instance_cache()
