"""Run a `model/` entry point under torchrun as a child of a Prefect task.

`python -m torch.distributed.run --standalone --nproc_per_node=N -m model.train ...` (multi-node:
--nnodes/--node-rank/--rdzv-endpoint) starts in its own process group with OMP_NUM_THREADS set. Every
output line goes to the Prefect run logger and to a log file. A non-zero exit raises with the last lines
of the log; cancellation, a timeout or any exception in the task kills the whole process group (torchrun
and its workers), first with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from tasks.config import ConfigError
from tasks.store import PROJECT_ROOT

TAIL_LINES = 40
TERM_GRACE_S = 15.0


class TorchrunError(RuntimeError):
    """torchrun exited non-zero; the message carries the last lines of its log."""


def torchrun_command(module: str, args: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    # "--" ends torchrun's own options: without it, argparse would read e.g. --run=x as its --run-path
    return cmd + ["-m", module, "--", *args]


def attention_backend(runtime, device_type: str = "") -> str:
    """The attention backend the model stages run with here: `runtime.attention` resolved on this node by
    ops.attention.select (which may load FlashAttention). It changes the bits of what they compute, so it is
    part of their keys. A request this node cannot meet raises ConfigError naming the option and the install
    command, before any stage runs (the flow builds every section first)."""
    device = device_type or runtime.device_type or ""
    if runtime.attention == "auto" and device in ("cpu", "mps"):
        return "sdpa"  # ops.attention.select's answer, without importing torch into the orchestrator
    from ops.attention import AttentionUnavailable, select

    try:
        return select(runtime.attention, device or None)[0].backend
    except AttentionUnavailable as exc:
        raise ConfigError([str(exc)]) from None


def torchrun_options(runtime) -> dict:
    """How a stage's torchrun is laid out, from the config's `runtime` section (the run_torchrun keywords)."""
    return {"nproc_per_node": runtime.nproc_per_node, "nnodes": runtime.nnodes, "node_rank": runtime.node_rank,
            "rdzv_endpoint": runtime.rdzv_endpoint, "omp_num_threads": runtime.omp_num_threads}


def run_torchrun(module: str, args: list[str], *, log_path: Path, log=print, nproc_per_node: int = 1,
                 nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                 omp_num_threads: int | None = None, env: dict | None = None) -> None:
    cmd = torchrun_command(module, args, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # torchrun itself defaults OMP_NUM_THREADS to 1 for several workers; on a CPU box that starves them.
    child_env["OMP_NUM_THREADS"] = str(omp_num_threads or max(1, (os.cpu_count() or 1) // nproc_per_node))
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), child_env.get("PYTHONPATH")]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    log(f"$ {' '.join(cmd)}")
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        try:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                tail.append(line)
                log(line.rstrip("\n"))
            returncode = proc.wait()
        finally:
            kill_process_group(proc)  # also reaps workers a crashed torchrun agent left behind
    if returncode != 0:
        reason = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        raise TorchrunError(f"{module} under torchrun failed ({reason}); last lines of {log_path}:\n" + "".join(tail))


def kill_process_group(proc: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace_s`."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid  # the leader is gone; its group id is still its pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break  # nothing left in the group
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(pgid):
            proc.poll()  # reap our own child, or its zombie keeps the group looking alive
            time.sleep(0.1)
        if not _group_alive(pgid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
