"""CORE items as token sequences (docs/evaluation.md#core): shuffling, few-shot examples, prompts, scored spans.

Per task the JSONL items are shuffled with ``Random(1337)`` and capped; item ``idx`` gets few-shot
examples drawn with ``Random(1234 + idx)`` from the other items; each item renders into one prompt
per option (multiple_choice: per choice, schema: per context option, language_modeling: the context
with and without the continuation), every prompt is tokenised with BOS in front, and a scored span
of tokens is located (common token prefix / common token suffix / the continuation). Prompts longer
than the model's context (`context_limit`) keep their last tokens, spans shifted. The result of an item
is a `PreparedExample`, which model/core_scoring.py decides.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.eval_bundle import CoreTask

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
TASK_TYPES = (MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING)
SHUFFLE_SEED = 1337
FEWSHOT_SEED_BASE = 1234
FEWSHOT_SEPARATOR = "\n\n"  # every rendered few-shot example is followed by a blank line


# --------------------------------------------------------------------------------------------- data


def prepare_task_data(data: Sequence[dict], max_per_task: int) -> list[dict]:
    """Items shuffled with Random(1337), then the first `max_per_task` kept (all when <= 0)."""
    items = list(data)
    random.Random(SHUFFLE_SEED).shuffle(items)
    if max_per_task > 0:
        items = items[:max_per_task]
    return items


def fewshot_examples(data: Sequence[dict], idx: int, num_fewshot: int) -> list[dict]:
    """The few-shot examples of item `idx`: Random(1234 + idx).sample of the other indices, in sampled order."""
    if num_fewshot <= 0:
        return []
    n_candidates = len(data) - 1
    if num_fewshot > n_candidates:
        raise ValueError(f"{num_fewshot}-shot needs at least {num_fewshot + 1} items, the task has {len(data)} "
                         "(raise max_per_task)")
    # The reference samples from the list of every index but idx. random.sample picks positions from
    # the population's length alone, so sampling range(n - 1) and skipping idx gives the same examples
    # without building an n-long list per item (quadratic on the 20k-item tasks).
    positions = random.Random(FEWSHOT_SEED_BASE + idx).sample(range(n_candidates), num_fewshot)
    return [data[p if p < idx else p + 1] for p in positions]


# ---------------------------------------------------------------------------------------- rendering


def render_prompts(task_type: str, item: dict, fewshot: Sequence[dict], delimiter: str) -> list[str]:
    """The prompts of one item (docs/evaluation.md#core-scoring): one per choice / context option, or [without, with] for LM."""
    if task_type == MULTIPLE_CHOICE:
        prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}{FEWSHOT_SEPARATOR}" for ex in fewshot)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == SCHEMA:
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}{FEWSHOT_SEPARATOR}"
                         for ex in fewshot)
        return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == LANGUAGE_MODELING:
        prefix = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}{FEWSHOT_SEPARATOR}"
                         for ex in fewshot)
        without = f"{prefix}{str(item['context']).strip()}{delimiter}"
        # Stripped so that a trailing space of the delimiter is not left dangling at the end: the
        # tokenizer would merge it into the continuation's first token, and the prompt without the
        # continuation would no longer tokenise to a prefix of the prompt with it.
        return [without.strip(), without + str(item["continuation"])]
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


# ------------------------------------------------------------------------------------- tokenisation


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Number of leading tokens shared by every sequence."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return shortest


