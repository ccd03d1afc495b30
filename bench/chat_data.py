"""Benchmark: loading a chat-eval task from local files, and walking all its rows.

MMLU `all`/`test` (14042 rows) from a directory laid out like shared/data/chat_eval: the first load
(JSONL to an Arrow-backed dataset), a second load (memoised in the process), and rendering every row's
answer letter. Prints one JSON object with the three times in seconds and the row count.

    python -m bench.chat_data                          # ../shared/data/chat_eval beside the repo
    python -m bench.chat_data --data-dir DIR

On 2 shared CPU cores: 0.2 s for the first load, 0.3 ms memoised, 0.3 s for all rows when quiet; 1.8 s,
0.4 ms and 0.8 s while other jobs ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model import chat_data as cd

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat_eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    start = time.perf_counter()
    task = cd.MMLU("all", "test", args.data_dir)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cd.MMLU("all", "test", args.data_dir)
    memoised = time.perf_counter() - start
    start = time.perf_counter()
    letters = [task[i]["messages"][1]["content"] for i in range(len(task))]
    walked = time.perf_counter() - start
    print(json.dumps({"rows": len(letters), "first_load_s": first, "memoised_load_s": memoised, "walk_s": walked}))


if __name__ == "__main__":
    main()
