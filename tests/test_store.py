"""Tests for the content-addressed artifact store (tasks/store.py): layout, manifests and their validation,
atomic writes, and the lease lock across real processes (stage keys: tests/test_stages.py).

Lock holders in other processes are real Python interpreters started with `python -c`; every one
is killed and reaped in a finally block, so no child outlives its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from model.files import JsonlError, atomic_write, atomic_write_bytes, jsonl_rows
from tasks.store import (
    MANIFEST,
    LeaseLock,
    LeaseLost,
    Store,
    artifact_record,
    atomic_write_json,
    check_artifact,
    read_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# 1. layout

def test_store_layout(tmp_path):
    s = Store(tmp_path / "st")
    assert s.root == (tmp_path / "st").resolve()
    assert s.stage_dir("pretrain", "k") == s.root / "stages" / "pretrain" / "k"
    assert s.results_dir == s.root / "prefect-results"
    # shards are shared by source: the directory is named by the source alone, the same in any store
    shards = s.shards_dir("src-a")
    assert shards == s.root / "shards" / hashlib.sha256(b"src-a").hexdigest()[:16]
    assert Store(tmp_path / "other").shards_dir("src-a").name == shards.name
    assert s.shards_dir("src-b") != shards
    lock = s.lock("pretrain", "k", lease_s=5)
    assert lock.path.parent == s.root / "locks" and lock.lease_s == 5


# ---------------------------------------------------------------------------------------------
# 2. manifests

def _build(art: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = art / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


FILES = {"model.pt": b"\x00\x01weights" * 100, "meta/summary.json": b'{"loss": 1.5}\n', "log.txt": b"done\n"}


@pytest.fixture
def artifact(tmp_path):
    store_root = tmp_path / "store"
    art = Store(store_root).stage_dir("pretrain", "k1")
    _build(art, FILES)
    _build(art / "work", {"ckpt/step_10.pt": b"resumable state", "log.txt": b"partial"})
    (art / ".half-written.bin.tmp").write_bytes(b"temp")
    ref = store_root / "shards" / "abc" / "shard_00000.parquet"
    _build(ref.parent, {ref.name: b"PAR1 shard bytes PAR1"})
    started = time.time() - 5
    record = write_manifest(art, stage="pretrain", key="k1", metrics={"val_bpb": 1.23},
                            refs={"shard_0": ref}, store_root=store_root, started_at=started,
                            extra={"world_size": 1})
    return store_root, art, ref, record


def test_write_manifest(artifact):
    store_root, art, ref, record = artifact
    m = read_manifest(art)
    assert m is not None
    assert m["stage"] == "pretrain" and m["key"] == "k1"
    assert m["files"] == {rel: {"size": len(data), "mtime_ns": (art / rel).stat().st_mtime_ns,
                                "sha256": hashlib.sha256(data).hexdigest()} for rel, data in FILES.items()}
    assert not any(k.startswith("work") or k == MANIFEST or k.endswith(".tmp") for k in m["files"])
    assert m["refs"]["shard_0"]["path"] == "shards/abc/shard_00000.parquet"
    assert m["refs"]["shard_0"]["size"] == ref.stat().st_size
    assert m["refs"]["shard_0"]["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    env = m["environment"]
    assert {"git_commit", "python", "torch"} <= set(env)
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"sha", "short", "dirty"} <= set(env["git_commit"])
    assert env["world_size"] == 1
    assert set(m["timings"]) >= {"started_at", "finished_at", "seconds"}
    assert 4 < m["timings"]["seconds"] < 120
    assert m["metrics"] == {"val_bpb": 1.23}
    # manifest.json is valid JSON written last, no temp files left beside it
    assert json.loads((art / MANIFEST).read_text()) == m
    assert not list(art.glob(f".{MANIFEST}*"))
    # the record downstream stages key on
    assert record == artifact_record(art, store_root)
    assert record == {"stage": "pretrain", "key": "k1", "path": "stages/pretrain/k1",
                      "content_sha256": m["content_sha256"], "metrics": {"val_bpb": 1.23}}


def test_content_hash_covers_contents_only(tmp_path):
    store_root = tmp_path / "store"
    a, b, c = (store_root / "stages" / "s" / k for k in ("ka", "kb", "kc"))
    _build(a, FILES)
    _build(a / "work", {"junk": b"1"})
    ra = write_manifest(a, stage="s", key="ka", metrics={"t": 1.0}, store_root=store_root,
                        started_at=time.time() - 100)
    time.sleep(1.1)  # a later rebuild: different timings (seconds resolution), work files, metrics
    _build(b, FILES)
    _build(b / "work", {"junk": b"2", "more": b"3"})
    rb = write_manifest(b, stage="s", key="kb", metrics={"t": 2.0}, store_root=store_root, started_at=time.time())
    assert read_manifest(a)["timings"] != read_manifest(b)["timings"]
    assert ra["content_sha256"] == rb["content_sha256"]

    changed = dict(FILES)
    changed["model.pt"] = b"\x00\x02" + FILES["model.pt"][2:]  # one byte differs
    _build(c, changed)
    rc = write_manifest(c, stage="s", key="kc", metrics={}, store_root=store_root, started_at=time.time())
    assert rc["content_sha256"] != ra["content_sha256"]


def test_check_artifact_valid(artifact):
    store_root, art, _, _ = artifact
    assert check_artifact(art, store_root) is None
    # work/ may change freely
    (art / "work" / "log.txt").write_bytes(b"much longer log than before")
    assert check_artifact(art, store_root) is None


def test_check_artifact_deleted_file(artifact):
    store_root, art, _, _ = artifact
    (art / "meta" / "summary.json").unlink()
    reason = check_artifact(art, store_root)
    assert reason and "meta/summary.json" in reason


def test_check_artifact_size_changed(artifact):
    store_root, art, _, _ = artifact
    (art / "model.pt").write_bytes(b"short")
    reason = check_artifact(art, store_root)
    assert reason and "model.pt" in reason and "size" in reason


@pytest.mark.parametrize("corruption", ["missing", "not-json", "truncated", "wrong-format", "list"])
def test_check_artifact_bad_manifest(artifact, corruption):
    store_root, art, _, _ = artifact
    mf = art / MANIFEST
    text = mf.read_text()
    if corruption == "missing":
        mf.unlink()
    elif corruption == "not-json":
        mf.write_text("{not json")
    elif corruption == "truncated":
        mf.write_text(text[: len(text) // 2])
    elif corruption == "wrong-format":
        mf.write_text(json.dumps({**json.loads(text), "format": 999}))
    else:
        mf.write_text("[]")
    assert read_manifest(art) is None
    reason = check_artifact(art, store_root)
    assert reason and MANIFEST in reason
    with pytest.raises(FileNotFoundError):
        artifact_record(art, store_root)


def test_check_artifact_ref_rewritten_same_size(artifact):
    store_root, art, ref, _ = artifact
    data = ref.read_bytes()
    time.sleep(0.05)  # past any coarse timestamp tick
    ref.write_bytes(data[::-1])  # same size, new mtime
    reason = check_artifact(art, store_root)
    assert reason and "shards/abc/shard_00000.parquet" in reason and "other bytes" in reason


def test_a_flipped_byte_is_caught_by_its_mtime_or_by_verify(artifact):
    """A same-size edit changes the file's mtime, which makes validation re-hash it; with the mtime put back,
    only --verify (re-hash everything) sees it."""
    store_root, art, _, _ = artifact
    victim = art / next(iter(FILES))
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[0] ^= 0x01
    victim.write_bytes(bytes(data))
    reason = check_artifact(art, store_root)
    assert reason and "sha256" in reason
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_artifact(art, store_root) is None
    assert "sha256" in check_artifact(art, store_root, verify=True)
    data[0] ^= 0x01
    victim.write_bytes(bytes(data))  # restored: valid again whatever the mtime says
    assert check_artifact(art, store_root) is None and check_artifact(art, store_root, verify=True) is None


def test_check_artifact_ref_missing(artifact):
    store_root, art, ref, _ = artifact
    ref.unlink()
    reason = check_artifact(art, store_root)
    assert reason and "shards/abc/shard_00000.parquet" in reason and "missing" in reason


def test_check_artifact_no_directory(tmp_path):
    assert check_artifact(tmp_path / "nope", tmp_path) is not None


# ---------------------------------------------------------------------------------------------
# 3. atomic writes

def test_atomic_write_bytes_replaces(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(p, b"first version, long")
    assert p.read_bytes() == b"first version, long"
    atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]


def test_atomic_write_json_replaces(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    atomic_write_json(p, {"c": "é"})
    assert json.loads(p.read_text()) == {"c": "é"}
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]


def test_jsonl_rows_name_the_bad_line_or_skip_a_torn_one():
    lines = ['{"step": 0}', "", "  ", '{"step": 1, "val/bpb": 1.5}', '{"step": 2, "tra']  # the last one torn
    assert list(jsonl_rows(lines, skip_invalid=True)) == [(1, {"step": 0}), (4, {"step": 1, "val/bpb": 1.5})]
    with pytest.raises(JsonlError) as caught:
        list(jsonl_rows(lines))
    assert caught.value.line_number == 5 and "line 5: invalid JSON" in str(caught.value)


def test_atomic_write_failure_leaves_no_temp(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"cannot replace a non-empty directory")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]
    assert (target / "inside").read_text() == "keep"
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"bad": object()})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]

    def half_written(f):
        f.write(b"partial")
        raise RuntimeError("writer died")

    (tmp_path / "kept.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write(tmp_path / "kept.bin", half_written)
    assert (tmp_path / "kept.bin").read_bytes() == b"old"  # readers still see the old file, no temp is left
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "kept.bin"]


# ---------------------------------------------------------------------------------------------
# 4. the lease lock

HOLDER = r"""
import sys, time
from pathlib import Path
from tasks.store import LeaseLock
path, lease, mode, arg = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = LeaseLock(Path(path), lease_s=lease)
lock.acquire()
print("held", lock.holder, flush=True)
if mode == "sleep":
    time.sleep(float(arg))
