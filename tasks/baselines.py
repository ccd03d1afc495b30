"""Regression baselines: deployments/baselines/<name>.yaml, read and checked when a run starts, recorded from a good run.

A baseline file (`load_baseline`; metrics are any of DIRECTIONS, each with an absolute `tolerance`, a
`rel_tolerance` times |value|, or both, added; the curve's steps must include an eval step of the run, which
`check_baseline` checks when the flow starts):

    preset: d24
    hardware: NVIDIA H100 80GB HBM3     # pretraining's device, as torch.cuda.get_device_name names it
    world_size: 8                       # the number of training processes
    metrics:
      min_val_bpb: {value: 0.718, tolerance: 0.004}
      core_metric: {value: 0.262634, tolerance: 0.012}
      total_training_time: {value: 5940, rel_tolerance: 0.05}
    val_bpb_curve:                      # optional: pretraining's val bpb at its eval steps
      tolerance: 0.01
      steps: {0: 3.25, 2000: 0.95, 5568: 0.718}

`baseline_from_summary` writes one from a report's summary.json (`python -m tasks.verdict --write-baseline`);
tasks/verdict.py compares runs with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from tasks.config import ConfigError, SpeedrunConfig
from tasks.store import PROJECT_ROOT

BASELINES_DIR = PROJECT_ROOT / "deployments" / "baselines"
# Baseline metrics: which direction is better.
DIRECTIONS = {"min_val_bpb": "lower", "val_bpb": "lower", "sft_min_val_bpb": "lower", "total_training_time": "lower",
              "core_metric": "higher", "chatcore": "higher", "mfu": "higher", "tok_per_sec": "higher"}
DEFAULT_CURVE_TOLERANCE = 0.01  # val bpb band around a recorded curve (GPU runs differ by a few 1e-3 per eval)
# What --write-baseline records: the metrics it keeps, each at a tolerance that leaves room for run-to-run noise.
DEFAULT_TOLERANCES = {"min_val_bpb": {"tolerance": 0.005}, "val_bpb": {"tolerance": 0.01},
                      "core_metric": {"tolerance": 0.015}, "chatcore": {"tolerance": 0.03},
                      "total_training_time": {"rel_tolerance": 0.05}}


def load_baseline(name: str, directory: Path = BASELINES_DIR) -> dict:
    """deployments/baselines/<name>.yaml as {"metrics": {metric: {value, tolerance, direction}}, "hardware",
    "world_size", "val_bpb_curve": {"tolerance", "steps": {"<step>": val bpb}} or None}; ConfigError if unusable."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"
        raise ConfigError([f"report.baseline: no baseline {path.name} in deployments/baselines (have: {known}); fix: "
                           f"--set report.baseline=<name>, or record one with python -m tasks.verdict --write-baseline "
                           f"{name} <summary.json>"])
    data = yaml.safe_load(path.read_text()) or {}
    problems: list[str] = []
    metrics = parse_metrics(data.get("metrics") or {}, path.name, problems)
    curve = parse_curve(data.get("val_bpb_curve"), path.name, problems)
    hardware, world_size = data.get("hardware"), data.get("world_size")
    if hardware is not None and not isinstance(hardware, str):
        problems.append(f"{path.name}: hardware must be the device name a run records, e.g. 'NVIDIA H100 80GB HBM3' "
                        "or 'cpu'")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        problems.append(f"{path.name}: world_size must be a positive integer (the number of training processes)")
    if not metrics and curve is None and not problems:
        problems.append(f"{path.name} lists no metrics; fix: record a good run with python -m tasks.verdict "
                        f"--write-baseline {name} <summary.json>, or --set report.baseline=<another>")
    if problems:
        raise ConfigError(problems)
    return {"metrics": metrics, "hardware": hardware, "world_size": world_size, "val_bpb_curve": curve}


def parse_metrics(spec: dict, filename: str, problems: list[str]) -> dict:
    """A baseline's `metrics:` as {metric: {value, tolerance, direction}} (tolerance + rel_tolerance x |value|)."""
    metrics = {}
    for metric, entry in spec.items():
        if metric not in DIRECTIONS:
            problems.append(f"{filename}: unknown metric {metric!r}; fix: use one of {', '.join(DIRECTIONS)}")
            continue
        if not isinstance(entry, dict) or not _is_number(entry.get("value")):
            problems.append(f"{filename}: {metric} needs a numeric value, e.g. {{value: 0.75, tolerance: 0.005}}")
            continue
        tol = float(entry.get("tolerance", 0.0)) + abs(float(entry["value"])) * float(entry.get("rel_tolerance", 0.0))
        if tol < 0:
            problems.append(f"{filename}: {metric} has a negative tolerance")
        metrics[metric] = {"value": float(entry["value"]), "tolerance": tol, "direction": DIRECTIONS[metric]}
    return metrics


