"""Sweeps over model size: the cells of a miniseries or an isoFLOP scaling sweep, their results table and plots.

A sweep is a list of cells; a cell is one speedrun run stopped after base_eval (pretraining, then CORE on the
final model), with its own overrides on top of the sweep's preset:

    miniseries      one cell per depth (the reference trains d12, d14, ..., d26 with one recipe): does a recipe
                    hold across model sizes?
    scaling_laws    one cell per FLOP budget x depth, each trained to exactly its budget
                    (pretrain.target_flops, target_param_data_ratio=-1): per budget, which size is best?

Every cell is a stage of the speedrun with a content-hashed key, so a sweep run again finds its finished cells
`Cached` and a new depth or budget trains only its own cells. The cells share one shards and one tokenizer
artifact: the sweep pins data.num_train_shards to what its largest cell needs (`pin_train_shards`).

Device batch sizes follow the reference's rule unless set (`reference_device_batch`), halved while a row of the
batch would exceed the optimizer step's tokens. This module is plain Python: flows/sweep.py runs the cells
(here or on the pool's workers) and publishes what `write_results` writes.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from model.files import atomic_write_bytes
from model.sizing import ModelShape
from tasks.config import ConfigError, SpeedrunConfig, resolve_config, validate_config
from tasks.plots import save_png, two_panels
from tasks.store import sha256_bytes, canonical_json

KINDS = ("miniseries", "scaling_laws")
MINISERIES_DEPTHS = (12, 14, 16, 18, 20, 22, 24, 26)  # runs/miniseries.sh
SCALING_DEPTHS = (10, 12, 14, 16, 18, 20)  # runs/scaling_laws.sh
SCALING_BUDGETS = (1e18, 2.15e18, 4.64e18, 1e19)
SCALING_EVAL_TOKENS = 100 * 524_288  # the scaling runs evaluate val bpb on 100 steps' worth of tokens

# results.csv: the reference's columns, then where the numbers come from.
MINISERIES_COLUMNS = ("depth", "model_dim", "num_params", "num_scaling_params", "num_iterations", "tokens_trained",
                      "param_data_ratio", "val_bpb", "core_score", "train_time_sec")
SCALING_COLUMNS = ("flops_budget", "depth", "model_dim", "params_wte", "params_value_embeds", "params_lm_head",
                   "params_transformer", "params_scalars", "params_total", "num_iterations", "tokens_trained",
                   "val_bpb", "core_score", "train_time_sec")
PROVENANCE_COLUMNS = ("cell", "commit", "hardware", "world_size", "device_batch_size", "pretrain_key")


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its name (a results row and a directory name) and its overrides of the preset."""

    name: str
    depth: int
    budget: float | None = None
    overrides: dict = field(default_factory=dict, hash=False, compare=False)


def miniseries_cells(depths) -> list[Cell]:
    return [Cell(f"d{d}", d, overrides={"pretrain.depth": d}) for d in sorted(set(depths))]


def scaling_cells(budgets, depths) -> list[Cell]:
    """Each budget x depth, trained to the budget: the horizon comes from target_flops alone."""
    return [Cell(f"{budget:.3g}".replace("+", "") + f"-d{d}", d, budget,
                 {"pretrain.depth": d, "pretrain.target_flops": float(budget), "pretrain.num_iterations": -1,
                  "pretrain.target_param_data_ratio": -1})
            for budget in sorted(set(budgets)) for d in sorted(set(depths))]


def reference_device_batch(depth: int) -> int:
    """The reference's per-GPU batch by depth (runs/miniseries.sh): 32 below d20, 16 from d20, 8 from d28."""
    return 32 if depth < 20 else 16 if depth < 28 else 8


def sweep_id(kind: str, preset: str, overrides: dict) -> str:
    """The sweep's directory name under <store>/sweeps: kind and preset, and a hash of its own overrides."""
    suffix = f"-{sha256_bytes(canonical_json(overrides))[:8]}" if overrides else ""
    return f"{kind}-{preset}{suffix}"


