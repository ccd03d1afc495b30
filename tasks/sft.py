"""The sft stage: supervised fine-tuning of the final pretrain checkpoint under torchrun (model/sft.py).

Keyed on the pretrain artifact, the tokenizer, the SFT options and the *content* of the conversation
files and of the files replacing single mixture sources (not their paths), so the same data in another checkout hits the same artifact. Like pretraining,
the run lives in the artifact's work/ and a retry resumes from its last complete checkpoint. The
artifact is self-contained for chatting and chat evaluation:

    checkpoint/   model_NNNNNN.pt + meta_NNNNNN.json (+ per-rank optimizer state) of the last step
    tokenizer/    a copy of the tokenizer files the model was trained with
    summary.json, metrics.jsonl, log.txt
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect.logging import get_run_logger

from model.tokenizer import META_FILE, RANKS_FILE, TOKEN_BYTES_FILE
from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.environment import numerics_environment
from tasks.launch import torchrun_options, wandb_arguments
from tasks.nodes import node_options
from tasks.stages import STAGES, key_section
from tasks.store import content_digest
from tasks.training_artifact import option_flags, release_final_checkpoint, run_training

SFT = STAGES["sft"]
TOKENIZER_FILES = (RANKS_FILE, TOKEN_BYTES_FILE, META_FILE)


def sft_section(cfg: SpeedrunConfig) -> dict:
    sft = cfg.sft
    section = key_section(SFT, sft)
    # The data's bytes enter the key; its location does not (a hub name stands for itself).
    section["data"] = [content_digest(p) for p in sft.data] if sft.data else None
    if sft.sources:  # only when set, so runs without replaced sources keep their existing keys
        section["sources"] = {name: content_digest(path) for name, path in sorted(sft.sources.items())}
    section["chat_eval_data"] = (content_digest(cfg.chat_eval.data_dir)
                                 if sft.chatcore_every > 0 and cfg.chat_eval.data_dir else None)
    section["device_type"] = cfg.runtime.device_type or "auto"
    section["environment"] = numerics_environment(cfg.runtime)  # the warm-started optimizer state is per rank
    return section


def sft_options(cfg: SpeedrunConfig) -> dict:
    return {"torchrun": torchrun_options(cfg), "nodes": node_options(cfg), "wandb_mode": cfg.runtime.wandb_mode,
            "run": f"{cfg.preset}-sft", "data": list(cfg.sft.data or []),
            "sources": dict(cfg.sft.sources), "save_every": cfg.sft.save_every,
            "chat_eval_dir": cfg.chat_eval.data_dir}


def sft_arguments(section: dict, options: dict) -> list[str]:
    """The section as model.sft flags (kebab-case, the reference's names)."""
    args = option_flags(section, skip=("environment", "data", "sources", "chat_eval_data"), switches=False)
    args.append(f"--save-every={options['save_every']}")
    args.append(f"--attention={section['environment']['attention']}")
    if options["data"]:
        args += ["--data", *options["data"]]
    for name, path in sorted(options.get("sources", {}).items()):
        args.append(f"--source={name}={path}")
    if options["chat_eval_dir"]:
        args.append(f"--chat-eval-dir={options['chat_eval_dir']}")
    return args


@stage_task(SFT)
def sft_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        run_dir = work / "run"
        args = [f"--checkpoint-dir={Path(upstream['pretrain']['path']) / 'checkpoint'}",
                f"--tokenizer-dir={upstream['tokenizer']['path']}", f"--out-dir={run_dir}", "--resume=auto",
                f"--run={options['run']}", f"--wandb-mode={options['wandb_mode']}", *wandb_arguments(options["run"], store),
                *sft_arguments(section, options)]
        planned = section["num_iterations"] if section["num_iterations"] > 0 else None  # else one pass, length unknown
        summary, environment = run_training("sft", "model.sft", args, run_dir, work, art, planned, options, logger)
        tokenizer = art / "tokenizer"
        tokenizer.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy2(Path(upstream["tokenizer"]["path"]) / name, tokenizer / name)
        return StageOutput(metrics=summary, environment=environment, after_commit=release_final_checkpoint)

    return run_stage(SFT, section, upstream, store, rebuild, build)
