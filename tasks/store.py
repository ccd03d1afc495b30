"""The content-addressed artifact store: stage keys, manifests, validation and a lease lock.

Layout under the store root (`runtime.store`):

    stages/<stage>/<key>/        one artifact: finished files + manifest.json (written last) + work/
    shards/<source-hash>/        pretraining shards, shared by every run that reads the same source
    prefect-results/             Prefect's cache records (see tasks/cache.py)
    locks/                       lease locks, one per artifact being built

A stage key (tasks/stages.py: Stage.key) is the sha256 of canonical JSON of: stage name, stage format version,
the config the stage reads, the upstream artifacts' content hashes and a fingerprint of the code it runs.
A directory without a valid manifest is not an artifact. Writes go to temp paths and are renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from model.files import atomic_write_bytes, sha256_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
WORK = "work"
MANIFEST_FORMAT = 2  # 2: content_sha256 leaves out volatile files and JSON fields


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(source: str) -> str:
    """What a stage key holds for an input named by path: the sha256 of a local file's bytes, or of a local
    directory's (relative path, sha256) listing, so moving the data elsewhere keeps the key and editing it
    changes the key. A URL or hub name is its own identity and comes back unchanged."""
    if "://" in source and not source.startswith("file://"):
        return source
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        listing = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
                   if p.is_file() and not p.name.startswith(".")}
        return sha256_bytes(canonical_json(listing))
    raise FileNotFoundError(f"{source} does not exist; fix: point the config at an existing file or directory")


def atomic_write_json(path: Path, obj) -> None:
    """An artifact's JSON form (indented, keys sorted, a trailing newline), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @property
    def results_dir(self) -> Path:
        return self.root / "prefect-results"

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def shards_dir(self, source: str) -> Path:
        return self.root / "shards" / sha256_bytes(source.encode())[:16]

    def lock(self, stage: str, key: str, lease_s: float = 120.0, owner: str = "", log=None) -> "LeaseLock":
        return LeaseLock(self.root / "locks" / f"{stage}-{key}.lock", lease_s=lease_s, owner=owner, log=log)


# ---------------------------------------------------------------------------------------------
# manifests

