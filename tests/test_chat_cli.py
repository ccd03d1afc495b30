"""The chat CLI (docs/inference.md#chat-cli): a tiny model that has memorised two conversations answers through
`python -m model.chat` exactly as trained -- one-shot (-p) and interactive (quit / clear) -- from explicit
directories, an --artifact directory, or the newest SFT artifact in the store; missing inputs exit 2.

The model (depth 2, width 64, tokenizer trained on a real shard) is fitted in-process in a couple of seconds
on the conversations rendered exactly as the CLI renders a turn, and saved with model.checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import chat
from model.checkpoint import save_checkpoint
from model.common import COMPUTE_DTYPE
from model.data import iter_documents
from model.gpt import GPTConfig, build_model
from model.tokenizer import Tokenizer, train_tokenizer, training_texts

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
CONVERSATIONS = {
    "What is the capital of France?": "The capital of France is Paris.",
    "Name a primary color.": "Blue is a primary color.",
}
FRANCE = "What is the capital of France?"

pytestmark = [pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="the fitted model assumes fp32 (CPU)"),
              pytest.mark.usefixtures("one_torch_thread")]



def render_turn(tokenizer: Tokenizer, question: str, answer: str) -> list[int]:
    s = tokenizer.encode_special
    return [tokenizer.get_bos_token_id(), s("<|user_start|>"), *tokenizer.encode(question), s("<|user_end|>"),
            s("<|assistant_start|>"), *tokenizer.encode(answer), s("<|assistant_end|>")]


@pytest.fixture(scope="module")
def model_dirs(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer dir) of a tiny model that has memorised CONVERSATIONS."""
    root = tmp_path_factory.mktemp("chat-model")
    docs = iter_documents(sorted((shared_data / "pretrain").glob("shard_*.parquet"))[:1])
    tokenizer = train_tokenizer(training_texts(docs, max_chars=300_000, doc_cap=10_000), vocab_size=512)
    tokenizer.save(root / "tokenizer")

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=1, n_kv_head=1,
                       n_embd=64, window_pattern="L")
    model = build_model(config, "cpu")
    rows = [render_turn(tokenizer, q, a) for q, a in CONVERSATIONS.items()]
    width = max(len(r) for r in rows)
    x = torch.tensor([r[:-1] + [0] * (width - len(r)) for r in rows])
    y = torch.tensor([r[1:] + [-1] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005:
            break
    assert loss.item() < 0.05, f"the tiny model did not memorise the conversations (loss {loss.item():.3f})"
    save_checkpoint(root / "checkpoint", 30, rank=0, model_state=model.state_dict(),
                    meta={"step": 30, "model_config": config.to_dict()}, optimizer_state={}, loader_state={})
    return root / "checkpoint", root / "tokenizer"


def make_artifact(model_dirs, artifact: Path) -> Path:
    """An sft stage artifact's layout: checkpoint/ + tokenizer/ + manifest.json (written last)."""
    checkpoint, tokenizer = model_dirs
    shutil.copytree(checkpoint, artifact / "checkpoint")
    shutil.copytree(tokenizer, artifact / "tokenizer")
    (artifact / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    return artifact


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.chat", *args], cwd=REPO_ROOT, env=env or ENV, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_one_shot_prompt_prints_the_answer(model_dirs, capsys):
    checkpoint, tokenizer = model_dirs
    args = ["--checkpoint-dir", str(checkpoint), "--tokenizer-dir", str(tokenizer), "--device-type", "cpu"]
    proc = run_cli(*args, "-p", FRANCE, "-t", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == CONVERSATIONS[FRANCE]
    # the same in-process: deterministic across processes; the other question gets the other answer
    assert chat.main([*args, "-p", FRANCE, "-t", "0"]) == 0
    assert capsys.readouterr().out == proc.stdout
    question = "Name a primary color."
    assert chat.main([*args, "-p", question, "-t", "0", "--max-tokens", "40"]) == 0
    assert capsys.readouterr().out.strip() == CONVERSATIONS[question]


def test_interactive_session_with_artifact(model_dirs, tmp_path):
    artifact = make_artifact(model_dirs, tmp_path / "sft-artifact")
    color, france = list(CONVERSATIONS)
    session = f"{color}\n\nclear\n{france}\nquit\nnever read\n"
    proc = run_cli("--artifact", str(artifact), "-t", "0", "--device-type", "cpu", stdin=session)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [part.split("\n")[0].strip() for part in proc.stdout.split("Assistant: ")[1:]]
    assert answers == [CONVERSATIONS[color], CONVERSATIONS[france]]  # the empty line was ignored
    assert "(conversation cleared)" in proc.stdout


def test_default_is_the_newest_sft_artifact_in_the_store(model_dirs, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    older = make_artifact(model_dirs, store / "stages" / "sft" / "older")
    newer = make_artifact(model_dirs, store / "stages" / "sft" / "newer")
    (store / "stages" / "sft" / "incomplete").mkdir()  # no manifest: not an artifact
    now = time.time()
    os.utime(older / "manifest.json", (now - 100, now - 100))
    shutil.rmtree(older / "checkpoint")  # choosing it would fail
    assert chat.find_newest_sft_artifact(store) == newer
    monkeypatch.setenv("SPEEDRUN_HOME", str(store))
    assert chat.main(["-p", FRANCE, "-t", "0", "--device-type", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == CONVERSATIONS[FRANCE]


def test_missing_model_exits_2_naming_the_fix(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEEDRUN_HOME", str(tmp_path / "empty-store"))
    assert chat.main(["-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no complete SFT artifact" in err and "--artifact" in err and "sft stage" in err
    assert chat.main(["--artifact", str(tmp_path / "nowhere"), "-p", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    checkpoint, _ = model_dirs
    assert chat.main(["--checkpoint-dir", str(checkpoint), "-p", "hi"]) == 2
    assert "go together" in capsys.readouterr().err
    assert chat.main(["--checkpoint-dir", str(checkpoint), "--tokenizer-dir", str(tmp_path), "-p", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    # the same through the real entry point
    proc = run_cli("-p", "hi", env={**ENV, "SPEEDRUN_HOME": str(tmp_path / "empty-store")})
    assert proc.returncode == 2 and "Fix:" in proc.stderr and "Traceback" not in proc.stderr
