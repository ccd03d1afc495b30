"""The report stage: report.md, the val_bpb plot, summary.json and submission.md, and where the regression gate runs.

The last stage of the pipeline. It reads whichever upstream artifacts the run produced (a run stopped
with --until, or one without the chat stages, gets "not run" sections) and writes into its artifact:

    report.md       git commit and dirty flag, date, hardware/software, the resolved config, one section
                    per stage (metrics, timings), the CORE per-task table, the chat-eval table, samples,
                    a cost estimate at report.gpu_hour_cost $/GPU-hour, and the regression verdict
    val_bpb.png     pretraining val bpb vs step and vs training time
    trend.png       min val bpb and training time of the last runs of this preset on this hardware
                    (tasks/history.py; this run is appended to <store>/history/<preset>.jsonl first)
    summary.json    the leaderboard numbers (total_training_time, total_training_flops, min_val_bpb,
                    core_metric, chatcore, step, mfu, commit, ...)
    submission.md   what a leaderboard PR needs: hours, CORE (and whether it beats GPT-2's 0.256525),
                    val bpb, FLOPs, the exact launch command, the commit

The text and the plot are rendered in tasks/report_render.py. The report (plots inline), the CORE table and
the trend are published as Prefect artifacts and the summary goes to wandb (tasks/publish.py).

The regression verdict is decided in tasks/verdict.py (`judge`: the baseline and the recent history; how to
record a baseline) and rendered into report.md (tasks/report_render.py `regression_block`). Its one-line form (`verdict_line`)
is the report stage's `verdict_line` metric, which the flow makes its final state's message.

With report.regression on, the gate (tasks/verdict.py `gate`) raises after the files are written (so the
failing report can be read) but before the manifest, so a regressed report is never an artifact and never a
cache record: every run that regresses raises again. A passing report is cached like any stage. Its key
(`report_section`) holds the baseline it passed and what the history verdict depends on (`history_section`):
the digest of the preset's passing history entries other than this run's own, told apart by `run_identity`
(the pretraining's config and code: all the flow knows of it when it starts, before the pretrain artifact
exists; the identity itself is an option, not in the key). A rerun finds the same digest and stays Cached; a
new passing run of another pretraining changes it, so the report is rebuilt against the new history, and a
rebuild over unchanged numbers appends no history entry (tasks/history.py is_repeat), so reruns settle.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from prefect.logging import get_run_logger

from model.files import atomic_write_bytes, jsonl_rows
from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import ConfigError, SpeedrunConfig, build_config, load_config
from tasks.environment import package_version
from tasks.history import append_history, history_digest, plot_trend, read_history, trend, trend_markdown, trend_rows
from tasks.publish import log_wandb, offline_wandb_runs, publish
from tasks.stages import STAGES as STAGE_REGISTRY
from tasks.stages import code_fingerprint, key_section
from tasks.store import atomic_write_json, canonical_json, git_commit, read_manifest, sha256_bytes
from tasks.report_render import GPT2_CORE, STAGES, chat_rows, core_rows, plot_val_bpb, render_report, render_submission
from tasks.baselines import check_baseline
from tasks.verdict import gate, history_verdict, judge, verdict_line

REPORT = STAGE_REGISTRY["report"]
DEPLOYED_PRESETS = ("smoke", "cpu", "d12", "d20", "d24", "d26")  # prefect.yaml: speedrun/<preset>
# summary.json: key -> (where it comes from, in order of preference)
SUMMARY_SOURCES = {
    "step": [("pretrain", "step")],
    "total_training_time": [("pretrain", "total_training_time")],
    "total_training_flops": [("pretrain", "total_training_flops")],
    "min_val_bpb": [("pretrain", "min_val_bpb")],
    "val_bpb": [("base_eval", "val_bpb"), ("pretrain", "val_bpb")],
    "core_metric": [("base_eval", "core_metric"), ("pretrain", "core_metric")],
    "chatcore": [("chat_eval", "chatcore"), ("sft", "chatcore")],
    "mfu": [("pretrain", "mfu")],
    "tok_per_sec": [("pretrain", "tok_per_sec")],
    "sft_min_val_bpb": [("sft", "min_val_bpb")],
    "attention_backend": [("pretrain", "attention_backend")],
    "attention_reason": [("pretrain", "attention_reason")],
    "hardware": [("pretrain", "device")],
    "world_size": [("pretrain", "world_size")],
}


# ---------------------------------------------------------------------------------------------
# what the flow passes in

def report_section(cfg: SpeedrunConfig) -> dict:
    """The config the report renders, without machine paths, the baseline it must pass (if on), and what the
    history comparison depends on (`history_section`)."""
    return {"preset": cfg.preset, "config": portable_config(cfg), "gpu_hour_cost": cfg.report.gpu_hour_cost,
            "regression": check_baseline(cfg), "history": history_section(cfg)}


def report_options(cfg: SpeedrunConfig) -> dict:
    """Not in the key: where to log, the launch commands (they may hold this machine's paths), the deployment,
    whose name keys the trend artifact, and the run's identity, which its history entry records (in the key it
    would rebuild the report after an edit that leaves pretraining's output unchanged)."""
    return {"wandb_mode": cfg.runtime.wandb_mode, "run": f"{cfg.preset}-report", "launch": launch_commands(cfg),
            "deployment": deployment_name(), "run_identity": run_identity(cfg)}


def deployment_name() -> str | None:
    """The Prefect deployment running this flow (`nightly` for speedrun/nightly); None outside one."""
    from prefect.runtime import deployment  # works anywhere: None outside a deployment run

    return deployment.name


def run_identity(cfg: SpeedrunConfig) -> str:
    """What decides the pretraining's numbers, as far as the flow knows when it starts: the data, tokenizer and
    pretrain options in their keys, world size, device type, attention, torch, and the code those stages run.

    It stands in for the pretrain artifact, which exists only later: equal for a rerun of the same recipe, so a
    run's own history entries can be told apart before it trains (`history_section`). It may differ where the
    artifact does not (an edit that changes no bits, a launch option of the data) or agree where the artifact
    differs (other data behind the same source): either costs at most one extra report rebuild, never a stale
    verdict, since the comparison itself tells runs apart by the pretrain artifact's content.
    """
    pretrain = {**key_section(STAGE_REGISTRY["pretrain"], cfg.pretrain), "world_size": cfg.runtime.world_size,
                "device_type": cfg.pretrain.device_type or cfg.runtime.device_type or "auto",
                "attention": cfg.runtime.attention}
    code = {name: code_fingerprint(STAGE_REGISTRY[name], pretrain if name == "pretrain" else None)
            for name in ("shards", "tokenizer", "pretrain")}
    return sha256_bytes(canonical_json({
        "data": key_section(STAGE_REGISTRY["shards"], cfg.data),
        "tokenizer": key_section(STAGE_REGISTRY["tokenizer"], cfg.tokenizer), "pretrain": pretrain,
        "torch": package_version("torch"), "code": code}))


def history_section(cfg: SpeedrunConfig) -> dict:
    """What the report's key holds of the history, read when the flow starts: the digest of the preset's passing
    runs other than this run's own (tasks/history.py history_digest)."""
    return {"digest": history_digest(read_history(cfg.runtime.store, cfg.preset), cfg.preset, run_identity(cfg))}


def portable_config(cfg: SpeedrunConfig) -> dict:
    """The resolved config with the store dropped and the mirror written as $MIRROR (keys stay shareable)."""
    dump = cfg.model_dump()
    dump["runtime"].pop("store")
    mirror = cfg.runtime.mirror

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, str) and mirror and (v == mirror or v.startswith(mirror + os.sep)):
            return "$MIRROR" + v[len(mirror):]
        return v
    return clean(dump)


