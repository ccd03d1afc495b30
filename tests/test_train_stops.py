"""How a training run stops without losing work (model/run_control.py, model/checkpoint.py), with real processes
and real signals: SIGTERM saves and resumes bitwise, a killed torchrun takes its ranks with it, a second trainer
waits for the first, a damaged checkpoint falls back to the previous one, a non-finite loss fails the run.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import complete_steps
from model.run_control import CANCELLED_EXIT_CODE
from test_train import read_metrics, tokenizer_dir, train  # noqa: F401 (tokenizer_dir is a fixture)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 240) -> list[str]:
    """Read the process's output until a line contains `needle`; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"process ended before printing {needle!r}:\n" + "".join(lines[-40:]))
        lines.append(line)
        if needle in line:
            return lines
    pytest.fail(f"no {needle!r} in time")


def pids_mentioning(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def final_weights(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"model_{step:06d}.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


COMMON = ["--num-iterations=16", "--eval-every=8"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_finishes_the_step_saves_and_the_resume_is_bitwise(tokenizer_dir, shared_data, tmp_path, nproc):
    data = shared_data / "pretrain"
    extra = ["--data-streams=2"] if nproc == 2 else []
    train(tmp_path / "straight", tokenizer_dir, data, *COMMON, *extra, nproc=nproc)

    run = tmp_path / "cancelled"
    proc = train(run, tokenizer_dir, data, *COMMON, *extra, nproc=nproc, wait=False)
    wait_for_line(proc, "step 00004/")
    os.killpg(proc.pid, signal.SIGTERM)  # as a cancel does: to the launcher (torchrun passes it to its ranks)
    out, _ = proc.communicate(timeout=120)
    assert "stopped by signal" in out, out[-3000:]
    if nproc == 1:
        assert proc.returncode == CANCELLED_EXIT_CODE
    saved = complete_steps(run / "checkpoints")
    assert len(saved) == 1 and 5 <= saved[0] < 16, (saved, out[-2000:])  # the step in flight was finished
    assert not (run / "summary.json").exists()

    out = train(run, tokenizer_dir, data, *COMMON, *extra, "--resume=auto", nproc=nproc)
    assert f"resuming from step {saved[0]}" in out
    assert_same_weights(final_weights(tmp_path / "straight", 16), final_weights(run, 16))
    assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == list(range(16))


@pytest.mark.slow
def test_killed_torchrun_takes_its_ranks_with_it_and_they_save(tokenizer_dir, shared_data, tmp_path):
    run = tmp_path / "orphans"
    proc = train(run, tokenizer_dir, shared_data / "pretrain", "--num-iterations=400", "--data-streams=2",
                 nproc=2, wait=False)
    wait_for_line(proc, "step 00003/")
    assert len(pids_mentioning(str(run))) == 3  # the agent and two ranks
    os.killpg(proc.pid, signal.SIGKILL)  # the agent's group only: each rank runs in a session of its own
    proc.wait()
    deadline = time.monotonic() + 10
    while pids_mentioning(str(run)):
        assert time.monotonic() < deadline, f"ranks outlived their torchrun: {pids_mentioning(str(run))}"
        time.sleep(0.1)
    assert complete_steps(run / "checkpoints")  # told by the kernel (SIGTERM), they saved before exiting


@pytest.mark.slow
def test_second_trainer_in_the_same_directory_waits_for_the_first(tokenizer_dir, shared_data, tmp_path):
    run, data = tmp_path / "shared", shared_data / "pretrain"
    first = train(run, tokenizer_dir, data, "--num-iterations=400", wait=False)
    wait_for_line(first, "step 00002/")
    second = train(run, tokenizer_dir, data, "--num-iterations=400", "--resume=auto", wait=False)
    wait_for_line(second, "waiting for the trainer still running in")
    assert first.poll() is None and not complete_steps(run / "checkpoints")  # the first trains on alone
    os.killpg(first.pid, signal.SIGTERM)
    first.communicate(timeout=120)
    saved = complete_steps(run / "checkpoints")
    lines = wait_for_line(second, "resuming from step")
    assert f"resuming from step {saved[-1]}" in lines[-1]
    os.killpg(second.pid, signal.SIGKILL)
    second.communicate(timeout=60)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tokenizer_dir, shared_data, tmp_path):
    run, data = tmp_path / "run", shared_data / "pretrain"
    args = ["--num-iterations=8", "--eval-every=4", "--save-every=4"]
    train(run, tokenizer_dir, data, *args)
    assert complete_steps(run / "checkpoints") == [4, 8]
    expected = final_weights(run, 8)
    model8 = run / "checkpoints" / "model_000008.pt"
    model8.write_bytes(model8.read_bytes()[: model8.stat().st_size // 2])  # torn by a crash
    (run / "summary.json").unlink()

    out = train(run, tokenizer_dir, data, *args, "--resume=auto")
    assert "checkpoint 8 is damaged; falling back to the previous complete checkpoint" in out
    assert "resuming from step 4" in out
    assert_same_weights(expected, final_weights(run, 8))
    assert complete_steps(run / "checkpoints") == [4, 8]


def test_non_finite_loss_stops_training_naming_the_step_and_the_suspects(tokenizer_dir, shared_data, tmp_path):
    run = tmp_path / "diverged"
    proc = train(run, tokenizer_dir, shared_data / "pretrain", "--num-iterations=20", "--matrix-lr=inf",
                 "--save-every=5", wait=False)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    line = next(l for l in out.splitlines() if "training diverged" in l)
    assert "the loss is nan at step 1" in line and "matrix_lr=inf" in line and "fix:" in line
    assert not (run / "summary.json").exists() and not complete_steps(run / "checkpoints")
