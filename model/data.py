"""Pretraining data: the parquet shards of the text corpus.

A shard is a parquet file named ``shard_XXXXX.parquet`` holding one string column, ``text``,
one document per row, in row groups of (nominally) 1024 documents (docs/model.md#pretraining-data). This module
names shards, checks that a file really is a readable shard, iterates over their documents
and finds a run's train/val shard files. The packing loader over them is
model/dataloader.py.

Torch-free on purpose: the downloader and the tokenizer stage run in the orchestrating process,
which should not pay for importing torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SHARD_NAME = "shard_{index:05d}.parquet"
TEXT_COLUMN = "text"


def shard_filename(index: int) -> str:
    """File name of shard ``index``, five-digit zero-padded: ``shard_00042.parquet``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return SHARD_NAME.format(index=index)


class CorruptShardError(ValueError):
    """A file that should be a shard cannot be used as one (unreadable, wrong schema, empty)."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"corrupt shard {self.path}: {reason}")


@dataclass(frozen=True)
class ShardStats:
    """What reading a whole shard found: documents, row groups and Unicode characters."""

    num_rows: int
    num_row_groups: int
    num_chars: int


def validate_shard(path: str | os.PathLike[str]) -> ShardStats:
    """Read every row group of a shard's ``text`` column and return its statistics.

    The whole column is decoded, not only the footer, because a download that was garbled in
    the middle still has a valid footer; only decompressing every page (and checking that the
    strings are valid UTF-8) finds it. This costs about as much as one pass of the tokenizer's
    reader (a few ms per MB of parquet). Raises ``CorruptShardError`` naming the file and the
    problem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorruptShardError(path, "file does not exist")
    if os.path.getsize(path) == 0:
        raise CorruptShardError(path, "file is empty (0 bytes)")
    try:
        with pq.ParquetFile(path) as parquet:
            return _read_all_text(path, parquet)
    except CorruptShardError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        # ArrowInvalid (bad footer, bad thrift), OSError (zstd "data corruption detected",
        # unexpected end of stream) are what pyarrow raises for damaged bytes.
        raise CorruptShardError(path, f"cannot be decoded as parquet: {exc}") from exc


def _read_all_text(path: str, parquet: pq.ParquetFile) -> ShardStats:
    schema = parquet.schema_arrow
    if TEXT_COLUMN not in schema.names:
        raise CorruptShardError(
            path, f"no '{TEXT_COLUMN}' column (columns: {', '.join(schema.names) or 'none'})"
        )
    text_type = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise CorruptShardError(path, f"column '{TEXT_COLUMN}' has type {text_type}, not string")
    metadata = parquet.metadata
    if metadata.num_rows < 1:
        raise CorruptShardError(path, "has no rows")

    num_rows = 0
    num_chars = 0
    for rg in range(metadata.num_row_groups):
        column = parquet.read_row_group(rg, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
        # Full validation checks UTF-8 and offsets: garbage that happened to decompress
        # (or an uncompressed shard with overwritten bytes) fails here.
        column.validate(full=True)
        expected = metadata.row_group(rg).num_rows
        if len(column) != expected:
            raise CorruptShardError(
                path, f"row group {rg} decoded {len(column)} rows, footer says {expected}"
            )
        if column.null_count:
            raise CorruptShardError(path, f"row group {rg} has {column.null_count} null texts")
        num_rows += len(column)
        num_chars += pc.sum(pc.utf8_length(column)).as_py() or 0
    return ShardStats(
        num_rows=num_rows, num_row_groups=metadata.num_row_groups, num_chars=num_chars
    )


def iter_row_group_texts(
    paths: Iterable[str | os.PathLike[str]], start: int = 0, step: int = 1
) -> Iterator[list[str]]:
    """Yield the documents of row groups ``start, start+step, ...`` of each file, in order.

    One list per row group (the reference's ``parquets_iter_batched``); with ``start=rank`` and
    ``step=world_size`` ranks read disjoint, interleaved row groups.
    """
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    for path in paths:
        with pq.ParquetFile(os.fspath(path)) as parquet:
            for rg in range(start, parquet.metadata.num_row_groups, step):
                table = parquet.read_row_group(rg, columns=[TEXT_COLUMN])
                yield table.column(TEXT_COLUMN).to_pylist()


def iter_documents(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Yield every document of every file, in file order then row order."""
    for texts in iter_row_group_texts(paths):
        yield from texts


def row_group_sizes(path: str | os.PathLike[str]) -> list[int]:
    """Number of documents in each row group of a shard, from the parquet footer alone."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} not found (run the shards stage / check the shards artifact)")
    with pq.ParquetFile(path) as parquet:
        metadata = parquet.metadata
        return [metadata.row_group(rg).num_rows for rg in range(metadata.num_row_groups)]


def read_row_group_texts(path: str | os.PathLike[str], row_group: int) -> list[str]:
    """The documents of one row group of a shard."""
    with pq.ParquetFile(os.fspath(path)) as parquet:
        table = parquet.read_row_group(row_group, columns=[TEXT_COLUMN])
    return table.column(TEXT_COLUMN).to_pylist()


# --- the pretraining loader (docs/model.md#data-loader) ------------------------------------------------------


SHARD_INDEX_FILE = "shards.json"


def read_shard_paths(data_dir: str | os.PathLike[str]) -> tuple[list[Path], Path]:
    """(train shard paths in order, val shard path) of a shards artifact or of a plain shard directory.

    A shards artifact lists them in ``shards.json`` (paths relative to the artifact). In a plain
    directory of ``shard_*.parquet`` files every file but the last is train and the last is val.
    """
    directory = Path(data_dir)
    index_file = directory / SHARD_INDEX_FILE
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        return [(directory / p).resolve() for p in index["train"]], (directory / index["val"]).resolve()
    files = sorted(p for p in directory.glob("shard_*.parquet") if p.is_file())
    if len(files) < 2:
        raise FileNotFoundError(
            f"{directory} holds neither {SHARD_INDEX_FILE} nor at least two shard_*.parquet files (train + val); "
            "fix: run the shards stage (python -m flows.speedrun ...) or point --data-dir at a shards artifact")
    return files[:-1], files[-1]
