"""Tests for fetching and validating pretraining shards (tasks/download.py, tasks/shard_source.py, model/data.py).

Everything runs against the real shards in ../shared/data/pretrain, served by a real HTTP
server on 127.0.0.1 that can misbehave on purpose (truncate, garble, stall, fail with 503) for
the first N requests of a file and counts the requests it gets, so retries are observable.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import (
    CorruptShardError,
    iter_documents,
    iter_row_group_texts,
    shard_filename,
    validate_shard,
)
from tasks.download import ShardDownloadError, ShardRecord, fetch_shards, shard_identities
from tasks.shard_source import ShardSourceError, list_source_shards, shard_url
from tasks.source_identity import HashCache

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAIN_DIR = DATA_DIR / "pretrain"
SHARD0_ROWS = 4684
SHARD0_ROW_GROUPS = 5
FAST = dict(backoff_s=0.01, progress=False)

pytestmark = pytest.mark.skipif(
    not (PRETRAIN_DIR / "shard_00000.parquet").is_file(),
    reason=f"real pretraining shards not found in {PRETRAIN_DIR}",
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(data: bytes) -> bytes:
    """Half the file: the footer is gone."""
    return data[: len(data) // 2]


# A deterministic non-repeating-looking pattern; overwriting 64 KiB in the middle of a shard
# lands inside a zstd-compressed data page while the footer stays intact.
_GARBAGE = bytes((i * 37 + 11) % 256 for i in range(64 * 1024))


def garble(data: bytes) -> bytes:
    """Same length, footer intact, but a data page in the middle overwritten."""
    middle = len(data) // 2
    return data[:middle] + _GARBAGE + data[middle + len(_GARBAGE) :]


class FaultyShardServer(http.server.ThreadingHTTPServer):
    """Serves a directory; can break the first N responses for a file; counts requests."""

    daemon_threads = True

    def __init__(self, directory: Path):
        handler = partial(FaultyShardHandler, directory=str(directory))
        super().__init__(("127.0.0.1", 0), handler)
        self.directory = directory
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self._faults: dict[str, list] = {}
        self.release_stalled = threading.Event()
        self.versionless = False  # True: no Last-Modified header (a server that reports no version)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def break_file(self, name: str, mode: str, times: int | float = 1) -> None:
        """Serve ``name`` broken (mode: truncated, garbled, stall, error503) ``times`` times."""
        with self._lock:
            self._faults[name] = [mode, times]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.versionless = False
            self._faults.clear()

    def count_and_pick_fault(self, name: str) -> str | None:
        with self._lock:
            self.requests[name] += 1
            fault = self._faults.get(name)
            if fault is None or fault[1] <= 0:
                return None
            fault[1] -= 1
            return fault[0]

    def handle_error(self, request, client_address) -> None:
        # A client that timed out closes its socket under a stalled handler: expected here.
        pass


class FaultyShardHandler(http.server.SimpleHTTPRequestHandler):
    server: FaultyShardServer

    def _file_name(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    def send_header(self, keyword: str, value: str) -> None:
        if keyword == "Last-Modified" and self.server.versionless:
            return
        super().send_header(keyword, value)

    def do_HEAD(self) -> None:
        # Counted too, so the tests prove the downloader makes no HEAD probe.
        self.server.count_and_pick_fault(self._file_name())
        super().do_HEAD()

    def do_GET(self) -> None:
        fault = self.server.count_and_pick_fault(self._file_name())
        if fault is None:
            super().do_GET()
            return
        if fault == "error503":
            self.send_error(503, "Service Unavailable (test)")
            return
        data = Path(self.translate_path(self.path)).read_bytes()
        if fault == "stall":
            # Promise the whole file, send a little, then go silent.
            self._send_headers(len(data))
            self.wfile.write(data[: 64 * 1024])
            self.wfile.flush()
            self.server.release_stalled.wait(10)
            self.close_connection = True
            return
        body = {"truncated": truncate, "garbled": garble}[fault](data)
        self._send_headers(len(body))
        self.wfile.write(body)

    def _send_headers(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_server():
    server = FaultyShardServer(DATA_DIR)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release_stalled.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(http_server):
    http_server.reset()
    yield http_server
    http_server.reset()


@pytest.fixture
def template_source(server) -> str:
    return f"{server.base_url}/pretrain/shard_{{index:05d}}.parquet"


@pytest.fixture
def log_lines():
    return []


def assert_is_copy_of_original(record: ShardRecord, dest: Path) -> None:
    name = shard_filename(record.index)
    original = PRETRAIN_DIR / name
    assert Path(record.path) == dest / name
    assert record.sha256 == sha256_of(original) == sha256_of(dest / name)
    assert record.size == original.stat().st_size


def assert_only_final_files(dest: Path, indices: list[int]) -> None:
    assert sorted(p.name for p in dest.iterdir()) == [shard_filename(i) for i in indices]


# --- shard_url / list_source_shards -----------------------------------------------------------


def test_shard_url_template_and_directory_sources():
    assert shard_url("https://h/x/shard_{index:05d}.parquet", 42) == (
        "https://h/x/shard_00042.parquet"
    )
    assert shard_url("http://h/mirror", 7) == "http://h/mirror/shard_00007.parquet"
    assert shard_url("http://h/mirror/", 7) == "http://h/mirror/shard_00007.parquet"
    assert shard_url("/data/mirror", 6542) == "/data/mirror/shard_06542.parquet"
    assert shard_url("file:///data/mirror", 1) == "file:///data/mirror/shard_00001.parquet"


def test_list_source_shards_local_http_and_file_url(server):
    expected = list(range(8))
    assert list_source_shards(PRETRAIN_DIR) == expected
    assert list_source_shards(f"file://{PRETRAIN_DIR}") == expected
    assert list_source_shards(f"{server.base_url}/pretrain") == expected


def test_list_source_shards_ignores_temp_and_other_files(tmp_path):
    for index in (3, 11):
        shutil.copy(PRETRAIN_DIR / shard_filename(index % 8), tmp_path / shard_filename(index))
    (tmp_path / "shard_00012.parquet.0123abcd.tmp").write_bytes(b"partial")
    (tmp_path / "shard_13.parquet").write_bytes(b"")
    (tmp_path / "README.md").write_text("mirror")
    assert list_source_shards(tmp_path) == [3, 11]


def test_list_source_shards_rejects_template_and_missing_directory(tmp_path, template_source):
    with pytest.raises(ValueError, match="template"):
        list_source_shards(template_source)
    with pytest.raises(ShardSourceError, match="does not exist"):
        list_source_shards(tmp_path / "no-such-mirror")


# --- successful fetches -----------------------------------------------------------------------


def test_fetch_over_http_template_source(server, template_source, tmp_path, log_lines):
    records = fetch_shards(
        template_source, [2, 0, 1], tmp_path, workers=3, log=log_lines.append, **FAST
    )
    assert list(records) == [0, 1, 2]
    for record in records.values():
        assert_is_copy_of_original(record, tmp_path)
    shard0 = records[0]
    assert (shard0.index, shard0.num_rows, shard0.num_row_groups) == (
        0,
        SHARD0_ROWS,
        SHARD0_ROW_GROUPS,
    )
    assert shard0.to_dict() == {
        "index": 0,
        "path": str(tmp_path / "shard_00000.parquet"),
        "size": (PRETRAIN_DIR / "shard_00000.parquet").stat().st_size,
        "sha256": sha256_of(PRETRAIN_DIR / "shard_00000.parquet"),
        "num_rows": SHARD0_ROWS,
        "num_row_groups": SHARD0_ROW_GROUPS,
    }
    # Exactly one GET per shard and no HEAD probe.
    assert server.requests == Counter({shard_filename(i): 1 for i in range(3)})
    assert_only_final_files(tmp_path, [0, 1, 2])
    assert sum("fetched" in line for line in log_lines) == 3


@pytest.mark.parametrize("trailing_slash", ["", "/"])
def test_fetch_over_http_directory_source(server, tmp_path, trailing_slash):
    source = f"{server.base_url}/pretrain{trailing_slash}"
    records = fetch_shards(source, [5, 6, 7], tmp_path, **FAST)
    for record in records.values():
        assert_is_copy_of_original(record, tmp_path)
    assert server.requests == Counter({shard_filename(i): 1 for i in (5, 6, 7)})


@pytest.mark.parametrize("as_url", [False, True], ids=["local-path", "file-url"])
def test_fetch_from_local_directory(tmp_path, as_url):
    source = f"file://{PRETRAIN_DIR}" if as_url else str(PRETRAIN_DIR)
    dest = tmp_path / "nested" / "dest"
    records = fetch_shards(source, [3, 4], dest, **FAST)
    assert list(records) == [3, 4]
    for record in records.values():
        assert_is_copy_of_original(record, dest)
    assert_only_final_files(dest, [3, 4])


# --- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["truncated", "garbled", "error503"])
def test_bad_first_response_is_detected_and_refetched(
    server, template_source, tmp_path, log_lines, fault
):
    server.break_file("shard_00001.parquet", fault, times=1)
    records = fetch_shards(template_source, [0, 1], tmp_path, log=log_lines.append, **FAST)
    for record in records.values():
        assert_is_copy_of_original(record, tmp_path)
    assert server.requests == Counter({"shard_00000.parquet": 1, "shard_00001.parquet": 2})
    assert any("shard 00001: attempt 1/5 failed" in line for line in log_lines)
    assert_only_final_files(tmp_path, [0, 1])


def test_stalled_response_times_out_and_is_retried(
    server, template_source, tmp_path, log_lines
):
    server.break_file("shard_00002.parquet", "stall", times=1)
    started = time.monotonic()
    records = fetch_shards(
        template_source, [2], tmp_path, timeout_s=0.5, log=log_lines.append, **FAST
    )
    elapsed = time.monotonic() - started
    assert_is_copy_of_original(records[2], tmp_path)
    assert server.requests["shard_00002.parquet"] == 2
    # The stalled handler would hold on for 10 s: only the read timeout explains this.
    assert elapsed < 5, elapsed
    assert any("attempt 1/5 failed" in line and "timed out" in line for line in log_lines)


def test_unreachable_host_is_retried_then_raises_download_error(tmp_path, log_lines):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = f"http://127.0.0.1:{port}/pretrain"
    with pytest.raises(ShardDownloadError, match="after 2 attempts") as excinfo:
        fetch_shards(source, [0], tmp_path, attempts=2, log=log_lines.append, **FAST)
    assert "ClientConnectorError" in str(excinfo.value)
    assert sum("failed" in line for line in log_lines) == 2
    assert list(tmp_path.iterdir()) == []


def test_missing_shard_raises_source_error_without_retry(server, template_source, tmp_path):
    started = time.monotonic()
    # A long backoff: any retry would show in the elapsed time.
    with pytest.raises(ShardSourceError) as excinfo:
        fetch_shards(template_source, [99], tmp_path, backoff_s=10, progress=False)
    assert time.monotonic() - started < 5
    message = str(excinfo.value)
    url = template_source.format(index=99)
    assert "shard 99" in message and url in message and "data.source / --mirror" in message
    assert server.requests == Counter({"shard_00099.parquet": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["garbled", "error503"])
def test_shard_failing_every_time_raises_download_error(
    server, template_source, tmp_path, log_lines, fault
):
    server.break_file("shard_00003.parquet", fault, times=float("inf"))
    with pytest.raises(ShardDownloadError) as excinfo:
        fetch_shards(template_source, [3], tmp_path, attempts=3, log=log_lines.append, **FAST)
    message = str(excinfo.value)
    assert "shard 3" in message and template_source.format(index=3) in message
    assert "after 3 attempts" in message and "last error" in message
    assert server.requests == Counter({"shard_00003.parquet": 3})
    assert list(tmp_path.iterdir()) == []  # neither temp nor final file
    assert sum("failed" in line for line in log_lines) == 3


def test_permanent_failure_cancels_the_rest_and_leaves_no_temp_files(
    server, template_source, tmp_path
):
    server.break_file("shard_00000.parquet", "error503", times=float("inf"))
    with pytest.raises(ShardSourceError, match="shard 99"):
        # Shard 0 sits in a 10 s backoff when shard 99 fails; cancellation cuts it short.
        started = time.monotonic()
        fetch_shards(template_source, [0, 99], tmp_path, workers=2, backoff_s=10, progress=False)
    assert time.monotonic() - started < 5
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "shard_00000.parquet").exists()


# --- shards already in the destination ----------------------------------------------------------


def test_existing_valid_shard_is_reused_without_requests(
    server, template_source, tmp_path, log_lines
):
    shutil.copy(PRETRAIN_DIR / "shard_00004.parquet", tmp_path / "shard_00004.parquet")
    records = fetch_shards(template_source, [4], tmp_path, log=log_lines.append, **FAST)
    assert_is_copy_of_original(records[4], tmp_path)
    assert records[4].num_rows > 0
    assert server.requests == Counter()
    assert any("reusing" in line for line in log_lines)


@pytest.mark.parametrize("damage", [truncate, garble], ids=["truncated", "garbled"])
def test_existing_corrupt_shard_is_deleted_and_refetched(
    server, template_source, tmp_path, log_lines, damage
):
    name = "shard_00005.parquet"
    (tmp_path / name).write_bytes(damage((PRETRAIN_DIR / name).read_bytes()))
    records = fetch_shards(template_source, [5], tmp_path, log=log_lines.append, **FAST)
    assert_is_copy_of_original(records[5], tmp_path)
    assert server.requests == Counter({name: 1})
    assert any("corrupt" in line for line in log_lines)
    assert any("re-fetched" in line for line in log_lines)


# --- validate_shard and the iterators -------------------------------------------------------------


def test_validate_shard_reads_a_real_shard():
    path = PRETRAIN_DIR / "shard_00000.parquet"
    stats = validate_shard(path)
    assert (stats.num_rows, stats.num_row_groups) == (SHARD0_ROWS, SHARD0_ROW_GROUPS)
    assert stats.num_chars == sum(len(doc) for doc in iter_documents([path]))


@pytest.mark.parametrize("damage", [truncate, garble], ids=["truncated", "garbled"])
def test_validate_shard_detects_damaged_bytes(tmp_path, damage):
    original = (PRETRAIN_DIR / "shard_00006.parquet").read_bytes()
    damaged = damage(original)
    if damage is garble:
        assert len(damaged) == len(original) and damaged != original
        # The footer is intact, so only decoding the pages can find this.
        assert pq.ParquetFile(pa.BufferReader(damaged)).metadata.num_rows > 0
    path = tmp_path / "shard_00006.parquet"
    path.write_bytes(damaged)
    with pytest.raises(CorruptShardError, match="cannot be decoded") as excinfo:
        validate_shard(path)
    assert str(path) in str(excinfo.value)


def test_validate_shard_rejects_wrong_contents(tmp_path):
    cases = {
        "no_text.parquet": (pa.table({"content": ["a", "b"]}), "no 'text' column"),
        "int_text.parquet": (pa.table({"text": [1, 2]}), "not string"),
        "no_rows.parquet": (pa.table({"text": pa.array([], pa.string())}), "no rows"),
        "nulls.parquet": (pa.table({"text": ["a", None]}), "null"),
    }
    for name, (table, reason) in cases.items():
        path = tmp_path / name
        pq.write_table(table, path)
        with pytest.raises(CorruptShardError, match=reason) as excinfo:
            validate_shard(path)
        assert excinfo.value.path == str(path) and str(path) in str(excinfo.value)

    empty = tmp_path / "empty.parquet"
    empty.touch()
    with pytest.raises(CorruptShardError, match="empty") as excinfo:
        validate_shard(empty)
    assert str(empty) in str(excinfo.value)
    with pytest.raises(CorruptShardError, match="does not exist"):
        validate_shard(tmp_path / "absent.parquet")
    # large_string is accepted as well as string.
    large = tmp_path / "large.parquet"
    pq.write_table(pa.table({"text": pa.array(["héllo", "x"], pa.large_string())}), large)
    assert validate_shard(large).num_chars == 6


def test_iterators_walk_row_groups_in_order():
    paths = [PRETRAIN_DIR / "shard_00000.parquet", PRETRAIN_DIR / "shard_00001.parquet"]
    groups = list(iter_row_group_texts(paths))
    metas = [pq.ParquetFile(p).metadata for p in paths]
    assert len(groups) == sum(m.num_row_groups for m in metas)
    assert [len(g) for g in groups[: metas[0].num_row_groups]] == [
        metas[0].row_group(i).num_rows for i in range(metas[0].num_row_groups)
    ]
    docs = list(iter_documents(paths))
    assert docs == [doc for group in groups for doc in group]
    assert len(docs) == sum(m.num_rows for m in metas)
    # Strided reading (one rank of two): row groups 1, 3, ... of each file.
    strided = list(iter_row_group_texts(paths, start=1, step=2))
    n0 = metas[0].num_row_groups
    assert strided == groups[1:n0:2] + groups[n0 + 1 :: 2]
    with pytest.raises(ValueError):
        next(iter_row_group_texts(paths, step=0))


def test_disk_full_fails_at_once_with_the_fix(tmp_path):
    """A real full disk (a 1 MiB tmpfs; shards are ~2.3 MB): no retries, a clear error, nothing left behind."""
    dest = tmp_path / "tiny"
    dest.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dest)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN) to fill a disk for real")
    try:
        logs: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(ShardDownloadError) as exc_info:
            fetch_shards(str(PRETRAIN_DIR), [0], dest, attempts=5, backoff_s=1.0, progress=False, log=logs.append)
        assert time.monotonic() - t0 < 5  # no backoff waits
        message = str(exc_info.value)
        assert "No space left on device" in message and "runtime.store" in message
        assert not any("retrying" in line for line in logs)
        assert list(dest.iterdir()) == []
    finally:
        subprocess.run(["umount", str(dest)], check=False)


def test_stale_temp_files_are_removed_young_ones_kept(tmp_path):
    old = tmp_path / "shard_00000.parquet.deadbeef.tmp"
    young = tmp_path / "shard_00001.parquet.cafebabe.tmp"
    for p in (old, young):
        p.write_bytes(b"partial")
    stale = time.time() - 2 * 3600
    os.utime(old, (stale, stale))
    fetch_shards(str(PRETRAIN_DIR), [0], tmp_path, progress=False, log=lambda _: None)
    assert not old.exists() and young.exists()
    assert (tmp_path / "shard_00000.parquet").is_file()


# --- what the source holds: shard identities, and stored shards checked against them ----------------


def copy_source(tmp_path: Path, indices=(0, 1)) -> Path:
    source = tmp_path / "mirror"
    source.mkdir()
    for i in indices:
        shutil.copy(PRETRAIN_DIR / shard_filename(i), source / shard_filename(i))
    return source


def test_local_identity_is_the_sha256_remembered_by_size_and_mtime(tmp_path):
    source = copy_source(tmp_path)
    cache = HashCache(tmp_path / "cache.json")
    ids = shard_identities(source, [0, 1], hash_cache=cache, fetch_into=tmp_path / "store")
    assert ids == {i: {"size": (source / shard_filename(i)).stat().st_size,
                       "sha256": sha256_of(PRETRAIN_DIR / shard_filename(i))} for i in (0, 1)}
    assert not (tmp_path / "store").exists()  # a local source is read in place, never copied to learn it
    # The second call trusts the cache (size and mtime unchanged): a doctored entry shows it was not re-read ...
    entries = HashCache(tmp_path / "cache.json").entries
    entries[str((source / shard_filename(0)).resolve())]["sha256"] = "doctored"
    (tmp_path / "cache.json").write_text(__import__("json").dumps(entries))
    again = shard_identities(source, [0], hash_cache=HashCache(tmp_path / "cache.json"), fetch_into=tmp_path / "s")
    assert again[0]["sha256"] == "doctored"
    # ... while verify re-reads, and a replaced file (new mtime) is re-read whatever the cache says.
    verified = shard_identities(source, [0], hash_cache=HashCache(tmp_path / "cache.json"), verify=True,
                                fetch_into=tmp_path / "s")
    assert verified[0]["sha256"] == sha256_of(PRETRAIN_DIR / shard_filename(0))
    shutil.copy(PRETRAIN_DIR / shard_filename(2), source / shard_filename(1))
    replaced = shard_identities(source, [1], hash_cache=HashCache(tmp_path / "cache.json"), fetch_into=tmp_path / "s")
    assert replaced[1]["sha256"] == sha256_of(PRETRAIN_DIR / shard_filename(2))


def test_stored_shard_is_reused_only_while_it_matches_the_source(tmp_path, log_lines):
    source, dest = copy_source(tmp_path), tmp_path / "dest"
    cache = HashCache(tmp_path / "cache.json")
    ids = shard_identities(source, [0, 1], hash_cache=cache, fetch_into=dest)
    fetch_shards(source, [0, 1], dest, expected=ids, hash_cache=cache, **FAST)
    # Replace shard 1 in the source with another valid shard: its stored copy is outdated and fetched again.
    shutil.copy(PRETRAIN_DIR / shard_filename(5), source / shard_filename(1))
    ids = shard_identities(source, [0, 1], hash_cache=cache, fetch_into=dest)
    records = fetch_shards(source, [0, 1], dest, expected=ids, hash_cache=cache, log=log_lines.append, **FAST)
    assert records[1].sha256 == sha256_of(PRETRAIN_DIR / shard_filename(5)) == sha256_of(dest / shard_filename(1))
    assert any("shard 00001: existing" in line and "differs from the source" in line for line in log_lines)
    assert any("shard 00000: reusing valid" in line for line in log_lines)


def test_verify_rehashes_stored_shards_the_cache_would_trust(tmp_path, log_lines):
    source, dest = copy_source(tmp_path, (0,)), tmp_path / "dest"
    cache = HashCache(tmp_path / "cache.json")
    ids = shard_identities(source, [0], hash_cache=cache, fetch_into=dest)
    fetch_shards(source, [0], dest, expected=ids, hash_cache=cache, **FAST)
    stored = dest / shard_filename(0)
    # Other bytes under an unchanged size and mtime (a silent disk error, a careless copy), in a place that still
    # decodes (the writer's name in the footer): invisible to stat and to decoding.
    st = stored.stat()
    data = stored.read_bytes()
    assert b"parquet-cpp-arrow" in data
    stored.write_bytes(data.replace(b"parquet-cpp-arrow", b"parquet-cpp-arroW"))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    fetch_shards(source, [0], dest, expected=ids, hash_cache=HashCache(tmp_path / "cache.json"),
                 log=log_lines.append, **FAST)
    assert sha256_of(stored) != ids[0]["sha256"]  # trusted: same size and mtime
    fetch_shards(source, [0], dest, expected=ids, hash_cache=HashCache(tmp_path / "cache.json"), verify=True,
                 log=log_lines.append, **FAST)
    assert sha256_of(stored) == ids[0]["sha256"]
    assert any("differs from the source" in line for line in log_lines)


def test_http_identity_is_the_server_version_and_a_new_version_is_fetched_again(server, template_source, tmp_path,
                                                                                log_lines):
    cache = HashCache(None)
    ids = shard_identities(template_source, [0], hash_cache=cache, fetch_into=tmp_path / "never", **FAST_ID)
    assert ids[0]["url"] == template_source.format(index=0) and ids[0]["Last-Modified"]
    assert ids[0]["size"] == (PRETRAIN_DIR / shard_filename(0)).stat().st_size
    assert not (tmp_path / "never").exists()  # a versioned server is asked, not downloaded from
    fetch_shards(template_source, [0], tmp_path, expected=ids, hash_cache=cache, **FAST)
    server.reset()
    fetch_shards(template_source, [0], tmp_path, expected=ids, hash_cache=cache, log=log_lines.append, **FAST)
    assert server.requests == Counter()  # same version: reused, no request
    newer = {0: {**ids[0], "Last-Modified": "Wed, 02 Dec 2026 03:00:00 GMT"}}
    fetch_shards(template_source, [0], tmp_path, expected=newer, hash_cache=cache, log=log_lines.append, **FAST)
    assert server.requests == Counter({shard_filename(0): 1})
    assert any("fetched from another version of the source" in line for line in log_lines)


def test_versionless_server_is_identified_by_the_sha256_of_what_it_sent(server, template_source, tmp_path):
    server.versionless = True
    cache = HashCache(None)
    ids = shard_identities(template_source, [0], hash_cache=cache, fetch_into=tmp_path, **FAST_ID)
    assert ids == {0: {"size": (PRETRAIN_DIR / shard_filename(0)).stat().st_size,
                       "sha256": sha256_of(PRETRAIN_DIR / shard_filename(0))}}
    fetched = server.requests[shard_filename(0)]
    fetch_shards(template_source, [0], tmp_path, expected=ids, hash_cache=cache, **FAST)
    assert server.requests[shard_filename(0)] == fetched  # the copy fetched to learn it is the one kept


def test_missing_remote_shard_is_reported_at_once_with_its_url(server, template_source, tmp_path):
    started = time.monotonic()
    with pytest.raises(ShardSourceError, match=r"shard 99 is not available from http://127\.0\.0\.1:\d+/"):
        shard_identities(template_source, [99], hash_cache=HashCache(None), fetch_into=tmp_path, backoff_s=5)
    assert time.monotonic() - started < 5  # a 404 is not retried


FAST_ID = dict(backoff_s=0.01)


class _SilentFile(io.RawIOBase):
    """Opens fine, then never sends a byte (until released): a hung NFS mount or object store."""

    released = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        _SilentFile.released.wait(60)
        return 0


class StallingFileSystem(fsspec.AbstractFileSystem):
    protocol = "stalling"

    def _open(self, path, mode="rb", **kwargs):
        return _SilentFile()


def test_stalled_non_http_source_times_out_like_a_stalled_server(tmp_path, log_lines):
    """A non-HTTP source that opens but never sends fails each attempt after timeout_s instead of blocking the
    stage forever (HTTP has aiohttp's read timeout; every other filesystem gets this guard)."""
    fsspec.register_implementation("stalling", StallingFileSystem, clobber=True)
    _SilentFile.released.clear()
    started = time.monotonic()
    try:
        with pytest.raises(ShardDownloadError, match="timed out"):
            fetch_shards("stalling:///mirror", [0], tmp_path / "dest", attempts=2, timeout_s=0.5,
                         log=log_lines.append, **FAST)
    finally:
        _SilentFile.released.set()
    assert time.monotonic() - started < 10
    assert any("attempt 1/2 failed" in line for line in log_lines)
    assert not list((tmp_path / "dest").iterdir())  # no temp file left behind
