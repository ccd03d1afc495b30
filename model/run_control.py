"""How a training run stops early without losing work: the same rules for model.train and model.sft.

- **Cancel saves.** SIGTERM (Prefect's Cancel, torchrun forwarding its own SIGTERM, a node being drained)
  only sets a flag. The loop finishes the step in flight; every rank agrees on the step to stop at (one small
  all-reduce per step, `StopSignal.agreed`), writes a complete checkpoint there and exits with
  `CANCELLED_EXIT_CODE`, which the pipeline reports as a cancellation. `--resume auto` continues from that
  step, bitwise as if never stopped.
- **Trainers die with their launcher.** Each rank asks the kernel for SIGTERM when its parent (the torchrun
  agent) dies (`die_with_parent`), so killing the launcher never leaves ranks training; they save and exit
  as on a cancel. Output that can no longer be delivered (the launcher that read it is gone) stops the run
  the same way instead of killing it mid-step.
- **One trainer per run directory.** `hold_run_dir` takes an flock per rank on the run directory for the
  life of the process: a second trainer started into the same directory (a retry while the ranks of a killed
  attempt are still saving) waits for them instead of writing beside them.
- **Non-finite training fails.** `check_finite` stops at the first non-finite loss, naming the step, the value
  and the options most likely responsible, so a diverged run never becomes an artifact.
"""

from __future__ import annotations

import ctypes
import fcntl
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

CANCELLED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after saving; a retry resumes
PR_SET_PDEATHSIG = 1


class StopSignal:
    """Remembers a SIGTERM instead of dying on it; `agreed()` is the loop's check at each step boundary.

    Losing the reader of stdout counts as a stop request too: when the process that launched torchrun dies,
    the pipe the ranks print to has no reader any more, and the next progress line would raise
    BrokenPipeError and kill the rank before it saves. Output then goes to /dev/null and the run saves and
    stops as on SIGTERM."""

    def __init__(self):
        self.received: int | None = None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _OutputGuard(sys.stdout, self), _OutputGuard(sys.stderr, self)

    def restore(self) -> None:
        """Put back the SIGTERM handler and streams there were before (main() may run in-process, in tests)."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
        sys.stdout, sys.stderr = self.streams

    def exit_saved(self, step: int, checkpoint_dir: Path, wandb_run, say=print) -> None:
        """End a stopped run after its checkpoint is written: say where a resume continues, close wandb, leave
        the process group, and exit with CANCELLED_EXIT_CODE (what the pipeline reports as a cancellation)."""
        from model.checkpoint import last_complete_step
        from model.common import compute_cleanup

        saved = last_complete_step(checkpoint_dir)
        say(f"stopped by signal {self.received or 'on another rank'} at step {step}: " +
            (f"checkpoint {saved} is complete; --resume auto continues from it" if saved is not None
             else "nothing trained yet, nothing saved"))
        if wandb_run is not None:
            wandb_run.finish(exit_code=CANCELLED_EXIT_CODE)
        compute_cleanup()
        sys.exit(CANCELLED_EXIT_CODE)

    def reader_gone(self) -> None:
        if self.received is None:
            self.received = signal.SIGPIPE

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device, also: bool = False) -> tuple[bool, bool]:
        """(stop requested on any rank, `also` true on any rank): one MAX all-reduce of both flags, so every
        rank stops at the same step. Without a process group: the local flags."""
        stop = self.received is not None
        if dist.is_available() and dist.is_initialized():
            flags = torch.tensor([int(stop), int(also)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, also = bool(flags[0].item()), bool(flags[1].item())
        return stop, also


class _OutputGuard:
    """A text stream that turns a broken pipe into a stop request and carries on writing to /dev/null."""

    def __init__(self, stream, stop: StopSignal):
        self._stream, self._stop = stream, stop

    def _broken(self) -> None:
        self._stop.reader_gone()
        self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._broken()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._broken()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (no-op elsewhere). Under torchrun the
    parent is the elastic agent; SIGTERM makes a rank save and exit like a cancel."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this rank outlives its agent")
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def hold_run_dir(out_dir: Path, rank: int, say=print, wait_s: float = 600.0):
    """Take an exclusive flock on `<out_dir>/.rank<R>.lock` and return the open file: the lock is held until the
    process exits (the kernel drops it even on SIGKILL). A trainer already holding it (a rank of an attempt that
    was killed and is still saving) is waited for, with a line every 30 s; after `wait_s` this one exits
    naming the holder's pid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f".rank{rank}.lock"
    f = open(path, "a+")
    started = time.monotonic()
    last_said = None
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            now = time.monotonic()
            holder = path.read_text().strip() or "unknown"
            if now - started > wait_s:
                raise SystemExit(f"{out_dir} is in use by another trainer (pid {holder}) for {wait_s:.0f} s; "
                                 "fix: stop that process, or give this run another --out-dir") from None
            if last_said is None or now - last_said > 30:
                print(f"rank {rank}: waiting for the trainer still running in {out_dir} (pid {holder}) to exit",
                      flush=True)
                last_said = now
            time.sleep(0.2)
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class NonFiniteLoss(SystemExit):
    """Training produced a non-finite loss: the run stops, nothing is saved."""


def check_finite(loss: float, step: int, suspects: dict) -> None:
    """Raise NonFiniteLoss at the first non-finite training loss, naming the step, the value and `suspects`
    (the options most likely responsible, with their values)."""
    if math.isfinite(loss):
        return
    named = ", ".join(f"{k}={v}" for k, v in suspects.items())
    raise NonFiniteLoss(f"training diverged: the loss is {loss} at step {step}; nothing was saved from this step on. "
                        f"Most likely responsible: {named}; fix: lower the learning rates or lengthen the warmup")
