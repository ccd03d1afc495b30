"""The regression verdict on its own: baseline files, the metric and history bands, the one-line verdict.

Baselines are the shipped files in deployments/baselines and files written by hand; histories and summaries
are hand-made dicts in the shapes the report stage builds (tests/test_report.py checks the verdict as the
report renders it and the gate raises it, and the recorded baseline's round trip).
"""

import pytest
import yaml

from tasks.config import ConfigError, load_config
from tasks.baselines import BASELINES_DIR, check_baseline, load_baseline
from tasks.verdict import compare, compare_history, judge, verdict_line

H100 = {"hardware": "NVIDIA H100 80GB HBM3", "world_size": 8}  # one 8xH100 node, as pretraining records it


def regression(metrics: dict | None = None, curve: dict | None = None, name: str = "b", **machine) -> dict:
    """A baseline as check_baseline returns it (load_baseline's shape), for sections built by hand."""
    return {"baseline": name, "metrics": metrics or {}, "hardware": machine.get("hardware"),
            "world_size": machine.get("world_size"), "val_bpb_curve": curve}


def history_entry(min_val_bpb: float, core: float = 0.42, hours: float = 1.65, sha: str | None = None,
                  **fields) -> dict:
    """A passing smoke run on H100, as the history holds it."""
    return {"preset": "smoke", **H100, "commit": "c0ffee0", "date": "2026-12-01T02:00:00Z", "verdict": "pass",
            "min_val_bpb": min_val_bpb, "core_metric": core, "total_training_time": hours * 3600,
            "pretrain_sha256": sha or f"sha-{min_val_bpb}-{core}-{hours}", **fields}


def test_shipped_baselines(tmp_path):
    names = sorted(p.stem for p in BASELINES_DIR.glob("*.yaml"))
    assert names == ["cpu", "d12", "d20", "d24", "d26", "smoke"]
    d24 = load_baseline("d24")
    assert d24["metrics"]["min_val_bpb"] == {"value": 0.718, "tolerance": 0.004, "direction": "lower"}
    assert d24["metrics"]["total_training_time"]["tolerance"] == pytest.approx(0.05 * 5940)
    for name in ("smoke", "cpu", "d26"):
        assert "min_val_bpb" in load_baseline(name)["metrics"]  # val bpb is the primary signal everywhere
    for name in ("smoke", "cpu"):  # what a CPU run's history entry holds (tests/test_flow.py: hardware "cpu")
        baseline = load_baseline(name)
        assert (baseline["hardware"], baseline["world_size"]) == ("cpu", 1)
        steps = baseline["val_bpb_curve"]["steps"]
        assert steps[list(steps)[-1]] == baseline["metrics"]["min_val_bpb"]["value"]  # the curve ends at its min
    for p in BASELINES_DIR.glob("d*.yaml"):  # one 8xH100 node, named as torch.cuda.get_device_name names it
        assert yaml.safe_load(p.read_text())["hardware"] == H100["hardware"]
        assert yaml.safe_load(p.read_text())["world_size"] == 8
    for name in ("d12", "d20"):  # no reference numbers yet: regression on must fail before anything runs
        with pytest.raises(ConfigError, match=rf"{name}.yaml lists no metrics; fix: record a good run"):
            check_baseline(load_config(name, overrides={"report.regression": True}))
    with pytest.raises(ConfigError, match=r"no baseline nope.yaml .* fix: --set report.baseline"):
        check_baseline(load_config("smoke", overrides={"report.regression": True, "report.baseline": "nope"}))
    for p in BASELINES_DIR.glob("*.yaml"):
        assert yaml.safe_load(p.read_text())["preset"] == p.stem
    # the shipped curves fit their presets' eval steps (checked when a run starts)
    for name in ("smoke", "cpu"):
        assert check_baseline(load_config(name, overrides={"report.regression": True}))["val_bpb_curve"]

