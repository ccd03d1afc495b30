"""Every stage of the pipeline, declared once, and the code each one runs (its share of the stage key).

A `Stage` names: its upstream stages, its title in the report, the modules it executes (its own `tasks/`
file and whatever it launches), its config section, the options of that section left out of its key and
why, and the modules it runs only when an option is on. The flow's graph, `--refresh`/`--until`, the
report's sections and the code fingerprint all read `STAGES`; nothing else lists stages.

**The code a stage runs** is computed, never hand-listed: `code_files(stage, cfg)` starts from the stage's
entry modules and follows every `import` they contain (at module level or inside functions, absolute or
relative) into the project's computation packages, `model/` and `ops/`. The orchestration packages (`tasks/`,
`flows/`) are counted only as the entry files themselves: how a stage is launched does not change what it
computes. A module listed in a `Gate` is left out while its option is off (e.g. in-training CORE); such a
module must be imported lazily (inside the code the option guards), which `code_files` checks.

**The key rule** (`excluded`): an option stays out of a stage's key exactly when it changes how the stage is
launched, logged or checkpointed, never what it computes; each exclusion says why.
"""

from __future__ import annotations

import ast
import hashlib
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from tasks.store import canonical_json, sha256_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMPUTATION_PACKAGES = ("model", "ops")  # followed through imports; tasks/ and flows/ only orchestrate


@dataclass(frozen=True)
class Gate:
    """Modules a stage runs only when `when(section)` holds for its key section; `option` names the option."""

    option: str
    modules: tuple[str, ...]
    when: Callable[[dict], bool]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    upstream: tuple[str, ...]
    entry: tuple[str, ...]  # dotted modules the stage executes: its tasks/ file and what it launches
    section: str | None = None  # its config section, for the key rule
    excluded: dict[str, str] = field(default_factory=dict)  # option -> why it is not in the key
    gates: tuple[Gate, ...] = ()
    optional_upstream: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # name -> when(cfg)
    volatile: tuple[str, ...] = ()  # artifact files (globs) that record how the run went, not what it computed
    version: int = 1

    def upstream_for(self, cfg) -> tuple[str, ...]:
        """The upstream stages this configuration reads (an optional one only when its option is on)."""
        return tuple(u for u in self.upstream if u not in self.optional_upstream or self.optional_upstream[u](cfg))

    def key(self, section: dict, upstream: dict[str, dict]) -> str:
        """sha256 of: name, format version, the key section, the upstream artifacts' content hashes and the
        fingerprint of the code this section makes the stage run."""
        payload = {"stage": self.name, "version": self.version, "section": section,
                   "upstream": {name: art["content_sha256"] for name, art in sorted(upstream.items())},
                   "code": code_fingerprint(self, section)}
        return sha256_bytes(canonical_json(payload))


def _core_during_training(cfg) -> bool:
    return cfg.pretrain.core_metric_every > 0


LAUNCH_ONLY = "how the run is launched or logged, not what it computes"
# Logs, timings and wandb state: listed and size-checked in the manifest, left out of the content hash.
TRAINING_RUN_RECORDS = ("log.txt", "metrics.jsonl", "wandb/*")  # summary.json counts, minus its timings
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("shards", "Data shards", (), ("tasks.shards", "tasks.download", "tasks.source_identity"), section="data",
          excluded={
        "source": "enters as what it holds: each shard's sha256 (local) or server version (remote)",
        "download_workers": "parallel downloads: the same files arrive",
        "download_attempts": "retries: the same files arrive",
        "download_timeout_s": "network timeout: the same files arrive",
        "num_train_shards": "enters as the resolved list of shard indices",
        "train_tokens_per_shard": "enters as the resolved list of shard indices",
        "chars_per_shard": "enters as the resolved list of shard indices",
        "shard_margin": "enters as the resolved list of shard indices",
    }),
    Stage("tokenizer", "Tokenizer", ("shards",), ("tasks.tokenizer",), section="tokenizer", volatile=("log.txt",)),
    Stage("eval_bundle", "CORE eval bundle", (), ("tasks.eval_bundle", "tasks.source_identity")),
    Stage("pretrain", "Base model training", ("shards", "tokenizer", "eval_bundle"), ("tasks.pretrain", "tasks.training_artifact", "model.train"),
          section="pretrain", excluded={
              "run": f"the wandb run name: {LAUNCH_ONLY}",
              "save_every": "checkpoint period: training is bitwise the same with or without checkpoints, and only "
                            "the final checkpoint enters the artifact",
              "resume_from_step": f"which checkpoint a restart resumes from: {LAUNCH_ONLY}",
              "sample_every": "samples only go to the log",
              "model_tag": "a checkpoint name the pipeline does not use",
          }, gates=(
              Gate("pretrain.core_metric_every", ("model.core_eval", "model.eval_bundle"),
                   lambda s: s["core_metric_every"] > 0),
              # FP8 layers, and disable_fp8 around in-training CORE (a no-op without FP8 layers, but it runs)
              Gate("pretrain.fp8", ("ops.fp8",), lambda s: s["fp8"] or s["core_metric_every"] > 0),
              Gate("pretrain.sample_every", ("model.engine",), lambda s: False),  # samples only go to the log
          ), optional_upstream={"eval_bundle": _core_during_training}, volatile=TRAINING_RUN_RECORDS),
    Stage("base_eval", "Base model evaluation", ("pretrain", "tokenizer", "shards", "eval_bundle"),
          ("tasks.base_eval", "model.evaluate"), section="base_eval",
          excluded={"bundle": "enters as the eval_bundle artifact's content"}, volatile=("log.txt",)),
    Stage("sft", "Chat SFT", ("pretrain", "tokenizer"), ("tasks.sft", "tasks.training_artifact", "model.sft"), section="sft", excluded={
        "save_every": "checkpoint period: training is bitwise the same with or without checkpoints",
        "data": "enters as the files' content digests",
        "sources": "enters as the files' content digests",
    }, gates=(
        Gate("sft.chatcore_every", ("model.chat_scoring", "model.execution"), lambda s: s["chatcore_every"] > 0),
    ), volatile=TRAINING_RUN_RECORDS),
    Stage("chat_eval", "Chat evaluation (SFT)", ("sft", "tokenizer"), ("tasks.chat_eval", "model.chat_eval"),
          section="chat_eval", excluded={"data_dir": "enters as the files' content digest"}, volatile=("log.txt",)),
    Stage("report", "Report", ("shards", "tokenizer", "pretrain", "eval_bundle", "base_eval", "sft", "chat_eval"),
          # the files that write report.md, its plots and its trend section, the verdict and the published artifacts
          ("tasks.report", "tasks.report_render", "tasks.verdict", "tasks.baselines", "tasks.history", "tasks.plots",
           "tasks.publish"),
          section="report"),
)}
STAGE_NAMES = tuple(STAGES)


