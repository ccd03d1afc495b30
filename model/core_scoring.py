"""How a prepared CORE item is decided (docs/evaluation.md#core-evaluators): the reference algorithm and two
faster evaluators that make the same decisions.

The decision: multiple_choice and schema take the option with the lowest mean cross-entropy over its
span (first on ties); language_modeling asks for a greedy exact match of the whole continuation.

Three evaluators (``model.core_eval.evaluate_task(method=...)``) produce the same per-item decisions:

- ``"reference"`` (``evaluate_example_reference``): the reference algorithm, one forward per item with
  its option sequences right-padded with BOS.
- ``"batched"``: every option sequence of every item this rank owns, sorted by length and packed into
  forwards of at most ``token_budget`` padded tokens.
- ``"prefix"`` (the default): the options of an item share a long prefix (the few-shot examples and,
  for multiple choice, the question). Each item's shared prefix runs once, into a KV cache, batched
  across items (``engine.prefill_padded``); every option then runs only its continuation against a copy
  of that cache (smear continues correctly across the boundary, see ``GPT._cached_smear``). A prefix
  never reaches into a scored span, so every scored logit comes from the continuation pass. Items with a
  single sequence (language modeling) or whose options share nothing (left truncation cut them
  differently, e.g. 10-shot hellaswag and boolq past the context) take the batched path.

  Neither pass computes what no score reads (``GPT.hidden_states(positions=...)``,
  model/selected_positions.py): the last block computes its keys and values everywhere (later tokens and
  the cache attend to them) but its query, attention, output projection and MLP, the backout, the final
  norm and the vocabulary projection only at the scored positions (``_selected_positions``); a prefix
  prefill needs no output at all, so its last block computes keys and values only.

Causal attention makes right padding harmless in exact arithmetic, but a different batch
composition (or a KV-cache split, or a last block run at a subset of positions) means different GEMM /
attention shapes and so float results that
differ in the last bits. The batched and prefix evaluators therefore only decide an item themselves
when its margin (loss gap between options, or logit gap at the exact-match positions) exceeds
``tie_tolerance``; near-ties are re-decided by the reference algorithm. Decisions are thus those of
the reference by construction, as long as the discrepancy stays below the tolerance (the tests
measure it).
"""


from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ops.fp8 import disable_fp8
from model.common import COMPUTE_DTYPE
from model.core_prompts import LANGUAGE_MODELING, PreparedExample, common_prefix_length

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


def _selected_positions(starts: Sequence[int], ends: Sequence[int], offsets: Sequence[int],
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, columns): the positions of `_span_index` laid out as `hidden_states(positions=...)` takes
    them, row r's span in row r of a B x S matrix (S: the longest span; shorter rows padded with position
    0), and for every flat `_span_index` entry its column in that matrix."""
    width = max(1, max(e - s for s, e in zip(starts, ends)))
    matrix, columns = [], []
    for start, end, offset in zip(starts, ends, offsets):
        span = list(range(start - 1 - offset, end - 1 - offset))
        matrix.append(span + [0] * (width - len(span)))
        columns.extend(range(len(span)))
    return (torch.tensor(matrix, dtype=torch.long, device=device),
            torch.tensor(columns, dtype=torch.long, device=device))


def _score_batch(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int],
                 exact_match: Sequence[bool], pad_id: int, device, span_logits_only: bool = False) -> list[float]:
    """One forward over right-padded sequences; their `_span_scores`. With `span_logits_only` the last block,
    the final norm and the vocabulary projection run at the scored positions only (`hidden_states(positions=)`
    + `logits`), not at every position."""
    input_ids = _padded_batch(sequences, pad_id, device)
    rows_t, pos_t, bounds = _span_index(starts, ends, [0] * len(sequences), device)
    if span_logits_only:
        selected, columns = _selected_positions(starts, ends, [0] * len(sequences), device)
        span_logits = model.logits(model.hidden_states(input_ids, positions=selected)[rows_t, columns])
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
        span = ([examples[i].starts[k] for _, i, k in rows], [examples[i].ends[k] for _, i, k in rows],
                [shared[i] for _, i, _ in rows])
        rows_t, pos_t, bounds = _span_index(*span, device)
        selected, columns = _selected_positions(*span, device)
        hidden = model.hidden_states(cont_ids, kv_cache=cache, positions=selected)
        scores = _span_scores(model.logits(hidden[rows_t, columns]), cont_ids[rows_t, pos_t + 1], bounds,
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
