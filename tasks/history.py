"""Each preset's run history, kept in the store, and the trend the report shows from it.

Every report that is built appends one line to `<store>/history/<preset>.jsonl`, written with one O_APPEND
write and fsynced, so runs that finish together never interleave: the commit, date, preset, hardware and
world size, the leaderboard numbers and the regression verdict. The report shows the last TREND_RUNS runs of
the same preset on the same hardware and world size (only like is compared with like) as a table and a PNG
(min val bpb and training time per run, the commits on the x axis), and publishes the table as a Prefect
table artifact under a stable key, so the UI's artifact page shows the trend night after night.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tasks.plots import save_png, two_panels

HISTORY_FIELDS = ("commit", "date", "preset", "hardware", "world_size", "total_training_time", "min_val_bpb",
                  "core_metric", "chatcore", "tok_per_sec", "mfu", "verdict")
TREND_RUNS = 10


def history_path(store_root: str | Path, preset: str) -> Path:
    return Path(store_root) / "history" / f"{preset}.jsonl"


def append_history(store_root: str | Path, summary: dict, verdict: str | None) -> dict:
    """Append this run's entry to its preset's history; returns the entry."""
    entry = {field: summary.get(field) for field in HISTORY_FIELDS}
    entry.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), verdict=verdict)
    path = history_path(store_root, summary["preset"])
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: appends from several runs never interleave
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read_history(store_root: str | Path, preset: str) -> list[dict]:
    try:
        lines = history_path(store_root, preset).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash mid-write: skipped, the rest stands
    return entries


def trend(history: list[dict], like: dict, runs: int = TREND_RUNS) -> list[dict]:
    """The last `runs` entries of the same preset, hardware and world size as `like`, oldest first."""
    same = [e for e in history if all(e.get(k) == like.get(k) for k in ("preset", "hardware", "world_size"))]
    return same[-runs:]


def trend_rows(entries: list[dict]) -> list[dict]:
    """The trend as table rows (the report's table and the Prefect table artifact)."""
    def rounded(value, digits):
        return None if value is None else round(value, digits)

    return [{"date": e["date"], "commit": e.get("commit") or "-", "min_val_bpb": rounded(e.get("min_val_bpb"), 6),
             "core_metric": rounded(e.get("core_metric"), 4), "chatcore": rounded(e.get("chatcore"), 4),
             "training_hours": rounded((e.get("total_training_time") or 0) / 3600, 4),
             "tok_per_sec": rounded(e.get("tok_per_sec"), 0), "mfu": rounded(e.get("mfu"), 2),
             "verdict": e.get("verdict") or "-"} for e in entries]


def trend_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return ["no runs recorded yet"]
    header = list(rows[0])
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join("-" if r[h] is None else str(r[h]) for h in header) + " |" for r in rows])


def plot_trend(rows: list[dict], path: Path, title: str) -> None:
    """min val bpb and training time per run, commits on the x axis; written atomically."""
    labels = [f"{r['commit']}\n{r['date'][5:10]}" for r in rows]
    fig, (a, b) = two_panels()
    a.plot(labels, [r["min_val_bpb"] for r in rows], marker="o")
    b.plot(labels, [r["training_hours"] * 60 for r in rows], marker="o")
    a.set_ylabel("min val bpb")
    b.set_ylabel("training time (min)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    save_png(fig, path, title)
