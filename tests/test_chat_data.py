"""Tests for model/chat_data.py and model/sft_data.py on the real chat data in ../shared/data (chat_eval/, sft/).

The `datasets` cache goes to a temp dir for this module. The hub paths need the network,
which tests do not have: they are covered by what `dataset_source` asks for.
"""

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import chat_data as cd
from model import chat_datasets as cds
from model import sft_data as sd
from model.chat_render import ConversationError


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        yield


@pytest.fixture(scope="module")
def eval_dir(shared_data) -> Path:
    path = shared_data / "chat_eval"
    if not path.is_dir():
        pytest.skip(f"chat eval data not found at {path}")
    return path


@pytest.fixture(scope="module")
def sft_files(shared_data) -> list[Path]:
    files = sorted((shared_data / "sft").glob("*.jsonl"))
    if len(files) != 3:
        pytest.skip(f"expected the 3 SFT jsonl files in {shared_data / 'sft'}")
    return files


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# name -> (file, rows, first question after the seed-42 shuffle, gold answer of that example)
GOLDEN = {
    "ARC-Easy": ("arc/ARC-Easy-test.jsonl", 2376, "A force of 5 N is required to increase the speed of a box", "B"),
    "ARC-Challenge": ("arc/ARC-Challenge-test.jsonl", 1172, "Which weather event is most likely to cause a forest fire?", "B"),
    "MMLU": ("mmlu/test.jsonl", 14042, "Positronium is an atom formed by an electron and a positron", "A"),
    "GSM8K": ("gsm8k/test.jsonl", 1319, "Darrell and Allen's ages are in the ratio of 7:11.", "#### 109"),
    "HumanEval": ("humaneval/HumanEval.jsonl", 164, "\n\ndef below_threshold(l: list, t: int):", None),
}


