"""The SFT data loader: BOS-aligned best-fit packing of rendered conversations, with padding (docs/evaluation.md#sft-loader).

Each rank walks the conversation dataset with stride W (rank r renders conversations r, r+W, ...,
wrapping around and counting epochs), keeps a buffer of ~100 rendered (ids, mask) pairs, and fills
every row of T+1 tokens by repeatedly taking the LONGEST buffered conversation that still fits (the
earliest one on ties). When none fits, the rest of the row is padded with BOS under mask 0 and the
row ends. Unlike pretraining packing, a conversation is never cropped: each one is trained on whole
or not at all. Every row therefore starts with BOS (each rendered conversation does, and so does
padding).

Targets are the row shifted by one, set to -1 (ignored by the loss) wherever the mask of the target
token is 0 (user turns, BOS, <|assistant_start|>, tool outputs, padding) and, for padded rows, from
the last content position on.

A conversation longer than T+1 tokens can never be placed: it stays in the buffer for good
(docs/evaluation.md#sft-loader). Once the whole buffer is such conversations no row can hold anything; the loader
then raises (`on_stall="error"`, for a run that needs to reach the end of the data) or yields rows
made only of padding (`on_stall="pad"`, for runs bounded by a step count, and validation).

`state_dict()` holds everything that decides the next batches (cursor, consumed, epoch, the
buffered conversations), so a loader rebuilt with `state=` continues with exactly the same batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from model.chat_render import render_conversation

DEFAULT_BUFFER_SIZE = 100  # rendered conversations the best-fit choice looks at
RENDER_MAX_TOKENS = 2048  # render_conversation truncates every conversation to this many tokens
STATE_FORMAT = 1


class ConversationTokenizer(Protocol):
    """What model/chat_render.py needs from a tokenizer, plus the vocabulary size."""

    def encode(self, text: str) -> list[int]: ...
    def encode_special(self, text: str) -> int: ...
    def get_bos_token_id(self) -> int: ...
    def get_vocab_size(self) -> int: ...


class LoaderStalled(RuntimeError):
    """Every buffered conversation is longer than a row: no row can ever hold a conversation again."""


def best_fit_index(lengths: Sequence[int], remaining: int) -> int:
    """Index of the longest length <= remaining (the earliest of equally long ones), or -1 if none fits."""
    best, best_len = -1, 0
    for i, n in enumerate(lengths):
        if best_len < n <= remaining:  # strictly longer only: the earliest tie wins
            best, best_len = i, n
            if n == remaining:  # nothing fits better
                break
    return best


def pack_conversation_rows(
    buffer: list[tuple[list[int], list[int]]],
    B: int,
    T: int,
    bos_token_id: int,
    refill: Callable[[], None] | None = None,
    on_place: Callable[[], None] | None = None,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Pack B rows of T+1 tokens by best fit with padding; `buffer` is mutated in place.

    Before every pick `refill()` (if given) tops the buffer up; `on_place()` is called once per
    placed conversation. Returns (rows, mask rows, content lengths); a row's content length is
    T+1 unless it was padded.
    """
    if B < 1 or T < 1:
        raise ValueError(f"need B >= 1 and T >= 1, got B={B}, T={T}")
    capacity = T + 1
    rows, masks, content_lengths = [], [], []
    for _ in range(B):
        row: list[int] = []
        mask: list[int] = []
        while len(row) < capacity:
            if refill is not None:
                refill()
            remaining = capacity - len(row)
            best = best_fit_index([len(ids) for ids, _ in buffer], remaining)
            if best < 0:  # nothing fits: pad with BOS (never supervised) and end the row
                break
            ids, conv_mask = buffer.pop(best)
            row.extend(ids)
            mask.extend(conv_mask)
            if on_place is not None:
                on_place()
        content_lengths.append(len(row))
        pad = capacity - len(row)
        rows.append(row + [bos_token_id] * pad)
        masks.append(mask + [0] * pad)
    return rows, masks, content_lengths


