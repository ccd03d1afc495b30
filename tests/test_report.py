"""The report stage's files, numbers and regression gate, built from hand-made upstream artifacts.

The artifacts are written with the store's own manifest writer in the formats the stages produce
(pretrain: summary.json, metrics.jsonl, log.txt; base_eval: summary.json with CORE results and samples;
sft: summary.json, metrics.jsonl; chat_eval: summary.json with per-task results). The wandb summary is
read back from the offline run file wandb writes. The regression verdict is checked as the report renders it
and the gate raises it, against baselines and histories written as files, as `--write-baseline`
(tasks/verdict.py) and the report stage write them; tests/test_verdict.py checks the verdict on its own.
"""

import json
import pickle
import struct
import time
from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, load_config
from tasks.history import append_history, read_history
from tasks.publish import artifact_key, log_wandb
from tasks.report import REPORT, add_trend, report_options, report_section, write_report
from tasks.report_render import GPT2_CORE, STAGES
from tasks.store import write_manifest
from tasks.baselines import load_baseline
from tasks.verdict import HISTORY_MIN_RUNS, RegressionDetected, gate, judge, main, verdict_line
from tests.test_verdict import H100, history_entry, regression  # H100: what the fixture's pretraining ran on

PRETRAIN_SUMMARY = {"total_training_time": 5940.25, "total_training_flops": 2.788e19, "min_val_bpb": 0.71794,
                    "val_bpb": 0.71801, "core_metric": None, "step": 5568, "mfu": 51.3, "tok_per_sec": 982_000.5,
                    "world_size": 8, "device": "NVIDIA H100 80GB HBM3", "depth": 24}
CURVE = [{"step": s, "total_training_flops": s * 5e15, "total_training_time": max(0.0, s - 11) * 1.07,
          "val/bpb": 1.2 - 0.08 * i} for i, s in enumerate(range(0, 5569, 1000))]
CURVE_STEPS = {str(r["step"]): r["val/bpb"] for r in CURVE}  # 0: 1.2, 1000: 1.12, 2000: 1.04, ... 5000: 0.8
CORE = {"hellaswag": (0.42, 0.2267), "arc_easy": (0.71, 0.6133), "piqa": (0.72, 0.44)}
CHAT = {"ARC-Easy": {"accuracy": 0.5, "passed": 8, "total": 16}, "GSM8K": {"accuracy": 0.0625, "passed": 1, "total": 16}}
TORCHRUN = "python -m torch.distributed.run --standalone --nproc_per_node=8 -m model.train -- --depth=24 --fp8"


def make_artifact(store: Path, stage: str, metrics: dict, files: dict[str, str]) -> dict:
    art = store / "stages" / stage / f"{stage}key0123456789abcdef"
    art.mkdir(parents=True)
    for name, text in files.items():
        (art / name).write_text(text)
    record = write_manifest(art, stage=stage, key=art.name, metrics=metrics, store_root=store, started_at=1.7e9)
    return {**record, "path": str(store / record["path"])}  # as the flow hands records downstream (StageRunner)


