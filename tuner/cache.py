"""The map cache: relevance maps on disk, keyed by every input that shapes them.

An entry is one safetensors file written atomically (temporary file + rename). Its metadata
holds its key and a SHA-256 over the key, the array's dtype and shape, and its bytes, so an
entry that is truncated, damaged, or another valid entry put in its place (copied or renamed
over it) is detected: it is reported once, removed and recomputed. Workers may share the
directory. A directory that cannot be written is an error when the cache is opened; a write
that fails later (a full disk) is reported once and the run goes on without storing entries.
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

FORMAT_VERSION = 2  # 2: the key is part of what an entry's checksum covers
log = logging.getLogger("ovss_tune.cache")


def cache_key(**parts: Any) -> str:
    """A stable key for the given parts (plus the cache format version)."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_checksum(key: str, array: np.ndarray) -> str:
    """SHA-256 of an entry: its key, dtype, shape and bytes."""
    h = hashlib.sha256(f"{key}|{array.dtype.str}|{tuple(array.shape)}|".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class MapCache:
    """A directory of cached maps. `MapCache(None)` is a disabled cache (every get misses).

    Raises OSError (one line, naming the directory) when `root` is a file or cannot be written.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = self.misses = self.corrupt = 0
        self._warned = False
        self.write_error: str | None = None  # set when a write failed; no more writes are tried
        if self.root is not None:
            self._check_writable()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _check_writable(self) -> None:
        assert self.root is not None
        hint = "pass --cache-dir DIR with a writable directory, or --no-cache"
        if self.root.exists() and not self.root.is_dir():
            raise OSError(f"map cache directory {self.root} is a file, not a directory: {hint}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as err:
            reason = err.strerror or str(err)
            raise OSError(f"map cache directory {self.root} cannot be written ({reason}): {hint}") from None

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
            if meta.get("key") != key:
                raise ValueError(f"it holds the entry of another key ({meta.get('key', 'none')[:12]}...)")
            if meta.get("sha256") != entry_checksum(key, array):
                raise ValueError("checksum mismatch")
        except Exception as err:  # a half-written, damaged or misplaced file: recompute it
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
        """Store `array` under `key`; a failed write (full disk, lost permission) is reported
        once and turns writing off for this cache, the run goes on."""
        if self.root is None or self.write_error is not None:
            return
        from safetensors.numpy import save_file

        array = np.ascontiguousarray(array, dtype=np.float32)
        path = self._path(key)
        meta = {"key": key, "sha256": entry_checksum(key, array), "format": str(FORMAT_VERSION)}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            save_file({"maps": array}, tmp, metadata=meta)
            os.replace(tmp, path)
        except Exception as err:  # OSError, or safetensors' own error around one
            self.write_error = (err.strerror if isinstance(err, OSError) else None) or str(err)
            log.warning("map cache %s: cannot store entries (%s); going on without storing new maps "
                        "(free space or pass another --cache-dir to keep them)", self.root, self.write_error)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
