"""The run history and the trend (tasks/history.py) and the training progress (tasks/progress.py)."""

import json
import multiprocessing

from tasks.history import (append_history, comparable_runs, history_digest, history_path, is_repeat, plot_trend,
                           read_history, trend, trend_rows)
from tasks.progress import read_progress, render_progress

SUMMARY = {"preset": "d24", "commit": "abc1234", "hardware": "NVIDIA H100 80GB HBM3", "world_size": 8,
           "total_training_time": 5940.0, "min_val_bpb": 0.718, "core_metric": 0.26, "chatcore": 0.03,
           "tok_per_sec": 982000.5, "mfu": 51.3}


def _append_many(args):
    store, i = args
    for j in range(50):
        append_history(store, {**SUMMARY, "commit": f"c{i}-{j}"}, "pass")


def test_appends_from_concurrent_runs_never_interleave(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_append_many, [(tmp_path, i) for i in range(4)])
    lines = history_path(tmp_path, "d24").read_text().splitlines()
    assert len(lines) == 200 and all(json.loads(line)["verdict"] == "pass" for line in lines)
    assert len({json.loads(line)["commit"] for line in lines}) == 200


def test_trend_compares_like_with_like_and_keeps_the_last_runs(tmp_path):
    for i in range(12):
        append_history(tmp_path, {**SUMMARY, "commit": f"c{i:02d}", "min_val_bpb": 0.7 + i / 1000}, "pass")
    append_history(tmp_path, {**SUMMARY, "commit": "other", "world_size": 1}, None)  # another node size
    with open(history_path(tmp_path, "d24"), "a") as f:
        f.write('{"torn line')  # a crash mid-append: skipped
    history = read_history(tmp_path, "d24")
    assert len(history) == 13
    rows = trend_rows(trend(history, {"preset": "d24", "hardware": SUMMARY["hardware"], "world_size": 8}))
    assert [r["commit"] for r in rows] == [f"c{i:02d}" for i in range(2, 12)]
    assert rows[-1] == {"date": rows[-1]["date"], "commit": "c11", "min_val_bpb": 0.711, "core_metric": 0.26,
                        "chatcore": 0.03, "training_hours": 1.65, "tok_per_sec": 982000.0, "mfu": 51.3,
                        "verdict": "pass"}
    plot_trend(rows, tmp_path / "trend.png", "d24")
    assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rebuilt_report_of_the_same_numbers_is_not_a_new_run(tmp_path):
    run = {"pretrain_key": "k1", "pretrain_sha256": "c1", "run_identity": "i1"}
    first = append_history(tmp_path, SUMMARY, "pass", run)
    assert {k: first[k] for k in run} == run
    append_history(tmp_path, SUMMARY, "pass", run)  # the same pretraining, numbers and verdict: nothing appended
    assert len(read_history(tmp_path, "d24")) == 1
    append_history(tmp_path, SUMMARY, "fail", run)  # the verdict changed (another baseline): a new entry
    append_history(tmp_path, {**SUMMARY, "total_training_time": 6000.0}, "fail", run)  # retrained: new numbers
    append_history(tmp_path, SUMMARY, "pass", {**run, "pretrain_sha256": "c2"})  # another pretraining
    append_history(tmp_path, SUMMARY, "pass")  # no pretraining to tell runs apart: always a new run
    append_history(tmp_path, SUMMARY, "pass")
    history = read_history(tmp_path, "d24")
    assert [(e["pretrain_sha256"], e["verdict"]) for e in history] == \
        [("c1", "pass"), ("c1", "fail"), ("c1", "fail"), ("c2", "pass"), (None, "pass"), (None, "pass")]
    assert is_repeat(history, {**history[2], "date": "later"}) and not is_repeat(history, {**history[0], "date": "x"})
    # an edit that changes no bits renames the pretraining (key, identity), not what was measured: a repeat
    assert is_repeat(history, {**history[3], "pretrain_key": "k9", "run_identity": "i9"})


def test_comparable_runs_are_passing_like_runs_one_per_pretraining_never_its_own():
    like = {"preset": "d24", "hardware": SUMMARY["hardware"], "world_size": 8, "pretrain_sha256": "mine"}

    def entry(sha, **fields):
        return {**SUMMARY, "verdict": "pass", "pretrain_sha256": sha, "commit": sha, **fields}

    history = [entry("a"), entry("b"), entry("a", min_val_bpb=0.7),  # a reported twice: its latest entry counts
               entry("mine"), entry("c", verdict="fail"), entry("d", world_size=1), entry("e", hardware="cpu"),
               entry("f", preset="d26"), entry(None), entry(None), entry("g")]
    runs = comparable_runs(history, like, runs=10)
    assert [e["commit"] for e in runs] == ["b", "a", None, None, "g"] and runs[1]["min_val_bpb"] == 0.7
    assert [e["commit"] for e in comparable_runs(history, like, runs=2)] == [None, "g"]  # the last ones


def test_history_digest_moves_with_other_passing_runs_only():
    def entry(identity, verdict="pass", **fields):
        return {**SUMMARY, "verdict": verdict, "run_identity": identity, "date": f"{len(history)}", **fields}

    history: list[dict] = []
    history.append(entry("other"))
    start = history_digest(history, "d24", "mine")
    history.append(entry("mine"))  # this recipe's own run (a rerun must find the same key)
    history.append(entry("other", "fail"))  # failing runs are never compared
    history.append(entry("other", preset="d26"))  # another preset's
    assert history_digest(history, "d24", "mine") == start
    history.append(entry("other"))  # a passing run of another recipe joins the comparison
    assert history_digest(history, "d24", "mine") != start


def test_progress_is_read_from_the_metrics_the_trainer_writes(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert read_progress(metrics)["steps_done"] == 0  # not started yet
    records = [{"step": 0, "val/bpb": 4.15}]
    records += [{"step": s, "train/loss": 7.0 - s / 10, "train/dt": 0.5, "train/tok_per_sec": 4096,
                 "train/mfu": 1.5, "total_training_time": 0.5 * s} for s in range(10)]
    records += [{"step": 10, "val/bpb": 3.2}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 10, "train/lo')  # mid-write
    state = read_progress(metrics)
    assert state["steps_done"] == 10 and state["val"] == [(0, 4.15), (10, 3.2)] and state["seconds_per_step"] == 0.5
    text = render_progress("pretrain", state, 20)
    assert "| step | 10 / 20 (50.0%) |" in text and "| val bpb (latest) | 3.2000 at step 10 |" in text
    assert "| ETA (min) | 0.1 |" in text and "| train loss | 6.1000 |" in text
    assert "| step | 10 |" in render_progress("sft", state, None)  # one pass of unknown length
