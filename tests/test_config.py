"""Tests for the run configuration (tasks/config.py) and the depth sizing arithmetic (model/sizing.py).

Golden numbers come from docs/model.md: the sizing table, the windows, the parameter and FLOP
accounting and the training plan with its worked d24 example. Nothing here
touches the network: the ClimbMix template source resolves without listing it, and mirror runs
use the real ../shared/data directory (skipped, saying why, where it is absent).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from model.sizing import (
    ModelShape,
    PlanError,
    plan_training,
    short_window,
    value_embedding_layers,
    window_sizes,
)
from tasks.config_sections import PretrainConfig
from tasks.config import (
    ConfigError,
    SpeedrunConfig,
    build_config,
    list_presets,
    load_config,
    parse_set,
    resolve_config,
    validate_config,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIRROR_SHARDS = DATA_DIR / "pretrain"
needs_mirror = pytest.mark.skipif(
    not MIRROR_SHARDS.is_dir() or not any(MIRROR_SHARDS.glob("shard_*.parquet")),
    reason=f"shared data mirror not found at {DATA_DIR} (needs pretrain/shard_*.parquet)",
)


@pytest.fixture
def store(tmp_path) -> str:
    return str(tmp_path / "store")


# ---------------------------------------------------------------------------------------------
# 1. sizing golden values (docs/model.md#sizes-from-depth)

SIZING_TABLE = {
    # depth: (model_dim, heads, VE layers, total params, scaling params, FLOPs/token (table, 4 s.f.))
    12: (768, 6, 6, 286_261_730, 110_100_912, 7.597e8),
    16: (1024, 8, 8, 536_871_738, 234_881_792, 1.585e9),
    20: (1280, 10, 10, 896_533_746, 435_160_240, 2.886e9),
    24: (1536, 12, 12, 1_384_122_122, 729_810_624, 4.775e9),
    26: (1664, 13, 13, 1_681_786_938, 918_423_532, 5.991e9),
}


@pytest.mark.parametrize("depth", sorted(SIZING_TABLE))
def test_sizing_table(depth):
    dim, heads, n_ve, total, scaling, flops = SIZING_TABLE[depth]
    shape = ModelShape.from_depth(depth, vocab_size=32768, seq_len=2048, window_pattern="SSSL")
    assert shape.model_dim == dim
    assert shape.n_head == heads == shape.n_kv_head
    assert shape.head_dim == 128
    assert len(value_embedding_layers(depth)) == n_ve
    counts = shape.param_counts()
    assert counts["total"] == total
    assert shape.scaling_params() == scaling
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["scalars"] == 2 * depth + 26
    assert shape.flops_per_token() == pytest.approx(flops, rel=6e-4)


def test_flops_per_token_d24_exact():
    shape = ModelShape.from_depth(24)
    # 6 * 729,810,648 + 18432 * (6*2048 + 18*512)
    assert shape.flops_per_token() == 6 * 729_810_648 + 18432 * (6 * 2048 + 18 * 512) == 4_775_225_616


def test_short_window():
    assert short_window(2048) == 512
    assert short_window(512) == 128
    assert window_sizes(4, 512, "SSSL") == [128, 128, 128, 512]


def test_window_pattern_24_layers():
    windows = window_sizes(24, 2048, "SSSL")
    assert [i for i, w in enumerate(windows) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert windows.count(512) == 18


def test_last_layer_always_long():
    assert window_sizes(3, 2048, "S") == [512, 512, 2048]
    assert window_sizes(1, 2048, "S") == [2048]
    assert window_sizes(5, 2048, "sssl") == [512, 512, 512, 2048, 2048]
    assert window_sizes(6, 2048, "LS") == [2048, 512, 2048, 512, 2048, 2048]
    with pytest.raises(ValueError):
        window_sizes(4, 2048, "SXL")


def test_value_embedding_layers():
    # alternating, always including the last layer
    assert value_embedding_layers(4) == [1, 3]
    assert value_embedding_layers(5) == [0, 2, 4]
    assert value_embedding_layers(1) == [0]
    for n in range(1, 30):
        ve = value_embedding_layers(n)
        assert ve[-1] == n - 1 and len(ve) == math.ceil(n / 2)


# ---------------------------------------------------------------------------------------------
# 2. the d24 worked example (docs/model.md#training-plan) and the auto batch size rule

def test_d24_worked_example(store):
    cfg = load_config("d24", store=store)
    p = cfg.plan
    assert (p.model_dim, p.n_head, p.n_layer) == (1536, 12, 24)
    assert p.total_params == 1_384_122_122
    assert p.scaling_params == 729_810_624
    assert p.flops_per_token == 4_775_225_616
    assert p.target_tokens == 5_838_484_992 == int(8 * 729_810_624)
    assert p.total_batch_size == 1_048_576 == 2**20
    assert p.world_size == 8
    assert p.grad_accum_steps == 4
    assert p.num_iterations == 5568
    assert p.total_tokens == 5_838_471_168
    assert p.tokens_per_param == pytest.approx(7.99998, abs=1e-5)
    assert p.total_flops == pytest.approx(2.788e19, rel=1e-3)
    assert p.weight_decay_scaled == pytest.approx(0.059738, abs=1e-6)
    assert p.batch_lr_scale == pytest.approx(math.sqrt(2), rel=1e-12)
    assert p.warmdown_steps == 3619
    assert cfg.pretrain.fp8 is True and cfg.pretrain.device_batch_size == 16
    assert cfg.pretrain.eval_tokens // (16 * 2048 * 8) == 160  # eval steps per val-bpb
    # data: the default ClimbMix source, its fixed validation shard, 150 shards for the horizon + 20
    assert "{index" in cfg.data.source
    assert cfg.data.val_shard == 6542
    shards = cfg.train_shard_indices()
    assert shards == list(range(170))
    assert 6542 not in shards


@pytest.mark.parametrize(("depth", "log2_batch"), [
    *[(d, 18) for d in (3, 4, 5, 6, 7, 8)],
    *[(d, 19) for d in (10, 12, 14, 16)],
    *[(d, 20) for d in (18, 20, 22, 24, 26, 28)],
    (32, 21),
])
def test_auto_batch_size(depth, log2_batch, store):
    cfg = load_config("d24", sets=[f"pretrain.depth={depth}", "pretrain.target_param_data_ratio=12"], store=store)
    assert cfg.plan.total_batch_size == 2**log2_batch
    assert cfg.plan.grad_accum_steps == 2**log2_batch // (16 * 2048 * 8)
    # the batch (and WD) scaling depend only on N/N_ref, not on the ratio
    cfg8 = load_config("d24", sets=[f"pretrain.depth={depth}", "pretrain.target_param_data_ratio=8"], store=store)
    assert cfg8.plan.total_batch_size == cfg.plan.total_batch_size
    assert cfg8.plan.weight_decay_scaled == pytest.approx(cfg.plan.weight_decay_scaled, rel=1e-12)


def _plan(**kw):
    args = dict(depth=12, aspect_ratio=64, head_dim=128, max_seq_len=2048, window_pattern="SSSL",
                vocab_size=32768, device_batch_size=1, total_batch_size=-1, world_size=1, num_iterations=-1,
                target_flops=-1.0, target_param_data_ratio=12.0, weight_decay=0.28, warmdown_ratio=0.65)
    args.update(kw)
    return plan_training(**args)


def test_auto_batch_formula_small_depths():
    # The "2^18 up to d8" of docs/model.md#training-plan is a summary of the formula; at d1/d2 the formula itself gives 2^17.
    for depth in (1, 2):
        n = ModelShape.from_depth(depth).scaling_params()
        n_ref = ModelShape.from_depth(12).scaling_params()
        expected = 2 ** round(math.log2(2**19 * (n / n_ref) ** 0.383))
        assert _plan(depth=depth).total_batch_size == expected == 2**17


def test_plan_reference_depth_and_horizon_precedence():
    p = _plan()  # d12: B_REF exactly, so no LR/WD scaling
    assert p.total_batch_size == 2**19
    assert p.batch_lr_scale == 1.0
    assert p.weight_decay_scaled == pytest.approx(0.28)
    assert p.num_iterations == int(12 * 110_100_912) // 2**19
    # num_iterations beats target_flops beats the ratio
    assert _plan(num_iterations=7, target_flops=1e18).num_iterations == 7
    assert _plan(target_flops=1e18).num_iterations == round(1e18 / (759_696_048 * 2**19))
    with pytest.raises(PlanError, match="no training horizon"):
        _plan(target_param_data_ratio=-1)
    with pytest.raises(PlanError, match="not divisible"):
        _plan(total_batch_size=3 * 2048, device_batch_size=2)


def test_d26_preset(store):
    cfg = load_config("d26", store=store)
    assert cfg.pretrain.total_batch_size == 1_048_576 == cfg.plan.total_batch_size
    assert cfg.pretrain.target_param_data_ratio == 8.25
    assert cfg.pretrain.fp8 is True
    assert cfg.pretrain.device_batch_size == 16
    assert cfg.plan.grad_accum_steps == 4
    assert cfg.plan.target_tokens == int(8.25 * 918_423_532)
    assert cfg.plan.num_iterations == int(8.25 * 918_423_532) // 2**20


# ---------------------------------------------------------------------------------------------
# 3. presets

def test_list_presets():
    assert set(list_presets()) >= {"smoke", "cpu", "d12", "d20", "d24", "d26"}


@pytest.mark.parametrize("preset", ["smoke", "cpu", "d12", "d20", "d24", "d26"])
def test_every_preset_loads(preset, store):
    cfg = load_config(preset, store=store)
    assert cfg.preset == preset
    assert cfg.runtime.store == str(Path(store).resolve())
    assert cfg.data.val_shard == 6542  # default ClimbMix source
    shards = cfg.train_shard_indices()
    assert shards and shards == list(range(len(shards))) and cfg.data.val_shard not in shards
    assert cfg.plan.num_iterations >= 1
    assert cfg.plan.total_batch_size % (cfg.pretrain.device_batch_size * cfg.pretrain.max_seq_len
                                        * cfg.runtime.world_size) == 0


@needs_mirror
@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_cpu_presets_on_mirror(preset, store):
    cfg = load_config(preset, mirror=str(DATA_DIR), store=store)
    assert cfg.runtime.mirror == str(DATA_DIR.resolve())
    assert cfg.data.source == str(DATA_DIR.resolve() / "pretrain")
    highest = max(int(p.stem.split("_")[1]) for p in MIRROR_SHARDS.glob("shard_*.parquet"))
    assert cfg.data.val_shard == highest == 7
    assert cfg.base_eval.bundle == str(DATA_DIR.resolve() / "eval_bundle")
    if (DATA_DIR / "chat_eval").is_dir():
        assert cfg.chat_eval.data_dir == str(DATA_DIR.resolve() / "chat_eval")
    assert cfg.runtime.device_type == "cpu"
    shards = cfg.train_shard_indices()
    assert 7 not in shards
    if preset == "smoke":
        assert shards == [0, 1]
        assert 2 <= cfg.pretrain.depth <= 4
        assert cfg.plan.num_iterations == 20


@needs_mirror
def test_derived_shard_count_is_capped_below_val_shard(store):
    # A horizon that needs more shards than the mirror holds is capped at the validation shard
    # (silently: see the report); the validation shard never becomes a train shard.
    cfg = load_config("cpu", sets=["pretrain.num_iterations=-1", "pretrain.depth=12"],
                      mirror=str(DATA_DIR), store=store)
    assert cfg.data.num_train_shards == -1
    assert cfg.train_shard_indices() == list(range(7))


@needs_mirror
def test_explicit_shard_count_up_to_val_shard(store):
    # [0, 7) stops right below the mirror's validation shard 7; 8 and 9 are errors (see INVALID)
    cfg = load_config("smoke", sets=["data.num_train_shards=7"], mirror=str(DATA_DIR), store=store)
    assert cfg.train_shard_indices() == list(range(7))


def test_unresolved_val_shard_is_an_error():
    cfg = build_config({"pretrain": {"depth": 4}})
    assert cfg.data.val_shard is None
    with pytest.raises(ValueError, match="data.val_shard"):
        cfg.train_shard_indices()


# ---------------------------------------------------------------------------------------------
# 4. overrides

def test_parse_set_types():
    out = parse_set(["pretrain.depth=12", "pretrain.fp8=false", "pretrain.window_pattern=sssl"])
    assert out == {"pretrain": {"depth": 12, "fp8": False, "window_pattern": "sssl"}}
    assert type(out["pretrain"]["depth"]) is int
    assert out["pretrain"]["fp8"] is False
    assert parse_set(["pretrain.target_flops=1.5e+18"]) == {"pretrain": {"target_flops": 1.5e18}}
    assert parse_set(["data.source=https://h/x?a=b"]) == {"data": {"source": "https://h/x?a=b"}}
    assert parse_set(["pretrain.model_tag=null", "report.baseline="]) == \
        {"pretrain": {"model_tag": None}, "report": {"baseline": ""}}


def test_sets_applied_and_pattern_uppercased(store):
    cfg = load_config("d24", sets=["pretrain.depth=12", "pretrain.fp8=false", "pretrain.window_pattern=sssl"],
                      store=store)
    # PyYAML (YAML 1.1) reads "1e18" as a string; the float field still coerces it
    assert load_config("d24", sets=["pretrain.target_flops=1e18"], store=store).pretrain.target_flops == 1e18
    assert cfg.pretrain.depth == 12
    assert cfg.pretrain.fp8 is False
    assert cfg.pretrain.window_pattern == "SSSL"
    assert cfg.plan.model_dim == 768


@pytest.mark.parametrize("overrides", [
    {"pretrain.depth": 6},
    {"pretrain": {"depth": 6}},
])
def test_prefect_style_overrides(overrides, store):
    before = repr(overrides)
    cfg = load_config("d24", overrides=overrides, store=store)
    assert cfg.pretrain.depth == 6
    assert cfg.pretrain.target_param_data_ratio == 8  # the rest of the preset survives the merge
    assert cfg.pretrain.fp8 is True
    assert repr(overrides) == before  # the caller's dict is not mutated


def test_sets_beat_overrides(store):
    cfg = load_config("d24", overrides={"pretrain.depth": 6}, sets=["pretrain.depth=8"], store=store)
    assert cfg.pretrain.depth == 8


@needs_mirror
def test_explicit_source_wins_over_mirror(tmp_path, store):
    src = tmp_path / "my-shards"
    src.mkdir()
    for i in (0, 1, 2, 3):
        (src / f"shard_{i:05d}.parquet").write_bytes(b"")
    cfg = load_config("smoke", overrides={"data.source": str(src)}, mirror=str(DATA_DIR), store=store)
    assert cfg.data.source == str(src)
    assert cfg.data.val_shard == 3
    assert cfg.base_eval.bundle == str(DATA_DIR.resolve() / "eval_bundle")  # the rest still follows the mirror
    # an explicit template with its validation shard also wins
    cfg = load_config("smoke", sets=["data.source=https://h/shard_{index:05d}.parquet", "data.val_shard=99"],
                      mirror=str(DATA_DIR), store=store)
    assert cfg.data.source == "https://h/shard_{index:05d}.parquet"
    assert cfg.data.val_shard == 99


def test_set_string_option_that_looks_numeric(store):
    cfg = load_config("d24", sets=["pretrain.model_tag=12", "pretrain.run=2024"], store=store)
    assert cfg.pretrain.model_tag == "12"
    assert cfg.pretrain.run == "2024"


# ---------------------------------------------------------------------------------------------
# 5. invalid configurations: every one is a ConfigError naming the field and the fix

S = "sets"
O = "overrides"
INVALID = [
    # (id, preset, kwargs, field the message must name)
    ("unknown-key", "smoke", {S: ["pretrain.dept=5"]}, "pretrain.dept"),
    ("unknown-section", "smoke", {O: {"pretrian": {"depth": 4}}}, "pretrian"),
    ("unknown-top-level", "smoke", {S: ["foo.bar=1"]}, "foo"),
    ("depth-0", "smoke", {S: ["pretrain.depth=0"]}, "pretrain.depth"),
    ("depth-too-large", "smoke", {S: ["pretrain.depth=129"]}, "pretrain.depth"),
    ("depth-wrong-type", "smoke", {S: ["pretrain.depth=abc"]}, "pretrain.depth"),
    ("aspect-ratio-0", "smoke", {S: ["pretrain.aspect_ratio=0"]}, "pretrain.aspect_ratio"),
    ("odd-head-dim", "smoke", {S: ["pretrain.head_dim=63"]}, "pretrain.head_dim"),
    ("max-seq-len-1", "smoke", {S: ["pretrain.max_seq_len=1"]}, "pretrain.max_seq_len"),
    ("window-SXL", "smoke", {S: ["pretrain.window_pattern=SXL"]}, "pretrain.window_pattern"),
    ("window-empty", "smoke", {O: {"pretrain.window_pattern": ""}}, "pretrain.window_pattern"),
    ("batch-not-divisible", "smoke", {S: ["pretrain.total_batch_size=3000"]}, "pretrain.total_batch_size"),
    ("total-batch-0", "smoke", {S: ["pretrain.total_batch_size=0"]}, "pretrain.total_batch_size"),
    ("device-batch-0", "smoke", {S: ["pretrain.device_batch_size=0"]}, "pretrain.device_batch_size"),
    ("warmdown-1.5", "smoke", {S: ["pretrain.warmdown_ratio=1.5"]}, "pretrain.warmdown_ratio"),
    ("final-lr-neg", "smoke", {S: ["pretrain.final_lr_frac=-0.1"]}, "pretrain.final_lr_frac"),
    ("fp8-rowwise", "smoke", {S: ["pretrain.fp8_recipe=rowwise"]}, "pretrain.fp8_recipe"),
    ("matrix-lr-neg", "smoke", {S: ["pretrain.matrix_lr=-0.02"]}, "pretrain.matrix_lr"),
    ("eval-every-0", "smoke", {S: ["pretrain.eval_every=0"]}, "pretrain.eval_every"),
    ("num-iterations-0", "smoke", {S: ["pretrain.num_iterations=0"]}, "pretrain.num_iterations"),
    ("no-horizon", "smoke", {S: ["pretrain.num_iterations=-1", "pretrain.target_flops=-1",
                                 "pretrain.target_param_data_ratio=-1"]}, "pretrain.num_iterations"),
    ("zero-steps", "smoke", {S: ["pretrain.num_iterations=-1", "pretrain.target_param_data_ratio=1e-7"]},
     "pretrain.target_param_data_ratio"),
    ("vocab-100", "smoke", {S: ["tokenizer.vocab_size=100"]}, "tokenizer.vocab_size"),
    ("doc-cap-0", "smoke", {S: ["tokenizer.doc_cap=0"]}, "tokenizer.doc_cap"),
    ("max-chars-0", "smoke", {S: ["tokenizer.max_chars=0"]}, "tokenizer.max_chars"),
    ("train-shards-0", "smoke", {S: ["data.num_train_shards=0"]}, "data.num_train_shards"),
    ("train-shards-neg5", "smoke", {S: ["data.num_train_shards=-5"]}, "data.num_train_shards"),
    ("train-shards-overlap-9", "smoke", {S: ["data.num_train_shards=9"]}, "data.num_train_shards"),
    ("train-shards-overlap-8", "smoke", {S: ["data.num_train_shards=8"]}, "data.num_train_shards"),
    ("val-shard-0", "smoke", {S: ["data.val_shard=0"]}, "data.val_shard"),
    ("empty-source", "smoke", {O: {"data.source": "  "}}, "data.source"),
    ("template-bad-placeholder", "smoke", {O: {"data.source": "https://h/shard_{idx:05d}.parquet"}}, "data.source"),
    ("template-unbalanced", "smoke", {O: {"data.source": "https://h/shard_{index:05d.parquet"}}, "data.source"),
    ("template-without-val-shard", "smoke", {O: {"data.source": "https://h/shard_{index:05d}.parquet"}},
     "data.val_shard"),
    ("source-dir-missing", "smoke", {O: {"data.source": "/nonexistent/speedrun-shards"}}, "data.source"),
    ("mirror-missing", "smoke", {"mirror": "/nonexistent/speedrun-mirror"}, "runtime.mirror"),
    ("bundle-missing", "smoke", {O: {"base_eval.bundle": "/nonexistent/eval_bundle.zip"}}, "base_eval.bundle"),
    ("sft-data-missing", "smoke", {O: {"sft.data": ["/nonexistent/conv.jsonl"]}}, "sft.data"),
    ("chat-eval-dir-missing", "smoke", {O: {"chat_eval.data_dir": "/nonexistent/chat_eval"}}, "chat_eval.data_dir"),
    ("sft-source-unknown", "smoke", {O: {"sft.sources": {"arc": str(DATA_DIR / "sft" / "alpaca_5000.jsonl")}}},
     "sft.sources"),
    ("sft-source-missing", "smoke", {O: {"sft.sources": {"gsm8k": "/nonexistent/gsm8k.jsonl"}}}, "sft.sources.gsm8k"),
    ("sft-data-and-sources", "smoke", {O: {"sft.data": [str(DATA_DIR / "sft" / "alpaca_5000.jsonl")],
                                           "sft.sources": {"gsm8k": str(DATA_DIR / "chat_eval" / "gsm8k" / "train.jsonl")}}},
     "sft.sources"),
    ("base-eval-mode", "smoke", {S: ["base_eval.eval=core,foo"]}, "base_eval.eval"),
    ("nproc-0", "smoke", {S: ["runtime.nproc_per_node=0"]}, "runtime.nproc_per_node"),
    ("wandb-sometimes", "smoke", {S: ["runtime.wandb_mode=sometimes"]}, "runtime.wandb_mode"),
    ("device-tpu", "smoke", {S: ["runtime.device_type=tpu"]}, "runtime.device_type"),
    ("node-queues-too-few", "smoke", {S: ["runtime.nnodes=2", "runtime.node_queues=[a]"]}, "runtime.node_queues"),
    ("matrix-lr-inf", "smoke", {S: ["pretrain.matrix_lr=.inf"]}, "pretrain.matrix_lr"),
    ("embedding-lr-nan", "smoke", {S: ["pretrain.embedding_lr=.nan"]}, "pretrain.embedding_lr"),
    ("download-timeout-inf", "smoke", {S: ["data.download_timeout_s=.inf"]}, "data.download_timeout_s"),
    ("target-flops-inf", "smoke", {S: ["pretrain.target_flops=.inf"]}, "pretrain.target_flops"),
    ("sft-lr-inf", "smoke", {S: ["sft.matrix_lr=.inf"]}, "sft.matrix_lr"),
    ("gpu-hour-cost-nan", "smoke", {S: ["report.gpu_hour_cost=.nan"]}, "report.gpu_hour_cost"),
    ("hang-timeout-inf", "smoke", {S: ["runtime.hang_timeout_s=.inf"]}, "runtime.hang_timeout_s"),
    ("warmup-past-horizon", "smoke", {S: ["pretrain.warmup_steps=21"]}, "pretrain.warmup_steps"),
    ("sft-batch-not-divisible", "smoke", {S: ["sft.total_batch_size=3000"]}, "sft.total_batch_size"),
    ("sft-batch-two-ranks", "smoke", {S: ["runtime.nproc_per_node=2"]}, "sft.total_batch_size"),
    ("chat-eval-task-typo", "smoke", {S: ["chat_eval.tasks=ARC-Easyy|MMLU"]}, "chat_eval.tasks"),
    ("chat-eval-tasks-empty", "smoke", {S: ["chat_eval.tasks=|"]}, "chat_eval.tasks"),
    ("unknown-preset", "no-such-preset", {}, "preset"),
    pytest.param("set-without-equals", "smoke", {S: ["pretrain.depth"]}, "pretrain.depth"),
]


def _ids(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@needs_mirror
@pytest.mark.parametrize(("name", "preset", "kwargs", "field"), INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_config(name, preset, kwargs, field, tmp_path):
    kwargs = dict(kwargs)
    kwargs.setdefault("mirror", str(DATA_DIR))
    with pytest.raises(ConfigError) as info:
        load_config(preset, store=str(tmp_path / "store"), **kwargs)
    err = info.value
    text = str(err)
    assert err.problems, "a ConfigError must list its problems"
    assert field in text, f"message does not name {field!r}: {text}"
    naming = [p for p in err.problems if field in p]
    assert any(re.search(r"fix: \S", p) for p in naming), f"no problem naming {field!r} says `fix: ...`: {naming}"


def test_invalid_cases_are_many_and_distinct():
    ids = [_ids(c) for c in INVALID]
    assert len(ids) == len(set(ids)) >= 22


@needs_mirror
def test_base_config_is_valid(store):
    # every invalid case above differs from this one by a single change
    cfg = load_config("smoke", mirror=str(DATA_DIR), store=store)
    assert cfg.data.val_shard == 7


def test_sft_source_errors_name_the_key_and_fix(store):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides={"sft.sources": {"arc": "/x.jsonl"}}, store=store)
    assert "sft.sources: unknown source(s) ['arc']" in str(info.value) and "fix" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides={"sft.sources": {"gsm8k": "/nonexistent/gsm8k.jsonl"}}, store=store)
    assert info.value.problems == [p for p in info.value.problems if p.startswith("sft.sources.gsm8k: /nonexistent")]


@needs_mirror
def test_sft_sources_keep_the_mirror_out_of_sft_data(store, tmp_path, monkeypatch):
    gsm8k = DATA_DIR / "chat_eval" / "gsm8k" / "train.jsonl"
    plain = load_config("smoke", mirror=str(DATA_DIR), store=store)
    assert plain.sft.sources == {} and len(plain.sft.data) == 3  # the mirror's sft/ replaces the whole mixture
    monkeypatch.chdir(gsm8k.parent)
    cfg = load_config("smoke", sets=["sft.sources={gsm8k: train.jsonl}"], mirror=str(DATA_DIR), store=store)
    assert cfg.sft.data is None and cfg.sft.sources == {"gsm8k": str(gsm8k.resolve())}  # absolute for the workers


@needs_mirror
def test_did_you_mean(store):
    with pytest.raises(ConfigError, match=r"did you mean pretrain\.depth\?"):
        load_config("smoke", sets=["pretrain.dept=5"], mirror=str(DATA_DIR), store=store)
    with pytest.raises(ConfigError, match=r"did you mean pretrain\?"):
        load_config("smoke", overrides={"pretrian": {"depth": 4}}, mirror=str(DATA_DIR), store=store)


@needs_mirror
def test_all_problems_collected(store):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", sets=["pretrain.depth=0", "tokenizer.vocab_size=100", "runtime.wandb_mode=x"],
                    mirror=str(DATA_DIR), store=store)
    assert len(info.value.problems) == 3


@needs_mirror
@pytest.mark.parametrize(("sets", "problem"), [
    (["runtime.nnodes=3", "runtime.node_queues=[a,b]"],
     r"runtime\.node_queues=\['a', 'b'\] must name 3 different work queues.*fix: --set runtime\.node_queues=\[node-0,node-1,\.\.\.\]"),
    (["runtime.nnodes=2", "runtime.node_queues=[a,a]"],
     r"runtime\.node_queues=\['a', 'a'\] must name 2 different work queues.*fix: --set runtime\.node_queues=\[node-0,node-1,\.\.\.\]"),
])
def test_runtime_cross_field_fix_is_actionable(sets, problem, store):
    """A cross-field error names the fields and the one --set that fixes it (not `--set runtime=...`)."""
    with pytest.raises(ConfigError) as info:
        load_config("smoke", sets=sets, mirror=str(DATA_DIR), store=store)
    assert len(info.value.problems) == 1, info.value.problems
    assert re.fullmatch(problem, info.value.problems[0]), info.value.problems[0]


def test_parse_set_malformed():
    for item in ("pretrain.depth", "depth=3", "a.b.c=1", ".x=1"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_set([item])


# ---------------------------------------------------------------------------------------------
# 6. frozen, extra keys forbidden

def test_config_is_frozen(store):
    cfg = load_config("d24", store=store)
    with pytest.raises(ValidationError):
        cfg.pretrain.depth = 3
    with pytest.raises(ValidationError):
        cfg.pretrain = PretrainConfig()
    with pytest.raises(ValidationError):
        cfg.runtime.nproc_per_node = 1
    assert cfg.pretrain.depth == 24 and cfg.runtime.nproc_per_node == 8
    assert cfg.plan is cfg.plan  # the cached plan survives freezing


def test_extra_keys_forbidden():
    with pytest.raises(ValidationError, match="extra"):
        SpeedrunConfig(bogus=1)
    with pytest.raises(ValidationError, match="extra"):
        PretrainConfig(dept=5)
    with pytest.raises(ConfigError, match="pretrain.dept"):
        build_config({"pretrain": {"dept": 5}})


@pytest.mark.parametrize("field", ["base_eval.max_per_task", "pretrain.core_metric_max_per_task"])
def test_core_example_cap_must_leave_room_for_ten_shots(field):
    with pytest.raises(ConfigError) as exc_info:
        load_config("d24", sets=[f"{field}=8"])
    assert field in str(exc_info.value) and "fix" in str(exc_info.value) and "10-shot" in str(exc_info.value)
    assert load_config("d24", sets=[f"{field}=11"])  # 10 shots + the example itself


def test_validation_does_no_io_and_resolution_fails_early(monkeypatch, tmp_path):
    """validate_config reads only the preset: no mirror check, no shard listing; resolve_config does those and
    keeps their messages."""
    def no_listing(source, **kwargs):
        raise AssertionError(f"validate_config listed {source}")

    monkeypatch.setattr("tasks.config.list_source_shards", no_listing)
    missing = str(tmp_path / "no-mirror")
    cfg = validate_config("smoke", overrides={"data.source": "https://h/pretrain"}, mirror=missing,
                          store=str(tmp_path / "store"))
    assert cfg.runtime.mirror == missing and cfg.data.val_shard is None and not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="runtime.mirror: .*no-mirror is not a directory; fix: point --mirror"):
        resolve_config(cfg)
    with pytest.raises(ConfigError, match="pretrain.depth"):  # a bad option fails in validation already
        validate_config("smoke", sets=["pretrain.depth=0"], mirror=missing)