def rows_to_batch(rows: list[list[int]], masks: list[list[int]], content_lengths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs int32 B x T, targets int64 B x T) with -1 where the target is not supervised."""
    row_t = torch.tensor(rows, dtype=torch.int64)
    mask_t = torch.tensor(masks, dtype=torch.int8)
    inputs = row_t[:, :-1].to(torch.int32)
    targets = row_t[:, 1:].clone()
    targets[mask_t[:, 1:] == 0] = -1
    capacity = row_t.size(1)
    for i, length in enumerate(content_lengths):
        if length < capacity:  # a padded row: nothing from its last content position on is a target
            targets[i, max(length - 1, 0):] = -1
    return inputs, targets


class SFTLoader:
    """Micro-batches (inputs, targets) of one rank over a conversation dataset.

    `dataset` is anything with len() and [i] -> conversation dict (e.g. model.chat_data.TaskMixture).
    Progress attributes: `consumed` (conversations placed, counted over all ranks: starts at rank,
    += W per placement), `epoch` (from 1; +1 each time this rank's cursor wraps), `approx_progress`
    = consumed / len(dataset), `exhausted` once consumed >= len(dataset).
    """

    def __init__(self, dataset, tokenizer: ConversationTokenizer, B: int, T: int, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", buffer_size: int = DEFAULT_BUFFER_SIZE,
                 max_tokens: int = RENDER_MAX_TOKENS, on_stall: str = "error", name: str = "train",
                 state: dict[str, Any] | None = None):
        if B < 1 or T < 1:
            raise ValueError(f"need B >= 1 and T >= 1, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if on_stall not in ("error", "pad"):
            raise ValueError(f"on_stall must be 'error' or 'pad', got {on_stall!r}")
        self.dataset_size = len(dataset)
        if self.dataset_size < world_size:
            raise ValueError(f"the {name} conversations ({self.dataset_size}) are fewer than the ranks ({world_size}); "
                             "fix: give more conversations (--data) or run on fewer ranks")
        self.dataset, self.tokenizer, self.name = dataset, tokenizer, name
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.device = torch.device(device)
        self.buffer_size, self.max_tokens, self.on_stall = buffer_size, max_tokens, on_stall
        self.bos_token_id = tokenizer.get_bos_token_id()
        self.cursor, self.consumed, self.epoch = rank, rank, 1
        self.batches = 0  # micro-batches yielded so far
        self.buffer: list[tuple[list[int], list[int]]] = []
        self._warned_stall = False
        if state is not None:
            self.load_state_dict(state)

    # --- progress ---------------------------------------------------------------------------------

    @property
    def approx_progress(self) -> float:
        return self.consumed / self.dataset_size

    @property
    def exhausted(self) -> bool:
        return self.consumed >= self.dataset_size

    # --- iteration --------------------------------------------------------------------------------

    def _render(self, index: int) -> tuple[list[int], list[int]]:
        try:
            ids, mask = render_conversation(self.tokenizer, self.dataset[index], max_tokens=self.max_tokens)
        except ValueError as exc:
            raise ValueError(f"{self.name} conversation {index}: {exc}") from exc
        if len(ids) != len(mask) or not ids:
            raise ValueError(f"{self.name} conversation {index}: rendering gave {len(ids)} ids and {len(mask)} mask values")
        return ids, mask

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._render(self.cursor))
            self.cursor += self.world_size
            if self.cursor >= self.dataset_size:
                self.cursor %= self.dataset_size
                self.epoch += 1

    def _placed(self) -> None:
        self.consumed += self.world_size

    def _check_stall(self) -> None:
        """A full buffer of which nothing fits an empty row will never change again."""
        self._refill()
        capacity = self.T + 1
        if any(len(ids) <= capacity for ids, _ in self.buffer):
            return
        shortest = min(len(ids) for ids, _ in self.buffer)
        message = (f"{self.name} loader stalled: all {len(self.buffer)} buffered conversations are longer than a row "
                   f"(max_seq_len + 1 = {capacity} tokens; the shortest has {shortest}), and conversations are "
                   f"never cropped, so no row can hold one again")
        if self.on_stall == "error":
            raise LoaderStalled(message + "; fix: raise --max-seq-len (conversations are rendered to at most "
                                f"{self.max_tokens} tokens), use shorter conversations, or bound the run with "
                                "--num-iterations")
        if not self._warned_stall:
            warnings.warn(message + "; from here on its rows are padding only", RuntimeWarning, stacklevel=3)
            self._warned_stall = True

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_stall()
        rows, masks, lengths = pack_conversation_rows(self.buffer, self.B, self.T, self.bos_token_id,
                                                      refill=self._refill, on_place=self._placed)
        self.batches += 1
        inputs, targets = rows_to_batch(rows, masks, lengths)
        if self.device.type != "cpu":
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
        return inputs, targets

    # --- state --------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_size": self.dataset_size, "B": self.B, "T": self.T, "rank": self.rank,
                "world_size": self.world_size, "buffer_size": self.buffer_size, "max_tokens": self.max_tokens,
                "vocab_size": self.tokenizer.get_vocab_size(), "bos_token_id": self.bos_token_id}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/strs and CPU tensors (torch.load(weights_only=True) reads it)."""
        lengths = np.array([len(ids) for ids, _ in self.buffer], dtype=np.int64)
        ids = np.array([t for ids, _ in self.buffer for t in ids], dtype=np.int32)
        masks = np.array([m for _, mask in self.buffer for m in mask], dtype=np.int8)
        return {"format": STATE_FORMAT, **self._identity(), "cursor": self.cursor, "consumed": self.consumed,
                "epoch": self.epoch, "batches": self.batches, "buffer_lengths": torch.from_numpy(lengths),
                "buffer_ids": torch.from_numpy(ids), "buffer_masks": torch.from_numpy(masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an SFTLoader state (format {found!r}, expected {STATE_FORMAT})")
        for key, ours in self._identity().items():
            if state.get(key) != ours:
                raise ValueError(f"SFT loader state does not fit this loader: {key} is {state.get(key)!r} in the state "
                                 f"but {ours!r} here (resume with the same data, batch size, sequence length, "
                                 "world size and tokenizer)")
        lengths = state["buffer_lengths"].tolist()
        ids, masks = state["buffer_ids"].tolist(), state["buffer_masks"].tolist()
        if sum(lengths) != len(ids) or len(ids) != len(masks) or any(n < 1 for n in lengths):
            raise ValueError("SFT loader state: buffer lengths do not match its tokens")
        cursor = int(state["cursor"])
        if not 0 <= cursor < self.dataset_size:
            raise ValueError(f"SFT loader state: cursor {cursor} outside the {self.dataset_size} conversations")
        bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        self.buffer = [(ids[a:b], masks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        self.cursor, self.consumed, self.epoch = cursor, int(state["consumed"]), int(state["epoch"])
        self.batches = int(state["batches"])
