"""deployments/nightly_pull.py with real git: the first night clones the branch head, the next pulls the new
head, and every way a pull fails says why (the end-to-end nightly is in tests/test_deployment_e2e.py)."""

import subprocess
from pathlib import Path

import pytest

from deployments.nightly_pull import NightlyPullError, pull_branch


def git(*args: str, cwd: Path) -> str:
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                         check=True, capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


@pytest.fixture
def origin(tmp_path) -> Path:
    """A bare repository with branch main, and a developer clone `dev` beside it that pushes to it."""
    dev = tmp_path / "dev"
    dev.mkdir()
    git("init", "-q", "-b", "main", cwd=dev)
    (dev / "night.txt").write_text("1\n")
    git("add", "-A", cwd=dev)
    git("commit", "-q", "-m", "night 1", cwd=dev)
    subprocess.run(["git", "clone", "-q", "--bare", str(dev), str(tmp_path / "origin.git")], check=True)
    git("remote", "add", "origin", str(tmp_path / "origin.git"), cwd=dev)
    return tmp_path / "origin.git"


def test_first_night_clones_and_the_next_pulls_the_new_head(origin, tmp_path, monkeypatch):
    nightly = tmp_path / "nightly"
    nightly.mkdir()
    monkeypatch.chdir(nightly)  # what set_working_directory does before this step
    assert pull_branch(str(origin), "main") == {"directory": "speedrun"}
    assert (nightly / "speedrun" / "night.txt").read_text() == "1\n"
    dev = tmp_path / "dev"
    (dev / "night.txt").write_text("2\n")
    git("commit", "-q", "-am", "night 2", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    assert pull_branch(str(origin), "main") == {"directory": "speedrun"}
    assert git("rev-parse", "HEAD", cwd=nightly / "speedrun") == git("rev-parse", "HEAD", cwd=dev)


@pytest.mark.parametrize("repository, branch, message", [
    ("{{ $SPEEDRUN_REPOSITORY }}", "main", r"SPEEDRUN_REPOSITORY is not set in the worker's environment"),
    ("ORIGIN", "nightly-gone", r"branch 'nightly-gone' does not exist in .*origin\.git; fix: push it"),
    ("NOWHERE", "main", r"could not read .*nowhere\.git: git says .*; fix: check the URL"),
])
def test_a_failed_pull_says_why(origin, tmp_path, monkeypatch, repository, branch, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)  # outside a deployment run: no state to set
    repository = repository.replace("ORIGIN", str(origin)).replace("NOWHERE", str(tmp_path / "nowhere.git"))
    with pytest.raises(NightlyPullError, match=message):
        pull_branch(repository, branch)
    assert not (tmp_path / "speedrun").exists()
