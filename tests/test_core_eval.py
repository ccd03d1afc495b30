"""CORE evaluation (model/core_eval.py, core_prompts.py, core_scoring.py, docs/evaluation.md#core) on CPU with the real bundle and a tiny trained GPT.

Golden rendering / few-shot / shuffle / span tests pin the reference's exact prompts and scored tokens.
A depth-2 GPT trained for a few dozen steps on real shard text (so losses are not uniform) checks that the
batched evaluator decides every item exactly as the one-item-at-a-time reference on all bundle tasks, and
that two torchrun ranks (gloo) give what one process gives.
"""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.core_eval import centered, core_metric, evaluate_core, evaluate_example_reference, evaluate_task, write_core_csv
from model.core_prompts import (PreparedExample, fewshot_examples, prepare_example, prepare_examples, prepare_task_data,
                                render_prompts, tokenize_example, truncate_to_limit)
from model.core_scoring import (BatchedStats, _score_batch, batched_decision, evaluate_examples_prefix_shared,
                                evaluation_mode, first_argmin, pack_batches, pack_prefix_groups, shared_prefix_length)
from model.eval_bundle import load_bundle, load_task_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUNDLE_DIR = SHARED_DATA / "eval_bundle"
PRETRAIN_DIR = SHARED_DATA / "pretrain"
WORKER = REPO_ROOT / "tests" / "core_eval_dist_worker.py"

# The tiny model: trained on 64-token rows; evaluated with prompts cut to 256 tokens through the reference's
# `max_seq_len` truncation rule, which keeps the whole file well inside its time budget.
TINY = dict(depth=2, width=128, heads=2, seq_len=64, vocab=512, steps=40, batch=8, eval_context=256)
MAX_PER_TASK = 32
DIST_TASKS = ["copa", "winograd", "bigbench_operators", "arc_easy"]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shard_paths() -> list[Path]:
    shards = sorted(PRETRAIN_DIR.glob("shard_*.parquet"))
    if len(shards) < 2:
        pytest.skip(f"pretraining shards not found in {PRETRAIN_DIR} (the tests read ../shared/data beside the repo)")
    return shards


@pytest.fixture(scope="module")
def bundle():
    if not (BUNDLE_DIR / "core.yaml").is_file():
        pytest.skip(f"CORE eval bundle not found at {BUNDLE_DIR} (the tests read ../shared/data beside the repo)")
    return load_bundle(BUNDLE_DIR, allow_missing=True)


@pytest.fixture(scope="module")
def tokenizer(shard_paths):
    from model.data import iter_documents
    from model.tokenizer import train_tokenizer, training_texts

    return train_tokenizer(training_texts(iter_documents(shard_paths[:1]), max_chars=1_000_000, doc_cap=10_000),
                           vocab_size=TINY["vocab"])


@pytest.fixture(scope="module")
def trained_model(tokenizer, shard_paths):
    from model.dataloader import BestFitLoader
    from model.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=TINY["seq_len"], vocab_size=tokenizer.get_vocab_size(), n_layer=TINY["depth"],
                       n_head=TINY["heads"], n_kv_head=TINY["heads"], n_embd=TINY["width"], window_pattern="SL")
    model = build_model(config, "cpu")
    optimizer = model.setup_optimizer()
    loader = BestFitLoader(tokenizer, shard_paths[:-1], TINY["batch"], TINY["seq_len"], streams=[0], num_streams=1)
    losses = []
    for _ in range(TINY["steps"]):
        x, y = next(loader)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses  # it learned something: losses differ between options
    model.max_seq_len = TINY["eval_context"]
    return model


def task_by_label(bundle, label):
    return next(t for t in bundle.tasks if t.label == label)


# ---------------------------------------------------------------------------------------- rendering


