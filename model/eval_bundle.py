"""Reading and validating the CORE eval bundle (docs/evaluation.md#eval-bundle).

A bundle is a directory holding `core.yaml` (the `icl_tasks` list), `eval_meta_data.csv` (the
expected CORE task set and each task's random baseline, in percent) and `eval_data/` (one JSONL
file per task). `load_bundle` turns it into a `Bundle` of `CoreTask`s and `load_task_data` reads and
checks one task's rows. Every problem is a `BundleError` that names the file (and line, or
core.yaml entry) at fault and says how to fix it. The pipeline content-addresses the bundle by its
bytes (tasks/eval_bundle.py `bundle_identity`, and the eval_bundle artifact's content hash).

Pure Python: no torch, no prefect.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from model.files import JsonlError, jsonl_rows

CORE_YAML = "core.yaml"
META_CSV = "eval_meta_data.csv"
DATA_DIR = "eval_data"
NESTED_BUNDLE_DIR = "eval_bundle"  # the reference zip unpacks to a single top-level folder of this name

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "
REQUIRED_ENTRY_KEYS = ("label", "dataset_uri", "num_fewshot", "icl_task_type")
CSV_TASK_COLUMN = "Eval Task"
CSV_BASELINE_COLUMN = "Random baseline"

ROOT_FIX = (
    f"point base_eval.bundle at a directory holding {CORE_YAML}, {META_CSV} and {DATA_DIR}/ "
    "(or leave it unset to download the reference bundle)"
)
MISSING_FIX = "add the file, or set base_eval.allow_missing_tasks=true to average CORE over the present tasks"


class BundleError(ValueError):
    """The eval bundle is missing or corrupt; the message names the file at fault and the fix."""


@dataclass(frozen=True)
class CoreTask:
    """One CORE task as configured by core.yaml, with its baseline from the CSV."""

    label: str
    task_type: str  # "multiple_choice" | "schema" | "language_modeling"
    dataset_uri: str  # relative to eval_data/
    num_fewshot: int  # first element of the yaml list
    delimiter: str  # continuation_delimiter, default " "
    baseline: float  # random-guess accuracy in percent (e.g. 25.0)
    path: Path  # the JSONL data file


@dataclass(frozen=True)
class Bundle:
    """The present CORE tasks (core.yaml order) against the expected set (CSV order)."""

    root: Path
    tasks: list[CoreTask]
    expected: list[str]
    missing: list[str]

    @property
    def core_tasks(self) -> str:
        """How many of the expected tasks CORE averages over, e.g. "21/22"."""
        return f"{len(self.tasks)}/{len(self.expected)}"

    @property
    def core_yaml_path(self) -> Path:
        return self.root / CORE_YAML

    @property
    def meta_csv_path(self) -> Path:
        return self.root / META_CSV


def resolve_bundle_root(root: str | Path) -> Path:
    """The directory holding core.yaml and the CSV: `root` itself, or its single `eval_bundle/` folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BundleError(f"eval bundle directory {root} does not exist; {ROOT_FIX}")
    nested = root / NESTED_BUNDLE_DIR
    if not (root / CORE_YAML).exists() and not (root / META_CSV).exists() and nested.is_dir():
        root = nested
    for name in (CORE_YAML, META_CSV):
        if not (root / name).is_file():
            raise BundleError(f"eval bundle at {root} has no {name} ({root / name} not found); {ROOT_FIX}")
    return root


