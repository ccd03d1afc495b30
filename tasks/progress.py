"""Training progress in the Prefect UI while pretrain or sft runs (a nightly's pretraining takes hours).

`TrainingProgress` wraps a training stage's torchrun call: a Prefect progress artifact (percent of the planned
steps) and a markdown artifact (step, loss, val bpb so far, tok/s, MFU, ETA), refreshed every `every_s` from
the run's metrics.jsonl — the numbers the trainer writes, never parsed from log text. Publishing is best
effort: an API hiccup is logged once and never fails the training.
"""

from __future__ import annotations

import contextvars
import math
import threading
from pathlib import Path

from model.files import jsonl_rows

PROGRESS_EVERY_S = 120.0


def read_progress(metrics: Path) -> dict:
    """What metrics.jsonl says so far: steps done, the newest training record, the val bpb curve."""
    state = {"steps_done": 0, "train": None, "val": [], "seconds_per_step": None}
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return state
    recent_dt = []
    for _, record in jsonl_rows(lines, skip_invalid=True):  # the last line may be being written
        if "train/loss" in record:
            state["train"] = record
            state["steps_done"] = record["step"] + 1
            recent_dt = (recent_dt + [record.get("train/dt")])[-20:]
        elif "val/bpb" in record:
            state["val"].append((record["step"], record["val/bpb"]))
    recent_dt = [dt for dt in recent_dt if isinstance(dt, (int, float)) and math.isfinite(dt)]
    if recent_dt:
        state["seconds_per_step"] = sorted(recent_dt)[len(recent_dt) // 2]
    return state


def render_progress(stage: str, state: dict, total_steps: int | None) -> str:
    """The markdown artifact: one table of where the run is."""
    train, val = state["train"] or {}, state["val"]
    done = state["steps_done"]
    eta = None
    if total_steps and state["seconds_per_step"] is not None:
        eta = max(0, total_steps - done) * state["seconds_per_step"]

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [
        ("step", f"{done:,}" + (f" / {total_steps:,} ({100 * done / total_steps:.1f}%)" if total_steps else "")),
        ("train loss", number(train.get("train/loss"), ".4f")),
        ("val bpb (latest)", f"{val[-1][1]:.4f} at step {val[-1][0]:,}" if val else "-"),
        ("val bpb (min)", number(min(v for _, v in val) if val else None, ".4f")),
        ("tok/s", number(train.get("train/tok_per_sec"), ",.0f")),
        ("MFU (%)", number(train.get("train/mfu"), ".2f")),
        ("training time (min)", number(train.get("total_training_time", 0) / 60 if train else None, ".1f")),
        ("ETA (min)", number(eta / 60 if eta is not None else None, ".1f")),
    ]
    return f"### {stage}: training progress\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


class TrainingProgress:
    """Context manager around a training stage's torchrun: publishes progress until the run ends."""

    def __init__(self, stage: str, metrics: Path, total_steps: int | None, log=print,
                 every_s: float = PROGRESS_EVERY_S):
        self.stage, self.metrics, self.total_steps, self.log, self.every_s = stage, metrics, total_steps, log, every_s
        self.progress_id = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def __enter__(self) -> "TrainingProgress":
        from prefect.artifacts import create_progress_artifact

        try:
            self.progress_id = create_progress_artifact(
                progress=0.0, key=f"{self.stage}-progress",
                description=f"{self.stage}: percent of the {self.total_steps or '?'} planned steps")
        except Exception as exc:  # noqa: BLE001 - the UI must never stop training
            self._warn(exc)
        # The thread runs in this task's context, so its artifacts belong to this task run.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                        name=f"{self.stage}-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.publish(finished=exc_type is None)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.publish()

    def publish(self, finished: bool = False) -> None:
        from prefect.artifacts import create_markdown_artifact, update_progress_artifact

        try:
            state = read_progress(self.metrics)
            if self.progress_id is not None:
                if finished:
                    percent = 100.0
                elif self.total_steps:
                    percent = min(100.0, 100.0 * state["steps_done"] / self.total_steps)
                else:
                    percent = 0.0
                update_progress_artifact(self.progress_id, percent)
            create_markdown_artifact(markdown=render_progress(self.stage, state, self.total_steps),
                                     key=f"{self.stage}-status", description=f"{self.stage}: where training is")
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self.log(f"{self.stage}: progress not published to the Prefect UI ({type(exc).__name__}: {exc})")
            self._warned = True
