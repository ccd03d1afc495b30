"""The regression verdict: does a run hold up against its baseline and its recent history?

`judge` compares a report's summary (tasks/report.py builds it) with two references and lists every failing
check; `verdict_line` says the verdict in one line; with report.regression on, `gate` raises
`RegressionDetected` naming each failing check (metric, eval step for the curve, value and band). Nothing here
renders markdown or touches Prefect: the report stage renders the verdict into report.md and decides when the
gate runs.

    baseline        deployments/baselines/<preset or report.baseline>.yaml: per-metric value and tolerance
                    (`compare`), and optionally the pretraining val bpb curve (the run fails when any eval step
                    both curves have leaves baseline ± tolerance, `compare_curve`). Compared only when the
                    baseline's `hardware` and `world_size` are this run's (`like_hardware`); otherwise the verdict
                    says it was not compared and why (that alone does not fail). A baseline without them is
                    compared as before, and the verdict says so. A metric the baseline asks for but the run did
                    not measure fails.
    history         the last HISTORY_RUNS passing runs of the same preset, hardware and world size in the
                    store's history, one per pretraining and never this run's own (tasks/history.py
                    comparable_runs): per metric of HISTORY_METRICS, median ± max(HISTORY_SIGMAS x 1.4826 x MAD,
                    the baseline's tolerance, HISTORY_REL_FLOOR x |median|); only the worse side fails, and
                    training time never fails on CPU (NOISY_ON_CPU). With fewer than HISTORY_MIN_RUNS such runs
                    it is not compared, and the verdict says so. With regression off it is shown for information.

The baseline files (their format, how they are read, checked and recorded) are in tasks/baselines.py.
Recording one from a good run:

    python -m tasks.verdict --write-baseline d12 <store>/stages/report/<key>/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from model.files import atomic_write_bytes
from tasks.baselines import BASELINES_DIR, DIRECTIONS, baseline_from_summary, load_baseline
from tasks.history import LIKE, comparable_runs

# The recent-history check: the last HISTORY_RUNS passing like runs; with fewer than HISTORY_MIN_RUNS it is skipped.
HISTORY_RUNS = 5
HISTORY_MIN_RUNS = 3
HISTORY_SIGMAS = 3
HISTORY_METRICS = ("min_val_bpb", "core_metric", "total_training_time")
MAD_TO_SIGMA = 1.4826  # the median absolute deviation times this estimates sigma for normal noise, robust to outliers
# The band's least half-width relative to the median (where the baseline's tolerance is smaller): identical runs
# (a deterministic CPU recipe) must not make a zero-width band that any rounding fails.
HISTORY_REL_FLOOR = 0.005
# Shown but never failing on CPU: a shared CPU's load varies training time several-fold (baselines/cpu.yaml).
NOISY_ON_CPU = ("total_training_time",)
class RegressionDetected(Exception):
    """The run misses its baseline (a metric, or the val bpb curve at some eval step) or its recent history.

    `failures`: one dict per failing check, with its `message` naming the metric (and eval step), the value and
    the band; `line`: the one-line verdict (`verdict_line`), which leads the message.
    """

    def __init__(self, baseline: str, failures: list[dict], line: str | None = None):
        self.baseline, self.failures, self.line = baseline, failures, line
        lines = [f.get("message") or static_message(f) for f in failures]
        text = f"regression against baseline {baseline!r} or the recent history:\n" + \
            "\n".join(f"  - {line_}" for line_ in lines)
        if any(f.get("check", "baseline") in ("baseline", "curve") for f in failures):
            text += (f"\nIf the change is an intended improvement, re-record the baseline: python -m tasks.verdict "
                     f"--write-baseline {baseline} <this run's summary.json>")
        super().__init__((f"{line}\n" if line else "") + text)

    def __reduce__(self):  # pickles (Prefect persists task exceptions) with the constructor's real arguments
        return type(self), (self.baseline, self.failures, self.line)


# ---------------------------------------------------------------------------------------------
# the verdict

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


def compare_curve(run_curve: dict[str, float], spec: dict) -> list[dict]:
    """One row per eval step both the run's and the baseline's val bpb curves have: the run fails when its curve
    leaves baseline ± tolerance at any of them (either side: a loss trace that moved is a changed run)."""
    tol, rows = spec["tolerance"], []
    for step, base in spec["steps"].items():
        if step in run_curve:
            value = run_curve[step]
            rows.append({"step": int(step), "value": value, "baseline": base, "tolerance": tol, "low": base - tol,
                         "high": base + tol, "ok": abs(value - base) <= tol})
    return rows


def like_hardware(summary: dict, regression: dict) -> dict:
    """{"compared", "note", "baseline_on", "run_on"}: a baseline is compared only with a run on its hardware and
    world size; the note says so, or why it was not compared, or that the baseline does not record them."""
    name = regression["baseline"]
    theirs = {k: regression.get(k) for k in ("world_size", "hardware")}
    ours = {k: summary.get(k) for k in ("world_size", "hardware")}
    out = {"compared": True, "baseline_on": _machine(theirs), "run_on": _machine(ours)}
    missing = [k.replace("_", " ") for k, v in theirs.items() if v is None]
    if all(v is None for v in ours.values()):  # no pretraining to tell: its missing metrics must fail, not be skipped
        return {**out, "note": f"baseline `{name}` compared as is: this run records no hardware (pretraining did not "
                               "run)"}
    if any(v is not None and v != ours[k] for k, v in theirs.items()):
        return {**out, "compared": False,
                "note": f"baseline `{name}` not compared: it was recorded on {out['baseline_on']}, this run ran on "
                        f"{out['run_on']} (only like is compared with like; record a baseline for this hardware with "
                        f"python -m tasks.verdict --write-baseline <name> <summary.json>)"}
    if missing:
        return {**out, "note": f"baseline `{name}` records no {' or '.join(missing)}: compared as is with this run on "
                               f"{out['run_on']} (add hardware: and world_size: to deployments/baselines/{name}.yaml, "
                               f"or re-record it)"}
    return {**out, "note": f"baseline `{name}`, recorded on {out['baseline_on']} like this run"}


def _machine(spec: dict) -> str:
    """`8 x NVIDIA H100 80GB HBM3`, as the report and submission.md write a run's hardware."""
    return f"{spec.get('world_size') or '?'} x {spec.get('hardware') or '?'}"


