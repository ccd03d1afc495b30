"""Worker for tests/test_core_eval.py: CORE under torchrun (gloo on CPU), each rank writing what it got.

    torchrun --standalone --nproc_per_node=2 tests/core_eval_dist_worker.py \
        MODEL_PT TOKENIZER_DIR BUNDLE_DIR TASK[,TASK...] MAX_PER_TASK OUT_DIR

MODEL_PT holds {"config", "state", "max_seq_len"} of the tiny test model. Every rank evaluates its share
of each task's items and all-reduces, so OUT_DIR/core_rank{r}.json must hold the same full result on
every rank, equal to a single process's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.core_eval import evaluate_core  # noqa: E402
from model.eval_bundle import load_bundle  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402


def load_tiny_model(path: str) -> GPT:
    saved = torch.load(path, weights_only=True)
    with torch.device("meta"):
        model = GPT(GPTConfig(**saved["config"]))
    model.to_empty(device="cpu")
    model.init_weights()  # rotary tables (not in the state dict)
    model.load_state_dict(saved["state"])
    model.max_seq_len = saved["max_seq_len"]
    return model


def main(model_pt: str, tokenizer_dir: str, bundle_dir: str, labels: str, max_per_task: str, out_dir: str) -> None:
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_tiny_model(model_pt)
    tokenizer = Tokenizer.load(tokenizer_dir)
    bundle = load_bundle(bundle_dir, allow_missing=True)
    by_label = {task.label: task for task in bundle.tasks}
    bundle = replace(bundle, tasks=[by_label[label] for label in labels.split(",")])
    result = evaluate_core(model, tokenizer, bundle, max_per_task=int(max_per_task), device="cpu",
                           rank=rank, world_size=world, log=lambda line: print(line, flush=True))
    result["world_size"] = world
    (Path(out_dir) / f"core_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
