"""Collecting a finished training run into its artifact is crash-safe at every point (tasks/training_artifact.py).

A child process collects a finished run and SIGKILLs itself just before its k-th file operation, for every k;
after each crash the run's final checkpoint must still be complete in work/ (marker and every file, unchanged),
and collecting again must give the full artifact.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import last_complete_step
from tasks.training_artifact import collect_training_run, release_final_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
FINAL = 20
CHECKPOINT_FILES = [f"model_{FINAL:06d}.pt", f"meta_{FINAL:06d}.json", f"optim_{FINAL:06d}_rank0.pt",
                    f"optim_{FINAL:06d}_rank1.pt", f"loader_{FINAL:06d}_rank0.pt", f"loader_{FINAL:06d}_rank1.pt"]

# Runs collect_training_run, killing itself with SIGKILL before file operation number CRASH_AT (-1: never);
# prints how many operations it made.
COLLECTOR = r"""
import os, shutil, signal, sys
from pathlib import Path
from tasks import training_artifact

run_dir, work, art, crash_at = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
count = 0

def crashing(fn):
    def op(*args, **kwargs):
        global count
        if count == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        count += 1
        return fn(*args, **kwargs)
    return op

for module, name in ((os, "link"), (os, "replace"), (shutil, "copy2"), (os, "unlink"), (Path, "unlink")):
    setattr(module, name, crashing(getattr(module, name)))
training_artifact.collect_training_run(run_dir, work, art)
print(count)
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finished_run(root: Path) -> tuple[Path, Path, Path]:
    """A work/ directory as a finished 2-rank run leaves it: an earlier checkpoint, the final one, its marker."""
    art = root / "art"
    work = art / "work"
    run_dir = work / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (10, FINAL):
        for name in CHECKPOINT_FILES:
            (checkpoints / name.replace(f"{FINAL:06d}", f"{step:06d}")).write_bytes(os.urandom(4096))
        (checkpoints / f"complete_{step:06d}").write_text("")
    (run_dir / "summary.json").write_text(json.dumps({"step": FINAL, "min_val_bpb": 1.5}))
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    (work / "log.txt").write_text("$ torchrun ...\n")
    return run_dir, work, art


def collect(run_dir: Path, work: Path, art: Path, crash_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COLLECTOR, str(run_dir), str(work), str(art), str(crash_at)],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=60)


def test_a_collection_killed_at_any_point_loses_nothing_and_completes_when_redone(tmp_path):
    run_dir, work, art = finished_run(tmp_path / "count")
    done = collect(run_dir, work, art, -1)
    assert done.returncode == 0, done.stderr
    operations = int(done.stdout)
    assert operations >= len(CHECKPOINT_FILES) + 3

    for crash_at in range(operations):
        root = tmp_path / f"crash{crash_at}"
        run_dir, work, art = finished_run(root)
        checkpoints = run_dir / "checkpoints"
        before = {p.name: digest(p) for p in checkpoints.iterdir()}
        crashed = collect(run_dir, work, art, crash_at)
        assert crashed.returncode == -9, (crash_at, crashed.stderr)
        # the final checkpoint is whole where the trainer would resume from it
        assert last_complete_step(checkpoints) == FINAL, crash_at
        assert {p.name: digest(p) for p in checkpoints.iterdir() if not p.name.startswith(".")} == before, crash_at
        collect_training_run(run_dir, work, art)  # the stage runs again (here, in-process): collecting completes
        assert sorted(p.name for p in (art / "checkpoint").iterdir()) == sorted(CHECKPOINT_FILES)
        assert all(digest(art / "checkpoint" / name) == before[name] for name in CHECKPOINT_FILES)
        assert json.loads((art / "summary.json").read_text())["step"] == FINAL


def test_after_the_commit_work_gives_up_the_final_checkpoint(tmp_path):
    run_dir, work, art = finished_run(tmp_path)
    collect_training_run(run_dir, work, art)
    kept = {name: digest(art / "checkpoint" / name) for name in CHECKPOINT_FILES}
    release_final_checkpoint(art)
    checkpoints = run_dir / "checkpoints"
    assert last_complete_step(checkpoints) == 10  # a rebuild of a damaged artifact never resumes from its bytes
    assert not list(checkpoints.glob(f"*_{FINAL:06d}*"))
    assert {name: digest(art / "checkpoint" / name) for name in CHECKPOINT_FILES} == kept  # links, not the data


@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links here")
def test_the_checkpoint_is_linked_not_copied(tmp_path):
    run_dir, work, art = finished_run(tmp_path)
    collect_training_run(run_dir, work, art)
    for name in CHECKPOINT_FILES:
        assert os.path.samefile(art / "checkpoint" / name, run_dir / "checkpoints" / name)
