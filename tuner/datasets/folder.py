"""`folder`: any directory of images with a class list, no labels (label-free tuning only)."""

from __future__ import annotations

import os
from pathlib import Path

from ._base import Dataset, LayoutError, Sample
from ._classes import BACKGROUND, ClassList, parse_class_lines, read_class_file
from ._disk import IMAGE_SUFFIXES, default_root, read_rgb

SPLIT = "all"
CLASS_FILE = "classes.txt"
LAYOUT = """\
<root>/
├── classes.txt          one class name a line (`name, synonym, ...`; # comments)
├── <image>.jpg          any of .jpg .jpeg .png .bmp .gif .tif .tiff .webp
└── <subfolder>/<image>.jpg   read only with the option recursive: true"""


class FolderDataset(Dataset):
    """Images of one directory (split "all"; "all:tune" / "all:eval" partition it), no labels.

    Images are read as a viewer shows them (EXIF orientation applied), like `tune segment`.

    Class names come from `classes` (a list, "a,b,c", or a file path) or `<root>/classes.txt`.
    A first class named "background" is the background class, left out of the vocabulary.
    """

    name = "folder"
    title = "image folder"

    def __init__(self, root=None, *, classes=None, recursive: bool = False, tune_fraction: float = 0.2,
                 split_seed: int = 0) -> None:
        self.root = default_root(root)
        if not self.root.is_dir():
            raise LayoutError(f"image folder not found: {self.root} (pass --data-root DIR)", LAYOUT)
        self.recursive = bool(recursive)
        self.tune_fraction, self.split_seed = float(tune_fraction), int(split_seed)
        self.classes = self._class_list(classes)
        self.has_background = self.classes.names[0] == BACKGROUND
        self._ids: list[str] | None = None

    def _class_list(self, classes) -> ClassList:
        if classes is None:
            path = self.root / CLASS_FILE
            if not path.is_file():
                raise LayoutError(
                    f"no class names for folder {self.root}: write {path} (one name a line) "
                    "or pass the dataset option classes", LAYOUT,
                )
            return read_class_file(path)
        if isinstance(classes, (list, tuple)):
            return parse_class_lines([str(c) for c in classes], "dataset option classes")
        text = str(classes)
        if "," not in text and Path(text).expanduser().is_file():
            return read_class_file(Path(text).expanduser())
        return parse_class_lines(text.split(","), "dataset option classes")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.names

    @property
    def synonyms(self) -> tuple[tuple[str, ...], ...]:
        return self.classes.synonyms

    @property
    def splits(self) -> tuple[str, ...]:
        return (SPLIT,)

    @property
    def has_labels(self) -> bool:
        return False

    def ids(self, split: str) -> list[str]:
        self.check_split(split)
        if self._ids is None:
            self._ids = self._scan()
        return list(self._ids)

    def _scan(self) -> list[str]:
        found = []
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if self.recursive else []
            rel = Path(directory).relative_to(self.root)
            found += [(rel / f).as_posix() for f in files
                      if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")]
        return sorted(found)

    def load(self, split: str, sample_id: str) -> Sample:
        self.check_split(split)
        return Sample(id=sample_id, image=read_rgb(self.root / sample_id, exif_orientation=True))  # as viewed
