"""Run a `model/` entry point under torchrun as a child of a Prefect task.

`python -m torch.distributed.run --standalone --nproc_per_node=N -m model.train ...` (one node of a multi-node
run, tasks/nodes.py: --nnodes/--node-rank/--rdzv-endpoint) starts in its own process group with
OMP_NUM_THREADS set. Every output line goes to the Prefect run logger and to a log file. A non-zero exit
raises with the last lines of the log.

No trainer outlives its stage. Cancellation, a timeout or any exception in the task sends torchrun SIGTERM,
which it passes to every rank; the ranks finish their step, save a checkpoint and exit (model/run_control.py),
and whatever is left after TERM_GRACE_S is killed. If the process running the task dies without a chance to
do that (SIGKILL, the OOM killer), Linux sends torchrun SIGTERM on its behalf (PR_SET_PDEATHSIG, set by a
one-line prelude that then execs torchrun) and each rank gets SIGTERM when torchrun dies, so the same happens.
A run that stopped on request raises TorchrunCancelled: a retry resumes from the checkpoint it saved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from tasks.config import ConfigError
from tasks.store import PROJECT_ROOT

TAIL_LINES = 40
# How long SIGTERMed ranks get to finish their step and save before SIGKILL. torchrun itself gives its ranks
# 30 s after it is told to stop; a checkpoint that takes longer falls back to the previous one on resume.
TERM_GRACE_S = 60.0
# What model/run_control.py prints when a rank stops on SIGTERM after saving (tasks/ does not import torch).
STOPPED_LINE = "stopped by signal"
# Sets PR_SET_PDEATHSIG (1) to SIGTERM, checks the parent did not die meanwhile, then execs the command in argv.
# A preexec_fn would do the same but is unsafe in a threaded process (Prefect runs tasks in threads).
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit(70); os.execv(sys.argv[2], sys.argv[2:])")


class TorchrunError(RuntimeError):
    """torchrun exited non-zero; the message carries the last lines of its log."""


class TorchrunCancelled(TorchrunError):
    """The ranks stopped on SIGTERM after saving a checkpoint; a retry resumes from it."""


class TorchrunHung(TorchrunError):
    """torchrun printed nothing for `hang_timeout_s` (a NCCL hang, a stuck filesystem) or ran past the stage's
    time limit; it was stopped (the ranks save a checkpoint if they can)."""


def torchrun_command(module: str, args: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, rdzv_conf: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        cmd += [f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []
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


def wandb_arguments(run: str, store: str | Path) -> list[str]:
    """--wandb-id/--wandb-group/--wandb-dir for a training stage's run: one wandb run per flow run and stage (a
    retried attempt of the flow run resumes it; the next night's run is a new one), the flow run's stages in one
    group, and the run directories in the store's wandb/ (wandb.init(dir=<store>) writes <store>/wandb/), where
    a rebuilt artifact does not take last night's offline run with it."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return []
    return [f"--wandb-id={run}-{str(flow_run.id)[:8]}", f"--wandb-group={flow_run.name or flow_run.id}",
            f"--wandb-dir={store}"]


def torchrun_options(cfg) -> dict:
    """How a stage's torchrun is laid out on its node and watched, from the config's `runtime` section
    (run_torchrun's keywords). The training stages add tasks.nodes.node_options for runs over several nodes;
    the evaluations run on node 0 alone."""
    runtime = cfg.runtime
    return {"nproc_per_node": runtime.nproc_per_node, "omp_num_threads": runtime.omp_num_threads,
            "hang_timeout_s": runtime.hang_timeout_s, "time_limit_s": cfg.stage_time_limit_s}


