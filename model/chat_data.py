"""Chat datasets as Tasks: the task framework and the five chat-eval tasks (docs/evaluation.md#chat-tasks).

A Task is a sliceable list of conversations (docs/evaluation.md#chat-format). Eval tasks also say how
they are scored (`eval_type`, `evaluate`). Their rows come from the hub or from local files, shuffled
with seed 42 (model/chat_datasets.py: the layouts and the order).

The SFT mixture built from these (and from local conversation files) is in model/sft_data.py.
"""

from __future__ import annotations

import operator
import os
import random
import re
from typing import Sequence

import numpy as np

from model.chat_datasets import SHUFFLE_SEED, ShuffledRows, load_rows, load_source_file

# --- Task framework ---------------------------------------------------------------------------


class Task:
    """A lightweight view start:stop:step over a subclass's examples.

    `stop` is clipped to the number of examples (the reference would fail on access instead).
    """

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        start, step = operator.index(start), operator.index(step)
        stop = None if stop is None else operator.index(stop)
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} is a training set, it has no eval_type")

    def num_examples(self) -> int:
        return len(self.rows)  # a task over one dataset keeps it in self.rows

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} is a training set, it cannot evaluate completions")

    def __len__(self) -> int:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {n} examples")
        return self.get_example(self.start + index * self.step)


class TaskSequence(Task):
    """Tasks one after the other (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **slice_kwargs):
        super().__init__(**slice_kwargs)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tasks])

    def num_examples(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> dict:
        t = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.tasks[t][index - int(self.offsets[t])]

    def get_example(self, index: int) -> dict:
        return self._locate(index)


class TaskMixture(TaskSequence):
    """All (task, example) pairs, task by task, shuffled once with random.Random(42).

    Passing a task twice oversamples it. The shuffle runs on the global index list, which
    gives the same permutation as the reference's shuffle of (task, index) pairs (it only
    depends on the length), at a fraction of the memory.
    """

    def __init__(self, tasks: Sequence[Task], **slice_kwargs):
        super().__init__(tasks, **slice_kwargs)
        order = list(range(int(self.offsets[-1])))
        random.Random(SHUFFLE_SEED).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)

    def get_example(self, index: int) -> dict:
        return self._locate(int(self.order[index]))


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice user prompt. "=X" with no space: the prompt's letter token is the
    same token as the bare-letter answer."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return query + "\nRespond only with the letter of the correct answer."


def _mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": answer},
        ],
        "letters": tuple(letters),
    }


class _Categorical(Task):
    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The chosen letter (e.g. the argmax over the allowed letters) equals the gold letter."""
        return completion.strip() == conversation["messages"][-1]["content"]


# --- the eval tasks ---------------------------------------------------------------------------


