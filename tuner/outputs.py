"""Output paths checked before the work that fills them: a command that would fail to write its
result fails first, with a one-line error, instead of after minutes of computing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _why(err: OSError) -> str:
    return err.strerror or next(iter(str(err).splitlines()), "") or type(err).__name__


def writable_dir(path: str | Path, what: str = "output directory", create: bool = True) -> Path:
    """Check that files can be written in directory `path`; with `create`, make it (and its
    parents) now, else only check that it could be made (nothing is created).

    OSError "cannot write to <what> PATH: reason" when it or an ancestor is a file, or it is
    read-only or cannot be made.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "it" if existing == path else f"{existing}"
        raise OSError(f"cannot write to {what} {path}: {where} is a file, not a directory")
    if not create and existing != path:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OSError(f"cannot write to {what} {path}: {existing} is not writable")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(f"cannot write to {what} {path}: {_why(err)}") from None
    return path


def writable_file(path: str | Path, what: str = "output file") -> Path:
    """Check that `path` can be written (its directory made and writable, the file itself
    replaceable) without touching an existing file. OSError with a one-line message if not."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OSError(f"cannot write {what} {path}: it is a directory")
    writable_dir(path.parent, f"the directory of {what}", create=False)
    if path.exists() and not os.access(path, os.W_OK):
        raise OSError(f"cannot write {what} {path}: permission denied")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