def test_curve_steps_that_are_no_eval_step_of_the_run_fail_at_flow_start(shared_data, tmp_path):
    (tmp_path / "late.yaml").write_text(yaml.safe_dump(
        {"preset": "smoke", "hardware": "cpu", "world_size": 1,
         "val_bpb_curve": {"tolerance": 0.01, "steps": {250: 1.234, 500: 1.1}}}))

    def config(**overrides):
        return load_config("smoke", overrides={"report.regression": True, "report.baseline": "late", **overrides},
                           mirror=str(shared_data), store=str(tmp_path / "store"))

    with pytest.raises(ConfigError) as err:  # smoke evaluates at 0, 10, 20
        check_baseline(config(), tmp_path)
    message = str(err.value)
    assert "late.yaml has a val_bpb_curve at steps 250, 500" in message
    assert "evaluates val bpb every 10 steps from 0 and at its last step 20 (pretrain.eval_every=10" in message
    assert "fix: --set pretrain.eval_every=250" in message and "--write-baseline late" in message
    with pytest.raises(ConfigError, match=r"evaluates val bpb never \(pretrain.eval_every=-1"):
        check_baseline(config(**{"pretrain.eval_every": -1}), tmp_path)
    # an eval step in common: at 500 (every 250), or the last step
    for overrides in ({"pretrain.num_iterations": 600, "pretrain.eval_every": 250},
                      {"pretrain.num_iterations": 500, "pretrain.eval_every": 7}):
        assert check_baseline(config(**overrides), tmp_path)["val_bpb_curve"]["steps"] == {"250": 1.234, "500": 1.1}
    (tmp_path / "bad.yaml").write_text("preset: smoke\nval_bpb_curve: {tolerance: -1, steps: {10: 1.0}}\n")
    with pytest.raises(ConfigError, match="val_bpb_curve.tolerance must be a number >= 0"):
        load_baseline("bad", tmp_path)

def test_tolerance_edges_and_unmeasured_metric():
    base = {"baseline": "x", "metrics": {"min_val_bpb": {"value": 1.0, "tolerance": 0.01, "direction": "lower"},
                                         "core_metric": {"value": 0.2, "tolerance": 0.01, "direction": "higher"}}}
    ok = {r["metric"]: r["ok"] for r in compare({"min_val_bpb": 1.01, "core_metric": 0.19}, base)}
    assert ok == {"min_val_bpb": True, "core_metric": True}  # exactly at the tolerance passes
    ok = {r["metric"]: r["ok"] for r in compare({"min_val_bpb": 1.0101, "core_metric": None}, base)}
    assert ok == {"min_val_bpb": False, "core_metric": False}  # not measured fails

def test_zero_spread_history_uses_the_floor():
    runs = [history_entry(0.7, sha=f"p{i}") for i in range(3)]  # identical runs: MAD 0
    for value, ok in ((0.7, True), (0.7 + 0.003, True), (0.7 + 0.0045, False)):  # floor 0.5% x 0.7 = 0.0035
        (row,) = [r for r in compare_history({"min_val_bpb": value, **H100}, runs, {}) if r["metric"] == "min_val_bpb"]
        assert row["half_width"] == pytest.approx(0.0035) and row["ok"] is ok, value
    # the baseline's tolerance widens the floor
    (row,) = [r for r in compare_history({"min_val_bpb": 0.7045}, runs, {"min_val_bpb": 0.005})
              if r["metric"] == "min_val_bpb"]
    assert row["half_width"] == pytest.approx(0.005) and row["ok"] is True
    # on CPU training time is shown, never failing (a shared CPU's load varies it several-fold)
    cpu = [history_entry(0.7, hours=0.01, sha=f"p{i}", **{"hardware": "cpu", "world_size": 1}) for i in range(3)]
    (row,) = [r for r in compare_history({"total_training_time": 360.0, "hardware": "cpu"}, cpu, {})
              if r["metric"] == "total_training_time"]
    assert row["ok"] is False and row["gates"] is False
    verdict = judge({"preset": "smoke", "commit": "abc1234", "min_val_bpb": 0.7, "total_training_time": 360.0,
                     "hardware": "cpu", "world_size": 1}, {}, regression(), cpu, {})
    assert verdict["failures"] == []

def test_verdict_line_formats():
    summary = {"preset": "smoke", "commit": "abc1234", "min_val_bpb": 0.912345, "core_metric": 0.123449,
               "total_training_time": 72.0, **H100}
    assert verdict_line(summary, judge(summary, {}, None, [], {})) == \
        "DONE smoke@abc1234: min_val_bpb 0.9123, CORE 0.1234, training 0.02 h"
    runs = [history_entry(0.9125, core=0.1234, hours=0.02, sha=f"p{i}") for i in range(3)]
    passing = judge(summary, {}, regression(**H100), runs, {})
    assert verdict_line(summary, passing) == "PASS smoke@abc1234: min_val_bpb 0.9123, CORE 0.1234, training 0.02 h"
    failing = judge(summary, {"500": 1.2345}, regression(
        {"min_val_bpb": {"value": 0.9, "tolerance": 0.01, "direction": "lower"}},
        {"tolerance": 0.01, "steps": {"500": 1.1}}, **H100), runs, {})
    assert verdict_line(summary, failing) == ("FAIL smoke@abc1234: min_val_bpb 0.912345 vs baseline 0.9 ± 0.01; "
                                              "val_bpb at step 500: 1.2345 outside 1.1000 ± 0.0100")
    bare = {"preset": "smoke", "commit": None, "min_val_bpb": None}  # stopped before pretraining
    assert verdict_line(bare, None) == "DONE smoke@nogit: no pretraining numbers"
