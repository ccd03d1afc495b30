"""The stage registry (tasks/stages.py): keys, the code each stage runs (computed import closures), gates,
and the key rule for options.

The closure tests run on the real repository copied to a temporary directory: for every stage, editing any
file in its closure changes its key and editing any other project file does not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.stages import (STAGE_NAMES, STAGES, GateError, Stage, code_files, code_fingerprint, downstream_of,
                          key_section)

REPO = Path(__file__).resolve().parents[1]
UP = {"tokenizer": {"content_sha256": "a" * 64, "path": "/x"}, "shards": {"content_sha256": "b" * 64}}


# ------------------------------------------------------------------------------------------------- keys

def test_key_deterministic_and_independent_of_dict_order():
    stage = STAGES["tokenizer"]
    a = {"vocab_size": 1024, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "vocab_size": 1024}
    k = stage.key(a, UP)
    assert len(k) == 64 and stage.key(b, dict(reversed(list(UP.items())))) == k


def test_key_changes_with_inputs_but_not_with_where_upstream_lives():
    stage, section = STAGES["tokenizer"], {"vocab_size": 1024}
    base = stage.key(section, UP)
    assert stage.key({"vocab_size": 2048}, UP) != base
    assert stage.key(section, {**UP, "tokenizer": {"content_sha256": "c" * 64}}) != base
    assert stage.key(section, {"tokenizer": UP["tokenizer"]}) != base  # an upstream dropped
    assert Stage("tokenizer", "t", (), stage.entry, version=2).key(section, UP) != base
    moved = {**UP, "tokenizer": {"content_sha256": "a" * 64, "path": "/elsewhere", "metrics": {"x": 1}}}
    assert stage.key(section, moved) == base


# ----------------------------------------------------------------------------------- import closures

def write_project(root: Path) -> None:
    """A small project: model/ imports at module level, inside functions, relatively and as `from pkg import
    mod`; tasks/ is orchestration (only entry files count)."""
    files = {
        "model/__init__.py": "",
        "model/a.py": "import model.b\nfrom model import c\n\ndef f():\n    from . import d\n",
        "model/b.py": "X = 1\n",
        "model/c.py": "from model.b import X\n",
        "model/d.py": "import json\n",
        "model/gated.py": "import model.e\n",
        "model/e.py": "",
        "model/unused.py": "",
        "ops/__init__.py": "",
        "ops/k.py": "",
        "tasks/__init__.py": "",
        "tasks/stage.py": "import tasks.helper\nimport model.a\n",
        "tasks/helper.py": "import ops.k\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def rel(paths, root):
    return sorted(p.relative_to(root).as_posix() for p in paths)


def test_closure_follows_model_and_ops_imports_everywhere_and_tasks_only_as_entries(tmp_path):
    write_project(tmp_path)
    stage = Stage("x", "x", (), ("tasks.stage",))
    assert rel(code_files(stage, {}, tmp_path), tmp_path) == [
        "model/__init__.py", "model/a.py", "model/b.py", "model/c.py", "model/d.py", "tasks/stage.py"]
    fp = code_fingerprint(stage, {}, tmp_path)
    (tmp_path / "tasks" / "helper.py").write_text("import ops.k\n# orchestration\n")
    (tmp_path / "model" / "unused.py").write_text("# not imported\n")
    assert code_fingerprint(stage, {}, tmp_path) == fp
    (tmp_path / "model" / "d.py").write_text("import json\n# reached through a nested relative import\n")
    assert code_fingerprint(stage, {}, tmp_path) != fp


def test_gated_module_counts_only_when_its_option_is_on_and_must_be_imported_lazily(tmp_path):
    write_project(tmp_path)
    (tmp_path / "model" / "a.py").write_text("def f():\n    import model.gated\n")
    from tasks.stages import Gate

    stage = Stage("x", "x", (), ("model.a",), gates=(Gate("x.on", ("model.gated",), lambda s: s["on"]),))
    assert rel(code_files(stage, {"on": False}, tmp_path), tmp_path) == ["model/__init__.py", "model/a.py"]
    assert "model/e.py" in rel(code_files(stage, {"on": True}, tmp_path), tmp_path)
    (tmp_path / "model" / "a.py").write_text("import model.gated\n")  # eager: it would run regardless
    with pytest.raises(GateError, match="model.a imports model.gated at module level.*x.on"):
        code_files(stage, {"on": False}, tmp_path)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for package in ("model", "ops", "tasks", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def smoke_sections() -> dict[str, dict]:
    """Representative key sections: the options the gates read, as the smoke preset sets them."""
    cfg = load_config("smoke")
    return {"pretrain": key_section(STAGES["pretrain"], cfg.pretrain), "sft": key_section(STAGES["sft"], cfg.sft)}


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_editing_a_file_in_a_stage_closure_changes_its_key_and_any_other_file_does_not(repo_copy, name):
    stage, section = STAGES[name], smoke_sections().get(name, {})
    inside = set(code_files(stage, section, repo_copy))
    project = sorted(p for pkg in ("model", "ops", "tasks", "flows") for p in (repo_copy / pkg).rglob("*.py"))
    assert inside and inside <= set(project)
    for path in project:
        before = code_fingerprint(stage, section, repo_copy)
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            changed = code_fingerprint(stage, section, repo_copy) != before
        finally:
            path.write_bytes(original)
        assert changed == (path in inside), f"{name}: {path.relative_to(repo_copy)} (in closure: {path in inside})"


def test_stage_closures_follow_the_options():
    """Smoke runs neither CORE nor sampling nor FP8 during training, and no ChatCORE during SFT: that code is
    not in those keys. Turned on, it is."""
    sections = smoke_sections()
    names = lambda stage, section: {p.relative_to(REPO).as_posix() for p in code_files(STAGES[stage], section)}  # noqa: E731
    pretrain = names("pretrain", sections["pretrain"])
    assert {"model/train.py", "model/gpt.py", "model/optim.py", "ops/attention.py", "tasks/pretrain.py",
            "tasks/training_artifact.py"} <= pretrain
    assert not {"model/core_eval.py", "model/eval_bundle.py", "model/engine.py", "ops/fp8.py", "model/sft.py"} & pretrain
    with_core = names("pretrain", {**sections["pretrain"], "core_metric_every": 100})
    assert {"model/core_eval.py", "model/eval_bundle.py", "ops/fp8.py"} <= with_core
    assert "model/engine.py" not in names("pretrain", {**sections["pretrain"], "sample_every": 100})  # log only
    sft = names("sft", sections["sft"])
    assert {"model/sft.py", "model/sft_loader.py", "model/chat_data.py"} <= sft
    assert not {"model/chat_scoring.py", "model/chat_eval.py", "model/core_eval.py", "model/train.py", "model/execution.py"} & sft
    assert {"model/chat_scoring.py", "model/execution.py"} <= names("sft", {**sections["sft"], "chatcore_every": 10})
    assert "model/core_eval.py" in names("base_eval", {}) and "model/sft.py" not in names("base_eval", {})
    # the verdict decides what the report says; the renderer, the trend and the plots write it
    assert {"tasks/report.py", "tasks/report_render.py", "tasks/verdict.py", "tasks/baselines.py", "tasks/history.py", "tasks/plots.py",
            "tasks/publish.py"} <= names("report", {})


# ---------------------------------------------------------------------------------------- registry

def test_registry_is_the_one_list_of_stages():
    from flows.speedrun import stage_graph, stages_to_refresh
    from tasks.report_render import STAGES as REPORT_TITLES

    assert STAGE_NAMES == ("shards", "tokenizer", "eval_bundle", "pretrain", "base_eval", "sft", "chat_eval", "report")
    assert list(REPORT_TITLES) == list(STAGE_NAMES[:-1])
    assert all(u in STAGES and STAGE_NAMES.index(u) < STAGE_NAMES.index(n) for n, s in STAGES.items() for u in s.upstream)
    smoke = load_config("smoke")
    assert stage_graph(smoke)["pretrain"] == ("shards", "tokenizer")  # no in-training CORE: no bundle upstream
    assert stage_graph(load_config("smoke", {"pretrain.core_metric_every": 10}))["pretrain"] == \
        ("shards", "tokenizer", "eval_bundle")
    assert stages_to_refresh(["sft"]) == downstream_of(["sft"]) == {"sft", "chat_eval", "report"}


# ------------------------------------------------------------------------------------ the key rule

EXCLUDED = {  # stage -> options of its config section that stay out of its key (the rule: stages.py)
    "shards": {"source", "download_workers", "download_attempts", "download_timeout_s", "num_train_shards",
               "train_tokens_per_shard", "chars_per_shard", "shard_margin"},
    "tokenizer": set(),
    "eval_bundle": set(),
    "pretrain": {"run", "save_every", "resume_from_step", "sample_every", "model_tag"},
    "base_eval": {"bundle"},
    "sft": {"save_every", "data", "sources"},
    "chat_eval": {"data_dir"},
    "report": set(),
}


def test_every_excluded_option_is_listed_with_a_reason():
    """Only how a run is launched, logged or checkpointed stays out of a key, or an option that enters in
    another form (content digests, the resolved shard list); each exclusion says why."""
    cfg = load_config("smoke")
    assert {name: set(stage.excluded) for name, stage in STAGES.items()} == EXCLUDED
    for name, stage in STAGES.items():
        if stage.excluded:
            fields = set(getattr(cfg, stage.section).model_dump())
            assert set(stage.excluded) <= fields, name
            assert all(len(why) > 20 for why in stage.excluded.values()), name


def test_checkpoint_period_and_run_name_do_not_change_the_pretrain_key():
    from tasks.pretrain import pretrain_section

    base = pretrain_section(load_config("smoke"))
    for change in ({"pretrain.save_every": 5}, {"pretrain.run": "mine"}, {"pretrain.sample_every": 7}):
        assert pretrain_section(load_config("smoke", change)) == base, change
    assert pretrain_section(load_config("smoke", {"pretrain.eval_every": 5})) != base
    assert pretrain_section(load_config("smoke", {"base_eval.allow_missing_tasks": False})) == base  # CORE is off


def test_environment_that_changes_the_bits_is_in_the_model_stage_keys(monkeypatch):
    from model.common import DTYPE_ENV_VARS
    from tasks.base_eval import base_eval_section
    from tasks.environment import DTYPE_ENV_VARS as ORCHESTRATOR_DTYPE_VARS
    from tasks.pretrain import pretrain_section

    assert ORCHESTRATOR_DTYPE_VARS == DTYPE_ENV_VARS
    cfg = load_config("smoke")
    env = pretrain_section(cfg)["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["world_size"] == 1
    assert env["torch"].startswith("2.") and env["attention"] == "sdpa"
    monkeypatch.setenv("SPEEDRUN_DTYPE", "bfloat16")
    assert pretrain_section(cfg)["environment"]["dtype"] == "bfloat16"
    assert STAGES["pretrain"].key(pretrain_section(cfg), UP) != STAGES["pretrain"].key({**pretrain_section(cfg),
                                                                                        "environment": env}, UP)
    monkeypatch.delenv("SPEEDRUN_DTYPE")
    two = load_config("smoke", {"runtime.nproc_per_node": 2, "sft.total_batch_size": 4096})
    assert base_eval_section(two)["environment"]["world_size"] == 2


def test_parse_source_survives_asts_built_in_other_threads():
    """CPython < 3.11.9 / 3.12.3 shares the AST builder's recursion counter between threads
    (python/cpython#106905): an ast.parse that another thread's parse interrupts (here: garbage collection
    running finalizers mid-build, at a tiny switch interval) raises SystemError. A sweep cell's flow run hit
    it while fingerprinting code; the fingerprint's parser must not."""
    import ast
    import gc
    import sys
    import threading

    from tasks.stages import parse_source

    class Finalized:
        def __del__(self):
            sum(range(50))

    def garbage() -> None:
        cycle = [Finalized() for _ in range(20)]
        for item in cycle:
            item.self = item

    other = (REPO / "model" / "gpt.py").read_text()
    stop = threading.Event()

    def parse_elsewhere() -> None:
        while not stop.is_set():
            garbage()
            try:
                ast.parse(other)
            except SystemError:
                pass

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(20, 2, 2)
    threads = [threading.Thread(target=parse_elsewhere) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(150):  # unfixed, ast.parse fails ~1 in 20 here
            garbage()
            assert isinstance(parse_source(REPO / "tasks" / "stages.py"), ast.Module)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
