"""Benchmark archives: resumable HTTP downloads, checksum verification, zip extraction.

A manifest names, per dataset, the directory it goes to below the data root and its archives
(url, md5 and/or sha256, size, where to extract, which members). The built-in `MANIFESTS` can
be replaced per dataset by a JSON file of the same shape, given as `manifest=` (`tune data
download --manifest FILE`) or in $OVSS_DATA_MANIFEST: this is how mirrors and tests point
elsewhere.

Safety: only http(s) URLs are fetched (https where the host offers it; a redirect never drops
to http); an archive is verified before anything is extracted, and one without a known checksum
is refused unless `allow_unverified` (`--allow-unverified`); `directory`, `extract_to` and zip
members stay below the data root; extraction is bounded (compression ratio, total size, free
disk); an archive that fails its checksum or does not extract is moved aside to `<name>.bad`,
so the next run downloads it afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import urllib.error
import urllib.parse
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
#: largest uncompressed/compressed size ratio of a member, and of an archive's extracted members
#: (images and PNG label maps compress little; a zip bomb reaches 1000:1)
MAX_RATIO = 100
SCHEMES = ("https", "http")

MANIFESTS: dict[str, dict[str, Any]] = {
    # COCO val2017 images + the COCO-Stuff stuff-thing maps: serves `coco` and `coco_stuff`
    "coco": {
        "directory": "coco_stuff164k",
        "archives": [
            {
                # images.cocodataset.org serves no valid certificate for https: plain http, and the
                # published md5 verifies the file before anything is extracted
                "name": "val2017.zip",
                "url": "http://images.cocodataset.org/zips/val2017.zip",
                "md5": "442b8da7639aecaf257c1dceb8ba8c80",
                "size": 815585330,
                "extract_to": "images",
                "members": "val2017/",
            },
            {
                # no checksum is published for this file: it is refused unless --allow-unverified,
                # which prints its sha256 before extracting (pin it in a --manifest)
                "name": "stuffthingmaps_trainval2017.zip",
                "url": "https://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
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
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ValueError(f"manifest archive name {self.name!r} must be a plain file name")
        scheme = urllib.parse.urlsplit(self.url).scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"manifest archive {self.name}: URL {self.url!r} is not http(s): "
                             "only http and https URLs are downloaded")
        confined(self.extract_to, f"manifest archive {self.name}: extract_to")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 0):
            raise ValueError(f"manifest archive {self.name}: size must be a number of bytes")

    @property
    def checksum(self) -> str | None:
        """The checksum the manifest gives ("sha256:..." or "md5:..."), None when it has none."""
        for algorithm in ("sha256", "md5"):
            if getattr(self, algorithm):
                return f"{algorithm}:{getattr(self, algorithm)}"
        return None


def confined(path: str, what: str) -> str:
    """`path` when it is a relative path that stays below its base; ValueError otherwise."""
    text = str(path).replace("\\", "/")
    normal = posixpath.normpath(text) if text else "."
    if (posixpath.isabs(text) or (len(text) > 1 and text[1] == ":") or normal == ".."
            or normal.startswith("../")):
        raise ValueError(f"{what} {path!r} must be a relative path below the data root")
    return normal


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
        directory = confined(str(entry.get("directory", key)), f"manifest {source}: directory")
        if directory == ".":
            raise ValueError(f"manifest {source}: directory must name a folder below the data root")
        return Manifest(key, directory, archives, source)
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
                bad = set_aside(path)
                raise ValueError(
                    f"checksum mismatch for {archive.name}: {algorithm} is {actual}, expected {expected} "
                    f"(the file was moved to {bad}; run the download again)"
                )
            return None
    return file_digest(path, "sha256")


def set_aside(path: Path) -> Path:
    """Move a bad download to `<name>.bad` (replacing an older one) so no rerun uses it again."""
    name = path.name[:-len(".part")] if path.name.endswith(".part") else path.name
    bad = path.with_name(f"{name}.bad")
    os.replace(path, bad)
    return bad


def download(archive: Archive, directory: Path, progress: Progress | None = None,
             retries: int = RETRIES) -> tuple[Path, bool, str | None]:
    """Fetch an archive into `directory` through `<name>.part`, resuming a partial file with
    HTTP Range requests (also after a dropped connection, `retries` times). The checksum is
    verified before the part file is renamed; a mismatch moves it to `<name>.bad` and raises
    ValueError.
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
                again = "" if isinstance(err, _Fatal) else " (rerun to resume)"
                raise OSError(f"download of {archive.url} failed: {_why(err)}{again}") from None
            attempt += 1
            resumed = True
    sha256 = verify(part, archive)
    os.replace(part, final)
    return final, resumed, sha256


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only, and never from https down to http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in SCHEMES or (old == "https" and new != "https"):
            raise _Fatal(f"refused a redirect from {req.full_url} to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SafeRedirects)


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
        response = _OPENER.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part file is whole
            return
        if 300 <= err.code < 500:  # a refused redirect, not found, forbidden...
            raise _Fatal(f"HTTP {err.code} {err.reason}") from None
        raise
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind.startswith("text/"):  # an error or login page served with status 200
            raise _Fatal(f"the server answered with a {kind} page, not the archive")
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
def extract(path: Path, target: Path, members: str = "", progress: Progress | None = None,
            max_ratio: float = MAX_RATIO) -> int:
    """Extract a zip archive's members (those starting with `members`) into `target`; returns
    the number of files written. Checked before anything is written: no member lands outside
    `target`, no member and not the whole selection expands more than `max_ratio` times the
    compressed size, and the disk has room for it. ValueError otherwise."""
    root = target.resolve()
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.startswith(members)]
            files = [i for i in infos if not i.is_dir()]
            for info in files:
                destination = (root / info.filename).resolve()
                if root not in destination.parents:
                    raise ValueError(f"{path.name} has an unsafe member {info.filename!r}: not extracted")
                if info.file_size > max_ratio * max(info.compress_size, 1) and info.file_size > CHUNK:
                    raise ValueError(
                        f"{path.name}: member {info.filename!r} expands {info.file_size} bytes from "
                        f"{info.compress_size}, more than {max_ratio:g} times: not extracted (a zip bomb?)")
            total = sum(i.file_size for i in files)
            if total > max_ratio * max(path.stat().st_size, CHUNK):
                raise ValueError(f"{path.name} would expand to {total} bytes, more than {max_ratio:g} times "
                                 "its size: not extracted")
            target.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(target).free
            if total > free:
                raise OSError(f"extracting {path.name} needs {total} bytes, {target} has {free} free")
            written = 0
            for info in files:
                destination = root / info.filename
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(destination, "wb") as dst:  # stops at file_size
                    shutil.copyfileobj(src, dst, CHUNK)
                written += 1
                if progress:
                    progress(path.name, written, len(files))
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid zip archive: {err}") from None
    return written