def config_overrides(cfg: SpeedrunConfig) -> dict[str, object]:
    """{"section.key": value} for every option that differs from the preset (what --set/overrides gave)."""
    try:
        base = load_config(cfg.preset, mirror=cfg.runtime.mirror, store=cfg.runtime.store).model_dump()
    except ConfigError:
        base = build_config({"preset": cfg.preset}).model_dump()  # no such preset file: diff from the defaults
    out = {}
    for section, values in cfg.model_dump().items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if (section, key) in (("runtime", "store"), ("runtime", "mirror")):
                continue
            if base.get(section, {}).get(key) != value:
                out[f"{section}.{key}"] = value
    return out


def launch_commands(cfg: SpeedrunConfig) -> dict:
    """The command lines that reproduce this run: the flow CLI and the deployment run."""
    overrides = config_overrides(cfg)
    cli = ["python", "-m", "flows.speedrun", "--preset", cfg.preset]
    for key, value in overrides.items():
        cli += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    params: dict = {}
    if overrides:
        params["overrides"] = overrides
    if cfg.runtime.mirror:
        cli += ["--mirror", cfg.runtime.mirror]
        params["mirror"] = cfg.runtime.mirror
    name = cfg.preset if cfg.preset in DEPLOYED_PRESETS else "smoke"
    if name != cfg.preset:
        params["preset"] = cfg.preset
    deploy = ["prefect", "deployment", "run", f"speedrun/{name}"] + (["--params", json.dumps(params)] if params else [])
    return {"cli": shlex.join(cli), "deployment": shlex.join(deploy)}