def test_render_multiple_choice_with_two_shots_and_answer_delimiter():
    fewshot = [{"query": "Which is a fruit?", "choices": ["stone", "apple"], "gold": 1},
               {"query": "Sky colour?", "choices": ["blue", "green", "red"], "gold": 0}]
    item = {"query": "Capital of France?", "choices": ["Paris", "Rome"], "gold": 0}
    assert render_prompts("multiple_choice", item, fewshot, "\nAnswer: ") == [
        "Which is a fruit?\nAnswer: apple\n\nSky colour?\nAnswer: blue\n\nCapital of France?\nAnswer: Paris",
        "Which is a fruit?\nAnswer: apple\n\nSky colour?\nAnswer: blue\n\nCapital of France?\nAnswer: Rome",
    ]
    assert render_prompts("multiple_choice", item, [], " ") == ["Capital of France? Paris", "Capital of France? Rome"]


def test_render_schema():
    fewshot = [{"context_options": ["The cup fell because it", "The cup held because it"],
                "continuation": "was slippery.", "gold": 0}]
    item = {"context_options": ["Ann thanked Bea because Ann", "Ann thanked Bea because Bea"],
            "continuation": "had helped.", "gold": 1}
    assert render_prompts("schema", item, fewshot, " ") == [
        "The cup fell because it was slippery.\n\nAnn thanked Bea because Ann had helped.",
        "The cup fell because it was slippery.\n\nAnn thanked Bea because Bea had helped.",
    ]


def test_render_language_modeling_trims_contexts_and_strips_the_prompt_without():
    fewshot = [{"context": "  The sky is \n", "continuation": "blue"}]
    item = {"context": "Grass is ", "continuation": "green"}
    # contexts trimmed; the prompt without the continuation loses the delimiter's trailing space
    assert render_prompts("language_modeling", item, fewshot, " ") == [
        "The sky is blue\n\nGrass is", "The sky is blue\n\nGrass is green"]
    assert render_prompts("language_modeling", item, fewshot, "\nAnswer: ") == [
        "The sky is\nAnswer: blue\n\nGrass is\nAnswer:", "The sky is\nAnswer: blue\n\nGrass is\nAnswer: green"]
    # zero-shot: the whole prompt is stripped, leading whitespace included
    assert render_prompts("language_modeling", {"context": "\n Hi there ", "continuation": "you"}, [], " ") == [
        "Hi there", "Hi there you"]


def test_render_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown task type"):
        render_prompts("ranking", {}, [], " ")


def test_fewshot_examples_follow_random_1234_plus_idx():
    data = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(12)]
    for idx in (0, 5, 11):
        expected = random.Random(1234 + idx).sample([i for i in range(12) if i != idx], 3)
        assert fewshot_examples(data, idx, 3) == [data[i] for i in expected]  # sampled order, not sorted
        assert data[idx] not in fewshot_examples(data, idx, 11)
    big = [{"context": str(i), "continuation": "x"} for i in range(500)]
    for idx in (0, 1, 250, 498, 499):
        expected = random.Random(1234 + idx).sample([i for i in range(500) if i != idx], 10)
        assert fewshot_examples(big, idx, 10) == [big[i] for i in expected]
    assert fewshot_examples(data, 4, 0) == []
    with pytest.raises(ValueError, match="raise max_per_task"):
        fewshot_examples(data[:5], 0, 10)


def test_shuffle_with_random_1337_then_cap():
    data = [{"context": str(i), "continuation": "x"} for i in range(100)]
    expected = list(data)
    random.Random(1337).shuffle(expected)
    assert prepare_task_data(data, 10) == expected[:10]
    assert prepare_task_data(data, -1) == expected
    assert prepare_task_data(data, 1000) == expected
    assert data[:3] == [{"context": "0", "continuation": "x"}, {"context": "1", "continuation": "x"},
                        {"context": "2", "continuation": "x"}]  # input untouched


# ----------------------------------------------------------------------------------- scored spans


