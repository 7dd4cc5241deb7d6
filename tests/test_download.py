"""Downloader and manifest tests. Network use is limited to a server on 127.0.0.1."""

from __future__ import annotations

import csv
import hashlib
import http.server
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from mclstexp_lite import download as dl
from mclstexp_lite import _util

from .conftest import needs_data, SHARED_DATA


# ------------------------------------------------------------------ local server
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    truncate: set[str] = set()
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        body = type(self).files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in type(self).truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.truncate, _Handler.hits = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _row(path, url, *, body=None, sha256=None, blob=None, size=None):
    return dl.ManifestRow(
        dataset="test", section="S1", patient="P", kind="counts", path=path, url=url,
        sha256=sha256 if sha256 is not None else (hashlib.sha256(body).hexdigest() if body else ""),
        git_blob_sha1=blob or "", size=size, pixel_scale=None, source="test", license="",
        notes="synthetic test file")


def _leftovers(folder: Path):
    return [p.name for p in folder.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------- tests
def test_downloads_verifies_and_places_atomically(server, tmp_path):
    handler, base = server
    body = b"synthetic counts\n" * 1000
    handler.files["/a.tsv"] = body
    row = _row("sub/a.tsv", f"{base}/a.tsv", body=body)
    got = dl.fetch([row], data_dir=tmp_path, download=True, progress=False)
    assert got["sub/a.tsv"].read_bytes() == body
    assert _leftovers(tmp_path) == ["a.tsv"]
    # cache hit: a second fetch does not touch the network
    dl.fetch([row], data_dir=tmp_path, download=True, progress=False)
    assert handler.hits == ["/a.tsv"]


def test_existing_file_with_wrong_checksum_is_refused(tmp_path):
    (tmp_path / "x.tsv").write_bytes(b"tampered")
    row = _row("x.tsv", "http://127.0.0.1:9/x.tsv", body=b"original")
    with pytest.raises(dl.ChecksumError, match=r"x\.tsv.*sha256.*Delete the file"):
        dl.fetch([row], data_dir=tmp_path, download=False)


def test_download_with_wrong_checksum_leaves_nothing(server, tmp_path):
    handler, base = server
    handler.files["/b.tsv"] = b"what the server has"
    row = _row("b.tsv", f"{base}/b.tsv", body=b"what the manifest expects")
    with pytest.raises(dl.ChecksumError):
        dl.fetch([row], data_dir=tmp_path, download=True, progress=False)
    assert _leftovers(tmp_path) == []


def test_interrupted_download_leaves_no_file(server, tmp_path):
    handler, base = server
    body = bytes(range(256)) * 4096
    handler.files["/big.bin"] = body
    handler.truncate.add("/big.bin")
    row = _row("big.bin", f"{base}/big.bin", body=body)
    with pytest.raises(dl.DataMissingError, match="big.bin"):
        dl.fetch([row], data_dir=tmp_path, download=True, progress=False)
    assert _leftovers(tmp_path) == []


def test_killed_mid_write_leaves_no_file(server, tmp_path, monkeypatch):
    """Simulates Ctrl-C arriving while chunks are being written."""
    import requests

    handler, base = server
    body = b"z" * (3 << 20)
    handler.files["/c.bin"] = body
    real = requests.Response.iter_content

    def interrupted(self, chunk_size=1, decode_unicode=False):
        for i, chunk in enumerate(real(self, chunk_size=chunk_size)):
            if i == 1:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(requests.Response, "iter_content", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.fetch([_row("c.bin", f"{base}/c.bin", body=body)], data_dir=tmp_path,
                 download=True, progress=False)
    assert _leftovers(tmp_path) == []


def test_offline_lists_every_missing_file(tmp_path):
    rows = [_row(f"d/{n}.tsv", f"http://example.invalid/{n}.tsv", body=b"x") for n in "abc"]
    with pytest.raises(dl.DataMissingError) as err:
        dl.fetch(rows, data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert "3 data file(s) missing" in msg
    for n in "abc":
        assert str(tmp_path / "d" / f"{n}.tsv") in msg and f"example.invalid/{n}.tsv" in msg


def test_git_blob_sha1_matches_git(tmp_path):
    f = tmp_path / "blob.txt"
    f.write_bytes(b"hello spatial world\n" * 7)
    if shutil.which("git"):
        ref = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert dl.git_blob_sha1_file(f) == ref
    row = _row("blob.txt", "http://127.0.0.1:9/", sha256="", blob=dl.git_blob_sha1_file(f))
    dl.verify(f, row)
    f.write_bytes(b"changed")
    with pytest.raises(dl.ChecksumError, match="git blob sha1"):
        dl.verify(f, row)


def test_no_published_checksum_records_and_rechecks(server, tmp_path):
    handler, base = server
    handler.files["/geo.tsv.gz"] = b"synthetic GEO-like payload" * 100
    row = _row("geo.tsv.gz", f"{base}/geo.tsv.gz", sha256="")
    path = dl.fetch([row], data_dir=tmp_path, download=True, progress=False)["geo.tsv.gz"]
    side = path.with_name(path.name + ".sha256")
    assert side.read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"silently replaced")
    with pytest.raises(dl.ChecksumError, match="recorded"):
        dl.fetch([row], data_dir=tmp_path, download=False)


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MCLSTEXP_DATA", str(tmp_path / "env"))
    assert dl.data_dir() == (tmp_path / "env").resolve()
    assert dl.data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("MCLSTEXP_DATA")
    assert dl.data_dir().name == "data" and "mclstexp_lite" in str(dl.data_dir())


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'her3'.*her2st"):
        dl.rows("her3")
    with pytest.raises(ValueError, match="unknown section 'Z9'.*A1"):
        dl.rows("her2st", "Z9")


# ----------------------------------------------------------------------- manifest
def test_manifest_covers_the_datasets():
    m = dl.manifest()
    her = m[m.dataset == "her2st"]
    for kind in ("counts", "spots", "image"):
        assert sorted(her[her.kind == kind].section) == sorted(
            f"{p}{i}" for p in "ABCD" for i in range(1, 7)) + [
            f"{p}{i}" for p in "EFGH" for i in range(1, 4)]
    assert sorted(her[her.kind == "labels"].section) == ["A1", "B1", "C1", "D1", "E1", "F1",
                                                         "G2", "H1", "J1"]
    a1 = her[her.kind == "image_reduced"].iloc[0]
    assert a1.section == "A1" and abs(a1.pixel_scale - 2000 / 6954) < 1e-6
    cs = m[m.dataset == "cscc"]
    assert len(cs) == 36 and set(cs.patient) == {"P2", "P5", "P9", "P10"}
    assert (cs.kind.value_counts() == 12).all()
    assert set(m[m.dataset == "mclstexp_panels"].section) == {"her2st", "cscc"}
    assert m.path.is_unique
    gh = m[m.url.str.contains("githubusercontent")]
    assert gh.url.str.contains(r"/[0-9a-f]{40}/").all(), "GitHub URLs must be pinned to a commit"
    assert ((gh.sha256 != "") | (gh.git_blob_sha1 != "")).all()


@needs_data
def test_manifest_agrees_with_offline_sources_and_files_verify():
    with open(SHARED_DATA / "SOURCES.csv", newline="") as fh:
        src = {r["path"]: r for r in csv.DictReader(fh)}
    present = []
    for r in dl.rows():
        if r.path in src:
            assert r.git_blob_sha1 == src[r.path]["git_blob_sha1"]
            assert r.sha256 == src[r.path]["sha256"]
            if (SHARED_DATA / r.path).exists():
                present.append(r)
    on_disk = [p for p, r in src.items() if (SHARED_DATA / p).exists() and not p.endswith("README")]
    assert sorted(r.path for r in present) == sorted(on_disk)
    got = dl.fetch(present, data_dir=SHARED_DATA, download=False)
    assert len(got) == len(present)


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    _util.atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
