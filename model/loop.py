"""The machinery both training entry points share (model/train.py, model/sft.py): one `TrainingRun` per process.

What a trainer gets from it, in the order its main() uses it:

- **set-up** (`TrainingRun(args)`): device, seed and process group (model/common.py), the attention backend,
  --out-dir with its checkpoints/, the cancel rules of model/run_control.py (SIGTERM saves, die with the
  launcher, one trainer per run directory) and the device's peak FLOP/s;
- **resume** (`resume`): the last complete checkpoint (or --resume-from-step's), the loop counters it carried
  (step, min/last val bpb, smoothed loss, training time, timed steps), and `restore` to put its optimizer,
  RNG and loader state back once the optimizer exists;
- **compile** (`compile`): torch.compile decided from the planned steps (model/common.py: decide_compile);
- **logging** (`start_logging`): wandb and metrics.jsonl (model/run_log.py); `validate` for the val bpb
  evaluation both trainers run;
- **checkpoints** (`should_save`, `save`, `exit_saved`): the same periodic/last/cancel rule and meta layout
  in both, pruned to --keep-checkpoints;
- **step timing** (`step_begin`, `step_end`, `smooth_loss`, `rates`, `after_step`): steps past
  TIMING_WARMUP_STEPS count towards total_training_time; GC is frozen after the first step of a run;
- **summary** (`mean_rates`, `environment`, `finish`): summary.json on rank 0, wandb's summary, clean exit.

What differs between the trainers stays in their scripts: the data, the model's origin (fresh or a base
checkpoint), the schedules, the evaluations and their cadence, the records they log. Nothing here changes
what a run computes; it imports nothing a stage gates (in-training CORE, sampling, FP8 live in the scripts).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from model import checkpoint as ckpt
from model.common import (ATTENTION_CHOICES, COMPUTE_DTYPE, autodetect_device_type, compute_cleanup, compute_init, decide_compile,
                          get_peak_flops, setup_attention, synchronize)
from model.files import atomic_write_text
from model.loss_eval import evaluate_bpb
from model.run_control import StopSignal, die_with_parent, hold_run_dir
from model.run_log import TIMING_WARMUP_STEPS, MetricsLog, start_wandb


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options both trainers end their command line with: where wandb logs, and the attention backend.
    Added last, in this order: the order of a run's options is the order of user_config in its checkpoints."""
    a = p.add_argument
    a("--wandb-mode", default=os.environ.get("WANDB_MODE", "offline"), choices=["offline", "online", "disabled"])
    a("--wandb-id", default="", help="wandb run id (default: fixed by --out-dir, so a restart resumes the run)")
    a("--wandb-group", default="", help="wandb group (the pipeline groups the stages of one flow run)")
    a("--wandb-dir", default="", help="where wandb writes its run directory (default: --out-dir); the pipeline "
                                      "uses one per store, so offline runs outlive rebuilt artifacts")
    a("--attention", default="auto", choices=ATTENTION_CHOICES,
      help="attention backend: auto (best available), fused (FA3/FA4 or fail), fa3, fa4, flex, sdpa")


