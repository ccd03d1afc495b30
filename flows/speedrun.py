"""The speedrun flow: shards -> tokenizer -> eval_bundle -> pretrain -> base_eval -> sft -> chat_eval -> report.

Each stage is a cached Prefect task.

Reads like the shell script it replaces (nanochat's runs/speedrun.sh): fetch data, train the tokenizer,
and so on. A stage whose inputs, config and code are unchanged comes back `Cached`; `refresh` re-executes
the named stages and everything downstream of them.

    python -m flows.speedrun --preset smoke --mirror ../shared/data --summary-json s1.json
    python -m flows.speedrun --preset d26 --set pretrain.save_every=250 --refresh tokenizer
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from tasks.base_eval import base_eval_options, base_eval_section, base_eval_stage
from tasks.cache import record_name, with_store
from tasks.chat_eval import chat_eval_options, chat_eval_section, chat_eval_stage
from tasks.config import ConfigError, SpeedrunConfig, parse_set, resolve_config, validate_config
from tasks.eval_bundle import eval_bundle_options, eval_bundle_section, eval_bundle_stage
from tasks.launch import attention_backend
from tasks.nodes import check_multinode
from tasks.pretrain import pretrain_options, pretrain_section, pretrain_stage
from tasks.report import report_options, report_section, report_stage
from tasks.sft import sft_options, sft_section, sft_stage
from tasks.shards import shards_options, shards_section, shards_stage
from tasks.stages import STAGES, downstream_of
from tasks.store import MANIFEST, Store, atomic_write_json, check_artifact, git_commit
from tasks.tokenizer import tokenizer_section, tokenizer_stage

def stage_graph(cfg: SpeedrunConfig | None = None) -> dict[str, tuple[str, ...]]:
    """Each stage and the stages it reads from (tasks/stages.py); `refresh` follows these edges downstream."""
    return {name: (stage.upstream_for(cfg) if cfg is not None else stage.upstream) for name, stage in STAGES.items()}


def stages_to_refresh(refresh: list[str] | str | None, graph: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """The named stages plus everything downstream of them; 'all' means every stage."""
    names = [refresh] if isinstance(refresh, str) else list(refresh or [])
    names = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if "all" in names:
        return set(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError([f"refresh: unknown stage(s) {unknown}; fix: use 'all' or any of {', '.join(STAGES)}"])
    return downstream_of(names, graph or stage_graph())


class FlowTimeLimitReached(RuntimeError):
    """The flow run used up runtime.flow_timeout_s (default: twice the plan's expected duration)."""


class StageRunner:
    """Runs stage tasks against one store and records each one's state, key, wall time and artifact.

    It also holds the flow run's time limit: a stage does not start past it, and a torchrun stage running
    when it passes is stopped (its ranks save a checkpoint), so an overlong run fails instead of holding the
    node. A Retry is a new attempt with the whole limit again."""

    def __init__(self, cfg: SpeedrunConfig, refresh: list[str] | str | None, graph: dict[str, tuple[str, ...]],
                 until: str | None = None, resume: list[str] | str | None = None, verify: bool = False):
        self.store = Store(cfg.runtime.store)
        self.verify = verify
        self.graph = graph
        self.refresh = stages_to_refresh(refresh, graph)
        self.resume = stages_to_refresh(resume, graph)  # the first attempt's refresh, on a retry
        self.until = until
        self.deadline = {"at": time.time() + cfg.flow_time_limit_s, "limit_s": cfg.flow_time_limit_s}
        self.stages: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}

    @property
    def stopped(self) -> bool:
        """True once the `until` stage has run: the rest of the pipeline is skipped."""
        return self.until in self.stages

    def __call__(self, name: str, stage_task, section: dict, options: dict | None = None) -> dict | None:
        if self.stopped:
            return None
        upstream = {u: self.artifacts[u] for u in self.graph[name] if u in self.artifacts}
        t0 = time.time()
        if t0 > self.deadline["at"]:
            raise FlowTimeLimitReached(
                f"the flow run reached its time limit of {self.deadline['limit_s']:g} s before stage {name} "
                f"(runtime.flow_timeout_s; default twice the plan's expected duration); finished stages are kept, "
                f"so a Retry continues from {name}")
        options = dict(options or {})
        if "torchrun" in options:  # the running stage is stopped when the flow's time is up
            options["torchrun"] = {**options["torchrun"], "flow_deadline": self.deadline}
        if self.verify:
            self.verify_artifact(name, section, upstream)
        state = with_store(stage_task, self.store, refresh=name in self.refresh)(
            section=section, upstream=upstream, store=str(self.store.root), options=options,
            rebuild="fresh" if name in self.refresh else ("resume" if name in self.resume else None),
            return_state=True)
        record = state.result()  # raises the stage's exception if it failed
        # Records hold paths relative to the store root (a store can move): resolve against this run's store.
        record = {**record, "path": str(self.store.root / record["path"])}
        self.stages[name] = {"state": state.name, "key": record["key"], "seconds": round(time.time() - t0, 3),
                             "artifact": record["path"]}
        self.artifacts[name] = record
        get_run_logger().info(f"stage {name}: {state.name} in {time.time() - t0:.1f}s -> {record['path']}")
        return record

    def verify_artifact(self, name: str, section: dict, upstream: dict) -> None:
        """--verify: re-hash every file of the stage's artifact; one that changed is dropped and rebuilt."""
        key = STAGES[name].key(section, upstream)
        art = self.store.stage_dir(name, key)
        problem = check_artifact(art, self.store.root, verify=True) if art.exists() else None
        if problem:
            get_run_logger().warning(f"stage {name}: --verify: {problem}; rebuilding {art}")
            (art / MANIFEST).unlink(missing_ok=True)
            (self.store.results_dir / record_name(name, key)).unlink(missing_ok=True)


