"""The CORE metric (docs/evaluation.md#core): in-context-learning evaluation of a base model on the DCLM task bundle.

Each task's items become token sequences with scored spans (model/core_prompts.py) and are decided by one
of three evaluators with the same decisions (model/core_scoring.py; ``evaluate_task(method=...)``, default
``"prefix"``). Under torch.distributed rank r evaluates items r, r+W, ... and the per-item 0/1 are summed
over ranks, so any number of ranks gives the decisions of one. CORE = mean over tasks of the accuracy
centred on the task's random baseline; `write_core_csv` writes the reference's table.

    python -m model.evaluate --help     # the entry point that runs it on a checkpoint
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.core_prompts import context_limit, prepare_example, prepare_examples, prepare_task_data
from model.core_scoring import (BatchedStats, evaluate_examples_batched, evaluate_examples_prefix_shared,
                                evaluation_mode, reference_decision)
from model.eval_bundle import Bundle, CoreTask, load_task_data

CSV_WIDTHS = (35, 10, 10)


def evaluate_example_reference(model, tokenizer, task: CoreTask, data: Sequence[dict], idx: int, device) -> bool:
    """Whether the model gets item `idx` of the (shuffled, capped) task data right, by the reference
    algorithm: one item at a time."""
    example = prepare_example(tokenizer, task, data, idx, context_limit(model))
    with evaluation_mode(model):
        return reference_decision(model, example, tokenizer.get_bos_token_id(), device)


METHODS = ("prefix", "batched", "reference")


def evaluate_task(model, tokenizer, task: CoreTask, data: Sequence[dict], *, device, method: str = "prefix",
                  token_budget: int | None = None, rank: int = 0, world_size: int = 1,
                  tie_tolerance: float | None = None, stats: BatchedStats | None = None,
                  max_context: int | None = None) -> list[int]:
    """Per-item 0/1 over the (shuffled, capped) `data`; rank r evaluates items r, r+W, ... and the
    results are summed over ranks, so every rank returns the full list. `method` is one of METHODS (same
    decisions, see model/core_scoring.py). `max_context` caps the prompt length below the model's own
    limit (the reference's truncation rule: keep the last tokens)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    limit = context_limit(model)
    if max_context is not None:
        limit = max_context if limit is None else min(limit, max_context)
    pad_id = tokenizer.get_bos_token_id()
    mine = list(range(rank, len(data), world_size))
    examples = prepare_examples(tokenizer, task, data, mine, limit)
    with evaluation_mode(model):
        if method == "prefix":
            decisions = evaluate_examples_prefix_shared(model, examples, pad_id, device, token_budget=token_budget,
                                                        tie_tolerance=tie_tolerance, stats=stats)
        elif method == "batched":
            decisions = evaluate_examples_batched(model, examples, pad_id, device, token_budget=token_budget,
                                                  tie_tolerance=tie_tolerance, stats=stats)
        else:
            decisions = [reference_decision(model, example, pad_id, device) for example in examples]
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    if mine:
        correct[torch.tensor(mine, device=device)] = torch.tensor(decisions, dtype=torch.float32, device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)  # disjoint items: the sum is a gather (gloo and NCCL)
    return [int(v) for v in correct.tolist()]


def centered(accuracy: float, baseline_percent: float) -> float:
    """Accuracy rescaled so the random baseline maps to 0 and perfect to 1."""
    chance = 0.01 * baseline_percent
    return (accuracy - chance) / (1.0 - chance)


def core_metric(centered_results: dict[str, float]) -> float:
    """CORE: the mean of the centred accuracies of the evaluated tasks."""
    if not centered_results:
        raise ValueError("no task was evaluated: CORE is undefined")
    return sum(centered_results.values()) / len(centered_results)


def evaluate_core(model, tokenizer, bundle: Bundle, *, max_per_task: int = -1, device, method: str = "prefix",
                  rank: int = 0, world_size: int = 1, log: Callable[[str], Any] = print,
                  token_budget: int | None = None, max_context: int | None = None) -> dict:
    """Evaluate every task of the bundle; accuracy, centred accuracy and time per task are logged on rank 0."""
    results, centered_results, decisions = {}, {}, {}
    for task in bundle.tasks:
        t0 = time.time()
        data = prepare_task_data(load_task_data(task), max_per_task)
        outcome = evaluate_task(model, tokenizer, task, data, device=device, method=method,
                                token_budget=token_budget, rank=rank, world_size=world_size, max_context=max_context)
        accuracy = sum(outcome) / len(outcome) if outcome else 0.0
        results[task.label] = accuracy
        centered_results[task.label] = centered(accuracy, task.baseline)
        decisions[task.label] = outcome
        if rank == 0:
            log(f"{task.label:<35} ({task.num_fewshot}-shot, {task.task_type}, {len(outcome)} items): "
                f"accuracy {accuracy:.4f} | centered {centered_results[task.label]:.4f} | {time.time() - t0:.2f}s")
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric(centered_results),
            "decisions": decisions, "core_tasks": bundle.core_tasks, "missing_tasks": list(bundle.missing)}


def write_core_csv(path: str | Path, result: dict) -> None:
    """The reference's CSV: Task / Accuracy / Centered per task, fields left-justified to 35/10/10 and
    joined by ", ", values %.6f, then a CORE row with an empty accuracy."""
    label_w, acc_w, cen_w = CSV_WIDTHS
    lines = [f"{'Task':<{label_w}}, {'Accuracy':<{acc_w}}, {'Centered':<{cen_w}}"]
    for label, accuracy in result["results"].items():
        lines.append(f"{label:<{label_w}}, {accuracy:<{acc_w}.6f}, {result['centered_results'][label]:<{cen_w}.6f}")
    lines.append(f"{'CORE':<{label_w}}, {'':<{acc_w}}, {result['core_metric']:<{cen_w}.6f}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
