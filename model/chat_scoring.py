"""Scoring a chat model on the chat tasks: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, and ChatCORE
(docs/evaluation.md#chat-evaluation). The library half of chat evaluation: `model/chat_eval.py` is its torchrun
entry point, and SFT calls `run_chat_eval` for ChatCORE during training.

Two loops, both split over the ranks of a torchrun job, the counts summed with all_reduce, so any number of
ranks gives the results of one:

- generative (GSM8K, HumanEval): problem i on rank i mod W; prompt = render_for_completion; the engine samples
  `num_samples` completions (decoded tokens after the prompt, tool outputs included, terminal tokens not);
  the problem passes iff any sample evaluates true. Greedy single-sample runs (the speedrun's setting) batch
  several prompts into one engine call (`Engine.generate_prompts`): every row keeps its own position, so the
  completions are those of one prompt at a time (tests/test_chat_eval.py checks it).
- categorical (ARC, MMLU): batches of `batch_size` consecutive problems, batch b on rank b mod W; the prompts
  right-padded with BOS, one forward, and per problem the argmax of the logits at its last prompt position
  over the token ids of its answer letters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from model.chat_data import CHAT_EVAL_TASKS, chat_eval_task
from model.chat_render import render_for_completion
from model.common import dist_info, print0
from model.core_scoring import evaluation_mode
from model.engine import Engine

PROGRESS_LINES = 10  # progress lines per task on rank 0


# ------------------------------------------------------------------------------------------ helpers


def _sum_across_ranks(values: Sequence[int], device) -> list[int]:
    tensor = torch.tensor(list(values), dtype=torch.long, device=device)
    if dist_info()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records, on every rank, sorted by problem index."""
    if dist_info()[1] > 1:
        parts: list = [None] * dist_info()[1]
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def letter_token_ids(tokenizer, letters: Sequence[str], cache: dict | None = None) -> list[int]:
    """The token id of each answer letter; a letter that is not exactly one token is an error."""
    ids = []
    for letter in letters:
        if cache is not None and letter in cache:
            ids.append(cache[letter])
            continue
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(tokens)} tokens {tokens}, the categorical "
                             "eval needs exactly one per letter; fix: use a tokenizer whose vocabulary has the "
                             "letter as a single token (every byte-level BPE has single characters)")
        if cache is not None:
            cache[letter] = tokens[0]
        ids.append(tokens[0])
    return ids


def parse_task_names(spec: str | Sequence[str]) -> list[str]:
    """'all', or names joined by '|' (or ','), or a list of names -> validated names in the given order."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(CHAT_EVAL_TASKS)
        spec = [s for s in spec.replace(",", "|").split("|")]
    names = [s.strip() for s in spec if s.strip()]
    unknown = [n for n in names if n not in CHAT_EVAL_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown chat eval task(s) {unknown or spec!r}; use 'all' or names joined by '|' from "
                         f"{', '.join(CHAT_EVAL_TASKS)}")
    return list(dict.fromkeys(names))


class _Progress:
    """Rank 0's progress lines for one task (rank 0's own share; the totals are printed at the end)."""

    def __init__(self, name: str, local_total: int, log: Callable[[str], None]):
        self.name, self.local_total, self.log = name, local_total, log
        self.every = max(1, -(-local_total // PROGRESS_LINES))
        self.done = self.passed = 0
        self.t0 = time.time()

    def update(self, done: int, passed: int) -> None:
        before = self.done
        self.done, self.passed = done, passed
        if done // self.every != before // self.every or done == self.local_total:
            self.log(f"{self.name}: rank 0 {done}/{self.local_total} | passed {passed} "
                     f"({100 * passed / max(done, 1):.2f}%) | {time.time() - self.t0:.1f}s")


# --------------------------------------------------------------------------------------- the loops


def evaluate_categorical(model, tokenizer, task, name: str, num_problems: int, batch_size: int,
                         log: Callable[[str], None]) -> list[dict]:
    """This rank's records {"index", "prediction", "gold", "correct"} (batches b = rank, rank + W, ...)."""
    rank, world = dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    letter_cache: dict[str, int] = {}
    batches = [list(range(s, min(s + batch_size, num_problems))) for s in range(0, num_problems, batch_size)]
    mine = batches[rank::world]
    progress = _Progress(name, sum(len(b) for b in mine), log)
    records: list[dict] = []
    for indices in mine:
        conversations = [task[i] for i in indices]
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # B x T x V
        for row, (i, conversation, prompt) in enumerate(zip(indices, conversations, prompts)):
            letters = conversation["letters"]
            letter_ids = letter_token_ids(tokenizer, letters, letter_cache)
            scores = logits[row, len(prompt) - 1, letter_ids]
            prediction = letters[int(torch.argmax(scores).item())]
            records.append({"index": i, "prediction": prediction, "gold": conversation["messages"][-1]["content"],
                            "correct": bool(task.evaluate(conversation, prediction))})
        progress.update(len(records), sum(r["correct"] for r in records))
    return records


