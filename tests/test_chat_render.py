"""Tests for the chat rendering in model/chat_render.py.

A small tokenizer (vocab 512) is trained once per module on the start of the first
pretraining shard; training is deterministic, so a few literal ids are pinned too.
"""

import copy
import json
import re

import pytest

from model.data import iter_documents
from model.chat_render import ConversationError, render_conversation, render_for_completion, visualize_tokenization
from model.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer, training_texts

VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def tok(shared_data) -> Tokenizer:
    shard = shared_data / "pretrain" / "shard_00000.parquet"
    return train_tokenizer(training_texts(iter_documents([shard]), max_chars=300_000, doc_cap=10_000), VOCAB_SIZE)


def special(tok, name):
    return tok.encode_special(name)


GOLDEN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute: "},
                {"type": "python", "text": "2+3"},
                {"type": "python_output", "text": "5"},
                {"type": "text", "text": "The answer is 5."},
            ],
        },
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def hand_rendered(tok):
    """GOLDEN assembled piece by piece from encode() and the special ids."""
    pieces = [
        ([special(tok, "<|bos|>")], 0),
        ([special(tok, "<|user_start|>")], 0),
        (tok.encode("Be brief.\n\nWhat is 2+3?"), 0),  # the system message merged into the user's
        ([special(tok, "<|user_end|>")], 0),
        ([special(tok, "<|assistant_start|>")], 0),
        (tok.encode("Let me compute: "), 1),
        ([special(tok, "<|python_start|>")], 1),
        (tok.encode("2+3"), 1),
        ([special(tok, "<|python_end|>")], 1),
        ([special(tok, "<|output_start|>")], 0),
        (tok.encode("5"), 0),
        ([special(tok, "<|output_end|>")], 0),
        (tok.encode("The answer is 5."), 1),
        ([special(tok, "<|assistant_end|>")], 1),
        ([special(tok, "<|user_start|>")], 0),
        (tok.encode("Thanks!"), 0),
        ([special(tok, "<|user_end|>")], 0),
        ([special(tok, "<|assistant_start|>")], 0),
        (tok.encode("You're welcome."), 1),
        ([special(tok, "<|assistant_end|>")], 1),
    ]
    ids = [i for tokens, _ in pieces for i in tokens]
    mask = [m for tokens, m in pieces for _ in tokens]
    return ids, mask


def test_literal_ids_of_the_test_tokenizer(tok):
    # Pinned: the tokenizer trained above is deterministic; a change here means training changed.
    assert tok.get_vocab_size() == 512
    assert [special(tok, t) for t in SPECIAL_TOKENS] == list(range(503, 512))
    assert tok.encode("Hello world! 48/2=24") == [72, 101, 284, 111, 468, 344, 33, 32, 52, 56, 47, 50, 61, 50, 52]


def test_golden_conversation(tok):
    ids, mask = render_conversation(tok, GOLDEN)
    assert (ids, mask) == hand_rendered(tok)
    # Pinned literally for this (deterministically trained) tokenizer.
    assert ids == [
        503, 504, 66, 101, 271, 342, 101, 102, 320, 87, 104, 269, 301, 32, 50, 43, 51, 63, 505, 506, 76, 321,
        464, 500, 311, 101, 58, 32, 508, 50, 43, 51, 509, 510, 53, 511, 440, 282, 115, 119, 264, 301, 32, 53,
        46, 507, 504, 84, 104, 273, 107, 115, 33, 505, 506, 89, 279, 39, 260, 376, 108, 99, 424, 46, 507,
    ]
    assert len(mask) == 65 and sum(mask) == 33
    # What is supervised, read back as text.
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == (
        "Let me compute: <|python_start|>2+3<|python_end|>The answer is 5.<|assistant_end|>"
        "You're welcome.<|assistant_end|>"
    )
    unsupervised = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert unsupervised == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+3?<|user_end|><|assistant_start|>"
        "<|output_start|>5<|output_end|><|user_start|>Thanks!<|user_end|><|assistant_start|>"
    )