def parse_curve(spec, filename: str, problems: list[str]) -> dict | None:
    """A baseline's `val_bpb_curve:` as {"tolerance", "steps": {"<step>": val bpb}} in step order, or None.

    Steps are kept as strings, as JSON (the report's key, summary.json) keeps them."""
    if spec is None:
        return None
    example = "e.g. val_bpb_curve: {tolerance: 0.01, steps: {250: 1.234, 500: 1.1}}"
    if not isinstance(spec, dict) or not isinstance(spec.get("steps"), dict) or not spec["steps"]:
        problems.append(f"{filename}: val_bpb_curve needs a non-empty steps mapping; {example}")
        return None
    tolerance = spec.get("tolerance", DEFAULT_CURVE_TOLERANCE)
    if not _is_number(tolerance) or tolerance < 0:
        problems.append(f"{filename}: val_bpb_curve.tolerance must be a number >= 0; {example}")
        return None
    steps = {}
    for step, value in spec["steps"].items():
        if not (isinstance(step, int) or str(step).isdigit()) or isinstance(step, bool) or not _is_number(value):
            problems.append(f"{filename}: val_bpb_curve step {step!r}: {value!r} must be a step >= 0 and a val bpb; "
                            f"{example}")
            continue
        steps[int(step)] = float(value)
    return {"tolerance": float(tolerance), "steps": {str(k): steps[k] for k in sorted(steps)}}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_baseline(cfg: SpeedrunConfig, directory: Path = BASELINES_DIR) -> dict | None:
    """The baseline a run with report.regression on must pass (raises ConfigError early if it is unusable)."""
    if not cfg.report.regression:
        return None
    name = cfg.report.baseline or cfg.preset
    baseline = load_baseline(name, directory)
    check_curve_steps(cfg, name, baseline["val_bpb_curve"])
    return {"baseline": name, **baseline}


def is_eval_step(step: int, eval_every: int, last: int) -> bool:
    """Whether pretraining evaluates val bpb at `step` (model/train.py: every eval_every steps from 0, and the last)."""
    return eval_every > 0 and 0 <= step <= last and (step % eval_every == 0 or step == last)


def check_curve_steps(cfg: SpeedrunConfig, name: str, curve: dict | None) -> None:
    """ConfigError unless some step of the baseline's val bpb curve is an eval step of this run: a curve that
    cannot be compared would pass every run unchecked, found out only after training."""
    if curve is None:
        return
    every, last = cfg.pretrain.eval_every, cfg.plan.num_iterations
    steps = [int(s) for s in curve["steps"]]
    if any(is_eval_step(s, every, last) for s in steps):
        return
    shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
    evals = f"every {every} steps from 0 and at its last step {last}" if every > 0 else "never"
    divisor = math.gcd(*steps) or 1
    raise ConfigError([f"report.baseline: {name}.yaml has a val_bpb_curve at steps {shown}, but this run evaluates "
                       f"val bpb {evals} (pretrain.eval_every={every}, {last} steps from pretrain.num_iterations and "
                       f"the horizon): no step is in both, so the curve cannot be compared; fix: --set "
                       f"pretrain.eval_every={divisor} (a divisor of the baseline's steps), or record a baseline from "
                       f"a run like this one with python -m tasks.verdict --write-baseline {name} <summary.json>"])


def baseline_from_summary(summary: dict, note: str) -> str:
    """A baseline file from a report's summary.json: the metrics at DEFAULT_TOLERANCES, the hardware and world
    size it ran on (a baseline is compared only with like runs), and its val bpb curve."""
    metrics = {m: {"value": summary[m], **tol} for m, tol in DEFAULT_TOLERANCES.items() if summary.get(m) is not None}
    data = {"preset": summary.get("preset"), "commit": summary.get("commit")}
    data.update({k: summary[k] for k in ("hardware", "world_size") if summary.get(k) is not None})
    data["metrics"] = metrics
    if summary.get("val_bpb_curve"):
        data["val_bpb_curve"] = {"tolerance": DEFAULT_CURVE_TOLERANCE,
                                 "steps": {int(step): round(v, 6) for step, v in summary["val_bpb_curve"].items()}}
    return f"# {note}\n" + yaml.safe_dump(data, sort_keys=False)
