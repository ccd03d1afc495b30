"""The CORE metric (docs/evaluation.md#core): in-context-learning evaluation of a base model on the DCLM task bundle.

Per task the JSONL items are shuffled with ``Random(1337)`` and capped; item ``idx`` gets few-shot
examples drawn with ``Random(1234 + idx)`` from the other items; each item renders into one prompt
per option (multiple_choice: per choice, schema: per context option, language_modeling: the context
with and without the continuation), every prompt is tokenised with BOS in front, and a scored span
of tokens is located (common token prefix / common token suffix / the continuation). The decision:

- multiple_choice, schema: the option with the lowest mean cross-entropy over its span (first on ties);
- language_modeling: greedy exact match of the whole continuation.

Three evaluators (``evaluate_task(method=...)``) produce the same per-item decisions:

- ``"reference"`` (``evaluate_example_reference``): the reference algorithm, one forward per item with
  its option sequences right-padded with BOS.
- ``"batched"``: every option sequence of every item this rank owns, sorted by length and packed into
  forwards of at most ``token_budget`` padded tokens.
- ``"prefix"`` (the default): the options of an item share a long prefix (the few-shot examples and,
  for multiple choice, the question). Each item's shared prefix runs once, into a KV cache, batched
  across items (``engine.prefill_padded``); every option then runs only its continuation against a copy
  of that cache (smear continues correctly across the boundary, see ``GPT._cached_smear``), and the
  vocabulary projection is applied at the scored positions only. A prefix never reaches into a scored
  span, so every scored logit comes from the continuation pass. Items with a single sequence (language
  modeling) or whose options share nothing (left truncation cut them differently) take the batched
  path, projected at their scored positions only.

Causal attention makes right padding harmless in exact arithmetic, but a different batch
composition (or a KV-cache split) means different GEMM / attention shapes and so float results that
differ in the last bits. The batched and prefix evaluators therefore only decide an item themselves
when its margin (loss gap between options, or logit gap at the exact-match positions) exceeds
``tie_tolerance``; near-ties are re-decided by the reference algorithm. Decisions are thus those of
the reference by construction, as long as the discrepancy stays below the tolerance (the tests
measure it).

Prompts longer than the model's context (`context_limit`) keep their last tokens, spans shifted. Under
torch.distributed rank r evaluates items r, r+W, ... and the per-item 0/1 are summed over ranks, so any
number of ranks gives the decisions of one. CORE = mean over tasks of the accuracy centred on the
task's random baseline; `write_core_csv` writes the reference's table.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ops.fp8 import disable_fp8
from model.common import COMPUTE_DTYPE
from model.eval_bundle import Bundle, CoreTask, load_task_data

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
TASK_TYPES = (MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING)
SHUFFLE_SEED = 1337
FEWSHOT_SEED_BASE = 1234
FEWSHOT_SEPARATOR = "\n\n"  # every rendered few-shot example is followed by a blank line
CSV_WIDTHS = (35, 10, 10)

# Padded tokens per batched forward (rows x padded length). CPU: the cost per token is flat up to a few
# thousand tokens and then grows (elementwise ops on activations that no longer fit in cache). CUDA:
# large enough to fill the GPU, small enough that the fp32 logits (16k x 32k vocab = 2 GiB) stay modest.
TOKEN_BUDGET = {"cpu": 4096, "cuda": 16384}

# Near-tie tolerance of the batched evaluator, by the dtype the model computes in, far above the noise
# that batch composition causes in that dtype. Measured on CPU: fp32 scores move by <= 1e-6; bf16 mean
# losses by ~1e-3 and logit margins by ~3e-2. bf16 logits are rounded to 8 mantissa bits (steps of 0.0625
# between 8 and 16), so a one-token span can move by two such steps: 0.25 covers that.
TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}
TF32_TIE_TOLERANCE = 0.05  # fp32 on CUDA with TF32 matmuls (10 mantissa bits), as compute_init sets up


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


# --------------------------------------------------------------------------------- model execution


@contextlib.contextmanager
def evaluation_mode(model):
    """Gradients off, eval mode, FP8 layers swapped back to plain linears; training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), disable_fp8(model):
            yield
    finally:
        model.train(was_training)