def run_name() -> str:
    """The flow run's name: `<preset>[-<label>]-<short commit>-<date>`, so a list of nightly runs says what each
    tested (a sweep's cells carry their cell as the label).

    Prefect names the run again at every attempt; a Retry keeps the name its first attempt got (the wandb
    group of its stages, and what the team saw in the alert)."""
    preset = flow_run.parameters.get("preset", "smoke")
    label = flow_run.parameters.get("label")
    prefix = f"{preset}-{label}" if label else preset
    if re.fullmatch(rf"{re.escape(prefix)}-[0-9a-z]+(-dirty)?-\d{{8}}-\d{{4}}", flow_run.name or ""):
        return flow_run.name
    commit = git_commit()
    short = (commit["short"] or "nogit") + ("-dirty" if commit["dirty"] else "")
    return f"{prefix}-{short}-{time.strftime('%Y%m%d-%H%M', time.gmtime())}"


@flow(name="speedrun", log_prints=True, flow_run_name=run_name)
def speedrun(preset: str = "smoke", overrides: dict | None = None, refresh: list[str] | None = None,
             mirror: str | None = None, store: str | None = None, until: str | None = None,
             verify: bool = False, summary_path: str | None = None, label: str | None = None) -> dict:
    cfg = validate_config(preset, overrides, mirror=mirror, store=store)  # no I/O: a bad option fails at once
    check_until(until)
    cfg = resolve_config(cfg)  # the mirror, the source's shards, local paths: still before any stage runs
    attention = attention_backend(cfg.runtime, cfg.pretrain.device_type)  # a backend this node lacks fails now
    check_multinode(cfg.runtime)  # several nodes: the server and the node deployment are there, or fail now
    report_config = report_section(cfg)  # a missing regression baseline fails now, not after training
    logger = get_run_logger()
    resume = None
    if refresh and flow_run.run_count > 1:  # a Retry resumes the failed stage; it never rebuilds from scratch
        logger.info(f"attempt {flow_run.run_count}: refresh={refresh} applies to the first attempt only; stages "
                    "rebuilt then come back Cached and an interrupted rebuild resumes from its checkpoint")
        refresh, resume = None, refresh
    run = StageRunner(cfg, refresh, stage_graph(cfg), until, resume=resume, verify=verify)
    logger.info(f"preset {preset}: {cfg.plan.num_iterations} steps at depth {cfg.pretrain.depth}, "
                f"attention {attention} (runtime.attention={cfg.runtime.attention}), store {cfg.runtime.store}")
    if cfg.train_shards_wanted() > len(cfg.train_shard_indices()):
        logger.warning(f"the horizon wants {cfg.train_shards_wanted()} train shards but {cfg.data.source} has "
                       f"{len(cfg.train_shard_indices())}: pretraining will repeat epochs over them")

    # External inputs enter the keys by content; --verify or a refresh of the stage re-hashes local sources.
    shards = run("shards", shards_stage, shards_section(cfg, verify or "shards" in run.refresh, log=logger.info),
                 shards_options(cfg))
    tokenizer = run("tokenizer", tokenizer_stage, tokenizer_section(cfg))
    run("eval_bundle", eval_bundle_stage, eval_bundle_section(cfg, verify or "eval_bundle" in run.refresh),
        eval_bundle_options(cfg))
    pretrain = run("pretrain", pretrain_stage, pretrain_section(cfg), pretrain_options(cfg))
    base_eval = run("base_eval", base_eval_stage, base_eval_section(cfg), base_eval_options(cfg))
    sft = run("sft", sft_stage, sft_section(cfg), sft_options(cfg))
    chat_eval = run("chat_eval", chat_eval_stage, chat_eval_section(cfg), chat_eval_options(cfg))
    report = run("report", report_stage, report_config, report_options(cfg))  # raises RegressionDetected

    summary = {"preset": preset, "store": cfg.runtime.store, "plan": cfg.plan.as_dict(),
               "train_shards": shards["metrics"]["train_shards"]}
    if tokenizer:
        summary.update(vocab_size=tokenizer["metrics"]["vocab_size"],
                       bytes_per_token_val=tokenizer["metrics"]["bytes_per_token_val"])
    if pretrain:  # the leaderboard keys
        summary.update({k: pretrain["metrics"].get(k) for k in LEADERBOARD_KEYS})
    if base_eval:
        summary.update({k: base_eval["metrics"][k] for k in EVAL_KEYS})
    if sft:
        summary.update({f"sft_{k}": sft["metrics"].get(k) for k in SFT_KEYS})
    if chat_eval:
        summary.update(chatcore=chat_eval["metrics"]["chatcore"], chatcore_cat=chat_eval["metrics"]["chatcore_cat"],
                       chat_accuracy={t: r["accuracy"] for t, r in chat_eval["metrics"]["tasks"].items()})
    if report:
        summary.update(report=str(Path(report["path"]) / "report.md"),
                       submission=str(Path(report["path"]) / "submission.md"), commit=report["metrics"].get("commit"))
    data = {"flow_run": str(flow_run.id), "stages": run.stages, "summary": summary}
    if summary_path:  # where a sweep (flows/sweep.py) reads a cell's outcome, wherever the cell ran
        atomic_write_json(Path(summary_path), data)
    # The Completed state's message is the verdict line: the UI's run list and the success alert show it.
    return Completed(message=finished_line(cfg, report, run), data=data)


