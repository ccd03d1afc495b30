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

from tasks.stages import Stage
from tasks.store import MANIFEST, WORK, Store, artifact_record, atomic_write_json, build_manifest, check_artifact


@dataclass
class StageCachePolicy(CachePolicy):
    stage: Stage | None = None

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict, **kwargs) -> str | None:
        store = Store(inputs["store"])
        key = self.stage.key(inputs["section"], inputs.get("upstream") or {})
        record = store.results_dir / record_name(self.stage.name, key)
        art = store.stage_dir(self.stage.name, key)
        # A damaged artifact, or (on the retry of a refreshing run) an interrupted rebuild to resume, must run
        # the task rather than come back Cached.
        resume = inputs.get("rebuild") == "resume" and rebuild_dir(art).exists()
        if record.exists() and (check_artifact(art, store.root) is not None or resume):
            record.unlink(missing_ok=True)
        return record_name(self.stage.name, key)


def record_name(stage: str, key: str) -> str:
    return f"{stage}-{key}"


def stage_task(stage: Stage, **task_kwargs):
    """Decorator: a Prefect task whose cache is the store. Signature: (section, upstream, store, options, rebuild).
    Its task runs are named `<stage>-<first 8 of its key>`, the name of the artifact directory they build."""
    def run_name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        return f"{stage.name}-{stage.key(params['section'], params.get('upstream') or {})[:8]}"

    def wrap(fn):
        return task(name=stage.name, cache_policy=StageCachePolicy(stage=stage), persist_result=True,
                    task_run_name=run_name, **task_kwargs)(fn)
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
    after_commit: Callable[[Path], None] | None = None  # run with the artifact's final path once it is committed


def rebuild_dir(art: Path) -> Path:
    """Where a refresh of a valid artifact is built, beside it, until it can replace it."""
    return art.with_name(art.name + ".rebuild")


def _swap_in(art: Path, built: Path) -> None:
    """Replace `art` by the complete rebuild `built` (its manifest written). Between the two renames neither
    path is a valid artifact at `art`; `_finish_swap` completes an interrupted swap on the next run."""
    old = art.with_name(art.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if art.exists():
        art.rename(old)
    built.rename(art)
    shutil.rmtree(old, ignore_errors=True)


def _finish_swap(art: Path, store_root: Path) -> None:
    """A crash between _swap_in's renames leaves a complete rebuild and no artifact: put the rebuild in place."""
    built = rebuild_dir(art)
    if not art.exists() and built.exists() and check_artifact(built, store_root) is None:
        built.rename(art)


def _run_description() -> str:
    """'flow run <name> (<id>), task <name>' for whoever waits on this run's lock."""
    from prefect.runtime import flow_run, task_run

    return f"flow run {flow_run.name} ({flow_run.id}), task {task_run.name}"


def run_stage(stage: Stage, section: dict, upstream: dict, store_root: str, rebuild: str | None,
              build: Callable[[Path, Path], StageOutput]) -> dict:
    """Build the stage's artifact (or reuse a valid one) and return its record.

    `rebuild`: None (use a valid artifact), "fresh" (a refresh: rebuild from scratch) or "resume" (the retry of
    a run that refreshed this stage: continue its interrupted rebuild, if any). Nothing valid is ever destroyed
    before its replacement is complete: a refresh of a valid artifact builds into `<key>.rebuild/` beside it and
    swaps it in after writing its manifest, so a refresh that fails leaves the previous artifact in place, valid
    and Cached for any later run; only the retry of that run picks the rebuild up again. An artifact that is
    missing or damaged is rebuilt in place, keeping work/ so that pretrain and sft continue from their last
    checkpoint.
    """
    logger = get_run_logger()
    store = Store(store_root)
    key = stage.key(section, upstream)
    art = store.stage_dir(stage.name, key)
    with store.lock(stage.name, key, owner=_run_description(), log=logger.info) as lock:
        _finish_swap(art, store.root)
        problem = check_artifact(art, store.root)
        pending = rebuild_dir(art)
        if rebuild == "fresh" and problem is None:
            shutil.rmtree(pending, ignore_errors=True)  # a refresh starts from scratch, beside the valid artifact
            target = pending
            logger.info(f"{stage.name}: refreshing into {target}; {art} stays valid until the rebuild completes")
        elif rebuild == "resume" and pending.exists():
            target = pending  # this run's refresh was interrupted in an earlier attempt: resume it
            logger.info(f"{stage.name}: resuming the interrupted rebuild in {target}")
        elif problem is None:
            logger.info(f"{stage.name}: valid artifact already at {art}")
            return publish_result(stage.name, artifact_record(art, store.root), art, logger)
        else:
            target = art
            if art.exists():
                logger.info(f"{stage.name}: rebuilding {art} ({problem})")
            (art / MANIFEST).unlink(missing_ok=True)  # from here on the directory is not an artifact
            if rebuild == "fresh" and (art / WORK).exists():
                shutil.rmtree(art / WORK)  # a refresh starts fresh; a retry keeps work/ to resume from
        work = target / WORK
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        out = build(target, work)
        manifest = build_manifest(target, stage=stage.name, key=key, metrics=out.metrics, refs=out.refs,
                                  store_root=store.root, started_at=started, extra=out.environment,
                                  volatile=stage.volatile)
        with lock.fenced():  # raises LeaseLost if this run stalled past its lease and another took over
            atomic_write_json(target / MANIFEST, manifest)
            if target != art:
                _swap_in(art, target)
        if out.after_commit is not None:
            out.after_commit(art)
        logger.info(f"{stage.name}: artifact {art} ({time.time() - started:.1f}s)")
        return publish_result(stage.name, artifact_record(art, store.root), art, logger)


def publish_result(stage: str, record: dict, art: Path, logger) -> dict:
    """A small markdown artifact in the UI when a stage finishes: its scalar metrics and where its artifact is."""
    from prefect.artifacts import create_markdown_artifact

    rows = [(k, v) for k, v in sorted(record["metrics"].items())
            if isinstance(v, (int, float, bool)) or isinstance(v, str) and len(v) < 80]
    markdown = (f"### {stage}\n\nartifact: `{art}`  \nkey: `{record['key']}`\n\n| metric | value |\n|---|---|\n" +
                "".join(f"| {k} | {v:.6g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in rows))
    try:
        create_markdown_artifact(markdown=markdown, key=f"{stage.replace('_', '-')}-result",
                                 description=f"{stage}: metrics and artifact path")
    except Exception as exc:  # noqa: BLE001 - the UI must never fail a finished stage
        logger.warning(f"{stage}: result not published to the Prefect UI ({type(exc).__name__}: {exc})")
    return record
