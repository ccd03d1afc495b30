"""The SFT conversations (docs/evaluation.md#sft-data-mixture): SmolTalk, local conversation files, and the training mixture.

`sft_mixture(split)` is the reference hub mixture (SmolTalk + MMLU auxiliary_train x mmlu_epochs + GSM8K
train x gsm8k_epochs; val = SmolTalk test + MMLU test[:5200] + GSM8K test[:420]), or local conversation
files in its place (`data=`), or the hub mixture with single sources replaced by local files in their own
row format (`sources=`). Local data is split into train/val by `chat_datasets.held_out_order` (seed-42
shuffle, the last max(1, n // 50) rows held out), so the two never overlap. The tasks themselves are in
model/chat_data.py, the loading and the shuffles in model/chat_datasets.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from model.chat_data import GSM8K, MMLU, Task, TaskMixture
from model.chat_datasets import ShuffledRows, held_out_order, load_local_file, load_rows
from model.chat_render import ConversationError, check_conversation
from model.files import JsonlError, jsonl_rows

def check_training_conversation(conversation: dict, where: str) -> None:
    """A training conversation: valid chat format with at least one assistant reply."""
    try:
        messages = check_conversation(conversation)
    except ConversationError as e:
        raise ConversationError(f"{where}: {e}") from None
    if len(messages) < 2:
        raise ConversationError(f"{where}: a training conversation needs a user message and an assistant reply")


class SmolTalk(Task):
    """HuggingFaceTB/smol-smoltalk (hub only): general conversations, split train or test."""

    def __init__(self, split: str = "train", **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.split = split
        self.rows = ShuffledRows(load_rows("SmolTalk", None, split, None))

    def get_example(self, index: int) -> dict:
        conversation = {"messages": self.rows[index]["messages"]}
        check_training_conversation(conversation, f"SmolTalk {self.split} example {index}")
        if any(not isinstance(m["content"], str) for m in conversation["messages"]):
            raise ConversationError(f"SmolTalk {self.split} example {index}: every content must be a string")
        return conversation


def _row_labels(path: Path, count: int) -> list[str]:
    """'file:line' for each row of a jsonl file (blank lines are skipped by the reader);
    'file:row N' (1-based) for parquet."""
    if path.suffix == ".parquet":
        return [f"{path.name}:row {i + 1}" for i in range(count)]
    with open(path, "rb") as f:
        lines = [n for n, line in enumerate(f, start=1) if line.strip()]
    return [f"{path.name}:{n}" for n in lines] if len(lines) == count else [f"{path.name}:row {i + 1}" for i in range(count)]


def _load_conversation_file(path: Path):
    """(rows, labels): rows indexable to {"messages": [...]}, each validated up front."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} not found")
    try:
        rows = load_local_file(path)
    except Exception as e:
        if path.suffix == ".parquet":
            raise ValueError(f"{path}: cannot read as parquet: {e}") from e
        rows = _parse_jsonl_strict(path)  # names the bad line, or copes with mixed content types
    if len(rows) == 0:
        raise ValueError(f"{path}: no conversations")
    labels = _row_labels(path, len(rows))
    if not isinstance(rows, list) and "messages" not in rows.column_names:
        raise ConversationError(f"{labels[0]}: rows have no 'messages' key (columns: {rows.column_names})")
    for i, messages in enumerate(_messages_column(rows)):
        if messages is None:
            raise ConversationError(f"{labels[i]}: row has no 'messages' key")
        check_training_conversation({"messages": messages}, labels[i])
    return rows, labels


def _messages_column(rows) -> Iterator:
    """Every row's messages, in bounded memory for a large `datasets.Dataset`."""
    if isinstance(rows, list):
        yield from (row.get("messages") for row in rows)
        return
    for batch in rows.select_columns(["messages"]).iter(batch_size=4096):
        yield from batch["messages"]