def finished_line(cfg: SpeedrunConfig, report: dict | None, run: StageRunner) -> str:
    """One line saying how the run ended: the report's verdict line, or where a run stopped with `until` ended."""
    if report and report["metrics"].get("verdict_line"):
        return report["metrics"]["verdict_line"]
    ended = f"stopped after {run.until}" if run.stopped else "all stages"
    return f"DONE {cfg.preset}: {ended} ({len(run.stages)} run)"


LEADERBOARD_KEYS = ("total_training_time", "total_training_flops", "min_val_bpb", "step", "mfu", "tok_per_sec",
                    "attention_backend")
EVAL_KEYS = ("core_metric", "core_tasks", "missing_tasks", "train_bpb", "val_bpb")
SFT_KEYS = ("step", "min_val_bpb", "total_training_time")


def check_until(until: str | None) -> None:
    if until is not None and until not in STAGES:
        raise ConfigError([f"until: unknown stage {until!r}; fix: use one of {', '.join(STAGES)}"])


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --set, --mirror and --store: what a run's config is made of (this CLI's and the sweeps')."""
    parser.add_argument("--preset", default="smoke", help="deployments/presets/<name>.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one option, e.g. --set pretrain.depth=12 (repeatable)")
    parser.add_argument("--mirror", help="local directory laid out like shared/data to read every input from")
    parser.add_argument("--store", help="artifact store root (default $SPEEDRUN_HOME or ~/.cache/speedrun)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.speedrun", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--refresh", action="append", default=[], metavar="STAGE|all",
                        help="re-execute this stage and everything downstream (repeatable, or comma list)")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage (e.g. pretrain)")
    parser.add_argument("--summary-json", type=Path, help="write stage states and the run summary here")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every file of every artifact used (normally only files whose size or mtime changed)")
    args = parser.parse_args(argv)

    # Validate before starting Prefect, so a bad config fails in a second, not after server start-up.
    try:
        overrides = parse_set(args.sets)
        cfg = resolve_config(validate_config(args.preset, overrides, mirror=args.mirror, store=args.store))
        report_section(cfg)
        attention_backend(cfg.runtime, cfg.pretrain.device_type)
        check_multinode(cfg.runtime)
        stages_to_refresh(args.refresh)
        check_until(args.until)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result = speedrun(preset=args.preset, overrides=overrides, refresh=args.refresh or None,
                      mirror=args.mirror, store=args.store, until=args.until, verify=args.verify)
    if args.summary_json:
        atomic_write_json(args.summary_json.resolve(), result)
    print(json.dumps(result["stages"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