def _padded_batch(sequences: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """B x max_len int64 tensor, each row right-padded with `pad_id` (BOS)."""
    width = max(len(s) for s in sequences)
    rows = [list(s) + [pad_id] * (width - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long, device=device)


def first_argmin(values: Sequence[float]) -> int:
    """Index chosen by the reference's `values.index(min(values))`: the first minimum; a NaN
    (empty span) wins only in first place, because nothing compares below it and later NaNs never
    compare below anything."""
    best = 0
    for i in range(1, len(values)):
        if values[i] < values[best]:
            best = i
    return best


def reference_decision(model, example: PreparedExample, pad_id: int, device) -> bool:
    """The reference algorithm (docs/evaluation.md#core-evaluators) on one prepared item: one forward of its option sequences."""
    input_ids = _padded_batch(example.sequences, pad_id, device)
    B, T = input_ids.shape
    logits = model(input_ids).float()
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    predictions = logits.argmax(dim=-1)
    if example.task_type == LANGUAGE_MODELING:
        start, end = example.starts[0], example.ends[0]
        return bool(torch.all(predictions[0, start - 1:end - 1] == input_ids[0, start:end]).item())
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(example.starts, example.ends))]
    return first_argmin(mean_losses) == example.gold


def evaluate_example_reference(model, tokenizer, task: CoreTask, data: Sequence[dict], idx: int, device) -> bool:
    """Whether the model gets item `idx` of the (shuffled, capped) task data right, by the reference
    algorithm: one item at a time."""
    example = prepare_example(tokenizer, task, data, idx, context_limit(model))
    with evaluation_mode(model):
        return reference_decision(model, example, tokenizer.get_bos_token_id(), device)


# ------------------------------------------------------------------------------------ batched path


def default_tie_tolerance(device) -> float:
    if (COMPUTE_DTYPE == torch.float32 and torch.device(device).type == "cuda"
            and torch.get_float32_matmul_precision() != "highest"):
        return TF32_TIE_TOLERANCE
    return TIE_TOLERANCE.get(COMPUTE_DTYPE, TIE_TOLERANCE[torch.bfloat16])


def default_token_budget(device) -> int:
    return TOKEN_BUDGET.get(torch.device(device).type, TOKEN_BUDGET["cpu"])


def pack_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Sequence indices grouped into batches, longest first, each batch's rows x longest length <= budget
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _span_scores(span_logits: torch.Tensor, targets: torch.Tensor, bounds: Sequence[int],
                 exact_match: Sequence[bool]) -> list[float]:
    """Scores from the logits at the scored positions of several sequences (rows of `span_logits`;
    sequence r owns rows bounds[r]:bounds[r+1]): either the mean cross-entropy over its span (NaN for an
    empty span) or, for exact-match sequences, the smallest logit margin of the target token over the
    best other token along its span (> 0 everywhere <=> greedy decoding reproduces it)."""
    span_logits = span_logits.float()  # the loss in fp32, as the reference computes it
    losses = F.cross_entropy(span_logits, targets, reduction="none")
    target_logit = span_logits.gather(1, targets[:, None]).squeeze(1)
    best_other = span_logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    margins = target_logit - best_other
    losses, margins = losses.cpu(), margins.cpu()  # one transfer per batch
    scores = []
    for r, is_lm in enumerate(exact_match):
        a, b = bounds[r], bounds[r + 1]
        if is_lm:
            scores.append(margins[a:b].min().item())
        else:
            scores.append(losses[a:b].mean().item())  # mean of an empty span is NaN, as in the reference
    return scores


def _span_index(starts: Sequence[int], ends: Sequence[int], offsets: Sequence[int], device):
    """(rows, positions, bounds): for sequence r, the positions (start - 1 .. end - 2) - offsets[r] whose
    logits predict its span, as flat row/position index tensors, and where each sequence's entries start."""
    rows, positions, bounds = [], [], [0]
    for r, (start, end, offset) in enumerate(zip(starts, ends, offsets)):
        rows.extend([r] * (end - start))
        positions.extend(range(start - 1 - offset, end - 1 - offset))
        bounds.append(len(positions))
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device), bounds)


def _score_batch(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int],
                 exact_match: Sequence[bool], pad_id: int, device, span_logits_only: bool = False) -> list[float]:
    """One forward over right-padded sequences; their `_span_scores`. With `span_logits_only` the vocabulary
    projection runs at the scored positions only (`hidden_states` + `logits`), not at every position."""
    input_ids = _padded_batch(sequences, pad_id, device)
    rows_t, pos_t, bounds = _span_index(starts, ends, [0] * len(sequences), device)
    if span_logits_only:
        span_logits = model.logits(model.hidden_states(input_ids)[rows_t, pos_t])
    else:
        span_logits = model(input_ids)[rows_t, pos_t]
    return _span_scores(span_logits, input_ids[rows_t, pos_t + 1], bounds, exact_match)


