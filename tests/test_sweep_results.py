"""The sweep's pure parts (tasks/sweep.py): cells, device batches, the results table and the isoFLOP fit."""

import math

import pytest

from tasks.sweep import (cell_config, isoflop_fits, merge_rows, miniseries_cells, read_results, reference_device_batch,
                         scaling_cells, write_csv, write_results)


def test_reference_device_batch_rule_and_its_halving_for_a_small_recipe():
    assert [reference_device_batch(d) for d in (12, 18, 19, 20, 26, 27, 28, 32)] == [32, 32, 32, 16, 16, 16, 8, 8]
    # smoke: 2048 tokens a step of 128-token rows = 16 rows, so the rule's 32 is halved to 16
    cfg, overrides = cell_config("smoke", {}, miniseries_cells([4])[0])
    assert overrides["pretrain.device_batch_size"] == 16 and cfg.pretrain.device_batch_size == 16
    cfg, _ = cell_config("smoke", {"pretrain.device_batch_size": 4}, miniseries_cells([4])[0])  # set: kept
    assert cfg.pretrain.device_batch_size == 4
    cfg, _ = cell_config("smoke", {}, miniseries_cells([4])[0], device_batch={4: 8})  # per depth: kept
    assert cfg.pretrain.device_batch_size == 8


def test_scaling_cells_train_to_their_budget():
    cells = scaling_cells([4e10, 2e10], [2, 1])
    assert [c.name for c in cells] == ["2e10-d1", "2e10-d2", "4e10-d1", "4e10-d2"]
    cfgs = {c.name: cell_config("smoke", {"pretrain.warmup_steps": 1}, c)[0] for c in cells}
    for cell in cells:
        plan = cfgs[cell.name].plan
        assert plan.num_iterations == round(cell.budget / (plan.flops_per_token * plan.total_batch_size))  # as the reference
    assert cfgs["4e10-d1"].plan.num_iterations > cfgs["2e10-d1"].plan.num_iterations > cfgs["2e10-d2"].plan.num_iterations


def test_isoflop_fit_finds_the_vertex_of_each_budget():
    rows = []
    for budget, best in ((1e18, 5.0), (1e19, 6.0)):  # val bpb = (log10 N - best)^2 + 1: the optimum at N = 10^best
        for x in (best - 1, best - 0.5, best + 0.25, best + 1):
            n = 10 ** x
            rows.append({"flops_budget": budget, "params_transformer": n * 0.75, "params_lm_head": n * 0.25,
                         "val_bpb": (x - best) ** 2 + 1})
    rows.append({"flops_budget": 1e20, "params_transformer": 1e6, "params_lm_head": 0, "val_bpb": 1.0})  # one point
    fits = {f["flops_budget"]: f for f in isoflop_fits(rows)}
    for budget, best in ((1e18, 5.0), (1e19, 6.0)):
        assert fits[budget]["points"] == 4
        assert math.log10(fits[budget]["optimal_params"]) == pytest.approx(best, abs=1e-6)
        assert fits[budget]["optimal_tokens"] == pytest.approx(budget / (6 * 10 ** best), rel=1e-5)
        assert fits[budget]["tokens_per_param"] == pytest.approx(budget / (6 * 10 ** (2 * best)), rel=1e-5)
        assert fits[budget]["min_val_bpb"] == pytest.approx(1.0, abs=1e-9)
    assert fits[1e20]["points"] == 1 and fits[1e20]["optimal_params"] is None


def test_a_fit_whose_vertex_is_outside_the_measured_sizes_has_no_optimum():
    rows = [{"flops_budget": 1e18, "params_transformer": 10 ** x, "params_lm_head": 0, "val_bpb": 5 - x}
            for x in (4, 5, 6)]  # still falling at the largest size
    rows[1]["val_bpb"] += 1e-3  # not exactly linear, so a quadratic fits
    assert isoflop_fits(rows)[0]["optimal_params"] is None


def test_results_csv_keeps_earlier_cells_and_replaces_rerun_ones(tmp_path):
    def row(cell, depth, val):
        return {"depth": depth, "model_dim": 64 * depth, "num_params": 1, "num_scaling_params": 1, "num_iterations": 4,
                "tokens_trained": 8192, "param_data_ratio": 1.0, "val_bpb": val, "core_score": 0.1,
                "train_time_sec": 1.0, "cell": cell, "commit": "abc", "hardware": "cpu", "world_size": 1,
                "device_batch_size": 16, "pretrain_key": cell * 8}
    write_csv(tmp_path / "results.csv", "miniseries", merge_rows("miniseries", {}, {"d3": row("d3", 3, 2.0),
                                                                                    "d1": row("d1", 1, 3.0)}))
    written = write_results("miniseries", "smoke", tmp_path, {"d2": row("d2", 2, 2.5), "d3": row("d3", 3, 1.9)},
                            {"d2": {"state": "Completed"}, "d3": {"state": "Completed"}})
    rows = read_results(tmp_path / "results.csv")
    assert list(rows) == ["d1", "d2", "d3"] and rows["d3"]["val_bpb"] == "1.9" and rows["d1"]["val_bpb"] == "3.0"
    assert (tmp_path / "miniseries.png").read_bytes().startswith(b"\x89PNG") and "| d2 | Completed |" in written["report"]
