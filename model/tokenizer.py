"""The BPE tokenizer: training with rustbpe, encoding with tiktoken, and its files on disk.

Spec: spec/01-tokenizer.md. Training runs rustbpe's byte-level BPE over regex-split chunks
(GPT-4 style, but digits grouped by at most two); the learned ranks are then handed to a
`tiktoken.Encoding`, which does all encoding and decoding. Nine special tokens are appended
after the mergeable tokens.

Persistence deliberately avoids pickle (the reference pickles the Encoding): a tokenizer
directory holds

- `tokenizer.tiktoken`: tiktoken's own rank format (base64 token bytes, space, rank per line),
- `tokenizer.json`: format version, split pattern, special tokens, vocab size,
- `token_bytes.pt`: int32 byte length of every token (0 for specials), input to bits-per-byte.

Chat rendering (spec/08 §2): `render_conversation` turns a conversation into token ids plus a
training mask, `render_for_completion` into a generation prompt; malformed conversations raise
`ConversationError` naming the message.

The module also holds the tok_eval comparison against GPT-2 / GPT-4 (`evaluate_tokenizer`).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:  # torch is imported where token_bytes are made or read: the orchestrator never pays for it
    import torch

import rustbpe
import tiktoken

# GPT-4's split pattern with digit runs grouped by at most two (`\p{N}{1,2}`, GPT-4 has {1,3}):
# the reference measured the best val_bpb with {1,2} at d12 / 32K vocab.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Order matters: the id of SPECIAL_TOKENS[i] is (number of mergeable tokens) + i.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document / conversation; also the padding token
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",  # generation stops here
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",  # tool output, inserted by the engine, never sampled
    "<|output_end|>",
]

BYTE_TOKENS = 256  # byte-level BPE always starts from the 256 single-byte tokens
FORMAT_VERSION = 1
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"

# Checked after every training run: each line exercises a different part of the split pattern.
SANITY_TEXT = """Hello world! This is a tokenizer sanity check.
Numbers: 0, 7, 42, 1234, 3.14159 and 2025-07-14; phone 555-0199.
Contractions: I'm, you're, we've, they'll, it's, don't, SHE'D.
Symbols: @#$%^&*()[]{}<>|\\/~`+=-_ "quotes" 'single' — … © €
  indented line\twith a tab
CJK: 你好，世界。こんにちは 한국어
Emoji: 🚀🎉 done."""


def _require_special_layout(special_tokens: dict[str, int], n_mergeable: int) -> None:
    """Our tokenizers put exactly SPECIAL_TOKENS right after the mergeable tokens, in order."""
    expected = {token: n_mergeable + i for i, token in enumerate(SPECIAL_TOKENS)}
    if special_tokens != expected:
        raise ValueError(
            f"special tokens {special_tokens} do not follow the layout {expected} "
            f"(SPECIAL_TOKENS in order after {n_mergeable} mergeable tokens)"
        )


class ConversationError(ValueError):
    """A conversation that does not follow the chat format of spec/08 §1."""


CHAT_ROLES = ("system", "user", "assistant")
ASSISTANT_PART_TYPES = ("text", "python", "python_output")


def check_conversation(conversation: object) -> list[tuple[int, str, object]]:
    """Validate a conversation and return its messages as (original index, role, content).

    A leading system message is merged into the first user message (spec/08 §2 step 1); the
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


