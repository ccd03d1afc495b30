"""The pretrain stage: base GPT training under torchrun (model/train.py), resumable across retries.

The artifact's work/ directory holds the run (checkpoints/, metrics.jsonl, log.txt). A retry of a failed
or killed run gets the same key, finds work/ and continues from the last complete checkpoint
(`--resume auto`). When training finishes, the final checkpoint (model, meta, per-rank optimizer state),
metrics.jsonl, summary.json and the log move into the artifact, and the summary's leaderboard keys
become the stage's metrics.
"""

from __future__ import annotations

from pathlib import Path

from prefect.logging import get_run_logger

from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.environment import numerics_environment
from tasks.eval_bundle import BUNDLE_DIR
from tasks.launch import torchrun_options, wandb_arguments
from tasks.nodes import node_options
from tasks.stages import STAGES, key_section, launch_section
from tasks.training_artifact import option_flags, release_final_checkpoint, run_training

PRETRAIN = STAGES["pretrain"]


def pretrain_section(cfg: SpeedrunConfig) -> dict:
    """The key: every pretrain option that changes what is computed, and the environment that changes its bits."""
    section = key_section(PRETRAIN, cfg.pretrain)
    section["device_type"] = cfg.pretrain.device_type or cfg.runtime.device_type or "auto"
    section["environment"] = numerics_environment(cfg.runtime, cfg.pretrain.device_type)
    if cfg.pretrain.core_metric_every > 0:  # CORE during training reads the bundle as base_eval would
        section["allow_missing_tasks"] = cfg.base_eval.allow_missing_tasks
    return section


def pretrain_options(cfg: SpeedrunConfig) -> dict:
    """Not in the key: the launch layout, the logging, and the options the key rule leaves out (stages.py)."""
    excluded = launch_section(PRETRAIN, cfg.pretrain)
    excluded["run"] = cfg.pretrain.run if cfg.pretrain.run != "dummy" else f"{cfg.preset}-pretrain"
    return {"torchrun": torchrun_options(cfg), "nodes": node_options(cfg), "wandb_mode": cfg.runtime.wandb_mode,
            "excluded": excluded, "planned_steps": cfg.plan.num_iterations}


def train_arguments(section: dict, excluded: dict | None = None) -> list[str]:
    """The key section and the excluded options as model.train flags (kebab-case, the reference's names)."""
    return option_flags({**section, **(excluded or {})}, skip=("environment", "allow_missing_tasks")) + \
        [f"--attention={section['environment']['attention']}"]


@stage_task(PRETRAIN)
def pretrain_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        run_dir = work / "run"
        args = train_arguments(section, options["excluded"]) + [
            f"--out-dir={run_dir}", f"--data-dir={upstream['shards']['path']}",
            f"--tokenizer-dir={upstream['tokenizer']['path']}", "--resume=auto", f"--wandb-mode={options['wandb_mode']}",
            *wandb_arguments(options["excluded"]["run"], store),
        ]
        if "eval_bundle" in upstream:  # CORE during training (core_metric_every > 0)
            args.append(f"--bundle-dir={Path(upstream['eval_bundle']['path']) / BUNDLE_DIR}")
            if section.get("allow_missing_tasks"):
                args.append("--allow-missing-tasks")
        summary, environment = run_training("pretrain", "model.train", args, run_dir, work, art,
                                            options["planned_steps"], options, logger)
        return StageOutput(metrics=summary, environment=environment, after_commit=release_final_checkpoint)

    return run_stage(PRETRAIN, section, upstream, store, rebuild, build)