elif mode == "commit":  # wait for a line on stdin, then commit `arg` into the file beside the lock, fenced
    sys.stdin.readline()
    from tasks.store import LeaseLost
    try:
        with lock.fenced():
            Path(path).with_suffix(".artifact").write_text(arg)
        print("committed", flush=True)
    except LeaseLost as exc:
        print("refused", exc, flush=True)
else:  # wait for a line on stdin
    sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


class Holders:
    """Starts lock-holder processes and guarantees none survives the test."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, path: Path, lease_s: float, mode: str = "sleep", arg=60.0) -> tuple[subprocess.Popen, str]:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(lease_s), mode, str(arg)],
                                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = self.readline(proc, timeout=30)
        assert line.startswith("held "), f"holder did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        return proc, line.split()[1]

    @staticmethod
    def readline(proc: subprocess.Popen, timeout: float) -> str:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, "no output from the holder process in time"
        return proc.stdout.readline().strip()

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()


@pytest.fixture
def holders():
    h = Holders()
    try:
        yield h
    finally:
        h.cleanup()
        for proc in h.procs:
            assert proc.poll() is not None


def _lock_info(path: Path) -> dict:
    return json.loads(path.read_text())


def test_lock_in_process(tmp_path):
    path = tmp_path / "locks" / "a.lock"
    first, second = LeaseLock(path, lease_s=5.0), LeaseLock(path, lease_s=5.0)
    first.acquire(timeout_s=1)
    try:
        assert _lock_info(path)["holder"] == first.holder
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=first.holder):
            second.acquire(timeout_s=0.5)
        assert 0.5 <= time.monotonic() - t0 < 2.0
    finally:
        first.release()
    assert not path.exists()
    second.acquire(timeout_s=0.5)
    assert _lock_info(path)["holder"] == second.holder
    second.release()
    assert not path.exists()
    with LeaseLock(path, lease_s=5.0) as third:
        assert _lock_info(path)["holder"] == third.holder
    assert not path.exists()


def test_lock_waiter_logs_once(tmp_path):
    path = tmp_path / "b.lock"
    messages = []
    with LeaseLock(path, lease_s=5.0):
        with pytest.raises(TimeoutError):
            LeaseLock(path, lease_s=5.0, poll_s=0.05).acquire(timeout_s=0.3, log=messages.append)
    assert len(messages) == 1 and "b.lock" in messages[0]


def test_lock_sigkilled_holder_is_taken_over_at_once(tmp_path, holders):
    path = tmp_path / "c.lock"
    lease = 2.0
    proc, holder = holders.start(path, lease)
    assert _lock_info(path)["holder"] == holder
    proc.send_signal(signal.SIGKILL)  # not reaped yet: a zombie must count as dead too
    lock = LeaseLock(path, lease_s=lease)
    t0 = time.monotonic()
    lock.acquire(timeout_s=10)
    elapsed = time.monotonic() - t0
    try:
        assert elapsed < lease + 1.0
        assert elapsed < lease / 2, f"took {elapsed:.2f}s: the dead pid was not detected, the lease expired"
        assert _lock_info(path)["holder"] == lock.holder
    finally:
        lock.release()


def test_lock_frozen_holder_is_taken_over_after_lease(tmp_path, holders):
    path = tmp_path / "d.lock"
    lease = 2.0
    proc, holder = holders.start(path, lease)
    t_held = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)  # alive, but its heartbeat stops
    expires = _lock_info(path)["expires"]
    lock = LeaseLock(path, lease_s=lease, poll_s=0.05)
    lock.acquire(timeout_s=10)
    elapsed = time.monotonic() - t_held
    try:
        assert time.time() >= expires - 0.01, "taken over before the lease expired"
        assert lease - 0.5 <= elapsed < lease + 2.0, elapsed
        assert _lock_info(path)["holder"] == lock.holder
        # the thawed old holder notices the takeover and does not renew over us, nor release our file
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(lease / 3 + 0.5)
        assert _lock_info(path)["holder"] == lock.holder
    finally:
        lock.release()


def test_stalled_holder_cannot_commit_after_a_takeover(tmp_path, holders):
    """Fencing: A stalls (SIGSTOP) past its lease, B takes over and commits; A, resumed, is refused."""
    path = tmp_path / "g.lock"
    artifact = path.with_suffix(".artifact")
    proc, a = holders.start(path, 1.0, "commit", "A")
    os.kill(proc.pid, signal.SIGSTOP)
    b = LeaseLock(path, lease_s=5.0, poll_s=0.05)
    b.acquire(timeout_s=10)
    try:
        with b.fenced():
            artifact.write_text("B")
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("commit now\n")
        proc.stdin.flush()
        answer = Holders.readline(proc, timeout=15)
        assert answer.startswith("refused") and "lost its lease" in answer and b.holder in answer, answer
        assert artifact.read_text() == "B"
        assert _lock_info(path)["holder"] == b.holder  # A's release leaves B's lock alone
    finally:
        b.release()


def test_holder_whose_lease_ran_out_cannot_commit(tmp_path):
    lock = LeaseLock(tmp_path / "h.lock", lease_s=0.5)
    lock.acquire()
    lock._stop.set()  # its heartbeat stops, as in a process frozen long enough
    lock._thread.join()
    time.sleep(0.7)
    with pytest.raises(LeaseLost, match="ran out"):
        with lock.fenced():
            pass
    lock.release()


def test_waiter_says_who_holds_the_lock_and_repeats_it(tmp_path):
    path = tmp_path / "i.lock"
    messages = []
    with LeaseLock(path, lease_s=5.0, owner="flow run nightly-abc (1234), task pretrain"):
        with pytest.raises(TimeoutError):
            LeaseLock(path, lease_s=5.0, poll_s=0.05, announce_every_s=0.2).acquire(timeout_s=0.5,
                                                                                    log=messages.append)
    assert 2 <= len(messages) <= 4, messages
    assert all("flow run nightly-abc (1234), task pretrain" in m and f"pid {os.getpid()}" in m and " since " in m
               and "lease until" in m for m in messages), messages


def test_lock_live_holder_renews_beyond_lease(tmp_path, holders):
    path = tmp_path / "e.lock"
    proc, holder = holders.start(path, 1.0, "sleep", 3.0)
    t0 = time.monotonic()
    waiter = LeaseLock(path, lease_s=1.0)
    with pytest.raises(TimeoutError, match=holder):
        waiter.acquire(timeout_s=2.0)
    assert 2.0 <= time.monotonic() - t0 < 4.0
    # once the holder releases, the waiter gets it
    assert Holders.readline(proc, timeout=15) == "released"
    assert proc.wait(timeout=10) == 0
    waiter.acquire(timeout_s=1.0)
    waiter.release()


def test_release_after_takeover_keeps_new_holders_file(tmp_path, holders):
    path = tmp_path / "f.lock"
    lease = 1.0
    proc, old = holders.start(path, lease, "stdin")
    os.kill(proc.pid, signal.SIGSTOP)
    new = LeaseLock(path, lease_s=lease, poll_s=0.05)
    new.acquire(timeout_s=10)
    try:
        assert _lock_info(path)["holder"] == new.holder != old
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert Holders.readline(proc, timeout=15) == "released"
        assert proc.wait(timeout=10) == 0
        assert path.exists() and _lock_info(path)["holder"] == new.holder
        # and the same in one process: an old lock object releasing after a takeover
        stale = LeaseLock(path, lease_s=lease)
        stale.release()
        assert _lock_info(path)["holder"] == new.holder
    finally:
        new.release()
    assert not path.exists()


def test_lock_unreadable_file_is_stale(tmp_path):
    path = tmp_path / "g.lock"
    path.write_text('{"holder": "torn')
    lock = LeaseLock(path, lease_s=5.0)
    lock.acquire(timeout_s=0.5)
    assert _lock_info(path)["holder"] == lock.holder
    lock.release()


GUARD_HOLDER = r"""
import sys, time
from pathlib import Path
from tasks.store import LeaseLock
lock = LeaseLock(Path(sys.argv[1]), lease_s=1.0)
lock.acquire()
with lock._guard(wait_s=5.0):  # the heartbeat's critical section, where a freeze can land
    print("held guarded", flush=True)
    time.sleep(60)
