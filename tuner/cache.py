"""The map cache: relevance maps on disk, keyed by every input that shapes them.

An entry is one safetensors file written atomically (temporary file + rename) with the
SHA-256 of its array in the metadata. A truncated or corrupt entry is reported once, removed
and recomputed. Workers may share the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
log = logging.getLogger("ovss_tune.cache")


def cache_key(**parts: Any) -> str:
    """A stable key for the given parts (plus the cache format version)."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class MapCache:
    """A directory of cached maps. `MapCache(None)` is a disabled cache (every get misses)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = self.misses = self.corrupt = 0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> np.ndarray | None:
        if self.root is None:
            return None
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                array = f.get_tensor("maps")
            if meta.get("sha256") != hashlib.sha256(array.tobytes()).hexdigest():
                raise ValueError("checksum mismatch")
        except Exception as err:  # a half-written or damaged file: recompute it
            self.corrupt += 1
            if not self._warned:
                log.warning("map cache entry %s is corrupt (%s); recomputing it", path, err)
                self._warned = True
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        if self.root is None:
            return
        from safetensors.numpy import save_file

        array = np.ascontiguousarray(array, dtype=np.float32)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"sha256": hashlib.sha256(array.tobytes()).hexdigest(), "format": str(FORMAT_VERSION)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"maps": array}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
