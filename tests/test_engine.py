"""The inference engine (docs/inference.md): KV-cache forward == full forward, engine greedy == naive
GPT.generate token for token (one prompt, replicated samples, ragged batches of prompts), sampling, and
the calculator tool with its forced-token state machine. CPU, fp32, tiny models, single thread.

The parity model is randomly initialised and then perturbed so that every path of the forward matters:
smear, backout, x0 mixing, value-embedding gates, non-zero output projections, and window pattern "SL"
with sequence_len 64 (windows 128 / 64 / 64), decoded past 129 tokens so both windows cut in.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ops import attention as A
from model.common import COMPUTE_DTYPE
from model.engine import Engine, KVCache, prefill_padded, sample_next_token, use_calculator
from model.gpt import GPTConfig, build_model
from model.tokenizer import Tokenizer

pytestmark = [pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="parity tolerances assume fp32 (CPU)"),
              pytest.mark.usefixtures("one_torch_thread")]

TEXTS = ["The", "Once upon a time", "The capital of France is Paris, and the capital of",
         "In 1905 Einstein published four papers that changed physics; the first of them explained"]



@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The real Tokenizer class with the 256 byte tokens as its whole vocabulary (+ the 9 specials)."""
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=2, n_kv_head=1,
                       n_embd=64, window_pattern="SL")
    m = build_model(config, "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():  # c_proj weights are zero at init: make every path matter
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if name == "lm_head.weight" else 0.05))
        m.smear_lambda.fill_(0.7)
        m.backout_lambda.fill_(0.3)
        # no accidental calculator calls: they would (rightly) make the engine differ from naive generate
        m.lm_head.weight[tokenizer.encode_special("<|python_start|>")] = 0.0
    assert m.window_sizes == [128, 64, 64] and m.ve_layers == [0, 2]
    assert all(x.abs().item() > 0.01 for x in m.x0_lambdas)
    return m.eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer)


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, prepend="<|bos|>")


def until_terminal(tokens, engine: Engine) -> list[int]:
    out = []
    for t in tokens:
        if t in engine.terminal:
            break
        out.append(t)
    return out


# ------------------------------------------------------------------------------- KV-cache forward

def test_cached_forward_equals_full_forward(model):
    """Prefill in two chunks, then token by token to 150 positions (both windows active)."""
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, model.config.vocab_size, (2, 150), generator=g)
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache.for_model(model, 2, 150)
        pieces = [model(idx[:, :10], kv_cache=cache), model(idx[:, 10:25], kv_cache=cache)]
        assert cache.get_pos() == 25 and cache.cache_seqlens.tolist() == [25, 25]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(25, 150)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
    assert cache.get_pos() == 150 and cache.prev_embedding.shape == (2, 1, model.config.n_embd)
    # the cached calls leave no state behind: a forward without a cache gives the same bits as before
    with torch.inference_mode():
        assert torch.equal(model(idx), full)


def test_kvcache_prefill_expand_and_errors(model):
    src = KVCache.for_model(model, 1, 8)
    with torch.inference_mode():
        model(torch.arange(5).unsqueeze(0), kv_cache=src)
    dst = KVCache.for_model(model, 3, 20)
    dst.prefill(src)
    assert dst.positions == [5, 5, 5] and dst.cache_seqlens.tolist() == [5, 5, 5]
    for b in range(3):
        assert torch.equal(dst.k_cache[:, b, :5], src.k_cache[:, 0, :5])
        assert torch.equal(dst.v_cache[:, b, :5], src.v_cache[:, 0, :5])
    assert not dst.k_cache[:, :, 5:].any()
    assert dst.prev_embedding.shape == (3, 1, 64) and torch.equal(dst.prev_embedding[2], src.prev_embedding[0])
    with pytest.raises(ValueError, match="empty cache"):
        dst.prefill(src)
    dst.reset()
    assert dst.positions == [0, 0, 0] and dst.prev_embedding is None
    with pytest.raises(ValueError, match="more than"):
        KVCache.for_model(model, 1, 4).prefill(src)
    with pytest.raises(ValueError, match="layers/heads"):
        KVCache(1, 2, 20, 32, 3, "cpu").prefill(src)


