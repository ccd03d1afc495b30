"""Where pretraining shards live and how one shard's bytes are read from there.

A source is either a URL template containing ``{index`` (the default: the ClimbMix shards on the Hugging
Face hub) or a directory, given as a local path or any fsspec URL (``http://``, ``file://``, ...), that
holds ``shard_XXXXX.parquet`` files (a mirror). Here: a shard's URL in a source, a directory source's
listing (tasks/config.py takes its highest index as the validation shard), the server's version of a
remote shard, and one streamed copy of a shard into a file with every read bounded by a timeout, telling
failures a retry can fix from those it cannot. tasks/download.py adds the retries, the validation, the
rename into place and the parallelism.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import aiohttp
import fsspec
from fsspec.asyn import sync
from fsspec.core import url_to_fs
from fsspec.implementations.http import HTTPFileSystem, HTTPStreamFile
from fsspec.utils import get_protocol

from model.data import shard_filename
from tasks.source_identity import remote_version

DEFAULT_SOURCE = (
    "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
    "shard_{index:05d}.parquet"
)
# The last shard of the default source; it is the validation split (docs/model.md#pretraining-data).
DEFAULT_VAL_SHARD = 6542

_SHARD_FILE = re.compile(r"^shard_(\d{5})\.parquet$")
HTTP_PROTOCOLS = ("http", "https")

# 4xx statuses that say "try again later" rather than "this will never work".
RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})
CHUNK_BYTES = 1 << 20


class ShardSourceError(RuntimeError):
    """The source cannot provide a shard (missing file, access refused): retrying won't help."""


def is_template(source: str) -> bool:
    return "{index" in source


def shard_url(source: str | os.PathLike[str], index: int) -> str:
    """Where shard ``index`` lives in ``source`` (a ``{index...}`` template or a directory)."""
    source = os.fspath(source)
    if is_template(source):
        try:
            return source.format(index=index)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"shard source template {source!r} must use only the field {{index}} "
                f"(e.g. 'https://host/dir/shard_{{index:05d}}.parquet'): {exc}"
            ) from exc
    return f"{source.rstrip('/')}/{shard_filename(index)}"


def source_filesystem(url: str, timeout_s: float) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path to give it, with HTTP timeouts set."""
    protocol = get_protocol(url)
    if protocol in HTTP_PROTOCOLS:
        # aiohttp's default is a 300 s limit on the *whole* request, which would kill a slow
        # but healthy 100 MB download; like `requests.get(timeout=...)` we bound connecting
        # and each wait for data instead. fsspec caches filesystems by their arguments, so
        # each distinct timeout gets (and keeps) its own aiohttp session.
        timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        return fsspec.filesystem(protocol, client_kwargs={"timeout": timeout}), url
    return url_to_fs(url)


def list_source_shards(source: str | os.PathLike[str], *, timeout_s: float = 30.0) -> list[int]:
    """Sorted indices of the ``shard_XXXXX.parquet`` files in a directory source.

    Used to find a mirror's validation shard (its highest index). Temp files and other names
    are ignored. A template source cannot be listed: ``ValueError``.
    """
    source = os.fspath(source)
    if is_template(source):
        raise ValueError(
            f"shard source {source!r} is a URL template and cannot be listed; "
            "give the validation shard index explicitly, or use a directory source"
        )
    fs, path = source_filesystem(source, timeout_s)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError as exc:
        raise ShardSourceError(
            f"shard source {source} does not exist or cannot be listed; "
            "check data.source / --mirror"
        ) from exc
    indices = set()
    for entry in entries:
        match = _SHARD_FILE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            indices.add(int(match.group(1)))
    return sorted(indices)


class SourceRejected(Exception):
    """Opening the source failed in a way retrying cannot fix (carries the reason)."""


class TransferCancelled(Exception):
    """Another shard failed for good; this worker stops early."""


def _open_stream(url: str, timeout_s: float) -> IO[bytes]:
    fs, path = source_filesystem(url, timeout_s)
    if isinstance(fs, HTTPFileSystem):
        # fs.open() first probes the size with HEAD (then GET) and turns *any* probe failure,
        # a 503 or a timeout included, into FileNotFoundError, which would make transient
        # errors look permanent. A stream file issues exactly one GET and raises
        # FileNotFoundError only for a real 404 (other statuses: ClientResponseError).
        session = sync(fs.loop, fs.set_session)
        return HTTPStreamFile(fs, path, session=session, loop=fs.loop)
    return fs.open(path, "rb")


@contextmanager
def open_source(url: str, timeout_s: float) -> Iterator[IO[bytes]]:
    """Open ``url`` for streaming; raise ``SourceRejected`` for permanent failures."""
    try:
        stream = _open_stream(url, timeout_s)
    except FileNotFoundError as exc:
        raise SourceRejected("not found") from exc
    except PermissionError as exc:
        raise SourceRejected(f"permission denied ({exc})") from exc
    except aiohttp.ClientResponseError as exc:
        if exc.status >= 500 or exc.status in RETRYABLE_CLIENT_STATUSES:
            raise
        raise SourceRejected(f"HTTP {exc.status} {exc.message}") from exc
    with stream:
        yield stream


def stream_to_file(
    url: str, dest: Path, timeout_s: float, cancelled: threading.Event
) -> tuple[int, str]:
    """Copy ``url`` into ``dest`` in chunks, fsync it; return (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    # HTTP reads are bounded by aiohttp's timeouts; any other filesystem (a hung NFS mount, s3, gcs) gets its
    # reads done on a helper thread and a stall of `timeout_s` fails the attempt (the thread is abandoned).
    guard = None if get_protocol(url) in HTTP_PROTOCOLS else ThreadPoolExecutor(1, thread_name_prefix="shard-read")
    try:
        with open_source(url, timeout_s) as source, open(dest, "wb") as out:
            while chunk := _read_chunk(source, guard, timeout_s):
                if cancelled.is_set():
                    raise TransferCancelled()
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            # The rename below must never publish a file whose bytes are still only in cache.
            os.fsync(out.fileno())
    finally:
        if guard is not None:
            guard.shutdown(wait=False, cancel_futures=True)
    return size, digest.hexdigest()


def _read_chunk(source: IO[bytes], guard: ThreadPoolExecutor | None, timeout_s: float) -> bytes:
    if guard is None:
        return source.read(CHUNK_BYTES)
    try:
        return guard.submit(source.read, CHUNK_BYTES).result(timeout=timeout_s)
    except FutureTimeout:
        raise TimeoutError(f"no data for {timeout_s:g} s") from None


def remote_shard_version(url: str, timeout_s: float) -> dict | None:
    fs, path = source_filesystem(url, timeout_s)
    return remote_version(url, fs=fs, path=path)


def missing_for_good(exc: BaseException) -> bool:
    # fsspec's HTTP info() reports every failed HEAD/GET as FileNotFoundError, the HTTP error as its cause: only a
    # client error (404, 403, ...) is permanent; a 5xx, a timeout or a dropped connection is retried.
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientResponseError):
        return cause.status < 500 and cause.status not in RETRYABLE_CLIENT_STATUSES
    return isinstance(exc, FileNotFoundError) and cause is None