def evaluate_generative(model, tokenizer, task, name: str, num_problems: int, *, num_samples: int, max_new_tokens: int,
                        temperature: float, top_k: int | None, seed: int, batch_size: int, batched: bool,
                        log: Callable[[str], None]) -> list[dict]:
    """This rank's records {"index", "completions", "correct"} (problems rank, rank + W, ...)."""
    rank, world = dist_info()
    engine = Engine(model, tokenizer)
    mine = list(range(rank, num_problems, world))
    progress = _Progress(name, len(mine), log)
    # Batching prompts is only exact for greedy single-sample decoding (no random stream to share).
    group = batch_size if (batched and num_samples == 1 and temperature == 0) else 1
    records: list[dict] = []
    for start in range(0, len(mine), group):
        indices = mine[start:start + group]
        conversations = [task[i] for i in indices]
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        if group > 1:
            outputs = engine.generate_prompts(prompts, max_tokens=max_new_tokens, temperature=0.0, top_k=top_k,
                                              seed=seed)
            completions = [[tokenizer.decode(out)] for out in outputs]
        else:
            completions = []
            for prompt in prompts:
                sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                                     temperature=temperature, top_k=top_k, seed=seed)
                completions.append([tokenizer.decode(seq[len(prompt):]) for seq in sequences])
        for i, conversation, samples in zip(indices, conversations, completions):
            correct = any(task.evaluate(conversation, c) for c in samples)  # pass@num_samples
            records.append({"index": i, "completions": samples, "correct": bool(correct)})
        progress.update(len(records), sum(r["correct"] for r in records))
    return records


def evaluate_tasks(model, tokenizer, task_names: str | Sequence[str], data_dir, *, max_problems: int | None = None,
                   batch_size: int = 8, num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0,
                   top_k: int | None = 50, seed: int = 42, batched_generation: bool = True,
                   log: Callable[[str], None] = print0) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """(results {name: {"accuracy", "passed", "total"}}, records {name: per-problem records}) on every rank."""
    names = parse_task_names(task_names)
    if batch_size < 1 or num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}), num_samples ({num_samples}) and max_new_tokens "
                         f"({max_new_tokens}) must all be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be >= 1 or None (all), got {max_problems}")
    top_k = top_k if top_k is not None and top_k > 0 else None
    device = model.get_device()
    results: dict[str, dict] = {}
    all_records: dict[str, list[dict]] = {}
    with evaluation_mode(model):
        for name in names:
            t0 = time.time()
            task = chat_eval_task(name, data_dir)
            n = len(task) if max_problems is None else min(len(task), max_problems)
            log(f"{name}: {n} problems ({task.eval_type}) on {dist_info()[1]} rank(s)")
            if task.eval_type == "categorical":
                records = evaluate_categorical(model, tokenizer, task, name, n, batch_size, log)
            elif task.eval_type == "generative":
                records = evaluate_generative(model, tokenizer, task, name, n, num_samples=num_samples,
                                              max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                              seed=seed, batch_size=batch_size, batched=batched_generation, log=log)
            else:
                raise ValueError(f"task {name}: unknown eval_type {task.eval_type!r}")
            passed, total = _sum_across_ranks([sum(r["correct"] for r in records), len(records)], device)
            if total != n:
                raise RuntimeError(f"{name}: the ranks evaluated {total} problems, expected {n}")
            results[name] = {"accuracy": passed / total, "passed": passed, "total": total}
            all_records[name] = _gather_records(records)
            log(f"{name}: accuracy {100 * passed / total:.2f}% ({passed}/{total}) in {time.time() - t0:.1f}s")
    return results, all_records


def run_chat_eval(model, tokenizer, task_names: str | Sequence[str], data_dir, *, max_problems: int | None = None,
                  batch_size: int = 8, num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0,
                  top_k: int | None = 50, seed: int = 42,
                  log: Callable[[str], None] = print0) -> dict[str, dict]:
    """Per-task {"accuracy", "passed", "total"}; under torch.distributed the problems are split over the ranks
    and the counts summed, so every rank returns the full result. The model is restored to its mode after."""
    results, _ = evaluate_tasks(model, tokenizer, task_names, data_dir, max_problems=max_problems,
                                batch_size=batch_size, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, seed=seed, log=log)
    return results


# ------------------------------------------------------------------------------------------- CLI
