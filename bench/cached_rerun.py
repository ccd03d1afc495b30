"""Benchmark: wall time of a first smoke run, of the fully cached rerun, and of a trivial two-task flow.

All three run as a user runs them (`python -m ...`, embedded Prefect, one PREFECT_HOME), side by side
in one invocation, so `cached_rerun_s - trivial_flow_s` is what the cache itself costs.

    python -m bench.cached_rerun [--mirror ../shared/data] [--preset smoke] [--repeats 3]

Prints JSON: first_run_s, cached_rerun_s, trivial_flow_s (medians over --repeats for the last two),
plus cache_overhead_s and the raw samples.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--mirror", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="speedrun-bench-") as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect-home"}
        env.pop("PREFECT_API_URL", None)
        run = [sys.executable, "-m", "flows.speedrun", "--preset", args.preset, "--mirror", args.mirror,
               "--store", f"{tmp}/store"]
        trivial = [sys.executable, "-m", "bench.trivial_flow"]
        timed(trivial, env)  # creates and migrates the Prefect database, so no sample below pays for it
        first = timed(run, env)
        cached, trivial_s = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            cached.append(timed(run, env))
            trivial_s.append(timed(trivial, env))
    result = {
        "preset": args.preset,
        "first_run_s": round(first, 2),
        "cached_rerun_s": round(statistics.median(cached), 2),
        "trivial_flow_s": round(statistics.median(trivial_s), 2),
        "cache_overhead_s": round(statistics.median(cached) - statistics.median(trivial_s), 2),
        "samples": {"cached_rerun_s": [round(x, 2) for x in cached], "trivial_flow_s": [round(x, 2) for x in trivial_s]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