def cell_config(preset: str, overrides: dict, cell: Cell, device_batch: dict[int, int] | None = None,
                mirror: str | None = None, store: str | None = None) -> tuple[SpeedrunConfig, dict]:
    """The cell's validated config and the overrides that make it (what its speedrun run gets).

    The device batch: `device_batch[depth]` if given, else pretrain.device_batch_size if the sweep's overrides
    set it, else the reference's rule, halved while one row of it exceeds the step's tokens (a small recipe).
    Raises ConfigError naming the cell."""
    cell_overrides = {**overrides, **cell.overrides}
    try:
        if device_batch and cell.depth in device_batch:
            cell_overrides["pretrain.device_batch_size"] = device_batch[cell.depth]
        elif "pretrain.device_batch_size" not in overrides:
            probe = validate_config(preset, cell_overrides, mirror=mirror, store=store)
            rows = probe.plan.total_batch_size // (probe.pretrain.max_seq_len * probe.runtime.world_size)
            batch = reference_device_batch(cell.depth)
            while batch > max(rows, 1):
                batch //= 2
            cell_overrides["pretrain.device_batch_size"] = batch
        return validate_config(preset, cell_overrides, mirror=mirror, store=store), cell_overrides
    except ConfigError as e:
        raise ConfigError([f"cell {cell.name}: {p}" for p in e.problems]) from None


def pin_train_shards(cfgs: list[SpeedrunConfig]) -> int:
    """The train shards every cell uses: what the largest wants, so all cells share one shards artifact."""
    return max(cfg.train_shards_wanted() for cfg in cfgs)


def resolve_cells(preset: str, overrides: dict, cells: list[Cell], device_batch: dict[int, int] | None = None,
                  mirror: str | None = None, store: str | None = None) -> tuple[dict, dict]:
    """({cell name: (config, overrides)} of the valid cells, {cell name: error} of the others). Valid cells get
    the pinned train shard count and are resolved (mirror, shard listing)."""
    valid, errors = {}, {}
    for cell in cells:
        try:
            valid[cell.name] = cell_config(preset, overrides, cell, device_batch, mirror, store)
        except ConfigError as e:
            errors[cell.name] = str(e)
    if valid and "data.num_train_shards" not in overrides:
        shards = pin_train_shards([cfg for cfg, _ in valid.values()])
        for name, (cfg, cell_overrides) in list(valid.items()):
            cell_overrides = {**cell_overrides, "data.num_train_shards": shards}
            valid[name] = (validate_config(preset, cell_overrides, mirror=mirror, store=store), cell_overrides)
    for name, (cfg, cell_overrides) in list(valid.items()):
        try:
            valid[name] = (resolve_config(cfg), cell_overrides)
        except ConfigError as e:
            errors[name] = f"cell {name}: {e}"
            del valid[name]
    return valid, errors


def cell_state(stages: dict) -> str:
    """`Cached` when the cell's training and evaluation both came from the cache, else `Completed`."""
    return "Cached" if all(stages.get(s, {}).get("state") == "Cached" for s in ("pretrain", "base_eval")) else \
        "Completed"


def cell_row(kind: str, cell: Cell, cfg: SpeedrunConfig, pretrain: dict, base_eval: dict, key: str,
             commit: str | None) -> dict:
    """The cell's results row: the reference's columns, then the cell, commit, hardware, world size, batch, key.

    `pretrain`: the pretrain artifact's summary.json; `base_eval`: the base_eval artifact's metrics; `commit`: the
    code the pretraining ran."""
    shape = ModelShape.from_depth(cfg.pretrain.depth, aspect_ratio=cfg.pretrain.aspect_ratio,
                                  head_dim=cfg.pretrain.head_dim, vocab_size=cfg.tokenizer.vocab_size,
                                  seq_len=cfg.pretrain.max_seq_len, window_pattern=cfg.pretrain.window_pattern)
    counts = shape.param_counts()
    tokens = pretrain["total_batch_size"] * pretrain["step"]
    val_bpb = pretrain.get("val_bpb") if pretrain.get("val_bpb") is not None else pretrain.get("min_val_bpb")
    common = {"depth": cfg.pretrain.depth, "model_dim": shape.model_dim, "num_iterations": pretrain["step"],
              "tokens_trained": tokens, "val_bpb": val_bpb, "core_score": base_eval.get("core_metric"),
              "train_time_sec": pretrain.get("total_training_time")}
    if kind == "miniseries":
        row = {**common, "num_params": counts["total"], "num_scaling_params": shape.scaling_params(),
               "param_data_ratio": tokens / shape.scaling_params()}
        row = {c: row[c] for c in MINISERIES_COLUMNS}
    else:
        row = {**common, "flops_budget": cell.budget, "params_wte": counts["wte"],
               "params_value_embeds": counts["value_embeds"], "params_lm_head": counts["lm_head"],
               "params_transformer": counts["transformer_matrices"], "params_scalars": counts["scalars"],
               "params_total": counts["total"]}
        row = {c: row[c] for c in SCALING_COLUMNS}
    return {**row, "cell": cell.name, "commit": commit,
            "hardware": pretrain.get("device"), "world_size": pretrain.get("world_size"),
            "device_batch_size": cfg.pretrain.device_batch_size, "pretrain_key": key}


