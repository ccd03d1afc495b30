"""Files written atomically, directories made durable, files hashed, JSONL read: the one copy of each for model/
and tasks/.

- atomic_write(path, write): `write(f)` fills a hidden temp file beside `path` (`.<name>.<hex>.tmp`, the
  pattern tasks/store.py leaves out of an artifact's content), which is fsynced and renamed over `path`:
  readers see the old file or the complete new one, never a partial write, and a failure leaves no temp file.
  atomic_write_bytes / atomic_write_text write a value that way (tasks/store.py atomic_write_json: an
  artifact's JSON form).
- fsync_dir(directory, required=False): make the renames inside `directory` durable (best effort unless
  required: some filesystems refuse).
- sha256_file(path): the hex sha256 of a file's bytes, read in 1 MiB blocks.
- jsonl_rows(lines, skip_invalid=False): (line number, value) of each non-blank JSON line; an invalid line
  raises JsonlError naming it, or is skipped where a torn last line is expected (a log being appended to).

Standard library only, so the orchestrator (tasks/) imports it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(f)` on a temp file beside it, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: str | os.PathLike, required: bool = False) -> None:
    """Make the renames inside `directory` durable. A filesystem that cannot open or fsync a directory is skipped,
    unless `required` (a checkpoint's completion marker must not be written over renames that may be lost)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        if required:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if required:
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class JsonlError(ValueError):
    """A line of a JSONL text that is not valid JSON: `line_number` (from 1) and the parser's `msg`."""

    def __init__(self, line_number: int, msg: str):
        self.line_number, self.msg = line_number, msg
        super().__init__(f"line {line_number}: invalid JSON ({msg})")


def jsonl_rows(lines: Iterable[str], skip_invalid: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line. An invalid line raises JsonlError, or with
    `skip_invalid` is passed over: a line torn by a crash mid-append, or one still being written."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as e:
            if not skip_invalid:
                raise JsonlError(line_number, e.msg) from None
