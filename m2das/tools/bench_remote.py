"""`m2das bench data-remote`: the reading process's CPU per sample for packed shards on local disk, in S3
through s3fs (the way before presigned reads) and in S3 through presigned URLs, in one run.

The S3 endpoint is moto's server on 127.0.0.1, started here in its own process:
its samples/s measure moto, not the client, so the figure that counts is the CPU
time of this process (getrusage: all its threads, user and system) per sample.
Each pass reads one random crop of every clip in batches, as a DataLoader
worker's __getitems__ does; the passes of the variants alternate, the median is
shown with the range.
"""

import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from m2das.cliargs import Parser
from m2das.datafolder import PACKED_DIR
from m2das.machine import cpu_name, free_port, usable_cores

BUCKET = "m2das-bench"


@contextlib.contextmanager
def serving(command: list, port: int, log_path: Path):
    """A server process started with `command`, once it accepts connections on 127.0.0.1:port; stopped by pid."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[2]} did not start (pip install 'moto[server]'); see {log_path}")
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


@contextlib.contextmanager
def s3_environment(endpoint: str):
    """This process's S3 credentials and endpoint (what s3fs and boto read) while the block runs."""
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keepalive_front(port: int, upstream_port: int) -> None:
    """Serve 127.0.0.1:port with HTTP/1.1 connections that stay open, each request forwarded to the server on
    upstream_port: moto's server closes every connection after one reply, S3 keeps them open."""
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hop_by_hop = {"connection", "keep-alive", "transfer-encoding", "server", "date"}

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body or None)
            reply = upstream.getresponse()
            data = reply.read()
            upstream.close()
            self.send_response(reply.status, reply.reason)
            for name, value in reply.getheaders():
                if name.lower() not in hop_by_hop and (name.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    ThreadingHTTPServer(("127.0.0.1", port), Forward).serve_forever()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_pass(dataset, keys: list, batch: int, before=None) -> dict:
    """CPU and wall seconds per sample of reading `keys` batch by batch (`before()` runs untimed first)."""
    if before is not None:
        before()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    n = 0
    for k in range(0, len(keys) - batch + 1, batch):
        n += len(dataset.__getitems__(keys[k:k + batch]))
    return {"cpu_ms": (cpu_seconds() - cpu0) / n * 1e3, "wall_ms": (time.perf_counter() - t0) / n * 1e3}


def main(argv=None) -> int:
    """Client CPU ms per sample: local disk (cold and warm page cache), S3 via s3fs, S3 via presigned URLs."""
    import numpy as np

    from m2das.data.dataset import make_dataset, read_samples
    from m2das.data.pack import pack
    from m2das.data.packed import ShardReader
    from m2das.tools.benchdata import drop_from_cache, synthetic_data

    p = Parser(prog="m2das bench data-remote", description=main.__doc__)
    p.add_argument("--files", type=int, default=400, help="synthetic clips [1, 80, 1001] (default 400)")
    p.add_argument("--crop", type=int, default=608, help="frames per crop (default 608, the paper's)")
    p.add_argument("--batch", type=int, default=64, help="samples per __getitems__ call (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="passes per variant (default 3)")
    p.add_argument("--dir", default=".", help="folder on the disk to measure (default: the current one)")
    args = p.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores ({usable_cores()} usable), load average {load} "
          f"before the run")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".m2das-bench-remote-") as tmp:
        data = synthetic_data(Path(tmp) / "data", args.files, 1001)
        out = Path(tmp) / PACKED_DIR
        pack(data, out, shard_size=64 << 20, dtype="float32")
        shards = sorted(out.glob("shard-*.bin"))
        order = np.random.default_rng(1).permutation(args.files)
        keys = [(0, position, int(i)) for position, i in enumerate(order)]
        moto_port, front_port = free_port(), free_port()
        moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)]
        front = [sys.executable, "-c", f"from m2das.tools.bench_remote import keepalive_front; "
                 f"keepalive_front({front_port}, {moto_port})"]
        with serving(moto, moto_port, Path(tmp) / "moto.log") as moto_url, \
                serving(front, front_port, Path(tmp) / "front.log") as front_url:
            import fsspec

            local = make_dataset(read_samples(out, None), args.crop, 0)
            variants = {"local disk, cold cache": (local, lambda: drop_from_cache(shards)),
                        "local disk, warm cache": (local, None)}
            for endpoint, where in ((moto_url, "moto"), (front_url, "moto behind a kept-alive front")):
                with s3_environment(endpoint):
                    fsspec.get_filesystem_class("s3").clear_instance_cache()  # a reader keeps the one it opened
                    fs = fsspec.filesystem("s3")
                    if endpoint == moto_url:
                        fs.mkdir(BUCKET)
                        fs.put(str(out) + "/", f"{BUCKET}/{PACKED_DIR}", recursive=True)
                    for label, presigned in (("s3fs (before)", False), ("presigned (now)", True)):
                        dataset = make_dataset(read_samples(f"s3://{BUCKET}/{PACKED_DIR}", None), args.crop, 0)
                        dataset.reader = ShardReader(dataset.samples.root, presigned=presigned)
                        dataset.__getitems__(keys[:args.batch])  # connections, URLs, s3fs's loop: set up once
                        variants[f"{label}, {where}"] = (dataset, None)
            runs = {name: [] for name in variants}
            for r in range(args.repeats):
                for name, (dataset, setup) in variants.items():
                    runs[name].append(one_pass(dataset, keys, args.batch, setup))
            fell_back = sum(d.reader.ranges.fell_back for d, _ in variants.values() if d.reader.ranges is not None)
    base = statistics.median(r["cpu_ms"] for r in runs["local disk, cold cache"])
    print(f"{args.files} clips [1, 80, 1001] float32 packed in {len(shards)} shard(s); one random {args.crop}-frame "
          f"crop of each ({80 * args.crop * 4 / 1e3:.0f} KB) per pass, batches of {args.batch}, {args.repeats} "
          f"passes per variant; S3 = moto on 127.0.0.1, straight or behind a front that keeps connections open "
          f"(other processes: their CPU is not counted)")
    width = max(map(len, runs)) + 2
    print(f"{'variant':<{width}}{'CPU ms/sample':>14}{'(range)':>16}{'x local cold':>14}{'wall samples/s':>16}")
    for name, rs in runs.items():
        cpu = [r["cpu_ms"] for r in rs]
        wall = statistics.median(1e3 / r["wall_ms"] for r in rs)
        print(f"{name:<{width}}{statistics.median(cpu):>14.3f}{f'{min(cpu):.3f}-{max(cpu):.3f}':>16}"
              f"{statistics.median(cpu) / base:>14.2f}{wall:>16.0f}")
    print(f"presigned reads that fell back to s3fs: {fell_back} batch(es); wall samples/s over S3 are moto's "
          f"(one Python process serving every request), not the client's")
    return 0
