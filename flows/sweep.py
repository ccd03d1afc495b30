"""Run a sweep's cells (tasks/sweep.py) and publish its results: one after the other here, or spread over the pool.

Shared by flows/miniseries.py and flows/scaling_laws.py. A cell is the speedrun flow stopped after base_eval,
with the cell's overrides; it writes its outcome into the store (`<store>/sweeps/<sweep>/cells/<cell>.json`),
which is why a sweep spread over nodes needs one store that every node shares.

    cells="local"   each cell runs as a subflow of this flow run, one at a time, on this machine
    cells="pool"    every cell is submitted at once as a run of the deployment `cell_deployment` (default
                    speedrun/sweep-cell, on the `speedrun` work pool); each GPU node's worker (`--limit 1`) takes
                    one cell at a time, so N nodes train N cells at once and one node trains them in turn

Then results.csv (earlier cells kept, this run's replaced), the plot(s) and report.md land in
`<store>/sweeps/<sweep>/` and in the UI as a markdown and a table artifact. A cell that fails (a config that
cannot train at its size, a crash) does not stop the others; the sweep then fails naming it, and a rerun after
the fix finds every other cell Cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run

from flows.speedrun import add_config_arguments, speedrun
from tasks.config import ConfigError, parse_set, validate_config
from tasks.publish import artifact_key, inline_images
from tasks.store import atomic_write_json, read_manifest
from tasks.sweep import Cell, cell_row, cell_state, resolve_cells, sweep_id, write_results

CELL_DEPLOYMENT = "speedrun/sweep-cell"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_S = 5.0


class SweepFailed(RuntimeError):
    """Some cells of the sweep failed; the message names each and why. The others' results are published."""


def run_sweep(kind: str, preset: str, cells: list[Cell], overrides: dict | None, mirror: str | None,
              store: str | None, device_batch: dict | None, where: str, cell_deployment: str | None,
              summary_path: str | None) -> dict:
    """Validate every cell, run the valid ones, publish the results; raise SweepFailed if any cell failed."""
    logger = get_run_logger()
    # Prefect parameters may nest ({"pretrain": {"depth": 4}}); the cells add dotted keys ("pretrain.depth").
    overrides = {f"{k}.{kk}": vv for k, v in (overrides or {}).items() if isinstance(v, dict) for kk, vv in v.items()} | \
        {k: v for k, v in (overrides or {}).items() if not isinstance(v, dict)}
    device_batch = {int(k): int(v) for k, v in (device_batch or {}).items()}
    if where not in ("local", "pool"):
        raise ConfigError([f"cells: {where!r} is not a way to run cells; fix: 'local' or 'pool'"])
    valid, errors = resolve_cells(preset, overrides, cells, device_batch, mirror, store)
    root = Path(next(iter(valid.values()))[0].runtime.store if valid else
                validate_config(preset, overrides, mirror=mirror, store=store).runtime.store).expanduser().resolve()
    out_dir = root / "sweeps" / sweep_id(kind, preset, overrides)
    for name, error in errors.items():
        logger.error(f"cell {name}: not run: {error}")
    logger.info(f"{kind} of {preset}: {len(valid)} cells to run {where}, {len(errors)} invalid; results in {out_dir}")

    outcome_path = {name: out_dir / "cells" / f"{name}.json" for name in valid}
    for path in outcome_path.values():  # an outcome left by an earlier run must not pass for this run's
        path.unlink(missing_ok=True)
    parameters = {name: {"preset": preset, "overrides": cell_overrides, "until": "base_eval", "mirror": mirror,
                         "store": str(root), "summary_path": str(outcome_path[name]), "label": name}
                  for name, (_, cell_overrides) in valid.items()}
    if where == "local":
        runs = run_cells_here(parameters)
    else:
        runs = run_cells_on_pool(parameters, cell_deployment or CELL_DEPLOYMENT)

    by_name = {cell.name: cell for cell in cells}
    results: dict[str, dict] = {name: {"state": "Failed", "error": error, "key": None, "artifact": None,
                                       "flow_run": None} for name, error in errors.items()}
    rows = {}
    for name, run in runs.items():
        result = {"state": run["state"], "error": run.get("error"), "flow_run": run["flow_run"], "key": None,
                  "artifact": None}
        if run["state"] == "Completed":
            try:
                outcome = json.loads(outcome_path[name].read_text())
                stages = outcome["stages"]
                pretrain_art, base_eval_art = Path(stages["pretrain"]["artifact"]), Path(stages["base_eval"]["artifact"])
                pretrain = json.loads((pretrain_art / "summary.json").read_text())
                commit = ((read_manifest(pretrain_art) or {}).get("environment", {}).get("git_commit") or {})
                rows[name] = cell_row(kind, by_name[name], valid[name][0], pretrain,
                                      (read_manifest(base_eval_art) or {}).get("metrics", {}),
                                      stages["pretrain"]["key"], commit.get("short"))
                result.update(state=cell_state(stages), key=stages["pretrain"]["key"], artifact=str(pretrain_art))
            except (OSError, KeyError, ValueError) as e:
                result.update(state="Failed", error=f"the cell finished but its outcome cannot be read: {e}")
        results[name] = result
        logger.info(f"cell {name}: {result['state']}" + (f": {result['error']}" if result["error"] else ""))

    results = {cell.name: results[cell.name] for cell in cells if cell.name in results}  # the sweep's order
    written = write_results(kind, preset, out_dir, rows, results)
    publish_sweep(kind, preset, out_dir, written)
    data = {"cells": results, "results_csv": written["results_csv"], "report": written["report_md"],
            "plots": written["plots"], "fits": written["fits"]}
    if summary_path:
        atomic_write_json(Path(summary_path), data)
    failed = {name: r["error"] for name, r in results.items() if r["state"] not in ("Completed", "Cached")}
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(results)} cells failed (the others are in {written['results_csv']}; "
                          "fix the cause and run the sweep again, finished cells come back Cached):\n" +
                          "\n".join(f"  - {name}: {error}" for name, error in failed.items()))
    return data


