"""The eval_bundle stage: fetch the CORE eval bundle into the store and validate it.

`base_eval.bundle` is the reference zip URL by default, or a local zip, a local directory (the mirror's
`eval_bundle/`), or any fsspec URL of a zip. The bundle's files are copied into the artifact, so its
content hash (and with it the base_eval key) follows the bundle's bytes, not where they came from; the stage's
own key holds what the source holds (`bundle_identity`), so a bundle edited in place is fetched again.
Validation (core.yaml, the meta CSV, every listed data file, the rows of each) happens before the
artifact is accepted; a task the CORE set expects but the bundle lacks is an error unless
`base_eval.allow_missing_tasks` is on.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import fsspec
from prefect.logging import get_run_logger

from model.eval_bundle import BundleError, load_bundle, load_task_data
from model.files import atomic_write
from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import SpeedrunConfig
from tasks.source_identity import HashCache, is_local, local_identity, local_path, remote_version
from tasks.stages import STAGES

EVAL_BUNDLE = STAGES["eval_bundle"]
BUNDLE_DIR = "eval_bundle"


def eval_bundle_section(cfg: SpeedrunConfig, verify: bool = False) -> dict:
    """What the bundle artifact depends on: what the bundle holds (not where it is) and allow_missing_tasks."""
    return {"content": bundle_identity(cfg.base_eval.bundle, HashCache.for_store(cfg.runtime.store), verify),
            "allow_missing_tasks": cfg.base_eval.allow_missing_tasks}


def eval_bundle_options(cfg: SpeedrunConfig) -> dict:
    return {"bundle": cfg.base_eval.bundle}


def bundle_identity(source: str, cache: HashCache, verify: bool = False) -> dict:
    """A local directory's files and their sha256, a local zip's sha256, or a remote zip's server version (its
    sha256 after streaming it once when the server reports no version)."""
    try:
        if is_local(source):
            return local_identity(local_path(source), cache, verify)
        try:
            version = remote_version(source)
        except FileNotFoundError as e:
            raise BundleError(f"base_eval.bundle: {source} cannot be read ({e}); fix: point it at the bundle "
                              "directory, its zip, or a reachable URL of the zip") from None
        if version is not None:
            return version
        digest = hashlib.sha256()
        with fsspec.open(source, "rb", **_streaming(source)) as src:
            while block := src.read(1 << 20):
                digest.update(block)
        return {"url": source, "sha256": digest.hexdigest()}
    except FileNotFoundError:
        raise BundleError(f"base_eval.bundle: {source} does not exist; fix: point it at the bundle directory, "
                          "its zip, or a URL of the zip") from None
    finally:
        cache.save()


def _streaming(source: str) -> dict:
    # block_size=0 streams over HTTP: servers without range requests (and most CDNs' first byte) would otherwise
    # fail fsspec's random-access file.
    return {"block_size": 0} if source.startswith(("http://", "https://")) else {}


def fetch_bundle(source: str, dest: Path, work: Path, log=print) -> None:
    """Place the bundle's files (the folder holding core.yaml) at `dest`, from a directory or a zip."""
    local = local_path(source)
    if is_local(source):
        if local.is_dir():
            log(f"copying the eval bundle from {local}")
            shutil.copytree(local, dest)
            return
        if not local.is_file():
            raise BundleError(f"base_eval.bundle: {source} does not exist; fix: point it at the bundle directory, "
                              "its zip, or a URL of the zip")
        archive = local
    else:
        archive = work / "eval_bundle.zip"
        if not archive.exists():
            log(f"downloading the eval bundle from {source}")
            with fsspec.open(source, "rb", **_streaming(source)) as src:
                atomic_write(archive, lambda out: shutil.copyfileobj(src, out, length=1 << 20))
    unpacked = work / "unzipped"
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpacked)
    except zipfile.BadZipFile as e:
        if archive.parent == work:
            archive.unlink(missing_ok=True)  # a damaged download: fetch it again next time
        raise BundleError(f"base_eval.bundle: {source} is not a valid zip ({e}); fix: re-download it") from None
    roots = [p.parent for p in unpacked.rglob("core.yaml")]
    if len(roots) != 1:
        raise BundleError(f"base_eval.bundle: {source} holds {len(roots)} core.yaml files, expected exactly one")
    shutil.move(str(roots[0]), dest)


@stage_task(EVAL_BUNDLE, retries=1, retry_delay_seconds=10)
def eval_bundle_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        dest = art / BUNDLE_DIR
        shutil.rmtree(dest, ignore_errors=True)
        fetch_bundle(options["bundle"], dest, work, log=logger.info)
        bundle = load_bundle(dest, allow_missing=section["allow_missing_tasks"])
        rows = {task.label: len(load_task_data(task)) for task in bundle.tasks}  # every row validated
        if bundle.missing:
            logger.warning(f"CORE will average {bundle.core_tasks} tasks; missing: {', '.join(bundle.missing)}")
        return StageOutput(metrics={"core_tasks": bundle.core_tasks, "missing_tasks": bundle.missing,
                                    "rows": rows})

    return run_stage(EVAL_BUNDLE, section, upstream, store, rebuild, build)
