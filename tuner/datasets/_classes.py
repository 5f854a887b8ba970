"""Class-name lists: tuner/datasets/classes/*.txt, one class a line, synonyms after a comma."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CLASSES_DIR = Path(__file__).resolve().parent / "classes"
BACKGROUND = "background"


@dataclass(frozen=True)
class ClassList:
    """Canonical class names by class id, and each class's synonyms."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    source: str = "<list>"

    def __len__(self) -> int:
        return len(self.names)

    def take(self, start: int, stop: int | None = None) -> ClassList:
        """Classes start..stop-1 (ids renumbered from 0)."""
        return ClassList(self.names[start:stop], self.synonyms[start:stop], self.source)

    def with_background(self) -> ClassList:
        """"background" as class 0, these classes after it."""
        return ClassList((BACKGROUND, *self.names), ((), *self.synonyms), self.source)


def parse_class_lines(lines, source: str = "<list>") -> ClassList:
    """One class a line, `#` comments, `name, synonym, ...`; names and synonyms checked unique."""
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    for number, line in enumerate(lines, 1):
        parts = [p.strip() for p in line.split("#", 1)[0].split(",")]
        parts = [p for p in parts if p]
        if not parts:
            continue
        if parts[0] in names:
            raise ValueError(f"{source}:{number}: class {parts[0]!r} is listed twice: list each class once")
        names.append(parts[0])
        synonyms.append(tuple(dict.fromkeys(p for p in parts[1:] if p != parts[0])))
    if not names:
        raise ValueError(f"{source}: the class list is empty: give one class name a line")
    for name, extra in zip(names, synonyms):
        clash = [s for s in extra if s in names]
        if clash:
            raise ValueError(
                f"{source}: synonym {clash[0]!r} of class {name!r} is itself a class name: remove it"
            )
    return ClassList(tuple(names), tuple(synonyms), source)


def read_class_file(path: str | Path) -> ClassList:
    """Read a class-name file (format: tuner/datasets/classes/README.md)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class file not found: {path}")
    return parse_class_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def builtin_classes(name: str) -> ClassList:
    """A class list shipped in tuner/datasets/classes/ (coco_stuff, voc, context59, ade20k, ...)."""
    path = CLASSES_DIR / f"{name}.txt"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CLASSES_DIR.glob("*.txt")))
        raise ValueError(f"no class list {name!r} ships with the package (shipped: {shipped})")
    return read_class_file(path)
