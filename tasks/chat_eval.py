"""The chat_eval stage: ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and ChatCORE of the SFT model (model/chat_eval.py).

Keyed on the sft artifact, the chat-eval options and the content of the local task files (or the hub
names), run under torchrun like the other model stages. The artifact holds summary.json (per-task
accuracy, passed/total, chatcore), one <task>.jsonl of per-problem records per task, and the log.
"""

from __future__ import annotations

from pathlib import Path

from prefect.logging import get_run_logger

from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.environment import numerics_environment
from tasks.launch import run_evaluation, torchrun_options
from tasks.stages import STAGES, key_section
from tasks.store import content_digest

CHAT_EVAL = STAGES["chat_eval"]


def chat_eval_section(cfg: SpeedrunConfig) -> dict:
    section = key_section(CHAT_EVAL, cfg.chat_eval)
    section["data"] = content_digest(cfg.chat_eval.data_dir) if cfg.chat_eval.data_dir else None
    section["device_type"] = cfg.runtime.device_type or "auto"
    section["environment"] = numerics_environment(cfg.runtime)  # device, dtype, world size, torch, attention
    return section


def chat_eval_options(cfg: SpeedrunConfig) -> dict:
    return {"torchrun": torchrun_options(cfg), "data_dir": cfg.chat_eval.data_dir}


@stage_task(CHAT_EVAL)
def chat_eval_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        sft = Path(upstream["sft"]["path"])
        args = [f"--checkpoint-dir={sft / 'checkpoint'}", f"--tokenizer-dir={sft / 'tokenizer'}",
                f"--tasks={section['tasks']}", f"--temperature={section['temperature']}",
                f"--max-new-tokens={section['max_new_tokens']}", f"--num-samples={section['num_samples']}",
                f"--top-k={section['top_k']}", f"--batch-size={section['batch_size']}"]
        if section["max_problems"] is not None:
            args.append(f"--max-problems={section['max_problems']}")
        if options["data_dir"]:
            args.append(f"--data-dir={options['data_dir']}")
        summary = run_evaluation("model.chat_eval", args, section, work, art, options, logger.info)
        metrics = {"tasks": summary["tasks"], "chatcore": summary.get("chatcore"),
                   "chatcore_cat": summary.get("chatcore_cat"), "attention_backend": summary.get("attention_backend")}
        return StageOutput(metrics=metrics, environment={"attention_backend": summary.get("attention_backend")})

    return run_stage(CHAT_EVAL, section, upstream, store, rebuild, build)