@pytest.fixture
def upstream(tmp_path) -> dict:
    store = tmp_path / "store"
    core_metric = sum(c for _, c in CORE.values()) / len(CORE)
    base_summary = {"step": 5568, "core_metric": core_metric, "train_bpb": 0.7203, "val_bpb": 0.71801,
                    "core_results": {t: a for t, (a, _) in CORE.items()},
                    "core_centered": {t: c for t, (_, c) in CORE.items()}, "core_tasks": "3/3", "missing_tasks": [],
                    "samples": [{"prompt": "The capital of France is", "completion": " Paris."}]}
    sft_summary = {"step": 700, "min_val_bpb": 0.402, "val_bpb": 0.405, "total_training_time": 300.5,
                   "chatcore": None}
    chat_summary = {"tasks": CHAT, "chatcore": 0.0312, "chatcore_cat": 0.5}
    return {
        "shards": make_artifact(store, "shards", {"train_shards": 170, "val_shard": 6542}, {"shards.json": "{}"}),
        "tokenizer": make_artifact(store, "tokenizer", {"vocab_size": 32768, "bytes_per_token_val": 4.5}, {"t": "x"}),
        "eval_bundle": make_artifact(store, "eval_bundle", {"core_tasks": "3/3", "missing_tasks": []}, {"core.yaml": ""}),
        "pretrain": make_artifact(store, "pretrain", PRETRAIN_SUMMARY, {
            "summary.json": json.dumps(PRETRAIN_SUMMARY), "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in CURVE),
            "log.txt": f"$ {TORCHRUN}\nstep 00001/05568\n"}),
        "base_eval": make_artifact(store, "base_eval", {k: v for k, v in base_summary.items() if k != "samples"},
                                   {"summary.json": json.dumps(base_summary)}),
        "sft": make_artifact(store, "sft", sft_summary, {"summary.json": json.dumps(sft_summary)}),
        "chat_eval": make_artifact(store, "chat_eval", chat_summary, {"summary.json": json.dumps(chat_summary)}),
    }


@pytest.fixture
def cfg(shared_data):
    return load_config("smoke", overrides={"pretrain.num_iterations": 7, "report.gpu_hour_cost": 2.5},
                       mirror=str(shared_data), store="/tmp/nowhere-store")


def markdown_table(text: str, header: str) -> dict[str, str]:
    """{first column: second column} of the markdown table whose header row starts with `header`."""
    rows, inside = {}, False
    for line in text.splitlines():
        if line.startswith(f"| {header} |"):
            inside = True
        elif inside and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1]
        elif inside and not line.startswith("|"):
            break
    return rows


def number(text: str) -> float:
    return float(text.replace(",", ""))


