"""The options of each stage: one frozen pydantic section per stage, with defaults, bounds and descriptions.

`tasks/config.py` composes them into the run's `SpeedrunConfig` (with the rules across sections and the
training plan) and loads presets and overrides into it. A field's `description` is what an error about it
prints as the fix's hint, and what the README's Configuration section lists.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.chat_data import CHAT_EVAL_TASKS
from model.sft_data import SFT_SOURCES
from tasks.shard_source import DEFAULT_SOURCE

DEFAULT_BUNDLE = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class Section(BaseModel):
    # allow_inf_nan=False: `.inf`/`.nan` from YAML or --set would pass every bound (inf > 0) and ruin a run hours in
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


class DataConfig(Section):
    source: str = Field(DEFAULT_SOURCE, description="shard URL template with {index:05d}, or a directory (path or fsspec URL) of shard_NNNNN.parquet files")
    val_shard: int | None = Field(None, ge=1, description="index of the validation shard; default: 6542 for ClimbMix, the highest index for a directory")
    num_train_shards: int = Field(-1, description="train shards [0, n) to fetch; -1 derives n from the pretrain horizon")
    train_tokens_per_shard: int = Field(39_000_000, gt=0, description="packed training tokens one shard yields (ClimbMix: ~39M); sizes the derived shard count")
    chars_per_shard: int = Field(250_000_000, gt=0, description="characters per shard (ClimbMix: ~250M); sizes the tokenizer's share")
    shard_margin: int = Field(20, ge=0, description="extra train shards beyond the horizon")
    download_workers: int = Field(4, ge=1, le=64, description="parallel shard downloads")
    download_attempts: int = Field(5, ge=1, le=20, description="tries per shard")
    download_timeout_s: float = Field(30.0, gt=0, description="network timeout per request, seconds")

    @field_validator("num_train_shards")
    @classmethod
    def _shard_count(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (derive from the horizon) or a positive shard count")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty; give a URL template with {index:05d} or a directory")
        if "{" in v:
            try:
                v.format(index=0)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"is not a valid template ({e!r}); the only placeholder is {{index}}, e.g. shard_{{index:05d}}.parquet") from None
        return v


class TokenizerConfig(Section):
    vocab_size: int = Field(32768, ge=265, le=2**20, description="total vocab incl. the 9 special tokens (>= 256 + 9)")
    max_chars: int = Field(2_000_000_000, gt=0, description="training stops after this many characters")
    doc_cap: int = Field(10_000, gt=0, description="each document is cropped to this many characters")


class PretrainConfig(Section):
    """Every option of the reference base_train, snake_case, same defaults."""

    run: str = Field("dummy", description="wandb run name; 'dummy' disables wandb")
    device_type: Literal["", "cuda", "cpu", "mps"] = Field("", description="'' inherits runtime.device_type")
    fp8: bool = Field(False, description="FP8 training of eligible Linear layers (CUDA only)")
    fp8_recipe: Literal["tensorwise"] = Field("tensorwise", description="FP8 scaling: tensorwise, the only recipe "
                                              "implemented in ops/fp8.py")
    depth: int = Field(20, ge=1, le=128, description="number of layers: the single complexity dial")
    aspect_ratio: int = Field(64, ge=1, description="model_dim ~ depth x aspect_ratio")
    head_dim: int = Field(128, ge=2, description="target head dimension (even, for RoPE)")
    max_seq_len: int = Field(2048, ge=2, description="context length T")
    window_pattern: str = Field("SSSL", description="sliding-window pattern of S (short) and L (long)")
    num_iterations: int = Field(-1, description="explicit step count (highest precedence); -1 = derive")
    target_flops: float = Field(-1.0, description="derive steps from a FLOP budget; -1 = off")
    target_param_data_ratio: float = Field(12.0, description="derive steps from tokens = ratio x scaling params; -1 = off")
    device_batch_size: int = Field(32, ge=1, description="rows per micro-batch per rank")
    total_batch_size: int = Field(-1, description="tokens per optimizer step; -1 = auto from depth")
    embedding_lr: float = Field(0.3, gt=0)
    unembedding_lr: float = Field(0.008, gt=0)
    weight_decay: float = Field(0.28, ge=0)
    matrix_lr: float = Field(0.02, gt=0)
    scalar_lr: float = Field(0.5, gt=0)
    warmup_steps: int = Field(40, ge=0)
    warmdown_ratio: float = Field(0.65, ge=0, le=1)
    final_lr_frac: float = Field(0.05, ge=0, le=1)
    resume_from_step: int = Field(-1, ge=-1, description="resume from a saved step; the pipeline resumes automatically")
    eval_every: int = Field(250, description="val-bpb period in steps; -1 disables")
    eval_tokens: int = Field(80 * 524_288, gt=0, description="tokens per val-bpb evaluation")
    core_metric_every: int = Field(2000, description="CORE period; -1 disables, 999999 = only at the end")
    core_metric_max_per_task: int = Field(500, description="CORE examples per task; -1 = all")
    sample_every: int = Field(2000, description="sampling period; -1 disables")
    save_every: int = Field(-1, description="checkpoint period; -1 = only the final step")
    model_tag: str | None = Field(None, description="checkpoint name; default d<depth>")

    @field_validator("window_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        v = v.upper()
        if not v or set(v) - {"S", "L"}:
            raise ValueError("must be a non-empty string of S and L, e.g. SSSL or L")
        return v

    @field_validator("head_dim")
    @classmethod
    def _even_head_dim(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (RoPE rotates pairs of dimensions), e.g. 64 or 128")
        return v

    @field_validator("eval_every", "core_metric_every", "sample_every", "save_every")
    @classmethod
    def _period(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (off) or a positive number of steps")
        return v

    @field_validator("total_batch_size", "num_iterations")
    @classmethod
    def _minus_one_or_positive(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (derive) or positive")
        return v

    @field_validator("core_metric_max_per_task")
    @classmethod
    def _max_per_task(cls, v: int) -> int:
        return _check_max_per_task(v)


CORE_MAX_FEWSHOT = 10  # the CORE tasks use up to 10-shot prompts


def _check_max_per_task(v: int) -> int:
    """-1 (all) or enough examples that a 10-shot prompt can draw its shots from the capped list."""
    if v != -1 and v <= CORE_MAX_FEWSHOT:
        raise ValueError(f"must be -1 (all examples) or more than {CORE_MAX_FEWSHOT}: 10-shot tasks draw their "
                         "examples from the capped list")
    return v


class BaseEvalConfig(Section):
    bundle: str = Field(DEFAULT_BUNDLE, description="CORE eval bundle: zip URL, local zip or directory")
    eval: str = Field("core,bpb,sample", description="comma list of core, bpb, sample")
    max_per_task: int = Field(-1, description="CORE examples per task; -1 = all")
    device_batch_size: int = Field(32, ge=1)
    split_tokens: int = Field(40 * 524_288, gt=0, description="tokens per split for bpb")
    allow_missing_tasks: bool = Field(False, description="average CORE over the tasks present instead of failing")
    max_context: int | None = Field(None, ge=16, description="CORE prompts keep their last N tokens; None = the "
                                    "model's own limit (the reference; at speedrun sizes nothing is cut)")

    @field_validator("max_per_task")
    @classmethod
    def _max_per_task(cls, v: int) -> int:
        return _check_max_per_task(v)

    @field_validator("eval")
    @classmethod
    def _modes(cls, v: str) -> str:
        modes = [m.strip() for m in v.split(",") if m.strip()]
        bad = [m for m in modes if m not in ("core", "bpb", "sample")]
        if not modes or bad:
            raise ValueError(f"unknown eval mode(s) {bad or v!r}; use a comma list of core, bpb, sample")
        return ",".join(modes)


class SFTConfig(Section):
    """Options of the reference chat_sft (docs/evaluation.md#sft-inheritance); None inherits from the base checkpoint."""

    data: list[str] | None = Field(None, description="local jsonl/parquet conversation files replacing the default mixture")
    sources: dict[str, str] = Field(default_factory=dict, description="local jsonl/parquet files replacing single "
                                    "sources of the default mixture, in their own row format: {smoltalk|mmlu|gsm8k: path}")
    load_optimizer: bool = True
    num_iterations: int = Field(-1, description="-1 = one pass over the mixture")
    max_seq_len: int | None = Field(None, ge=2)
    device_batch_size: int | None = Field(None, ge=1)
    total_batch_size: int | None = Field(None, ge=1)
    embedding_lr: float | None = Field(None, gt=0)
    unembedding_lr: float | None = Field(None, gt=0)
    matrix_lr: float | None = Field(None, gt=0)
    init_lr_frac: float = Field(0.8, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmdown_ratio: float = Field(0.5, ge=0, le=1)
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    eval_every: int = 200
    eval_tokens: int = Field(40 * 524_288, gt=0)
    chatcore_every: int = 200
    chatcore_max_cat: int = -1
    chatcore_max_sample: int = 24
    chatcore_max_new_tokens: int = Field(512, ge=1, description="generation limit for ChatCORE during SFT")
    mmlu_epochs: int = Field(3, ge=0)
    gsm8k_epochs: int = Field(4, ge=0)
    save_every: int = -1

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(SFT_SOURCES))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown}; fix: replace only {', '.join(SFT_SOURCES)}, "
                             "e.g. --set sft.sources={gsm8k: /path/train.jsonl}")
        return v

    @model_validator(mode="after")
    def _data_or_sources(self) -> "SFTConfig":
        if self.data and self.sources:
            raise ValueError("sft.data replaces the whole SFT mixture, sft.sources single parts of it; "
                             "fix: set only one of them")
        return self


