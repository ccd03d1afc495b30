"""The BPE tokenizer: training with rustbpe, encoding with tiktoken, and its files on disk.

Docs: docs/model.md#tokenizer. Training runs rustbpe's byte-level BPE over regex-split chunks
(GPT-4 style, but digits grouped by at most two); the learned ranks are then handed to a
`tiktoken.Encoding`, which does all encoding and decoding. Nine special tokens are appended
after the mergeable tokens.

Persistence deliberately avoids pickle (the reference pickles the Encoding): a tokenizer
directory holds

- `tokenizer.tiktoken`: tiktoken's own rank format (base64 token bytes, space, rank per line),
- `tokenizer.json`: format version, split pattern, special tokens, vocab size,
- `token_bytes.pt`: int32 byte length of every token (0 for specials), input to bits-per-byte.

Chat rendering lives in model/chat_render.py, the tok_eval comparison in model/tok_eval.py.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:  # torch is imported where token_bytes are made or read: the orchestrator never pays for it
    import torch

import rustbpe
import tiktoken

from model.files import atomic_write

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
        """Write the three tokenizer files, each atomically (model/files.py atomic_write)."""
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
        atomic_write(directory / RANKS_FILE, lambda f: f.write(rank_lines))
        atomic_write(directory / TOKEN_BYTES_FILE, lambda f: torch.save(token_bytes, f))
        # The metadata goes last, so a directory with tokenizer.json has everything else too.
        atomic_write(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))

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
