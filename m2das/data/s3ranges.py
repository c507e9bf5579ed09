"""Range reads of S3 shards through presigned URLs on kept-alive connections.

Why not s3fs for every crop: each of its range requests goes through
aiobotocore (parameter validation, signing, event hooks, response parsing) and
a hop to its event-loop thread: about 3 ms of the reader's CPU per 195 KB crop,
8-9x a read from a local disk (`m2das bench data-remote`). A presigned URL is signed once per shard (by
s3fs's own client: the same credentials, endpoint and configuration) and then
serves every range of that shard as a plain HTTP/1.1 GET on a connection that
stays open, the body received straight into one buffer. A batch's requests are
split into CONNECTIONS slices, one per thread, so a batch costs one hand-off per
thread rather than one per crop. The URL is signed again well before it expires,
and at once when the store answers 400/401/403 (credentials rotated).

Anything unexpected (a status, a dropped connection, a reply without a length)
makes the caller read that batch through s3fs, so every error that reaches the
trainer is s3fs's own (FileNotFoundError, PermissionError, OSError) and is
classified as before. Torch-free.
"""

import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

CONNECTIONS = 16  # range requests in flight per process (one kept-alive connection each)
EXPIRES_S = 3600  # what a presigned URL is signed for
RESIGN_S = 300  # age at which it is signed again: refreshed credentials can expire sooner than EXPIRES_S
TIMEOUT_S = 60  # seconds a connection waits for the store before the batch falls back to s3fs
AUTH_REFUSED = (400, 401, 403)  # a signature the store no longer accepts: sign again, once
FAILURES_IN_A_ROW = 3  # failed batches after which a process stops trying this path
HEAD_MAX = 16 << 10  # bytes of status line and headers a reply may have (S3's are well under 2 KB)


class DirectReadFailed(Exception):
    """This path could not read a range; the caller reads the batch through s3fs instead."""