"""


def test_lock_timeout_honoured_while_guard_is_frozen(tmp_path, holders):
    path = tmp_path / "h.lock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", GUARD_HOLDER, str(path)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holders.procs.append(proc)
    assert Holders.readline(proc, timeout=30).startswith("held")
    os.kill(proc.pid, signal.SIGSTOP)
    outcome: list = []
    waiter = LeaseLock(path, lease_s=1.0)

    def attempt():
        try:
            waiter.acquire(timeout_s=1.0)
            outcome.append("acquired")
        except TimeoutError:
            outcome.append("timeout")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(4.0)  # lease 1 s + timeout 1 s, with slack
    finished = bool(outcome)
    os.kill(proc.pid, signal.SIGKILL)  # frees the flock so the thread can finish
    t.join(10)
    if outcome == ["acquired"]:
        waiter.release()
    assert finished, "acquire(timeout_s=1.0) was still blocked after 4 s"


def test_content_digest_follows_bytes_not_location(tmp_path):
    """Stage keys hold content_digest of local inputs (sft data, chat-eval dir): moving data keeps the key."""
    from model.files import sha256_file
    from tasks.store import content_digest

    data = tmp_path / "a" / "data"
    (data / "sub").mkdir(parents=True)
    (data / "x.jsonl").write_text('{"messages": []}\n')
    (data / "sub" / "y.jsonl").write_text("y\n")
    assert content_digest(str(data / "x.jsonl")) == sha256_file(data / "x.jsonl")
    before = content_digest(str(data))
    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    data.rename(moved)
    assert content_digest(str(moved)) == before
    (moved / "sub" / "y.jsonl").write_text("z\n")
    assert content_digest(str(moved)) != before
    assert content_digest("hf://datasets/openai/gsm8k") == "hf://datasets/openai/gsm8k"  # a URL is its own identity
    with pytest.raises(FileNotFoundError, match="fix"):
        content_digest(str(tmp_path / "missing"))


def test_content_hash_covers_what_was_computed_not_how_the_run_went(tmp_path):
    """Volatile files and the volatile fields of JSON files are listed and size-checked but left out of the
    content hash; a change to anything else changes it."""
    def build(art: Path, seconds: float, log: str, weights: bytes) -> dict:
        art.mkdir(parents=True, exist_ok=True)
        (art / "model.pt").write_bytes(weights)
        (art / "log.txt").write_text(log)
        atomic_write_json(art / "summary.json", {"min_val_bpb": 3.0, "total_training_time": seconds,
                                                 "user_config": {"out_dir": str(art), "depth": 4}})
        return write_manifest(art, stage="pretrain", key="k", metrics={}, store_root=tmp_path, started_at=time.time(),
                              volatile=("log.txt",))

    a = build(tmp_path / "a", 10.0, "took 10 s", b"w")
    b = build(tmp_path / "b", 12.5, "took 12.5 s", b"w")
    assert a["content_sha256"] == b["content_sha256"]
    assert set(read_manifest(tmp_path / "b")["files"]) == {"model.pt", "log.txt", "summary.json"}
    assert build(tmp_path / "c", 10.0, "took 10 s", b"W")["content_sha256"] != a["content_sha256"]
    atomic_write_json(tmp_path / "a" / "summary.json", {"min_val_bpb": 2.9, "total_training_time": 10.0,
                                                        "user_config": {"out_dir": "x", "depth": 4}})
    changed = write_manifest(tmp_path / "a", stage="pretrain", key="k", metrics={}, store_root=tmp_path,
                             started_at=time.time(), volatile=("log.txt",))
    assert changed["content_sha256"] != b["content_sha256"]  # a metric of the weights is content