# ---------------------------------------------------------------------------------------------
# reading the upstream artifacts

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [record for _, record in jsonl_rows(path.read_text().splitlines())]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def gather(upstream: dict) -> dict:
    """Per present stage: its record, manifest, summary.json and metrics.jsonl (where it has them)."""
    stages = {}
    for name in STAGES:
        if name not in upstream:
            continue
        art = Path(upstream[name]["path"])
        stages[name] = {"record": upstream[name], "art": art, "manifest": read_manifest(art) or {},
                        "summary": read_json(art / "summary.json"), "metrics": upstream[name].get("metrics") or {},
                        "curve": read_jsonl(art / "metrics.jsonl")}
    return stages


def build_summary(stages: dict, preset: str) -> dict:
    summary: dict = {"preset": preset}
    for key, sources in SUMMARY_SOURCES.items():
        summary[key] = next((stages[s]["metrics"][k] for s, k in sources
                             if s in stages and stages[s]["metrics"].get(k) is not None), None)
    built_by = (stages.get("pretrain") or {}).get("manifest", {}).get("environment", {}).get("git_commit") \
        or git_commit()
    summary["commit"], summary["dirty"] = built_by.get("short"), built_by.get("dirty")
    t = summary["total_training_time"]
    summary["total_training_time_hours"] = None if t is None else t / 3600
    core = summary["core_metric"]
    summary["beats_gpt2"] = None if core is None else core > GPT2_CORE
    summary["val_bpb_curve"] = val_bpb_curve(stages)  # what --write-baseline records as the baseline's curve
    return summary


def val_bpb_curve(stages: dict) -> dict[str, float]:
    """{"<step>": val bpb} of pretraining's evaluations, in step order (a step evaluated twice, as around a
    resume, keeps its last value); steps are strings, as summary.json keeps them."""
    points = {int(r["step"]): r["val/bpb"] for r in stages.get("pretrain", {}).get("curve", []) if "val/bpb" in r}
    return {str(step): points[step] for step in sorted(points)}


def run_fields(stages: dict, options: dict) -> dict:
    """Which pretraining this report's numbers come from, for its history entry (tasks/history.py RUN_FIELDS)."""
    record = (stages.get("pretrain") or {}).get("record") or {}
    return {"pretrain_key": record.get("key"), "pretrain_sha256": record.get("content_sha256"),
            "run_identity": options.get("run_identity")}


# ---------------------------------------------------------------------------------------------
# the machine and the cost

