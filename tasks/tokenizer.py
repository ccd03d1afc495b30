"""The tokenizer stage: train the BPE tokenizer on the train shards and evaluate it (tok_train + tok_eval).

Runs in the task's own process (no torchrun): rustbpe trains on the train split in shard order, each
document cropped to `doc_cap` characters, until `max_chars`. The artifact holds the tiktoken ranks,
`tokenizer.json`, `token_bytes.pt` and `tok_eval.json` (bytes per token on fixed texts and on train/val
text; GPT-2/GPT-4 comparisons only where tiktoken can load them, which needs the network).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
from prefect.logging import get_run_logger

from model.data import iter_documents, read_shard_paths
from model.tok_eval import EVAL_TEXTS, evaluate_tokenizer, format_evaluation
from model.tokenizer import train_tokenizer, training_texts
from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.environment import package_version
from tasks.stages import STAGES, key_section
from tasks.store import atomic_write_json

TOKENIZER = STAGES["tokenizer"]


def tokenizer_section(cfg: SpeedrunConfig) -> dict:
    """The tokenizer options and the BPE trainer's version (another rustbpe may learn other merges)."""
    return {**key_section(TOKENIZER, cfg.tokenizer), "rustbpe": package_version("rustbpe")}


def first_row_group_text(path: Path) -> str:
    """The documents of a shard's first row group joined with newlines (the tok_eval sample)."""
    return "\n".join(pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist())


@stage_task(TOKENIZER)
def tokenizer_stage(section: dict, upstream: dict, store: str, options: dict | None = None,
                    rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        train_paths, val_path = read_shard_paths(upstream["shards"]["path"])
        chars, next_report = 0, section["max_chars"] // 10

        def counted(texts):  # progress every 10% of max_chars: at 2B characters training takes minutes
            nonlocal chars, next_report
            for text in texts:
                chars += len(text)
                if chars >= next_report:
                    logger.info(f"tokenizer: read {chars:,} / {section['max_chars']:,} characters "
                                f"({time.time() - t0:.0f}s)")
                    next_report += section["max_chars"] // 10
                yield text

        t0 = time.time()
        texts = counted(training_texts(iter_documents(train_paths), section["max_chars"], section["doc_cap"]))
        tokenizer = train_tokenizer(texts, section["vocab_size"])
        train_seconds = time.time() - t0
        if tokenizer.get_vocab_size() != section["vocab_size"]:
            raise ValueError(
                f"the training text ({chars:,} characters) only supports {tokenizer.get_vocab_size()} tokens, "
                f"not tokenizer.vocab_size={section['vocab_size']}; fix: raise tokenizer.max_chars or fetch more "
                "train shards (data.num_train_shards), or lower tokenizer.vocab_size")
        logger.info(f"trained a {section['vocab_size']}-token BPE on {chars:,} characters in {train_seconds:.1f}s")
        tokenizer.save(art)

        samples = {**EVAL_TEXTS, "train": first_row_group_text(train_paths[0]),
                   "val": first_row_group_text(val_path)}
        evaluation = evaluate_tokenizer(tokenizer, samples)
        atomic_write_json(art / "tok_eval.json", evaluation)
        logger.info("tokenizer evaluation:\n" + format_evaluation(evaluation))
        return StageOutput(metrics={
            "vocab_size": tokenizer.get_vocab_size(),
            "train_chars": chars,
            "train_seconds": round(train_seconds, 3),
            "bytes_per_token_train": evaluation["train"]["ours"]["ratio"],
            "bytes_per_token_val": evaluation["val"]["ours"]["ratio"],
        })

    return run_stage(TOKENIZER, section, upstream, store, rebuild, build)