def environment_info() -> dict:
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "prefect": _version("prefect"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def git_commit(root: Path = PROJECT_ROOT) -> dict:
    """{"sha", "short", "dirty"} of the checkout, or nulls outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"sha": sha, "short": sha[:7], "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "short": None, "dirty": None}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _listed_files(art: Path) -> list[Path]:
    return sorted(p for p in art.rglob("*") if p.is_file() and p.name != MANIFEST
                  and p.relative_to(art).parts[0] != WORK and not _is_temp_file(p))


def _is_temp_file(p: Path) -> bool:
    """The hidden `.<name>.<hex>.tmp` files model/files.py atomic_write uses; an artifact's own `x.tmp` files count."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


# Fields of an artifact's JSON files that record how or when it was built, never what it computed: timings,
# throughput, where the run wrote and read, its wandb run. They stay in the files but not in the content hash.
VOLATILE_JSON_KEYS = frozenset({
    "total_training_time", "timed_steps", "tok_per_sec", "mfu", "peak_memory_mib", "elapsed_s", "train_seconds",
    "out_dir", "data_dir", "tokenizer_dir", "bundle_dir", "checkpoint_dir", "chat_eval_dir",
    "run", "wandb_mode", "wandb_id", "wandb_group", "wandb_dir", "save_every", "keep_checkpoints", "resume", "resume_from_step", "attention_reason",
})


def _without_volatile(obj):
    if isinstance(obj, dict):
        return {k: _without_volatile(v) for k, v in obj.items() if k not in VOLATILE_JSON_KEYS}
    if isinstance(obj, list):
        return [_without_volatile(v) for v in obj]
    return obj


def content_sha256_of(path: Path) -> str:
    """What a file contributes to its artifact's content hash: its bytes' sha256, or for a JSON object file
    the sha256 of its canonical JSON without VOLATILE_JSON_KEYS."""
    if path.suffix == ".json":
        try:
            return sha256_bytes(canonical_json(_without_volatile(json.loads(path.read_text()))))
        except (ValueError, UnicodeDecodeError):
            pass
    return sha256_file(path)


def write_manifest(art: Path, **fields) -> dict:
    """build_manifest, then write it as the artifact's last file; returns the artifact's record."""
    manifest = build_manifest(art, **fields)
    atomic_write_json(art / MANIFEST, manifest)
    return artifact_record(art, fields["store_root"], manifest)


def build_manifest(art: Path, *, stage: str, key: str, metrics: dict, refs: dict[str, Path] | None = None,
                   store_root: Path, started_at: float, extra: dict | None = None,
                   volatile: tuple[str, ...] = ()) -> dict:
    """Hash the artifact's files (and referenced files elsewhere in the store) into its manifest.

    Every file is listed with its size and sha256. The `content_sha256` downstream stages key on covers only
    what the stage computed: files matching a `volatile` glob (logs, timing records, wandb directories) and
    the volatile fields of JSON files are left out, so a rebuild that reproduces the same outputs gives
    downstream stages the same keys.
    """
    files = {p.relative_to(art).as_posix(): {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns,
                                             "sha256": sha256_file(p)} for p in _listed_files(art)}
    outputs = {rel: content_sha256_of(art / rel) for rel in files
               if not any(fnmatch.fnmatch(rel, pattern) for pattern in volatile)}
    ref_entries = {}
    for name, path in sorted((refs or {}).items()):
        st = path.stat()
        ref_entries[name] = {"path": path.relative_to(store_root).as_posix(), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    content = {"files": outputs, "refs": {k: v["sha256"] for k, v in ref_entries.items()}}
    finished = time.time()
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "key": key,
        "content_sha256": sha256_bytes(canonical_json(content)),
        "files": files,
        "refs": ref_entries,
        "metrics": metrics,
        "environment": {**environment_info(), **(extra or {})},
        "timings": {"started_at": _iso(started_at), "finished_at": _iso(finished), "seconds": finished - started_at},
    }
    return manifest


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def read_manifest(art: Path) -> dict | None:
    try:
        manifest = json.loads((art / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _changed(path: Path, meta: dict, verify: bool) -> str | None:
    """Why a file no longer matches its manifest entry, or None. Files whose size and mtime are unchanged are
    trusted unless `verify`; any other file is re-hashed (a same-size edit changes the mtime)."""
    if not path.is_file():
        return "is missing"
    st = path.stat()
    if st.st_size != meta["size"]:
        return f"has size {st.st_size}, the manifest says {meta['size']}"
    if (verify or st.st_mtime_ns != meta.get("mtime_ns")) and sha256_file(path) != meta["sha256"]:
        return "has other bytes than when the artifact was built (sha256)"
    return None


def check_artifact(art: Path, store_root: Path, verify: bool = False) -> str | None:
    """None if `art` is a valid artifact, else the reason. Files are present with their sizes; those whose
    mtime changed are re-hashed; `verify` re-hashes every file (`--verify`)."""
    manifest = read_manifest(art)
    if manifest is None:
        return f"no valid {MANIFEST} in {art}"
    for rel, meta in manifest["files"].items():
        problem = _changed(art / rel, meta, verify)
        if problem:
            return f"{rel} {problem}"
    for meta in manifest["refs"].values():
        problem = _changed(store_root / meta["path"], meta, verify)
        if problem:
            return f"referenced {meta['path']} {problem}"
    return None


def artifact_record(art: Path, store_root: Path, manifest: dict | None = None) -> dict:
    """What a stage returns (and Prefect caches): its `path` relative to the store root, so a moved store's
    records still hold; the flow joins it with the store it runs against."""
    manifest = manifest or read_manifest(art)
    if manifest is None:
        raise FileNotFoundError(f"{art} has no valid {MANIFEST}")
    return {"stage": manifest["stage"], "key": manifest["key"], "path": art.relative_to(store_root).as_posix(),
            "content_sha256": manifest["content_sha256"], "metrics": manifest["metrics"]}


# ---------------------------------------------------------------------------------------------
# lease lock

@dataclass
class LeaseLock:
    """A lock file with a lease that its holder renews from a heartbeat thread.

    A holder that dies stops renewing: after `lease_s` anyone may take the lock over. On the same host a
    holder whose pid no longer exists (SIGKILL, OOM) is taken over at once. The read-check-write of the
    lock file itself is serialised by a short flock on a guard file, which the kernel releases if its
    owner dies. Works across hosts on a shared filesystem through the lease alone.
    """

    path: Path
    lease_s: float = 120.0
    poll_s: float = 0.25
    owner: str = ""  # who holds it, for whoever waits (e.g. the Prefect flow run)
    announce_every_s: float = 60.0
    log: object = None  # where `with lock:` says whom it waits for (a logger's info method)
    # The holder id is also the fencing token: unique per acquisition, checked by fenced() before every commit.
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _since: float = 0.0

    def acquire(self, timeout_s: float | None = None, log=None) -> None:
        """Take the lock, waiting for a live holder; `log` hears who holds it at once and every
        `announce_every_s` while this waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        announced = None
        while True:
            current = None
            try:
                with self._guard(wait_s=self.poll_s):
                    current = self._read()
                    if current is None or self._stale(current):
                        self._since = time.time()
                        self._write()
                        break
            except _GuardBusy:
                pass  # someone is mid-update (or frozen inside the guard): just another round
            if log and current and (announced is None or time.monotonic() - announced >= self.announce_every_s):
                log(f"waiting for {self.path.name}: held by {describe_holder(current)}")
                announced = time.monotonic()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.path} is held by {(current or {}).get('holder', 'another process')}")
            time.sleep(self.poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease:{self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            with self._guard(wait_s=self.lease_s):
                current = self._read()
                if current is not None and current.get("holder") == self.holder:
                    self.path.unlink(missing_ok=True)
        except _GuardBusy:
            pass  # the guard is wedged; our lease simply runs out

    def __enter__(self) -> "LeaseLock":
        self.acquire(log=self.log)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self._guard(wait_s=self.lease_s / 6):
                    current = self._read()
                    if current is None or current.get("holder") != self.holder:
                        return  # taken over (we must have stalled past the lease); nothing to renew
                    self._write()
            except _GuardBusy:
                continue  # try again at the next beat; the lease still has 2/3 of its length to run

    @contextlib.contextmanager
    def fenced(self):
        """Around a commit (writing a manifest, moving a build into place): holds the guard, so nobody can take
        the lock over meanwhile, and raises LeaseLost if this holder no longer owns it (it stalled past its
        lease, SIGSTOP or a VM pause, and someone else took over): a stale holder never commits."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._guard(wait_s=self.lease_s))
            except _GuardBusy:
                raise LeaseLost(f"{self.path}: could not check the lease (its guard stayed busy); not committing") \
                    from None
            current = self._read()
            if current is None or current.get("holder") != self.holder:
                raise LeaseLost(f"{self.path}: this run ({self.holder}) lost its lease and "
                                f"{describe_holder(current) if current else 'nobody'} holds it now; not committing")
            if current.get("expires", 0) < time.time():
                raise LeaseLost(f"{self.path}: this run's lease ran out at {_iso(current['expires'])} (it stalled); "
                                "not committing")
            yield

    @contextlib.contextmanager
    def _guard(self, wait_s: float):
        """A short exclusive flock around read-check-write of the lock file; never waits past `wait_s`."""
        with open(self.path.with_name(self.path.name + ".guard"), "a+") as g:
            give_up = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > give_up:
                        raise _GuardBusy() from None
                    time.sleep(0.01)
            try:
                yield
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"holder": "unreadable", "expires": 0}  # a torn write of a dead holder: stale

    def _write(self) -> None:
        atomic_write_json(self.path, {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                                      "owner": self.owner, "since": self._since, "lease_s": self.lease_s,
                                      "expires": time.time() + self.lease_s})

    @staticmethod
    def _stale(info: dict) -> bool:
        if info.get("expires", 0) < time.time():
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _pid_alive(info["pid"])
        return False


def describe_holder(info: dict) -> str:
    """'flow run X (host h, pid 12) since <time>, lease until <time>' from a lock file's contents."""
    who = info.get("owner") or info.get("holder", "another process")
    since = f" since {_iso(info['since'])}" if info.get("since") else ""
    return (f"{who} (host {info.get('host', '?')}, pid {info.get('pid', '?')}){since}, lease until "
            f"{_iso(info.get('expires', 0))}")


class LeaseLost(RuntimeError):
    """This holder's lease ran out or was taken over: it must not commit what it built."""


class _GuardBusy(Exception):
    """The guard flock stayed taken for longer than the caller will wait."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) still answers kill(0); it holds nothing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return sys.platform != "linux"
