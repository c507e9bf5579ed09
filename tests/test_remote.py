"""Run folders in object storage, against a real S3-compatible server on 127.0.0.1."""

import json

import pytest
import torch

from conftest import TINY_TRAIN, run_m2das, write_lms_folder
from m2das import EXIT_BAD_INPUT, EXIT_RESUMABLE, remote, runfolder
from m2das.data.stats import compute_norm_stats, write_norm_stats
from m2das.datafolder import NORM_STATS


@pytest.fixture
def bucket(s3_server, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    name = f"m2das-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs.mkdir(name)
    return fs, f"s3://{name}"


def args(data, out, *extra):
    return ["train", *TINY_TRAIN, "--data_path", data, "--output_dir", out, "--batch_size", "4",
            "--epochs", "2", "--save_freq", "1", *extra]


def test_data_and_run_in_object_storage_stop_move_node_resume_and_equal_a_local_run(bucket, tmp_path, s3_server):
    fs, url = bucket
    data = write_lms_folder(tmp_path / "data", n_files=24)
    paths = sorted((data / "audioset_lms").glob("*.npy"))  # as `m2das prepare` leaves it, stats included
    write_norm_stats(data / NORM_STATS, compute_norm_stats(paths, num_files=50, frames=208))
    local = tmp_path / "local"
    assert run_m2das(*args(data, local)).returncode == 0
    # Data in the bucket too: the packed folder, read with range requests.
    assert run_m2das("pack", data, "--shard-size", "200K").returncode == 0
    fs.put(str(data / "packed") + "/", f"{url}/data/packed", recursive=True)
    data_url = f"{url}/data/packed"
    run_url = f"{url}/runs/tiny"
    staging = tmp_path / "staging"
    env = {**s3_server, "M2DAS_STAGING_DIR": str(staging), "M2DAS_TEST_SIGTERM_AT_STEP": "9"}
    r = run_m2das(*args(data_url, run_url, "--ckpt_interval_min", "0"), env=env)
    assert r.returncode == EXIT_RESUMABLE, r.stdout + r.stderr
    # Messages name the bucket; the one line naming this node's staging copy says so.
    assert f"uploaded checkpoint last.pth (step 9) to {run_url}/objects/" in r.stdout, r.stdout
    assert f"uploaded checkpoint checkpoint-1.pth (step " in r.stdout and f"to {run_url}/checkpoint-1.pth" in r.stdout
    naming_staging = [ln for ln in r.stdout.splitlines() if str(staging) in ln]
    assert all("staged in" in ln or "staging copy" in ln for ln in naming_staging), naming_staging
    # Stopped with everything uploaded: nothing is left on this node.
    assert staging.is_dir() and not any(staging.iterdir()), list(staging.iterdir())
    # What is in the bucket: pointers, one object per pointer, the epoch checkpoint, the logs; no lock.
    names = {p.split("/runs/tiny/")[1] for p in fs.find(run_url)}
    assert {"last.pth.json", "last.prev.pth.json", "checkpoint-1.pth", "config.json", "restarts.jsonl"} <= names
    assert len([n for n in names if n.startswith("objects/")]) == 2 and runfolder.LOCK not in names
    pointer = json.loads(fs.cat_file(f"{run_url}/last.pth.json"))
    assert pointer["step"] == 9
    # A second trainer is refused by the lock in the bucket.
    holder = remote.RemoteRunFolder(run_url).acquire()
    try:
        r = run_m2das(*args(data_url, run_url), env={**env, "M2DAS_TEST_SIGTERM_AT_STEP": "0"})
        assert r.returncode == EXIT_BAD_INPUT and "in use by another trainer" in r.stderr, r.stdout + r.stderr
    finally:
        holder.release()
    # The requeued job lands on another node: nothing local survives.
    r = run_m2das(*args(data_url, run_url), env={**env, "M2DAS_TEST_SIGTERM_AT_STEP": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "at step 9" in r.stdout
    assert not any(staging.iterdir()) and "removed the staging copy" in r.stdout  # finished: removed too
    with fs.open(f"{run_url}/checkpoint-2.pth", "rb") as f:
        in_bucket = torch.load(f)["model"]
    expected = torch.load(local / "checkpoint-2.pth")["model"]
    assert all(torch.equal(in_bucket[k], expected[k]) for k in expected)
    events = [json.loads(line)["event"] for line in fs.cat_file(f"{run_url}/restarts.jsonl").decode().splitlines()]
    assert events[-1] == runfolder.EVENT_FINISHED
    r = run_m2das("status", run_url, "--no-queue", env=s3_server)
    assert r.returncode == 0 and "finished" in r.stdout and run_url in r.stdout, r.stdout + r.stderr
    r = run_m2das("export", run_url, "--epoch", "1", "--out", tmp_path / "exports", env=s3_server)
    assert r.returncode == 0, r.stdout + r.stderr
    exported = list((tmp_path / "exports").glob("*_enconly/weights_ep1.pth"))
    assert len(exported) == 1 and "blocks.0.attn.qkv.weight" in torch.load(exported[0])
    # Starting over on purpose by emptying the bucket folder: this node's old copy is not resumed from.
    fs.rm(run_url, recursive=True)
    r = run_m2das(*args(data_url, run_url, "--epochs", "1"), env={**env, "M2DAS_TEST_SIGTERM_AT_STEP": "0"})
    assert r.returncode == 0 and "resumed from" not in r.stdout, r.stdout + r.stderr
