"""The candidate rule `file`: per-image class lists read from a JSON file (`candidates_file`).

The file is one JSON object mapping image ids to the class names the prompt lists:

    {"2007_000033": ["aeroplane"], "2007_000129": ["bicycle", "person"], "2007_000999": []}

as a tagger, a captioner or GPT-4o wrote them for the images of a dataset. Ids that are not in a
run are ignored (one file may cover the whole dataset).

**Image ids.** An image's id is its dataset id in `tune run`, `tune eval` and `tune audit` (the
file stem: `2007_000033`, `000000397133`, `ADE_val_00000001`; `frankfurt/frankfurt_000000_000294`
for Cityscapes), and in `tune segment` its path below the deepest folder holding every input
(`cam1/0001.jpg`). A key names an image when it equals the id (`\\` read as `/`, a leading `./`
dropped); else when the two are equal without an image suffix (`0001` or `0001.png` for
`0001.jpg`); else, where one side has no folder, by its last path part (`0001` for
`cam1/0001.jpg`, `JPEGImages/2007_000033.jpg` for `2007_000033`). A lookup that fits several
keys, and two images of a run that reach one key, are errors.

**Class names** are matched to the run's vocabulary: the class name itself, then ignoring case its
name or a synonym (the dataset's class list, `tuner/datasets/classes/*.txt`), then ignoring case,
spaces, hyphens and underscores as well (`pottedplant`, `tvmonitor`, `diningtable`,
`Potted-Plant`). `background` is skipped (the background rule owns it). An empty list means the
image shows none of the classes: it is segmented as background only.

The file is recorded in a study as an external source (its path and sha256), not as labels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: image file suffixes a key or an id may carry (as tune segment and the datasets read them)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BACKGROUND = "background"
FORMAT = 'a JSON object {"image id": ["class name", ...], ...}'
#: ids named in one error message
SHOWN = 5


def resolve_candidates_file(value: Any, base: str | Path) -> Any:
    """`candidates_file` as written in a YAML file in folder `base`: a relative path is taken
    relative to that folder (made absolute, `~` expanded); anything else is returned unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return value if path.is_absolute() else os.path.abspath(Path(base) / path)


