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
from tasks.eval_bundle import BUNDLE_DIR
from tasks.launch import attention_backend, collect_training_run, run_torchrun, torchrun_options
from tasks.store import StageDef

# What the run executes: editing any of these re-trains; editing SFT or eval code does not.
PRETRAIN = StageDef("pretrain", version=1, code=(
    "tasks/pretrain.py", "tasks/launch.py", "ops/*.py",
    "model/train.py", "model/gpt.py", "model/optim.py", "model/data.py", "model/dataloader.py", "model/tokenizer.py",
    "model/loss_eval.py", "model/checkpoint.py", "model/common.py", "model/sizing.py",
    "model/core_eval.py", "model/eval_bundle.py", "model/engine.py",
))
# Options that change how a run is launched or logged, not what it computes.
NOT_IN_KEY = {"run"}


def pretrain_section(cfg: SpeedrunConfig) -> dict:
    section = {k: v for k, v in cfg.pretrain.model_dump().items() if k not in NOT_IN_KEY}
    section["device_type"] = cfg.pretrain.device_type or cfg.runtime.device_type or "auto"
    section["world_size"] = cfg.runtime.world_size  # optimizer state is per rank; numerics depend on it
    section["attention"] = attention_backend(cfg.runtime, cfg.pretrain.device_type)  # resolved: it changes the bits
    section["allow_missing_tasks"] = cfg.base_eval.allow_missing_tasks
    return section


def pretrain_upstream(cfg: SpeedrunConfig) -> list[str]:
    """The bundle is an input only when CORE runs during training; otherwise it must not enter the key."""
    return ["shards", "tokenizer"] + (["eval_bundle"] if cfg.pretrain.core_metric_every > 0 else [])


def pretrain_options(cfg: SpeedrunConfig) -> dict:
    return {"torchrun": torchrun_options(cfg.runtime), "wandb_mode": cfg.runtime.wandb_mode,
            "run": cfg.pretrain.run if cfg.pretrain.run != "dummy" else f"{cfg.preset}-pretrain"}


def train_arguments(section: dict) -> list[str]:
    """The config section as model.train flags (kebab-case, same names as the reference)."""
    args = []
    for name, value in section.items():
        if name in ("world_size", "allow_missing_tasks") or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "device_type":
            if value != "auto":
                args.append(f"{flag}={value}")
        elif isinstance(value, bool):
            if value:
                args.append(flag)
        else:
            args.append(f"{flag}={value}")
    return args


@stage_task(PRETRAIN)
def pretrain_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: bool = False) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        run_dir = work / "run"
        args = train_arguments(section) + [
            f"--out-dir={run_dir}", f"--data-dir={upstream['shards']['path']}",
            f"--tokenizer-dir={upstream['tokenizer']['path']}", "--resume=auto",
            f"--run={options['run']}", f"--wandb-mode={options['wandb_mode']}",
        ]
        if "eval_bundle" in upstream:  # CORE during training (core_metric_every > 0)
            args.append(f"--bundle-dir={Path(upstream['eval_bundle']['path']) / BUNDLE_DIR}")
            if section["allow_missing_tasks"]:
                args.append("--allow-missing-tasks")
        run_torchrun("model.train", args, log_path=work / "log.txt", log=logger.info, **options["torchrun"])
        summary = collect_training_run(run_dir, work, art)
        return StageOutput(metrics=summary, environment={"world_size": summary["world_size"],
                                                         "attention_backend": summary.get("attention_backend"),
                                                         "device": summary["device"]})

    return run_stage(PRETRAIN, section, upstream, store, rebuild, build)
