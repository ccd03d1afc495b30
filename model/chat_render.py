"""Chat rendering (docs/evaluation.md#chat-format): conversations to token ids for SFT and chat evaluation.

`check_conversation` validates a conversation (docs/evaluation.md#chat-format) and merges a leading system message
into the first user message; `render_conversation` turns a conversation into token ids plus a
training mask, `render_for_completion` into a generation prompt. Malformed conversations raise
`ConversationError` naming the message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

class ConversationError(ValueError):
    """A conversation that does not follow the chat format (docs/evaluation.md#chat-format)."""


CHAT_ROLES = ("system", "user", "assistant")
ASSISTANT_PART_TYPES = ("text", "python", "python_output")


def check_conversation(conversation: object) -> list[tuple[int, str, object]]:
    """Validate a conversation and return its messages as (original index, role, content).

    A leading system message is merged into the first user message; the
    merge happens in the returned list only, the input is never modified. The returned
    indices are those of the input, so errors found later can still name the right message.
    """
    if not isinstance(conversation, dict):
        raise ConversationError(f"a conversation must be a dict with a 'messages' list, got {type(conversation).__name__}")
    if "messages" not in conversation:
        raise ConversationError(f"conversation has no 'messages' key (keys: {sorted(conversation)}); expected "
                                "{'messages': [{'role': 'user', 'content': ...}, ...]}")
    messages = conversation["messages"]
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(f"'messages' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ConversationError("'messages' is empty: a conversation needs at least one user message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConversationError(f"message {i}: must be a dict with 'role' and 'content', got {message!r:.120}")
        if message["role"] not in CHAT_ROLES:
            raise ConversationError(f"message {i}: unknown role {message['role']!r} (expected one of {CHAT_ROLES})")

    normalized: list[tuple[int, str, object]] = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
    if normalized[0][1] == "system":
        if not isinstance(normalized[0][2], str):
            raise ConversationError(f"message 0 (system): content must be a string, got {type(normalized[0][2]).__name__}")
        if len(normalized) < 2 or normalized[1][1] != "user":
            raise ConversationError("message 1: a system message must be followed by a user message")
        if not isinstance(normalized[1][2], str):
            raise ConversationError(f"message 1 (user): content must be a string, got {type(normalized[1][2]).__name__}")
        normalized = [(1, "user", normalized[0][2] + "\n\n" + normalized[1][2])] + normalized[2:]

    for position, (index, role, content) in enumerate(normalized):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            hint = " (a system message is only allowed first)" if role == "system" else ""
            raise ConversationError(
                f"message {index}: role {role!r} where {expected!r} was expected; roles must alternate "
                f"user, assistant, user, ... starting with user{hint}"
            )
        if role == "user" and not isinstance(content, str):
            raise ConversationError(f"message {index} (user): content must be a string, got {type(content).__name__}")
        if role == "assistant":
            if isinstance(content, str):
                continue
            if not isinstance(content, (list, tuple)):
                raise ConversationError(
                    f"message {index} (assistant): content must be a string or a list of parts, got {type(content).__name__}"
                )
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ConversationError(
                        f"message {index} (assistant) part {j}: unknown part type {kind!r} "
                        f"(expected a dict with 'type' in {ASSISTANT_PART_TYPES} and a string 'text')"
                    )
                if not isinstance(part.get("text"), str):
                    raise ConversationError(f"message {index} (assistant) part {j}: 'text' must be a string")
    return normalized


def render_conversation(tokenizer: Tokenizer, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; mask 1 marks the tokens the model is trained to produce.

    Supervised: the assistant's text, its python calls with their delimiters, and every
    <|assistant_end|>. Never supervised: <|bos|>, user turns, <|assistant_start|>, tool
    outputs (the engine inserts those, the model never samples them). Both lists are
    truncated to `max_tokens`.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    return _render(tokenizer, check_conversation(conversation), max_tokens)


def _render(tokenizer: Tokenizer, messages: list[tuple[int, str, object]], max_tokens: int) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: int | list[int], supervised: int) -> None:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    special = tokenizer.encode_special
    add(tokenizer.get_bos_token_id(), 0)
    for _, role, content in messages:
        if role == "user":
            add(special("<|user_start|>"), 0)
            add(tokenizer.encode(content), 0)
            add(special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        if isinstance(content, str):
            add(tokenizer.encode(content), 1)
        else:
            for part in content:  # each part encoded on its own: tokens never merge across parts
                tokens = tokenizer.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), 1)
                    add(tokens, 1)
                    add(special("<|python_end|>"), 1)
                else:  # python_output: comes from the tool at inference time
                    add(special("<|output_start|>"), 0)
                    add(tokens, 0)
                    add(special("<|output_end|>"), 0)
        add(special("<|assistant_end|>"), 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer: Tokenizer, conversation: dict) -> list[int]:
    """Prompt ids for generating the last (assistant) message: it is dropped and
    <|assistant_start|> appended. Like the reference, the rest is rendered with the default
    2048-token truncation."""
    messages = check_conversation(conversation)  # the whole conversation must be well formed
    last_index, last_role, _ = messages[-1]
    if last_role != "assistant":
        raise ConversationError(
            f"message {last_index}: render_for_completion needs the conversation to end with an "
            f"assistant message (the one to complete), got {last_role!r}"
        )
    ids, _ = _render(tokenizer, messages[:-1], max_tokens=2048)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def visualize_tokenization(tokenizer: Tokenizer, ids: list[int], mask: list[int], with_token_id: bool = False) -> str:
    """Tokens joined by '|': supervised in green, unsupervised in red, ids in gray (ANSI colours)."""
    if len(ids) != len(mask):
        raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) must have the same length")
    green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
    pieces = []
    for token_id, supervised in zip(ids, mask):
        piece = (green if supervised else red) + tokenizer.decode([token_id])
        if with_token_id:
            piece += f"{gray}({token_id})"
        pieces.append(piece + reset)
    return "|".join(pieces)
