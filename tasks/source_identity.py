"""What an external input holds, for a stage key: content for local files, the server's version for remote ones.

A stage that reads from outside the store (the shards stage from `data.source`, the eval_bundle stage from
`base_eval.bundle`, sft and chat_eval from local data files) must be keyed by *what the source holds*, not by
its path or URL, or a replaced file would still come back `Cached`:

- a **local file** (a plain path or `file://`) is identified by its sha256. `HashCache` remembers each file's
  sha256 by (path, size, mtime_ns) in `<store>/cache/sha256.json`, so a rerun over gigabytes of shards stats
  them instead of re-reading them; `verify=True` (the flow's `--verify`, or `--refresh` of the stage) re-reads;
- a **local directory** by the (relative path, sha256) of every file in it;
- a **remote file** (http(s), s3, gs, ... through fsspec) by the version its server reports: ETag, checksum
  headers, Last-Modified or generation, with the size and URL (`remote_version`). A server that reports none
  of these cannot say whether a file changed without sending it: `remote_version` returns None and the caller
  fetches it and uses the sha256 of what arrived.

Plain Python (no Prefect).
"""

from __future__ import annotations

import json
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from model.files import sha256_file
from tasks.store import atomic_write_json

HASH_CACHE_FILE = Path("cache") / "sha256.json"
# fs.info() fields that change when a remote object's bytes change, across fsspec's filesystems (HTTP headers,
# S3, GCS, Azure). The size is recorded too but never trusted alone.
VERSION_FIELDS = ("ETag", "etag", "Content-MD5", "Digest", "md5Hash", "crc32c", "content_md5", "VersionId",
                  "generation", "Last-Modified", "LastModified", "last_modified", "updated", "mtime")


class HashCache:
    """sha256 of local files, remembered by (resolved path, size, mtime_ns); stored under the store root.

    The file is only a cache: a lost or unreadable one costs a re-hash, and two runs that save at once keep
    both their entries (each merges what is on disk before writing)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = self._load()
        self.changed: dict[str, dict] = {}

    @classmethod
    def for_store(cls, store_root: str | Path) -> "HashCache":
        return cls(Path(store_root) / HASH_CACHE_FILE)

    def _load(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def sha256(self, file: Path, verify: bool = False) -> str:
        """The file's sha256, from the cache when its size and mtime are those recorded (unless `verify`)."""
        file = Path(file).resolve()
        st = file.stat()
        entry = self.entries.get(str(file))
        if not verify and entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["sha256"]
        digest = sha256_file(file)
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.entries[str(file)] = self.changed[str(file)] = entry
        return digest

    def remember(self, file: Path, sha256: str) -> None:
        """Record the sha256 of a file just written (computed while writing it)."""
        file = Path(file).resolve()
        st = file.stat()
        self.entries[str(file)] = self.changed[str(file)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                             "sha256": sha256}

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        merged = {**self._load(), **self.changed}
        atomic_write_json(self.path, merged)
        self.entries, self.changed = merged, {}


def is_local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def local_path(source: str) -> Path:
    return Path(source.removeprefix("file://")).expanduser()


def local_identity(path: Path, cache: HashCache, verify: bool = False) -> dict:
    """A local file's {"size", "sha256"}, or a directory's {"files": {relative path: sha256}} (dot files skipped)."""
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": cache.sha256(path, verify)}
    if path.is_dir():
        return {"files": {p.relative_to(path).as_posix(): cache.sha256(p, verify) for p in sorted(path.rglob("*"))
                          if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}}
    raise FileNotFoundError(f"{path} does not exist; fix: point the config at an existing file or directory")


def remote_version(url: str, fs=None, path: str | None = None) -> dict | None:
    """{"url", "size", <version fields>} from the server's metadata for `url`, or None when it reports no version.

    `fs`/`path`: an fsspec filesystem already set up for `url` (timeouts); by default fsspec's own.
    Raises FileNotFoundError when the server says the object does not exist."""
    if fs is None:
        fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        raise ValueError(f"{url} is local: use local_identity")
    info = fs.info(path)
    version = {name: str(info[name]) for name in VERSION_FIELDS if info.get(name)}
    if not version:
        return None
    return {"url": url, "size": info.get("size"), **version}
