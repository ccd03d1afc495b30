"""report.md and submission.md as text, and the val bpb plot: what the report stage (tasks/report.py) writes.

The functions here render what they are given (the gathered stages, the summary, the verdict of
tasks/verdict.py, the machine's description, the launch commands) and read nothing but a stage's log.txt,
for the torchrun line it ran. Sections come in the stage registry's order, under its titles (tasks/stages.py).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml

from tasks.plots import save_png, two_panels
from tasks.stages import STAGES as STAGE_REGISTRY
from tasks.store import git_commit
from tasks.verdict import HISTORY_MIN_RUNS, HISTORY_REL_FLOOR, HISTORY_SIGMAS, curve_failures, format_value

GPT2_CORE = 0.256525  # CORE of OpenAI's GPT-2 1.6B checkpoint: the leaderboard's bar (docs/evaluation.md#the-gpt-2-bar)
STAGES = {name: stage.title for name, stage in STAGE_REGISTRY.items() if name != "report"}  # report order, titles
# Metrics rendered as their own tables rather than as bullet lines.
TABLED = {"core_results", "core_centered", "tasks", "rows", "samples", "hyperparameters"}


def launch_line(stage: dict | None) -> str | None:
    """The torchrun command a stage ran, as its log recorded it (first line starting with '$ ')."""
    if not stage or not (stage["art"] / "log.txt").is_file():
        return None
    with open(stage["art"] / "log.txt") as f:
        return next((line[2:].strip() for line in f if line.startswith("$ ")), None)



def stage_block(name: str, stage: dict | None) -> list[str]:
    out = [f"## {STAGES[name]} (`{name}`)", ""]
    if stage is None:
        return out + ["not run", ""]
    m, env = stage["manifest"], stage["manifest"].get("environment", {})
    timings, commit = m.get("timings", {}), env.get("git_commit") or {}
    out += [f"- artifact: `{stage['art']}`", f"- key: `{stage['record']['key'][:16]}`",
            f"- built: {timings.get('started_at', '-')} -> {timings.get('finished_at', '-')} "
            f"({format_value(timings.get('seconds'))} s)",
            f"- code: {commit.get('short') or '-'}{' (dirty)' if commit.get('dirty') else ''}, torch "
            f"{env.get('torch', '-')}, host {env.get('host', '-')}, attention {env.get('attention_backend', '-')}"]
    out += [f"- {k}: {format_value(v)}" for k, v in stage["metrics"].items() if k not in TABLED]
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
        ["| " + " | ".join(format_value(r[c]) for c in cols) + " |" for r in rows]


def regression_block(verdict: dict) -> list[str]:
    """The verdict in report.md: the baseline (metrics, val bpb curve), the recent history, PASS or FAIL."""
    out = ["## Regression check", ""]
    if not verdict["regression"]:
        out += ["off (`report.regression=false`): the recent history below is shown for information", ""]
    else:
        out += baseline_lines(verdict)
    out += history_lines(verdict["history"])
    if not verdict["regression"]:
        return out
    if verdict["failures"]:
        return out + ["**Verdict: FAIL**:", ""] + [f"- {f['message']}" for f in verdict["failures"]] + [""]
    compared = [f"{len(verdict['static'])} baseline metrics"] if verdict["static"] else []
    if verdict["curve"]:
        compared.append("the val bpb curve")
    if verdict["history"]["compared"]:
        compared.append(f"the last {verdict['history']['runs']} like runs")
    return out + [f"**Verdict: PASS**: within the bands of {', '.join(compared) or 'nothing: nothing was comparable'}",
                  ""]


def baseline_lines(verdict: dict) -> list[str]:
    """The baseline part of the verdict: whether it was compared (hardware), its metrics, its val bpb curve."""
    out = [f"### Baseline `{verdict['baseline']}`", "", verdict["like"]["note"], ""]
    if not verdict["like"]["compared"]:
        return out
    rows = [{**r, "ok": "PASS" if r["ok"] else "FAIL"} for r in verdict["static"]]
    out += (table(rows) + [""]) if rows else []
    curve = verdict["curve"]
    if curve is not None:
        bad = curve_failures(curve)
        text = bad[0]["message"] if bad else (f"all {len(curve['rows'])} common eval steps within ±"
                                               f"{curve['tolerance']:.4f} of the baseline")
        out += [f"- val bpb curve: {'FAIL' if bad else 'PASS'}: {text}", ""]
    return out


def history_lines(history: dict) -> list[str]:
    """The recent-history part of the verdict: which runs, and each metric's median, band and result."""
    out = ["### Recent history", ""]
    like = f"passing runs of this preset on {history['machine']}, one per pretraining, this run's own left out"
    if not history["compared"]:
        return out + [f"history: {history['runs']} of {HISTORY_MIN_RUNS} like runs, not compared ({like})", ""]
    out += [f"The last {history['runs']} {like} (commits {', '.join(history['commits'])}); band: median ± "
            f"max({HISTORY_SIGMAS} x 1.4826 x MAD, the baseline's tolerance, {HISTORY_REL_FLOOR:.1%} of the median); "
            "only the worse side fails.", ""]
    rows = [{"metric": r["metric"], "value": r["value"], "median": r["median"],
             "band": "-" if r["low"] is None else f"[{format_value(r['low'])}, {format_value(r['high'])}]",
             "runs": r["runs"], "ok": _history_ok(r)} for r in history["rows"]]
    return out + table(rows) + [""]


