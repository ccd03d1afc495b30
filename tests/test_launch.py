"""tasks/launch.py with real torchrun: the no-output watchdog, the time limit, a cancelled run, and a launcher
killed with SIGKILL taking torchrun and its rank with it (tests/launch_worker.py stands in for a trainer)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.launch import TorchrunCancelled, TorchrunHung, run_torchrun

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = "tests.launch_worker"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def worker_pid(log: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and (m := re.search(r"worker pid (\d+)", log.read_text())):
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError(f"the worker never started:\n{log.read_text() if log.exists() else '(no log)'}")


def processes_mentioning(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace") \
                    and alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_silent_torchrun_is_stopped_by_the_watchdog_naming_its_last_line(tmp_path):
    # The worker prints its pid and then nothing; 10 s leaves a loaded machine time to start it.
    started = time.monotonic()
    with pytest.raises(TorchrunHung, match=r"printed nothing for 10 s \(runtime.hang_timeout_s\); last line: "):
        run_torchrun(WORKER, ["silent", str(tmp_path)], log_path=tmp_path / "log.txt", hang_timeout_s=10)
    assert time.monotonic() - started < 90
    assert not processes_mentioning(str(tmp_path))  # torchrun and its rank are gone


@pytest.mark.parametrize("limit", ["stage", "flow"])
def test_torchrun_past_its_time_limit_is_stopped(tmp_path, limit):
    # The stage's own limit, or the flow run's deadline (flows/speedrun.py passes it to every torchrun stage).
    if limit == "stage":
        kwargs, message = {"time_limit_s": 4}, r"ran longer than its limit of 4 s \(runtime.stage_timeout_s\)"
    else:
        kwargs = {"time_limit_s": 600, "flow_deadline": {"at": time.time() + 4, "limit_s": 1234}}
        message = r"still running when the flow run reached its time limit of 1234 s \(runtime.flow_timeout_s\)"
    with pytest.raises(TorchrunHung, match=message):
        run_torchrun(WORKER, ["chatty", str(tmp_path)], log_path=tmp_path / "log.txt", hang_timeout_s=60, **kwargs)
    assert not processes_mentioning(str(tmp_path))


def test_a_rank_that_stopped_on_request_is_reported_as_cancelled(tmp_path):
    with pytest.raises(TorchrunCancelled, match="stopped on request .* a retry resumes from it"):
        run_torchrun(WORKER, ["cancelled"], log_path=tmp_path / "log.txt")


def test_sigkilled_launcher_takes_torchrun_and_its_rank_with_it(tmp_path):
    log = tmp_path / "log.txt"
    marker = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                                 "from tasks.launch import run_torchrun; "
                                 f"run_torchrun({WORKER!r}, ['until-term'], log_path=Path(sys.argv[1]), "
                                 f"env={{'STOP_MARKER': {str(marker)!r}}})", str(log)],
                                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        rank = worker_pid(log)
        agent = int(Path(f"/proc/{rank}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent: torchrun
        assert "torch.distributed.run" in Path(f"/proc/{agent}/cmdline").read_bytes().decode(errors="replace")
        launcher.send_signal(signal.SIGKILL)  # no finally, no cleanup: only the kernel can tell torchrun
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(agent) or alive(rank):
            assert time.monotonic() < deadline, f"torchrun {agent} or its rank {rank} outlived the launcher"
            time.sleep(0.1)
        assert marker.read_text() == "stopped"  # the rank was told (SIGTERM) and stopped as on a cancel
    finally:
        if launcher.poll() is None:
            launcher.kill()