def run_torchrun(module: str, args: list[str], *, log_path: Path, log=print, nproc_per_node: int = 1,
                 nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_conf: str | None = None,
                 omp_num_threads: int | None = None, env: dict | None = None, hang_timeout_s: float | None = None,
                 time_limit_s: float | None = None, flow_deadline: dict | None = None,
                 watch: Callable[[], str | None] | None = None) -> None:
    """Run `module` under torchrun; raise TorchrunError (or TorchrunCancelled / TorchrunHung) if it fails.

    `hang_timeout_s`: stop it when it prints nothing for that long; `time_limit_s`: when it runs longer;
    `flow_deadline` ({"at": epoch seconds, "limit_s": the flow's limit}): when the flow run's time is up;
    `watch`: called about once a second, stop it (and raise TorchrunError with the reason) when that returns a
    reason (the other nodes of a multi-node run, tasks/nodes.py)."""
    cmd = torchrun_command(module, args, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint, rdzv_conf=rdzv_conf)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # torchrun itself defaults OMP_NUM_THREADS to 1 for several workers; on a CPU box that starves them.
    child_env["OMP_NUM_THREADS"] = str(omp_num_threads or max(1, (os.cpu_count() or 1) // nproc_per_node))
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), child_env.get("PYTHONPATH")]))
    # torchrun's grace for SIGTERMed ranks (torch >= 2.12 reads it; earlier versions give 30 s)
    child_env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(TERM_GRACE_S) - 10))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    log(f"$ {' '.join(cmd)}")
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        last_output = [time.monotonic()]

        def forward_output() -> None:
            # A thread of its own, so the ranks' output keeps draining while they save after a SIGTERM (a full
            # pipe would block them mid-save).
            for line in proc.stdout:
                last_output[0] = time.monotonic()
                log_file.write(line)
                log_file.flush()
                tail.append(line)
                log(line.rstrip("\n"))

        reader = threading.Thread(target=forward_output, name="torchrun-output", daemon=True)
        reader.start()
        started, hung, stopped = time.monotonic(), None, None
        try:
            while (returncode := _wait(proc, 1.0)) is None:
                now = time.monotonic()
                if hang_timeout_s is not None and now - last_output[0] > hang_timeout_s:
                    hung = (f"printed nothing for {hang_timeout_s:g} s (runtime.hang_timeout_s); last line: "
                            f"{tail[-1].rstrip() if tail else '(none)'}")
                elif time_limit_s is not None and now - started > time_limit_s:
                    hung = f"ran longer than its limit of {time_limit_s:g} s (runtime.stage_timeout_s)"
                elif flow_deadline is not None and time.time() > flow_deadline["at"]:
                    hung = (f"was still running when the flow run reached its time limit of "
                            f"{flow_deadline['limit_s']:g} s (runtime.flow_timeout_s)")
                if hung:
                    log(f"stopping {module}: it {hung}")
                    break
                if watch is not None and (stopped := watch()):
                    log(f"stopping {module}: {stopped}")
                    break
        finally:
            kill_process_group(proc)  # also reaps workers a crashed torchrun agent left behind
            reader.join(timeout=10)
    if stopped:
        raise TorchrunError(f"{stopped}; {module} here was stopped. Last lines of {log_path}:\n" + "".join(tail))
    if hung:
        raise TorchrunHung(f"{module} {hung}; it was stopped. Last lines of {log_path}:\n" + "".join(tail))
    if returncode != 0:
        reason = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        if any(STOPPED_LINE in line for line in tail):
            raise TorchrunCancelled(f"{module} stopped on request ({reason}) after saving a checkpoint; a retry "
                                    f"resumes from it. Last lines of {log_path}:\n" + "".join(tail))
        raise TorchrunError(f"{module} under torchrun failed ({reason}); last lines of {log_path}:\n" + "".join(tail))


def _wait(proc: subprocess.Popen, seconds: float) -> int | None:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


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


def run_evaluation(module: str, args: list[str], section: dict, work: Path, art: Path, options: dict,
                   log=print) -> dict:
    """Run an evaluation entry point (model.evaluate, model.chat_eval) that writes into work/out/, copy what it
    wrote and its log into the artifact, and return its summary.json. The device type and attention backend
    come from the stage's key section."""
    out = work / "out"
    args = [*args, f"--out-dir={out}"]
    if section["device_type"] != "auto":
        args.append(f"--device-type={section['device_type']}")
    args.append(f"--attention={section['environment']['attention']}")
    run_torchrun(module, args, log_path=work / "log.txt", log=log, **options["torchrun"])
    for produced in out.iterdir():
        shutil.copy2(produced, art / produced.name)
    shutil.copy2(work / "log.txt", art / "log.txt")
    return json.loads((out / "summary.json").read_text())