class TrainingRun:
    """One training process: where it runs, what it resumed from, and the counters it carries across resumes."""

    def __init__(self, args):
        self.args = args
        self.user_config = dict(vars(args))  # the raw CLI values, as checkpoints record them
        device_type = args.device_type or autodetect_device_type()
        self.distributed, self.rank, self.local_rank, self.world, self.device = compute_init(device_type)
        self.master = self.rank == 0
        self.say = print if self.master else (lambda *a, **k: None)
        self.attention_info = setup_attention(args.attention, self.device.type, self.say)
        self.out_dir = Path(args.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stop = StopSignal()  # SIGTERM: finish the step, save, exit CANCELLED_EXIT_CODE
        die_with_parent()  # a killed torchrun agent sends its ranks SIGTERM
        self._run_dir_lock = hold_run_dir(self.out_dir, self.rank)  # held until exit: one trainer per directory
        self.peak_flops = get_peak_flops(torch.cuda.get_device_name(self.device)) \
            if self.device.type == "cuda" else float("inf")
        self.wandb, self.metrics = None, None
        self._set_counters(None)

    # --- resume ---------------------------------------------------------------------------------

    def _set_counters(self, resume: ckpt.ResumePoint | None) -> None:
        meta = resume.meta if resume else {}
        loop = meta.get("loop_state", {})
        self.resume_step = resume.step if resume else None
        self.first_step = resume.step if resume else 0  # the first step this process runs
        self.loop_state = loop  # the trainer's own counters (e.g. progress, core_metric) are read from here
        self.val_bpb = meta.get("val_bpb")
        self.min_val_bpb = loop.get("min_val_bpb", float("inf"))
        self.smooth_train_loss = loop.get("smooth_train_loss", 0.0)
        self.total_training_time = loop.get("total_training_time", 0.0)
        self.timed_steps = loop.get("timed_steps", 0)

    def resume(self, mode: str = "auto", from_step: int = -1) -> ckpt.ResumePoint | None:
        """The checkpoint this run continues from: --resume-from-step's exactly, else (--resume auto) the last
        complete one (a damaged newest one falls back to the one before), else None. Sets the counters."""
        resume = None
        if from_step >= 0:
            resume = ckpt.load_step(self.ckpt_dir, from_step, self.rank, self.world, self.device)
        elif mode == "auto":
            resume = ckpt.load_resume_point(self.ckpt_dir, self.rank, self.world, self.device, self.say)
        self._set_counters(resume)
        if resume is not None and self.local_rank == 0:  # once per node: every node of a multi-node run says so
            print(f"resuming from step {resume.step} ({self.ckpt_dir})" + ("" if self.master else f" [rank {self.rank}]"))
        return resume

    def restore(self, resume: ckpt.ResumePoint | None, optimizer) -> tuple[dict | None, tuple | None]:
        """Put a resume point's optimizer and RNG state back; (loader state, prefetched batch) for the loader,
        (None, None) without one. The states then live in the optimizer and loader only: the point keeps its meta."""
        if resume is None:
            return None, None
        optimizer.load_state_dict(resume.optimizer_state)
        loader_state, batch = resume.rank_state["loader"], resume.rank_state["batch"]
        ckpt.set_rng_state(resume.rank_state["rng"])
        resume.model_state = resume.optimizer_state = resume.rank_state = None
        return loader_state, batch

    def first_batch(self, saved: tuple | None, loader):
        """The batch a resumed run had prefetched, else the loader's first."""
        return (saved[0].to(self.device), saved[1].to(self.device)) if saved is not None else next(loader)

    def compile(self, model, planned_steps: int):
        """(model to train, compiled?): torch.compile when --compile says so for this many planned steps."""
        use_compile, reason = decide_compile(self.args.compile, self.device.type, planned_steps)
        self.say(f"torch.compile: {'on' if use_compile else 'off'} ({reason})")
        return (torch.compile(model, dynamic=False) if use_compile else model), use_compile

    # --- logging --------------------------------------------------------------------------------

    def start_logging(self, project: str, keep_before_step: float) -> MetricsLog:
        """wandb (rank 0, when enabled) and metrics.jsonl, cut back to what came before `keep_before_step`."""
        self.wandb = start_wandb(self.args, self.user_config, self.out_dir, project=project) if self.master else None
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.master, self.wandb,
                                  keep_before_step=keep_before_step)
        return self.metrics

    def validate(self, model, batches, eval_steps: int, token_bytes, step: int, flops_so_far: float,
                 context=nullcontext()) -> float:
        """Val bpb over `eval_steps` batches: printed, kept as val_bpb/min_val_bpb, logged."""
        model.eval()
        with context:
            val_bpb = evaluate_bpb(model, batches, eval_steps, token_bytes)
        model.train()
        self.val_bpb = val_bpb
        self.min_val_bpb = min(self.min_val_bpb, val_bpb)
        self.say(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
        self.metrics.log({"step": step, "total_training_flops": flops_so_far,
                          "total_training_time": self.total_training_time, "val/bpb": val_bpb})
        return val_bpb

    # --- checkpoints ----------------------------------------------------------------------------

    def should_save(self, step: int, last_step: bool, cancel: bool, save_every: int) -> bool:
        """The last step, every --save-every steps (not the step just resumed from), and a cancel after work."""
        periodic = step > 0 and step != self.resume_step and save_every > 0 and step % save_every == 0
        return last_step or periodic or (cancel and step != self.first_step)

    def save(self, step: int, *, model, optimizer, loader, batch, config, meta: dict, loop_state: dict,
             keep: int) -> None:
        """A complete checkpoint at `step` (every rank), then the older ones pruned to `keep` (rank 0).
        Meta: step, val_bpb, model_config, user_config, the trainer's `meta`, then loop_state (the shared
        counters followed by the trainer's own)."""
        x, y = batch
        ckpt.save_checkpoint(
            self.ckpt_dir, step, rank=self.rank,
            model_state=model.state_dict() if self.master else None,
            meta={"step": step, "val_bpb": self.val_bpb, "model_config": asdict(config), "user_config": self.user_config,
                  **meta,
                  "loop_state": {"min_val_bpb": self.min_val_bpb, "smooth_train_loss": self.smooth_train_loss,
                                 "total_training_time": self.total_training_time, "timed_steps": self.timed_steps,
                                 **loop_state}},
            optimizer_state=optimizer.state_dict(),
            loader_state={"loader": loader.state_dict(), "batch": (x.cpu(), y.cpu()), "rng": ckpt.rng_state()})
        if self.master and keep > 0:
            ckpt.prune_checkpoints(self.ckpt_dir, set(ckpt.complete_steps(self.ckpt_dir)[-keep:]))

    def exit_saved(self, step: int) -> None:
        """A cancel, once the checkpoint at `step` is written: exit CANCELLED_EXIT_CODE (model/run_control.py)."""
        self.stop.exit_saved(step, self.ckpt_dir, self.wandb, self.say)

    # --- one optimizer step ---------------------------------------------------------------------

    def step_begin(self) -> None:
        synchronize(self.device)
        self._t0 = time.time()

    def step_end(self, step: int) -> float:
        """The step's wall time; it counts towards total_training_time past the compile warm-up steps."""
        synchronize(self.device)
        dt = time.time() - self._t0
        if step > TIMING_WARMUP_STEPS:  # steps 0..10 (compile warm-up) are not timed
            self.total_training_time += dt
            self.timed_steps += 1
        return dt

    def smooth_loss(self, loss: float, steps_done: int) -> float:
        """The EMA (0.9) of the training loss, debiased for the `steps_done` steps it has seen."""
        self.smooth_train_loss = 0.9 * self.smooth_train_loss + 0.1 * loss
        return self.smooth_train_loss / (1 - 0.9 ** steps_done)

    def rates(self, dt: float, total_batch_size: int, flops_per_token: float) -> tuple[int, float]:
        """(tokens per second, MFU in %) of one step."""
        tok_per_sec = int(total_batch_size / dt)
        mfu = 100 * flops_per_token * total_batch_size / dt / (self.peak_flops * self.world)
        return tok_per_sec, mfu

    def after_step(self, step: int) -> None:
        """GC policy, with `step` steps done: after the first step of this process, freeze what is alive and turn
        automatic GC off (it costs ~500 ms pauses); collect by hand every 5000 steps."""
        if step == self.first_step + 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    # --- summary --------------------------------------------------------------------------------

    def mean_rates(self, total_batch_size: int, flops_per_token: float) -> tuple[float | None, float]:
        """(tokens per second, MFU in %) over the timed steps; (None, 0.0) when none was timed."""
        if not self.timed_steps:
            return None, 0.0
        tok_per_sec = total_batch_size * self.timed_steps / self.total_training_time
        mfu = 100 * flops_per_token * tok_per_sec / (self.peak_flops * self.world)
        return tok_per_sec, mfu if math.isfinite(mfu) else 0.0

    def environment(self, compiled: bool, **extra) -> dict:
        """The summary's account of where and how the run ran (`extra`, e.g. fp8, goes after the dtype)."""
        return {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type,
            "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."), **extra, "compiled": compiled,
            **self.attention_info,
            "peak_memory_mib": torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None,
        }

    def finish(self, summary: dict) -> dict:
        """summary.json and wandb's summary on rank 0, then every rank leaves: the end of main()."""
        if self.master:
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
            self.say(f"Total training time: {self.total_training_time / 60:.2f}m | "
                     f"Minimum validation bpb: {summary['min_val_bpb']}")
            if self.wandb is not None:
                self.wandb.summary.update({k: v for k, v in summary.items() if v is not None and not isinstance(v, dict)})
                self.wandb.finish()
        compute_cleanup()
        self.stop.restore()
        return summary
