"""The run configuration: one frozen pydantic model with a section per stage (tasks/config_sections.py), presets
and overrides.

A run is `preset + overrides`. Presets are small partial YAML files in deployments/presets/; overrides
come from the CLI (`--set pretrain.fp8=false`), Prefect parameters or the UI form. `--depth` is the
single dial: width, heads, batch size, LR/WD scaling and the horizon derive from it (model/sizing.py).

Everything is checked before any stage runs, in two steps: `validate_config` (keys, types, ranges, rules
across fields; no I/O) and `resolve_config` (the mirror, the source's shard listing, local paths);
`load_config` does both. Errors are collected into one `ConfigError` whose lines each name the field, what
is wrong, and the fix.
"""

from __future__ import annotations

import difflib
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.sizing import PlanError, TrainingPlan, plan_training
from tasks.shard_source import DEFAULT_SOURCE, DEFAULT_VAL_SHARD, list_source_shards
from tasks.config_sections import (BaseEvalConfig, ChatEvalConfig, DataConfig, PretrainConfig, ReportConfig,
                                   RuntimeConfig, Section, SFTConfig, TokenizerConfig)
from tasks.source_identity import is_local

PRESETS_DIR = Path(__file__).resolve().parent.parent / "deployments" / "presets"
STEP_TIME_BOUND_S = 60.0  # no pretraining step of any preset takes a minute (d26 on 8xH100: ~1 s; cpu: ~1 s)
# The slowest FLOP/s per training process a healthy run sustains: 35% of an H100's dense BF16 peak (the record
# runs reach ~58% MFU) and a third of what this 2-core CPU box reaches on the cpu preset. The flow's expected
# duration and time limit assume it, so a run slower than this is late, and one twice as slow is stopped.
SUSTAINED_FLOPS_FLOOR = {"cuda": 0.35 * 989e12, "mps": 2e12, "cpu": 2e10}
STAGES_BESIDE_PRETRAINING_S = 3600.0  # data, tokenizer, CORE, SFT and chat eval: well under an hour at d26


