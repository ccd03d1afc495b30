"""The report stage's files, numbers and regression gate, built from hand-made upstream artifacts.

The artifacts are written with the store's own manifest writer in the formats the stages produce
(pretrain: summary.json, metrics.jsonl, log.txt; base_eval: summary.json with CORE results and samples;
sft: summary.json, metrics.jsonl; chat_eval: summary.json with per-task results). The wandb summary is
read back from the offline run file wandb writes.
"""

import json
import pickle
import struct
import time
from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, load_config
from tasks.report import (BASELINES_DIR, GPT2_CORE, STAGES, RegressionDetected, compare, gate, load_baseline,
                          log_wandb, main, report_options, report_section, write_report)
from tasks.store import write_manifest

PRETRAIN_SUMMARY = {"total_training_time": 5940.25, "total_training_flops": 2.788e19, "min_val_bpb": 0.71794,
                    "val_bpb": 0.71801, "core_metric": None, "step": 5568, "mfu": 51.3, "tok_per_sec": 982_000.5,
                    "world_size": 8, "device": "NVIDIA H100 80GB HBM3", "depth": 24}
CURVE = [{"step": s, "total_training_flops": s * 5e15, "total_training_time": max(0.0, s - 11) * 1.07,
          "val/bpb": 1.2 - 0.08 * i} for i, s in enumerate(range(0, 5569, 1000))]
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
    assert {k: logged[k] for k in summary if summary[k] is not None} == {k: v for k, v in summary.items() if v is not None}

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
    beaten = {"baseline": "b", "metrics": {
        "min_val_bpb": {"value": 0.7200, "tolerance": 0.001, "direction": "lower"},
        "chatcore": {"value": 0.02, "tolerance": 0.0, "direction": "higher"}}}
    section = {**report_section(cfg), "regression": beaten}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    gate(section, result)  # passes
    report = (tmp_path / "report.md").read_text()
    assert "**Verdict: PASS**: all 2 metrics within tolerance of baseline `b`" in report

    missed = {"baseline": "strict", "metrics": {
        "min_val_bpb": {"value": 0.7100, "tolerance": 0.004, "direction": "lower"},  # 0.71794 > 0.714
        "core_metric": {"value": 0.30, "tolerance": 0.012, "direction": "higher"},  # 0.43 passes
        "total_training_time": {"value": 5000.0, "tolerance": 250.0, "direction": "lower"}}}
    section = {**report_section(cfg), "regression": missed}
    result = write_report(section, upstream, tmp_path, report_options(cfg))
    with pytest.raises(RegressionDetected) as err:
        gate(section, result)
    assert [f["metric"] for f in err.value.failures] == ["min_val_bpb", "total_training_time"]
    message = str(err.value)
    assert "'strict'" in message
    assert "min_val_bpb: value 0.71794 vs baseline 0.71 (lower is better, tolerance 0.004)" in message
    assert "total_training_time: value 5940.25 vs baseline 5000 (lower is better, tolerance 250)" in message
    report = (tmp_path / "report.md").read_text()  # the failing report is written before the raise
    assert "**Verdict: FAIL** against baseline `strict`: min_val_bpb, total_training_time" in report


def test_tolerance_edges_and_unmeasured_metric():
    base = {"baseline": "x", "metrics": {"min_val_bpb": {"value": 1.0, "tolerance": 0.01, "direction": "lower"},
                                         "core_metric": {"value": 0.2, "tolerance": 0.01, "direction": "higher"}}}
    ok = {r["metric"]: r["ok"] for r in compare({"min_val_bpb": 1.01, "core_metric": 0.19}, base)}
    assert ok == {"min_val_bpb": True, "core_metric": True}  # exactly at the tolerance passes
    ok = {r["metric"]: r["ok"] for r in compare({"min_val_bpb": 1.0101, "core_metric": None}, base)}
    assert ok == {"min_val_bpb": False, "core_metric": False}  # not measured fails


def test_shipped_baselines(tmp_path):
    names = sorted(p.stem for p in BASELINES_DIR.glob("*.yaml"))
    assert names == ["cpu", "d12", "d20", "d24", "d26", "smoke"]
    d24 = load_baseline("d24")
    assert d24["min_val_bpb"] == {"value": 0.718, "tolerance": 0.004, "direction": "lower"}
    assert d24["total_training_time"]["tolerance"] == pytest.approx(0.05 * 5940)
    for name in ("smoke", "cpu", "d26"):
        assert "min_val_bpb" in load_baseline(name)  # val bpb is the primary signal everywhere
    for name in ("d12", "d20"):  # no reference numbers yet: regression on must fail before anything runs
        with pytest.raises(ConfigError, match=rf"{name}.yaml lists no metrics; fix: record a good run"):
            report_section(load_config(name, overrides={"report.regression": True}))
    with pytest.raises(ConfigError, match=r"no baseline nope.yaml .* fix: --set report.baseline"):
        report_section(load_config("smoke", overrides={"report.regression": True, "report.baseline": "nope"}))
    for p in BASELINES_DIR.glob("*.yaml"):
        assert yaml.safe_load(p.read_text())["preset"] == p.stem


def test_recorded_baseline_round_trips_and_gates(cfg, upstream, tmp_path):
    result = write_report(report_section(cfg), upstream, tmp_path, report_options(cfg))
    assert main(["--write-baseline", "mine", str(tmp_path / "summary.json"), "--dir", str(tmp_path)]) == 0
    recorded = load_baseline("mine", tmp_path)
    assert recorded["min_val_bpb"] == {"value": 0.71794, "tolerance": 0.005, "direction": "lower"}
    assert recorded["chatcore"]["value"] == 0.0312
    section = {**report_section(cfg), "regression": {"baseline": "mine", "metrics": recorded}}
    gate(section, {**result, "verdict": compare(result["summary"], section["regression"])})  # a run passes its own
    worse = {**result["summary"], "min_val_bpb": 0.71794 + 0.0051}
    with pytest.raises(RegressionDetected, match="min_val_bpb") as err:
        gate(section, {**result, "verdict": compare(worse, section["regression"])})
    again = pickle.loads(pickle.dumps(err.value))  # Prefect persists task exceptions
    assert str(again) == str(err.value) and again.failures == err.value.failures