class Tokenizer:
    """A tiktoken Encoding plus the BOS token; encoding is always *ordinary*.

    Special tokens are never recognised in text (the literal "<|bos|>" encodes to ordinary
    tokens); they only enter a sequence through `prepend` / `append` or `encode_special`.
    """

    def __init__(self, encoding: tiktoken.Encoding, bos_token: str):
        self.encoding = encoding
        self.bos_token = bos_token
        self._special_ids: dict[str, int] = {}  # memo for encode_special (a dict, no lru_cache on self)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Our layout: mergeable tokens 0..n-1, then the nine special tokens."""
        n_mergeable = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n_mergeable)):
            raise ValueError("mergeable ranks must be exactly 0..n-1 (rank == token id)")
        special_tokens = {token: n_mergeable + i for i, token in enumerate(SPECIAL_TOKENS)}
        encoding = tiktoken.Encoding(
            name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        return cls(encoding, bos_token="<|bos|>")

    @classmethod
    def from_pretrained(cls, name: str) -> Tokenizer:
        """A tiktoken built-in ("gpt2", "cl100k_base"); needs the network or tiktoken's cache."""
        return cls(tiktoken.get_encoding(name), bos_token="<|endoftext|>")

    # --- vocabulary ------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self.encoding.special_tokens_set)

    def encode_special(self, text: str) -> int:
        """Id of one special token (KeyError if it is not in the vocabulary)."""
        if text not in self._special_ids:
            self._special_ids[text] = self.encoding.encode_single_token(text)
        return self._special_ids[text]

    def get_bos_token_id(self) -> int:
        return self.encode_special(self.bos_token)

    # --- encode / decode -------------------------------------------------------------------

    def _as_id(self, token: int | str | None) -> int | None:
        if token is None or isinstance(token, int):
            return token
        if isinstance(token, str):
            return self.encode_special(token)
        raise TypeError(f"prepend/append must be an int id or a special-token string, got {type(token)}")

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """str -> list[int]; list[str] -> list[list[int]] (batch-encoded on `num_threads`)."""
        prepend_id, append_id = self._as_id(prepend), self._as_id(append)
        if isinstance(text, str):
            rows, single = [self.encoding.encode_ordinary(text)], True
        elif isinstance(text, list):
            rows, single = self.encoding.encode_ordinary_batch(text, num_threads=num_threads), False
        else:
            raise TypeError(f"encode expects str or list[str], got {type(text)}")
        for row in rows:
            if prepend_id is not None:
                row.insert(0, prepend_id)
            if append_id is not None:
                row.append(append_id)
        return rows[0] if single else rows

    __call__ = encode

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str:
        return self.encoding.decode([token_id])

    # --- chat rendering (spec/08 §2) ----------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; mask 1 marks the tokens the model is trained to produce.

        Supervised: the assistant's text, its python calls with their delimiters, and every
        <|assistant_end|>. Never supervised: <|bos|>, user turns, <|assistant_start|>, tool
        outputs (the engine inserts those, the model never samples them). Both lists are
        truncated to `max_tokens`.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        return self._render(check_conversation(conversation), max_tokens)

    def _render(self, messages: list[tuple[int, str, object]], max_tokens: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], supervised: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        special = self.encode_special
        add(self.get_bos_token_id(), 0)
        for _, role, content in messages:
            if role == "user":
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:  # each part encoded on its own: tokens never merge across parts
                    tokens = self.encode(part["text"])
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

    def render_for_completion(self, conversation: dict) -> list[int]:
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
        ids, _ = self._render(messages[:-1], max_tokens=2048)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids: list[int], mask: list[int], with_token_id: bool = False) -> str:
        """Tokens joined by '|': supervised in green, unsupervised in red, ids in gray (ANSI colours)."""
        if len(ids) != len(mask):
            raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) must have the same length")
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, supervised in zip(ids, mask):
            piece = (green if supervised else red) + self.decode([token_id])
            if with_token_id:
                piece += f"{gray}({token_id})"
            pieces.append(piece + reset)
        return "|".join(pieces)

    # --- persistence -----------------------------------------------------------------------

    def _mergeable_ranks(self) -> dict[bytes, int]:
        """Recover the ranks through tiktoken's public API (rank == id for our layout)."""
        n_mergeable = self.get_vocab_size() - len(SPECIAL_TOKENS)
        _require_special_layout(self._special_token_ids(), n_mergeable)
        return {self.decode_single_token_bytes(i): i for i in range(n_mergeable)}

    def _special_token_ids(self) -> dict[str, int]:
        return {token: self.encode_special(token) for token in self.get_special_tokens()}

    def token_bytes(self) -> torch.Tensor:
        """Raw byte length of every token id, 0 for special tokens (int32, CPU).

        Measured on the raw bytes: ~0.6 % of a 32K vocab are not valid UTF-8 on their own,
        and a decode-to-str round trip would count each as a 3-byte U+FFFD.
        """
        special_ids = set(self._special_token_ids().values())
        lengths = [
            0 if i in special_ids else len(self.decode_single_token_bytes(i))
            for i in range(self.get_vocab_size())
        ]
        import torch

        return torch.tensor(lengths, dtype=torch.int32)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the three tokenizer files, each atomically (temp file + os.replace)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = self._mergeable_ranks()
        rank_lines = b"".join(
            base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
            for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        )
        meta = {
            "format": FORMAT_VERSION,
            "pattern": self.encoding._pat_str,  # tiktoken has no public accessor for it
            "special_tokens": {token: self.encode_special(token) for token in SPECIAL_TOKENS},
            "vocab_size": self.get_vocab_size(),
        }
        import torch

        token_bytes = self.token_bytes()
        _write_atomic(directory / RANKS_FILE, lambda f: f.write(rank_lines))
        _write_atomic(directory / TOKEN_BYTES_FILE, lambda f: torch.save(token_bytes, f))
        # The metadata goes last, so a directory with tokenizer.json has everything else too.
        _write_atomic(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        directory = Path(directory)
        meta = json.loads(_require_file(directory / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory / META_FILE}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        # Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that function caches
        # by path in a temp directory, so a tokenizer re-saved at the same path could read stale.
        ranks: dict[bytes, int] = {}
        for line in _require_file(directory / RANKS_FILE).read_bytes().splitlines():
            if line:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
        tokenizer = cls.from_ranks(ranks, pattern=meta["pattern"])
        if meta["special_tokens"] != tokenizer._special_token_ids():
            raise ValueError(f"{directory / META_FILE}: special tokens do not match {RANKS_FILE}")
        if meta["vocab_size"] != tokenizer.get_vocab_size():
            raise ValueError(
                f"{directory / META_FILE}: vocab_size {meta['vocab_size']} but the files hold "
                f"{tokenizer.get_vocab_size()} tokens"
            )
        return tokenizer


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the tokenizer stage must run first to create it")
    return path


def _write_atomic(path: Path, write: Callable) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_token_bytes(directory: str | os.PathLike, device: str | torch.device = "cpu") -> torch.Tensor:
    import torch

    path = _require_file(Path(directory) / TOKEN_BYTES_FILE)
    return torch.load(path, map_location=device, weights_only=True)


# --- training --------------------------------------------------------------------------------


def training_texts(documents: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Crop each document to `doc_cap` chars; stop after the one that pushes the total past `max_chars`."""
    if max_chars <= 0 or doc_cap <= 0:
        raise ValueError(f"max_chars ({max_chars}) and doc_cap ({doc_cap}) must be positive")
    total = 0
    for document in documents:
        cropped = document[:doc_cap]
        total += len(cropped)
        yield cropped
        if total > max_chars:  # checked after yielding: the crossing document is included
            return


def check_round_trip(tokenizer: Tokenizer, text: str, label: str = "text") -> None:
    decoded = tokenizer.decode(tokenizer.encode(text))
    if decoded != text:
        mismatch = next((i for i, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
        raise RuntimeError(
            f"tokenizer round trip failed on {label!r} at char {mismatch}: "
            f"{text[mismatch:mismatch + 40]!r} came back as {decoded[mismatch:mismatch + 40]!r}"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE to `vocab_size` tokens in total (including the nine specials)."""
    n_mergeable = vocab_size - len(SPECIAL_TOKENS)
    if n_mergeable < BYTE_TOKENS:
        # Checked here: rustbpe panics instead, as a PanicException that is not an Exception.
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} is too small: need at least "
            f"{BYTE_TOKENS + len(SPECIAL_TOKENS)} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_mergeable, pattern=SPLIT_PATTERN)
    # rustbpe stops early when no pair is left to merge (tiny corpora), so the vocabulary can
    # end up smaller than asked for; the Encoding and token_bytes follow the real size.
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    tokenizer = Tokenizer.from_ranks(ranks, pattern=trainer.get_pattern())
    check_round_trip(tokenizer, SANITY_TEXT, label="SANITY_TEXT")
    return tokenizer


# --- evaluation (tok_eval) -------------------------------------------------------------------

# Fixed texts of different kinds (written for this project); the tokenizer stage adds
# `train` / `val` texts taken from the shards.
EVAL_TEXTS = {
    "news": (
        "RIVERTON, Ore. (March 3, 2025) - The Riverton Port Authority said on Monday that it will "
        "reopen the north cargo terminal on April 14, six weeks after a barge collision damaged two "
        "loading cranes. Repairs cost an estimated $4.2 million, of which 60% is covered by insurance. "
        "\"We're grateful for the patience of our shippers,\" said director Ana Molina, adding that "
        "container traffic fell 18% in February. Trucks will be rerouted via Highway 26 until then."
    ),
    "korean": (
        "저희 신문은 1998년에 창간되었으며, 지역 주민의 목소리를 전하는 것을 가장 중요한 사명으로 "
        "삼고 있습니다. 매일 아침 경제, 문화, 교육 소식을 전하며, 독자 여러분의 의견을 소중히 "
        "여깁니다. 기자 40여 명이 시청, 법원, 학교와 시장을 직접 찾아가 취재하고, 온라인판은 하루 "
        "세 번 갱신됩니다. 앞으로도 정확하고 공정한 보도를 위해 노력하겠습니다. 제보와 의견은 "
        "언제든지 편집국으로 보내 주십시오."
    ),
    "code": (
        "def count_pairs(words: dict[tuple[int, ...], int]) -> dict[tuple[int, int], int]:\n"
        "    \"\"\"Weighted counts of adjacent symbol pairs.\"\"\"\n"
        "    counts: dict[tuple[int, int], int] = {}\n"
        "    for word, freq in words.items():\n"
        "        for left, right in zip(word, word[1:]):\n"
        "            counts[(left, right)] = counts.get((left, right), 0) + freq\n"
        "    return counts\n\n\n"
        "best = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))\n"
        "print(f\"merge {best[0]} -> {256 + len(merges)} (count={best[1]})\")\n"
    ),
    "math": (
        "\\begin{theorem}\nFor every integer $n \\ge 1$, $\\sum_{k=1}^{n} (2k-1) = n^2$.\n\\end{theorem}\n"
        "\\begin{proof}\nFor $n = 1$ both sides equal $1$. Assume the claim for $n$; then\n"
        "\\[ \\sum_{k=1}^{n+1} (2k-1) = n^2 + 2(n+1) - 1 = n^2 + 2n + 1 = (n+1)^2, \\]\n"
        "which is the claim for $n+1$. By induction it holds for all $n$.\n\\end{proof}\n"
    ),
    "science": (
        "Mitochondria generate most of a eukaryotic cell's ATP through oxidative phosphorylation. "
        "Electrons from NADH and FADH2 pass along complexes I-IV of the inner membrane, and the "
        "energy released pumps protons into the intermembrane space. The resulting gradient, about "
        "150-200 mV, drives ATP synthase, which phosphorylates ADP at roughly 3 protons per ATP. "
        "Oxygen is the final electron acceptor and is reduced to water."
    ),
}

BASELINES = ["gpt2", "cl100k_base"]
BASELINE_TIMEOUT_S = 20.0

# Results kept for the process: a loader thread that timed out may still hold tiktoken's
# registry lock, so asking again would only wait again. Quick failures are not kept (retryable).
_baseline_cache: dict[str, tuple[tiktoken.Encoding | None, str]] = {}


def load_baseline_encoding(name: str, timeout_s: float = BASELINE_TIMEOUT_S) -> tuple[tiktoken.Encoding | None, str]:
    """(encoding, "") or (None, reason). Never raises and never waits longer than `timeout_s`.

    tiktoken downloads built-in encodings on first use; offline that fails fast, but a hanging
    network would block forever, so the load runs in a daemon thread with a deadline.
    """
    if name in _baseline_cache:
        return _baseline_cache[name]
    outcome: list[tuple[tiktoken.Encoding | None, str]] = []

    def load() -> None:
        try:
            outcome.append((tiktoken.get_encoding(name), ""))
        except Exception as e:  # offline, DNS, HTTP errors, unknown name: all mean "unavailable"
            outcome.append((None, f"{type(e).__name__}: {e}"))

    thread = threading.Thread(target=load, name=f"tiktoken-load-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        _baseline_cache[name] = (None, f"timed out after {timeout_s:.0f} s loading tiktoken {name!r}")
        return _baseline_cache[name]
    if outcome[0][0] is not None:
        _baseline_cache[name] = outcome[0]
    return outcome[0]


def _measure(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], text: str, label: str, who: str) -> dict:
    ids = encode(text)
    if decode(ids) != text:
        raise RuntimeError(f"{who} tokenizer does not round-trip the {label!r} text")
    n_bytes = len(text.encode("utf-8"))
    return {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / len(ids) if ids else 0.0}


def evaluate_tokenizer(tokenizer: Tokenizer, texts: dict[str, str], timeout_s: float = BASELINE_TIMEOUT_S) -> dict:
    """Compression (bytes per token) of ours vs GPT-2 and GPT-4 on each labelled text.

    Returns {label: {"ours": {bytes, tokens, ratio}, "<baseline>": {...}}}, where a baseline
    entry is {available: True, bytes, tokens, ratio, relative_diff_pct, better} or
    {available: False, reason}. relative_diff_pct > 0 means ours needs fewer tokens.
    """
    baselines = {name: load_baseline_encoding(name, timeout_s) for name in BASELINES}
    results: dict[str, dict] = {}
    for label, text in texts.items():
        ours = _measure(tokenizer.encode, tokenizer.decode, text, label, "our")
        row: dict[str, dict] = {"ours": ours}
        for name, (encoding, reason) in baselines.items():
            if encoding is None:
                row[name] = {"available": False, "reason": reason}
                continue
            theirs = _measure(encoding.encode_ordinary, encoding.decode, text, label, name)
            diff = (theirs["tokens"] - ours["tokens"]) / theirs["tokens"] * 100 if theirs["tokens"] else 0.0
            if ours["ratio"] == theirs["ratio"]:
                better = "Tie"
            else:
                better = "ours" if ours["ratio"] > theirs["ratio"] else name
            row[name] = {"available": True, **theirs, "relative_diff_pct": diff, "better": better}
        results[label] = row
    return results


def format_evaluation(results: dict) -> str:
    """The tok_eval comparison tables (one per baseline) as markdown."""
    sections = []
    for name in BASELINES:
        lines = [f"### ours vs {name}", ""]
        lines.append(f"| text | bytes | {name} tokens | {name} ratio | our tokens | our ratio | diff % | better |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for label, row in results.items():
            ours, theirs = row["ours"], row.get(name, {})
            if not theirs.get("available"):
                lines.append(f"| {label} | {ours['bytes']} | n/a | n/a | {ours['tokens']} | {ours['ratio']:.2f} | n/a | n/a |")
                continue
            lines.append(
                f"| {label} | {ours['bytes']} | {theirs['tokens']} | {theirs['ratio']:.2f} | {ours['tokens']} "
                f"| {ours['ratio']:.2f} | {theirs['relative_diff_pct']:+.1f} | {theirs['better']} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)