def system_info() -> dict:
    """The machine rendering the report (the node the pipeline ran on, for a worker or local run)."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        info["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["ram_gb"] = None
    info["gpus"] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
            info["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    for package in ("torch", "prefect", "wandb"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def cost_estimate(stages: dict, config: dict, gpu_hour_cost: float) -> dict:
    """GPU count x hours x $/GPU-hour, for pretraining alone and for every stage's wall time."""
    pre = stages.get("pretrain", {}).get("metrics", {})
    runtime = config.get("runtime", {})
    device = str(pre.get("device") or runtime.get("device_type") or "")
    on_gpu = device not in ("", "cpu", "mps")
    gpus = (pre.get("world_size") or runtime.get("nproc_per_node", 1) * runtime.get("nnodes", 1)) if on_gpu else 0
    wall_s = sum(s["manifest"].get("timings", {}).get("seconds", 0.0) for s in stages.values())
    train_s = pre.get("total_training_time") or 0.0
    return {"gpus": gpus, "device": device or "unknown", "gpu_hour_cost": gpu_hour_cost, "stage_wall_s": wall_s,
            "training_cost": gpus * train_s / 3600 * gpu_hour_cost, "pipeline_cost": gpus * wall_s / 3600 * gpu_hour_cost}


# ---------------------------------------------------------------------------------------------
# the stage

def write_report(section: dict, upstream: dict, out: Path, options: dict | None = None,
                 now: datetime | None = None, history: list[dict] | None = None) -> dict:
    """Write report.md, val_bpb.png, summary.json and submission.md into `out`; no Prefect needed.

    `history`: the preset's history entries as read from the store before this run's (tasks/history.py).
    Returns {"summary", "verdict" (`judge`), "run" (this run's pretraining, for its history entry),
    "core_rows", "chat_rows", "report"}.
    """
    options = options or {}
    now = now or datetime.now(timezone.utc)
    stages = gather(upstream)
    summary = build_summary(stages, section["preset"])
    run = run_fields(stages, options)
    verdict = judge(summary, summary["val_bpb_curve"], section["regression"], history or [], run)
    launch = options.get("launch") or {}
    plot_val_bpb(stages.get("pretrain", {}).get("curve", []), out / "val_bpb.png", f"{section['preset']}: pretraining")
    report = render_report(section, stages, summary, verdict, cost_estimate(stages, section["config"],
                           section["gpu_hour_cost"]), system_info(), launch, now, options.get("wandb_runs", []))
    atomic_write_bytes(out / "report.md", report.encode())
    atomic_write_bytes(out / "submission.md", render_submission(section, stages, summary, launch, now).encode())
    atomic_write_json(out / "summary.json", summary)
    return {"summary": summary, "verdict": verdict, "run": run, "core_rows": core_rows(stages),
            "chat_rows": chat_rows(stages), "report": report}


def add_trend(result: dict, preset: str, out: Path, store_root: Path) -> None:
    """Record this run in the preset's history (tasks/history.py), then add the trend of like runs to the
    report: a section in report.md, trend.png, and the rows for the trend table artifact."""
    entry = append_history(store_root, result["summary"], history_verdict(result["verdict"]), result["run"])
    rows = trend_rows(trend(read_history(store_root, preset), entry))
    plot_trend(rows, out / "trend.png", f"{preset} on {entry['world_size'] or '?'} x {entry['hardware'] or '?'}")
    result["trend_rows"] = rows
    result["report"] += "\n".join(["", f"## Trend: the last {len(rows)} {preset} runs on this hardware", "",
                                    "![trend](trend.png)", "", *trend_markdown(rows), ""])
    atomic_write_bytes(out / "report.md", result["report"].encode())


@stage_task(REPORT)
def report_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        history = read_history(store, section["preset"])  # before this run's entry is appended
        result = write_report(section, upstream, art, {**options, "wandb_runs": offline_wandb_runs(store)},
                              history=history)
        add_trend(result, section["preset"], art, Path(store))
        publish(result, section["preset"], art, options.get("deployment"))
        log_wandb(result["summary"], options, work, logger.warning)
        logger.info(f"report: {art / 'report.md'} and {art / 'submission.md'}")
        gate(section, result)  # after the files and artifacts exist, before the manifest: a failure is never cached
        line = verdict_line(result["summary"], result["verdict"])
        logger.info(f"report: {line}")
        metrics = {k: v for k, v in result["summary"].items() if k != "val_bpb_curve"}  # in summary.json
        return StageOutput(metrics={**metrics, "regression": history_verdict(result["verdict"]), "verdict_line": line})

    return run_stage(REPORT, section, upstream, store, rebuild, build)