def common_suffix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Number of trailing tokens shared by every sequence."""
    shortest = min(len(s) for s in sequences)
    for i in range(1, shortest + 1):
        if any(s[-i] != sequences[0][-i] for s in sequences):
            return i - 1
    return shortest


def scored_spans(task_type: str, tokens: list[list[int]],
                 prompts: Sequence[str]) -> tuple[list[list[int]], list[int], list[int]]:
    """The sequences to run and their scored spans [start, end), from the tokenised prompts."""
    ends = [len(t) for t in tokens]
    if task_type == MULTIPLE_CHOICE:
        start = common_prefix_length(tokens)
        return tokens, [start] * len(tokens), ends
    if task_type == SCHEMA:
        suffix = common_suffix_length(tokens)
        return tokens, [end - suffix for end in ends], ends
    if task_type == LANGUAGE_MODELING:
        without, with_continuation = tokens
        start, end = len(without), len(with_continuation)
        if not start < end or with_continuation[:start] != without:
            raise ValueError(f"language-modeling prompt: the tokens without the continuation ({start}) are not a "
                             f"proper prefix of the tokens with it ({end}): {prompts[0][-80:]!r}")
        return [with_continuation], [start], [end]
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


def tokenize_example(tokenizer, task_type: str,
                     prompts: Sequence[str]) -> tuple[list[list[int]], list[int], list[int]]:
    """Token sequences (BOS first) and the scored span [start, end) of each (docs/evaluation.md#core-scoring).

    multiple_choice: one start for all, after the common token prefix; schema: the common token
    suffix; language_modeling: only the prompt with the continuation, scored after the prompt without.
    """
    return scored_spans(task_type, tokenizer.encode(list(prompts), prepend=tokenizer.get_bos_token_id()), prompts)


def context_limit(model) -> int | None:
    """Longest sequence the model can take, or None for unlimited.

    The reference truncates only to a model's `max_seq_len`. Our GPT has none, but its rotary
    tables cover 10 x sequence_len positions and a longer forward fails; at speedrun sizes no CORE
    prompt comes near that, while small test models (T = 64-128) see 10-shot prompts beyond it, so
    those are truncated by the same rule instead of failing.
    """
    limit = getattr(model, "max_seq_len", None)
    if limit is None:
        rotary = getattr(model, "cos", None)
        if isinstance(rotary, torch.Tensor) and rotary.dim() >= 2:
            limit = rotary.size(1)
    return limit


def truncate_to_limit(sequences: list[list[int]], starts: list[int], ends: list[int],
                      limit: int | None) -> tuple[list[list[int]], list[int], list[int]]:
    """Keep the last `limit` tokens of longer sequences and shift their spans down."""
    if limit is None:
        return sequences, starts, ends
    out = ([], [], [])
    for tokens, start, end in zip(sequences, starts, ends):
        crop = max(0, len(tokens) - limit)
        if start - crop < 1:  # the first scored token needs a predecessor to be predicted from
            raise ValueError(f"a {len(tokens)}-token prompt scored from {start} cannot be cut to the model's "
                             f"{limit}-token context")
        out[0].append(tokens[crop:])
        out[1].append(start - crop)
        out[2].append(end - crop)
    return out


@dataclass(frozen=True)
class PreparedExample:
    """One item ready for the model: its option sequences and their scored spans [start, end)."""

    idx: int
    task_type: str
    sequences: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None  # None for language modeling


def prepare_examples(tokenizer, task: CoreTask, data: Sequence[dict], indices: Sequence[int],
                     limit: int | None = None) -> list[PreparedExample]:
    """Few-shot selection, rendering, tokenisation and truncation of items `indices` of the (shuffled) task data."""
    if not indices:
        return []
    prompts = [render_prompts(task.task_type, data[idx], fewshot_examples(data, idx, task.num_fewshot), task.delimiter)
               for idx in indices]
    # one batch-encode call for the whole task: per-item calls cost more than the encoding itself
    flat = tokenizer.encode([p for item_prompts in prompts for p in item_prompts], prepend=tokenizer.get_bos_token_id())
    examples, offset = [], 0
    for idx, item_prompts in zip(indices, prompts):
        tokens, offset = flat[offset:offset + len(item_prompts)], offset + len(item_prompts)
        sequences, starts, ends = truncate_to_limit(*scored_spans(task.task_type, tokens, item_prompts), limit)
        gold = None if task.task_type == LANGUAGE_MODELING else int(data[idx]["gold"])
        examples.append(PreparedExample(idx, task.task_type, sequences, starts, ends, gold))
    return examples


def prepare_example(tokenizer, task: CoreTask, data: Sequence[dict], idx: int,
                    limit: int | None = None) -> PreparedExample:
    """prepare_examples for one item."""
    return prepare_examples(tokenizer, task, data, [idx], limit)[0]