def test_padded_prefill_then_fanned_out_continuations_equal_full_forwards(model):
    """What CORE's prefix path does: prompts of different lengths prefilled in one padded forward, each
    row fanned out to several continuations (select_rows), continued together at ragged positions. Every
    continuation's logits equal the full forward of prompt + continuation (smear across the boundary,
    both windows active: prompts run past the 64-token short window)."""
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (90, 7, 131)]
    continuations = [[torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
                     for lengths in ((1, 5, 12), (3,), (8, 2))]
    rows = [(i, c) for i, conts in enumerate(continuations) for c in conts]
    width = max(len(c) for _, c in rows)
    with torch.inference_mode():
        cache = prefill_padded(model, prompts, pad_id=0, capacity=131 + width)
        assert cache.positions == [90, 7, 131] and cache.cache_seqlens.tolist() == [90, 7, 131]
        fanned = cache.select_rows([i for i, _ in rows])
        assert fanned.positions == [90, 90, 90, 7, 131, 131] and fanned.prev_embedding.shape == (6, 1, 64)
        ids = torch.tensor([c + [0] * (width - len(c)) for _, c in rows])
        logits = model.logits(model.hidden_states(ids, kv_cache=fanned))
        for r, (i, c) in enumerate(rows):
            full = model(torch.tensor([prompts[i] + c]))[0, len(prompts[i]):]
            torch.testing.assert_close(logits[r, :len(c)], full, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        prefill_padded(model, prompts, pad_id=0, capacity=100)


class DeviceReads(torch.Tensor):
    """A cache_seqlens that counts the calls which read a tensor's value back to the host (on a GPU: a sync)."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tolist", "item", "__int__", "__index__", "__bool__", "__float__"):
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("ragged", [False, True])
def test_decode_steps_never_read_positions_back_from_the_device(model, ragged):
    """The model keeps the positions on the host (KVCache.positions) and passes them to attention, so a decode
    step reads nothing back from the device (the non-FA3 path used to, twice per layer per token)."""
    g = torch.Generator().manual_seed(4)
    cache = KVCache.for_model(model, 2, 64)
    with torch.inference_mode():
        if ragged:  # rows at different positions, as Engine.generate_prompts makes them
            for row, n in enumerate((9, 5)):
                one = KVCache.for_model(model, 1, n)
                model(torch.randint(0, 200, (1, n), generator=g), kv_cache=one)
                cache.load_row(row, one)
        else:
            model(torch.randint(0, 200, (2, 7), generator=g), kv_cache=cache)
        cache.cache_seqlens = cache.cache_seqlens.as_subclass(DeviceReads)
        DeviceReads.reads.clear()
        for _ in range(5):
            model(torch.randint(0, 200, (2, 1), generator=g), kv_cache=cache)
    assert DeviceReads.reads == []
    assert cache.positions == ([14, 10] if ragged else [12, 12]) and cache.cache_seqlens.tolist() == cache.positions


def test_ragged_kvcache_attention_equals_each_row_alone():
    """Rows at different positions (generate_prompts): each row attends to its own keys and window only."""
    g = torch.Generator().manual_seed(3)
    Hkv, H, D, T_max = 1, 2, 8, 24
    lengths = [3, 11, 6]
    k_rows = [torch.randn(1, n + 2, Hkv, D, generator=g) for n in lengths]
    v_rows = [torch.randn(1, n + 2, Hkv, D, generator=g) for n in lengths]
    q_new = torch.randn(3, 2, H, D, generator=g)
    for left in (-1, 4):
        k_cache = torch.zeros(3, T_max, Hkv, D)
        v_cache = torch.zeros(3, T_max, Hkv, D)
        for b, n in enumerate(lengths):
            k_cache[b, :n], v_cache[b, :n] = k_rows[b][0, :n], v_rows[b][0, :n]
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        k_new = torch.stack([k_rows[b][0, n:n + 2] for b, n in enumerate(lengths)])
        v_new = torch.stack([v_rows[b][0, n:n + 2] for b, n in enumerate(lengths)])
        out = A.flash_attn_with_kvcache(q_new, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                        window_size=(left, 0))
        for b, n in enumerate(lengths):
            kc, vc = torch.zeros(1, T_max, Hkv, D), torch.zeros(1, T_max, Hkv, D)
            kc[0, :n], vc[0, :n] = k_rows[b][0, :n], v_rows[b][0, :n]
            alone = A.flash_attn_with_kvcache(q_new[b:b + 1], kc, vc, k=k_rows[b][:, n:n + 2],
                                              v=v_rows[b][:, n:n + 2],
                                              cache_seqlens=torch.tensor([n], dtype=torch.int32),
                                              window_size=(left, 0))
            torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=0)
            assert torch.equal(k_cache[b, :n + 2], k_rows[b][0])


# ------------------------------------------------------------------------------ engine == naive

def test_generate_prompts_equals_naive_generate_per_prompt(model, engine, tokenizer):
    prompts = [[tokenizer.get_bos_token_id()]] + [prompt(tokenizer, t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts) and max(len(p) for p in prompts) + 60 > 129
    max_tokens = 60  # the longest row ends past position 129: both windows cut in during decode
    batched = engine.generate_prompts(prompts, max_tokens=max_tokens, temperature=0.0)
    for p, got in zip(prompts, batched):
        naive = list(model.generate(p, max_tokens, temperature=0.0))
        assert got == until_terminal(naive, engine)
    assert sum(len(b) for b in batched) > 3 * max_tokens  # most rows ran the whole budget


def test_generate_batch_replicated_rows_equal_naive(model, engine, tokenizer):
    p = prompt(tokenizer, TEXTS[2])
    naive = until_terminal(model.generate(p, 90, temperature=0.0), engine)
    sequences, masks = engine.generate_batch(p, num_samples=3, max_tokens=90, temperature=0.0)
    for seq, mask in zip(sequences, masks):
        assert seq[:len(p)] == p and seq[len(p):] == naive
        assert mask == [0] * len(p) + [1] * len(naive)
    # streaming: one column per step, one token per row, every row sampled
    steps = list(engine.generate(p, num_samples=2, max_tokens=7, temperature=0.0))
    assert [len(c) for c, _ in steps] == [2] * len(steps) and len(steps) <= 7
    assert [c[0] for c, _ in steps] == naive[:len(steps)] and all(m == [1, 1] for _, m in steps)


def test_sampled_generation_is_seeded(engine, tokenizer):
    p = prompt(tokenizer, TEXTS[1])
    a, _ = engine.generate_batch(p, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    b, _ = engine.generate_batch(p, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    c, _ = engine.generate_batch(p, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=8)
    assert a == b and a != c
    assert len({tuple(s) for s in a}) > 1  # rows sample independently


# ------------------------------------------------------------------------------------- sampling

def test_sample_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(sample_next_token(logits, None, temperature=0.0)[:, 0], logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    rng = torch.Generator().manual_seed(1)
    draws = torch.cat([sample_next_token(logits, rng, temperature=5.0, top_k=3) for _ in range(200)], dim=1)
    for row in range(4):
        assert set(draws[row].tolist()) == set(top3[row].tolist())  # all three, and nothing else
    first = sample_next_token(logits, torch.Generator().manual_seed(5), temperature=1.0)
    again = sample_next_token(logits, torch.Generator().manual_seed(5), temperature=1.0)
    assert first.shape == (4, 1) and torch.equal(first, again)
    assert sample_next_token(torch.tensor([[0.0, 50.0, 0.0]]), rng, temperature=1.0).item() == 1
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, rng, temperature=-0.1)


# ----------------------------------------------------------------------------------- calculator

@pytest.mark.parametrize("expr, expected", [
    ("1,000+2*3", 1006), ("(7 - 2) / 2", 2.5), ("2**10", None), ("'strawberry'.count('r')", 3),
    ("__import__('os')", None), ("'x'.count('x') or open('f')", None), ("abc", None), ("5/0", None),
    ("1 +", None), ("[1].count(1)", None),
])
def test_use_calculator_golden(expr, expected):
    assert use_calculator(expr) == expected


def test_use_calculator_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(use_calculator("6*7")))
    thread.start()
    thread.join()
    assert results == [42]


class BigramStandIn:
    """A stand-in language model whose next token is a fixed function of the last token it was fed
    (`transitions`, else `filler`). It honours the model side of the engine's contract: logits for every
    position, and the cache advances by the tokens fed. Used to script a calculator call exactly."""

    def __init__(self, vocab_size: int, transitions: dict[int, int], filler: int):
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.table = torch.full((vocab_size,), filler, dtype=torch.long)
        for src, dst in transitions.items():
            self.table[src] = dst

    def get_device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return torch.nn.functional.one_hot(self.table[idx], self.config.vocab_size).float() * 10.0


def tool_script(tokenizer, expr: str, after_call: str) -> dict[int, int]:
    """assistant_start -> python_start -> expr's tokens -> python_end -> `after_call`;
    output_end -> assistant_end (the model "reads" the tool output and stops)."""
    s = tokenizer.encode_special
    chain = [s("<|assistant_start|>"), s("<|python_start|>"), *tokenizer.encode(expr), s("<|python_end|>")]
    assert len(set(chain)) == len(chain), "a bigram script needs distinct tokens"
    transitions = dict(zip(chain, chain[1:]))
    transitions[chain[-1]] = s(after_call)
    transitions[s("<|output_end|>")] = s("<|assistant_end|>")
    return transitions


def test_tool_round_trip_forces_the_result(tokenizer):
    s = tokenizer.encode_special
    filler = tokenizer.encode("!")[0]
    engine = Engine(BigramStandIn(tokenizer.get_vocab_size(), tool_script(tokenizer, "2+3", "<|bos|>"), filler),
                    tokenizer)
    p = [tokenizer.get_bos_token_id(), s("<|user_start|>"), *tokenizer.encode("2+3?"), s("<|user_end|>"),
         s("<|assistant_start|>")]
    sequences, masks = engine.generate_batch(p, num_samples=2, max_tokens=30, temperature=0.0)
    call = [s("<|python_start|>"), *tokenizer.encode("2+3"), s("<|python_end|>")]
    result = [s("<|output_start|>"), *tokenizer.encode("5"), s("<|output_end|>")]
    for seq, mask in zip(sequences, masks):
        assert seq == p + call + result  # then <|assistant_end|>, excluded
        assert mask == [0] * len(p) + [1] * len(call) + [0] * len(result)
    # streamed: the forced tokens replace what the model sampled; then the model ends on its own
    columns = [c[0] for c, _ in engine.generate(p, max_tokens=30, temperature=0.0)]
    assert columns == call + result + [s("<|assistant_end|>")]


def test_tool_rejected_expression_forces_nothing_and_rows_are_independent(tokenizer):
    s = tokenizer.encode_special
    transitions = tool_script(tokenizer, "import", "<|assistant_end|>")
    transitions[tokenizer.encode("Q")[0]] = s("<|assistant_end|>")
    engine = Engine(BigramStandIn(tokenizer.get_vocab_size(), transitions, tokenizer.encode("!")[0]), tokenizer)
    tool_prompt = [tokenizer.get_bos_token_id(), s("<|assistant_start|>")]
    quiet_prompt = tokenizer.encode("ask Q", prepend="<|bos|>")
    outputs = engine.generate_prompts([tool_prompt, quiet_prompt, tool_prompt], max_tokens=20)
    call = [s("<|python_start|>"), *tokenizer.encode("import"), s("<|python_end|>")]
    assert outputs == [call, [], call]


def test_real_gpt_through_the_tool_path(model, tokenizer):
    """The real GPT, steered (+100 logits) to write a calculator call for its first five decisions: the
    forced result goes through its KV cache, and what it writes afterwards equals naive generation on the
    prompt + call + result."""
    s = tokenizer.encode_special
    call = [s("<|python_start|>"), *tokenizer.encode("2+3"), s("<|python_end|>")]
    result = [s("<|output_start|>"), *tokenizer.encode("5"), s("<|output_end|>")]

    class Steered:
        def __init__(self):
            self.config, self.decisions = model.config, 0

        def get_device(self):
            return model.get_device()

        def forward(self, idx, kv_cache=None):
            logits = model.forward(idx, kv_cache=kv_cache)
            if self.decisions < len(call):
                logits[:, -1, call[self.decisions]] += 100.0
            self.decisions += 1
            return logits

    p = prompt(tokenizer, TEXTS[1])
    engine = Engine(Steered(), tokenizer)
    (seq,), (mask,) = engine.generate_batch(p, num_samples=1, max_tokens=30, temperature=0.0)
    assert seq[len(p):len(p) + len(call) + len(result)] == call + result
    assert mask[len(p):len(p) + len(call) + len(result)] == [1] * len(call) + [0] * len(result)
    rest = seq[len(p) + len(call) + len(result):]
    naive = until_terminal(model.generate(p + call + result, 30 - len(call) - len(result), temperature=0.0),
                           engine)
    assert rest == naive and len(rest) > 0