def test_multiple_choice_span_starts_after_the_common_token_prefix(tokenizer):
    bos = tokenizer.get_bos_token_id()
    prompts = render_prompts("multiple_choice", {"query": "The capital of France is", "choices": ["Paris", "London"],
                                                 "gold": 0}, [], " ")
    sequences, starts, ends = tokenize_example(tokenizer, "multiple_choice", prompts)
    # " Paris" / " London" are separate pre-tokenizer chunks, so the shared tokens are BOS + the query's
    query_tokens = tokenizer.encode("The capital of France is")
    assert starts == [1 + len(query_tokens)] * 2
    assert sequences == [[bos] + query_tokens + tokenizer.encode(" Paris"),
                         [bos] + query_tokens + tokenizer.encode(" London")]
    assert ends == [len(s) for s in sequences]
    assert sequences[0][starts[0]] != sequences[1][starts[1]]


def test_multiple_choice_shared_leading_choice_tokens_are_not_scored(tokenizer):
    prompts = ["Pick: the red one", "Pick: the blue one"]
    sequences, starts, _ = tokenize_example(tokenizer, "multiple_choice", prompts)
    assert starts[0] == 1 + len(tokenizer.encode("Pick: the"))  # " the" is shared, hence in the prefix


def test_schema_span_is_the_common_token_suffix(tokenizer):
    item = {"context_options": ["Ann thanked Bea because she", "Ann thanked Bea because Ann"],
            "continuation": "was grateful.", "gold": 0}
    prompts = render_prompts("schema", item, [], " ")
    sequences, starts, ends = tokenize_example(tokenizer, "schema", prompts)
    suffix = len(tokenizer.encode(" was grateful."))
    assert ends == [len(s) for s in sequences]
    assert starts == [ends[0] - suffix, ends[1] - suffix]
    assert sequences[0][starts[0]:] == sequences[1][starts[1]:] == tokenizer.encode(" was grateful.")
    assert sequences[0][starts[0] - 1] != sequences[1][starts[1] - 1]


def test_language_modeling_span_is_the_continuation(tokenizer):
    bos = tokenizer.get_bos_token_id()
    without, with_continuation = render_prompts("language_modeling", {"context": "Grass is ", "continuation": "green"},
                                                [{"context": "The sky is", "continuation": "blue"}], " ")
    sequences, starts, ends = tokenize_example(tokenizer, "language_modeling", [without, with_continuation])
    tokens_without = [bos] + tokenizer.encode(without)
    assert sequences == [[bos] + tokenizer.encode(with_continuation)]
    assert (starts, ends) == ([len(tokens_without)], [len(sequences[0])])
    assert sequences[0][:starts[0]] == tokens_without  # an exact prefix
    # why the strip rule exists: with its trailing space, the prompt would not tokenise to a prefix
    unstripped = tokenizer.encode("The sky is blue\n\nGrass is ")
    assert sequences[0][1:1 + len(unstripped)] != unstripped
    with pytest.raises(ValueError, match="proper prefix"):
        tokenize_example(tokenizer, "language_modeling", ["Grass is ", "Grass is green"])


def test_truncation_keeps_the_last_tokens_and_shifts_spans():
    sequences, starts, ends = truncate_to_limit([list(range(10)), list(range(6))], [7, 4], [10, 6], limit=8)
    assert sequences == [list(range(2, 10)), list(range(6))]
    assert (starts, ends) == ([5, 4], [8, 6])
    assert truncate_to_limit([[1, 2, 3]], [1], [3], None) == ([[1, 2, 3]], [1], [3])
    with pytest.raises(ValueError, match="cannot be cut"):
        truncate_to_limit([list(range(10))], [2], [10], limit=8)


# ------------------------------------------------------------------------------- decision helpers


def test_first_argmin_matches_the_reference_min_index_rule():
    for values in ([1.0, 0.5, 0.5], [2.0, 1.0], [float("nan"), 1.0], [1.0, float("nan"), 0.5], [3.0, 3.0]):
        assert first_argmin(values) == values.index(min(values))


def _mc(gold, starts=(1, 1), ends=(3, 3)):
    return PreparedExample(0, "multiple_choice", [[0] * e for e in ends], list(starts), list(ends), gold)