def batched_decision(example: PreparedExample, scores: Sequence[float], tolerance: float) -> bool | None:
    """The reference's decision when the batched scores settle it beyond `tolerance`, else None (near-tie)."""
    if example.task_type == LANGUAGE_MODELING:
        margin = scores[0]
        if margin > tolerance:
            return True
        if margin < -tolerance:
            return False
        return None  # includes NaN
    empty = [s >= e for s, e in zip(example.starts, example.ends)]
    if any(math.isnan(v) and not blank for v, blank in zip(scores, empty)):
        return None  # non-finite logits: let the reference algorithm decide as it would
    if empty[0]:
        return example.gold == 0  # a NaN in first place is always the reference's pick
    live = [i for i in range(len(scores)) if not empty[i]]
    pred = min(live, key=lambda i: (scores[i], i))
    if all(scores[j] - scores[pred] > tolerance for j in live if j != pred):
        return pred == example.gold
    gold = example.gold
    if empty[gold] or any(scores[gold] - scores[j] > tolerance for j in live):
        return False  # the gold option certainly does not win, whichever near-tied option does
    return None


@dataclass
class BatchedStats:
    """What the batched evaluator did, for benchmarks and tests."""

    examples: int = 0
    sequences: int = 0
    forwards: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    rechecked: int = 0  # near-ties re-decided by the reference algorithm
    prefix_shared: int = 0  # items whose options ran as continuations of one shared prefix (method "prefix")


def evaluate_examples_batched(model, examples: Sequence[PreparedExample], pad_id: int, device, *,
                              token_budget: int | None = None, tie_tolerance: float | None = None,
                              stats: BatchedStats | None = None, span_logits_only: bool = False) -> list[bool]:
    """Reference decisions for many prepared items, computed with few large forwards (model in eval mode).
    `span_logits_only`: see `_score_batch`."""
    tolerance = default_tie_tolerance(device) if tie_tolerance is None else tie_tolerance
    token_budget = default_token_budget(device) if token_budget is None else token_budget
    flat = [(e, k) for e, ex in enumerate(examples) for k in range(len(ex.sequences))]
    lengths = [len(examples[e].sequences[k]) for e, k in flat]
    scores: list[list[float]] = [[math.nan] * len(ex.sequences) for ex in examples]
    stats = stats if stats is not None else BatchedStats()
    for batch in pack_batches(lengths, token_budget):
        members = [flat[i] for i in batch]
        batch_scores = _score_batch(
            model,
            [examples[e].sequences[k] for e, k in members],
            [examples[e].starts[k] for e, k in members],
            [examples[e].ends[k] for e, k in members],
            [examples[e].task_type == LANGUAGE_MODELING for e, _ in members],
            pad_id, device, span_logits_only)
        for (e, k), score in zip(members, batch_scores):
            scores[e][k] = score
        stats.forwards += 1
        stats.padded_tokens += len(batch) * lengths[batch[0]]
        stats.real_tokens += sum(lengths[i] for i in batch)
    decisions = []
    for example, example_scores in zip(examples, scores):
        decision = batched_decision(example, example_scores, tolerance)
        if decision is None:
            stats.rechecked += 1
            decision = reference_decision(model, example, pad_id, device)
        decisions.append(decision)
    stats.examples += len(examples)
    stats.sequences += len(flat)
    return decisions


# ------------------------------------------------------------------------------------- prefix path

# The continuation pass holds a copy of its item's prefix cache per option: its rows x (prefix + continuation)
# cache slots are kept below this multiple of the token budget.
PREFIX_CACHE_BUDGET_FACTOR = 4


def shared_prefix_length(example: PreparedExample) -> int:
    """Leading tokens that every option sequence of the item holds and that no scored span needs a logit
    from: the common token prefix, capped one below the first scored token (whose logit comes from the
    position before it). 0 when the options share nothing, e.g. after left truncation cut them differently."""
    return max(0, min(common_prefix_length(example.sequences), min(example.starts) - 1))


def pack_prefix_groups(prefix_lengths: Sequence[int], continuation_lengths: Sequence[Sequence[int]],
                       token_budget: int, max_positions: int | None) -> list[list[int]]:
    """Items grouped for the prefix path, longest prefix first. A group's prefix forward (items x longest
    prefix), its continuation forward (options x longest continuation) and its cache copies stay within
    the budget (an item over it gets a group of its own), and no row's positions run past `max_positions`."""
    order = sorted(range(len(prefix_lengths)), key=lambda i: -prefix_lengths[i])
    groups: list[list[int]] = []
    shape = None  # (items, longest prefix, rows, longest continuation) of the open group
    for i in order:
        p, c, k = prefix_lengths[i], max(continuation_lengths[i]), len(continuation_lengths[i])
        if shape is not None:
            items, longest_p, rows, longest_c = shape[0] + 1, shape[1], shape[2] + k, max(shape[3], c)
            fits = (items * longest_p <= token_budget and rows * longest_c <= token_budget
                    and rows * (longest_p + longest_c) <= PREFIX_CACHE_BUDGET_FACTOR * token_budget
                    and (max_positions is None or longest_p + longest_c <= max_positions))
            if fits:
                groups[-1].append(i)
                shape = (items, longest_p, rows, longest_c)
                continue
        groups.append([i])
        shape = (1, p, k, c)
    return groups


