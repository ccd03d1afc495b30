"""The report stage: report.md, the val_bpb plot, summary.json, submission.md and the regression gate.

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

The report (plots inline), the CORE table and the trend are published as Prefect artifacts and the summary goes to wandb
(offline unless runtime.wandb_mode=online). With report.regression on, the summary is compared with
deployments/baselines/<preset>.yaml and `RegressionDetected` is raised naming every failing metric.
The gate raises after the files are written (so the failing report can be read) but before the
manifest, so a regressed report is never an artifact and never a cache record: every run that regresses
raises again. A passing report is cached like any stage: its key holds the baseline it passed.

    python -m tasks.report --write-baseline d12 <store>/stages/report/<key>/summary.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml
from prefect.logging import get_run_logger

from tasks.cache import StageOutput, run_stage, stage_task
from tasks.config import ConfigError, SpeedrunConfig, build_config, load_config
from tasks.history import append_history, plot_trend, read_history, trend, trend_markdown, trend_rows
from tasks.plots import save_png, two_panels
from tasks.stages import STAGES as STAGE_REGISTRY
from tasks.store import PROJECT_ROOT, atomic_write_bytes, atomic_write_json, git_commit, read_manifest

REPORT = STAGE_REGISTRY["report"]
BASELINES_DIR = PROJECT_ROOT / "deployments" / "baselines"
DEPLOYED_PRESETS = ("smoke", "cpu", "d12", "d20", "d24", "d26")  # prefect.yaml: speedrun/<preset>
GPT2_CORE = 0.256525  # CORE of OpenAI's GPT-2 1.6B checkpoint: the leaderboard's bar (spec/10 §2)
STAGES = {name: stage.title for name, stage in STAGE_REGISTRY.items() if name != "report"}  # report order, titles
# Metrics rendered as their own tables rather than as bullet lines.
TABLED = {"core_results", "core_centered", "tasks", "rows", "samples", "hyperparameters"}
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
# Baseline metrics: which direction is better.
DIRECTIONS = {"min_val_bpb": "lower", "val_bpb": "lower", "sft_min_val_bpb": "lower", "total_training_time": "lower",
              "core_metric": "higher", "chatcore": "higher", "mfu": "higher", "tok_per_sec": "higher"}


class RegressionDetected(Exception):
    """The run is worse than its baseline by more than the tolerance on at least one metric."""

    def __init__(self, baseline: str, failures: list[dict]):
        self.baseline, self.failures = baseline, failures
        lines = [f"{f['metric']}: value {_fmt(f['value'])} vs baseline {_fmt(f['baseline'])} "
                 f"({f['direction']} is better, tolerance {_fmt(f['tolerance'])})" for f in failures]
        super().__init__(f"regression against baseline {baseline!r}:\n" + "\n".join(f"  - {l}" for l in lines))

    def __reduce__(self):  # pickles (Prefect persists task exceptions) with the constructor's real arguments
        return type(self), (self.baseline, self.failures)


# ---------------------------------------------------------------------------------------------
# what the flow passes in

def report_section(cfg: SpeedrunConfig) -> dict:
    """The config the report renders, without machine paths, and the baseline it must pass (if on)."""
    return {"preset": cfg.preset, "config": portable_config(cfg), "gpu_hour_cost": cfg.report.gpu_hour_cost,
            "regression": check_baseline(cfg)}


def report_options(cfg: SpeedrunConfig) -> dict:
    """Not in the key: where to log, and the launch commands (they may hold this machine's paths)."""
    return {"wandb_mode": cfg.runtime.wandb_mode, "run": f"{cfg.preset}-report", "launch": launch_commands(cfg)}


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
# baselines and the regression gate

def load_baseline(name: str, directory: Path = BASELINES_DIR) -> dict:
    """{metric: {value, tolerance, direction}} from deployments/baselines/<name>.yaml; ConfigError if unusable."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"
        raise ConfigError([f"report.baseline: no baseline {path.name} in deployments/baselines (have: {known}); fix: "
                           f"--set report.baseline=<name>, or record one with python -m tasks.report --write-baseline "
                           f"{name} <summary.json>"])
    data = yaml.safe_load(path.read_text()) or {}
    metrics, problems = {}, []
    for metric, spec in (data.get("metrics") or {}).items():
        if metric not in DIRECTIONS:
            problems.append(f"{path.name}: unknown metric {metric!r}; fix: use one of {', '.join(DIRECTIONS)}")
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("value"), (int, float)):
            problems.append(f"{path.name}: {metric} needs a numeric value, e.g. {{value: 0.75, tolerance: 0.005}}")
            continue
        tol = float(spec.get("tolerance", 0.0)) + abs(float(spec["value"])) * float(spec.get("rel_tolerance", 0.0))
        if tol < 0:
            problems.append(f"{path.name}: {metric} has a negative tolerance")
        metrics[metric] = {"value": float(spec["value"]), "tolerance": tol, "direction": DIRECTIONS[metric]}
    if not metrics and not problems:
        problems.append(f"{path.name} lists no metrics; fix: record a good run with python -m tasks.report "
                        f"--write-baseline {name} <summary.json>, or --set report.baseline=<another>")
    if problems:
        raise ConfigError(problems)
    return metrics


def check_baseline(cfg: SpeedrunConfig) -> dict | None:
    """The baseline a run with report.regression on must pass (raises ConfigError early if it is unusable)."""
    if not cfg.report.regression:
        return None
    name = cfg.report.baseline or cfg.preset
    return {"baseline": name, "metrics": load_baseline(name)}


def compare(summary: dict, regression: dict) -> list[dict]:
    """One row per baseline metric: value, baseline, tolerance, direction and whether it passes."""
    rows = []
    for metric, spec in regression["metrics"].items():
        value, base, tol = summary.get(metric), spec["value"], spec["tolerance"]
        if value is None:
            ok = False  # asked for but not measured (a stage did not run): a nightly must not pass silently
        elif spec["direction"] == "lower":
            ok = value <= base + tol
        else:
            ok = value >= base - tol
        rows.append({"metric": metric, "value": value, "baseline": base, "tolerance": tol,
                     "direction": spec["direction"], "ok": ok})
    return rows


# ---------------------------------------------------------------------------------------------
# reading the upstream artifacts

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    return summary


def launch_line(stage: dict | None) -> str | None:
    """The torchrun command a stage ran, as its log recorded it (first line starting with '$ ')."""
    if not stage or not (stage["art"] / "log.txt").is_file():
        return None
    with open(stage["art"] / "log.txt") as f:
        return next((line[2:].strip() for line in f if line.startswith("$ ")), None)


# ---------------------------------------------------------------------------------------------
# rendering

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4e}" if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-3) else f"{v:.6g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, separators=(", ", ": ")) + "`"
    return str(v)


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


def stage_block(name: str, stage: dict | None) -> list[str]:
    out = [f"## {STAGES[name]} (`{name}`)", ""]
    if stage is None:
        return out + ["not run", ""]
    m, env = stage["manifest"], stage["manifest"].get("environment", {})
    timings, commit = m.get("timings", {}), env.get("git_commit") or {}
    out += [f"- artifact: `{stage['art']}`", f"- key: `{stage['record']['key'][:16]}`",
            f"- built: {timings.get('started_at', '-')} -> {timings.get('finished_at', '-')} "
            f"({_fmt(timings.get('seconds'))} s)",
            f"- code: {commit.get('short') or '-'}{' (dirty)' if commit.get('dirty') else ''}, torch "
            f"{env.get('torch', '-')}, host {env.get('host', '-')}, attention {env.get('attention_backend', '-')}"]
    out += [f"- {k}: {_fmt(v)}" for k, v in stage["metrics"].items() if k not in TABLED]
    return out + [""]


def core_rows(stages: dict) -> list[dict]:
    m = stages.get("base_eval", {}).get("metrics", {})
    results, centered = m.get("core_results") or {}, m.get("core_centered") or {}
    return [{"task": t, "accuracy": acc, "centered": centered.get(t)} for t, acc in results.items()]


def chat_rows(stages: dict) -> list[dict]:
    tasks = stages.get("chat_eval", {}).get("metrics", {}).get("tasks") or {}
    return [{"task": t, "accuracy": r.get("accuracy"), "passed": r.get("passed"), "total": r.get("total")}
            for t, r in tasks.items()]


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]


def regression_block(verdict: list[dict] | None, regression: dict | None) -> list[str]:
    out = ["## Regression check", ""]
    if regression is None:
        return out + ["off (`report.regression=false`)", ""]
    failed = [r["metric"] for r in verdict if not r["ok"]]
    rows = [{**r, "ok": "PASS" if r["ok"] else "FAIL"} for r in verdict]
    out += table(rows) + [""]
    if failed:
        return out + [f"**Verdict: FAIL** against baseline `{regression['baseline']}`: {', '.join(failed)}", ""]
    return out + [f"**Verdict: PASS**: all {len(verdict)} metrics within tolerance of baseline "
                  f"`{regression['baseline']}`", ""]


def render_report(section: dict, stages: dict, summary: dict, verdict, cost: dict, system: dict,
                  launch: dict, now: datetime) -> str:
    head = git_commit()
    out = [f"# Speedrun report: {section['preset']}", "",
           f"- date: {now.isoformat(timespec='seconds')}",
           f"- git commit: {head.get('sha') or 'unknown'} (dirty: {_fmt(head.get('dirty'))})",
           f"- training code commit: {summary['commit'] or 'unknown'} (dirty: {_fmt(summary['dirty'])})",
           f"- hardware: {system['platform']}, {system['cpus']} CPUs, {_fmt(system['ram_gb'])} GB RAM, GPUs: "
           f"{'; '.join(system['gpus']) or 'none'}",
           f"- software: python {system['python']}, torch {system['torch']}, prefect {system['prefect']}, "
           f"wandb {system['wandb']}",
           f"- attention: {summary['attention_backend'] or '-'} ({summary['attention_reason'] or 'not recorded'})",
           f"- launch: `{launch.get('cli', '-')}`", "", "## Summary", ""]
    out += table([{"metric": k, "value": v} for k, v in summary.items()]) + [""]
    headline = [{"metric": "CORE", "BASE": summary["core_metric"], "SFT": None}]
    headline += [{"metric": r["task"], "BASE": None, "SFT": r["accuracy"]} for r in sorted(chat_rows(stages),
                                                                                          key=lambda r: r["task"])]
    headline += [{"metric": "ChatCORE", "BASE": None, "SFT": summary["chatcore"]}]
    out += table(headline) + [""]
    out += [f"- cost: {cost['gpus']} GPU(s) ({cost['device']}) at ${cost['gpu_hour_cost']:.2f}/GPU-hour: "
            f"pretraining ${cost['training_cost']:.2f}, all stages (wall {cost['stage_wall_s']:.0f} s) "
            f"${cost['pipeline_cost']:.2f}", ""]
    out += regression_block(verdict, section["regression"])
    for name in STAGES:
        out += stage_block(name, stages.get(name))
        if name == "pretrain" and name in stages:
            evals = [{"step": r["step"], "total_training_time": r.get("total_training_time"), "val_bpb": r["val/bpb"]}
                     for r in stages[name]["curve"] if "val/bpb" in r]
            out += ["![val bpb](val_bpb.png)", ""] + table(evals) + [""]
            cmd = launch_line(stages[name])
            out += ["Launched as:", "", "```", cmd or "-", "```", ""]
        if name == "base_eval" and name in stages:
            out += ["### CORE per task", ""] + (table(core_rows(stages)) or ["no CORE results"]) + [""]
            samples = stages[name]["summary"].get("samples") or []
            out += ["### Samples", ""] + (["```"] + [f"{s['prompt']}{s['completion']}".replace("```", "'''")
                                                      for s in samples] + ["```"] if samples else ["none"]) + [""]
        if name == "chat_eval" and name in stages:
            out += ["### Chat tasks", ""] + (table(chat_rows(stages)) or ["no tasks"])
            out += ["", f"ChatCORE: {_fmt(summary['chatcore'])}", ""]
    offline = [d for name in ("pretrain", "sft") if name in stages
               for d in sorted((stages[name]["art"] / "work" / "run" / "wandb").glob("offline-run-*"))]
    if offline:  # offline wandb runs stay on the node until someone uploads them
        out += ["## wandb", "", "Offline runs of this pipeline; upload them with:", "", "```"] + \
            [f"wandb sync {d}" for d in offline] + ["```", ""]
    out += ["## Resolved config", "", "```yaml", yaml.safe_dump(section["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(out)


def render_submission(section: dict, stages: dict, summary: dict, launch: dict, now: datetime) -> str:
    pre = stages.get("pretrain", {}).get("metrics", {})
    hours, core = summary["total_training_time_hours"], summary["core_metric"]
    beats = "not measured" if core is None else ("yes" if summary["beats_gpt2"] else "no")
    warnings = []
    if summary["dirty"]:
        warnings.append("the training code had uncommitted changes: commit them and rerun before submitting")
    if not (pre.get("world_size") == 8 and "H100" in str(pre.get("device"))):
        warnings.append(f"ran on {pre.get('world_size', '?')} x {pre.get('device', '?')}: the leaderboard times 8xH100")
    if core is None:
        warnings.append("CORE was not measured (base_eval did not run)")
    if summary["attention_backend"] not in (None, "fa3", "fa4") and "H100" in str(pre.get("device")):
        warnings.append(f"attention ran on {summary['attention_backend']}, not a fused kernel: the time is not "
                        "comparable (runtime.attention=fused; README: Attention on GPUs)")
    rows = [("time (hours)", None if hours is None else f"{hours:.4f}"),
            ("total_training_time (s)", summary["total_training_time"]), ("CORE", core),
            (f"beats GPT-2 CORE {GPT2_CORE}", beats), ("val bpb (min, pretraining)", summary["min_val_bpb"]),
            ("total_training_flops", summary["total_training_flops"]), ("step", summary["step"]),
            ("commit", summary["commit"]), ("hardware", f"{pre.get('world_size', '?')} x {pre.get('device', '?')}"),
            ("attention", summary["attention_backend"])]
    out = [f"# Leaderboard submission: {section['preset']}", "", "| field | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    out += ["", "Leaderboard row (dev/LEADERBOARD.md):", "", "| # | time (h) | val_bpb | CORE | description | date | commit |",
            "|---|---|---|---|---|---|---|",
            f"| ? | {'-' if hours is None else f'{hours:.2f}'} | {_fmt(summary['min_val_bpb'])} | {_fmt(core)} | "
            f"<what changed> | {now.strftime('%b %d %Y')} | {summary['commit'] or '-'} |", "",
            "## Launch command", "", "```bash", launch.get("cli", "-"), "```", "",
            "As a deployment run:", "", "```bash", launch.get("deployment", "-"), "```", "",
            "Pretraining as the pipeline launched it:", "", "```bash", launch_line(stages.get("pretrain")) or "-", "```", ""]
    if warnings:
        out += ["## Before submitting", ""] + [f"- {w}" for w in warnings] + [""]
    return "\n".join(out)


def plot_val_bpb(curve: list[dict], path: Path, title: str) -> None:
    """val bpb vs step and vs training time (two panels), written atomically."""
    points = [r for r in curve if "val/bpb" in r]
    fig, (a, b) = two_panels()
    a.plot([r["step"] for r in points], [r["val/bpb"] for r in points], marker="o")
    b.plot([r.get("total_training_time", 0.0) / 60 for r in points], [r["val/bpb"] for r in points], marker="o")
    a.set_xlabel("step")
    b.set_xlabel("training time (min, excluding eval and warm-up steps)")
    for ax in (a, b):
        ax.set_ylabel("val bpb")
        ax.grid(alpha=0.3)
    if not points:
        a.set_title("no val bpb evaluations")
    save_png(fig, path, title)


# ---------------------------------------------------------------------------------------------
# the stage

def write_report(section: dict, upstream: dict, out: Path, options: dict | None = None,
                 now: datetime | None = None) -> dict:
    """Write report.md, val_bpb.png, summary.json and submission.md into `out`; no Prefect needed.

    Returns {"summary", "verdict", "core_rows", "chat_rows", "report"}; verdict is None with regression off.
    """
    options = options or {}
    now = now or datetime.now(timezone.utc)
    stages = gather(upstream)
    summary = build_summary(stages, section["preset"])
    verdict = compare(summary, section["regression"]) if section["regression"] else None
    launch = options.get("launch") or {}
    plot_val_bpb(stages.get("pretrain", {}).get("curve", []), out / "val_bpb.png", f"{section['preset']}: pretraining")
    report = render_report(section, stages, summary, verdict, cost_estimate(stages, section["config"],
                           section["gpu_hour_cost"]), system_info(), launch, now)
    atomic_write_bytes(out / "report.md", report.encode())
    atomic_write_bytes(out / "submission.md", render_submission(section, stages, summary, launch, now).encode())
    atomic_write_json(out / "summary.json", summary)
    return {"summary": summary, "verdict": verdict, "core_rows": core_rows(stages), "chat_rows": chat_rows(stages),
            "report": report}


def gate(section: dict, result: dict) -> None:
    """Raise RegressionDetected naming every metric that misses the baseline (nothing if regression is off)."""
    failures = [r for r in result["verdict"] or [] if not r["ok"]]
    if failures:
        raise RegressionDetected(section["regression"]["baseline"], failures)


def artifact_key(preset: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"speedrun-{preset}-{what}".lower())


def add_trend(result: dict, preset: str, out: Path, store_root: Path) -> None:
    """Record this run in the preset's history (tasks/history.py), then add the trend of like runs to the
    report: a section in report.md, trend.png, and the rows for the trend table artifact."""
    verdict = None if result["verdict"] is None else ("pass" if all(r["ok"] for r in result["verdict"]) else "fail")
    entry = append_history(store_root, result["summary"], verdict)
    rows = trend_rows(trend(read_history(store_root, preset), entry))
    plot_trend(rows, out / "trend.png", f"{preset} on {entry['world_size'] or '?'} x {entry['hardware'] or '?'}")
    result["trend_rows"] = rows
    result["report"] += "\n".join(["", f"## Trend: the last {len(rows)} {preset} runs on this hardware", "",
                                    "![trend](trend.png)", "", *trend_markdown(rows), ""])
    atomic_write_bytes(out / "report.md", result["report"].encode())


def publish(result: dict, preset: str, out: Path | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = result["report"]
    for image in ("val_bpb.png", "trend.png"):  # inline: a relative link shows broken in the UI
        if out is not None and (out / image).exists():
            png = base64.b64encode((out / image).read_bytes()).decode()
            markdown = markdown.replace(f"]({image})", f"](data:image/png;base64,{png})")
    create_markdown_artifact(key=artifact_key(preset, "report"), markdown=markdown,
                             description=f"speedrun report ({preset})")
    if result["core_rows"]:
        create_table_artifact(key=artifact_key(preset, "core"), table=result["core_rows"],
                              description="CORE accuracy and centered accuracy per task")
    if result["chat_rows"]:
        create_table_artifact(key=artifact_key(preset, "chat-eval"), table=result["chat_rows"],
                              description="chat-eval accuracy per task")
    if result.get("trend_rows"):  # a stable key: the UI's artifact page keeps the trend night after night
        create_table_artifact(key=artifact_key(preset, "trend"), table=result["trend_rows"],
                              description=f"the last {len(result['trend_rows'])} {preset} runs on this hardware")


def log_wandb(summary: dict, options: dict, work: Path, log) -> None:
    """The summary as a wandb run's summary (offline by default: `wandb sync` uploads it later)."""
    if options.get("wandb_mode", "offline") == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project="speedrun", name=options.get("run", "report"), job_type="report",
                         mode=options.get("wandb_mode", "offline"), dir=str(work), config={"preset": summary["preset"]})
        run.summary.update({k: v for k, v in summary.items() if v is not None})
        run.finish()
    except Exception as e:  # noqa: BLE001 - a wandb outage must not fail a finished pipeline
        log(f"report: the summary was not logged to wandb ({type(e).__name__}: {e})")