def test_batched_decision_defers_near_ties_to_the_reference():
    tol = 1e-3
    assert batched_decision(_mc(0), [1.0, 1.5], tol) is True
    assert batched_decision(_mc(1), [1.0, 1.5], tol) is False
    assert batched_decision(_mc(0), [1.0, 1.0 + 1e-5], tol) is None  # near-tie: the reference decides
    assert batched_decision(_mc(0), [1.0, 1.0], tol) is None
    three = PreparedExample(0, "multiple_choice", [[0] * 3] * 3, [1] * 3, [3] * 3, 2)
    assert batched_decision(three, [1.0, 1.0 + 1e-5, 2.0], tol) is False  # gold clearly loses to a near-tie
    nan = float("nan")
    assert batched_decision(_mc(0, starts=(3, 1)), [nan, 0.1], tol) is True  # empty span first: always picked
    assert batched_decision(_mc(1, starts=(1, 3)), [0.5, nan], tol) is False  # empty span elsewhere: never
    assert batched_decision(_mc(0), [nan, 0.1], tol) is None  # non-finite loss on a real span
    lm = PreparedExample(0, "language_modeling", [[0, 1, 2]], [1], [3], None)
    assert batched_decision(lm, [0.5], tol) is True
    assert batched_decision(lm, [-0.5], tol) is False
    assert batched_decision(lm, [0.0], tol) is None  # exact logit tie: argmax's first-index rule decides


