"""Packed shards read from S3 through presigned URLs (m2das.data.s3ranges), against moto's real server."""

import pickle
import sys

import fsspec
import pytest
import torch

from test_pack import data_folder
from m2das.data import packed, s3ranges
from m2das.data.dataset import make_dataset, read_samples
from m2das.data.pack import pack
from m2das.machine import free_port
from m2das.tools.bench_remote import serving


@pytest.fixture
def packed_in_s3(tmp_path, s3_server):
    data = data_folder(tmp_path / "data", n_files=8)
    pack(data, data / "packed", shard_size=100 << 10)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = f"m2das-ranges-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    fs.mkdir(bucket)
    fs.put(str(data / "packed") + "/", f"{bucket}/packed", recursive=True)
    return fs, data / "packed", f"s3://{bucket}/packed"


def same(batch_a, batch_b) -> bool:
    return all(xa.numpy().tobytes() == xb.numpy().tobytes() and torch.equal(ya, yb)
               for (xa, ya), (xb, yb) in zip(batch_a, batch_b, strict=True))


def test_presigned_reads_equal_disk_and_s3fs_and_failures_surface_as_s3fs_errors(packed_in_s3, capsys):
    fs, folder, url = packed_in_s3
    local, remote = read_samples(folder, None), read_samples(url, None)
    keys = [(1, p, i) for p, i in enumerate(reversed(range(len(local))))] + [(1, 99, 3)]  # one clip twice
    on_disk = make_dataset(local, 400, 3).__getitems__(keys)  # 400 frames: every clip is zero-padded too
    now = make_dataset(remote, 400, 3)
    assert same(now.__getitems__(keys), on_disk)
    ranges = now.reader.ranges
    assert ranges.requests == len(keys) and ranges.fell_back == 0
    before = make_dataset(remote, 400, 3)
    before.reader = pickle.loads(pickle.dumps(packed.ShardReader(url, presigned=False)))  # as a worker gets it
    assert same(before.__getitems__(keys), on_disk) and before.reader.ranges is None
    # A shard gone from the bucket: the batch is read again through s3fs, whose own error type comes out.
    name = local.manifest["shards"][1]["name"]
    wanted = [packed.crop_range(remote, i, 0, 100)[:3] for i in range(len(remote)) if remote.shard[i] == 1]
    fs.rm(f"{url}/{name}")
    with pytest.raises(FileNotFoundError):
        now.reader.read_many(wanted)
    assert ranges.fell_back == 1 and not ranges.off
    # A short object in its place: the store sends what it has, and the length check names the shard.
    fs.pipe(f"{url}/{name}", b"\0" * 10)
    assert wanted[0][1] == 0
    with pytest.raises(packed.PackError, match=f"{name}: ends before byte"):
        now.reader.read_many(wanted[:1])
    assert ranges.fell_back == 1
    # Failing batch after batch, a process stops trying presigned reads, says so once, and goes on with s3fs.
    fs.rm(f"{url}/{name}")
    for _ in range(s3ranges.FAILURES_IN_A_ROW + 1):
        with pytest.raises(FileNotFoundError):
            now.reader.read_many(wanted)
    assert ranges.off and ranges.fell_back == 1 + s3ranges.FAILURES_IN_A_ROW
    assert capsys.readouterr().err.count("presigned range reads failed in a row") == 1
    answered = ranges.requests
    assert same(now.__getitems__(keys[:2]), on_disk[:2]) and ranges.requests == answered


def test_connections_stay_open_across_batches_and_a_closed_one_is_reopened(packed_in_s3, s3_server, tmp_path):
    """Behind a front that keeps connections open (as S3 does, and moto's server does not)."""
    fs, folder, url = packed_in_s3
    local = read_samples(folder, None)
    wanted = [(f"{url[5:]}/{name}", start, length)
              for name, start, length, _ in (packed.crop_range(local, i, 0, 150) for i in range(len(local)))]
    expected = [(folder / name.rsplit("/", 1)[1]).read_bytes()[start:start + n] for name, start, n in wanted]
    port, upstream = free_port(), int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    front = [sys.executable, "-c", f"from m2das.tools.bench_remote import keepalive_front; "
             f"keepalive_front({port}, {upstream})"]
    with serving(front, port, tmp_path / "front.log") as endpoint:
        ranges = s3ranges.PresignedRanges(fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=endpoint),
                                          url)
        for _ in range(3):
            assert [bytes(b) for b in ranges.get(wanted)] == expected
        assert ranges.opened <= min(s3ranges.CONNECTIONS, len(wanted)), "one connection per thread, kept open"
    opened = ranges.opened
    with serving(front, port, tmp_path / "front2.log"):  # the store restarted: every kept connection is dead
        assert [bytes(b) for b in ranges.get(wanted)] == expected
    assert ranges.fell_back == 0 and ranges.opened > opened


def test_https_with_the_certificate_check_s3fs_was_configured_with(s3_server, tmp_path):
    """moto's self-signed HTTPS: read only because s3fs was told verify=False, and so is this path."""
    port = free_port()
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port), "--ssl"]
    with serving(moto, port, tmp_path / "moto-https.log") as endpoint:
        endpoint = endpoint.replace("http://", "https://")
        blob = bytes(range(256)) * 1000
        strict = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=endpoint)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=endpoint, client_kwargs={"verify": False})
        fs.mkdir("m2das-https")
        fs.pipe("m2das-https/shard", blob)
        ranges = s3ranges.PresignedRanges(fs, "s3://m2das-https")
        got = ranges.get([("m2das-https/shard", 1000, 5000), ("m2das-https/shard", 7, 200000)])
        assert [bytes(b) for b in got] == [blob[1000:6000], blob[7:200007]] and ranges.fell_back == 0
        assert ranges.get([("m2das-https/shard", 0, 10)] * 2) is not None
        refused = s3ranges.PresignedRanges(strict, "s3://m2das-https")  # the system's CAs: the check fails
        assert refused.get([("m2das-https/shard", 0, 10)]) is None and refused.fell_back == 1
