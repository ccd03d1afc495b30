"""Inference engine: KV cache, sampling, the calculator tool and batched generation (docs/inference.md).

The engine is token-level: it takes prompt token ids and streams sampled ids. Text only enters through the
calculator tool, whose state machine runs per row: `<|python_start|> expr <|python_end|>` evaluates `expr`
with `use_calculator` and, when that gives a value, forces `<|output_start|> value <|output_end|>` into
the row (mask 0: forced, not sampled).

- `KVCache`: per-layer key/value tensors plus the per-row positions and the smear state that
  `GPT.forward(..., kv_cache=...)` reads and advances.
- `Engine.generate`: one prompt, `num_samples` rows sampled independently (prefill once at batch 1,
  replicate). Greedy output equals the naive `GPT.generate` token for token.
- `Engine.generate_prompts`: several prompts of different lengths in one batch; every row keeps its own
  position, so each prompt's greedy output equals running it alone.

A library: no progress bars, no printing.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.common import COMPUTE_DTYPE

CALCULATOR_TIMEOUT_S = 3
# What base-model samples complete (pretraining logs, base_eval's summary): one greedy completion each.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
_ARITHMETIC_CHARS = set("0123456789*+-/.() ")
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_FORBIDDEN = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
              "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


# ------------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of every layer, `(n_layers, B, T_max, Hkv, D)` in COMPUTE_DTYPE, zero-initialised.

    `cache_seqlens` (int32, B) is each row's position (tokens held); `positions` is the same on the host,
    so the model never waits on the device to learn it. Rows normally share one position; `load_row` lets
    rows of different prompts sit at different positions. `prev_embedding` (B x 1 x C) is the last
    token's normalised, un-smeared embedding, which the next chunk's first position is smeared with.
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str, dtype: torch.dtype = COMPUTE_DTYPE):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and seq_len >= 1, got {batch_size}, {seq_len}")
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.positions = [0] * batch_size
        self.prev_embedding: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch_size: int, seq_len: int) -> KVCache:
        c = model.config
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, model.get_device())

    @property
    def batch_size(self) -> int:
        return self.k_cache.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.size(2)

    @property
    def uniform(self) -> bool:
        return all(p == self.positions[0] for p in self.positions)

    def get_pos(self) -> int:
        return self.positions[0]

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens: int) -> None:
        self.cache_seqlens += num_tokens
        self.positions = [p + num_tokens for p in self.positions]

    def reset(self) -> None:
        self.cache_seqlens.zero_()
        self.positions = [0] * self.batch_size
        self.prev_embedding = None

    def _check_compatible(self, other: KVCache) -> None:
        mine, theirs = self.k_cache.shape, other.k_cache.shape
        if (mine[0], mine[3], mine[4]) != (theirs[0], theirs[3], theirs[4]):
            raise ValueError(f"KV caches differ in layers/heads/head dim: {tuple(mine)} vs {tuple(theirs)}")
        if not other.uniform:
            raise ValueError("the source cache's rows sit at different positions")
        if other.get_pos() > self.max_seq_len:
            raise ValueError(f"the source holds {other.get_pos()} tokens, more than this cache's {self.max_seq_len}")

    def prefill(self, other: KVCache) -> None:
        """Copy another (e.g. batch-1 prompt) cache into this empty one, broadcasting over the batch."""
        if any(self.positions):
            raise ValueError("prefill needs an empty cache (call reset() first)")
        self._check_compatible(other)
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot broadcast a batch-{other.batch_size} cache to batch {self.batch_size}")
        n = other.get_pos()
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        self.cache_seqlens.fill_(n)
        self.positions = [n] * self.batch_size
        if other.prev_embedding is not None:
            prev = other.prev_embedding
            self.prev_embedding = prev.expand(self.batch_size, *prev.shape[1:]).clone()

    def load_row(self, row: int, other: KVCache) -> None:
        """Put a batch-1 cache into row `row` of this one (at that row's own position, from 0)."""
        self._check_compatible(other)
        if other.batch_size != 1:
            raise ValueError(f"load_row takes a batch-1 cache, got batch {other.batch_size}")
        n = other.get_pos()
        self.k_cache[:, row, :n] = other.k_cache[:, 0, :n]
        self.v_cache[:, row, :n] = other.v_cache[:, 0, :n]
        self.cache_seqlens[row] = n
        self.positions[row] = n
        if other.prev_embedding is not None:
            if self.prev_embedding is None:
                shape = (self.batch_size, *other.prev_embedding.shape[1:])
                self.prev_embedding = other.prev_embedding.new_zeros(shape)
            self.prev_embedding[row] = other.prev_embedding[0]


    def select_rows(self, rows: list[int]) -> KVCache:
        """A new cache whose row i is a copy of row rows[i] of this one (positions and smear state too):
        e.g. one prefilled prompt per item, fanned out to one row per continuation of that item."""
        index = torch.tensor(rows, dtype=torch.long, device=self.k_cache.device)
        out = KVCache.__new__(KVCache)
        out.k_cache = self.k_cache.index_select(1, index)
        out.v_cache = self.v_cache.index_select(1, index)
        out.cache_seqlens = self.cache_seqlens.index_select(0, index)
        out.positions = [self.positions[r] for r in rows]
        out.prev_embedding = None if self.prev_embedding is None else self.prev_embedding.index_select(0, index)
        return out


def prefill_padded(model, prompts: list[list[int]], pad_id: int, capacity: int) -> KVCache:
    """Several prompts of different lengths prefilled in one right-padded forward (no vocabulary
    projection; the last block computes only its keys and values) into a fresh cache with `capacity` slots
    per row; each row is left at its own prompt's length, with the smear state of its own last token, ready
    for `forward(..., kv_cache=...)`.

    Slots past a row's end hold the padding's keys: the next chunk overwrites them, and the per-row
    attention mask never reads past a row's own end. Equal to prefilling each prompt alone up to float
    rounding (the batch shapes differ), which is why Engine.generate_prompts, which promises exact
    greedy tokens, prefills alone, and CORE, which re-checks near-ties, uses this.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    lengths = [len(p) for p in prompts]
    if max(lengths) > capacity:
        raise ValueError(f"a {max(lengths)}-token prompt does not fit a {capacity}-slot cache")
    device = model.get_device()
    cache = KVCache.for_model(model, len(prompts), capacity)
    ids = torch.tensor([p + [pad_id] * (max(lengths) - len(p)) for p in prompts], dtype=torch.long, device=device)
    model.hidden_states(ids, kv_cache=cache, positions=ids.new_empty(len(prompts), 0))  # keys/values only
    cache.cache_seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
    cache.positions = lengths
    last = torch.tensor([[p[-1]] for p in prompts], dtype=torch.long, device=device)
    cache.prev_embedding = model.embed_tokens(last)  # B x 1 x C: what the cached smear continues from
    return cache


# ------------------------------------------------------------------------------------------- sampling

@torch.inference_mode()
def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B x V) -> B x 1. temperature 0 = argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return indices.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


# ----------------------------------------------------------------------------------------- calculator

class _CalculatorTimeout(Exception):
    pass


@contextmanager
def _alarm(seconds: int):
    """SIGALRM after `seconds`; signals can only be handled in the main thread, so elsewhere no timeout."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise _CalculatorTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _evaluate(expr: str):
    try:
        with _alarm(CALCULATOR_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - filtered above, no builtins
    except Exception:  # any error (syntax, zero division, memory, ...) or the timeout means "no result"
        return None


def use_calculator(expr: str):
    """The model's calculator tool (docs/inference.md#calculator-tool): arithmetic, or a string's `.count(...)`; else None."""
    expr = expr.replace(",", "")
    if all(c in _ARITHMETIC_CHARS for c in expr):
        if "**" in expr:  # powers can take forever and eat memory
            return None
        return _evaluate(expr)
    if not all(c in _STRING_CHARS for c in expr):
        return None
    lowered = expr.lower()
    if any(word in lowered for word in _FORBIDDEN):
        return None
    if ".count(" not in expr:
        return None
    return _evaluate(expr)


# ---------------------------------------------------------------------------------------------- engine

@dataclass
class _RowState:
    """Per-row generation state: tokens so far, forced tokens still to emit, the tool's expression."""
    tokens: list[int]
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    completed: bool = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()
        self.terminal = {self.assistant_end, self.bos}

    def _step_row(self, state: _RowState, sampled: int) -> tuple[int, int]:
        """Emit a row's next token (its forced queue first), run the tool state machine; (token, mask)."""
        if state.forced:
            token, mask = state.forced.popleft(), 0
        else:
            token, mask = sampled, 1
        state.tokens.append(token)
        if token in self.terminal:
            state.completed = True
        if token == self.python_start:
            state.in_python, state.python_tokens = True, []
        elif token == self.python_end and state.in_python:
            state.in_python = False
            if state.python_tokens:
                result = use_calculator(self.tokenizer.decode(state.python_tokens))
                if result is not None:
                    state.forced.append(self.output_start)
                    state.forced.extend(self.tokenizer.encode(str(result)))
                    state.forced.append(self.output_end)
            state.python_tokens = []
        elif state.in_python:
            state.python_tokens.append(token)
        return token, mask

    def _device_rng(self, seed: int) -> torch.Generator:
        rng = torch.Generator(device=self.model.get_device())
        rng.manual_seed(seed)
        return rng

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step: one token per row, mask 1 sampled / 0 forced.

        Stops after `max_tokens` steps or once every row has emitted a terminal token (completed rows are
        still fed tokens until then; callers ignore them). With max_tokens=None the cache spans the
        model's sequence_len and generation stops when it is full.
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of int token ids")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.model.get_device()
        rng = self._device_rng(seed)
        if max_tokens is None:
            cache_len = self.model.config.sequence_len
            if len(tokens) >= cache_len:
                raise ValueError(f"the prompt ({len(tokens)} tokens) fills the model's context "
                                 f"({cache_len}); pass max_tokens to generate beyond it")
        else:
            cache_len = len(tokens) + max_tokens
        budget = cache_len - len(tokens)
        if budget <= 0:
            return

        # Prefill once at batch 1, then replicate the prompt's cache into every sample's row.
        prompt_cache = KVCache.for_model(self.model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model.forward(ids, kv_cache=prompt_cache)[:, -1, :]
        logits = logits.expand(num_samples, -1)
        cache = KVCache.for_model(self.model, num_samples, cache_len)
        cache.prefill(prompt_cache)
        del prompt_cache

        rows = [_RowState(list(tokens)) for _ in range(num_samples)]
        for step in range(budget):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = zip(*(self._step_row(row, s) for row, s in zip(rows, sampled)))
            yield list(column), list(masks)
            if step + 1 == budget or all(row.completed for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming generate: per row the prompt + its tokens up to (excluding) its first terminal
        token, and the aligned masks (prompt positions 0)."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if completed[i]:
                    continue
                if token in self.terminal:
                    completed[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return sequences, masks

    @torch.inference_mode()
    def generate_prompts(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                         top_k: int | None = None, seed: int = 42) -> list[list[int]]:
        """Generate for several prompts at once, one row each, every row at its own position.

        Returns per prompt the generated tokens (forced tool tokens included) up to, excluding, its
        first terminal token, at most `max_tokens`. Each prompt is prefilled alone (exact, no padding)
        into its row; the decode steps then run the whole batch, attention masked per row.
        """
        if not prompts or any(not isinstance(p, list) or not p for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        device = self.model.get_device()
        rng = self._device_rng(seed)
        cache = KVCache.for_model(self.model, len(prompts), max(len(p) for p in prompts) + max_tokens)
        last_logits = []
        for row, prompt in enumerate(prompts):
            prompt_cache = KVCache.for_model(self.model, 1, len(prompt))
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            last_logits.append(self.model.forward(ids, kv_cache=prompt_cache)[:, -1, :])
            cache.load_row(row, prompt_cache)
        logits = torch.cat(last_logits, dim=0)

        rows = [_RowState(list(p)) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column = []
            for i, (row, s) in enumerate(zip(rows, sampled)):
                was_completed = row.completed
                token, _ = self._step_row(row, s)
                column.append(token)
                if not was_completed and not row.completed:
                    outputs[i].append(token)
            if step + 1 == max_tokens or all(row.completed for row in rows):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=cache)[:, -1, :]
        return outputs