# ---------------------------------------------------------------------------------------------
# results.csv, the fits and the plots

def columns(kind: str) -> tuple[str, ...]:
    return (MINISERIES_COLUMNS if kind == "miniseries" else SCALING_COLUMNS) + PROVENANCE_COLUMNS


def read_results(path: Path) -> dict[str, dict]:
    """The rows of an existing results.csv by cell (values as text), or {}."""
    if not path.is_file():
        return {}
    return {row["cell"]: row for row in csv.DictReader(io.StringIO(path.read_text()))}


def merge_rows(kind: str, old: dict[str, dict], new: dict[str, dict]) -> list[dict]:
    """Earlier rows kept, this run's replacing them, ordered by budget then depth: a sweep grows by its cells."""
    rows = {**old, **new}

    def order(row):
        return (float(row.get("flops_budget") or 0), int(row["depth"]))
    return sorted(rows.values(), key=order)


def write_csv(path: Path, kind: str, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(kind), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, out.getvalue().encode())


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def isoflop_fits(rows: list[dict]) -> list[dict]:
    """Per budget with at least three depths: the quadratic fit of val bpb in log10(scaling params) (transformer
    matrices + lm_head, the N the horizon counts), its vertex N*, D* = C / (6 N*) and the tokens:params ratio D*/N*.
    A budget whose fit opens downwards, or whose vertex lies outside the measured sizes, has no optimum."""
    import numpy as np

    fits = []
    for budget in sorted({_number(r["flops_budget"]) for r in rows if _number(r.get("flops_budget"))}):
        points = [(math.log10(_number(r["params_transformer"]) + _number(r["params_lm_head"])), _number(r["val_bpb"]))
                  for r in rows if _number(r["flops_budget"]) == budget and _number(r.get("val_bpb")) is not None]
        fit = {"flops_budget": budget, "points": len(points), "a": None, "b": None, "c": None,
               "optimal_params": None, "optimal_tokens": None, "tokens_per_param": None, "min_val_bpb": None}
        if len(points) >= 3:
            x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
            a, b, c = (float(v) for v in np.polyfit(x, y, 2))
            fit.update(a=a, b=b, c=c)
            vertex = -b / (2 * a) if a > 0 else None
            if vertex is not None and x.min() <= vertex <= x.max():
                n_opt = 10 ** vertex
                fit.update(optimal_params=n_opt, optimal_tokens=budget / (6 * n_opt),
                           tokens_per_param=budget / (6 * n_opt) / n_opt, min_val_bpb=a * vertex ** 2 + b * vertex + c)
        fits.append(fit)
    return fits


