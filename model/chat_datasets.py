"""The chat datasets' rows: from local files or the Hugging Face hub, memoised, in the reference's shuffled order.

Data comes through the `datasets` library, either from the hub (`data_dir=None`, the reference datasets;
needs the network on first use) or from local files laid out like `../shared/data/chat_eval`:

    arc/ARC-Easy-test.jsonl, arc/ARC-Challenge-test.jsonl   ai2_arc fields
    mmlu/test.jsonl (+ dev.jsonl, ...)                       cais/mmlu fields
    gsm8k/test.jsonl, gsm8k/train.jsonl                      openai/gsm8k fields
    humaneval/HumanEval.jsonl                                openai_humaneval fields

Every dataset is shuffled with seed 42 when loaded, with the permutation
`numpy.random.default_rng(42).permutation(n)`, which is the row order of the reference's
`datasets.Dataset.shuffle(seed=42)`; slicing applies after the shuffle. The `datasets`
cache goes to `$HF_DATASETS_CACHE` (read at call time) or the library default, and loads
are memoised per process, so building a Task twice is cheap. Local data standing in for a hub split is
divided into train/val by `held_out_order`. The Tasks over these rows are in model/chat_data.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

SHUFFLE_SEED = 42

def _cache_dir() -> str | None:
    # Read per call: `datasets` reads the variable once at import, tests and stages set it later.
    return os.environ.get("HF_DATASETS_CACHE") or None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or error logs while converting small local files: one bar per rank is
    noise, and a file `datasets` cannot read is reported by our own error naming the line."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=32)
def _load_local_cached(path: str, mtime_ns: int, size: int, cache_dir: str | None):
    import datasets

    builder = "parquet" if path.endswith(".parquet") else "json"
    with _quiet():
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)


def load_local_file(path: str | os.PathLike):
    """A local .jsonl/.json/.parquet file as a `datasets.Dataset` (memoised per file version)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    stat = path.stat()
    return _load_local_cached(str(path), stat.st_mtime_ns, stat.st_size, _cache_dir())


@functools.lru_cache(maxsize=16)
def _load_hub_cached(repo_id: str, subset: str | None, split: str, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(repo_id, subset, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown split, hub errors: say what was asked and the way out
        raise RuntimeError(
            f"could not load {repo_id} (subset {subset}, split {split}) from the Hugging Face hub: "
            f"{type(e).__name__}: {e}. Without network, pass local copies instead (data_dir=... in the "
            f"layout of ../shared/data/chat_eval, or SFT --data FILE.jsonl)"
        ) from e


def load_hub_dataset(repo_id: str, subset: str | None, split: str):
    return _load_hub_cached(repo_id, subset, split, _cache_dir())


# Where each task's data lives: hub (repo, subset) and local file pattern under data_dir.
HUB_REPOS = {
    "ARC": "allenai/ai2_arc",
    "MMLU": "cais/mmlu",
    "GSM8K": "openai/gsm8k",
    "HumanEval": "openai/openai_humaneval",
    "SmolTalk": "HuggingFaceTB/smol-smoltalk",
}


def dataset_source(task: str, subset: str | None, split: str, data_dir: str | os.PathLike | None) -> tuple:
    """("hub", repo_id, subset, split) or ("local", path) for one task's data."""
    if data_dir is None:
        return ("hub", HUB_REPOS[task], subset, split)
    data_dir = Path(data_dir)
    if task == "ARC":
        path = data_dir / "arc" / f"{subset}-{split}.jsonl"
    elif task == "MMLU":
        # Subjects are filtered out of the split file; "auxiliary_train" is its own file.
        path = data_dir / "mmlu" / ("auxiliary_train.jsonl" if subset == "auxiliary_train" else f"{split}.jsonl")
    elif task == "GSM8K":
        path = data_dir / "gsm8k" / (f"{split}.jsonl" if subset == "main" else f"{subset}-{split}.jsonl")
    elif task == "HumanEval":
        path = data_dir / "humaneval" / "HumanEval.jsonl"
    else:
        raise ValueError(f"{task} has no local layout; give its files to sft_mixture(data=[...]) instead")
    return ("local", path)


def load_rows(task: str, subset: str | None, split: str, data_dir):
    source = dataset_source(task, subset, split, data_dir)
    if source[0] == "hub":
        return load_hub_dataset(*source[1:])
    path = source[1]
    if not path.is_file():
        raise FileNotFoundError(
            f"{task} {subset or ''} {split}: {path} not found. The local chat-eval layout is that of "
            f"../shared/data/chat_eval (see its README); pass data_dir=None to use the Hugging Face hub"
        )
    return load_local_file(path)


class ShuffledRows:
    """Rows of a dataset (optionally a subset of them, by index) in seed-42 shuffled order."""

    def __init__(self, dataset, indices: Sequence[int] | None = None, seed: int = SHUFFLE_SEED):
        self.dataset = dataset
        base = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.order = base[np.random.default_rng(seed).permutation(len(base))]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.order[i])]


def held_out_order(total: int, split: str, what: str) -> np.ndarray:
    """Row indices of one split of `total` local rows: the seed-42 permutation (the order of
    ShuffledRows) with its LAST max(1, total // 50) positions held out as `val`, the rest `train`.
    Deterministic and disjoint; `what` names the data in errors."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if total < 2:
        raise ValueError(f"{what} hold(s) {total} row(s); need at least 2 for a train/val split")
    n_val = max(1, total // 50)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(total)
    return order[total - n_val:] if split == "val" else order[: total - n_val]


class HeldOutRows(ShuffledRows):
    """The train or val part (see `held_out_order`) of a local file standing in for a hub split."""

    def __init__(self, dataset, split: str, what: str):
        self.dataset = dataset
        self.order = held_out_order(len(dataset), split, what)


def load_source_file(task: str, path, split: str, columns: Sequence[str]) -> HeldOutRows:
    """A local file in `task`'s hub row format, split train/val by `held_out_order`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{task} source file {path} not found; fix: point it at an existing .jsonl/.parquet file "
                         f"of {task} rows ({', '.join(columns)})")
    dataset = load_local_file(path)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: {task} rows need the fields {list(columns)}, missing {missing} "
                         f"(columns: {dataset.column_names}); fix: give a file in the {task} row format")
    return HeldOutRows(dataset, split, str(path))
