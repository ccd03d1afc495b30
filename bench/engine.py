"""Benchmark: decode throughput of the KV-cache Engine vs naive uncached generation, and their agreement.

Greedy decoding of the same prompt at batch 1 and batch 8 (by default), timed after a warm-up:

- engine: `Engine.generate(prompt, num_samples=B, temperature=0)` (prefill once, then 1-token forwards
  against the KV cache);
- naive:  the algorithm of `GPT.generate` (a full forward over the whole sequence per token), run on B
  rows at once for B > 1.

Prints one JSON object: device, model_config, prompt/decode tokens, per batch size the tokens/s of both and
the speedup, and `decisions_equal` (every greedy token of the engine equals the naive one, all batch sizes).

    python -m bench.engine                                   # smoke-size random model (depth 4, T=128, V=1024)
    python -m bench.engine --depth 8 --max-seq-len 512 --prompt-tokens 256 --decode-tokens 128
    python -m bench.engine --checkpoint-dir ART/checkpoint --tokenizer-dir TOK   # a trained model

The random model's lm_head is re-drawn with std 1 (at init it is ~0, every logit nearly equal, and greedy
ties would be decided by rounding) and its terminal / tool tokens are never chosen, so every run decodes the
full budget and the comparison covers every step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.common import autodetect_device_type
from model.engine import Engine
from model.gpt import GPT, GPTConfig, build_model
from model.sizing import ModelShape
from model.tokenizer import SPECIAL_TOKENS, Tokenizer


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """The 256 bytes plus two-byte tokens up to vocab_size (with the 9 specials): only the ids matter here."""
    letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    pairs = [bytes([a, b]) for a in letters for b in letters]
    n_mergeable = vocab_size - len(SPECIAL_TOKENS)
    if not 256 <= n_mergeable <= 256 + len(pairs):
        low, high = 256 + len(SPECIAL_TOKENS), 256 + len(pairs) + len(SPECIAL_TOKENS)
        raise ValueError(f"--vocab-size must be in [{low}, {high}], got {vocab_size}")
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({pair: 256 + i for i, pair in enumerate(pairs[:n_mergeable - 256])})
    return Tokenizer.from_ranks(ranks)


def random_model(args, tokenizer: Tokenizer, device: torch.device) -> GPT:
    shape = ModelShape.from_depth(args.depth, aspect_ratio=64, head_dim=64, vocab_size=tokenizer.get_vocab_size(),
                                  seq_len=args.max_seq_len, window_pattern=args.window_pattern)
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=shape.vocab_size, n_layer=args.depth,
                       n_head=shape.n_head, n_kv_head=shape.n_kv_head, n_embd=shape.model_dim,
                       window_pattern=args.window_pattern)
    torch.manual_seed(42)
    model = build_model(config, device)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        for name in ("<|bos|>", "<|assistant_end|>", "<|python_start|>"):  # logit 0: far below the max
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def naive_generate(model: GPT, prompt: list[int], batch: int, steps: int) -> list[list[int]]:
    """GPT.generate's algorithm (full forward per token, greedy) on `batch` copies of the prompt."""
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=model.get_device())
    for _ in range(steps):
        next_ids = torch.argmax(model(ids)[:, -1, :], dim=-1, keepdim=True)
        ids = torch.cat((ids, next_ids), dim=1)
    return ids[:, len(prompt):].tolist()


def engine_generate(engine: Engine, prompt: list[int], batch: int, steps: int) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(batch)]
    for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=steps, temperature=0.0):
        for row, token in zip(rows, column):
            row.append(token)
    return rows


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint-dir", help="a trained model (with --tokenizer-dir); default: a random model")
    p.add_argument("--tokenizer-dir")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--device-type", default="")
    args = p.parse_args()
    device = torch.device(args.device_type or autodetect_device_type())

    if args.checkpoint_dir:
        from model.checkpoint import load_model

        if not args.tokenizer_dir:
            p.error("--checkpoint-dir needs --tokenizer-dir")
        tokenizer = Tokenizer.load(args.tokenizer_dir)
        model, _ = load_model(args.checkpoint_dir, device, phase="eval")
    else:
        tokenizer = synthetic_tokenizer(args.vocab_size)
        model = random_model(args, tokenizer, device)
    g = torch.Generator().manual_seed(0)
    n_mergeable = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    prompt = [tokenizer.get_bos_token_id()] + torch.randint(0, n_mergeable, (args.prompt_tokens - 1,),
                                                            generator=g).tolist()
    engine = Engine(model, tokenizer)
    steps = args.decode_tokens

    sweep, equal = [], True
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        engine_generate(engine, prompt, batch, 4)  # warm-up (allocator, kernels)
        naive_generate(model, prompt, batch, 4)
        fast, t_engine = timed(lambda: engine_generate(engine, prompt, batch, steps), device)
        slow, t_naive = timed(lambda: naive_generate(model, prompt, batch, steps), device)
        same = fast == slow and all(len(r) == steps for r in fast)
        if batch == 1:  # and the model's own naive sampler
            same = same and fast[0] == list(model.generate(prompt, steps, temperature=0.0))
        equal = equal and same
        sweep.append({"batch_size": batch, "engine_tok_per_sec": batch * steps / t_engine,
                      "naive_tok_per_sec": batch * steps / t_naive, "speedup": t_naive / t_engine,
                      "decisions_equal": same})
    print(json.dumps({"device": str(device), "model_config": model.config.to_dict(),
                      "prompt_tokens": len(prompt), "decode_tokens": steps, "threads": torch.get_num_threads(),
                      "sweep": sweep, "decisions_equal": equal}, indent=2))


if __name__ == "__main__":
    main()
