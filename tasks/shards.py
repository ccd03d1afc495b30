"""The shards stage: fetch train shards [0, n) and the fixed validation shard into the store.

Shards are stored one by one under `<store>/shards/<source-hash>/`, so every run that reads
the same source shares them (a d26 run reuses what a d24 run fetched). The stage artifact itself is
small: `shards.json`, the ordered train and val file lists (paths relative to the artifact; read by
model.data.read_shard_paths), and a manifest whose refs pin each shard's size and sha256.

The key holds what the source holds (`shards_section`), so replacing a shard in a mirror re-executes this
stage and everything downstream; a stored shard is reused only while it matches the source, and
`--refresh shards` re-hashes every stored shard against it.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect.logging import get_run_logger

from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.download import fetch_shards, shard_identities
from model.data import SHARD_INDEX_FILE, shard_filename
from tasks.source_identity import HashCache
from tasks.stages import STAGES
from tasks.store import Store, atomic_write_json

SHARDS = STAGES["shards"]


def shards_section(cfg: SpeedrunConfig, verify: bool = False, log=print) -> dict:
    """What the shards artifact depends on: which shards, and what the source holds for each of them.

    The source's path or URL is not in it (a mirror moved elsewhere keeps its key); its content is: each
    shard's sha256 for a local source (hashed once, then remembered by size and mtime), the server's version
    (ETag, Last-Modified, ...) for a remote one. `verify` re-hashes local shards instead of trusting the cache.
    """
    d = cfg.data
    wanted = cfg.train_shard_indices() + [d.val_shard]
    store = Store(cfg.runtime.store)
    identities = shard_identities(d.source, wanted, hash_cache=HashCache.for_store(store.root), verify=verify,
                                  fetch_into=store.shards_dir(d.source), workers=d.download_workers,
                                  attempts=d.download_attempts, timeout_s=d.download_timeout_s, log=log)
    return {"train": cfg.train_shard_indices(), "val": d.val_shard,
            "content": {shard_filename(i): identities[i] for i in wanted}}


def shards_options(cfg: SpeedrunConfig) -> dict:
    d = cfg.data
    return {"source": d.source, "workers": d.download_workers, "attempts": d.download_attempts,
            "timeout_s": d.download_timeout_s}


@stage_task(SHARDS, retries=1, retry_delay_seconds=10)
def shards_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()
    options = dict(options)
    source = options.pop("source")
    shard_dir = Store(store).shards_dir(source)
    # A refresh re-verifies every stored shard: re-hashed and compared with what the source holds.
    verify = rebuild == "fresh"

    def build(art: Path, work: Path) -> StageOutput:
        wanted = section["train"] + [section["val"]]
        logger.info(f"fetching {len(section['train'])} train shards + val shard {section['val']} "
                    f"from {source} into {shard_dir}" + (" (re-verifying stored shards)" if verify else ""))
        expected = {i: section["content"][shard_filename(i)] for i in wanted}
        records = fetch_shards(source, wanted, shard_dir, log=logger.info, expected=expected,
                               hash_cache=HashCache.for_store(store), verify=verify, **options)
        rel = {i: os.path.relpath(records[i].path, art) for i in wanted}
        atomic_write_json(art / SHARD_INDEX_FILE, {
            "source": source,
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