def _rotary_positions(model) -> int | None:
    rotary = getattr(model, "cos", None)
    return rotary.size(1) if isinstance(rotary, torch.Tensor) and rotary.dim() >= 2 else None


def evaluate_examples_prefix_shared(model, examples: Sequence[PreparedExample], pad_id: int, device, *,
                                    token_budget: int | None = None, tie_tolerance: float | None = None,
                                    stats: BatchedStats | None = None) -> list[bool]:
    """Reference decisions for many prepared items, each item's shared prefix computed once (model in eval
    mode; the model needs `hidden_states`/`logits` and the KV-cache forward of model/gpt.py)."""
    from model.engine import prefill_padded  # the KV cache; imported here so the batched path stays light

    tolerance = default_tie_tolerance(device) if tie_tolerance is None else tie_tolerance
    token_budget = default_token_budget(device) if token_budget is None else token_budget
    stats = stats if stats is not None else BatchedStats()
    # A single sequence (language modeling) has nothing to share: one forward, projected at its span only.
    shared = [shared_prefix_length(ex) if len(ex.sequences) > 1 else 0 for ex in examples]
    decisions: list[bool | None] = [None] * len(examples)
    unshared = [i for i, p in enumerate(shared) if p < 1]
    if unshared:
        for i, decision in zip(unshared, evaluate_examples_batched(
                model, [examples[i] for i in unshared], pad_id, device, token_budget=token_budget,
                tie_tolerance=tolerance, stats=stats, span_logits_only=True)):
            decisions[i] = decision
    candidates = [i for i, p in enumerate(shared) if p >= 1]
    groups = pack_prefix_groups([shared[i] for i in candidates],
                                [[len(seq) - shared[i] for seq in examples[i].sequences] for i in candidates],
                                token_budget, _rotary_positions(model))
    for group in groups:
        items = [candidates[g] for g in group]
        prefixes = [examples[i].sequences[0][:shared[i]] for i in items]
        rows = [(j, i, k) for j, i in enumerate(items) for k in range(len(examples[i].sequences))]
        continuations = [examples[i].sequences[k][shared[i]:] for _, i, k in rows]
        capacity = max(map(len, prefixes)) + max(map(len, continuations))
        cache = prefill_padded(model, prefixes, pad_id, capacity).select_rows([j for j, _, _ in rows])
        cont_ids = _padded_batch(continuations, pad_id, device)
        hidden = model.hidden_states(cont_ids, kv_cache=cache)
        rows_t, pos_t, bounds = _span_index([examples[i].starts[k] for _, i, k in rows],
                                            [examples[i].ends[k] for _, i, k in rows],
                                            [shared[i] for _, i, _ in rows], device)
        scores = _span_scores(model.logits(hidden[rows_t, pos_t]), cont_ids[rows_t, pos_t + 1], bounds,
                              [examples[i].task_type == LANGUAGE_MODELING for _, i, _ in rows])
        per_item: dict[int, list[float]] = {}
        for (_, i, _), score in zip(rows, scores):
            per_item.setdefault(i, []).append(score)
        for i in items:
            decision = batched_decision(examples[i], per_item[i], tolerance)
            if decision is None:
                stats.rechecked += 1
                decision = reference_decision(model, examples[i], pad_id, device)
            decisions[i] = decision
        stats.forwards += 2
        stats.padded_tokens += len(prefixes) * max(map(len, prefixes)) + len(rows) * cont_ids.size(1)
        stats.real_tokens += sum(map(len, prefixes)) + sum(map(len, continuations))
        stats.examples += len(items)
        stats.sequences += len(rows)
        stats.prefix_shared += len(items)
    return decisions


# ------------------------------------------------------------------------------------ tasks, CORE


METHODS = ("prefix", "batched", "reference")


def evaluate_task(model, tokenizer, task: CoreTask, data: Sequence[dict], *, device, method: str = "prefix",
                  token_budget: int | None = None, rank: int = 0, world_size: int = 1,
                  tie_tolerance: float | None = None, stats: BatchedStats | None = None,
                  max_context: int | None = None) -> list[int]:
    """Per-item 0/1 over the (shuffled, capped) `data`; rank r evaluates items r, r+W, ... and the
    results are summed over ranks, so every rank returns the full list. `method` is one of METHODS (same
    decisions, see the module docstring). `max_context` caps the prompt length below the model's own
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
