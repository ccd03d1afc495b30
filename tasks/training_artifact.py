"""What the pretrain and sft stages share: the trainer's flags, its run under torchrun, and what the finished run
leaves in the stage artifact (the final checkpoint, the summary, the metrics and the log). Part of those
stages' keys (tasks/stages.py): it decides the flags the trainer gets and the artifact's files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from tasks.launch import run_torchrun
from tasks.nodes import run_multinode
from tasks.progress import TrainingProgress
from tasks.store import WORK


def option_flags(options: dict, skip: tuple[str, ...] = (), switches: bool = True) -> list[str]:
    """Key-section options as the trainer's flags (`--name-with-dashes=value`, the reference's names). None and the
    names in `skip` are left out, and `device_type` "auto" too (the trainer detects it). Booleans are bare switches
    (`switches`, model.train's store_true flags) or `=0`/`=1` (model.sft)."""
    flags = []
    for name, value in options.items():
        if name in skip or value is None or (name == "device_type" and value == "auto"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) and switches:
            flags += [flag] if value else []
        else:
            flags.append(f"{flag}={int(value) if isinstance(value, bool) else value}")
    return flags


def run_training(stage: str, module: str, args: list[str], run_dir: Path, work: Path, art: Path,
                 planned_steps: int | None, options: dict, logger) -> tuple[dict, dict]:
    """Run a trainer entry point under torchrun into `run_dir` (a retry resumes there), on one node or, with
    options["nodes"], on several (tasks/nodes.py), with the stage's progress artifact read from its metrics.jsonl,
    then collect the finished run into the artifact. Returns its summary and the environment it ran in (world
    size, attention backend, device) for the manifest."""
    with TrainingProgress(stage, run_dir / "metrics.jsonl", planned_steps, logger.warning):
        if options.get("nodes"):  # runtime.nnodes > 1: this is node 0, the pool runs the others
            run_multinode(stage, module, args, work=work, log_path=work / "log.txt", nodes=options["nodes"],
                          torchrun=options["torchrun"], log=logger.info)
        else:
            run_torchrun(module, args, log_path=work / "log.txt", log=logger.info, **options["torchrun"])
    summary = collect_training_run(run_dir, work, art)
    environment = {key: summary.get(key) for key in ("world_size", "attention_backend", "device")}
    return summary, environment


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