def wandb_offline_summary(root: Path, timeout_s: float = 30.0) -> dict:
    """The summary of the newest offline run under `root`, read from wandb's leveldb-style .wandb log.

    wandb's service process may still be flushing when run.finish() returns: wait for the exit record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        summary, finished = read_wandb_run(sorted(root.glob("wandb/offline-run-*/run-*.wandb"))[-1])
        if finished or time.monotonic() > deadline:
            return summary
        time.sleep(0.2)


def read_wandb_run(run_file: Path) -> tuple[dict, bool]:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, out, finished = run_file.read_bytes(), 7, 32768, b"", {}, False  # 7-byte header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: skip to the next block
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "summary":
                out.update({u.key: json.loads(u.value_json) for u in record.summary.update})
            finished |= record.WhichOneof("record_type") == "exit"
    return out, finished


def test_report_files_sections_and_numbers_agree(cfg, upstream, tmp_path):
    section, options = report_section(cfg), report_options(cfg)
    out = tmp_path / "report"
    out.mkdir()
    result = write_report(section, upstream, out, options)
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())

    for title in STAGES.values():
        assert f"## {title}" in report
    assert "not run" not in report
    for heading in ("## Summary", "## Regression check", "### CORE per task", "### Samples", "### Chat tasks",
                    "## Resolved config", "- git commit: ", "- date: ", "- hardware: ", "- software: "):
        assert heading in report
    assert " Paris." in report and "off (`report.regression=false`)" in report

    # summary.json: the leaderboard keys, from the right stages
    assert summary == result["summary"]
    assert {k: summary[k] for k in ("total_training_time", "total_training_flops", "min_val_bpb", "step", "mfu")} == \
        {k: PRETRAIN_SUMMARY[k] for k in ("total_training_time", "total_training_flops", "min_val_bpb", "step", "mfu")}
    assert summary["core_metric"] == pytest.approx(sum(c for _, c in CORE.values()) / 3)  # base_eval's CORE
    assert summary["chatcore"] == 0.0312 and summary["val_bpb"] == 0.71801
    assert summary["beats_gpt2"] is (summary["core_metric"] > GPT2_CORE)
    assert set(summary) >= {"total_training_time", "total_training_flops", "min_val_bpb", "core_metric", "chatcore",
                            "step", "mfu", "commit"}
    assert summary["val_bpb_curve"] == CURVE_STEPS  # what --write-baseline records as the baseline's curve
    assert (summary["hardware"], summary["world_size"]) == (H100["hardware"], 8)

    # report.md's summary table shows the same numbers (rounded to 6 significant digits)
    shown = markdown_table(report, "metric")
    for key in ("total_training_time", "total_training_flops", "min_val_bpb", "core_metric", "chatcore", "step", "mfu"):
        assert number(shown[key]) == pytest.approx(summary[key], rel=1e-5), key
    core_table = markdown_table(report, "task")
    assert {t: number(core_table[t]) for t in CORE} == {t: a for t, (a, _) in CORE.items()}
    assert "| GSM8K | 0.0625 | 1 | 16 |" in report
    # cost: 8 GPUs x 5940.25 s at $2.50/GPU-hour
    assert f"pretraining ${8 * 5940.25 / 3600 * 2.5:.2f}" in report

    # the wandb offline run holds the same summary
    log_wandb(summary, {"wandb_mode": "offline", "run": "test-report"}, tmp_path / "wandb-work", print)
    logged = wandb_offline_summary(tmp_path / "wandb-work")
    scalars = {k: v for k, v in summary.items() if v is not None and not isinstance(v, dict)}
    assert {k: logged[k] for k in scalars} == scalars and "val_bpb_curve" not in logged

    # a valid PNG with two panels' worth of pixels
    png = (out / "val_bpb.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1000, 400)
    import matplotlib.image
    assert matplotlib.image.imread(out / "val_bpb.png").shape[:2] == (400, 1000)

    # submission.md: every field a leaderboard PR needs
    sub = (out / "submission.md").read_text()
    fields = markdown_table(sub, "field")
    assert number(fields["time (hours)"]) == pytest.approx(5940.25 / 3600, abs=1e-4)
    assert number(fields["CORE"]) == pytest.approx(summary["core_metric"], rel=1e-5)
    assert fields[f"beats GPT-2 CORE {GPT2_CORE}"] == ("yes" if summary["beats_gpt2"] else "no")
    assert number(fields["val bpb (min, pretraining)"]) == pytest.approx(0.71794)
    assert number(fields["total_training_flops"]) == pytest.approx(2.788e19, rel=1e-4)
    assert fields["commit"] == str(summary["commit"])
    assert options["launch"]["cli"] in sub and TORCHRUN in sub
    assert "--set pretrain.num_iterations=7" in options["launch"]["cli"]
    assert "--set report.gpu_hour_cost=2.5" in options["launch"]["cli"]
    assert json.loads(options["launch"]["deployment"].split("--params ", 1)[1].strip("'"))["overrides"] == \
        {"pretrain.num_iterations": 7, "report.gpu_hour_cost": 2.5}


def test_section_holds_no_machine_paths(cfg, shared_data):
    section = json.dumps(report_section(cfg))
    assert str(shared_data.resolve()) not in section and "/tmp/nowhere-store" not in section
    assert "$MIRROR/pretrain" in section


def test_an_unusable_baseline_fails_the_section_when_the_flow_starts():
    """report_section checks the baseline (tasks/verdict.py check_baseline): with regression on and no usable
    baseline, the run fails before any stage runs."""
    with pytest.raises(ConfigError, match=r"no baseline nope.yaml .* fix: --set report.baseline"):
        report_section(load_config("smoke", overrides={"report.regression": True, "report.baseline": "nope"}))


def test_absent_stages_say_not_run(cfg, upstream, tmp_path):
    partial = {k: upstream[k] for k in ("shards", "tokenizer", "pretrain")}  # e.g. --until pretrain
    result = write_report(report_section(cfg), partial, tmp_path, report_options(cfg))
    report = (tmp_path / "report.md").read_text()
    for name in ("base_eval", "sft", "chat_eval", "eval_bundle"):
        block = report.split(f"(`{name}`)", 1)[1].split("\n## ", 1)[0]
        assert block.strip() == "not run", name
    assert result["summary"]["core_metric"] is None and result["summary"]["chatcore"] is None
    assert result["summary"]["val_bpb"] == 0.71801  # pretraining's last evaluation stands in
    assert "CORE was not measured" in (tmp_path / "submission.md").read_text()


def test_regression_gate_passes_a_run_that_beats_the_baseline_and_names_misses(cfg, upstream, tmp_path):
    beaten = regression({"min_val_bpb": {"value": 0.7200, "tolerance": 0.001, "direction": "lower"},
                         "chatcore": {"value": 0.02, "tolerance": 0.0, "direction": "higher"}}, **H100)
    section = {**report_section(cfg), "regression": beaten}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    gate(section, result)  # passes
    report = (tmp_path / "report.md").read_text()
    assert f"baseline `b`, recorded on 8 x {H100['hardware']} like this run" in report
    assert "**Verdict: PASS**: within the bands of 2 baseline metrics" in report
    assert f"history: 0 of {HISTORY_MIN_RUNS} like runs, not compared" in report

    missed = regression({"min_val_bpb": {"value": 0.7100, "tolerance": 0.004, "direction": "lower"},  # 0.71794 > 0.714
                         "core_metric": {"value": 0.30, "tolerance": 0.012, "direction": "higher"},  # 0.43 passes
                         "total_training_time": {"value": 5000.0, "tolerance": 250.0, "direction": "lower"}},
                        name="strict", **H100)
    section = {**report_section(cfg), "regression": missed}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    with pytest.raises(RegressionDetected) as err:
        gate(section, result)
    assert [f["metric"] for f in err.value.failures] == ["min_val_bpb", "total_training_time"]
    message = str(err.value)
    assert "'strict'" in message and message.startswith("FAIL smoke@")  # the verdict line leads
    assert "min_val_bpb: value 0.71794 vs baseline 0.71 (lower is better, tolerance 0.004: passes at most 0.714)" \
        in message
    assert "total_training_time: value 5940.25 vs baseline 5000 (lower is better, tolerance 250: passes at most 5250)" \
        in message
    assert "re-record the baseline: python -m tasks.verdict --write-baseline strict" in message
    report = (tmp_path / "report.md").read_text()  # the failing report is written before the raise
    assert "**Verdict: FAIL**:\n\n- min_val_bpb: value 0.71794 vs baseline 0.71" in report
    assert "| total_training_time | 5940.25 | 5000 | 250 | lower | FAIL |" in report


def test_baseline_of_other_hardware_is_not_compared_and_says_so(cfg, upstream, tmp_path):
    strict = {"min_val_bpb": {"value": 0.5, "tolerance": 0.01, "direction": "lower"}}  # would fail: 0.71794
    for machine in ({"hardware": "cpu", "world_size": 1}, {"hardware": H100["hardware"], "world_size": 1}):
        section = {**report_section(cfg), "regression": regression(strict, {"tolerance": 0.01, "steps": {"0": 9.0}},
                                                                    name="cpu-base", **machine)}
        result = write_report(section, upstream, tmp_path, report_options(cfg))
        gate(section, result)  # other hardware or world size alone never fails a run
        report = (tmp_path / "report.md").read_text()
        recorded_on = f"{machine['world_size']} x {machine['hardware']}"
        assert f"baseline `cpu-base` not compared: it was recorded on {recorded_on}, this run ran on 8 x " \
            f"{H100['hardware']}" in report
        assert result["verdict"]["static"] is None and result["verdict"]["curve"] is None
        line = verdict_line(result["summary"], result["verdict"])
        assert line.startswith("PASS smoke@") and f"baseline not compared: recorded on {recorded_on}" in line

    # a baseline that does not record its hardware is compared as before, and the verdict says so
    section = {**report_section(cfg), "regression": regression(strict, name="old")}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    with pytest.raises(RegressionDetected, match="min_val_bpb: value 0.71794 vs baseline 0.5"):
        gate(section, result)
    assert "baseline `old` records no world size or hardware: compared as is" in (tmp_path / "report.md").read_text()


def test_val_bpb_curve_fails_at_the_first_eval_step_out_of_band(cfg, upstream, tmp_path):
    inside = {"tolerance": 0.01, "steps": {k: v + 0.005 for k, v in CURVE_STEPS.items()} | {"9999": 0.1}}
    section = {**report_section(cfg), "regression": regression(curve=inside, **H100)}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    gate(section, result)  # every common step within ±0.01 (step 9999 was never evaluated: not compared)
    assert "val bpb curve: PASS: all 6 common eval steps within ±0.0100 of the baseline" in \
        (tmp_path / "report.md").read_text()

    # the run's curve leaves the band below at step 2000 (1.04 vs 1.09 ± 0.01) and above at 4000: two-sided,
    # like a loss-trace comparison; the first step out of band is named, with its value and band
    shifted = {"tolerance": 0.01, "steps": {**CURVE_STEPS, "2000": 1.09, "4000": 0.90}}
    section = {**report_section(cfg), "regression": regression(curve=shifted, name="curve", **H100)}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    with pytest.raises(RegressionDetected) as err:
        gate(section, result)
    (failure,) = err.value.failures
    assert (failure["metric"], failure["step"]) == ("val_bpb", 2000)
    assert failure["value"] == pytest.approx(1.04) and failure["baseline"] == 1.09
    assert failure["low"] == pytest.approx(1.08) and failure["high"] == pytest.approx(1.10)
    message = str(err.value)
    assert ("val_bpb at step 2000: 1.0400 outside the baseline band 1.0900 ± 0.0100 [1.0800, 1.1000] (2 of 6 common "
            "eval steps outside the band)") in message
    assert "intended improvement, re-record the baseline: python -m tasks.verdict --write-baseline curve" in message
    assert "- val bpb curve: FAIL: val_bpb at step 2000" in (tmp_path / "report.md").read_text()
    assert err.value.line == verdict_line(result["summary"], result["verdict"])
    assert err.value.line.startswith("FAIL smoke@") and "val_bpb at step 2000: 1.0400 outside 1.0900 ± 0.0100" in \
        err.value.line

    # a run without a common eval step (pretraining did not run) must not pass the curve silently
    partial = {k: upstream[k] for k in ("shards", "tokenizer")}
    result = write_report(section, partial, tmp_path, report_options(cfg))
    assert result["verdict"]["failures"][0]["message"].startswith("val_bpb curve: no eval step in common")


def test_history_fewer_than_min_runs_is_not_compared_and_says_so(cfg, upstream, tmp_path):
    section = {**report_section(cfg), "regression": regression(name="none-but-history", **H100)}
    history = [history_entry(0.60), history_entry(0.61)]  # far better than 0.71794, but only 2 like runs
    history += [history_entry(0.6, **{"world_size": 1}), history_entry(0.6, verdict="fail"),
                history_entry(0.6, preset="cpu")]  # unlike: other world size, failed, other preset
    result = write_report(section, upstream, tmp_path, report_options(cfg), history=history)
    gate(section, result)
    assert result["verdict"]["history"]["compared"] is False and result["verdict"]["history"]["runs"] == 2
    assert f"history: 2 of {HISTORY_MIN_RUNS} like runs, not compared" in (tmp_path / "report.md").read_text()
    assert f"(history: 2 of {HISTORY_MIN_RUNS} like runs, not compared)" in \
        verdict_line(result["summary"], result["verdict"])


def test_history_band_median_and_mad_fails_the_worse_side_only(cfg, upstream, tmp_path):
    section = {**report_section(cfg), "regression": regression(
        {"min_val_bpb": {"value": 0.72, "tolerance": 0.004, "direction": "lower"}}, name="d24ish", **H100)}
    # median 0.682, MAD 0.001: band 0.682 ± max(3 x 1.4826 x 0.001, 0.004) = ± 0.0044478; the run's 0.71794 is worse
    history = [history_entry(v, core=c, hours=h) for v, c, h in
               ((0.680, 0.40, 1.60), (0.681, 0.41, 1.62), (0.682, 0.42, 1.64), (0.683, 0.43, 1.66), (0.684, 0.44, 1.68),
                (0.9, 0.1, 9.0))][::-1]  # the oldest (first) entry falls out of the last 5
    result = write_report(section, upstream, tmp_path, report_options(cfg), history=history)
    with pytest.raises(RegressionDetected) as err:
        gate(section, result)
    (failure,) = err.value.failures  # CORE 0.4267 is better than the median: welcome; training time is in band
    assert (failure["check"], failure["metric"], failure["runs"]) == ("history", "min_val_bpb", 5)
    assert failure["median"] == pytest.approx(0.682) and failure["half_width"] == pytest.approx(3 * 1.4826 * 0.001)
    assert failure["high"] == pytest.approx(0.682 + 3 * 1.4826 * 0.001)
    message = str(err.value)
    assert "min_val_bpb: value 0.71794 is worse than the last 5 passing like runs: median 0.682, band [" in message
    assert "only the worse side fails" in (tmp_path / "report.md").read_text()

    # far better than the history on every metric: passes (only the worse side fails)
    better = [history_entry(v, core=0.2, hours=3.0) for v in (0.80, 0.81, 0.82)]  # three pretrainings
    result = write_report(section, upstream, tmp_path, report_options(cfg), history=better)
    gate(section, result)
    assert all(r["ok"] for r in result["verdict"]["history"]["rows"])
    # regression off: the same history is shown for information and fails nothing
    off = {**report_section(cfg), "regression": None}
    result = write_report(off, upstream, tmp_path, report_options(cfg), history=history)
    gate(off, result)
    assert result["verdict"]["failures"] == [] and result["verdict"]["history"]["rows"][0]["ok"] is False
    assert verdict_line(result["summary"], result["verdict"]).startswith("DONE smoke@")


def test_runs_of_the_same_pretraining_do_not_vote_for_themselves(cfg, upstream, tmp_path):
    own = upstream["pretrain"]["content_sha256"]
    section = {**report_section(cfg), "regression": regression(name="h", **H100)}
    mine = [history_entry(0.6, sha=own, commit=f"rerun{i}") for i in range(4)]  # cached reruns of this pretraining
    other = [history_entry(0.6, sha="other", commit=f"other{i}") for i in range(3)]  # one other pretraining, 3 reports
    result = write_report(section, upstream, tmp_path, report_options(cfg), history=mine + other)
    assert result["verdict"]["history"]["runs"] == 1 and not result["verdict"]["history"]["compared"]
    gate(section, result)  # 0.71794 is far worse than 0.6, but nothing comparable remains


def test_report_key_stays_for_a_rerun_and_changes_after_another_passing_run(shared_data, upstream, tmp_path):
    store = tmp_path / "store"
    cfg = load_config("smoke", overrides={"report.regression": True, "pretrain.num_iterations": 7},
                      mirror=str(shared_data), store=str(store))
    options = report_options(cfg)
    key = REPORT.key(report_section(cfg), upstream)  # as the flow computes it when it starts

    def build(options=options):  # what the report stage's build does with the store
        out = tmp_path / "report"
        out.mkdir(exist_ok=True)
        result = write_report(report_section(cfg), upstream, out, options, history=read_history(store, "smoke"))
        add_trend(result, "smoke", out, store)
        return result

    assert build()["verdict"]["failures"] == []  # smoke.yaml is a cpu baseline: not compared, passes
    (entry,) = read_history(store, "smoke")
    assert entry["verdict"] == "pass" and entry["pretrain_sha256"] == upstream["pretrain"]["content_sha256"]
    assert entry["pretrain_key"] == upstream["pretrain"]["key"] and entry["run_identity"] == options["run_identity"]
    assert REPORT.key(report_section(cfg), upstream) == key  # the rerun finds its report: Cached
    build()  # a rebuild of the same numbers (e.g. --refresh report) is not a new run
    build({**options, "run_identity": "after an edit that changes no bits"})  # nor under another name
    assert len(read_history(store, "smoke")) == 1 and REPORT.key(report_section(cfg), upstream) == key

    # another run's failing report does not change the comparison; its passing one does
    other = {**entry, "min_val_bpb": 0.8}
    append_history(store, other, "fail", {"pretrain_sha256": "other-pretraining", "run_identity": "other-recipe"})
    assert REPORT.key(report_section(cfg), upstream) == key
    append_history(store, other, "pass", {"pretrain_sha256": "other-pretraining", "run_identity": "other-recipe"})
    moved = REPORT.key(report_section(cfg), upstream)
    assert moved != key  # rebuilt against the new history ...
    build()
    assert len(read_history(store, "smoke")) == 3 and REPORT.key(report_section(cfg), upstream) == moved  # ... once


def test_recorded_baseline_round_trips_and_gates(cfg, upstream, tmp_path):
    result = write_report(report_section(cfg), upstream, tmp_path, report_options(cfg))
    assert main(["--write-baseline", "mine", str(tmp_path / "summary.json"), "--dir", str(tmp_path)]) == 0
    written = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    assert written["val_bpb_curve"]["tolerance"] == 0.01
    assert written["val_bpb_curve"]["steps"] == {int(k): pytest.approx(v, abs=1e-6) for k, v in CURVE_STEPS.items()}
    recorded = load_baseline("mine", tmp_path)
    assert (recorded["hardware"], recorded["world_size"]) == (H100["hardware"], 8)
    assert recorded["metrics"]["min_val_bpb"] == {"value": 0.71794, "tolerance": 0.005, "direction": "lower"}
    assert recorded["metrics"]["chatcore"]["value"] == 0.0312
    assert recorded["val_bpb_curve"]["steps"] == {k: pytest.approx(v, abs=1e-6) for k, v in CURVE_STEPS.items()}
    section = {**report_section(cfg), "regression": {"baseline": "mine", **recorded}}
    own = write_report(section, upstream, tmp_path, report_options(cfg))
    gate(section, own)  # a run passes its own baseline, curve included
    assert own["verdict"]["like"]["compared"] and len(own["verdict"]["curve"]["rows"]) == len(CURVE)
    worse = {**result["summary"], "min_val_bpb": 0.71794 + 0.0051}
    verdict = judge(worse, CURVE_STEPS, section["regression"], [], {})
    with pytest.raises(RegressionDetected, match="min_val_bpb") as err:
        gate(section, {**result, "verdict": verdict})
    again = pickle.loads(pickle.dumps(err.value))  # Prefect persists task exceptions
    assert str(again) == str(err.value) and again.failures == err.value.failures and again.line == err.value.line
    moved = {**CURVE_STEPS, "3000": CURVE_STEPS["3000"] + 0.02}  # one eval step off the recorded curve
    with pytest.raises(RegressionDetected, match="val_bpb at step 3000: 0.9800 outside the baseline band 0.9600"):
        gate(section, {**result, "verdict": judge(result["summary"], moved, section["regression"], [], {})})


def test_trend_artifact_is_keyed_by_the_deployment(cfg):
    assert report_options(cfg)["deployment"] is None  # outside a deployment run: the preset names the trend
    assert artifact_key("nightly", "trend") == "speedrun-nightly-trend"
