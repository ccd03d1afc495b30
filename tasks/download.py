"""Fetch pretraining shards from a source (tasks/shard_source.py) into a local directory, robustly.

Every shard is streamed
into a unique temp file, checked by decoding all of it (``model.data.validate_shard``) and only
then renamed into place, so the destination never holds a partial or garbled final file.
Transient failures are retried with exponential backoff; a missing shard is reported at once.

This is plain Python (no Prefect): the shards stage wraps ``fetch_shards`` in a Prefect task.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from model.data import CorruptShardError, ShardStats, shard_filename, validate_shard
from model.files import fsync_dir
from tasks.shard_source import (ShardSourceError, SourceRejected, TransferCancelled, missing_for_good, remote_shard_version,
                                 shard_url, stream_to_file)
from tasks.source_identity import HashCache, is_local, local_path
from tasks.store import atomic_write_json




class ShardDownloadError(RuntimeError):
    """A shard could not be fetched after every attempt (network errors, bad bytes)."""


@dataclass(frozen=True)
class ShardRecord:
    """One shard present and valid in the destination directory."""

    index: int
    path: str
    size: int
    sha256: str
    num_rows: int
    num_row_groups: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)




def _record(index: int, path: Path, size: int, sha256: str, stats: ShardStats) -> ShardRecord:
    return ShardRecord(
        index=index,
        path=str(path),
        size=size,
        sha256=sha256,
        num_rows=stats.num_rows,
        num_row_groups=stats.num_row_groups,
    )


def _describe(exc: BaseException | None, timeout_s: float) -> str:
    # fsspec re-raises aiohttp's read/connect timeouts as a bare FSTimeoutError() with no
    # message, so say what actually happened.
    if isinstance(exc, TimeoutError):
        return f"{type(exc).__name__}: timed out (no connection or no data for {timeout_s:g} s)"
    return f"{type(exc).__name__}: {str(exc) or repr(exc)}"


# What a retry can fix: network trouble (aiohttp errors, timeouts, HTTP 5xx/408/429, a body
# cut short), local I/O hiccups, and downloaded bytes that do not decode (truncated/garbled).
_TRANSIENT_ERRORS = (aiohttp.ClientError, OSError, CorruptShardError)
# ...except local write failures that no retry fixes (disk full, quota, read-only disk): fail at once.
_LOCAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass(frozen=True)
class _Attempts:
    """How every shard of one call is fetched: up to `attempts` tries with exponential backoff, reads bounded by
    `timeout_s`, a cancellation shared by all shards (set when one fails for good), and where to log."""

    attempts: int
    backoff_s: float
    timeout_s: float
    cancelled: threading.Event
    log: Callable[[str], Any]

    def retry_or_stop(self, exc: BaseException, index: int, attempt: int) -> bool:
        """Log a failed attempt; wait out the backoff and return True to try again, False after the last."""
        failure = f"shard {index:05d}: attempt {attempt}/{self.attempts} failed"
        if attempt == self.attempts:
            self.log(f"{failure} ({_describe(exc, self.timeout_s)})")
            return False
        delay = self.backoff_s * 2 ** (attempt - 1)
        self.log(f"{failure} ({_describe(exc, self.timeout_s)}); retrying in {delay:g} s")
        # Waiting on the event lets a failure elsewhere cut the backoff short.
        if self.cancelled.wait(delay):
            raise TransferCancelled() from exc
        return True


def _download(url: str, index: int, final: Path, tries: _Attempts) -> ShardRecord:
    last_error: BaseException | None = None
    for attempt in range(1, tries.attempts + 1):
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            size, sha256 = stream_to_file(url, tmp, tries.timeout_s, tries.cancelled)
            stats = validate_shard(tmp)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return _record(index, final, size, sha256, stats)
        except SourceRejected as exc:
            raise ShardSourceError(
                f"shard {index} is not available from {url}: {exc}; "
                "check data.source / --mirror (the source must hold "
                f"{shard_filename(index)})"
            ) from exc
        except _TRANSIENT_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno in _LOCAL_WRITE_ERRNOS:
                raise ShardDownloadError(
                    f"shard {index} cannot be written to {final.parent}: {exc.strerror}; fix: free space there "
                    "or point runtime.store (--store) at a disk with room for the shards"
                ) from exc
            last_error = exc
            if not tries.retry_or_stop(exc, index, attempt):
                break
        finally:
            tmp.unlink(missing_ok=True)
    raise ShardDownloadError(
        f"shard {index} could not be fetched from {url} after {tries.attempts} attempts; "
        f"last error: {_describe(last_error, tries.timeout_s)}"
    ) from last_error


def _source_record(shard: Path) -> Path:
    """Beside a shard fetched from a server that reports versions: which version it was, and its sha256."""
    return shard.with_name(shard.name + ".source.json")


def _stored_mismatch(final: Path, expected: dict | None, hash_cache: HashCache, verify: bool) -> str | None:
    """Why the stored shard is not the one the source holds now, or None. Without an expectation any valid
    shard is accepted. `verify` re-hashes the stored file instead of trusting the hash cache."""
    if expected is None:
        return None
    if "sha256" in expected:  # the source's bytes are known
        stored = hash_cache.sha256(final, verify)
        if stored != expected["sha256"]:
            return f"differs from the source (sha256 {stored[:12]}, the source has {expected['sha256'][:12]})"
        return None
    try:  # the source gave a version (ETag, Last-Modified, ...): was the stored file fetched at that version?
        record = json.loads(_source_record(final).read_text())
    except (OSError, ValueError):
        return "has no record of the source version it came from"
    if record.get("source") != expected:
        return "was fetched from another version of the source"
    if verify and hash_cache.sha256(final, verify=True) != record.get("sha256"):
        return "has other bytes than when it was fetched (sha256)"
    return None


def _ensure_shard(
    source: str,
    index: int,
    dest_dir: Path,
    *,
    expected: dict | None,
    hash_cache: HashCache,
    verify: bool,
    tries: _Attempts,
) -> ShardRecord:
    """Reuse a valid shard already in ``dest_dir`` that matches ``expected`` (its identity at the source), else
    (re-)fetch it."""
    log = tries.log
    if tries.cancelled.is_set():
        raise TransferCancelled()
    final = dest_dir / shard_filename(index)
    replacing_corrupt = False
    if final.exists():
        problem = _stored_mismatch(final, expected, hash_cache, verify)
        if problem is None:
            try:
                stats = validate_shard(final)
            except CorruptShardError as exc:
                problem = f"is corrupt ({exc.reason})"
        if problem is None:
            record = _record(index, final, final.stat().st_size, hash_cache.sha256(final), stats)
            log(f"shard {index:05d}: reusing valid {final} ({record.num_rows} rows)")
            return record
        log(f"shard {index:05d}: existing {final} {problem}; deleting it")
        final.unlink(missing_ok=True)
        _source_record(final).unlink(missing_ok=True)
        replacing_corrupt = True

    url = shard_url(source, index)
    started = time.monotonic()
    record = _download(url, index, final, tries)
    hash_cache.remember(final, record.sha256)
    if expected is not None and "sha256" in expected and record.sha256 != expected["sha256"]:
        final.unlink(missing_ok=True)
        raise ShardDownloadError(
            f"shard {index} changed at {url} while this run was fetching it (sha256 {record.sha256[:12]}, expected "
            f"{expected['sha256'][:12]}); fix: rerun once the source is stable"
        )
    if expected is not None and "sha256" not in expected:  # a server version: remember what it gave
        atomic_write_json(_source_record(final), {"source": expected, "sha256": record.sha256})
    verb = "re-fetched" if replacing_corrupt else "fetched"
    log(
        f"shard {index:05d}: {verb} {url} ({record.size / 1e6:.1f} MB, {record.num_rows} rows) "
        f"in {time.monotonic() - started:.1f} s"
    )
    return record


STALE_TEMP_AGE_S = 3600.0


def remove_stale_temp_files(directory: Path, older_than_s: float = STALE_TEMP_AGE_S, log=print) -> int:
    """Delete temp files a killed fetcher left behind. Only old ones: another run may be writing a young one."""
    removed = 0
    for tmp in directory.glob("shard_*.parquet.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # its writer finished or cleaned up meanwhile
    if removed:
        log(f"removed {removed} stale temp file(s) from {directory}")
    return removed


def fetch_shards(
    source: str | os.PathLike[str],
    indices: Iterable[int],
    dest_dir: str | os.PathLike[str],
    *,
    workers: int = 4,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    expected: dict[int, dict] | None = None,
    hash_cache: HashCache | None = None,
    verify: bool = False,
) -> dict[int, ShardRecord]:
    """Make ``dest_dir/shard_XXXXX.parquet`` present and valid for every index; return records.

    Valid shards already there are reused (no request) when they match ``expected[index]``, the
    shard's identity at the source (``shard_identities``; without it any valid shard is reused);
    corrupt or outdated ones are deleted and fetched again. ``hash_cache`` remembers stored
    shards' sha256 by size and mtime; ``verify`` re-hashes them instead. Downloads run on ``workers`` threads; each shard gets up to ``attempts`` tries with
    ``backoff_s * 2**(k-1)`` seconds of sleep after failed try k. ``timeout_s`` bounds HTTP
    connecting and each wait for data. A missing shard raises ``ShardSourceError`` at once; a
    shard that fails every try raises ``ShardDownloadError``. On the first permanent failure
    the remaining shards are cancelled and the error is raised; no temp file is left behind.
    The result is keyed by index, in ascending order.
    """
    source = os.fspath(source)
    wanted = sorted({int(index) for index in indices})
    if any(index < 0 for index in wanted):
        raise ValueError(f"shard indices must be >= 0, got {wanted}")
    if workers < 1 or attempts < 1 or backoff_s < 0 or timeout_s <= 0:
        raise ValueError(
            "need workers >= 1, attempts >= 1, backoff_s >= 0 and timeout_s > 0; got "
            f"workers={workers}, attempts={attempts}, backoff_s={backoff_s}, timeout_s={timeout_s}"
        )
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(dest, log=log)
    hash_cache = hash_cache or HashCache(None)

    tries = _Attempts(attempts, backoff_s, timeout_s, threading.Event(), log)
    records: dict[int, ShardRecord] = {}
    with tqdm(total=len(wanted), desc="shards", unit="shard", disable=not progress) as bar:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch-shard")
        try:
            futures = {
                pool.submit(
                    _ensure_shard,
                    source,
                    index,
                    dest,
                    expected=(expected or {}).get(index),
                    hash_cache=hash_cache,
                    verify=verify,
                    tries=tries,
                ): index
                for index in wanted
            }
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update(1)
        except BaseException:
            # Stop the running downloads at their next chunk or backoff and drop queued ones;
            # shutdown() then waits for them so their temp files are gone when we raise.
            tries.cancelled.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            hash_cache.save()
    return {index: records[index] for index in wanted}


def shard_identities(
    source: str | os.PathLike[str],
    indices: Iterable[int],
    *,
    hash_cache: HashCache,
    verify: bool = False,
    fetch_into: str | os.PathLike[str],
    workers: int = 4,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    log: Callable[[str], Any] = print,
) -> dict[int, dict]:
    """What the source holds for each shard, for the shards stage key (see tasks/source_identity.py).

    A local shard: {"size", "sha256"} (through ``hash_cache``; ``verify`` re-reads). A remote shard: the
    server's version ({"url", "size", "ETag", ...}); a server that reports no version is fetched into
    ``fetch_into`` (the store's shard directory, where the stage then finds it) and identified by the sha256
    of what arrived. A shard the source lacks raises ``ShardSourceError``.
    """
    source = os.fspath(source)
    fetch_dir = Path(fetch_into)
    tries = _Attempts(attempts, backoff_s, timeout_s, threading.Event(), log)

    def identify(index: int) -> dict:
        url = shard_url(source, index)
        if is_local(url):
            path = local_path(url)
            if not path.is_file():
                raise ShardSourceError(f"shard {index} is not available from {url}: not found; check data.source / "
                                       f"--mirror (the source must hold {shard_filename(index)})")
            return {"size": path.stat().st_size, "sha256": hash_cache.sha256(path, verify)}
        version = _remote_version_with_retries(url, index, tries)
        if version is not None:
            return version
        fetch_dir.mkdir(parents=True, exist_ok=True)
        record = _download(url, index, fetch_dir / shard_filename(index), tries)
        hash_cache.remember(Path(record.path), record.sha256)
        log(f"shard {index:05d}: {url} reports no version (ETag, Last-Modified); fetched it to learn its sha256")
        return {"size": record.size, "sha256": record.sha256}

    wanted = sorted({int(index) for index in indices})
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-identity") as pool:
        try:
            identities = dict(zip(wanted, pool.map(identify, wanted)))
        except BaseException:
            tries.cancelled.set()
            raise
        finally:
            hash_cache.save()
    return identities


def _remote_version_with_retries(url: str, index: int, tries: _Attempts) -> dict | None:
    for attempt in range(1, tries.attempts + 1):
        try:
            return remote_shard_version(url, tries.timeout_s)
        except (FileNotFoundError, aiohttp.ClientError, OSError) as exc:
            if missing_for_good(exc) or not tries.retry_or_stop(exc, index, attempt):
                raise ShardSourceError(
                    f"shard {index} is not available from {url}: {_describe(exc.__cause__ or exc, tries.timeout_s)}; "
                    f"check data.source / --mirror (the source must hold {shard_filename(index)})"
                ) from exc
    return None
