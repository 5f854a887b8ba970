"""Benchmark archives: resumable HTTP downloads, checksum verification, zip extraction.

A manifest names, per dataset, the directory it goes to below the data root and its archives
(url, md5 and/or sha256, size, where to extract, which members). The built-in `MANIFESTS` can
be replaced per dataset by a JSON file of the same shape, given as `manifest=` (`tune data
download --manifest FILE`) or in $OVSS_DATA_MANIFEST: this is how mirrors and tests point
elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

MANIFEST_ENV = "OVSS_DATA_MANIFEST"
CHUNK = 1 << 20
RETRIES = 3
TIMEOUT = 60

MANIFESTS: dict[str, dict[str, Any]] = {
    # COCO val2017 images + the COCO-Stuff stuff-thing maps: serves `coco` and `coco_stuff`
    "coco": {
        "directory": "coco_stuff164k",
        "archives": [
            {
                "name": "val2017.zip",
                "url": "http://images.cocodataset.org/zips/val2017.zip",
                "md5": "442b8da7639aecaf257c1dceb8ba8c80",
                "size": 815585330,
                "extract_to": "images",
                "members": "val2017/",
            },
            {
                # no checksum is published for this file: the first download prints its sha256
                "name": "stuffthingmaps_trainval2017.zip",
                "url": "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                       "stuffthingmaps_trainval2017.zip",
                "extract_to": "annotations",
                "members": "val2017/",
            },
        ],
    },
}
ALIASES = {"coco_stuff": "coco"}


@dataclass(frozen=True)
class Archive:
    """One file to fetch, verify and extract."""

    name: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    extract_to: str = "."  # below the dataset directory
    members: str = ""  # extract only members whose path starts with this

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"manifest archive name {self.name!r} must be a plain file name")


@dataclass(frozen=True)
class Manifest:
    dataset: str
    directory: str
    archives: tuple[Archive, ...]
    source: str = "built-in"


@dataclass
class FetchReport:
    """What `fetch_dataset` did, archive by archive."""

    directory: Path
    downloaded: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already extracted earlier
    extracted: dict[str, int] = field(default_factory=dict)  # archive -> files written
    unverified: dict[str, str] = field(default_factory=dict)  # archive -> its sha256 (no checksum known)


def downloadable() -> tuple[str, ...]:
    return tuple(sorted({*MANIFESTS, *ALIASES}))


def load_manifest(dataset: str, manifest: str | Path | dict | None = None) -> Manifest:
    """The manifest of `dataset`: from `manifest` (a dict or a JSON file), $OVSS_DATA_MANIFEST,
    or the built-in one."""
    source = "built-in"
    table: dict[str, Any] = dict(MANIFESTS)
    manifest = manifest if manifest is not None else os.environ.get(MANIFEST_ENV) or None
    if isinstance(manifest, (str, Path)):
        path = Path(manifest).expanduser()
        try:
            override = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"manifest file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"manifest {path} is not valid JSON: {err}") from None
        source = str(path)
    else:
        override = manifest or {}
        source = "given" if manifest else source
    if not isinstance(override, dict):
        raise ValueError(f"manifest {source} must map dataset names to {{directory, archives}}")
    table.update(override)
    key = dataset if dataset in table else ALIASES.get(dataset, dataset)
    if key not in table:
        raise ValueError(f"no download for dataset {dataset!r}: downloadable are {', '.join(downloadable())}")
    entry = table[key]
    try:
        archives = tuple(Archive(**a) for a in entry["archives"])
        return Manifest(key, str(entry.get("directory", key)), archives, source)
    except (KeyError, TypeError) as err:
        raise ValueError(f"manifest {source}: entry {key!r} is malformed ({err})") from None


# --- downloading ---------------------------------------------------------------------------------
Progress = Callable[[str, int, int | None], None]  # (archive name, bytes so far, total or None)


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, archive: Archive) -> str | None:
    """Check `path` against the archive's checksum; returns its sha256 when none is known."""
    for algorithm in ("sha256", "md5"):
        expected = getattr(archive, algorithm)
        if expected:
            actual = file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                raise ValueError(
                    f"checksum mismatch for {archive.name}: {algorithm} is {actual}, expected {expected} "
                    f"(the file was removed; run the download again)"
                )
            return None
    return file_digest(path, "sha256")