def _read_baselines(csv_path: Path) -> dict[str, float]:
    """Expected task label -> random baseline (percent), in CSV row order."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            for column in (CSV_TASK_COLUMN, CSV_BASELINE_COLUMN):
                if column not in columns:
                    raise BundleError(
                        f"{csv_path} has no '{column}' column (columns: {columns}); "
                        f"restore the bundle's {META_CSV}"
                    )
            baselines: dict[str, float] = {}
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                line = reader.line_num
                label = row[CSV_TASK_COLUMN]
                if not label:
                    continue
                if label in baselines:
                    raise BundleError(f"{csv_path}:{line}: task '{label}' is listed twice; keep one row per task")
                try:
                    baselines[label] = float(row[CSV_BASELINE_COLUMN])
                except ValueError:
                    raise BundleError(
                        f"{csv_path}:{line}: '{CSV_BASELINE_COLUMN}' of task '{label}' is "
                        f"{row[CSV_BASELINE_COLUMN]!r}, not a number (a percentage such as 25)"
                    ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BundleError(f"cannot read {csv_path}: {e}; restore the bundle's {META_CSV}") from e
    if not baselines:
        raise BundleError(f"{csv_path} lists no tasks; restore the bundle's {META_CSV}")
    return baselines


def _read_icl_entries(yaml_path: Path) -> list[dict]:
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BundleError(f"cannot parse {yaml_path}: {e}; restore the bundle's {CORE_YAML}") from e
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BundleError(f"{yaml_path} needs a top-level 'icl_tasks' list of task entries (mappings)")
    return entries


def _first_fewshot(value, where: str) -> int:
    shots = value[0] if isinstance(value, list) and value else value
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise BundleError(f"{where}: num_fewshot must be a list of non-negative integers such as [10], got {value!r}")
    return shots


def _parse_entry(entry: dict, index: int, yaml_path: Path, root: Path, baselines: dict[str, float]) -> CoreTask:
    where = f"{yaml_path} icl_tasks[{index}] ({entry.get('label', '?')})"
    absent = [key for key in REQUIRED_ENTRY_KEYS if key not in entry]
    if absent:
        raise BundleError(
            f"{where}: missing key(s) {', '.join(absent)}; each entry needs {', '.join(REQUIRED_ENTRY_KEYS)}"
        )
    label, uri, task_type = entry["label"], entry["dataset_uri"], entry["icl_task_type"]
    if not isinstance(label, str) or not label:
        raise BundleError(f"{where}: label must be a non-empty string, got {label!r}")
    if task_type not in TASK_TYPES:
        raise BundleError(f"{where}: unknown icl_task_type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    uri_path = PurePosixPath(uri) if isinstance(uri, str) else None
    if uri_path is None or not uri or uri_path.is_absolute() or ".." in uri_path.parts:
        raise BundleError(f"{where}: dataset_uri must be a path relative to {DATA_DIR}/, got {uri!r}")
    delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
    if not isinstance(delimiter, str):
        raise BundleError(f"{where}: continuation_delimiter must be a string, got {delimiter!r}")
    if label not in baselines:
        raise BundleError(
            f"{where}: task '{label}' has no row in {root / META_CSV}, so there is no random baseline to "
            f"center it with; add a row ('{CSV_TASK_COLUMN}', '{CSV_BASELINE_COLUMN}') or remove the entry"
        )
    return CoreTask(
        label=label,
        task_type=task_type,
        dataset_uri=uri,
        num_fewshot=_first_fewshot(entry["num_fewshot"], where),
        delimiter=delimiter,
        baseline=baselines[label],
        path=root / DATA_DIR / uri_path,
    )


def load_bundle(root: str | Path, allow_missing: bool = False) -> Bundle:
    """Read and check core.yaml, the CSV and the presence of every listed data file.

    Expected tasks (the CSV's) that core.yaml does not list, or whose data file is absent or
    empty, are `missing`: a BundleError unless `allow_missing`, in which case `tasks` holds only
    the present ones. Row contents are checked by `load_task_data`.
    """
    root = resolve_bundle_root(root)
    yaml_path = root / CORE_YAML
    baselines = _read_baselines(root / META_CSV)
    configured: list[CoreTask] = []
    seen: set[str] = set()
    for index, entry in enumerate(_read_icl_entries(yaml_path)):
        task = _parse_entry(entry, index, yaml_path, root, baselines)
        if task.label in seen:
            raise BundleError(
                f"{yaml_path} icl_tasks[{index}] ({task.label}): label listed twice; keep one entry per task"
            )
        seen.add(task.label)
        configured.append(task)

    def is_present(task: CoreTask) -> bool:
        return task.path.is_file() and task.path.stat().st_size > 0

    expected = list(baselines)
    present = [task for task in configured if is_present(task)]
    present_labels = {task.label for task in present}
    configured_by_label = {task.label: task for task in configured}
    missing = [label for label in expected if label not in present_labels]
    if missing and not allow_missing:
        reasons = []
        for label in missing:
            task = configured_by_label.get(label)
            if task is None:
                reasons.append(
                    f"  {label}: not listed in {yaml_path} (expected by {root / META_CSV}); "
                    f"add an icl_tasks entry and its data file under {root / DATA_DIR}"
                )
            elif task.path.exists():
                reasons.append(f"  {label}: data file {task.path} is empty or not a file")
            else:
                reasons.append(f"  {label}: data file {task.path} not found")
        raise BundleError(
            f"eval bundle at {root} is missing {len(missing)} of {len(expected)} CORE tasks:\n"
            + "\n".join(reasons)
            + f"\nFix: {MISSING_FIX}"
        )
    return Bundle(root=root, tasks=present, expected=expected, missing=missing)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _row_problem(task_type: str, row) -> str | None:
    """What is wrong with one JSONL row for this task type, or None if it is usable."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if task_type == "multiple_choice":
        need = ("query", "choices", "gold")
        options_key = "choices"
    elif task_type == "schema":
        need = ("context_options", "continuation", "gold")
        options_key = "context_options"
    else:
        need = ("context", "continuation")
        options_key = None
    absent = [key for key in need if key not in row]
    if absent:
        return f"missing key(s) {', '.join(absent)} (a {task_type} row needs {', '.join(need)})"
    for key in ("query", "context", "continuation"):
        if key in need and not isinstance(row[key], str):
            return f"'{key}' must be a string, got {type(row[key]).__name__}"
    if options_key is not None:
        options, gold = row[options_key], row["gold"]
        if not _is_str_list(options):
            return f"'{options_key}' must be a non-empty list of strings"
        if not _is_index(gold) or not 0 <= gold < len(options):
            return f"'gold' must be an integer index into '{options_key}' (0..{len(options) - 1}), got {gold!r}"
    return None


def load_task_data(task: CoreTask) -> list[dict]:
    """The task's JSONL rows, each checked for the keys its type needs; BundleError names file:line."""
    fix = f"restore {task.path} from the reference bundle"
    try:
        text = task.path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"data file {task.path} of task '{task.label}' not found; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read data file {task.path} of task '{task.label}': {e}; {fix}") from e
    rows = []
    try:
        for line_number, row in jsonl_rows(text.splitlines()):
            problem = _row_problem(task.task_type, row)
            if problem:
                raise BundleError(f"{task.path}:{line_number}: bad row for task '{task.label}': {problem}; {fix}")
            rows.append(row)
    except JsonlError as e:
        raise BundleError(f"{task.path}:{e.line_number}: invalid JSON ({e.msg}); {fix}") from None
    if not rows:
        raise BundleError(f"data file {task.path} of task '{task.label}' has no rows; {fix}")
    return rows