def history_band(values: list[float], floor: float) -> dict:
    """median ± max(HISTORY_SIGMAS x 1.4826 x MAD, floor) of `values`."""
    median = statistics.median(values)
    mad = statistics.median([abs(v - median) for v in values])
    half = max(HISTORY_SIGMAS * MAD_TO_SIGMA * mad, floor)
    return {"median": median, "mad": mad, "half_width": half, "low": median - half, "high": median + half}


def compare_history(summary: dict, runs: list[dict], tolerances: dict[str, float]) -> list[dict]:
    """One row per HISTORY_METRICS metric: the run's value against the band of the like runs; only the worse
    side fails (an improvement is welcome). `tolerances`: the baseline's, the band's least half-width."""
    rows = []
    for metric in HISTORY_METRICS:
        values, value = [e[metric] for e in runs if e.get(metric) is not None], summary.get(metric)
        row = {"metric": metric, "value": value, "median": None, "low": None, "high": None, "half_width": None,
               "runs": len(values), "direction": DIRECTIONS[metric], "ok": None,
               "gates": not (summary.get("hardware") == "cpu" and metric in NOISY_ON_CPU)}
        if value is None or len(values) < HISTORY_MIN_RUNS:
            rows.append(row)  # not measured here, or too few runs measured it: shown, not compared
            continue
        floor = max(tolerances.get(metric, 0.0), HISTORY_REL_FLOOR * abs(statistics.median(values)))
        band = history_band(values, floor)
        worse = value > band["high"] if DIRECTIONS[metric] == "lower" else value < band["low"]
        rows.append({**row, **band, "ok": not worse})
    return rows


