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

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
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
    assert not (directory / "images").exists()
    assert not list((directory / "downloads").iterdir())  # the bad file is gone, not half-used
    args = download_args("coco", "--data-root", str(tmp_path / "data"), "--no-progress",
                         "--manifest", str(write_manifest(tmp_path, coco_archives)))
    with pytest.raises(ValueError, match="checksum mismatch"):  # `tune` prints it as `error: ...`
        cmd_data(args)
    assert not (directory / "images").exists()


def test_archive_without_a_checksum_reports_its_sha256(tmp_path, server, coco_archives, capsys):
    del coco_archives["coco"]["archives"][1]["sha256"]
    manifest = write_manifest(tmp_path, coco_archives)
    assert cmd_data(download_args("coco", "--data-root", str(tmp_path / "data"), "--manifest", str(manifest),
                                  "--no-progress", "--delete-archives")) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(server.files["stuffthingmaps_trainval2017.zip"]).hexdigest()
    assert f"no checksum is known for stuffthingmaps_trainval2017.zip; its sha256 is {digest}" in out
    assert not (tmp_path / "data" / "coco_stuff164k" / "downloads" / "val2017.zip").exists()


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
