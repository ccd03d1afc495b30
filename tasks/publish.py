"""Where a finished report goes besides its artifact: Prefect artifacts in the UI and a wandb run.

`publish` creates the report (plots inline), CORE, chat-eval and trend artifacts; the trend's key is per
deployment, so the nightly's trend is not mixed with manual runs of the same preset. `log_wandb` logs the
summary as a wandb run's summary (offline unless runtime.wandb_mode=online); `offline_wandb_runs` lists this
flow run's offline wandb runs, which report.md tells how to upload. None of this changes the report's files.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path


def artifact_key(preset: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"speedrun-{preset}-{what}".lower())


def inline_images(markdown: str, images: list[Path]) -> str:
    """Markdown whose links to these PNGs (by file name) carry the image itself: a relative link shows broken in
    the UI's artifact page."""
    for image in images:
        if image.exists():
            png = base64.b64encode(image.read_bytes()).decode()
            markdown = markdown.replace(f"]({image.name})", f"](data:image/png;base64,{png})")
    return markdown


def publish(result: dict, preset: str, out: Path | None = None, deployment: str | None = None) -> None:
    """The report, CORE, chat-eval and trend artifacts; the trend is keyed by the deployment where there is one
    (speedrun/nightly's trend is the nightly's, not mixed with manual runs of the same preset)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = inline_images(result["report"], [out / name for name in ("val_bpb.png", "trend.png")] if out else [])
    create_markdown_artifact(key=artifact_key(preset, "report"), markdown=markdown,
                             description=f"speedrun report ({preset})")
    if result["core_rows"]:
        create_table_artifact(key=artifact_key(preset, "core"), table=result["core_rows"],
                              description="CORE accuracy and centered accuracy per task")
    if result["chat_rows"]:
        create_table_artifact(key=artifact_key(preset, "chat-eval"), table=result["chat_rows"],
                              description="chat-eval accuracy per task")
    if result.get("trend_rows"):  # a stable key: the UI's artifact page keeps the trend night after night
        create_table_artifact(key=artifact_key(deployment or preset, "trend"), table=result["trend_rows"],
                              description=f"the last {len(result['trend_rows'])} {preset} runs on this hardware")


def log_wandb(summary: dict, options: dict, work: Path, log) -> None:
    """The summary as a wandb run's summary (offline by default: `wandb sync` uploads it later)."""
    if options.get("wandb_mode", "offline") == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project="speedrun", name=options.get("run", "report"), job_type="report",
                         mode=options.get("wandb_mode", "offline"), dir=str(work), config={"preset": summary["preset"]})
        # scalars only: the val bpb curve is pretraining's own wandb history already
        run.summary.update({k: v for k, v in summary.items() if v is not None and not isinstance(v, dict)})
        run.finish()
    except Exception as e:  # noqa: BLE001 - a wandb outage must not fail a finished pipeline
        log(f"report: the summary was not logged to wandb ({type(e).__name__}: {e})")


def offline_wandb_runs(store: str | Path) -> list[str]:
    """This flow run's offline wandb runs: the training stages write them to <store>/wandb/, with ids ending in
    the flow run's id (tasks/launch.py wandb_arguments)."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return []
    return [str(d) for d in sorted((Path(store) / "wandb").glob(f"offline-run-*-{str(flow_run.id)[:8]}"))]
