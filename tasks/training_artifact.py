"""What a finished training run leaves in its stage artifact (pretrain and sft): the final checkpoint, the
summary, the metrics and the log. Part of those stages' keys (tasks/stages.py): it decides the artifact's files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from tasks.store import WORK


def collect_training_run(run_dir: Path, work: Path, art: Path) -> dict:
    """Place a finished training run's final checkpoint in `art/checkpoint/`, copy its summary, metrics and log
    beside it, and return the summary (model/train.py and model/sft.py write the same layout).

    Crash-safe at every point: the checkpoint files are hard-linked (at d24 ~10 GB: no copy, no extra space),
    never moved, so work/ keeps the complete final checkpoint, marker included, until the artifact's manifest
    exists. A collection killed anywhere is simply done again; the rerun's trainer finds the final checkpoint
    complete and only re-evaluates. Where links are impossible (another filesystem) the files are copied.
    Once the artifact is committed, `release_final_checkpoint` drops work/'s links (run_stage's after_commit).
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["step"]
    checkpoint = art / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    for leftover in checkpoint.glob(".*.tmp"):  # a link a killed collection made but never renamed
        leftover.unlink()
    for src in sorted((run_dir / "checkpoints").glob(f"*_{final:06d}*")):
        if src.name.startswith(".") or src.name.startswith("complete_"):
            continue
        _link_or_copy(src, checkpoint / src.name)
    for name in ("summary.json", "metrics.jsonl"):
        shutil.copy2(run_dir / name, art / name)
    shutil.copy2(work / "log.txt", art / "log.txt")
    return summary


def _link_or_copy(src: Path, dest: Path) -> None:
    """Make `dest` a hard link to `src` (replacing what is there), or a copy where links are impossible."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def release_final_checkpoint(art: Path) -> None:
    """After the artifact's manifest is written: remove work/'s entries for the final checkpoint (marker first).
    The artifact holds the files now; a rebuild of a damaged artifact must not resume from the same bytes."""
    checkpoints = art / WORK / "run" / "checkpoints"
    step = json.loads((art / "summary.json").read_text())["step"]
    (checkpoints / f"complete_{step:06d}").unlink(missing_ok=True)
    for path in checkpoints.glob(f"*_{step:06d}*"):
        path.unlink(missing_ok=True)
