"""Reading one shard wherever it lives: a local path, an http(s) URL, or a `pipe:` command whose
standard output is the tar (`pipe:curl -s URL`, `pipe:aws s3 cp s3://bucket/shard.tar -`).

A shard is streamed: its samples come one at a time through webdataset's tar iterator, so memory
does not grow with the shard's size. A transient failure (connection refused or reset, an HTTP
5xx, a stream cut mid-shard, a pipe command that fails) is retried with exponential backoff; the
retry skips the samples already delivered, so every sample comes exactly once. A shard that keeps
failing, or fails for good (HTTP 404, a local file cut short), raises `ShardUnreadable` naming its
URL; the caller counts it as bad."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from webdataset import tariterators

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("http://", "https://", "pipe:")
TAR_BLOCK = 512


class ShardUnreadable(Exception):
    """A shard that could not be read to its end (after the retries, where retrying can help)."""


class _Transient(Exception):
    pass


@dataclass(frozen=True)
class ReadPolicy:
    attempts: int = 5  # tries per shard, the first included
    wait: float = 1.0  # seconds before the second try; doubled for each further one
    timeout: float = 60.0  # seconds without data before an http read counts as failed


DEFAULT_READ = ReadPolicy()


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


class _TailCounting:
    """A read-only stream that remembers how many bytes passed and the last 1024 of them, to tell
    a complete tar (whole 512-byte blocks ending in two zero blocks) from one cut short."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.size, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.size += len(data)
        keep = 2 * TAR_BLOCK  # copies at most this much per read, whatever the read's size
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def complete(self) -> bool:
        return self.size % TAR_BLOCK == 0 and self.size >= 2 * TAR_BLOCK and self.tail == bytes(2 * TAR_BLOCK)


@contextlib.contextmanager
def _opened(url: str, policy: ReadPolicy) -> Iterator[IO[bytes]]:
    if url.startswith("pipe:"):
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=stderr)

            def failed(code: int) -> _Transient:
                stderr.seek(0)
                message = stderr.read().decode(errors="replace").strip()[-300:]
                return _Transient(f"the command exited with status {code}: {message or 'no message'}")

            try:
                yield process.stdout
                process.stdout.read()  # what the tar reader left
            except Exception:
                try:  # a command that failed explains the broken stream better than the tar reader
                    code = process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    code = 0
                if code:
                    raise failed(code) from None
                raise
            finally:
                process.stdout.close()
                if process.poll() is None and sys.exc_info()[0] is not None:
                    process.kill()
                code = process.wait()
            if code:
                raise failed(code)
    elif url.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(url, timeout=policy.timeout)
        except urllib.error.HTTPError as error:
            if error.code in (408, 425, 429) or error.code >= 500:
                raise _Transient(f"HTTP {error.code} {error.reason}") from None
            raise ShardUnreadable(f"{url}: HTTP {error.code} {error.reason}") from None
        with response:
            yield response
    else:
        with open(url, "rb") as handle:
            yield handle


def _samples_in(stream: IO[bytes], url: str) -> Iterator[dict]:
    members = tariterators.tar_file_expander([{"stream": stream, "url": url}], eof_value=None)
    yield from tariterators.group_by_keys(members)


TRANSIENT = (_Transient, OSError, tarfile.TarError, http.client.HTTPException, urllib.error.URLError)


def stream_samples(url: str, policy: ReadPolicy = DEFAULT_READ) -> Iterator[dict]:
    """The samples of one shard as webdataset groups them (`__key__`, `__url__`, extension ->
    bytes), each exactly once, streamed; see the module's docstring for failures."""
    delivered, remote = 0, is_remote(url)
    for attempt in range(1, policy.attempts + 1):
        try:
            with _opened(url, policy) as raw:
                stream = _TailCounting(raw)
                for index, sample in enumerate(_samples_in(stream, url)):
                    if index >= delivered:
                        delivered += 1
                        yield sample
                stream.drain()
                if not stream.complete():
                    raise _Transient(
                        f"the tar stream ends without its end-of-archive blocks after {stream.size} bytes"
                    )
            return
        except TRANSIENT as error:
            if not remote:  # a local file reads the same the next time
                raise ShardUnreadable(f"{url}: {_describe(error)}") from None
            if attempt == policy.attempts:
                raise ShardUnreadable(f"{url}: {_describe(error)} (gave up after {attempt} tries)") from None
            wait = policy.wait * 2 ** (attempt - 1)
            log.warning(
                "reading %s failed (%s) after %d sample(s); try %d of %d in %.1f s",
                url,
                _describe(error),
                delivered,
                attempt + 1,
                policy.attempts,
                wait,
            )
            time.sleep(wait)


def _describe(error: BaseException) -> str:
    if isinstance(error, http.client.IncompleteRead):
        return f"the connection closed early ({error.expected} more bytes were due)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    # webdataset appends " @ <stream>" and the stream and URL to a tar error's arguments
    message = str(error.args[0]).split(" @ ", 1)[0] if error.args else ""
    if isinstance(error, tarfile.ReadError) and "unexpected end" in message:
        return "the tar file is truncated"
    return message or type(error).__name__


def read_bytes(url: str, policy: ReadPolicy = DEFAULT_READ) -> bytes:
    """A small whole file (an _info.json) from a path, URL or pipe, with the same retries."""
    for attempt in range(1, policy.attempts + 1):
        try:
            with _opened(url, policy) as stream:
                return stream.read()
        except TRANSIENT as error:
            if not is_remote(url) or attempt == policy.attempts:
                raise ShardUnreadable(f"{url}: {_describe(error)}") from None
            time.sleep(policy.wait * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def basename(url: str) -> str:
    """The shard's file name in a path, URL or pipe command (for per-shard counts)."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    name = os.path.basename(last.split("?", 1)[0].rstrip("/"))
    if url.startswith("pipe:") and not name.endswith(".tar"):  # `aws s3 cp s3://b/x.tar -`
        tars = [os.path.basename(word) for word in url.split() if word.endswith(".tar")]
        name = tars[-1] if tars else name
    return name
