"""Each preset's run history, kept in the store, and the trend the report shows from it.

Every report that is built appends one line to `<store>/history/<preset>.jsonl`, written with one O_APPEND
write and fsynced, so runs that finish together never interleave: the commit, date, preset, hardware and
world size, the leaderboard numbers, the regression verdict, and which pretraining the numbers come from
(`pretrain_key`, `pretrain_sha256`: the pretrain artifact's key and content hash; `run_identity`: what the
flow knew of that pretraining before any stage ran, tasks/report.py `run_identity`). A report rebuilt over
the same pretraining with the same numbers and verdict appends nothing (`is_repeat`): a rerun is not a new run.

The report shows the last TREND_RUNS runs of the same preset on the same hardware and world size (only like
is compared with like) as a table and a PNG (min val bpb and training time per run, the commits on the x
axis), and publishes the table as a Prefect table artifact under a stable key, so the UI's artifact page
shows the trend night after night. The regression verdict (tasks/verdict.py) compares a run with the recent
passing runs of its kind (`comparable_runs`); `history_digest` is what the report's cache key holds of the history.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from model.files import jsonl_rows
from tasks.plots import save_png, two_panels

HISTORY_FIELDS = ("commit", "date", "preset", "hardware", "world_size", "total_training_time", "min_val_bpb",
                  "core_metric", "chatcore", "tok_per_sec", "mfu", "verdict")
RUN_FIELDS = ("pretrain_key", "pretrain_sha256", "run_identity")  # which pretraining an entry's numbers come from
LIKE = ("preset", "hardware", "world_size")  # only runs alike in these are compared
TREND_RUNS = 10


def history_path(store_root: str | Path, preset: str) -> Path:
    return Path(store_root) / "history" / f"{preset}.jsonl"


def append_history(store_root: str | Path, summary: dict, verdict: str | None, run: dict | None = None) -> dict:
    """Append this run's entry to its preset's history, unless it repeats the last entry of the same
    pretraining (`is_repeat`); returns the entry. `run`: the RUN_FIELDS (absent ones are null)."""
    entry = {field: summary.get(field) for field in HISTORY_FIELDS}
    entry.update({field: (run or {}).get(field) for field in RUN_FIELDS})
    entry.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), verdict=verdict)
    if is_repeat(read_history(store_root, summary["preset"]), entry):
        return entry
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
    return [entry for _, entry in jsonl_rows(lines, skip_invalid=True)]  # a line torn by a crash mid-write: skipped


def is_repeat(history: list[dict], entry: dict) -> bool:
    """Whether the last entry of the same pretraining (content hash) already says all `entry` says of the run.

    A report rebuilt over a cached pretraining (a rerun after the history or the report code changed) re-reports
    the same numbers: appending them again would count one run twice in the trend, and would change the
    history digest other runs' report keys hold, so their reruns would rebuild and append in turn, forever.
    """
    if entry.get("pretrain_sha256") is None:
        return False  # no pretraining to tell runs apart (a run stopped before it): every report is its own run
    same = [e for e in history if e.get("pretrain_sha256") == entry["pretrain_sha256"]]
    return bool(same) and _measured(same[-1]) == _measured(entry)


def _measured(entry: dict) -> dict:
    """What an entry says of its run: all but when it was reported and how the pretraining was named (an edit
    that changes no bits renames it, key and identity, without making a new run)."""
    return {k: v for k, v in entry.items() if k not in ("date", "pretrain_key", "run_identity")}


def alike(entry: dict, like: dict) -> bool:
    """Same preset, hardware and world size (LIKE): only such runs are compared."""
    return all(entry.get(k) == like.get(k) for k in LIKE)


def trend(history: list[dict], like: dict, runs: int = TREND_RUNS) -> list[dict]:
    """The last `runs` entries of the same preset, hardware and world size as `like`, oldest first."""
    same = [e for e in history if alike(e, like)]
    return same[-runs:]


def comparable_runs(history: list[dict], like: dict, runs: int) -> list[dict]:
    """The last `runs` passing runs alike to `like` (LIKE), one per pretraining, none of `like`'s own
    pretraining, oldest first: what a run's numbers are compared with.

    A run's own pretraining must not vote for itself (a cached rerun re-reports its numbers). Runs are told
    apart by the pretrain artifact's content hash, not its key: a nightly that refreshes an unchanged recipe
    trains anew under the same key, and that is a new measurement worth comparing with.
    """
    own = like.get("pretrain_sha256")
    latest: dict = {}  # pretrain content hash (or the entry's position, without one) -> its latest entry
    for i, e in enumerate(history):
        if e.get("verdict") != "pass" or not alike(e, like):
            continue
        if own is not None and e.get("pretrain_sha256") == own:
            continue
        latest.pop(e.get("pretrain_sha256") or i, None)  # re-inserted: dict order follows the latest entry
        latest[e.get("pretrain_sha256") or i] = e
    return list(latest.values())[-runs:]


def history_digest(history: list[dict], preset: str, identity: str) -> str:
    """sha256 of the passing entries of `preset` not of the pretraining `identity` describes: what the report's
    cache key holds of the history (tasks/report.py `history_section`).

    Read when the flow starts, before the run's hardware and pretrain artifact are known, so it covers every
    hardware and leaves out this run's entries by identity (its config and code). Any passing entry of another
    run that could join the comparison changes it (the history only grows), so a cached report is never served
    with a stale history verdict; this run's own entries leave it unchanged, so a rerun stays Cached.
    """
    others = [e for e in history if e.get("preset") == preset and e.get("verdict") == "pass"
              and e.get("run_identity") != identity]
    return hashlib.sha256("".join(json.dumps(e, sort_keys=True) + "\n" for e in others).encode()).hexdigest()


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
