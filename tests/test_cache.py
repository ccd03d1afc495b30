"""Swapping a rebuilt artifact in (tasks/cache.py): the previous artifact stays valid until the new one is
complete, and a crash between the two renames of the swap is completed on the next run."""

import time
from pathlib import Path

from tasks.cache import _finish_swap, _swap_in, rebuild_dir
from tasks.store import artifact_record, check_artifact, write_manifest


def make_artifact(path: Path, text: str, store: Path) -> dict:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(text)
    return write_manifest(path, stage="x", key=path.name.split(".")[0], metrics={"v": text}, store_root=store,
                          started_at=time.time())


def test_swap_replaces_the_artifact_only_with_a_complete_rebuild(tmp_path):
    art = tmp_path / "stages" / "x" / "k"
    make_artifact(art, "old", tmp_path)
    make_artifact(rebuild_dir(art), "new", tmp_path)
    assert artifact_record(art, tmp_path)["metrics"] == {"v": "old"}
    _swap_in(art, rebuild_dir(art))
    assert check_artifact(art, tmp_path) is None and artifact_record(art, tmp_path)["metrics"] == {"v": "new"}
    assert sorted(p.name for p in art.parent.iterdir()) == ["k"]  # no .old, no .rebuild left behind


def test_a_swap_interrupted_between_its_renames_is_completed(tmp_path):
    art = tmp_path / "stages" / "x" / "k"
    make_artifact(rebuild_dir(art), "new", tmp_path)  # the old artifact was renamed away, then the crash
    _finish_swap(art, tmp_path)
    assert check_artifact(art, tmp_path) is None and artifact_record(art, tmp_path)["metrics"] == {"v": "new"}


def test_an_unfinished_rebuild_never_replaces_a_valid_artifact(tmp_path):
    art = tmp_path / "stages" / "x" / "k"
    make_artifact(art, "old", tmp_path)
    (rebuild_dir(art) / "work").mkdir(parents=True)  # a refresh in progress, or killed: no manifest
    _finish_swap(art, tmp_path)
    assert artifact_record(art, tmp_path)["metrics"] == {"v": "old"} and rebuild_dir(art).exists()
    (tmp_path / "other").mkdir()
    _finish_swap(tmp_path / "other" / "k", tmp_path)  # nothing there at all: nothing happens
    assert not (tmp_path / "other" / "k").exists()