def key_section(stage: Stage, options) -> dict:
    """A config section's options for the stage's key: all of them but the excluded ones (a pydantic model)."""
    return {k: v for k, v in options.model_dump().items() if k not in stage.excluded}


def launch_section(stage: Stage, options) -> dict:
    """The excluded options, which the stage still passes to what it runs (checkpoint period, run name, ...)."""
    return {k: v for k, v in options.model_dump().items() if k in stage.excluded}


# ---------------------------------------------------------------------------------------------
# the code a stage runs

def module_file(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module (`pkg/mod.py` or `pkg/__init__.py`), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# CPython before 3.11.9 / 3.12.3 keeps the AST builder's recursion counter in shared state, so an AST built
# in another thread at the same moment (a traceback being formatted, another parse) makes ast.parse raise
# SystemError "AST constructor recursion depth mismatch" (python/cpython#106905). A sweep cell hit it in a
# flow run. Our own parses take a lock; a collision with someone else's parse is retried.
_PARSE_LOCK = threading.Lock()
_PARSE_ATTEMPTS = 5


def parse_source(path: Path) -> ast.Module:
    """The file's AST (ast.parse), retried on the CPython collision described above."""
    source = path.read_text()
    for attempt in range(1, _PARSE_ATTEMPTS + 1):
        try:
            with _PARSE_LOCK:
                return ast.parse(source, filename=str(path))
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == _PARSE_ATTEMPTS:
                raise
            time.sleep(0.01 * attempt)


@lru_cache(maxsize=None)
def _parsed_imports(path: Path, root: Path, mtime_ns: int, size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(module-level imports, imports inside functions or branches) of a file, as candidate dotted names."""
    tree = parse_source(path)
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    top, nested = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in (*parts, base) if p)
            # `from pkg import mod` imports the submodule when there is one, else a name from pkg
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        (top if node in tree.body else nested).extend(names)
    return tuple(top), tuple(nested)


def _project_modules(names, root: Path) -> list[str]:
    out = []
    for name in names:
        if name.split(".")[0] in COMPUTATION_PACKAGES and module_file(name, root) is not None:
            out.append(name)
    return out


class GateError(RuntimeError):
    """A gated module is imported at module level, so it would run whatever its option says."""


def code_files(stage: Stage, section: dict | None = None, root: Path = PROJECT_ROOT) -> list[Path]:
    """The files whose bytes a stage's key covers for this key section: its entry modules and the closure of
    their imports into model/ and ops/ (package __init__ files included), minus the modules of gates that are
    off (all gates count as off without a section). Raises GateError if a gated module that is off is imported
    at module level by a module in the closure."""
    off = {m for gate in stage.gates if section is None or not gate.when(section) for m in gate.modules}
    seen: set[str] = set()
    pending = list(stage.entry)
    while pending:
        module = pending.pop()
        if module in seen or module in off:
            continue
        seen.add(module)
        path = module_file(module, root)
        if path is None:
            raise ModuleNotFoundError(f"stage {stage.name}: entry module {module} has no source file under {root}")
        st = path.stat()
        top, nested = _parsed_imports(path, root, st.st_mtime_ns, st.st_size)
        eager = set(_project_modules(top, root))
        bad = sorted(eager & off)
        if bad:
            gate = next(g for g in stage.gates if set(bad) & set(g.modules))
            raise GateError(f"{module} imports {', '.join(bad)} at module level, but stage {stage.name} runs it only "
                            f"when {gate.option} is on; fix: import it inside the code that option guards")
        for name in _project_modules(top + nested, root):
            parts = name.split(".")
            pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # package __init__ files run too
            pending.append(name)
    files = {module_file(m, root) for m in seen}
    return sorted(p for p in files if p is not None)


def code_fingerprint(stage: Stage, section: dict | None = None, root: Path = PROJECT_ROOT) -> str:
    """sha256 over the (relative path, bytes) of `code_files(stage, section)`."""
    h = hashlib.sha256()
    for path in code_files(stage, section, root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def downstream_of(names, graph: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """The named stages and every stage that reads from them, directly or not."""
    graph = graph or {name: stage.upstream for name, stage in STAGES.items()}
    chosen = set(names)
    while True:
        more = {s for s, ups in graph.items() if chosen & set(ups)} - chosen
        if not more:
            return chosen
        chosen |= more