class ChatEvalConfig(Section):
    """Options of the reference chat_eval (docs/evaluation.md#chat-evaluation)."""

    data_dir: str | None = Field(None, description="directory of ARC/MMLU/GSM8K/HumanEval files instead of the hub")
    tasks: str = Field("all", description="'all' or task names joined by |")
    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    num_samples: int = Field(1, ge=1)
    top_k: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    max_problems: int | None = Field(None, ge=1)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: str) -> str:
        if v.strip() == "all":
            return "all"
        names = [n.strip() for n in v.replace(",", "|").split("|") if n.strip()]
        unknown = [n for n in names if n not in CHAT_EVAL_TASKS]
        if unknown or not names:
            close = {n: difflib.get_close_matches(n, CHAT_EVAL_TASKS, n=1) for n in unknown}
            hints = "; ".join(f"{n!r}: did you mean {c[0]!r}?" for n, c in close.items() if c)
            raise ValueError(f"unknown task(s) {unknown or v!r}{' (' + hints + ')' if hints else ''}; use 'all' or "
                             f"names joined by '|' from {', '.join(CHAT_EVAL_TASKS)}")
        return "|".join(dict.fromkeys(names))


class ReportConfig(Section):
    regression: bool = Field(False, description="compare the summary with deployments/baselines and fail on regressions")
    baseline: str | None = Field(None, description="baseline name in deployments/baselines; default: the preset")
    gpu_hour_cost: float = Field(3.0, ge=0, description="$ per GPU-hour for the cost estimate")


