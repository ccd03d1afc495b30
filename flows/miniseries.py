"""The miniseries: one recipe trained at several depths (the reference's runs/miniseries.sh), as a cached flow.

Each depth is a cell: the speedrun's pretrain and base_eval (CORE at the end) for the preset at that depth, with
the reference's device batch for it (32 below d20, 16 from d20, 8 from d28; `--device-batch` or
`--set pretrain.device_batch_size=` overrides). All cells share one shards and one tokenizer artifact. A finished
depth comes back Cached; a new depth trains only itself. Results: `<store>/sweeps/miniseries-<preset>/`
results.csv (the reference's columns plus commit and hardware), miniseries.png (val bpb and CORE against depth
and training FLOPs) and report.md, also published as artifacts. flows/sweep.py says how cells are run.

    python -m flows.miniseries --preset smoke --depths 2,3,4 --mirror ../shared/data       # CPU, minutes
    python -m flows.miniseries --preset d12 --depths 12,14,16,18,20,22,24,26 --cells pool  # one cell per GPU node
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.sweep import CELL_DEPLOYMENT, main_for, number_list, run_sweep, sweep_parser
from tasks.sweep import MINISERIES_DEPTHS, miniseries_cells


@flow(name="speedrun", flow_run_name="miniseries-{preset}", log_prints=True)  # deployed as speedrun/miniseries
def miniseries(preset: str = "d12", depths: list[int] = MINISERIES_DEPTHS, overrides: dict | None = None,
               mirror: str | None = None, store: str | None = None, device_batch: dict | None = None,
               cells: str = "local", cell_deployment: str = CELL_DEPLOYMENT, summary_path: str | None = None) -> dict:
    return run_sweep("miniseries", preset, miniseries_cells(depths), overrides, mirror, store, device_batch, cells,
                     cell_deployment, summary_path)


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser("python -m flows.miniseries", __doc__.split("\n")[0])
    parser.add_argument("--depths", type=number_list, default=list(MINISERIES_DEPTHS), help="e.g. 12,14,16")
    return main_for(miniseries, parser, argv, lambda args: {"depths": args.depths})


if __name__ == "__main__":
    sys.exit(main())