def _parse_jsonl_strict(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, row in jsonl_rows(f):
                if not isinstance(row, dict):
                    raise ConversationError(f"{path.name}:{n}: a row must be a JSON object with a 'messages' list")
                rows.append(row)
        except JsonlError as e:
            raise ConversationError(f"{path.name}:{e.line_number}: not valid JSON ({e.msg}); {path}") from None
    return rows


class LocalConversations(Task):
    """Conversations of local jsonl/parquet files (rows `{"messages": [...]}`), one split of them.

    Held-out val split (deterministic, disjoint from train): all files' rows are concatenated in
    the order given, permuted with numpy.random.default_rng(42); the LAST max(1, n // 50)
    positions of that permutation (2 %) are `val`, the rest `train`, each in permutation order.
    Every row is validated at load; errors name `file:line`. Examples carry `source` = `file:line`.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], split: str = "train", **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if isinstance(paths, (str, os.PathLike)) or not paths:
            raise ValueError("paths must be a non-empty list of .jsonl/.parquet files")
        self.files = [_load_conversation_file(Path(p)) for p in paths]
        offsets = np.cumsum([0] + [len(rows) for rows, _ in self.files])
        self.order = held_out_order(int(offsets[-1]), split, str([str(p) for p in paths]))
        self.offsets = offsets
        self.split = split

    def num_examples(self) -> int:
        return len(self.order)

    def get_example(self, index: int) -> dict:
        g = int(self.order[index])
        f = int(np.searchsorted(self.offsets, g, side="right")) - 1
        rows, labels = self.files[f]
        r = g - int(self.offsets[f])
        return {"messages": rows[r]["messages"], "source": labels[r]}


SFT_SOURCES = ("smoltalk", "mmlu", "gsm8k")


def check_sft_sources(sources: dict | None) -> dict[str, Path]:
    """{name: path} of the mixture sources replaced by local files; ValueError naming the fix."""
    checked = {}
    for name, path in (sources or {}).items():
        if name not in SFT_SOURCES:
            raise ValueError(f"unknown SFT source {name!r}; fix: replace one of {', '.join(SFT_SOURCES)}")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"SFT source {name}: {path} not found; fix: point {name} at an existing "
                             f".jsonl/.parquet file, or drop it to use the hub dataset")
        if path.suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"SFT source {name}: {path} has type {path.suffix!r}; fix: use a .jsonl or .parquet file")
        checked[name] = path
    return checked


def sft_mixture(split: str, data: Sequence[str | os.PathLike] | None = None, mmlu_epochs: int = 3,
                gsm8k_epochs: int = 4, sources: dict[str, str | os.PathLike] | None = None) -> TaskMixture:
    """The SFT conversations of one split ("train" | "val").

    data=None: the reference hub mixture: train = SmolTalk train + MMLU
    auxiliary_train x mmlu_epochs + GSM8K main train x gsm8k_epochs; val = SmolTalk test + MMLU
    test[:5200] + GSM8K test[:420]. data=[files]: those local conversation files, split into
    train/val as `LocalConversations` says (the epoch counts do not apply).

    sources={"smoltalk" | "mmlu" | "gsm8k": file}: that source of the hub mixture comes from a
    local file in its own row format (smoltalk: {"messages"} conversations, mmlu: {question,
    subject, choices, answer}, gsm8k: {question, answer}), rendered as the hub rows are. Its
    train part is the file minus the `held_out_order` val tail (epoch counts still apply), its
    val part that tail (with the same 5200/420 caps); unreplaced sources keep the hub, for val
    too, even at 0 epochs. `data` and `sources` exclude each other.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    local = check_sft_sources(sources)
    if data is not None:
        if local:
            raise ValueError("data replaces the whole mixture, sources one part of it; fix: give one or the other")
        return TaskMixture([LocalConversations(list(data), split)])
    for name, epochs in (("mmlu_epochs", mmlu_epochs), ("gsm8k_epochs", gsm8k_epochs)):
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"{name} must be an int >= 0, got {epochs!r}")
    smoltalk_path, mmlu_path, gsm8k_path = (local.get(name) for name in SFT_SOURCES)
    if split == "train":
        smoltalk = LocalConversations([smoltalk_path], "train") if smoltalk_path else SmolTalk("train")
        mmlu = MMLU("auxiliary_train", "train", path=mmlu_path)
        gsm8k = GSM8K("main", "train", path=gsm8k_path)
        return TaskMixture([smoltalk] + [mmlu] * mmlu_epochs + [gsm8k] * gsm8k_epochs)
    smoltalk = LocalConversations([smoltalk_path], "val") if smoltalk_path else SmolTalk("test")
    mmlu = MMLU("all", "val", path=mmlu_path, stop=5200) if mmlu_path else MMLU("all", "test", stop=5200)
    gsm8k = GSM8K("main", "val", path=gsm8k_path, stop=420) if gsm8k_path else GSM8K("main", "test", stop=420)
    return TaskMixture([smoltalk, mmlu, gsm8k])