class ARC(_Categorical):
    def __init__(self, subset: str, split: str = "test", data_dir=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = ShuffledRows(load_rows("ARC", subset, split, data_dir))

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        labels, texts, answer = row["choices"]["label"], row["choices"]["text"], row["answerKey"]
        if answer not in labels:
            raise ValueError(f"ARC {self.subset}/{self.split} example {index}: answerKey {answer!r} not in {labels}")
        return _mc_conversation(row["question"], labels, texts, answer)


class MMLU(_Categorical):
    """cais/mmlu; `path=` a local file of its rows {question, subject, choices, answer} instead,
    of which `split` "train" | "val" is the `held_out_order` part (subset is then only a label)."""

    letters = ("A", "B", "C", "D")

    def __init__(self, subset: str = "all", split: str = "test", data_dir=None, path=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.subset, self.split = subset, split
        if path is not None:
            self.rows = load_source_file("MMLU", path, split, ("question", "subject", "choices", "answer"))
            return
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU subset 'auxiliary_train' only has split 'train'")
        dataset = load_rows("MMLU", subset, split, data_dir)
        indices = None
        if data_dir is not None and subset not in ("all", "auxiliary_train"):  # a subject of the local file
            subjects = dataset["subject"]
            indices = [i for i, s in enumerate(subjects) if s == subset]
            if not indices:
                raise ValueError(f"MMLU subject {subset!r} not found in the local {split} file")
        self.rows = ShuffledRows(dataset, indices)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if "train" in row and isinstance(row["train"], dict):  # hub auxiliary_train nests each row
            row = row["train"]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU example {index}: expected 4 choices, got {len(row['choices'])}")
        conversation = _mc_conversation(row["question"], self.letters, row["choices"], self.letters[row["answer"]])
        conversation["subject"] = row["subject"]
        return conversation


GSM8K_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALCULATOR_RE = re.compile(r"(<<[^>]+>>)")


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after '#### ', commas removed; None without the marker."""
    match = GSM8K_ANSWER_RE.search(text)
    return None if match is None else match.group(1).strip().replace(",", "")


def parse_gsm8k_answer(answer: str) -> list[dict]:
    """A GSM8K answer as assistant parts: each <<expr=result>> becomes a python part (expr,
    split at the LAST '=') and a python_output part (result); the text around them text parts."""
    parts = []
    for piece in _CALCULATOR_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:  # empty text between adjacent spans would render to nothing
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    """openai/gsm8k; `path=` a local file of its rows {question, answer} instead, of which
    `split` "train" | "val" is the `held_out_order` part."""

    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", data_dir=None, path=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if path is not None:
            self.rows = load_source_file("GSM8K", path, split, ("question", "answer"))
            return
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be 'main' or 'socratic', got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.rows = ShuffledRows(load_rows("GSM8K", subset, split, data_dir))

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": parse_gsm8k_answer(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The completion's '#### N' equals the gold one (a completion without it is wrong)."""
        reference = extract_gsm8k_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_gsm8k_answer(completion)
        return predicted is not None and predicted == reference

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))


_CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines heading a HumanEval prompt (blank and comment lines skipped)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith("import ") or stripped.startswith("from "):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_code(completion: str) -> str:
    """Body of the first fenced code block, else the whole completion (both stripped)."""
    match = _CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def humaneval_program(conversation: dict, completion: str) -> str:
    """The program that passes iff the completion solves the problem (docs/evaluation.md#chat-tasks)."""
    imports = extract_imports(conversation["messages"][0]["content"])
    code = extract_code(completion)
    return imports + "\n\n" + code + "\n\n" + conversation["test"] + "\n" + f"check({conversation['entry_point']})"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, data_dir=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.rows = ShuffledRows(load_rows("HumanEval", "openai_humaneval", "test", data_dir))

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from model.execution import execute_code  # sandbox: only needed when scoring

        return bool(execute_code(humaneval_program(conversation, completion)).success)


CHAT_EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")


def chat_eval_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """The chat-eval task of the reference's task table (all on their test split)."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(name, "test", data_dir)
    if name == "MMLU":
        return MMLU("all", "test", data_dir)
    if name == "GSM8K":
        return GSM8K("main", "test", data_dir)
    if name == "HumanEval":
        return HumanEval(data_dir)
    raise ValueError(f"unknown chat eval task {name!r}; choose from {CHAT_EVAL_TASKS}")


def chatcore(accuracies: dict[str, float]) -> dict:
    """Mean baseline-centred accuracy, (acc - b) / (1 - b): over all five tasks (`chatcore`) and
    over the three multiple-choice ones (`chatcore_cat`); None where a needed task is missing."""

    def centred_mean(names: Sequence[str]) -> float | None:
        if any(name not in accuracies for name in names):
            return None
        return sum((accuracies[n] - CHATCORE_BASELINES[n]) / (1 - CHATCORE_BASELINES[n]) for n in names) / len(names)

    return {"chatcore": centred_mean(CHAT_EVAL_TASKS), "chatcore_cat": centred_mean(CATEGORICAL_TASKS)}
