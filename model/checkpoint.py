"""Training checkpoints: save, find the last complete one, and load model/optimizer/loader/RNG state.

One checkpoint at step S in a directory holds (names as the reference, docs/model.md#checkpoints, plus what an exact
resume needs):

    model_S.pt            rank 0: the uncompiled model's state_dict
    meta_S.json           rank 0: step, model_config, user_config, batch sizes, loop state, world size
    optim_S_rankR.pt      every rank: its optimizer state (sharded; resuming needs the same world size)
    loader_S_rankR.pt     every rank: its data loader state, the batch it had prefetched, its RNG states
    complete_S            rank 0, written LAST after every rank has written: the marker

A checkpoint without its marker is ignored (a run killed mid-save resumes from the previous one).
Every file is written to a temp name, fsynced and renamed, and the directory is fsynced before the marker is
written, so after a power loss a marked checkpoint is whole. Should one still fail to load (a disk error, a
file damaged later), `load_resume_point` reports it, drops its marker and falls back to the previous one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.files import atomic_write, atomic_write_text, fsync_dir

MARKER = "complete_{step:06d}"
_MARKER_RE = re.compile(r"^complete_(\d{6})$")


def _atomic_torch_save(obj, path: Path) -> None:
    """torch.save through model/files.atomic_write. Saved through a file object: given a path, torch.save names the
    zip archive inside after the (random) temp file, so equal tensors would give different bytes each time."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(directory: Path, step: int, *, rank: int, model_state: dict | None, meta: dict | None,
                    optimizer_state: dict, loader_state: dict) -> None:
    """Every rank calls this; rank 0 passes model_state and meta. Rank 0 writes the marker last."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(optimizer_state, directory / f"optim_{step:06d}_rank{rank}.pt")
    _atomic_torch_save(loader_state, directory / f"loader_{step:06d}_rank{rank}.pt")
    if rank == 0:
        _atomic_torch_save(model_state, directory / f"model_{step:06d}.pt")
        atomic_write_text(directory / f"meta_{step:06d}.json", json.dumps(meta, indent=2))
    fsync_dir(directory, required=True)  # this rank's renames are on disk
    _barrier()  # the marker may only appear once every rank's files are in place
    if rank == 0:
        atomic_write_text(directory / MARKER.format(step=step), "")
        fsync_dir(directory, required=True)
    _barrier()


def complete_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _MARKER_RE.match(p.name)))


def last_complete_step(directory: Path) -> int | None:
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def read_meta(directory: Path, step: int) -> dict:
    return json.loads((directory / f"meta_{step:06d}.json").read_text())


def load_model_state(directory: Path, step: int, device) -> dict:
    """The model state_dict, '_orig_mod.' prefixes stripped, bf16 upcast to fp32 off CUDA."""
    state = torch.load(directory / f"model_{step:06d}.pt", map_location=device, weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if torch.device(device).type != "cuda":
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    return state


def load_rank_state(directory: Path, step: int, rank: int, device) -> tuple[dict, dict]:
    """(optimizer state, loader state) of one rank."""
    optim = torch.load(directory / f"optim_{step:06d}_rank{rank}.pt", map_location=device, weights_only=True)
    loader = torch.load(directory / f"loader_{step:06d}_rank{rank}.pt", map_location="cpu", weights_only=True)
    return optim, loader


@dataclass
class ResumePoint:
    """Everything one rank needs to continue from a complete checkpoint."""

    step: int
    meta: dict
    model_state: dict
    optimizer_state: dict
    rank_state: dict  # loader state, prefetched batch, RNG states


def load_resume_point(directory: Path, rank: int, world: int, device, say=print) -> ResumePoint | None:
    """The newest complete checkpoint that every rank can load, or None. A checkpoint that fails to load on any
    rank (a truncated or damaged file) is reported, its marker removed, and the previous one tried; one written
    by another number of ranks is an error (optimizer state is sharded per rank)."""
    for step in reversed(complete_steps(directory)):
        meta = read_meta_or_none(directory, step)
        if meta is not None and meta.get("world_size") != world:
            raise SystemExit(f"checkpoint {step} was written by {meta.get('world_size')} ranks, this run has {world}: "
                             "optimizer state is sharded per rank; resume with the same --nproc_per_node")
        problem = None
        try:
            if meta is None:
                raise ValueError(f"meta_{step:06d}.json is missing or unreadable")
            model_state = load_model_state(directory, step, device)
            optimizer_state, rank_state = load_rank_state(directory, step, rank, device)
        except Exception as exc:  # any failure to load means: not usable, try the previous one
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ok = torch.tensor(int(problem is None))
        if dist.is_available() and dist.is_initialized():
            ok = ok.to(device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok.item()):
            return ResumePoint(step, meta, model_state, optimizer_state, rank_state)
        if problem:
            print(f"rank {rank}: checkpoint {step} in {directory} cannot be loaded ({problem})", flush=True)
        say(f"checkpoint {step} is damaged; falling back to the previous complete checkpoint")
        _barrier()
        if rank == 0:
            (directory / MARKER.format(step=step)).unlink(missing_ok=True)
    return None


def load_step(directory: Path, step: int, rank: int, world: int, device) -> ResumePoint:
    """The checkpoint at `step` exactly (--resume-from-step): an error if it cannot be loaded."""
    meta = read_meta(directory, step)
    if meta["world_size"] != world:
        raise SystemExit(f"checkpoint {step} was written by {meta['world_size']} ranks, this run has {world}: "
                         "optimizer state is sharded per rank; resume with the same --nproc_per_node")
    optimizer_state, rank_state = load_rank_state(directory, step, rank, device)
    return ResumePoint(step, meta, load_model_state(directory, step, device), optimizer_state, rank_state)


def read_meta_or_none(directory: Path, step: int) -> dict | None:
    try:
        return read_meta(directory, step)
    except (OSError, ValueError):
        return None


def prune_checkpoints(directory: Path, keep_steps: set[int]) -> None:
    """Delete the files of every complete checkpoint not in keep_steps (marker first, so none looks complete)."""
    for step in complete_steps(directory):
        if step in keep_steps:
            continue
        (directory / MARKER.format(step=step)).unlink(missing_ok=True)
        for p in directory.glob(f"*_{step:06d}*"):
            p.unlink(missing_ok=True)


_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")


def latest_model_step(directory: Path) -> int:
    """The highest step among model_NNNNNN.pt files (a finished artifact's checkpoint/ has no markers)."""
    steps = [int(m.group(1)) for p in Path(directory).glob("model_*.pt") if (m := _MODEL_RE.match(p.name))]
    if not steps:
        raise FileNotFoundError(f"no model_NNNNNN.pt in {directory}; fix: point at a pretrain artifact's checkpoint/ "
                                "directory (or a training run's checkpoints/)")
    return max(steps)


def load_model(directory: Path, device, step: int | None = None, phase: str = "eval"):
    """(model, meta) rebuilt from a checkpoint: config from meta, weights loaded strictly."""
    from model.gpt import GPTConfig, build_model

    directory = Path(directory)
    step = latest_model_step(directory) if step is None else step
    meta = read_meta(directory, step)
    model = build_model(GPTConfig(**meta["model_config"]), device, load_model_state(directory, step, device))
    model.train(phase == "train")
    return model, meta