def _default_store() -> str:
    return os.environ.get("SPEEDRUN_HOME") or str(Path.home() / ".cache" / "speedrun")


class RuntimeConfig(Section):
    store: str = Field(default_factory=_default_store, description="artifact store root ($SPEEDRUN_HOME or ~/.cache/speedrun)")
    mirror: str | None = Field(None, description="local directory laid out like shared/data (pretrain/, eval_bundle/, sft/, chat_eval/)")
    device_type: Literal["", "cuda", "cpu", "mps"] = Field("", description="'' = autodetect (cuda > mps > cpu)")
    nproc_per_node: int = Field(1, ge=1, le=64, description="torchrun processes per node")
    nnodes: int = Field(1, ge=1, description="nodes one training run spans (README: Multi-node): the flow runs on "
                        "node 0 and starts the others' ranks through the work pool")
    rdzv_endpoint: str | None = Field(None, description="host[:port] of node 0 (where the flow runs) that the other "
                                      "nodes reach for the c10d rendezvous; None = node 0's hostname; no port = a "
                                      "free one picked at each launch")
    node_queues: list[str] | None = Field(None, description="the work queue of each node's worker (pool "
                                          "`speedrun`), node 0 first; None = node-0 .. node-<nnodes-1>")
    node_deployment: str = Field("speedrun/torchrun-node", description="the deployment that runs one node's torchrun")
    rdzv_timeout_s: float = Field(300.0, gt=0, description="how long nodes wait for each other: to start (probe of "
                                  "the shared store), at the rendezvous, and to finish after node 0")
    omp_num_threads: int | None = Field(None, ge=1, description="OMP_NUM_THREADS for torchrun workers; default 1 on GPU")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline")
    flow_timeout_s: float | None = Field(None, gt=0, description="time limit of a whole flow run; past it the "
                                         "running stage is stopped and the run fails. None = twice the plan's "
                                         "expected duration (SpeedrunConfig.expected_duration_s)")
    hang_timeout_s: float = Field(1200.0, gt=0, description="stop a torchrun stage that prints nothing for this "
                                  "long (a NCCL hang); its ranks save a checkpoint if they can")
    stage_timeout_s: float | None = Field(None, gt=0, description="time limit of each torchrun stage; None = 1 h "
                                          "+ 60 s per planned pretraining step, at least 6 h")
    attention: Literal["auto", "fused", "fa3", "fa4", "flex", "sdpa"] = Field(
        "auto", description="attention backend: auto (best available), fused (FA3 or FA4, else fail before any "
                            "stage; record runs), or one by name (ops/attention.py)")

    @model_validator(mode="after")
    def _multinode(self) -> "RuntimeConfig":
        queues = self.work_queues
        if len(queues) < self.nnodes or len(set(queues)) != len(queues):
            raise ValueError(f"runtime.node_queues={queues} must name {self.nnodes} different work queues, one per "
                             f"node (runtime.nnodes={self.nnodes}); fix: --set runtime.node_queues=[node-0,node-1,...]")
        return self

    @property
    def work_queues(self) -> list[str]:
        """Each node's work queue, node 0's first (tasks/nodes.py starts node i's ranks on queue i)."""
        return list(self.node_queues) if self.node_queues is not None else [f"node-{i}" for i in range(self.nnodes)]

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes
