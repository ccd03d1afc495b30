"""Chat with a trained model in the terminal (docs/inference.md#chat-cli).

    python -m model.chat                                  # newest SFT artifact in the store, interactive
    python -m model.chat -p "Why is the sky blue?"        # one answer, then exit
    python -m model.chat --artifact DIR                   # DIR/checkpoint/ + DIR/tokenizer/ (an sft artifact)
    python -m model.chat --checkpoint-dir DIR --tokenizer-dir DIR   # any checkpoint, e.g. a base model

The store is `--store`, else $SPEEDRUN_HOME, else ~/.cache/speedrun; SFT artifacts live at
`<store>/stages/sft/<key>/` and are complete once their manifest.json exists (the newest manifest wins).
Interactive commands: `quit` / `exit` end the session, `clear` starts a new conversation.
Exit status: 0 on success, 2 when the model or tokenizer cannot be found (the message names the fix).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MAX_RESPONSE_TOKENS = 256
EXIT_USAGE = 2


class ChatSetupError(Exception):
    """The model or tokenizer to chat with cannot be found or does not fit together."""


def default_store() -> Path:
    # Same rule as tasks/config.py (model/ never imports tasks/, which pulls in prefect).
    return Path(os.environ.get("SPEEDRUN_HOME") or Path.home() / ".cache" / "speedrun").expanduser()


def find_newest_sft_artifact(store: Path) -> Path:
    """The complete SFT artifact (manifest.json present) whose manifest is newest, or ChatSetupError."""
    stage_dir = Path(store) / "stages" / "sft"
    manifests = sorted((p for p in stage_dir.glob("*/manifest.json") if p.is_file() and "." not in p.parent.name),
                       key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise ChatSetupError(
            f"no complete SFT artifact under {stage_dir}. Fix: run the pipeline through the sft stage "
            "(python -m flows.speedrun --preset ...), point --store (or $SPEEDRUN_HOME) at the store that has "
            "one, or pass --artifact DIR or --checkpoint-dir DIR --tokenizer-dir DIR")
    return manifests[-1].parent


def resolve_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer dir) from the command line: explicit dirs, --artifact, or the store."""
    if args.checkpoint_dir or args.tokenizer_dir:
        if not (args.checkpoint_dir and args.tokenizer_dir):
            raise ChatSetupError("--checkpoint-dir and --tokenizer-dir go together. Fix: pass both "
                                 "(or --artifact DIR for an sft artifact)")
        if args.artifact:
            raise ChatSetupError("pass either --artifact or --checkpoint-dir/--tokenizer-dir, not both")
        checkpoint_dir, tokenizer_dir = Path(args.checkpoint_dir), Path(args.tokenizer_dir)
    else:
        artifact = Path(args.artifact) if args.artifact else find_newest_sft_artifact(
            Path(args.store) if args.store else default_store())
        if not artifact.is_dir():
            raise ChatSetupError(f"artifact directory {artifact} does not exist. Fix: pass an sft stage artifact "
                                 "(a directory holding checkpoint/ and tokenizer/)")
        checkpoint_dir, tokenizer_dir = artifact / "checkpoint", artifact / "tokenizer"
    if not checkpoint_dir.is_dir() or not any(checkpoint_dir.glob("model_*.pt")):
        raise ChatSetupError(f"no model_NNNNNN.pt in {checkpoint_dir}. Fix: point at an artifact's checkpoint/ "
                             "directory (or a training run's checkpoints/)")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ChatSetupError(f"no tokenizer.json in {tokenizer_dir}. Fix: point --tokenizer-dir at the tokenizer "
                             "stage's artifact (the one the model was trained with)")
    return checkpoint_dir, tokenizer_dir


class TextStream:
    """Prints tokens as text while they arrive, holding back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.tokens)
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


class ChatSession:
    """The conversation as tokens: [<|bos|>] then user/assistant turns."""

    def __init__(self, engine, tokenizer, temperature: float, top_k: int | None, max_tokens: int, seed: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        special = tokenizer.encode_special
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def respond(self, text: str, out) -> str:
        """Add a user turn, stream the assistant's answer to `out`, return it as text."""
        self.tokens += [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start]
        stream = TextStream(self.tokenizer, out)
        response: list[int] = []
        for column, _ in self.engine.generate(self.tokens, num_samples=1, max_tokens=self.max_tokens,
                                              temperature=self.temperature, top_k=self.top_k, seed=self.seed):
            token = column[0]
            response.append(token)
            if token in self.engine.terminal:
                break
            stream.add(token)
        stream.finish()
        if not response or response[-1] != self.assistant_end:  # stopped on the limit (or <|bos|>)
            if response and response[-1] in self.engine.terminal:
                response[-1] = self.assistant_end
            else:
                response.append(self.assistant_end)
        self.tokens += response
        return self.tokenizer.decode(stream.tokens)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.chat", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", help="an sft stage artifact: DIR/checkpoint/ and DIR/tokenizer/ "
                                      "(default: the newest SFT artifact in the store)")
    p.add_argument("--store", help="artifact store root (default $SPEEDRUN_HOME or ~/.cache/speedrun)")
    p.add_argument("--checkpoint-dir", help="a directory of model_NNNNNN.pt + meta_NNNNNN.json (with --tokenizer-dir)")
    p.add_argument("--tokenizer-dir", help="the tokenizer directory the model was trained with")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=MAX_RESPONSE_TOKENS, help="per answer")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("--attention", default="auto", choices=("auto", "fused", "fa3", "fa4", "flex", "sdpa"),
                   help="attention backend (default: the best available; said on stderr)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return args


def load_session(args: argparse.Namespace) -> ChatSession:
    import torch

    from model.checkpoint import load_model
    from model.common import autodetect_device_type, setup_attention
    from model.engine import Engine
    from model.tokenizer import Tokenizer

    checkpoint_dir, tokenizer_dir = resolve_dirs(args)
    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    setup_attention(args.attention, device_type, say=lambda line: print(line, file=sys.stderr))
    tokenizer = Tokenizer.load(tokenizer_dir)
    model, meta = load_model(checkpoint_dir, device, step=args.step, phase="eval")
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise ChatSetupError(f"the model's vocab_size ({model.config.vocab_size}) differs from the tokenizer's "
                             f"({tokenizer.get_vocab_size()}) in {tokenizer_dir}. Fix: use the tokenizer the model "
                             "was trained with")
    return ChatSession(Engine(model, tokenizer), tokenizer, args.temperature, args.top_k, args.max_tokens, args.seed)


def interactive(session: ChatSession) -> None:
    print("Chat with the model. 'clear' starts a new conversation, 'quit' or 'exit' ends.")
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            session.clear()
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("\nAssistant: ", end="", flush=True)
        session.respond(text, sys.stdout)
        print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        session = load_session(args)
    except ChatSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.prompt:
        session.respond(args.prompt, sys.stdout)
        print()
        return 0
    interactive(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
