"""Prefect caching over the artifact store, and the body every stage task shares.

`StageCachePolicy` makes a stage's Prefect cache key its store key (tasks/store.py): stage, version,
config section, upstream content hashes, code fingerprint, and nothing about the run. Records live in
`<store>/prefect-results`, so local runs, workers and tests that share a store share the cache. Before
returning the key the policy validates the artifact; if it is missing or damaged, the stale record is
deleted so Prefect re-executes the task instead of reporting `Cached` over missing files.

`run_stage` is the body of every stage task: take the artifact's lease lock, reuse a valid artifact
(another run may have just built it), otherwise build into the artifact directory and write the
manifest last. Stages raise on failure; they never return a Failed state (Prefect 3.8.8 caches those).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger

from tasks.store import MANIFEST, WORK, StageDef, Store, artifact_record, check_artifact, write_manifest


@dataclass
class StageCachePolicy(CachePolicy):
    stage: StageDef | None = None

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict, **kwargs) -> str | None:
        store = Store(inputs["store"])
        key = self.stage.key(inputs["section"], inputs.get("upstream") or {})
        record = store.results_dir / record_name(self.stage.name, key)
        if record.exists() and check_artifact(store.stage_dir(self.stage.name, key), store.root) is not None:
            record.unlink(missing_ok=True)
        return record_name(self.stage.name, key)


def record_name(stage: str, key: str) -> str:
    return f"{stage}-{key}"


def stage_task(stage: StageDef, **task_kwargs):
    """Decorator: a Prefect task whose cache is the store. Signature: (section, upstream, store, options, rebuild)."""
    def wrap(fn):
        return task(name=stage.name, cache_policy=StageCachePolicy(stage=stage), persist_result=True,
                    **task_kwargs)(fn)
    return wrap


def with_store(task_fn, store: Store, refresh: bool = False):
    """The task bound to one store's result directory (and re-executed when refreshed)."""
    return task_fn.with_options(result_storage=store.results_dir,
                                refresh_cache=refresh or None)


@dataclass
class StageOutput:
    """What a stage's build function returns: metrics for the manifest, and files it references elsewhere."""

    metrics: dict = field(default_factory=dict)
    refs: dict[str, Path] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)


def run_stage(stage: StageDef, section: dict, upstream: dict, store_root: str, rebuild: bool,
              build: Callable[[Path, Path], StageOutput]) -> dict:
    """Build the stage's artifact (or reuse a valid one) and return its record."""
    logger = get_run_logger()
    store = Store(store_root)
    key = stage.key(section, upstream)
    art = store.stage_dir(stage.name, key)
    with store.lock(stage.name, key):
        problem = check_artifact(art, store.root)
        if problem is None and not rebuild:
            logger.info(f"{stage.name}: valid artifact already at {art}")
            return artifact_record(art)
        if problem and art.exists():
            logger.info(f"{stage.name}: rebuilding {art} ({problem})")
        (art / MANIFEST).unlink(missing_ok=True)  # from here on the directory is not an artifact
        work = art / WORK
        if rebuild and work.exists():
            shutil.rmtree(work)  # a forced rebuild starts fresh; a retry keeps work/ to resume from
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        out = build(art, work)
        record = write_manifest(art, stage=stage.name, key=key, metrics=out.metrics, refs=out.refs,
                                store_root=store.root, started_at=started, extra=out.environment)
        logger.info(f"{stage.name}: artifact {art} ({time.time() - started:.1f}s)")
        return record