def test_pack_batches_respects_the_token_budget():
    lengths = [5, 40, 12, 12, 300, 7, 40, 1]
    batches = pack_batches(lengths, token_budget=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    order = [i for b in batches for i in b]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 100 or len(batch) == 1
    assert batches[0] == [4]  # longer than the budget: alone


def test_shared_prefix_stops_before_the_first_scored_token():
    mc = PreparedExample(0, "multiple_choice", [[9, 1, 2, 3, 4], [9, 1, 2, 3, 5, 6]], [4, 4], [5, 6], 0)
    assert shared_prefix_length(mc) == 3  # common prefix 4, but the logit predicting token 4 sits at position 3
    schema = PreparedExample(0, "schema", [[9, 1, 7, 8], [9, 1, 2, 7, 8]], [2, 3], [4, 5], 0)
    assert shared_prefix_length(schema) == 1  # the options differ from position 2, the first span starts at 2
    cut = PreparedExample(0, "multiple_choice", [[4, 5], [6, 5]], [1, 1], [2, 2], 0)
    assert shared_prefix_length(cut) == 0  # truncation left nothing in common


def test_pack_prefix_groups_respects_budget_cache_and_positions():
    prefix = [100, 10, 60, 60, 5]
    continuations = [[5, 9], [3, 3, 3, 3], [20], [2, 2], [50, 1]]
    groups = pack_prefix_groups(prefix, continuations, token_budget=200, max_positions=120)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert [prefix[i] for g in groups for i in g] == sorted(prefix, reverse=True)
    for g in groups:
        if len(g) == 1:
            continue
        longest_p, longest_c = max(prefix[i] for i in g), max(c for i in g for c in continuations[i])
        rows = sum(len(continuations[i]) for i in g)
        assert len(g) * longest_p <= 200 and rows * longest_c <= 200 and longest_p + longest_c <= 120
        assert rows * (longest_p + longest_c) <= 4 * 200


def test_centering_and_core_arithmetic():
    assert centered(0.5, 25) == pytest.approx(1 / 3)
    assert centered(0.25, 25) == pytest.approx(0.0)
    assert centered(1.0, 9.1) == pytest.approx(1.0)
    assert centered(0.5, 9.1) == pytest.approx(0.409 / 0.909)
    assert centered(0.1, 50) == pytest.approx(-0.8)
    assert core_metric({"a": 1 / 3, "b": 0.0, "c": 0.5}) == pytest.approx(5 / 18)
    with pytest.raises(ValueError):
        core_metric({})


def test_write_core_csv_layout(tmp_path):
    result = {"results": {"hellaswag": 0.5, "bigbench_language_identification": 0.25},
              "centered_results": {"hellaswag": 1 / 3, "bigbench_language_identification": centered(0.25, 9.1)},
              "core_metric": (1 / 3 + centered(0.25, 9.1)) / 2}
    write_core_csv(tmp_path / "out" / "base_model_000010.csv", result)
    assert (tmp_path / "out" / "base_model_000010.csv").read_text().splitlines() == [
        "Task                               , Accuracy  , Centered  ",
        "hellaswag                          , 0.500000  , 0.333333  ",
        "bigbench_language_identification   , 0.250000  , 0.174917  ",
        "CORE                               ,           , 0.254125  ",
    ]


# -------------------------------------------------------------------------- trained model, real bundle


def test_batched_and_prefix_decisions_equal_the_reference_on_every_task(trained_model, tokenizer, bundle):
    assert len(bundle.tasks) >= 21
    totals = {"batched": BatchedStats(), "prefix": BatchedStats()}
    for task in bundle.tasks:
        data = prepare_task_data(load_task_data(task), MAX_PER_TASK)
        assert len(data) >= 32, task.label
        reference = evaluate_task(trained_model, tokenizer, task, data, device="cpu", method="reference")
        for method, total in totals.items():
            fast = evaluate_task(trained_model, tokenizer, task, data, device="cpu", method=method, stats=total,
                                 token_budget=4096)
            assert fast == reference, (method, task.label)
    for total in totals.values():
        assert total.forwards < total.examples / 4  # really batched across items
        assert total.rechecked <= 0.05 * total.examples  # near-ties are the exception
    assert totals["prefix"].prefix_shared >= 0.15 * totals["prefix"].examples  # (cut to 256 tokens, most share nothing)


def test_prefix_path_shares_untruncated_prompts_and_decides_like_the_reference(trained_model, tokenizer, bundle):
    """Without the 256-token cut (only the rotary range limits prompts), multiple-choice and schema items run
    their shared prefix once; every decision still equals the one-item-at-a-time reference."""
    saved = trained_model.max_seq_len
    try:
        del trained_model.max_seq_len
        for label in ("hellaswag_zeroshot", "winograd", "openbook_qa"):  # 0-shot: within the 640 rotary positions
            task = task_by_label(bundle, label)
            data = prepare_task_data(load_task_data(task), 12)
            stats = BatchedStats()
            prefix = evaluate_task(trained_model, tokenizer, task, data, device="cpu", stats=stats)
            assert prefix == evaluate_task(trained_model, tokenizer, task, data, device="cpu", method="reference")
            assert stats.prefix_shared >= 0.75 * len(data), (label, stats)
            assert stats.real_tokens < 0.75 * sum(len(s) for ex in prepare_examples(
                tokenizer, task, data, list(range(len(data))), None) for s in ex.sequences)
    finally:
        trained_model.max_seq_len = saved


def test_every_item_deferred_to_the_reference_gives_the_same_decisions(trained_model, tokenizer, bundle):
    task = task_by_label(bundle, "arc_easy")
    data = prepare_task_data(load_task_data(task), MAX_PER_TASK)
    stats = BatchedStats()
    deferred = evaluate_task(trained_model, tokenizer, task, data, device="cpu", tie_tolerance=math.inf, stats=stats)
    assert stats.rechecked == stats.examples == len(data)
    assert deferred == evaluate_task(trained_model, tokenizer, task, data, device="cpu", method="reference")


def test_single_item_reference_api_and_training_mode_restored(trained_model, tokenizer, bundle):
    task = task_by_label(bundle, "piqa")  # 10-shot, "\nAnswer: " delimiter
    data = prepare_task_data(load_task_data(task), MAX_PER_TASK)
    trained_model.train()
    per_item = [int(evaluate_example_reference(trained_model, tokenizer, task, data, idx, "cpu")) for idx in range(6)]
    assert trained_model.training  # evaluation switched to eval mode and back
    assert per_item == evaluate_task(trained_model, tokenizer, task, data, device="cpu", method="reference")[:6]


def test_prefix_scores_equal_full_forward_scores_far_below_the_tolerance(trained_model, tokenizer, bundle):
    """The premise of the near-tie rule for the prefix path: options scored as continuations of a shared,
    cached prefix differ from their full forward by far less than the fp32 tolerance (1e-3)."""
    bos = tokenizer.get_bos_token_id()
    saved = trained_model.max_seq_len
    worst = 0.0
    try:
        del trained_model.max_seq_len
        for label in ("copa", "winogrande", "hellaswag_zeroshot"):
            task = task_by_label(bundle, label)
            data = prepare_task_data(load_task_data(task), 8)
            examples = prepare_examples(tokenizer, task, data, list(range(len(data))), None)
            with evaluation_mode(trained_model):
                for ex in examples:
                    alone = _score_batch(trained_model, ex.sequences, ex.starts, ex.ends, [False] * len(ex.sequences),
                                         bos, "cpu")
                    stats = BatchedStats()
                    # tolerance -inf: every decision comes from the shared-prefix scores themselves
                    evaluate_examples_prefix_shared(trained_model, [ex], bos, "cpu", tie_tolerance=-math.inf,
                                                    stats=stats)
                    assert stats.prefix_shared == 1
                    shared = _prefix_scores(trained_model, ex, bos)
                    finite = [(a, b) for a, b in zip(alone, shared) if not (math.isnan(a) and math.isnan(b))]
                    worst = max([worst] + [abs(a - b) for a, b in finite])
    finally:
        trained_model.max_seq_len = saved
    assert worst < 1e-4, worst


def _prefix_scores(model, ex, pad_id):
    """The per-option scores of one item through the prefix path's own steps: the prefix prefilled (keys and
    values only), each continuation run against a copy of it, states computed at the scored positions only."""
    from model.core_scoring import _padded_batch, _selected_positions, _span_index, _span_scores
    from model.engine import prefill_padded

    p = shared_prefix_length(ex)
    conts = [s[p:] for s in ex.sequences]
    cache = prefill_padded(model, [ex.sequences[0][:p]], pad_id, p + max(map(len, conts)))
    cache = cache.select_rows([0] * len(conts))
    ids = _padded_batch(conts, pad_id, "cpu")
    rows_t, pos_t, bounds = _span_index(ex.starts, ex.ends, [p] * len(conts), "cpu")
    selected, columns = _selected_positions(ex.starts, ex.ends, [p] * len(conts), "cpu")
    hidden = model.hidden_states(ids, kv_cache=cache, positions=selected)
    return _span_scores(model.logits(hidden[rows_t, columns]), ids[rows_t, pos_t + 1], bounds, [False] * len(conts))


def test_selected_positions_line_up_with_the_span_index():
    from model.core_scoring import _selected_positions, _span_index

    starts, ends, offsets = [5, 3, 4], [8, 3, 5], [2, 0, 1]  # the second span is empty
    rows, positions, bounds = _span_index(starts, ends, offsets, "cpu")
    selected, columns = _selected_positions(starts, ends, offsets, "cpu")
    assert selected.tolist() == [[2, 3, 4], [0, 0, 0], [2, 0, 0]]
    assert torch.equal(selected[rows, columns], positions) and bounds == [0, 3, 3, 4]


def test_span_only_scores_equal_full_forward_scores_far_below_the_tolerance(trained_model, tokenizer, bundle):
    """The unshared items of the prefix path (one sequence, or options that share nothing) are scored with the
    last block at their scored positions only: within far less than the fp32 tolerance of the full forward."""
    bos = tokenizer.get_bos_token_id()
    worst = 0.0
    for label in ("hellaswag", "squad"):
        task = task_by_label(bundle, label)
        data = prepare_task_data(load_task_data(task), 12)  # 10-shot: at least 11 items
        examples = [prepare_example(tokenizer, task, data, i, trained_model.max_seq_len) for i in range(6)]
        seqs = [s for ex in examples for s in ex.sequences]
        args = (seqs, [s for ex in examples for s in ex.starts], [e for ex in examples for e in ex.ends],
                [task.task_type == "language_modeling"] * len(seqs), bos, "cpu")
        with evaluation_mode(trained_model):
            full = _score_batch(trained_model, *args)
            span_only = _score_batch(trained_model, *args, span_logits_only=True)
        worst = max([worst] + [abs(a - b) for a, b in zip(full, span_only) if not (math.isnan(a) and math.isnan(b))])
    assert worst < 1e-4, worst


def test_batched_scores_do_not_depend_on_batch_composition_beyond_the_tolerance(trained_model, tokenizer, bundle):
    """The premise of the near-tie rule: a sequence scored among many others differs from the same
    sequence scored with its own item alone by far less than the fp32 tolerance (1e-3)."""
    bos = tokenizer.get_bos_token_id()
    worst = 0.0
    for label in ("hellaswag", "winogrande", "squad"):
        task = task_by_label(bundle, label)
        data = prepare_task_data(load_task_data(task), 12)
        examples = [prepare_example(tokenizer, task, data, i, trained_model.max_seq_len) for i in range(len(data))]
        lm = task.task_type == "language_modeling"

        def scores(group):
            seqs = [s for ex in group for s in ex.sequences]
            return _score_batch(trained_model, seqs, [s for ex in group for s in ex.starts],
                                [e for ex in group for e in ex.ends], [lm] * len(seqs), bos, "cpu")

        with evaluation_mode(trained_model):
            together = scores(examples)
            alone = [v for ex in examples for v in scores([ex])]
        finite = [(a, b) for a, b in zip(together, alone) if not (math.isnan(a) and math.isnan(b))]
        worst = max([worst] + [abs(a - b) for a, b in finite])
    assert worst < 1e-4, worst


def test_two_ranks_equal_one_rank(trained_model, tokenizer, bundle, tmp_path):
    model_path = tmp_path / "model.pt"
    torch.save({"config": trained_model.config.to_dict(), "state": trained_model.state_dict(),
                "max_seq_len": trained_model.max_seq_len}, model_path)
    tokenizer.save(tmp_path / "tokenizer")
    sub_bundle = replace(bundle, tasks=[task_by_label(bundle, label) for label in DIST_TASKS])
    logs = []
    single = evaluate_core(trained_model, tokenizer, sub_bundle, max_per_task=MAX_PER_TASK, device="cpu",
                           log=logs.append)
    assert len(logs) == len(DIST_TASKS) and all("centered" in line for line in logs)
    assert set(single) == {"results", "centered_results", "core_metric", "decisions", "core_tasks", "missing_tasks"}
    assert single["core_tasks"] == f"{len(DIST_TASKS)}/{len(bundle.expected)}"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(model_path), str(tmp_path / "tokenizer"), str(BUNDLE_DIR), ",".join(DIST_TASKS), str(MAX_PER_TASK),
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"core_rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:  # every rank holds the all-reduced result
        assert result["world_size"] == 2
        assert result["decisions"] == single["decisions"]
        assert result["results"] == single["results"]
        assert result["core_metric"] == single["core_metric"]


def test_max_context_option_truncates_like_the_models_max_seq_len(trained_model, tokenizer, bundle):
    """`max_context` (base_eval.max_context) applies the same keep-the-last-tokens rule as a model limit."""
    task = task_by_label(bundle, "piqa")  # 10-shot prompts run far past 128 tokens
    data = prepare_task_data(load_task_data(task), MAX_PER_TASK)
    with_limit = evaluate_task(trained_model, tokenizer, task, data, device="cpu", method="reference")
    saved = trained_model.max_seq_len
    try:
        del trained_model.max_seq_len  # now only the rotary range limits the prompts
        capped = evaluate_task(trained_model, tokenizer, task, data, device="cpu", max_context=saved)
        assert capped == with_limit
        longest = [max(len(s) for ex in prepare_examples(tokenizer, task, data, list(range(len(data))), limit)
                       for s in ex.sequences) for limit in (None, saved)]
        assert longest[0] > saved >= longest[1]  # the cap really cut prompts
    finally:
        trained_model.max_seq_len = saved
