"""tasks.eval_bundle.fetch_bundle: a directory, a local zip, a zip over real HTTP, and the failure cases."""

import http.server
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from model.eval_bundle import BundleError, load_bundle
from tasks.eval_bundle import fetch_bundle


@pytest.fixture(scope="module")
def bundle_zip(shared_data, tmp_path_factory) -> Path:
    """The real bundle zipped the way the reference ships it: one top-level eval_bundle/ folder."""
    path = tmp_path_factory.mktemp("zip") / "eval_bundle.zip"
    src = shared_data / "eval_bundle"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, Path("eval_bundle") / f.relative_to(src))
    return path


def assert_complete(dest: Path) -> None:
    bundle = load_bundle(dest, allow_missing=True)
    assert bundle.core_tasks == "21/22" and bundle.missing == ["coqa"]


def test_directory_source_is_copied(shared_data, tmp_path):
    fetch_bundle(str(shared_data / "eval_bundle"), tmp_path / "dest", tmp_path / "work")
    assert_complete(tmp_path / "dest")


def test_local_zip_is_unpacked(bundle_zip, tmp_path):
    (tmp_path / "work").mkdir()
    fetch_bundle(str(bundle_zip), tmp_path / "dest", tmp_path / "work")
    assert_complete(tmp_path / "dest")


def test_zip_url_is_downloaded_and_reused(bundle_zip, tmp_path):
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.command)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(bundle_zip.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        work = tmp_path / "work"
        work.mkdir()
        fetch_bundle(url, tmp_path / "dest", work)
        assert_complete(tmp_path / "dest")
        assert (work / "eval_bundle.zip").is_file() and not list(work.glob("*.tmp"))
        fetch_bundle(url, tmp_path / "dest2", work)  # a retry reuses the finished download
        assert_complete(tmp_path / "dest2")
        assert requests.count("GET") == 1  # fsspec may probe with HEAD first
    finally:
        server.shutdown()
        server.server_close()


def test_missing_source_and_bad_zip_name_the_fix(tmp_path):
    (tmp_path / "work").mkdir()
    with pytest.raises(BundleError, match="does not exist; fix"):
        fetch_bundle(str(tmp_path / "nowhere"), tmp_path / "dest", tmp_path / "work")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(BundleError, match="not a valid zip"):
        fetch_bundle(str(bad), tmp_path / "dest", tmp_path / "work")
    assert bad.exists()  # the user's own file is never deleted


def test_zip_without_core_yaml_is_rejected(tmp_path):
    (tmp_path / "work").mkdir()
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no bundle here")
    with pytest.raises(BundleError, match="0 core.yaml"):
        fetch_bundle(str(empty), tmp_path / "dest", tmp_path / "work")


# --- bundle_identity: what the eval_bundle key holds ---------------------------------------------------------


def test_bundle_identity_follows_the_bytes_of_a_directory_or_zip(shared_data, bundle_zip, tmp_path):
    import shutil

    from tasks.eval_bundle import bundle_identity
    from tasks.source_identity import HashCache
    from model.files import sha256_file

    copy = tmp_path / "bundle"
    shutil.copytree(shared_data / "eval_bundle", copy)
    cache = HashCache(tmp_path / "cache.json")
    before = bundle_identity(str(copy), cache)
    assert before == bundle_identity(str(shared_data / "eval_bundle"), cache)  # where it lives does not count
    assert before["files"]["core.yaml"] == sha256_file(copy / "core.yaml") and len(before["files"]) > 20
    meta = copy / "eval_meta_data.csv"
    meta.write_text(meta.read_text().replace("\n", "\r\n", 1))  # one byte more in the meta CSV
    after = bundle_identity(str(copy), cache)
    assert after != before and after["files"]["eval_meta_data.csv"] == sha256_file(meta)
    assert bundle_identity(f"file://{bundle_zip}", cache) == {"size": bundle_zip.stat().st_size,
                                                              "sha256": sha256_file(bundle_zip)}
    with pytest.raises(BundleError, match="base_eval.bundle: .*nowhere does not exist"):
        bundle_identity(str(tmp_path / "nowhere"), cache)


def test_bundle_identity_of_a_url_is_the_server_version(bundle_zip, tmp_path):
    from tasks.eval_bundle import bundle_identity
    from tasks.source_identity import HashCache
    from model.files import sha256_file

    versionless = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def send_header(self, keyword, value):
            if not (versionless and keyword == "Last-Modified"):
                super().send_header(keyword, value)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(bundle_zip.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        identity = bundle_identity(url, HashCache(None))
        assert identity["url"] == url and identity["Last-Modified"] and identity["size"] == bundle_zip.stat().st_size
        versionless.append(True)  # a server that reports no version: the sha256 of what it sends
        assert bundle_identity(url, HashCache(None)) == {"url": url, "sha256": sha256_file(bundle_zip)}
        with pytest.raises(BundleError, match="cannot be read"):
            bundle_identity(url.replace("eval_bundle.zip", "missing.zip"), HashCache(None))
    finally:
        server.shutdown()
        server.server_close()