def test_masks_on_real_multi_turn_conversations(tok, shared_data):
    """Supervised tokens are exactly the assistant text and every <|assistant_end|>."""
    with open(shared_data / "sft" / "oasst_en_100_trees.jsonl", encoding="utf-8") as f:
        conversations = [json.loads(line) for line in f][:150]
    never = {special(tok, t) for t in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")}
    checked_turns = 0
    for conversation in conversations:
        ids, mask = render_conversation(tok, conversation, max_tokens=10**6)
        assert len(ids) == len(mask)
        assert not any(m and i in never for i, m in zip(ids, mask))
        expected = "".join(m["content"] + "<|assistant_end|>" for m in conversation["messages"] if m["role"] == "assistant")
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == expected
        checked_turns += sum(m["role"] == "assistant" for m in conversation["messages"])
    assert checked_turns > 150  # multi-turn conversations were covered


def test_system_merge_on_a_copy(tok):
    before = copy.deepcopy(GOLDEN)
    merged = copy.deepcopy(GOLDEN)
    merged["messages"] = [{"role": "user", "content": "Be brief.\n\nWhat is 2+3?"}] + merged["messages"][2:]
    assert render_conversation(tok, GOLDEN) == render_conversation(tok, merged)
    assert GOLDEN == before  # the input was not mutated


def test_truncation(tok):
    ids, mask = render_conversation(tok, GOLDEN)
    for max_tokens in (1, 10, 64, 65, 500):
        assert render_conversation(tok, GOLDEN, max_tokens=max_tokens) == (ids[:max_tokens], mask[:max_tokens])
    assert render_conversation(tok, GOLDEN)[0] == ids  # default 2048 keeps this one whole
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 3000}]}
    long_ids, long_mask = render_conversation(tok, long)
    assert len(long_ids) == len(long_mask) == 2048
    with pytest.raises(ValueError, match="max_tokens"):
        render_conversation(tok, GOLDEN, max_tokens=0)


def test_render_for_completion(tok):
    prompt = render_for_completion(tok, GOLDEN)
    assert prompt[-1] == special(tok, "<|assistant_start|>")
    without_last = {"messages": GOLDEN["messages"][:-1]}
    assert prompt == render_conversation(tok, without_last)[0] + [special(tok, "<|assistant_start|>")]
    ids, _ = render_conversation(tok, GOLDEN)
    assert prompt == ids[: len(prompt)]  # a prefix of the training rendering
    single = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert render_for_completion(tok, single) == [503, 504] + tok.encode("Hi") + [505, 506]


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

MALFORMED = [
    ({"msgs": []}, "no 'messages' key"),
    ({"messages": []}, "empty"),
    ({"messages": "hi"}, "must be a list"),
    ({"messages": [USER, USER]}, "message 1: role 'user' where 'assistant'"),
    ({"messages": [ASSISTANT]}, "message 0: role 'assistant' where 'user'"),
    ({"messages": [USER, ASSISTANT, ASSISTANT]}, "message 2: role 'assistant'"),
    ({"messages": [USER, ASSISTANT, {"role": "system", "content": "x"}]}, "message 2: role 'system'"),
    ({"messages": [{"role": "system", "content": "x"}, ASSISTANT]}, "message 1: a system message must be followed"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "message 0: must be a dict with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, r"message 0 \(user\): content must be a string"),
    ({"messages": [USER, ASSISTANT, {"role": "user", "content": 3}]}, r"message 2 \(user\): content must be a string"),
    (
        {"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image", "text": "b"}]}]},
        r"message 1 \(assistant\) part 1: unknown part type 'image'",
    ),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "python", "text": 7}]}]}, "part 0: 'text' must be a string"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, r"message 1 \(assistant\): content must be a string or a list"),
]


@pytest.mark.parametrize("conversation, message", MALFORMED)
def test_malformed_conversations_raise(tok, conversation, message):
    with pytest.raises(ConversationError, match=message):
        render_conversation(tok, conversation)
    with pytest.raises(ConversationError, match=message):
        render_for_completion(tok, conversation)
    assert issubclass(ConversationError, ValueError)


def test_render_for_completion_errors(tok):
    with pytest.raises(ConversationError, match="empty"):
        render_for_completion(tok, {"messages": []})
    with pytest.raises(ConversationError, match="message 0: render_for_completion needs .* assistant"):
        render_for_completion(tok, {"messages": [USER]})
    with pytest.raises(ConversationError, match="message 2: render_for_completion"):
        render_for_completion(tok, {"messages": [USER, ASSISTANT, USER]})
    # A user-only conversation still renders for training: nothing in it is supervised.
    ids, mask = render_conversation(tok, {"messages": [USER]})
    assert ids[0] == 503 and ids[-1] == 505 and not any(mask)


def test_visualize_tokenization(tok):
    ids, mask = render_conversation(tok, GOLDEN)
    shown = visualize_tokenization(tok, ids, mask)
    plain = re.sub(r"\x1b\[\d+m", "", shown)
    assert plain == "|".join(tok.decode([i]) for i in ids)
    assert shown.count("\x1b[92m") == sum(mask) and shown.count("\x1b[91m") == len(mask) - sum(mask)
    with_ids = re.sub(r"\x1b\[\d+m", "", visualize_tokenization(tok, ids, mask, with_token_id=True))
    assert with_ids.startswith("<|bos|>(503)|<|user_start|>(504)|")
    with pytest.raises(ValueError, match="same length"):
        visualize_tokenization(tok, ids, mask[:-1])