def download(archive: Archive, directory: Path, progress: Progress | None = None,
             retries: int = RETRIES) -> tuple[Path, bool, str | None]:
    """Fetch an archive into `directory` through `<name>.part`, resuming a partial file with
    HTTP Range requests (also after a dropped connection, `retries` times). The checksum is
    verified before the part file is renamed; a mismatch removes it and raises ValueError.
    Returns (path, resumed, sha256 when the manifest has no checksum)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / archive.name
    part = directory / f"{archive.name}.part"
    resumed = part.is_file() and part.stat().st_size > 0
    attempt = 0
    while True:
        try:
            _transfer(archive, part, progress)
            break
        except (OSError, HTTPException) as err:
            if isinstance(err, _Fatal) or attempt >= retries:
                raise OSError(f"download of {archive.url} failed: {_why(err)} (rerun to resume)") from None
            attempt += 1
            resumed = True
    try:
        sha256 = verify(part, archive)
    except ValueError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, final)
    return final, resumed, sha256


class _Fatal(OSError):
    """A download error that retrying will not fix (HTTP 404, wrong size)."""


def _why(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _transfer(archive: Archive, part: Path, progress: Progress | None) -> None:
    """Append the missing bytes of the archive to `part` (raises unless it is then complete)."""
    have = part.stat().st_size if part.is_file() else 0
    if archive.size is not None and have == archive.size:
        return
    if archive.size is not None and have > archive.size:
        part.unlink()
        have = 0
    headers = {"User-Agent": "ovss-tune"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(archive.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part file is whole
            return
        if 400 <= err.code < 500:
            raise _Fatal(f"HTTP {err.code} {err.reason}") from None
        raise
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206:
            start = int(response.headers.get("Content-Range", f"bytes {have}-").split()[1].split("-")[0])
            if start != have:
                raise _Fatal(f"server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # 200: the server ignored the range; start over
            have, mode = 0, "wb"
        total = have + int(length) if length is not None else archive.size
        if archive.size is not None and total is not None and total != archive.size:
            raise _Fatal(f"server sends {total} bytes, the manifest says {archive.size}")
        done = have
        if progress:
            progress(archive.name, done, total)
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (TimeoutError, ConnectionError) as err:
                    raise OSError(f"connection lost after {done} bytes: {_why(err)}") from None
                if not block:
                    break
                out.write(block)
                done += len(block)
                if progress:
                    progress(archive.name, done, total)
    if total is not None and done < total:
        raise OSError(f"connection closed after {done} of {total} bytes")


# --- extraction ----------------------------------------------------------------------------------
def extract(path: Path, target: Path, members: str = "", progress: Progress | None = None) -> int:
    """Extract a zip archive's members (those starting with `members`) into `target`; returns
    the number of files written. Members that would land outside `target` are refused."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.startswith(members)]
            files = [i for i in infos if not i.is_dir()]
            for info in files:
                destination = (root / info.filename).resolve()
                if root not in destination.parents:
                    raise ValueError(f"{path.name} has an unsafe member {info.filename!r}: not extracted")
            written = 0
            for info in files:
                destination = root / info.filename
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                written += 1
                if progress:
                    progress(path.name, written, len(files))
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid zip archive: {err}") from None
    return written


def fetch_dataset(dataset: str, data_root: str | Path, manifest: str | Path | dict | None = None, *,
                  on_download: Progress | None = None, on_extract: Progress | None = None,
                  delete_archives: bool = False) -> FetchReport:
    """Download, verify and extract every archive of a dataset below `data_root`.

    The dataset directory is `<data_root>/<directory>` (or `data_root` itself when it has that
    name). Archives go to its downloads/ folder; an archive extracted by an earlier run
    (its marker file exists) is skipped, so rerunning after an interruption resumes.
    """
    spec = load_manifest(dataset, manifest)
    directory = Path(data_root).expanduser()
    if directory.name != spec.directory:  # a data root, not already the dataset's directory
        directory = directory / spec.directory
    downloads = directory / "downloads"
    report = FetchReport(directory)
    for archive in spec.archives:
        marker = downloads / f".{archive.name}.extracted"
        if marker.is_file():
            report.skipped.append(archive.name)
            continue
        path = downloads / archive.name
        if path.is_file():  # downloaded and verified by an earlier run, not yet extracted
            try:
                sha256 = verify(path, archive)
            except ValueError:
                path.unlink()
                raise
        else:
            path, resumed, sha256 = download(archive, downloads, on_download)
            (report.resumed if resumed else report.downloaded).append(archive.name)
        if sha256 is not None:
            report.unverified[archive.name] = sha256
        report.extracted[archive.name] = extract(path, directory / archive.extract_to, archive.members,
                                                 on_extract)
        marker.write_text(archive.url + "\n")
        if delete_archives:
            path.unlink()
    return report