@dataclass(frozen=True)
class CandidateFile:
    """Per-image class lists of one JSON file, as read (`load_candidate_file`)."""

    path: str  # absolute
    sha256: str  # of the file's bytes
    lists: dict[str, tuple[str, ...]]  # by key (cleaned: `/` separators, no leading ./)
    _by_stem: dict[str, tuple[str, ...]] = field(repr=False)  # key without image suffix -> keys
    _by_name: dict[str, tuple[str, ...]] = field(repr=False)  # last part of that -> keys

    def source(self) -> dict[str, Any]:
        """What a study ledger records: an external source, not labels."""
        return {"kind": "candidate class lists (candidates: file)", "path": self.path,
                "sha256": self.sha256, "images": len(self.lists)}

    def key_of(self, image_id: str) -> str | None:
        """The key that names `image_id` (module docstring), None when none does.

        ValueError when several keys fit equally.
        """
        clean = _clean(image_id)
        if clean in self.lists:
            return clean
        stem = _stem(clean)
        found = self._by_stem.get(stem, ())
        if not found:
            if "/" in stem:  # a key of the file name alone (no folder)
                flat = self._by_stem.get(posixpath.basename(stem), ())
                found = tuple(k for k in flat if "/" not in _stem(k))
            else:  # keys with folders whose last part is the id
                found = self._by_name.get(stem, ())
        if len(found) > 1:
            listed = ", ".join(repr(k) for k in found[:SHOWN])
            raise ValueError(f"image {image_id!r} fits {len(found)} keys of {self.path} ({listed}): key the "
                             "file by the run's image ids so that each names one image")
        return found[0] if found else None

    def names(self, image_id: str) -> tuple[str, ...]:
        """The class names listed for one image, as written. ValueError when it has no list."""
        key = self.key_of(image_id)
        if key is None:
            raise ValueError(f"{self.path} has no class list for image {image_id!r}: add one (an empty "
                             "list means background only)")
        return self.lists[key]

    def indices(self, image_id: str, vocabulary: Sequence[str],
                synonyms: Sequence[Sequence[str]] | None = None) -> list[int]:
        """Sorted indices into `vocabulary` of the classes listed for `image_id`.

        `synonyms[i]` are other names of `vocabulary[i]`. ValueError for an image without a
        list and for a name that matches no class (or several).
        """
        table = _name_table(tuple(map(str, vocabulary)),
                            tuple(tuple(s) for s in synonyms) if synonyms is not None else None)
        chosen: set[int] = set()
        for name in self.names(image_id):
            index = _match(table, name, vocabulary)
            if index is None:
                if name.strip().casefold() == BACKGROUND:
                    continue
                known = ", ".join(map(str, vocabulary[:8])) + (", ..." if len(vocabulary) > 8 else "")
                raise ValueError(
                    f"class {name!r} listed for image {image_id!r} in {self.path} matches no class of "
                    f"the vocabulary ({known}), nor a synonym, even ignoring case, spaces and hyphens: "
                    "correct the name in the file, or segment with a vocabulary that has it")
            chosen.add(index)
        return sorted(chosen)

    def check(self, image_ids: Sequence[str], vocabulary: Sequence[str],
              synonyms: Sequence[Sequence[str]] | None = None, what: str = "images of this run") -> None:
        """Before a run: every image has a list, no two images share a key, every name matches.

        ValueError naming how many ids are missing and the first of them, or the first bad name.
        """
        missing: list[str] = []
        reached: dict[str, str] = {}
        for image_id in dict.fromkeys(image_ids):
            key = self.key_of(image_id)
            if key is None:
                missing.append(image_id)
                continue
            other = reached.setdefault(key, image_id)
            if other != image_id:
                raise ValueError(f"images {other!r} and {image_id!r} both match key {key!r} of {self.path}: "
                                 "key the file by the run's image ids (the path below the inputs' folder "
                                 "for tune segment) so that each names one image")
        if missing:
            shown = ", ".join(repr(i) for i in missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
            raise ValueError(
                f"{self.path} has no class list for {len(missing)} of the {len(reached) + len(missing)} "
                f"{what}; the first: {shown}. Add a list for each (an empty list means background only)")
        for image_id in reached.values():
            self.indices(image_id, vocabulary, synonyms)


def load_candidate_file(path: str | Path) -> CandidateFile:
    """Read and check a class-list file; read again only when its size or time changes.

    FileNotFoundError for a missing file, ValueError for one that is not JSON, not an object, or
    holds a value that is not a list of class names (each error names the file and says what to
    write).
    """
    given = Path(path).expanduser()
    try:
        stat = given.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"candidates_file not found: {given}: write the per-image class lists there "
                                f"({FORMAT}) or point candidates_file at them") from None
    if not given.is_file():
        raise ValueError(f"candidates_file {given} is not a file: give the JSON file of per-image "
                         "class lists")
    return _load(os.path.abspath(given), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> CandidateFile:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()

    def no_duplicates(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen and seen[key] != value:
                raise ValueError(f"{path} lists image {key!r} twice with different classes: keep one list")
            seen[key] = value
        return seen

    try:
        parsed = json.loads(data.decode("utf-8-sig"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        raise ValueError(f"candidates_file {path} is not JSON text (not UTF-8): write {FORMAT}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"candidates_file {path} is not JSON ({err.msg} at line {err.lineno} column "
                         f"{err.colno}): write {FORMAT}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"candidates_file {path} holds a JSON {type(parsed).__name__}, not an object of "
                         f"image ids: write {FORMAT}")
    lists: dict[str, tuple[str, ...]] = {}
    for key, value in parsed.items():
        if isinstance(value, str):
            raise ValueError(
                f"{path}: image {key!r} maps to the text {_short(value)}, not a list of class names: write "
                f"{FORMAT} (raw answers such as the official GPT-4o files hold must be turned into name "
                "lists first)")
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ValueError(f"{path}: image {key!r} maps to {_short(value)}, not a list of class names: "
                             f"write {FORMAT}")
        names = tuple(dict.fromkeys(n.strip() for n in value))
        if "" in names:
            raise ValueError(f"{path}: the list of image {key!r} holds an empty class name: remove it")
        clean = _clean(key)
        if clean in lists and lists[clean] != names:
            raise ValueError(f"{path} lists image {clean!r} twice with different classes: keep one list")
        lists[clean] = names
    by_stem: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for key in lists:
        by_stem.setdefault(_stem(key), []).append(key)
        if "/" in _stem(key):
            by_name.setdefault(posixpath.basename(_stem(key)), []).append(key)
    return CandidateFile(path, digest, lists, {k: tuple(v) for k, v in by_stem.items()},
                         {k: tuple(v) for k, v in by_name.items()})


def _clean(image_id: str) -> str:
    text = str(image_id).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _stem(key: str) -> str:
    stem, suffix = posixpath.splitext(key)
    return stem if suffix.lower() in IMAGE_SUFFIXES else key


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- class names ---------------------------------------------------------------------------------------
def _joined(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.casefold())


@functools.lru_cache(maxsize=16)
def _name_table(vocabulary: tuple[str, ...],
                synonyms: tuple[tuple[str, ...], ...] | None) -> tuple[dict, ...]:
    """Three lookups, tried in turn: exact name; name or synonym ignoring case; joined."""
    if synonyms is not None and len(synonyms) != len(vocabulary):
        raise ValueError(f"{len(vocabulary)} class names but {len(synonyms)} synonym lists: give one "
                         "per class")
    exact: dict[str, set[int]] = {}
    folded: dict[str, set[int]] = {}
    joined: dict[str, set[int]] = {}
    for i, name in enumerate(vocabulary):
        exact.setdefault(name.strip(), set()).add(i)
        for alias in (name, *(synonyms[i] if synonyms is not None else ())):
            folded.setdefault(alias.strip().casefold(), set()).add(i)
            joined.setdefault(_joined(alias), set()).add(i)
    return exact, folded, joined


def _match(table: tuple[dict, ...], name: str, vocabulary: Sequence[str]) -> int | None:
    exact, folded, joined = table
    for lookup, key in ((exact, name.strip()), (folded, name.strip().casefold()), (joined, _joined(name))):
        found = lookup.get(key)
        if found and len(found) > 1:
            named = ", ".join(repr(vocabulary[i]) for i in sorted(found))
            raise ValueError(f"class name {name!r} fits several classes ({named}): spell it as one of them")
        if found:
            return next(iter(found))
    return None
