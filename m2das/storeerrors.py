"""Errors of object storage, sorted into "did not answer" (a resumable stop, exit 75) and "refused"
(bad input, exit 2), whatever backend raised them (botocore, aiohttp, gcsfs, ...) and however a
DataLoader worker re-raised them. Torch-free and backend-free: classes are compared by name.
"""

import contextlib
import errno
import re


class RemoteError(Exception):
    """Object storage refused (no such bucket, access denied, a malformed URL); rerunning cannot help
    (exit 2). One line naming the URL."""


class StoreUnavailable(ConnectionError):
    """Object storage did not answer (network, timeout, 5xx, throttling): a resumable stop (exit 75),
    rerunning the same command later resumes. One line naming the URL. A ConnectionError, so code that
    already treats OSError as "the store did not answer" (the lock's heartbeat) keeps doing so."""


# Exception class names (of botocore, aiohttp, requests, google-auth, fsspec, http.client) that mean the
# store did not answer; compared by name so that no backend is imported for it.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientPayloadError", "ClientOSError", "IncompleteRead", "RemoteDisconnected", "FSTimeoutError",
    "TransportError", "ServiceUnavailable", "TooManyRequests", "InternalServerError", "BadGateway",
    "GatewayTimeout", "RetryError"})
_TRANSIENT_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                              "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504", "429"})
# s3fs turns 5xx and SlowDown into OSError(EBUSY / EREMOTEIO); sockets give the others.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.EAGAIN,
                               errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH,
                               errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE})
_STORE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "adlfs", "azure", "fsspec")
# A DataLoader worker re-raises what it caught as the same type when it can, else as a RuntimeError
# holding the worker's traceback text, whose last line is "module.Class: message".
_WORKER_LAST_LINE = re.compile(r"^((?:\w+\.)*)(\w+): ")


def _chain(e) -> list:
    """e and the exceptions it was raised from (the cause, or the one being handled)."""
    seen = []
    while e is not None and all(e is not x for x in seen) and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return seen


def _worker_origin(e):
    """(module, class name) of the exception a DataLoader worker wrapped in its traceback text, else None."""
    text = str(e)
    if "Traceback (most recent call last)" not in text:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    m = _WORKER_LAST_LINE.match(lines[-1]) if lines else None
    return (m.group(1).rstrip("."), m.group(2)) if m else None


def is_transient(e: BaseException) -> bool:
    """Did the store fail to answer (worth a resumable stop), as opposed to refusing the request?"""
    for x in _chain(e):
        names = {c.__name__ for c in type(x).__mro__}
        origin = _worker_origin(x)
        code = str(((getattr(x, "response", None) or {}).get("Error") or {}).get("Code", ""))
        if isinstance(x, (StoreUnavailable, ConnectionError, TimeoutError)) or names & _TRANSIENT_NAMES \
                or (isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS) or code in _TRANSIENT_CODES \
                or (origin and origin[1] in _TRANSIENT_NAMES | {"StoreUnavailable", "TimeoutError"}):
            return True
    return False


def _from_store(e: BaseException) -> bool:
    for x in _chain(e):
        origin = _worker_origin(x)
        module = origin[0] if origin else type(x).__module__
        if isinstance(x, RemoteError) or module.split(".")[0] in _STORE_MODULES:
            return True
    return False


def _detail(e: BaseException) -> str:
    """The error in one short line: the class and its message (the last line of a worker's traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if _worker_origin(e) else " ".join(lines)
    if not _worker_origin(e):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    text = re.sub(r":? [^:]* must match the regex .*", "", text)  # botocore's name rule: the hint says it
    return text if len(text) <= 300 else text[:297] + "..."


def store_failure(e: BaseException, url: str, doing: str = ""):
    """`e` as a StoreUnavailable (transient) or RemoteError (refused) naming `url`; None when `e` did not
    come from the store. `doing` says what was being done ("reading the run folder")."""
    if isinstance(e, (StoreUnavailable, RemoteError)):
        return e
    what = f" {doing}" if doing else ""
    if is_transient(e):
        return StoreUnavailable(f"{url}: the object store did not answer{what} ({_detail(e)})")
    if _from_store(e):
        hint = "a bucket name has 3-63 lowercase letters, digits, dots and hyphens" \
            if "bucket name" in str(e).lower() else "check the URL, the bucket and the credentials " \
            "(AWS_* variables or ~/.aws for s3://)"
        return RemoteError(f"{url}: the object store refused{what} ({_detail(e)}); {hint}")
    return None


@contextlib.contextmanager
def store_errors(url: str, doing: str = "", keep: tuple = ()):
    """Turn what the store raises inside the block into StoreUnavailable or RemoteError naming `url`;
    `keep` (e.g. FileNotFoundError, which callers read as "absent") and other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        failure = None if isinstance(e, keep) else store_failure(e, url, doing)
        if failure is None or failure is e:
            raise
        raise failure from None
