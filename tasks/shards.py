"""The shards stage: fetch train shards [0, n) and the fixed validation shard into the store.

Shards are content-addressed one by one under `<store>/shards/<source-hash>/`, so every run that reads
the same source shares them (a d26 run reuses what a d24 run fetched). The stage artifact itself is
small: `shards.json`, the ordered train and val file lists (paths relative to the artifact; read by
model.data.read_shard_paths), and a manifest whose refs pin each shard's size and sha256.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect.logging import get_run_logger

from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.download import fetch_shards
from model.data import SHARD_INDEX_FILE
from tasks.stages import STAGES
from tasks.store import Store, atomic_write_json

SHARDS = STAGES["shards"]


def shards_section(cfg: SpeedrunConfig) -> dict:
    """What the shards artifact depends on: the source and which shards (not how they are fetched)."""
    return {"source": cfg.data.source, "train": cfg.train_shard_indices(), "val": cfg.data.val_shard}


def shards_options(cfg: SpeedrunConfig) -> dict:
    d = cfg.data
    return {"workers": d.download_workers, "attempts": d.download_attempts, "timeout_s": d.download_timeout_s}


@stage_task(SHARDS, retries=1, retry_delay_seconds=10)
def shards_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()
    shard_dir = Store(store).shards_dir(section["source"])

    def build(art: Path, work: Path) -> StageOutput:
        wanted = section["train"] + [section["val"]]
        logger.info(f"fetching {len(section['train'])} train shards + val shard {section['val']} "
                    f"from {section['source']} into {shard_dir}")
        records = fetch_shards(section["source"], wanted, shard_dir, log=logger.info, **options)
        rel = {i: os.path.relpath(records[i].path, art) for i in wanted}
        atomic_write_json(art / SHARD_INDEX_FILE, {
            "source": section["source"],
            "train": [rel[i] for i in section["train"]],
            "val": rel[section["val"]],
        })
        return StageOutput(
            metrics={"train_shards": len(section["train"]), "val_shard": section["val"],
                     "bytes": sum(r.size for r in records.values()),
                     "documents": sum(r.num_rows for r in records.values())},
            refs={Path(records[i].path).name: Path(records[i].path) for i in wanted},
        )

    return run_stage(SHARDS, section, upstream, store, rebuild, build)