def run_cells_here(parameters: dict[str, dict]) -> dict[str, dict]:
    """Each cell as a speedrun subflow, in order; a failed cell is recorded and the next one runs."""
    runs = {}
    for name, params in parameters.items():
        state = speedrun(**params, return_state=True)
        runs[name] = {"state": "Completed" if state.is_completed() else state.name,
                      "error": None if state.is_completed() else state.message,
                      "flow_run": str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None}
    return runs


def run_cells_on_pool(parameters: dict[str, dict], deployment: str) -> dict[str, dict]:
    """Submit every cell as a run of `deployment` at once, then wait for all of them. A sweep that stops waiting
    (cancelled, crashed) cancels the cells it submitted."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    logger = get_run_logger()
    submitted = {}
    parent = flow_run.name or "sweep"
    for name, params in parameters.items():
        run = run_deployment(deployment, parameters=params, timeout=0, tags=["sweep", f"sweep:{parent}"])
        submitted[name] = str(run.id)
        logger.info(f"cell {name}: submitted as flow run {run.id} of {deployment}")
    runs: dict[str, dict] = {}
    with get_client(sync_client=True) as client:
        try:
            while len(runs) < len(submitted):
                for name, run_id in submitted.items():
                    if name in runs:
                        continue
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.type.value in FINAL_STATES:
                        runs[name] = {"state": "Completed" if state.is_completed() else state.name,
                                      "error": None if state.is_completed() else state.message, "flow_run": run_id}
                        logger.info(f"cell {name}: flow run {run_id} ended {state.name}")
                if len(runs) < len(submitted):
                    time.sleep(POLL_S)
        except BaseException:
            for name, run_id in submitted.items():
                if name not in runs:
                    # Not forced: a cell that ended since the last poll keeps its end (Cancelling forced over a
                    # final state is never finished), and one no worker has started goes straight to Cancelled.
                    client.set_flow_run_state(run_id, Cancelling(message="the sweep stopped waiting"))
            raise
    return runs


def publish_sweep(kind: str, preset: str, out_dir: Path, written: dict) -> None:
    """report.md (plots inline: a relative link shows broken in the UI) and the results table as artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = inline_images(written["report"], [Path(plot) for plot in written["plots"]])
    create_markdown_artifact(key=artifact_key(preset, f"{kind}-report"), markdown=markdown,
                             description=f"{kind} sweep of {preset}: {out_dir}")
    if written["rows"]:
        create_table_artifact(key=artifact_key(preset, kind), table=written["rows"],
                              description=f"{kind} results of {preset} (results.csv)")


# ---------------------------------------------------------------------------------------------
# the command line of both sweeps

def number_list(text: str, kind=int) -> list:
    try:
        return [kind(float(x)) if kind is int else kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def depth_batches(items: list[str]) -> dict[int, int]:
    out = {}
    for item in items:
        depth, sep, batch = item.partition("=")
        if not sep or not depth.strip().isdigit() or not batch.strip().isdigit():
            raise ConfigError([f"--device-batch {item!r}: not DEPTH=BATCH; fix: e.g. --device-batch 20=16"])
        out[int(depth)] = int(batch)
    return out


def sweep_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(p)  # the preset every cell starts from; --set applies to every cell
    p.add_argument("--device-batch", action="append", default=[], metavar="DEPTH=BATCH",
                   help="device batch size for one depth (default: the reference's rule, see tasks/sweep.py)")
    p.add_argument("--cells", choices=("local", "pool"), default="local",
                   help="run the cells here one by one, or as deployment runs spread over the work pool")
    p.add_argument("--cell-deployment", default=CELL_DEPLOYMENT, help="the deployment a pool cell runs as")
    p.add_argument("--summary-json", type=Path, help="write the cells' states, keys and the results' paths here")
    return p


def main_for(flow_fn, parser: argparse.ArgumentParser, argv: list[str] | None, grid) -> int:
    """Parse, check the cells before starting Prefect, run the sweep flow, print the cells' states."""
    args = parser.parse_args(argv)
    try:
        overrides = {f"{section}.{key}": value for section, values in parse_set(args.sets).items()
                     for key, value in values.items()}
        batches = depth_batches(args.device_batch)
        validate_config(args.preset, overrides, mirror=args.mirror, store=args.store)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = flow_fn(preset=args.preset, **grid(args), overrides=overrides, mirror=args.mirror, store=args.store,
                    device_batch=batches, cells=args.cells, cell_deployment=args.cell_deployment,
                    summary_path=str(args.summary_json.resolve()) if args.summary_json else None, return_state=True)
    if args.summary_json and args.summary_json.exists():
        print(json.dumps(json.loads(args.summary_json.read_text())["cells"], indent=2))
    if not state.is_completed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    return 0
