"""The base_eval stage: CORE, bits per byte and samples of the final pretrain checkpoint (model/evaluate.py).

Keyed on the pretrain artifact, the eval bundle, the tokenizer and shards, and its own options; runs
under torchrun like pretraining, so evaluation shares the node's GPUs the same way. The artifact holds
summary.json (core_metric, per-task accuracy and centered values, train/val bpb, samples), core.json
(per-example decisions) and the reference's CORE CSV.
"""

from __future__ import annotations

from pathlib import Path

from prefect.logging import get_run_logger

from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.eval_bundle import BUNDLE_DIR
from tasks.environment import numerics_environment
from tasks.launch import run_evaluation, torchrun_options
from tasks.stages import STAGES, key_section

BASE_EVAL = STAGES["base_eval"]


def base_eval_section(cfg: SpeedrunConfig) -> dict:
    section = key_section(BASE_EVAL, cfg.base_eval)  # the bundle enters the key as upstream content
    section["device_type"] = cfg.runtime.device_type or "auto"
    section["environment"] = numerics_environment(cfg.runtime)  # device, dtype, world size, torch, attention
    return section


def base_eval_options(cfg: SpeedrunConfig) -> dict:
    return {"torchrun": torchrun_options(cfg)}


@stage_task(BASE_EVAL)
def base_eval_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        args = [f"--eval={section['eval']}", f"--max-per-task={section['max_per_task']}",
                f"--device-batch-size={section['device_batch_size']}", f"--split-tokens={section['split_tokens']}",
                f"--checkpoint-dir={Path(upstream['pretrain']['path']) / 'checkpoint'}",
                f"--tokenizer-dir={upstream['tokenizer']['path']}", f"--data-dir={upstream['shards']['path']}",
                f"--bundle-dir={Path(upstream['eval_bundle']['path']) / BUNDLE_DIR}"]
        if section["max_context"] is not None:
            args.append(f"--max-context={section['max_context']}")
        if section["allow_missing_tasks"]:
            args.append("--allow-missing-tasks")
        summary = run_evaluation("model.evaluate", args, section, work, art, options, logger.info)
        metrics = {k: summary.get(k) for k in ("core_metric", "core_tasks", "missing_tasks", "train_bpb", "val_bpb",
                                                "core_results", "core_centered", "attention_backend")}
        return StageOutput(metrics=metrics, environment={"attention_backend": summary.get("attention_backend")})

    return run_stage(BASE_EVAL, section, upstream, store, rebuild, build)