def plot_miniseries(rows: list[dict], path: Path, title: str) -> None:
    """val bpb and CORE against depth (left) and against training FLOPs, log axis (right)."""
    fig, (left, right) = two_panels()
    done = [r for r in rows if _number(r.get("val_bpb")) is not None]
    depth = [int(r["depth"]) for r in done]
    flops = [6 * _number(r["num_scaling_params"]) * _number(r["tokens_trained"]) for r in done]
    for ax, x, label in ((left, depth, "depth"), (right, flops, "training FLOPs (6 N D)")):
        ax.plot(x, [_number(r["val_bpb"]) for r in done], marker="o", color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel("val bpb", color="tab:blue")
        core = [(xi, _number(r["core_score"])) for xi, r in zip(x, done) if _number(r.get("core_score")) is not None]
        if core:
            twin = ax.twinx()
            twin.plot([c[0] for c in core], [c[1] for c in core], marker="s", color="tab:orange")
            twin.set_ylabel("CORE", color="tab:orange")
        ax.grid(alpha=0.3)
    if flops:
        right.set_xscale("log")
    save_png(fig, path, title)


def plot_isoflop(rows: list[dict], fits: list[dict], path: Path, title: str) -> None:
    """Left: val bpb against scaling params (log axis), one curve per budget, its fit and its optimum. Right: the
    optimal params and tokens per budget (log-log), where the budgets have an optimum."""
    import numpy as np

    fig, (left, right) = two_panels()
    for fit in fits:
        budget = fit["flops_budget"]
        points = sorted((_number(r["params_transformer"]) + _number(r["params_lm_head"]), _number(r["val_bpb"]))
                        for r in rows if _number(r["flops_budget"]) == budget and _number(r.get("val_bpb")) is not None)
        if not points:
            continue
        line = left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{budget:.3g} FLOPs")[0]
        if fit["a"] is not None:
            xs = np.linspace(math.log10(points[0][0]), math.log10(points[-1][0]), 50)
            left.plot(10 ** xs, fit["a"] * xs ** 2 + fit["b"] * xs + fit["c"], "--", color=line.get_color())
        if fit["optimal_params"] is not None:
            left.plot([fit["optimal_params"]], [fit["min_val_bpb"]], "*", markersize=14, color=line.get_color())
    left.set_xscale("log")
    left.set_xlabel("scaling params (transformer matrices + lm_head)")
    left.set_ylabel("val bpb")
    left.grid(alpha=0.3)
    if fits:
        left.legend()
    optima = [f for f in fits if f["optimal_params"] is not None]
    if optima:
        right.plot([f["flops_budget"] for f in optima], [f["optimal_params"] for f in optima], marker="o", label="N*")
        right.plot([f["flops_budget"] for f in optima], [f["optimal_tokens"] for f in optima], marker="s", label="D*")
        right.set_xscale("log")
        right.set_yscale("log")
        right.legend()
    else:
        right.set_title("no budget with 3+ sizes around its optimum yet")
    right.set_xlabel("FLOP budget")
    right.grid(alpha=0.3)
    save_png(fig, path, title)


def table(rows: list[dict], cols) -> list[str]:
    def fmt(v):
        number = _number(v)
        if number is None:
            return "-" if v in (None, "") else str(v)
        return f"{number:.6g}" if not float(number).is_integer() or abs(number) >= 1e7 else str(int(number))
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]


def render_report(kind: str, preset: str, rows: list[dict], cells: dict[str, dict], fits: list[dict]) -> str:
    """report.md of a sweep: this run's cells and their states, the results table, the plot(s) and, for the
    scaling sweep, the fitted optimum per budget and the compute-optimal tokens:params ratio."""
    title = "Miniseries" if kind == "miniseries" else "Scaling laws (isoFLOP)"
    out = [f"# {title}: {preset}", "", "## This run's cells", ""]
    out += table([{"cell": name, **info} for name, info in cells.items()], ("cell", "state", "flow_run", "error"))
    out += ["", "## Results (results.csv)", ""] + table(rows, columns(kind)[:-1]) + [""]
    if kind == "miniseries":
        out += ["![val bpb and CORE against depth and FLOPs](miniseries.png)", ""]
    else:
        out += ["![isoFLOP curves](isoflop.png)", "", "## Fitted optimum per budget", "",
                "val bpb fitted as a quadratic in log10(scaling params) per budget; N* is its vertex, "
                "D* = C / (6 N*).", ""]
        out += table(fits, ("flops_budget", "points", "optimal_params", "optimal_tokens", "tokens_per_param",
                            "min_val_bpb"))
        ratios = [f["tokens_per_param"] for f in fits if f["tokens_per_param"]]
        if ratios:
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            out += ["", f"Compute-optimal tokens:params (geometric mean over {len(ratios)} budgets): {geo:.3g}"]
        else:
            out += ["", "No compute-optimal ratio yet: it needs a budget with three or more depths around its optimum."]
        out += [""]
    return "\n".join(out)


def write_results(kind: str, preset: str, out_dir: Path, new_rows: dict[str, dict], cells: dict[str, dict]) -> dict:
    """Merge this run's rows into out_dir/results.csv, then write the plot(s) and report.md there.
    Returns {"rows", "fits", "report", "results_csv", "report_md", "plots"}."""
    csv_path = out_dir / "results.csv"
    rows = merge_rows(kind, read_results(csv_path), new_rows)
    write_csv(csv_path, kind, rows)
    fits = isoflop_fits(rows) if kind == "scaling_laws" else []
    if kind == "miniseries":
        plots = [out_dir / "miniseries.png"]
        plot_miniseries(rows, plots[0], f"miniseries: {preset}")
    else:
        plots = [out_dir / "isoflop.png"]
        plot_isoflop(rows, fits, plots[0], f"isoFLOP: {preset}")
    report = render_report(kind, preset, rows, cells, fits)
    atomic_write_bytes(out_dir / "report.md", report.encode())
    return {"rows": rows, "fits": fits, "report": report, "results_csv": str(csv_path),
            "report_md": str(out_dir / "report.md"), "plots": [str(p) for p in plots]}