@stage_task(REPORT)
def report_stage(section: dict, upstream: dict, store: str, options: dict, rebuild: str | None = None) -> dict:
    logger = get_run_logger()

    def build(art: Path, work: Path) -> StageOutput:
        result = write_report(section, upstream, art, options)
        add_trend(result, section["preset"], art, Path(store))
        publish(result, section["preset"], art)
        log_wandb(result["summary"], options, work, logger.warning)
        logger.info(f"report: {art / 'report.md'} and {art / 'submission.md'}")
        gate(section, result)  # after the files and artifacts exist, before the manifest: a failure is never cached
        if result["verdict"] is not None:
            logger.info(f"report: no regression against baseline {section['regression']['baseline']!r}")
        return StageOutput(metrics={**result["summary"], "regression": None if result["verdict"] is None else "pass"})

    return run_stage(REPORT, section, upstream, store, rebuild, build)


# ---------------------------------------------------------------------------------------------
# recording a baseline from a good run

DEFAULT_TOLERANCES = {"min_val_bpb": {"tolerance": 0.005}, "val_bpb": {"tolerance": 0.01},
                      "core_metric": {"tolerance": 0.015}, "chatcore": {"tolerance": 0.03},
                      "total_training_time": {"rel_tolerance": 0.05}}


def baseline_from_summary(summary: dict, note: str) -> str:
    metrics = {m: {"value": summary[m], **tol} for m, tol in DEFAULT_TOLERANCES.items() if summary.get(m) is not None}
    return f"# {note}\n" + yaml.safe_dump({"preset": summary.get("preset"), "commit": summary.get("commit"),
                                           "metrics": metrics}, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.report", description="Record a regression baseline.")
    p.add_argument("--write-baseline", metavar="NAME", required=True, help="deployments/baselines/NAME.yaml")
    p.add_argument("summary", type=Path, help="a report artifact's summary.json")
    p.add_argument("--dir", type=Path, default=BASELINES_DIR, help="baselines directory (default: %(default)s)")
    args = p.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    text = baseline_from_summary(summary, f"recorded from {args.summary} (commit {summary.get('commit')}); "
                                          "edit the tolerances to taste")
    path = args.dir / f"{args.write_baseline}.yaml"
    atomic_write_bytes(path, text.encode())
    load_baseline(args.write_baseline, args.dir)  # what the gate will read must parse
    print(f"wrote {path}:\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