def _history_ok(row: dict) -> str:
    """A history row's result as the table shows it, saying why a metric was not compared."""
    if row["ok"] is None:
        return "not compared (not measured)" if row["value"] is None else "not compared (too few runs measured it)"
    if row["ok"]:
        return "PASS"
    return "FAIL" if row["gates"] else "worse (shown only: CPU time varies with load)"


def render_report(section: dict, stages: dict, summary: dict, verdict, cost: dict, system: dict,
                  launch: dict, now: datetime, offline: list[str] = ()) -> str:
    """report.md; `offline`: this run's offline wandb run directories, listed with their `wandb sync`."""
    head = git_commit()
    out = [f"# Speedrun report: {section['preset']}", "",
           f"- date: {now.isoformat(timespec='seconds')}",
           f"- git commit: {head.get('sha') or 'unknown'} (dirty: {format_value(head.get('dirty'))})",
           f"- training code commit: {summary['commit'] or 'unknown'} (dirty: {format_value(summary['dirty'])})",
           f"- hardware: {system['platform']}, {system['cpus']} CPUs, {format_value(system['ram_gb'])} GB RAM, GPUs: "
           f"{'; '.join(system['gpus']) or 'none'}",
           f"- software: python {system['python']}, torch {system['torch']}, prefect {system['prefect']}, "
           f"wandb {system['wandb']}",
           f"- attention: {summary['attention_backend'] or '-'} ({summary['attention_reason'] or 'not recorded'})",
           f"- launch: `{launch.get('cli', '-')}`", "", "## Summary", ""]
    out += table([{"metric": k, "value": v} for k, v in summary.items() if k != "val_bpb_curve"]) + [""]
    headline = [{"metric": "CORE", "BASE": summary["core_metric"], "SFT": None}]
    headline += [{"metric": r["task"], "BASE": None, "SFT": r["accuracy"]} for r in sorted(chat_rows(stages),
                                                                                          key=lambda r: r["task"])]
    headline += [{"metric": "ChatCORE", "BASE": None, "SFT": summary["chatcore"]}]
    out += table(headline) + [""]
    out += [f"- cost: {cost['gpus']} GPU(s) ({cost['device']}) at ${cost['gpu_hour_cost']:.2f}/GPU-hour: "
            f"pretraining ${cost['training_cost']:.2f}, all stages (wall {cost['stage_wall_s']:.0f} s) "
            f"${cost['pipeline_cost']:.2f}", ""]
    out += regression_block(verdict)
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
            out += ["", f"ChatCORE: {format_value(summary['chatcore'])}", ""]
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
    out += [f"| {k} | {format_value(v)} |" for k, v in rows]
    out += ["", "Leaderboard row (dev/LEADERBOARD.md):", "", "| # | time (h) | val_bpb | CORE | description | date | commit |",
            "|---|---|---|---|---|---|---|",
            f"| ? | {'-' if hours is None else f'{hours:.2f}'} | {format_value(summary['min_val_bpb'])} | "
            f"{format_value(core)} | <what changed> | {now.strftime('%b %d %Y')} | {summary['commit'] or '-'} |", "",
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