def history_check(summary: dict, history: list[dict], own: dict, tolerances: dict[str, float]) -> dict:
    """The run against the last HISTORY_RUNS passing like runs (tasks/history.py comparable_runs), or why not."""
    like = {**{k: summary.get(k) for k in LIKE}, "pretrain_sha256": own.get("pretrain_sha256")}
    runs = comparable_runs(history, like, HISTORY_RUNS)
    out = {"runs": len(runs), "commits": [e.get("commit") or "-" for e in runs], "machine": _machine(summary),
           "compared": len(runs) >= HISTORY_MIN_RUNS, "rows": []}
    if out["compared"]:
        out["rows"] = compare_history(summary, runs, tolerances)
    return out


def judge(summary: dict, run_curve: dict[str, float], regression: dict | None, history: list[dict],
          own: dict) -> dict:
    """The regression verdict: the baseline (metrics and val bpb curve, on like hardware only) and the recent
    history, with every failing check in "failures" (none with regression off: the history is then shown only)."""
    verdict = {"regression": regression is not None, "baseline": None, "like": None, "static": None, "curve": None}
    tolerances = {}
    if regression is not None:
        verdict.update(baseline=regression["baseline"], like=like_hardware(summary, regression))
        tolerances = {m: s["tolerance"] for m, s in regression["metrics"].items()}
        if verdict["like"]["compared"]:
            verdict["static"] = compare(summary, regression)
            if regression.get("val_bpb_curve"):
                spec = regression["val_bpb_curve"]
                verdict["curve"] = {**spec, "rows": compare_curve(run_curve, spec), "run_steps": list(run_curve)}
    verdict["history"] = history_check(summary, history, own, tolerances)
    verdict["failures"] = regression_failures(verdict) if regression is not None else []
    return verdict


def regression_failures(verdict: dict) -> list[dict]:
    """Every failing check, each with a `message` (metric, eval step, value, band) and a `brief` one."""
    out = [{"check": "baseline", **r, "message": static_message(r),
            "brief": f"{r['metric']} {format_value(r['value'])} vs baseline {format_value(r['baseline'])} ± "
                     f"{format_value(r['tolerance'])}"}
           for r in verdict["static"] or [] if not r["ok"]]
    curve = verdict["curve"]
    if curve is not None:
        out += curve_failures(curve)
    for r in verdict["history"]["rows"]:
        if r["ok"] is False and r["gates"]:
            out.append({"check": "history", **r, "message": history_message(r),
                        "brief": f"{r['metric']} {format_value(r['value'])} vs history median "
                                 f"{format_value(r['median'])} ± {format_value(r['half_width'])} ({r['runs']} runs)"})
    return out


def curve_failures(curve: dict) -> list[dict]:
    """The first eval step where the run's val bpb leaves the baseline band (how many others do is said), or
    that no eval step could be compared (pretraining did not run or evaluated elsewhere: must not pass)."""
    if not curve["rows"]:
        steps = ", ".join(list(curve["steps"])[:8])
        return [{"check": "curve", "metric": "val_bpb", "step": None, "value": None, "ok": False,
                 "message": f"val_bpb curve: no eval step in common with the baseline's ({steps}); this run "
                            f"evaluated at {', '.join(curve['run_steps'][:8]) or 'no step'}",
                 "brief": "val_bpb curve: no eval step in common with the baseline"}]
    bad = [r for r in curve["rows"] if not r["ok"]]
    if not bad:
        return []
    r = bad[0]
    band = f"{r['baseline']:.4f} ± {r['tolerance']:.4f} [{r['low']:.4f}, {r['high']:.4f}]"
    more = f" ({len(bad)} of {len(curve['rows'])} common eval steps outside the band)" if len(bad) > 1 else ""
    return [{"check": "curve", "metric": "val_bpb", **r,
             "message": f"val_bpb at step {r['step']}: {r['value']:.4f} outside the baseline band {band}{more}",
             "brief": f"val_bpb at step {r['step']}: {r['value']:.4f} outside {r['baseline']:.4f} ± "
                      f"{r['tolerance']:.4f}"}]


