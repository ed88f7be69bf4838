"""Opening shards that are not local files: ``http(s)://`` URLs and ``pipe:`` commands, with bounded retries.

A remote shard is fetched **whole** before its samples are parsed (into a spooled temporary file: memory up to
``SPOOL_BYTES``, then the temp dir), so a connection that drops in the middle of a tar is retried like one that
fails to connect, and a half-read shard never yields a partial, silently truncated set of samples. Each fetch is
tried ``1 + retries`` times with exponential back-off (``backoff_s * 2**attempt``, at most 30 s); then a
:class:`ShardFetchError` (a :class:`~codetr.data.format.DataError`) names the URL, the number of attempts and the
last error, and the run stops: training on without a shard would silently change the data.

What is retried: connection errors and time-outs, HTTP 408 / 429 / 5xx, a body shorter than its
``Content-Length``, and a ``pipe:`` command that exits non-zero. HTTP 4xx (e.g. 404) fails at once: asking again
does not help. Other URL schemes (``s3://``, ``gs://``, ...) go to webdataset's ``gopen`` unchanged (no retries);
``pipe:aws s3 cp s3://bucket/shard.tar -`` gives them retries.

Local paths keep webdataset's behaviour: an unreadable local shard is reported by the loader's skip report.
"""

from __future__ import annotations

import http.client
import io
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO

from codetr.data.format import DataError

__all__ = ["RemoteOptions", "ShardFetchError", "is_remote", "fetch_into", "fetch_bytes", "open_shard", "SPOOL_BYTES"]

#: remote shards up to this size stay in memory while they are read; larger ones spill to the temp directory
SPOOL_BYTES = 64 << 20
_RETRY_STATUS = {408, 429}
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are fetched (``data.<split>.retries`` / ``retry_backoff_s`` / ``timeout_s``)."""

    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise DataError(f"remote shard options must be retries >= 0, backoff_s >= 0, timeout_s > 0; got {self}")


class ShardFetchError(DataError):
    """A remote shard could not be fetched after every attempt (the message names the URL)."""


class _Permanent(Exception):
    """A failure that a retry cannot fix (HTTP 4xx)."""


def is_remote(url: str) -> bool:
    """True for ``http://`` / ``https://`` URLs and ``pipe:`` commands (what this module opens with retries)."""
    return url.startswith(("http://", "https://", "pipe:"))


def _http_get(url: str, timeout: float, sink: IO[bytes]) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's own shard URL
            expected = resp.headers.get("Content-Length")
            size = 0
            while chunk := resp.read(1 << 20):
                sink.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code in _RETRY_STATUS or exc.code >= 500:
            raise OSError(f"HTTP {exc.code} {exc.reason}") from exc
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
    except http.client.IncompleteRead as exc:
        raise OSError(f"connection closed early ({len(exc.partial)} bytes of the last read)") from exc
    if expected is not None and expected.isdigit() and size != int(expected):
        raise OSError(f"got {size} of {expected} bytes")


def _pipe(command: str, timeout: float, sink: IO[bytes]) -> None:
    with tempfile.TemporaryFile() as out:
        try:
            done = subprocess.run(command, shell=True, stdout=out, stderr=subprocess.PIPE,  # noqa: S602 - user's pipe:
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise OSError(f"timed out after {timeout:g} s") from exc
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"exit status {done.returncode}: {tail[0][:200]}")
        out.seek(0)
        while chunk := out.read(1 << 20):
            sink.write(chunk)


def fetch_into(url: str, sink: IO[bytes], options: RemoteOptions = RemoteOptions()) -> None:
    """Write the whole object behind an ``http(s)://`` URL (or the stdout of a ``pipe:`` command) into the
    seekable ``sink``, with retries; ``sink`` is emptied before every attempt.

    Raises:
        ShardFetchError: every attempt failed, or the server answered a non-retryable HTTP 4xx.
    """
    if not is_remote(url):
        raise DataError(f"{url}: not an http(s):// URL or pipe: command")
    attempts = options.retries + 1
    last = ""
    for attempt in range(attempts):
        sink.seek(0)
        sink.truncate()
        try:
            if url.startswith("pipe:"):
                _pipe(url[len("pipe:"):], options.timeout_s, sink)
            else:
                _http_get(url, options.timeout_s, sink)
            return
        except _Permanent as exc:
            raise ShardFetchError(f"{url}: {exc} (not retried: check the URL)") from exc
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            last = str(getattr(exc, "reason", None) or exc)
        if attempt + 1 < attempts:
            time.sleep(min(_MAX_BACKOFF_S, options.backoff_s * 2 ** attempt))
    hint = "check the command and its stderr" if url.startswith("pipe:") else "check that the server is up"
    raise ShardFetchError(f"{url}: failed after {attempts} attempts, last error: {last} ({hint}; "
                          f"data.<split>.retries sets the number of retries)")


def fetch_bytes(url: str, options: RemoteOptions = RemoteOptions()) -> bytes:
    """:func:`fetch_into` an in-memory buffer (small objects: a remote ``index.json``)."""
    buf = io.BytesIO()
    fetch_into(url, buf, options)
    return buf.getvalue()


def open_shard(url: str, options: RemoteOptions = RemoteOptions()) -> IO[bytes]:
    """A readable binary stream of one shard: fetched whole with retries (:func:`fetch_into` a spooled temporary
    file) for remote shards, ``open(url, "rb")`` for local paths. The caller closes it."""
    if not is_remote(url):
        return open(url, "rb")
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        fetch_into(url, spool, options)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool
