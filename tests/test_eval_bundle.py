"""Tests for model/eval_bundle.py on the real CORE bundle in ../shared/data/eval_bundle.

The real bundle lists 21 of the 22 CORE tasks (coqa's data is absent). Corrupt or incomplete
bundles are built in tmp_path from core.yaml, the CSV, symlinks to the real data files and
copies of the few small files a test edits.
"""

import shutil
from pathlib import Path

import pytest

from model.eval_bundle import (
    BundleError,
    CoreTask,
    load_bundle,
    load_task_data,
)

REAL_BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_bundle"

CORE_ORDER = [
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "boolq", "bigbench_language_identification",
]
ANSWER_DELIMITED = {"jeopardy", "arc_easy", "arc_challenge", "piqa", "boolq"}
COPA_DATA = Path("eval_data/commonsense_reasoning/copa.jsonl")
WINOGRAD_DATA = Path("eval_data/language_understanding/winograd_wsc.jsonl")


@pytest.fixture(scope="module")
def real_root() -> Path:
    if not (REAL_BUNDLE / "core.yaml").is_file():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE} (the tests read ../shared/data beside the repo)")
    return REAL_BUNDLE


@pytest.fixture(scope="module")
def real_bundle(real_root):
    return load_bundle(real_root, allow_missing=True)


def make_bundle_copy(real_root: Path, dest: Path, copied=(COPA_DATA, WINOGRAD_DATA)) -> Path:
    """core.yaml + CSV copied, the `copied` data files copied (editable), every other data file symlinked."""
    dest.mkdir(parents=True)
    for name in ("core.yaml", "eval_meta_data.csv"):
        shutil.copy(real_root / name, dest / name)
    for source in sorted((real_root / "eval_data").rglob("*.jsonl")):
        relative = source.relative_to(real_root)
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative in copied:
            shutil.copy(source, target)
        else:
            target.symlink_to(source)
    return dest


def task_by_label(bundle, label) -> CoreTask:
    return next(task for task in bundle.tasks if task.label == label)


def replace_line(path: Path, line_number: int, new_line: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line_number - 1] = new_line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the real bundle ---------------------------------------------------------------------------


def test_real_bundle_tasks_expected_and_missing(real_bundle, real_root):
    assert real_bundle.root == real_root
    assert [task.label for task in real_bundle.tasks] == CORE_ORDER
    assert len(real_bundle.expected) == 22
    assert set(real_bundle.expected) == set(CORE_ORDER) | {"coqa"}
    assert real_bundle.missing == ["coqa"]
    assert real_bundle.core_tasks == "21/22"


def test_real_bundle_baselines_match_csv(real_bundle):
    baselines = {task.label: task.baseline for task in real_bundle.tasks}
    assert baselines["hellaswag"] == 25
    assert baselines["boolq"] == 62
    assert baselines["bigbench_language_identification"] == pytest.approx(9.1)
    assert baselines["copa"] == 50
    assert baselines["squad"] == 0


def test_real_bundle_delimiters_shots_and_types(real_bundle):
    for task in real_bundle.tasks:
        assert task.delimiter == ("\nAnswer: " if task.label in ANSWER_DELIMITED else " "), task.label
    shots = {task.label: task.num_fewshot for task in real_bundle.tasks}
    assert shots["hellaswag_zeroshot"] == 0
    assert shots["hellaswag"] == 10
    assert shots["copa"] == 0
    assert shots["agi_eval_lsat_ar"] == 3
    assert shots["lambada_openai"] == 0
    assert shots["boolq"] == 10
    types = {task.label: task.task_type for task in real_bundle.tasks}
    assert types["winograd"] == types["winogrande"] == "schema"
    assert types["squad"] == "language_modeling"
    assert types["arc_easy"] == "multiple_choice"
    copa = task_by_label(real_bundle, "copa")
    assert copa.dataset_uri == "commonsense_reasoning/copa.jsonl"
    assert copa.path == real_bundle.root / "eval_data" / "commonsense_reasoning" / "copa.jsonl"


def test_real_bundle_without_allow_missing_names_coqa_and_fix(real_root):
    with pytest.raises(BundleError) as error:
        load_bundle(real_root)
    message = str(error.value)
    assert "coqa" in message
    assert "base_eval.allow_missing_tasks=true" in message
    assert "add the file" in message


def test_every_real_task_loads_and_validates(real_bundle):
    row_counts = {task.label: len(load_task_data(task)) for task in real_bundle.tasks}
    assert row_counts["copa"] == 100
    assert row_counts["winograd"] == 273
    assert row_counts["boolq"] == 3270
    assert row_counts["bigbench_repeat_copy_logic"] == 32
    assert all(count > 0 for count in row_counts.values())
    first_copa = load_task_data(task_by_label(real_bundle, "copa"))[0]
    assert set(first_copa) >= {"query", "choices", "gold"}


# --- incomplete and corrupt copies -------------------------------------------------------------


def test_deleted_data_file_is_named(real_root, tmp_path):
    root = make_bundle_copy(real_root, tmp_path / "bundle")
    (root / COPA_DATA).unlink()
    with pytest.raises(BundleError) as error:
        load_bundle(root)
    message = str(error.value)
    assert str(root / COPA_DATA) in message
    assert "copa" in message and "coqa" in message
    assert "base_eval.allow_missing_tasks=true" in message

    partial = load_bundle(root, allow_missing=True)
    assert partial.core_tasks == "20/22"
    assert partial.missing == ["copa", "coqa"]  # CSV order
    assert "copa" not in [task.label for task in partial.tasks]


def test_missing_core_yaml_or_csv_is_named(real_root, tmp_path):
    root = make_bundle_copy(real_root, tmp_path / "bundle")
    (root / "core.yaml").unlink()
    with pytest.raises(BundleError, match=r"core\.yaml.*base_eval\.bundle"):
        load_bundle(root, allow_missing=True)

    root = make_bundle_copy(real_root, tmp_path / "bundle2")
    (root / "eval_meta_data.csv").unlink()
    with pytest.raises(BundleError, match=r"eval_meta_data\.csv.*base_eval\.bundle"):
        load_bundle(root, allow_missing=True)

    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere", allow_missing=True)


def test_bad_json_line_names_file_and_line(real_root, tmp_path):
    root = make_bundle_copy(real_root, tmp_path / "bundle")
    replace_line(root / COPA_DATA, 7, '{"query": "truncated", "choices": [')
    copa = task_by_label(load_bundle(root, allow_missing=True), "copa")
    with pytest.raises(BundleError) as error:
        load_task_data(copa)
    assert f"{root / COPA_DATA}:7" in str(error.value)
    assert "invalid JSON" in str(error.value)


def test_rows_missing_keys_or_bad_gold_are_rejected(real_root, tmp_path):
    root = make_bundle_copy(real_root, tmp_path / "bundle")
    bundle = load_bundle(root, allow_missing=True)

    replace_line(root / COPA_DATA, 3, '{"query": "q", "choices": ["a", "b"]}')
    with pytest.raises(BundleError, match=r"copa\.jsonl:3: .*gold"):
        load_task_data(task_by_label(bundle, "copa"))

    replace_line(root / COPA_DATA, 3, '{"query": "q", "choices": ["a", "b"], "gold": 2}')
    with pytest.raises(BundleError, match=r"copa\.jsonl:3: .*gold"):
        load_task_data(task_by_label(bundle, "copa"))

    replace_line(root / WINOGRAD_DATA, 5, '{"context_options": ["a", "b"], "gold": 0}')
    with pytest.raises(BundleError, match=r"winograd_wsc\.jsonl:5: .*continuation"):
        load_task_data(task_by_label(bundle, "winograd"))


def edit_core_yaml(root: Path, old: str, new: str, count: int = 1) -> None:
    path = root / "core.yaml"
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def test_unknown_task_type_names_entry(real_root, tmp_path):
    root = make_bundle_copy(real_root, tmp_path / "bundle")
    edit_core_yaml(root, "icl_task_type: schema", "icl_task_type: cloze")
    with pytest.raises(BundleError) as error:
        load_bundle(root, allow_missing=True)
    message = str(error.value)
    assert "core.yaml" in message and "winograd" in message and "cloze" in message


def test_core_yaml_entry_problems(real_root, tmp_path):
    root = make_bundle_copy(real_root, tmp_path / "no_uri")
    edit_core_yaml(root, "  dataset_uri: commonsense_reasoning/copa.jsonl\n", "")
    with pytest.raises(BundleError, match=r"core\.yaml.*copa.*dataset_uri"):
        load_bundle(root, allow_missing=True)

    root = make_bundle_copy(real_root, tmp_path / "duplicate")
    edit_core_yaml(root, "label: hellaswag_zeroshot", "label: hellaswag")
    with pytest.raises(BundleError, match=r"core\.yaml.*hellaswag.*twice"):
        load_bundle(root, allow_missing=True)

    root = make_bundle_copy(real_root, tmp_path / "no_baseline")
    edit_core_yaml(root, "label: copa", "label: copa_v2")
    with pytest.raises(BundleError, match=r"copa_v2.*eval_meta_data\.csv.*baseline"):
        load_bundle(root, allow_missing=True)


def test_nested_eval_bundle_folder_is_accepted(real_root, tmp_path):
    make_bundle_copy(real_root, tmp_path / "unzipped" / "eval_bundle")
    bundle = load_bundle(tmp_path / "unzipped", allow_missing=True)
    assert bundle.root == tmp_path / "unzipped" / "eval_bundle"
    assert [task.label for task in bundle.tasks] == CORE_ORDER
    assert bundle.core_tasks == "21/22"
