"""The BOS-aligned best-fit packing loader for pretraining, with an exact resumable state (docs/model.md#data-loader).

Documents stream from the shards' row groups, are tokenised with BOS prepended and packed into rows
of T+1 tokens: each row takes the longest buffered document that fits, and when none fits it crops the
shortest one to fill the row (no padding; documents are never split across rows). ``BestFitLoader``
serves micro-batches from one or more data *streams* (stream s reads row groups s, s+S, ... of every
file), so one process owning streams [0, 1] yields exactly what two ranks owning one stream each
yield: gradient accumulation and data parallelism see the same data. ``state_dict()`` captures each
stream's cursor and buffered tokens, so a resumed loader continues with the very next batch.
``pack_rows`` is the pure packing step; ``val_loader`` the fresh-per-evaluation validation loader.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from model.data import CorruptShardError, read_row_group_texts, row_group_sizes

DEFAULT_BUFFER_SIZE = 1000  # documents the packing buffer holds before each pick
DEFAULT_SLICE_DOCS = 128  # documents tokenised per refill
STATE_FORMAT = 1


class TokenizerLike(Protocol):
    def encode(self, text: list[str], prepend: int | None = ..., num_threads: int = ...) -> list[list[int]]: ...
    def get_bos_token_id(self) -> int: ...
    def get_vocab_size(self) -> int: ...


@dataclass
class LoaderStats:
    """Token utilisation of the packing so far (all owned streams together).

    Every document popped from a buffer is counted in ``documents_consumed`` and its tokens
    (BOS included) in ``tokens_consumed``; of those, ``tokens_cropped`` were thrown away
    (the tails of cropped documents). So ``tokens_consumed == tokens_cropped + batches*B*(T+1)``;
    ``tokens_yielded`` counts the ``B*T`` input tokens of each batch.
    """

    batches: int = 0
    tokens_yielded: int = 0
    documents_consumed: int = 0
    tokens_consumed: int = 0
    tokens_cropped: int = 0

    @property
    def cropped_fraction(self) -> float:
        """Share of the consumed document tokens that were cropped away (0 before any batch)."""
        return self.tokens_cropped / self.tokens_consumed if self.tokens_consumed else 0.0


def pack_rows(
    doc_buffer: list[list[int]],
    B: int,
    T: int,
    *,
    refill: Callable[[], list[list[int]]] | None = None,
    buffer_size: int = 0,
    stats: LoaderStats | None = None,
) -> list[list[int]]:
    """Pack ``B`` rows of ``T + 1`` tokens from ``doc_buffer`` by best fit.

    Before each pick, while the buffer holds fewer than ``buffer_size`` documents, the documents
    ``refill()`` returns are appended to it. A pick takes the longest document that fits the
    rest of the row (the earliest of equally long ones) whole; when none fits, the shortest
    document (the earliest of equally short ones) is cropped to fill the row and its tail is
    thrown away. Picked documents are removed from ``doc_buffer`` (it is mutated in place);
    ``stats``, if given, is updated. Without ``refill`` an exhausted buffer is a ValueError.
    """
    if B < 1 or T < 1:
        raise ValueError(f"need B >= 1 and T >= 1, got B={B}, T={T}")
    capacity = T + 1
    rows = []
    for _ in range(B):
        row: list[int] = []
        while len(row) < capacity:
            if refill is not None:
                while len(doc_buffer) < buffer_size:
                    documents = refill()
                    if not documents:
                        raise RuntimeError("the document source returned no documents")
                    doc_buffer.extend(documents)
            if not doc_buffer:
                raise ValueError(f"document buffer ran out after {len(rows)} full rows")
            remaining = capacity - len(row)
            best, best_len = -1, 0
            for i, doc in enumerate(doc_buffer):
                n = len(doc)
                if best_len < n <= remaining:  # strictly longer only: the earliest tie wins
                    best, best_len = i, n
                    if n == remaining:  # nothing can fit better; the first such doc is the pick
                        break
            if best >= 0:
                doc = doc_buffer.pop(best)
                row.extend(doc)
                cropped = 0
            else:  # every document is longer than the rest of the row
                shortest = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                doc = doc_buffer.pop(shortest)  # min() returns the earliest of equal minima
                if not doc:
                    raise ValueError("empty document in the packing buffer (documents start with BOS)")
                row.extend(doc[:remaining])
                cropped = len(doc) - remaining
            if stats is not None:
                stats.documents_consumed += 1
                stats.tokens_consumed += len(doc)
                stats.tokens_cropped += cropped
        rows.append(row)
    return rows


def stage_rows(rows: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
    """Packed rows (B x (T+1)) as one new 2 x B x T int64 tensor: [0] inputs, [1] targets."""
    B, capacity = rows.shape
    staged = torch.empty((2, B, capacity - 1), dtype=torch.int64, pin_memory=pin_memory)
    staged[0].copy_(rows[:, :-1])
    staged[1].copy_(rows[:, 1:])
    return staged


class _Stream:
    """One data stream: a cursor over its row groups and its packing buffer.

    Stream ``s`` of ``N`` reads row groups ``s, s+N, s+2N, ...`` of each file in order, then
    starts over at the first file in the next epoch. The cursor (file index, row group, epoch,
    offset) always points at the next unread document.
    """

    def __init__(self, paths: list[str], row_counts: list[list[int]], stream: int, num_streams: int):
        self.paths = paths
        self.row_counts = row_counts
        self.stream = stream
        self.num_streams = num_streams
        self.file_index, self.row_group, self.epoch, self.offset = 0, stream, 1, 0
        self.buffer: list[list[int]] = []
        self._cached: tuple[int, int, list[str]] | None = None  # (file index, row group, texts)
        self._normalize()

    def _normalize(self) -> None:
        """Move the cursor past exhausted row groups and files (the stream is never empty)."""
        while True:
            counts = self.row_counts[self.file_index]
            if self.row_group < len(counts):
                if self.offset < counts[self.row_group]:
                    return
                self.row_group += self.num_streams
                self.offset = 0
            else:
                self.file_index += 1
                self.row_group, self.offset = self.stream, 0
                if self.file_index == len(self.paths):
                    self.file_index = 0
                    self.epoch += 1

    def next_texts(self, max_docs: int) -> list[str]:
        """Up to ``max_docs`` next documents; a slice never spans two row groups."""
        key = (self.file_index, self.row_group)
        if self._cached is None or self._cached[:2] != key:
            path = self.paths[self.file_index]
            texts = read_row_group_texts(path, self.row_group)
            expected = self.row_counts[self.file_index][self.row_group]
            if len(texts) != expected:
                raise CorruptShardError(
                    path, f"row group {self.row_group} has {len(texts)} rows, footer says {expected}"
                )
            self._cached = (*key, texts)
        texts = self._cached[2][self.offset : self.offset + max_docs]
        self.offset += len(texts)
        self._normalize()
        if (self.file_index, self.row_group) != key:
            self._cached = None
        return texts

    def state_dict(self) -> dict[str, Any]:
        lengths = np.fromiter((len(doc) for doc in self.buffer), dtype=np.int64, count=len(self.buffer))
        tokens = np.fromiter(
            itertools.chain.from_iterable(self.buffer), dtype=np.int32, count=int(lengths.sum())
        )
        return {
            "stream": self.stream,
            "file_index": self.file_index,
            "row_group": self.row_group,
            "epoch": self.epoch,
            "offset": self.offset,
            "buffer_tokens": torch.from_numpy(tokens),
            "buffer_lengths": torch.from_numpy(lengths),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        file_index, row_group, epoch, offset = (int(state[k]) for k in ("file_index", "row_group", "epoch", "offset"))
        if not (
            0 <= file_index < len(self.paths)
            and row_group % self.num_streams == self.stream
            and 0 <= row_group < len(self.row_counts[file_index])
            and 0 <= offset < self.row_counts[file_index][row_group]
            and epoch >= 1
        ):
            raise ValueError(
                f"loader state for stream {self.stream} points at a document that does not exist here: "
                f"file {file_index}, row group {row_group}, offset {offset}, epoch {epoch}"
            )
        tokens, lengths = state["buffer_tokens"], state["buffer_lengths"]
        if int(lengths.sum()) != tokens.numel() or bool((lengths < 1).any()):
            raise ValueError(f"loader state for stream {self.stream}: buffer lengths do not match its tokens")
        flat = tokens.tolist()
        bounds = np.concatenate([[0], np.cumsum(lengths.numpy())]).tolist()
        self.buffer = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.file_index, self.row_group, self.epoch, self.offset = file_index, row_group, epoch, offset
        self._cached = None


class BestFitLoader:
    """BOS-aligned best-fit packing over the row groups of ``paths`` (docs/model.md#data-loader), exactly resumable.

    ``next(loader)`` returns ``(inputs, targets)``, int64 ``B x T`` on ``device``, where micro-batch
    ``k`` is packed from stream ``streams[k % len(streams)]``, each stream with its own buffer.
    So with ``num_streams=2`` a loader owning streams ``[0, 1]`` yields the interleaving of what
    the loaders owning ``[0]`` and ``[1]`` yield: one process with gradient accumulation sees the
    batches of two ranks. Every row starts with BOS and is whole documents, the last one possibly
    cropped. Each call returns fresh tensors (never views into a buffer the next call
    overwrites), so batches may be kept.

    ``state_dict()`` captures everything that decides the next batches (per stream the cursor
    of the next unread document and the tokens in its buffer, plus the micro-batch counter);
    a loader built with ``state=`` that dict yields exactly what this one would have yielded next.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        paths: Sequence[str | os.PathLike[str]],
        B: int,
        T: int,
        *,
        streams: Sequence[int],
        num_streams: int,
        device: str | torch.device = "cpu",
        state: dict[str, Any] | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        slice_docs: int = DEFAULT_SLICE_DOCS,
        tokenizer_threads: int = 4,
    ):
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError(
                "no pretraining shards given to the loader: run the shards stage first "
                "(or check that the shards artifact holds shard_*.parquet files)"
            )
        if B < 1 or T < 1:
            raise ValueError(f"need B >= 1 and T >= 1, got B={B}, T={T}")
        if buffer_size < 1 or slice_docs < 1 or tokenizer_threads < 1:
            raise ValueError(
                f"buffer_size ({buffer_size}), slice_docs ({slice_docs}) and tokenizer_threads "
                f"({tokenizer_threads}) must be >= 1"
            )
        self.streams = [int(s) for s in streams]
        if num_streams < 1 or not self.streams or len(set(self.streams)) != len(self.streams):
            raise ValueError(
                f"need num_streams >= 1 and distinct streams, got streams={self.streams}, num_streams={num_streams}"
            )
        if any(not 0 <= s < num_streams for s in self.streams):
            raise ValueError(f"streams {self.streams} must lie in [0, {num_streams})")
        self.tokenizer = tokenizer
        self.B, self.T, self.num_streams = B, T, num_streams
        self.device = torch.device(device)
        self.buffer_size, self.slice_docs, self.tokenizer_threads = buffer_size, slice_docs, tokenizer_threads
        self.bos_token_id = tokenizer.get_bos_token_id()
        self.files = [os.path.basename(p) for p in self.paths]
        self.row_counts = [row_group_sizes(p) for p in self.paths]
        for s in self.streams:
            if not any(n > 0 for counts in self.row_counts for n in counts[s::num_streams]):
                most = max(len(counts) for counts in self.row_counts)
                raise ValueError(
                    f"data stream {s} of {num_streams} gets no documents: no file has a non-empty row group "
                    f"{s}, {s + num_streams}, ... (the files have at most {most} row groups; use fewer streams "
                    "or more/larger shards)"
                )
        self._streams = [_Stream(self.paths, self.row_counts, s, num_streams) for s in self.streams]
        self.step = 0  # micro-batches yielded so far
        self.stats = LoaderStats()
        if state is not None:
            self.load_state_dict(state)

    # --- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> BestFitLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        stream = self._streams[self.step % len(self._streams)]
        rows = pack_rows(
            stream.buffer,
            self.B,
            self.T,
            refill=lambda: self._tokenize_next(stream),
            buffer_size=self.buffer_size,
            stats=self.stats,
        )
        self.step += 1
        self.stats.batches += 1
        self.stats.tokens_yielded += self.B * self.T
        return self._to_device(np.array(rows, dtype=np.int64))

    def _tokenize_next(self, stream: _Stream) -> list[list[int]]:
        texts = stream.next_texts(self.slice_docs)
        return self.tokenizer.encode(texts, prepend=self.bos_token_id, num_threads=self.tokenizer_threads)

    def _to_device(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # One [inputs | targets] staging tensor and one copy per batch; on CUDA the staging tensor
        # is pinned and the copy asynchronous. It is new each time (PyTorch's caching host
        # allocator does not hand pinned memory out again before the copy reading it has
        # finished), so a returned batch is never overwritten by a later one.
        on_cuda = self.device.type == "cuda"
        staged = stage_rows(torch.from_numpy(rows), pin_memory=on_cuda)
        if on_cuda:
            staged = staged.to(self.device, non_blocking=True)
        elif staged.device != self.device:
            staged = staged.to(self.device)
        return staged[0], staged[1]

    @property
    def cropped_fraction(self) -> float:
        return self.stats.cropped_fraction

    @property
    def epochs(self) -> list[int]:
        """Per owned stream, the epoch (from 1) of the next document it will read."""
        return [stream.epoch for stream in self._streams]

    # --- state ----------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What a saved state must agree on to be resumed by this loader."""
        return {
            "B": self.B,
            "T": self.T,
            "streams": list(self.streams),
            "num_streams": self.num_streams,
            "files": list(self.files),
            "row_groups": [len(counts) for counts in self.row_counts],
            "buffer_size": self.buffer_size,
            "slice_docs": self.slice_docs,
            "vocab_size": self.tokenizer.get_vocab_size(),
            "bos_token_id": self.bos_token_id,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, ints, strs and CPU tensors: ``torch.load(weights_only=True)`` reads it."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "step": self.step,
            "stats": asdict(self.stats),
            "stream_states": [stream.state_dict() for stream in self._streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a BestFitLoader state (format {found!r}, expected {STATE_FORMAT})")
        for key, ours in self._identity().items():
            saved = state.get(key)
            if saved != ours:
                raise ValueError(
                    f"loader state does not fit this loader: {key} is {_brief(saved)} in the state "
                    f"but {_brief(ours)} here (resume with the same B, T, streams, num_streams, shard "
                    "files, buffer_size, slice_docs and tokenizer)"
                )
        stream_states = state["stream_states"]
        if [int(s["stream"]) for s in stream_states] != self.streams:
            raise ValueError("loader state: its per-stream states do not match its streams")
        for stream, stream_state in zip(self._streams, stream_states):
            stream.load_state_dict(stream_state)
        self.step = int(state["step"])
        self.stats = LoaderStats(**{k: int(v) for k, v in state["stats"].items()})


def _brief(value: Any) -> str:
    """A value for an error message; long lists shortened."""
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:3]))}, ..., {value[-1]!r}] ({len(value)} items)"
    return repr(value)


def val_loader(
    tokenizer: TokenizerLike,
    val_path: str | os.PathLike[str],
    B: int,
    T: int,
    rank: int,
    world_size: int,
    device: str | torch.device = "cpu",
    num_streams: int | None = None,
) -> BestFitLoader:
    """A fresh loader over the val shard for one evaluation.

    Build a new one for every evaluation so each sees the same first batches. The shard is split into
    ``num_streams`` streams (default: one per rank); rank ``r`` owns streams ``r, r + world_size, ...``,
    so any world size that divides ``num_streams`` evaluates the same tokens.
    """
    num_streams = num_streams or world_size
    return BestFitLoader(tokenizer, [val_path], B, T, streams=list(range(rank, num_streams, world_size)),
                         num_streams=num_streams, device=device)