class ConfigError(ValueError):
    """An invalid run configuration. `problems` holds one line per field: what is wrong and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid speedrun config:\n" + "\n".join(f"  - {p}" for p in problems))



class SpeedrunConfig(Section):
    preset: str = "custom"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrain: PretrainConfig = PretrainConfig()
    base_eval: BaseEvalConfig = BaseEvalConfig()
    sft: SFTConfig = SFTConfig()
    chat_eval: ChatEvalConfig = ChatEvalConfig()
    report: ReportConfig = ReportConfig()
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    model_config = ConfigDict(frozen=True, extra="forbid", ignored_types=(cached_property,))

    @model_validator(mode="after")
    def _consistent(self) -> "SpeedrunConfig":
        try:
            self.plan
        except PlanError as e:
            raise ValueError(str(e)) from None
        problems = self._cross_field_problems()
        if problems:
            raise ValueError("; ".join(problems))
        vs = self.data.val_shard
        if vs is not None and self.data.num_train_shards > vs:
            raise ValueError(f"data.num_train_shards={self.data.num_train_shards} would overlap the validation shard "
                             f"data.val_shard={vs}; fix: use at most {vs} train shards")
        return self

    def _cross_field_problems(self) -> list[str]:
        """Checks that span options and would otherwise fail only when their stage runs, hours in."""
        problems = []
        p, plan = self.pretrain, self.plan
        if p.warmup_steps > plan.num_iterations:
            problems.append(f"pretrain.warmup_steps={p.warmup_steps} is longer than the whole run "
                            f"({plan.num_iterations} steps), so the learning rate never reaches its peak; fix: "
                            f"--set pretrain.warmup_steps=<at most {plan.num_iterations}>")
        sft = self.sft  # None inherits from the base run (model/sft.py); the total batch from the plan
        T = sft.max_seq_len or p.max_seq_len
        B = sft.device_batch_size or p.device_batch_size
        total = sft.total_batch_size or plan.total_batch_size
        world_tokens = B * T * self.runtime.world_size
        if total % world_tokens:
            problems.append(f"sft.total_batch_size={total:,} is not a multiple of sft.device_batch_size x "
                            f"sft.max_seq_len x world size = {B} x {T} x {self.runtime.world_size} = "
                            f"{world_tokens:,}; fix: --set sft.total_batch_size="
                            f"{max(1, round(total / world_tokens)) * world_tokens} (or change the per-step sizes)")
        return problems

    @property
    def stage_time_limit_s(self) -> float:
        """runtime.stage_timeout_s, else a generous bound from the plan: a backstop for what the no-output
        watchdog (runtime.hang_timeout_s) cannot see, such as a run that prints but never progresses."""
        if self.runtime.stage_timeout_s is not None:
            return self.runtime.stage_timeout_s
        return max(6 * 3600.0, 3600.0 + STEP_TIME_BOUND_S * self.plan.num_iterations)

    @property
    def expected_duration_s(self) -> float:
        """How long a whole run should take at most, from the plan: its FLOPs at the sustained floor of the
        device (SUSTAINED_FLOPS_FLOOR) plus an hour for the other stages. The late-finish alert fires past it."""
        device = self.pretrain.device_type or self.runtime.device_type or "cpu"
        per_process = SUSTAINED_FLOPS_FLOOR.get(device, SUSTAINED_FLOPS_FLOOR["cpu"])
        return STAGES_BESIDE_PRETRAINING_S + self.plan.total_flops / (per_process * self.runtime.world_size)

    @property
    def flow_time_limit_s(self) -> float:
        """runtime.flow_timeout_s, else twice the expected duration: past it the flow stops its stage and fails."""
        if self.runtime.flow_timeout_s is not None:
            return self.runtime.flow_timeout_s
        return 2 * self.expected_duration_s

    @cached_property
    def plan(self) -> TrainingPlan:
        """The pretraining plan derived from depth and the horizon options (docs/model.md#training-plan)."""
        p = self.pretrain
        return plan_training(
            depth=p.depth, aspect_ratio=p.aspect_ratio, head_dim=p.head_dim, max_seq_len=p.max_seq_len,
            window_pattern=p.window_pattern, vocab_size=self.tokenizer.vocab_size,
            device_batch_size=p.device_batch_size, total_batch_size=p.total_batch_size,
            world_size=self.runtime.world_size, num_iterations=p.num_iterations, target_flops=p.target_flops,
            target_param_data_ratio=p.target_param_data_ratio, weight_decay=p.weight_decay,
            warmdown_ratio=p.warmdown_ratio)

    def train_shards_wanted(self) -> int:
        """Train shards the run wants: set explicitly, or enough for the tokenizer and the horizon plus a margin."""
        d = self.data
        if d.num_train_shards != -1:
            return d.num_train_shards
        for_tokenizer = -(-self.tokenizer.max_chars // d.chars_per_shard)
        for_pretrain = -(-self.plan.total_tokens // d.train_tokens_per_shard) + d.shard_margin
        return max(for_tokenizer, for_pretrain)

    def train_shard_indices(self) -> list[int]:
        """Train shards [0, n), n capped by the source (all shards before the validation shard).

        A small source (a mirror) then serves a long horizon by repeating epochs; the flow says so.
        """
        if self.data.val_shard is None:
            raise ValueError("data.val_shard is unresolved; call resolve_config() first")
        return list(range(min(self.train_shards_wanted(), self.data.val_shard)))


# ---------------------------------------------------------------------------------------------
# presets, overrides, resolution

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError([f"preset: unknown preset {name!r}; fix: use one of {', '.join(list_presets())}"])
    return yaml.safe_load(path.read_text()) or {}


def parse_set(items: list[str]) -> dict:
    """`["pretrain.depth=12", "pretrain.fp8=false"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"--set {item!r}: not of the form section.key=value; fix: e.g. --set pretrain.depth=12")
            continue
        out.setdefault(parts[0], {})[parts[1]] = _parse_value(parts, raw)
    if problems:
        raise ConfigError(problems)
    return out


def _parse_value(loc: list[str], raw: str):
    """YAML scalars (12, 8.25, false, null), except that text options keep the text (`pretrain.run=2024`)."""
    field = _field_info(tuple(loc))
    if field is not None and field.annotation in (str, str | None) and raw.strip() not in ("null", "~"):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _flatten_dotted(overrides: dict) -> dict:
    """Prefect parameters may arrive as {"pretrain.depth": 12} or {"pretrain": {"depth": 12}}."""
    out: dict = {}
    for key, value in (overrides or {}).items():
        if "." in key:
            section, _, field = key.partition(".")
            out.setdefault(section, {})[field] = value
        elif isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _describe(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        section, _, name = loc.rpartition(".")
        model = SpeedrunConfig.model_fields[section].annotation if section else SpeedrunConfig
        close = difflib.get_close_matches(name, list(model.model_fields), n=1)
        hint = f"did you mean {section + '.' if section else ''}{close[0]}?" if close else \
            f"valid keys: {', '.join(model.model_fields)}"
        return f"{loc}: unknown option; fix: remove it ({hint})"
    field = _field_info(err["loc"])
    if not loc or (field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
        return msg  # a cross-field check: its message names the fields and the fix
    hint = f" ({field.description})" if field is not None and field.description else ""
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{loc}: {msg}{got}; fix: --set {loc}=<valid value>{hint}"


def _field_info(loc: tuple):
    model = SpeedrunConfig
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return info
        info = model.model_fields[part]
        model = info.annotation
    return info


def build_config(data: dict) -> SpeedrunConfig:
    try:
        return SpeedrunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None


def validate_config(preset: str = "smoke", overrides: dict | None = None, sets: list[str] | None = None,
                    mirror: str | None = None, store: str | None = None) -> SpeedrunConfig:
    """preset + overrides (+ CLI --set items), validated: keys, types, ranges and the rules across fields.

    Pure: nothing is read but the preset file. The inputs stay as written (the mirror not applied, the
    validation shard maybe unknown): `resolve_config` is the step that looks at the filesystem and the source.
    Raises ConfigError."""
    data = _merge(read_preset(preset), _flatten_dotted(overrides or {}))
    data = _merge(data, parse_set(sets or []))
    data["preset"] = preset
    runtime = data.setdefault("runtime", {})
    if mirror is not None:
        runtime["mirror"] = mirror
    if store is not None:
        runtime["store"] = store
    return build_config(data)


def load_config(preset: str = "smoke", overrides: dict | None = None, sets: list[str] | None = None,
                mirror: str | None = None, store: str | None = None) -> SpeedrunConfig:
    """`validate_config` then `resolve_config`: a config ready to run; raises ConfigError."""
    return resolve_config(validate_config(preset, overrides, sets, mirror, store))


def resolve_config(cfg: SpeedrunConfig) -> SpeedrunConfig:
    """The I/O step after validation: point sources at the mirror, resolve the store path, find the validation
    shard (listing the source's shards, over the network for a remote source), check local paths exist.
    Raises ConfigError naming each field and its fix."""
    problems: list[str] = []
    data, base_eval, sft, chat_eval = cfg.data, cfg.base_eval, cfg.sft, cfg.chat_eval
    runtime = cfg.runtime.model_copy(update={"store": str(Path(cfg.runtime.store).expanduser().resolve())})
    if runtime.mirror:
        mirror = Path(runtime.mirror).expanduser().resolve()
        runtime = runtime.model_copy(update={"mirror": str(mirror)})
        if not mirror.is_dir():
            problems.append(f"runtime.mirror: {mirror} is not a directory; fix: point --mirror at a directory "
                            "laid out like shared/data (pretrain/, eval_bundle/, sft/, chat_eval/)")
        else:
            if "source" not in data.model_fields_set:
                data = data.model_copy(update={"source": str(mirror / "pretrain")})
            if "bundle" not in base_eval.model_fields_set:
                base_eval = base_eval.model_copy(update={"bundle": str(mirror / "eval_bundle")})
            if "data" not in sft.model_fields_set and not sft.sources and (mirror / "sft").is_dir():
                sft = sft.model_copy(update={"data": sorted(str(p) for p in (mirror / "sft").glob("*.jsonl"))})
            if "data_dir" not in chat_eval.model_fields_set and (mirror / "chat_eval").is_dir():
                chat_eval = chat_eval.model_copy(update={"data_dir": str(mirror / "chat_eval")})

    if not problems and data.val_shard is None:
        if "{" in data.source:
            if data.source == DEFAULT_SOURCE:
                data = data.model_copy(update={"val_shard": DEFAULT_VAL_SHARD})
            else:
                problems.append("data.val_shard: must be set for a URL template source (the index of its last shard); "
                                "fix: --set data.val_shard=<index>")
        else:
            if is_local(data.source) and not Path(data.source).is_dir():
                problems.append(f"data.source: {data.source} is not a directory; fix: point data.source (or --mirror) "
                                "at a directory of shard_NNNNN.parquet files")
            else:
                try:
                    found = list_source_shards(data.source)
                except (OSError, ValueError) as e:
                    found, err = [], e
                    problems.append(f"data.source: cannot list {data.source} ({err}); fix: set data.val_shard explicitly")
                if found:
                    data = data.model_copy(update={"val_shard": found[-1]})
                elif not problems:
                    problems.append(f"data.source: no shard_NNNNN.parquet files in {data.source}; fix: point it at a shard directory")
                if found and len(found) < 2:
                    problems.append(f"data.source: {data.source} holds a single shard; at least one train shard and the "
                                    "validation shard are needed")
    if is_local(base_eval.bundle) and not Path(base_eval.bundle).exists() and "bundle" in cfg.base_eval.model_fields_set:
        problems.append(f"base_eval.bundle: {base_eval.bundle} does not exist; fix: point it at the bundle directory or zip")
    for path in sft.data or []:
        if is_local(path) and not Path(path).exists():
            problems.append(f"sft.data: {path} does not exist; fix: list existing jsonl/parquet files")
    for name, path in sft.sources.items():
        if "://" in path or not Path(path).expanduser().is_file():  # read by model.chat_data as a local file
            problems.append(f"sft.sources.{name}: {path} does not exist or is not a local file; fix: point it at an "
                            f"existing jsonl/parquet file of {name} rows, or remove sft.sources.{name} to use the hub dataset")
    if sft.sources and not problems:  # absolute, so the torchrun workers find them whatever their cwd
        sft = sft.model_copy(update={"sources": {n: str(Path(p).expanduser().resolve()) for n, p in sft.sources.items()}})
    if chat_eval.data_dir and is_local(chat_eval.data_dir) and not Path(chat_eval.data_dir).is_dir():
        problems.append(f"chat_eval.data_dir: {chat_eval.data_dir} is not a directory; fix: point it at a directory "
                        "laid out like shared/data/chat_eval (arc/, mmlu/, gsm8k/, humaneval/), or unset it for the hub")
    if problems:
        raise ConfigError(problems)
    return build_config({**cfg.model_dump(), "data": data.model_dump(), "base_eval": base_eval.model_dump(),
                         "sft": sft.model_dump(), "chat_eval": chat_eval.model_dump(), "runtime": runtime.model_dump()})
