"""tok_eval: compression (bytes per token) of our tokenizer against GPT-2 and GPT-4.

`evaluate_tokenizer` encodes fixed texts of different kinds (plus whatever the tokenizer stage
adds from the shards) with ours and with tiktoken's `gpt2` / `cl100k_base`; a baseline that
cannot be loaded (offline) is reported as unavailable, never an error. `format_evaluation`
renders the comparison tables as markdown.
"""

from __future__ import annotations

import threading
from typing import Callable

import tiktoken

from model.tokenizer import Tokenizer

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
