"""`tune data download` against an HTTP server on loopback: resume, checksums, extraction."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from tuner.data_cli import add_data_commands, cmd_data
from tuner.datasets import load_dataset
from tuner.datasets.download import MANIFEST_ENV, extract, fetch_dataset, load_manifest
from tuner.datasets.shapes_writers import write_coco_layout


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` (name -> bytes) with Range support; records the Range header of each request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.ignore_range = False
        self.cut_first_response_at: int | None = None  # drop the connection mid-file, once
        self.content_type: str | None = None  # a Content-Type header to send
        self.redirects: dict[str, str] = {}  # name -> Location of a 302 answer

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path.lstrip("/") in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path.lstrip("/")])
            self.end_headers()
            return
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404, "Not Found")
            return
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = 0
        if header and not self.server.ignore_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        if self.server.content_type:
            self.send_header("Content-Type", self.server.content_type)
        self.end_headers()
        cut = self.server.cut_first_response_at
        if cut is not None:
            self.server.cut_first_response_at = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def zip_of(folder: Path, prefix: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A zip archive of a folder's files under `prefix/`, plus `extra` members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.writestr(f"{prefix}/{path.name}", path.read_bytes())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def coco_archives(tmp_path, server) -> dict:
    """val2017.zip and stuffthingmaps_trainval2017.zip of 3 shapes scenes, served on loopback."""
    source = write_coco_layout(tmp_path / "source", 3, seed=9, splits=("val",), raw_maps=True)
    images = zip_of(source / "images" / "val2017", "val2017")
    maps = zip_of(source / "annotations" / "val2017", "val2017",
                  extra={"train2017/000000999999.png": b"not extracted: only val2017/ is asked for"})
    server.files = {"val2017.zip": images, "stuffthingmaps_trainval2017.zip": maps}
    return {"coco": {"directory": "coco_stuff164k", "archives": [
        {"name": "val2017.zip", "url": server.url("val2017.zip"), "md5": hashlib.md5(images).hexdigest(),
         "size": len(images), "extract_to": "images", "members": "val2017/"},
        {"name": "stuffthingmaps_trainval2017.zip", "url": server.url("stuffthingmaps_trainval2017.zip"),
         "sha256": hashlib.sha256(maps).hexdigest(), "extract_to": "annotations", "members": "val2017/"},
    ]}}


def download_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tune")
    add_data_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["data", "download", *argv])


def write_manifest(tmp_path: Path, manifest: dict) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_full_download_verifies_and_extracts_a_loadable_dataset(tmp_path, server, coco_archives, capsys):
    manifest = write_manifest(tmp_path, coco_archives)
    data = tmp_path / "data"
    assert cmd_data(download_args("coco", "--data-root", str(data), "--manifest", str(manifest))) == 0
    out = capsys.readouterr().out
    assert "downloaded val2017.zip" in out and "extracted 3 files from val2017.zip" in out
    directory = data / "coco_stuff164k"
    assert len(list((directory / "images" / "val2017").glob("*.jpg"))) == 3
    assert len(list((directory / "annotations" / "val2017").glob("*.png"))) == 3
    assert not (directory / "annotations" / "train2017").exists()
    assert not list(directory.rglob("*.part"))
    coco = load_dataset("coco", root=data)  # raw stuff-thing maps, read without a conversion step
    sample = coco.load("val", coco.ids("val")[0])
    assert sample.labels.shape == sample.image.shape[:2] and sample.image_classes
    assert server.ranges == [None, None]
    # a second run finds everything extracted and fetches nothing
    assert cmd_data(download_args("coco", "--data-root", str(data), "--manifest", str(manifest),
                                  "--no-progress")) == 0
    assert "already extracted" in capsys.readouterr().out and len(server.ranges) == 2


def test_partial_file_is_resumed_with_a_range_request(tmp_path, server, coco_archives, monkeypatch):
    monkeypatch.setenv(MANIFEST_ENV, str(write_manifest(tmp_path, coco_archives)))
    downloads = tmp_path / "data" / "coco_stuff164k" / "downloads"
    downloads.mkdir(parents=True)
    images = server.files["val2017.zip"]
    (downloads / "val2017.zip.part").write_bytes(images[:1000])  # an interrupted earlier run
    report = fetch_dataset("coco", tmp_path / "data")
    assert report.resumed == ["val2017.zip"] and report.downloaded == ["stuffthingmaps_trainval2017.zip"]
    assert server.ranges[0] == "bytes=1000-"
    assert (downloads / "val2017.zip").read_bytes() == images
    assert report.extracted == {"val2017.zip": 3, "stuffthingmaps_trainval2017.zip": 3}


def test_dropped_connection_is_resumed_within_the_run(tmp_path, server, coco_archives):
    server.cut_first_response_at = 700
    report = fetch_dataset("coco", tmp_path / "data", coco_archives)
    assert server.ranges[:2] == [None, "bytes=700-"] and report.resumed == ["val2017.zip"]
    assert (tmp_path / "data" / "coco_stuff164k" / "downloads" / "val2017.zip").read_bytes() == \
        server.files["val2017.zip"]


def test_server_without_range_support_restarts_the_file(tmp_path, server, coco_archives):
    server.ignore_range = True
    downloads = tmp_path / "data" / "coco_stuff164k" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "val2017.zip.part").write_bytes(b"garbage that a 200 answer replaces")
    fetch_dataset("coco", tmp_path / "data", coco_archives)
    assert (downloads / "val2017.zip").read_bytes() == server.files["val2017.zip"]


def test_checksum_mismatch_is_one_line_and_nothing_is_extracted(tmp_path, server, coco_archives):
    coco_archives["coco"]["archives"][0]["md5"] = "0" * 32
    with pytest.raises(ValueError) as err:
        fetch_dataset("coco", tmp_path / "data", coco_archives)
    message = str(err.value)
    assert "\n" not in message and "checksum mismatch for val2017.zip" in message and "0" * 32 in message
    directory = tmp_path / "data" / "coco_stuff164k"
    assert "moved to" in message and not (directory / "images").exists()
    # the bad file is moved aside, never extracted or reused
    assert [p.name for p in (directory / "downloads").iterdir()] == ["val2017.zip.bad"]
    args = download_args("coco", "--data-root", str(tmp_path / "data"), "--no-progress",
                         "--manifest", str(write_manifest(tmp_path, coco_archives)))
    with pytest.raises(ValueError, match="checksum mismatch"):  # `tune` prints it as `error: ...`
        cmd_data(args)
    assert not (directory / "images").exists()


def test_archive_without_a_checksum_is_refused_unless_allowed_and_reported_before_extraction(
        tmp_path, server, coco_archives, capsys):
    del coco_archives["coco"]["archives"][1]["sha256"]
    manifest = write_manifest(tmp_path, coco_archives)
    argv = ["coco", "--data-root", str(tmp_path / "data"), "--manifest", str(manifest), "--no-progress"]
    with pytest.raises(ValueError, match="no checksum is known for stuffthingmaps_trainval2017.zip.*"
                                         "--allow-unverified"):
        cmd_data(download_args(*argv))
    assert server.ranges == [] and not (tmp_path / "data").exists()  # refused before any download
    assert cmd_data(download_args(*argv, "--allow-unverified", "--delete-archives")) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(server.files["stuffthingmaps_trainval2017.zip"]).hexdigest()
    warning = "no checksum is known for stuffthingmaps_trainval2017.zip; extracting it unverified"
    assert warning in out and f"its sha256 is {digest}" in out
    assert out.index(warning) < out.index("extracted 3 files from stuffthingmaps_trainval2017.zip")
    assert not (tmp_path / "data" / "coco_stuff164k" / "downloads" / "val2017.zip").exists()


def test_built_in_manifest_uses_https_where_offered_and_refuses_the_unverified_maps(tmp_path, monkeypatch):
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    archives = {a.name: a for a in load_manifest("coco").archives}
    assert archives["stuffthingmaps_trainval2017.zip"].url.startswith("https://")
    assert archives["val2017.zip"].md5  # plain http there (no valid certificate), verified by md5
    with pytest.raises(ValueError, match="--allow-unverified"):
        fetch_dataset("coco", tmp_path / "data")  # fails before any network access
    assert not (tmp_path / "data").exists()


def test_a_bad_response_is_moved_aside_and_the_rerun_downloads_afresh(tmp_path, server, coco_archives):
    good = server.files["stuffthingmaps_trainval2017.zip"]
    del coco_archives["coco"]["archives"][1]["sha256"]
    server.files["stuffthingmaps_trainval2017.zip"] = b"<html>quota exceeded</html>"
    with pytest.raises(ValueError, match="not a valid zip archive.*moved to .*trainval2017.zip.bad"):
        fetch_dataset("coco", tmp_path / "data", coco_archives, allow_unverified=True)
    downloads = tmp_path / "data" / "coco_stuff164k" / "downloads"
    assert not (downloads / "stuffthingmaps_trainval2017.zip").exists()
    assert (downloads / "stuffthingmaps_trainval2017.zip.bad").is_file()
    server.files["stuffthingmaps_trainval2017.zip"] = good
    report = fetch_dataset("coco", tmp_path / "data", coco_archives, allow_unverified=True)
    assert report.downloaded == ["stuffthingmaps_trainval2017.zip"] and report.skipped == ["val2017.zip"]
    assert report.extracted == {"stuffthingmaps_trainval2017.zip": 3}
    # a web page sent with status 200 is not saved as the archive at all
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(OSError, match="answered with a text/html page"):
        fetch_dataset("coco", tmp_path / "other", coco_archives, allow_unverified=True)


def test_extraction_is_bounded(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("val2017/zeros.png", b"\0" * (8 << 20))  # 8 MB from about 8 KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match="zeros.png.*more than 100 times.*not extracted"):
        extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out" / "val2017").exists()


def test_manifest_paths_and_urls_are_confined(tmp_path, server, coco_archives):
    def entry(**changes):
        manifest = json.loads(json.dumps(coco_archives))
        for key, value in changes.items():
            if key == "directory":
                manifest["coco"]["directory"] = value
            else:
                manifest["coco"]["archives"][0][key] = value
        return manifest

    for changes in ({"extract_to": "../../escape"}, {"extract_to": "/tmp/escape"}, {"directory": "../up"},
                    {"directory": "/abs"}, {"directory": "."}):
        with pytest.raises(ValueError, match="relative path below the data root|name a folder"):
            fetch_dataset("coco", tmp_path / "data", entry(**changes))
    secret = tmp_path / "secret.zip"
    secret.write_bytes(server.files["val2017.zip"])
    for url in (secret.as_uri(), "ftp://example.org/val2017.zip"):
        with pytest.raises(ValueError, match="is not http\\(s\\)"):
            fetch_dataset("coco", tmp_path / "data", entry(url=url))
    server.redirects["val2017.zip"] = secret.as_uri()
    with pytest.raises(OSError, match="failed: HTTP 302.* is not allowed$"):  # not retried, not followed
        fetch_dataset("coco", tmp_path / "data", coco_archives)
    assert not (tmp_path / "data" / "coco_stuff164k" / "images").exists()


def test_http_errors_and_bad_manifests_are_one_line(tmp_path, server, coco_archives):
    coco_archives["coco"]["archives"][0]["url"] = server.url("missing.zip")
    with pytest.raises(OSError, match=r"download of http://127\.0\.0\.1:\d+/missing\.zip failed: HTTP 404"):
        fetch_dataset("coco", tmp_path / "data", coco_archives)
    with pytest.raises(ValueError, match="no download for dataset 'ade20k'"):
        load_manifest("ade20k")
    with pytest.raises(FileNotFoundError, match="manifest file not found"):
        load_manifest("coco", tmp_path / "nope.json")
    assert load_manifest("coco_stuff").archives[0].url == "http://images.cocodataset.org/zips/val2017.zip"


def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/a.txt", b"a")
        z.writestr("../escape.txt", b"b")
    with pytest.raises(ValueError, match="unsafe member '../escape.txt'"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "ok").exists()
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match="not a valid zip archive"):
        extract(tmp_path / "broken.zip", tmp_path / "out")