def static_message(f: dict) -> str:
    """A failing baseline metric: its value, the baseline, the tolerance and the bound it missed."""
    bound = f["baseline"] + f["tolerance"] if f["direction"] == "lower" else f["baseline"] - f["tolerance"]
    limit = "at most" if f["direction"] == "lower" else "at least"
    return (f"{f['metric']}: value {format_value(f['value'])} vs baseline {format_value(f['baseline'])} "
            f"({f['direction']} is better, tolerance {format_value(f['tolerance'])}: passes {limit} "
            f"{format_value(bound)})")


def history_message(r: dict) -> str:
    """A metric worse than the recent history: its value, the runs' median and the band it left."""
    return (f"{r['metric']}: value {format_value(r['value'])} is worse than the last {r['runs']} passing like runs: "
            f"median {format_value(r['median'])}, band [{format_value(r['low'])}, {format_value(r['high'])}] "
            f"(median ± {format_value(r['half_width'])}, {r['direction']} is better)")


def format_value(v) -> str:
    """A number (or flag, list) as the verdict's messages and the report's tables write it: the same figures in both."""
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


def verdict_line(summary: dict, checks: dict | None) -> str:
    """The verdict in one line, for notifications and the flow's final state: PASS (regression on, nothing
    failed), FAIL (what failed) or DONE (regression off), then preset@commit and the headline numbers."""
    who = f"{summary.get('preset')}@{(summary.get('commit') or 'nogit')[:7]}"  # the short commit, as in run names
    failures = (checks or {}).get("failures") or []
    if failures:
        return f"FAIL {who}: " + "; ".join(f["brief"] for f in failures)
    numbers = [f"{label} {fmt.format(summary[key] / scale)}" for label, key, fmt, scale in (
        ("min_val_bpb", "min_val_bpb", "{:.4f}", 1), ("CORE", "core_metric", "{:.4f}", 1),
        ("training", "total_training_time", "{:.2f} h", 3600)) if summary.get(key) is not None]
    line = f"{who}: {', '.join(numbers) or 'no pretraining numbers'}"
    if not (checks or {}).get("regression"):
        return f"DONE {line}"
    notes = []
    if not checks["like"]["compared"]:
        notes.append(f"baseline not compared: recorded on {checks['like']['baseline_on']}")
    if not checks["history"]["compared"]:
        notes.append(f"history: {checks['history']['runs']} of {HISTORY_MIN_RUNS} like runs, not compared")
    return f"PASS {line}" + (f" ({'; '.join(notes)})" if notes else "")


def gate(section: dict, result: dict) -> None:
    """Raise RegressionDetected naming every failing check (nothing if regression is off)."""
    failures = result["verdict"]["failures"]
    if section["regression"] and failures:
        raise RegressionDetected(section["regression"]["baseline"], failures,
                                 verdict_line(result["summary"], result["verdict"]))


def history_verdict(verdict: dict) -> str | None:
    """The verdict a history entry records: pass or fail with regression on, null with it off."""
    if not verdict["regression"]:
        return None
    return "fail" if verdict["failures"] else "pass"


# ---------------------------------------------------------------------------------------------
# recording a baseline from a good run (the command line)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.verdict", description="Record a regression baseline.")
    p.add_argument("--write-baseline", metavar="NAME", required=True, help="deployments/baselines/NAME.yaml")
    p.add_argument("summary", type=Path, help="a report artifact's summary.json")
    p.add_argument("--dir", type=Path, default=BASELINES_DIR, help="baselines directory (default: %(default)s)")
    args = p.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    text = baseline_from_summary(summary, f"recorded from {args.summary} (commit {summary.get('commit')}); "
                                          "edit the tolerances to taste")
    if not summary.get("val_bpb_curve"):
        print(f"note: {args.summary} holds no val_bpb_curve (a report from before it was recorded, or a run without "
              "val bpb evaluations): the baseline has no curve", file=sys.stderr)
    path = args.dir / f"{args.write_baseline}.yaml"
    atomic_write_bytes(path, text.encode())
    load_baseline(args.write_baseline, args.dir)  # what the gate will read must parse
    print(f"wrote {path}:\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
