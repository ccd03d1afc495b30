"""What a finished training run leaves in its stage artifact (pretrain and sft): the final checkpoint, the
summary, the metrics and the log. Part of those stages' keys (tasks/stages.py): it decides the artifact's files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def collect_training_run(run_dir: Path, work: Path, art: Path) -> dict:
    """Move a finished training run's final checkpoint into `art/checkpoint/`, copy its summary, metrics and
    log beside it, and return the summary (model/train.py and model/sft.py write the same layout).

    The checkpoint is moved, not copied (at d24 it is ~10 GB), marker first, so work/ never holds a
    "complete" checkpoint with missing files; a crash in between leaves the previous checkpoint to resume.
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["step"]
    checkpoint = art / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    (run_dir / "checkpoints" / f"complete_{final:06d}").unlink(missing_ok=True)
    for src in (run_dir / "checkpoints").glob(f"*_{final:06d}*"):
        if not src.name.startswith("."):
            src.replace(checkpoint / src.name)
    for name in ("summary.json", "metrics.jsonl"):
        shutil.copy2(run_dir / name, art / name)
    shutil.copy2(work / "log.txt", art / "log.txt")
    return summary