def fetch_dataset(dataset: str, data_root: str | Path, manifest: str | Path | dict | None = None, *,
                  on_download: Progress | None = None, on_extract: Progress | None = None,
                  delete_archives: bool = False, allow_unverified: bool = False,
                  on_unverified: Callable[[str, str], None] | None = None) -> FetchReport:
    """Download, verify and extract every archive of a dataset below `data_root`.

    The dataset directory is `<data_root>/<directory>` (or `data_root` itself when it has that
    name). Archives go to its downloads/ folder; an archive extracted by an earlier run
    (its marker file exists) is skipped, so rerunning after an interruption resumes.
    An archive without a checksum is refused (ValueError, before any download) unless
    `allow_unverified`; then `on_unverified(name, sha256)` is called before it is extracted.
    An archive that fails its checksum or its extraction is moved to `<name>.bad`.
    """
    spec = load_manifest(dataset, manifest)
    directory = Path(data_root).expanduser()
    if directory.name != spec.directory:  # a data root, not already the dataset's directory
        directory = directory / spec.directory
    downloads = directory / "downloads"
    for archive in spec.archives:  # a manifest that writes outside the dataset fails before any download
        target = (directory / archive.extract_to).resolve()
        if not (target == directory.resolve() or directory.resolve() in target.parents):
            raise ValueError(f"manifest archive {archive.name}: extract_to leaves {directory}")
    unverified = [a.name for a in spec.archives if a.checksum is None
                  and not (downloads / f".{a.name}.extracted").is_file()]  # extracted earlier: nothing to do
    if unverified and not allow_unverified:
        raise ValueError(
            f"no checksum is known for {', '.join(unverified)}: it cannot be verified before it is "
            "extracted; pin its sha256 in a --manifest, or pass --allow-unverified to accept it "
            "unverified (its sha256 is printed before extraction)")
    report = FetchReport(directory)
    for archive in spec.archives:
        marker = downloads / f".{archive.name}.extracted"
        if marker.is_file():
            report.skipped.append(archive.name)
            continue
        path = downloads / archive.name
        if path.is_file():  # downloaded and verified by an earlier run, not yet extracted
            sha256 = verify(path, archive)
        else:
            path, resumed, sha256 = download(archive, downloads, on_download)
            (report.resumed if resumed else report.downloaded).append(archive.name)
        if sha256 is not None:
            report.unverified[archive.name] = sha256
            if on_unverified:
                on_unverified(archive.name, sha256)
        target = directory / archive.extract_to
        try:
            report.extracted[archive.name] = extract(path, target, archive.members, on_extract)
        except ValueError as err:
            bad = set_aside(path)
            raise ValueError(f"{err} (the archive was moved to {bad}; rerun to download it again)") from None
        marker.write_text(archive.url + "\n")
        if delete_archives:
            path.unlink()
    return report