@pytest.mark.parametrize("name", cd.CHAT_EVAL_TASKS)
def test_eval_task_loads_shuffled(name, eval_dir):
    file, rows, question, answer = GOLDEN[name]
    task = cd.chat_eval_task(name, eval_dir)
    assert len(task) == rows
    first = task[0]
    user, assistant = first["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    # Independently: the seed-42 permutation of numpy picks the raw row.
    raw = read_jsonl(eval_dir / file)
    assert len(raw) == rows
    source = raw[int(np.random.default_rng(42).permutation(rows)[0])]
    if name in ("ARC-Easy", "ARC-Challenge", "MMLU"):
        assert task.eval_type == "categorical"
        assert user["content"].startswith("Multiple Choice question: " + question)
        assert first["letters"] == ("A", "B", "C", "D") and assistant["content"] == answer
        assert source["question"].startswith(question)
    elif name == "GSM8K":
        assert task.eval_type == "generative"
        assert user["content"].startswith(question) and user["content"] == source["question"]
        assert assistant["content"][-1]["type"] == "text" and assistant["content"][-1]["text"].endswith(answer)
    else:
        assert task.eval_type == "generative"
        assert user["content"].startswith(question) and user["content"] == source["prompt"]
        assert first["entry_point"] == "below_threshold" and first["test"] == source["test"]
        assert assistant["content"] == source["prompt"] + "\n" + source["canonical_solution"]


def test_shuffle_matches_datasets_shuffle(eval_dir):
    """Our permutation is the row order of the reference's `Dataset.shuffle(seed=42)`."""
    dataset = cds.load_local_file(eval_dir / "gsm8k" / "test.jsonl")
    theirs = dataset.shuffle(seed=42, keep_in_memory=True)
    ours = cd.GSM8K("main", "test", eval_dir)
    for i in (0, 1, 2, 700, 1318):
        assert ours[i]["messages"][0]["content"] == theirs[i]["question"]


def test_render_mc_exact_text(eval_dir):
    assert cd.render_mc("What is 1+1?", ["A", "B"], ["1", "2"]) == (
        "Multiple Choice question: What is 1+1?\n- 1=A\n- 2=B\n\nRespond only with the letter of the correct answer."
    )
    assert cd.chat_eval_task("ARC-Challenge", eval_dir)[0]["messages"][0]["content"] == (
        "Multiple Choice question: Which weather event is most likely to cause a forest fire?\n"
        "- a flash flood=A\n- a lightning strike=B\n- a tornado=C\n- a hailstorm=D\n\n"
        "Respond only with the letter of the correct answer."
    )
    with pytest.raises(ValueError, match="2 letters for 3 choices"):
        cd.render_mc("q", "AB", ["x", "y", "z"])


def test_mmlu_extras_and_categorical_evaluate(eval_dir):
    task = cd.MMLU("all", "test", eval_dir)
    first = task[0]
    assert first["subject"] == "college_physics"
    assert task.evaluate(first, "A") and task.evaluate(first, " A\n") and not task.evaluate(first, "B")
    physics = cd.MMLU("college_physics", "test", eval_dir)  # a subject of the local file
    assert len(physics) == 102 and all(physics[i]["subject"] == "college_physics" for i in range(len(physics)))


def test_gsm8k_parts_of_a_real_row(eval_dir):
    row = read_jsonl(eval_dir / "gsm8k" / "train.jsonl")[0]
    assert "<<48/2=24>>" in row["answer"]
    assert cd.parse_gsm8k_answer(row["answer"]) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # Split at the LAST '='; no '=' gives an empty output.
    assert cd.parse_gsm8k_answer("x <<a=b=3>>3 y <<7*2>>") == [
        {"type": "text", "text": "x "},
        {"type": "python", "text": "a=b"},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": "3 y "},
        {"type": "python", "text": "7*2"},
        {"type": "python_output", "text": ""},
    ]
    # The same row through the task (it sits at position 5591 of the train shuffle).
    train = cd.GSM8K("main", "train", eval_dir)
    assert len(train) == 7473
    assert train[5591]["messages"][1]["content"] == cd.parse_gsm8k_answer(row["answer"])


def test_gsm8k_evaluate(eval_dir):
    task = cd.GSM8K("main", "test", eval_dir)
    conversation = task[0]
    assert cd.extract_gsm8k_answer(conversation["messages"][1]["content"][-1]["text"]) == "109"
    assert task.evaluate(conversation, "Allen is 99 now, so 109 later.\n#### 109")
    assert task.evaluate(conversation, "#### 109 years")
    assert task.reward(conversation, "#### 109") == 1.0
    assert not task.evaluate(conversation, "The answer is 109")  # no marker
    assert not task.evaluate(conversation, "####109")  # the marker needs its space
    assert not task.evaluate(conversation, "#### 99")
    assert task.reward(conversation, "#### 99") == 0.0
    assert cd.extract_gsm8k_answer("so #### -1,234.5") == "-1234.5"
    assert cd.extract_gsm8k_answer("#### 5 and later #### 6") == "5"


def test_humaneval_program_assembly(eval_dir):
    task = cd.HumanEval(eval_dir)
    problem = next(task[i] for i in range(len(task)) if task[i]["entry_point"] == "has_close_elements")
    prompt = problem["messages"][0]["content"]
    assert cd.extract_imports(prompt) == "from typing import List"
    assert cd.extract_imports("# c\n\nimport os\n  from x import y\ndef f():\n    import z\n") == "import os\nfrom x import y"
    assert cd.extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nand ```\nx\n```") == "def f():\n    return 1"
    assert cd.extract_code("```\nprint(1)\n```") == "print(1)"
    assert cd.extract_code("  def f(): pass  ") == "def f(): pass"
    program = cd.humaneval_program(problem, "```python\nBODY\n```")
    assert program == "from typing import List\n\nBODY\n\n" + problem["test"] + "\ncheck(has_close_elements)"


@pytest.mark.skipif(importlib.util.find_spec("model.execution") is None, reason="model/execution.py not written yet")
def test_humaneval_evaluate_executes(eval_dir):
    task = cd.HumanEval(eval_dir)
    first = task[0]
    solution = first["messages"][1]["content"]  # prompt + canonical solution
    assert task.evaluate(first, "Here you go:\n```python\n" + solution + "\n```\nDone.")
    assert not task.evaluate(first, "```python\ndef below_threshold(l, t):\n    return False\n```")
    # The canonical body without the prompt's imports passes only because they are prepended.
    problem = next(task[i] for i in range(len(task)) if task[i]["entry_point"] == "has_close_elements")
    body = problem["messages"][1]["content"][len(problem["messages"][0]["content"]) + 1:]
    code = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + body
    assert task.evaluate(problem, "```python\n" + code + "\n```")


def test_chatcore_arithmetic():
    accuracies = {"ARC-Easy": 0.5, "ARC-Challenge": 0.4, "MMLU": 0.25, "GSM8K": 0.1, "HumanEval": 0.05}
    result = cd.chatcore(accuracies)
    # (0.25/0.75 + 0.15/0.75 + 0) / 3 and (that sum + 0.1 + 0.05) / 5
    assert result["chatcore_cat"] == pytest.approx((1 / 3 + 0.2 + 0.0) / 3)
    assert result["chatcore"] == pytest.approx((1 / 3 + 0.2 + 0.0 + 0.1 + 0.05) / 5)
    assert cd.chatcore({k: v for k, v in accuracies.items() if k != "HumanEval"}) == {
        "chatcore": None, "chatcore_cat": pytest.approx(0.5333333 / 3)}
    assert cd.chatcore({"GSM8K": 1.0}) == {"chatcore": None, "chatcore_cat": None}
    assert cd.CHATCORE_BASELINES == {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}


def test_unknown_task_and_missing_local_file(eval_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown chat eval task 'Bogus'"):
        cd.chat_eval_task("Bogus", eval_dir)
    with pytest.raises(FileNotFoundError, match="ARC-Easy-train.jsonl not found.*data_dir=None"):
        cd.ARC("ARC-Easy", "train", eval_dir)
    with pytest.raises(FileNotFoundError, match="mmlu/auxiliary_train.jsonl"):
        cd.MMLU("auxiliary_train", "train", eval_dir)


def test_hub_sources():
    assert cds.dataset_source("ARC", "ARC-Challenge", "test", None) == ("hub", "allenai/ai2_arc", "ARC-Challenge", "test")
    assert cds.dataset_source("MMLU", "all", "test", None) == ("hub", "cais/mmlu", "all", "test")
    assert cds.dataset_source("GSM8K", "main", "train", None) == ("hub", "openai/gsm8k", "main", "train")
    assert cds.dataset_source("HumanEval", "openai_humaneval", "test", None) == (
        "hub", "openai/openai_humaneval", "openai_humaneval", "test")
    assert cds.dataset_source("SmolTalk", None, "train", None) == ("hub", "HuggingFaceTB/smol-smoltalk", None, "train")
    assert cds.dataset_source("GSM8K", "main", "test", "/d") == ("local", Path("/d/gsm8k/test.jsonl"))


def test_mmlu_load_is_memoised(eval_dir):
    """The load is converted once per process (its speed: bench/chat_data.py)."""
    task = cd.MMLU("all", "test", eval_dir)
    again = cd.MMLU("all", "test", eval_dir)
    letters = [task[i]["messages"][1]["content"] for i in range(len(task))]
    assert again.rows.dataset is task.rows.dataset  # memoised, not converted again
    assert len(letters) == 14042 and set(letters) == {"A", "B", "C", "D"}


def test_task_slicing(eval_dir):
    full = cd.GSM8K("main", "test", eval_dir)
    view = cd.GSM8K("main", "test", eval_dir, start=10, stop=50, step=3)
    assert len(view) == math.ceil(40 / 3) == 14
    for i in range(14):
        assert view[i] == full[10 + 3 * i]
    assert view[-1] == full[49]
    with pytest.raises(IndexError):
        view[14]
    with pytest.raises(TypeError):
        view[1.0]
    assert [c["messages"][0]["content"] for c in view] == [full[10 + 3 * i]["messages"][0]["content"] for i in range(14)]
    assert len(cd.GSM8K("main", "test", eval_dir, start=1300, stop=5000)) == 19  # stop clipped to the data
    assert len(cd.GSM8K("main", "test", eval_dir, stop=420)) == 420
    for bad in ({"start": -1}, {"step": 0}, {"start": 5, "stop": 4}):
        with pytest.raises(ValueError, match="bad slice"):
            cd.GSM8K("main", "test", eval_dir, **bad)


def test_task_mixture_and_sequence(eval_dir):
    gsm = cd.GSM8K("main", "test", eval_dir, stop=7)
    arc = cd.ARC("ARC-Easy", "test", eval_dir, stop=5)
    mixture = cd.TaskMixture([gsm, arc, gsm])  # gsm twice: oversampled
    assert len(mixture) == 19
    pairs = [(t, i) for t, task in enumerate([gsm, arc, gsm]) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    assert [mixture[k] for k in range(19)] == [[gsm, arc, gsm][t][i] for t, i in pairs]
    sequence = cd.TaskSequence([arc, gsm])
    assert [sequence[k] for k in range(12)] == [arc[i] for i in range(5)] + [gsm[i] for i in range(7)]
    assert len(cd.TaskSequence([arc, gsm], start=3, step=2)) == 5 and cd.TaskSequence([arc, gsm], start=3, step=2)[1] == gsm[0]
    with pytest.raises(NotImplementedError):
        mixture.evaluate(mixture[0], "x")


def test_sft_mixture_local(sft_files):
    counts = {"alpaca_5000.jsonl": 4998, "gsm8k_train.jsonl": 7473, "oasst_en_100_trees.jsonl": 383}
    total = sum(counts.values())
    train, val = sd.sft_mixture("train", sft_files), sd.sft_mixture("val", sft_files)
    assert (len(train), len(val)) == (total - total // 50, total // 50) == (12597, 257)
    train_sources = [train[i]["source"] for i in range(len(train))]
    val_sources = [val[i]["source"] for i in range(len(val))]
    assert not set(train_sources) & set(val_sources)
    assert len(set(train_sources) | set(val_sources)) == total
    for name, count in counts.items():
        assert sum(s.startswith(name + ":") for s in train_sources + val_sources) == count
    # Deterministic: a second build gives the same order; the source names the file line.
    again = sd.sft_mixture("train", sft_files)
    assert [again[i]["source"] for i in range(50)] == train_sources[:50]
    name, line = train_sources[0].split(":")
    with open(next(f for f in sft_files if f.name == name), encoding="utf-8") as f:
        raw = f.readlines()[int(line) - 1]
    assert json.loads(raw)["messages"] == train[0]["messages"]
    with pytest.raises(ValueError, match="split must be"):
        sd.sft_mixture("test", sft_files)


def write_jsonl(path: Path, rows: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for index, text in (extra_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


def test_local_conversation_files_are_validated(tmp_path):
    bad_order = {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}
    path = write_jsonl(tmp_path / "order.jsonl", [GOOD, bad_order], extra_lines={1: ""})  # a blank line 2
    with pytest.raises(ConversationError, match=r"order.jsonl:3: message 1: role 'user'"):
        sd.LocalConversations([path])
    path = write_jsonl(tmp_path / "nomsg.jsonl", [GOOD, GOOD, {"turns": []}])
    with pytest.raises(ConversationError, match="nomsg.jsonl:3: row has no 'messages' key"):
        sd.LocalConversations([path])
    path = write_jsonl(tmp_path / "broken.jsonl", [GOOD], extra_lines={1: '{"messages": [{"role"'})
    with pytest.raises(ConversationError, match="broken.jsonl:2: not valid JSON"):
        sd.LocalConversations([path])
    path = write_jsonl(tmp_path / "short.jsonl", [GOOD, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ConversationError, match="short.jsonl:2: a training conversation needs"):
        sd.LocalConversations([path])
    with pytest.raises(ValueError, match="need at least 2"):
        sd.LocalConversations([write_jsonl(tmp_path / "one.jsonl", [GOOD])])
    with pytest.raises(FileNotFoundError):
        sd.LocalConversations([tmp_path / "absent.jsonl"])


def test_local_parquet_and_mixed_content(tmp_path):
    tools = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": [{"type": "python", "text": "2+2"}, {"type": "text", "text": "4"}]}]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, tools])  # string and list contents side by side
    conversations = [sd.LocalConversations([mixed], split)[0] for split in ("train", "val")]
    assert sorted(c["source"] for c in conversations) == ["mixed.jsonl:1", "mixed.jsonl:2"]
    assert tools["messages"] in [c["messages"] for c in conversations]

    rows = [GOOD["messages"], [{"role": "system", "content": "s"}] + GOOD["messages"], GOOD["messages"][:1]]
    pq.write_table(pa.table({"messages": rows}), tmp_path / "c.parquet")
    with pytest.raises(ConversationError, match="c.parquet:row 3"):
        sd.LocalConversations([tmp_path / "c.parquet"])
    pq.write_table(pa.table({"messages": rows[:2]}), tmp_path / "ok.parquet")
    both = sd.LocalConversations([tmp_path / "ok.parquet", mixed], "train")
    assert len(both) == 3 and {both[i]["source"] for i in range(3)} < {"ok.parquet:row 1", "ok.parquet:row 2",
                                                                       "mixed.jsonl:1", "mixed.jsonl:2"}


def test_sft_mixture_with_every_source_replaced_needs_no_hub(eval_dir, sft_files):
    alpaca = next(f for f in sft_files if f.name == "alpaca_5000.jsonl")
    gsm8k_file, mmlu_file = eval_dir / "gsm8k" / "train.jsonl", eval_dir / "mmlu" / "dev.jsonl"
    sources = {"smoltalk": alpaca, "mmlu": mmlu_file, "gsm8k": str(gsm8k_file)}
    # Held-out tails: max(1, n // 50) of 4998 alpaca, 285 MMLU dev and 7473 GSM8K rows.
    train = sd.sft_mixture("train", mmlu_epochs=1, gsm8k_epochs=2, sources=sources)
    val = sd.sft_mixture("val", mmlu_epochs=1, gsm8k_epochs=2, sources=sources)
    assert [len(t) for t in train.tasks] == [4998 - 99, 285 - 5, 7473 - 149, 7473 - 149]
    assert [len(t) for t in val.tasks] == [99, 5, 149]
    assert len(train) == 4899 + 280 + 2 * 7324 and len(val) == 253
    assert len(sd.sft_mixture("train", mmlu_epochs=0, gsm8k_epochs=4, sources=sources)) == 4899 + 4 * 7324

    # The replaced GSM8K: rendered as the hub rows are; train is the shuffled file's head, val its tail.
    full = cd.GSM8K("main", "train", eval_dir)
    gsm_train, gsm_val = train.tasks[2], val.tasks[2]
    assert train.tasks[3] is gsm_train  # the epochs repeat one task
    assert [gsm_train[i] for i in range(3)] == [full[i] for i in range(3)]
    assert [gsm_val[j] for j in (0, 148)] == [full[7324], full[7472]]
    order_train, order_val = set(gsm_train.rows.order.tolist()), set(gsm_val.rows.order.tolist())
    assert not order_train & order_val and order_train | order_val == set(range(7473))
    assert [p["type"] for p in gsm_train[0]["messages"][1]["content"]][:3] == ["text", "python", "python_output"]
    # The replaced MMLU: the render_mc prompt of the same rows the local chat-eval layout gives.
    dev = cd.MMLU("all", "dev", eval_dir)
    assert [train.tasks[1][i] for i in (0, 279)] == [dev[0], dev[279]] and val.tasks[1][4] == dev[284]
    assert val.tasks[1][0]["messages"][0]["content"].startswith("Multiple Choice question: ")
    # The replaced SmolTalk: the same split as LocalConversations of that file.
    assert val.tasks[0][0] == sd.LocalConversations([alpaca], "val")[0]
    train_sources = {train.tasks[0][i]["source"] for i in range(len(train.tasks[0]))}
    assert not train_sources & {val.tasks[0][i]["source"] for i in range(99)} and len(train_sources) == 4899

    # Every example of the mixture is one of the three kinds: 99 conversations, 5 MC, 149 tool-use.
    kinds = {"mc": 0, "tools": 0, "chat": 0}
    for i in range(len(val)):
        example = val[i]
        kind = "mc" if "letters" in example else "tools" if isinstance(example["messages"][1]["content"], list) else "chat"
        kinds[kind] += 1
    assert kinds == {"mc": 5, "tools": 149, "chat": 99}


def test_sft_sources_bad_input(eval_dir, sft_files, tmp_path):
    gsm8k_file = eval_dir / "gsm8k" / "train.jsonl"
    with pytest.raises(ValueError, match=r"unknown SFT source 'arc'.*fix: replace one of smoltalk, mmlu, gsm8k"):
        sd.sft_mixture("train", sources={"arc": gsm8k_file})
    with pytest.raises(ValueError, match=r"SFT source gsm8k: .*absent.jsonl not found; fix"):
        sd.sft_mixture("val", sources={"gsm8k": tmp_path / "absent.jsonl"})
    with pytest.raises(ValueError, match="give one or the other"):
        sd.sft_mixture("train", sft_files, sources={"gsm8k": gsm8k_file})
    with pytest.raises(ValueError, match=r"MMLU rows need the fields .* missing \['question', 'subject', 'choices'"):
        cd.MMLU(path=sft_files[0], split="train")  # a conversation file is not MMLU rows
    with pytest.raises(ValueError, match="need at least 2"):
        cd.GSM8K(path=write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "#### 1"}]), split="val")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        cd.GSM8K(path=gsm8k_file, split="test")
