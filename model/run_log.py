"""What a training run logs: `metrics.jsonl` on rank 0 and, when enabled, a wandb run (offline by default).

Shared by the two training entry points, model/train.py and model/sft.py. Nothing here changes what a run
computes, so a stage's key need not change when it does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TIMING_WARMUP_STEPS = 10  # steps 0..10 (compile warm-up) are left out of total_training_time


class MetricsLog:
    """metrics.jsonl on rank 0 (one JSON object per line) plus wandb when enabled."""

    def __init__(self, path: Path, enabled: bool, wandb_run, keep_before_step: float):
        self.path, self.enabled, self.wandb = path, enabled, wandb_run
        if enabled and path.exists():  # a resumed run: drop what was logged after the checkpoint
            kept = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) < keep_before_step]
            path.write_text("".join(l + "\n" for l in kept))

    def log(self, record: dict, wandb_too: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None and wandb_too:
            self.wandb.log(record, step=record["step"])


def start_wandb(args, user_config: dict, out_dir: Path, project: str):
    """A wandb run for `--run` (none for 'dummy' or --wandb-mode disabled), resumable: its id is --wandb-id, or
    else fixed by the output directory, so a restarted run continues the same wandb run. The pipeline passes
    an id per flow run and stage, so each night is a run of its own and a retried attempt resumes its own."""
    if args.run == "dummy" or args.wandb_mode == "disabled":
        return None
    import wandb

    run_id = getattr(args, "wandb_id", "") or \
        f"{args.run}-{hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:8]}"
    return wandb.init(project=project, name=args.run, config=user_config, mode=args.wandb_mode,
                      dir=getattr(args, "wandb_dir", "") or str(out_dir), resume="allow", id=run_id, group=getattr(args, "wandb_group", "") or None)