def usable(fs) -> bool:
    """Can `fs` (an fsspec filesystem) be read through presigned URLs? s3fs without per-request parameters
    (requester pays, customer-provided keys: headers a presigned GET does not carry)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "url") and not getattr(fs, "req_kw", None) \
        and not getattr(fs, "s3_additional_kwargs", None)


def _ssl_context(fs):
    """What s3fs's client verifies with: client_kwargs verify=False or a CA bundle, else the system's."""
    verify = (getattr(fs, "client_kwargs", None) or {}).get("verify", os.environ.get("AWS_CA_BUNDLE"))
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


class _Connection:
    """One HTTP/1.1 connection, reopened when the store has closed it; replies need a Content-Length."""

    def __init__(self, scheme: str, netloc: str, context, owner):
        parts = urllib.parse.urlsplit(f"{scheme}://{netloc}")
        self.address = (parts.hostname, parts.port or (443 if scheme == "https" else 80))
        self.netloc, self.context, self.owner, self.sock = netloc, context, owner, None

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _open(self):
        sock = socket.create_connection(self.address, timeout=TIMEOUT_S)
        self.owner.opened += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.context.wrap_socket(sock, server_hostname=self.address[0]) if self.context else sock

    def get(self, target: str, start: int, length: int) -> tuple:
        """(status, body) of a GET of bytes start..start+length-1; OSError or DirectReadFailed on a bad reply."""
        reused = self.sock is not None
        if not reused:
            self._open()
        request = f"GET {target} HTTP/1.1\r\nHost: {self.netloc}\r\nRange: bytes={start}-{start + length - 1}\r\n\r\n"
        try:
            self.sock.sendall(request.encode("latin-1"))
            head = bytearray(HEAD_MAX)
            view, got = memoryview(head), 0
            while (end := head.find(b"\r\n\r\n", 0, got)) < 0 and got < HEAD_MAX:
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionResetError("the store closed the connection before a reply")
                got += n
        except OSError:
            self.close()
            if reused:  # a kept-alive connection the store closed meanwhile: once more on a new one
                return self.get(target, start, length)
            raise
        if end < 0:
            self.close()
            raise DirectReadFailed(f"a reply whose headers exceed {HEAD_MAX} bytes")
        lines = bytes(head[:end]).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        try:
            status, size = int(lines[0].split(" ", 2)[1]), int(headers["content-length"])
        except (IndexError, KeyError, ValueError):
            self.close()
            raise DirectReadFailed(f"a reply this reader does not parse: {lines[0]!r}") from None
        if "chunked" in headers.get("transfer-encoding", ""):
            self.close()
            raise DirectReadFailed(f"HTTP {status} chunked")
        body = bytearray(size)
        surplus = min(got - end - 4, size)  # body bytes that came with the headers
        body[:surplus] = head[end + 4:end + 4 + surplus]
        view, done = memoryview(body), surplus
        try:
            while done < len(body):
                n = self.sock.recv_into(view[done:])
                if n == 0:
                    raise ConnectionResetError(f"the store closed the connection after {done} of {len(body)} bytes")
                done += n
        except OSError:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0") \
                or got - end - 4 > size:  # more than the reply: the connection is out of step
            self.close()
        return status, body


class PresignedRanges:
    """GET byte ranges of objects in one s3fs filesystem, CONNECTIONS at a time; one per process."""

    def __init__(self, fs, where: str):
        self.fs, self.where = fs, where
        self.requests, self.opened = 0, 0  # range requests this path has answered, connections it opened
        self.failures, self.fell_back, self.off = 0, 0, False
        self._urls = {}  # object path -> (signed at, scheme, netloc, path?query)
        self._local = threading.local()
        self._pool = None
        self._ssl = None

    def _url(self, path: str, fresh: bool = False) -> tuple:
        entry = self._urls.get(path)
        if fresh or entry is None or time.monotonic() - entry[0] > RESIGN_S:
            parts = urllib.parse.urlsplit(self.fs.url(path, expires=EXPIRES_S))
            if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
                raise DirectReadFailed(f"{parts.hostname} is reached through a proxy")
            entry = self._urls[path] = (time.monotonic(), parts.scheme, parts.netloc,
                                        parts.path + ("?" + parts.query if parts.query else ""))
        return entry

    def _connection(self, scheme: str, netloc: str) -> _Connection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https" and self._ssl is None:
                self._ssl = _ssl_context(self.fs)
            conn = conns[(scheme, netloc)] = _Connection(scheme, netloc, self._ssl if scheme == "https" else None,
                                                         self)
        return conn

    def _get(self, request: tuple) -> bytearray:
        path, start, length = request
        for attempt in range(2):
            _, scheme, netloc, target = self._url(path, fresh=attempt > 0)
            try:
                status, body = self._connection(scheme, netloc).get(target, start, length)
            except OSError as e:
                raise DirectReadFailed(f"{type(e).__name__}: {e}") from None
            if status == 206:
                return body
            if status == 200:  # the store ignored the range and sent the whole object
                return body[start:start + length]
            if status not in AUTH_REFUSED:
                break
        raise DirectReadFailed(f"HTTP {status} for {path}")

    def _get_all(self, requests: list) -> list:
        return [self._get(r) for r in requests]

    def get(self, requests: list) -> list | None:
        """The bytes of each (object path, start, length), all in flight at once; None when this path failed
        (the caller reads through s3fs). After FAILURES_IN_A_ROW failed batches it stops trying, saying so once."""
        if self.off:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, CONNECTIONS - 1), thread_name_prefix="m2das-ranges")
        k = min(CONNECTIONS, len(requests))
        slices = [requests[i::k] for i in range(k)]
        try:
            others = [self._pool.submit(self._get_all, s) for s in slices[1:]]
            done = [self._get_all(slices[0])] + [f.result() for f in others]  # this thread reads a slice too
        except DirectReadFailed as e:
            self.failures += 1
            self.fell_back += 1
            if self.failures >= FAILURES_IN_A_ROW:
                self.off = True
                print(f"m2das: {self.where}: {self.failures} presigned range reads failed in a row (last: {e}); "
                      f"this process reads through s3fs from now on", file=sys.stderr)
            return None
        self.failures = 0
        self.requests += len(requests)
        blobs = [None] * len(requests)
        for i, part in enumerate(done):
            blobs[i::k] = part
        return blobs
