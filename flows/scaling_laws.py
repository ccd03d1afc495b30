"""The isoFLOP scaling sweep (the reference's runs/scaling_laws.sh), as a cached flow.

Each FLOP budget x depth is a cell: the speedrun's pretrain trained to exactly that budget
(`pretrain.target_flops`, no tokens:params target), then base_eval for CORE. Per budget, val bpb against model
size gives an isoFLOP curve; a quadratic in log10(scaling params) fitted per budget gives the best size N*, its
tokens D* = C / (6 N*) and the compute-optimal tokens:params ratio. Finished cells come back Cached; a new budget
or depth trains only its cells. Results: `<store>/sweeps/scaling_laws-<preset>/` results.csv (the reference's
columns plus commit and hardware), isoflop.png and report.md, also published as artifacts. The GPU deployment
evaluates val bpb on 100 x 524,288 tokens, as the reference does (`--set pretrain.eval_tokens=52428800`).

    python -m flows.scaling_laws --preset smoke --flops 2e12,4e12 --depths 2,3 --mirror ../shared/data
    python -m flows.scaling_laws --preset d12 --cells pool --set pretrain.eval_tokens=52428800
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.sweep import CELL_DEPLOYMENT, main_for, number_list, run_sweep, sweep_parser
from tasks.sweep import SCALING_BUDGETS, SCALING_DEPTHS, scaling_cells


@flow(name="speedrun", flow_run_name="scaling-laws-{preset}", log_prints=True)  # speedrun/scaling-laws
def scaling_laws(preset: str = "d12", flops: list[float] = SCALING_BUDGETS, depths: list[int] = SCALING_DEPTHS,
                 overrides: dict | None = None, mirror: str | None = None, store: str | None = None,
                 device_batch: dict | None = None, cells: str = "local", cell_deployment: str = CELL_DEPLOYMENT,
                 summary_path: str | None = None) -> dict:
    return run_sweep("scaling_laws", preset, scaling_cells(flops, depths), overrides, mirror, store, device_batch,
                     cells, cell_deployment, summary_path)


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser("python -m flows.scaling_laws", __doc__.split("\n")[0])
    parser.add_argument("--flops", type=lambda t: number_list(t, float), default=list(SCALING_BUDGETS),
                        help="FLOP budgets, e.g. 1e18,2.15e18")
    parser.add_argument("--depths", type=number_list, default=list(SCALING_DEPTHS), help="e.g. 10,12,14")
    return main_for(scaling_laws, parser, argv, lambda args: {"flops": args.flops, "depths": args.depths})


if __name__ == "__main__":
    sys.exit(main())
