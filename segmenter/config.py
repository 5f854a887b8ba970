"""`SegmenterConfig`: every setting of the PnP-OVSS pipeline in one frozen dataclass.

Defaults are the official values (ALGORITHM.md). The YAML form is what `tune export` writes and
what `tune segment` / `tune eval` read; `from_yaml(to_yaml(c)) == c` holds exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

DROPOUT_SCHEDULES = ("topk", "halving")
BLUR_BACKENDS = ("scipy", "torch")
CRF_BACKENDS = ("dense", "conv")
BACKGROUND_RULES = ("always", "never", "auto")
CANDIDATE_RULES = ("all", "clip_topk", "itm_threshold", "oracle")

# Keys a config file may carry beside the settings; they describe where the file came from.
PROVENANCE_KEY = "provenance"


@dataclass(frozen=True)
class SegmenterConfig:
    """All tunable and fixed settings of one PnP-OVSS segmenter.

    `layer` is 1-based (the paper's "layer 8"); `heads` are 0-based head indices of that layer's
    cross-attention (the official code's "head 9"), averaged when several are given.
    """

    # 1. Model
    backend: str = "blip"
    model: str = "Salesforce/blip-itm-large-flickr"
    revision: str | None = None
    image_size: int = 336
    # 2. Prompt
    prompt_prefix: str = "a picture of "
    # 3. GradCAM source
    layer: int = 8
    heads: tuple[int, ...] = (9,)
    # 4. Salience Dropout
    dropout_schedule: str = "topk"
    dropout_rounds: int = 4
    dropout_k: int = 10
    dropout_count_first_twice: bool = False
    # 5. Threshold
    threshold: float = 0.15
    # 7. Background
    background: str = "always"
    background_min_classes: int = 3
    # 8. Gaussian blur: sigma = blur_sigma * max(H, W); 0 disables
    blur_sigma: float = 0.05
    blur_backend: str = "scipy"  # "torch": the same blur on the segmenter's device (GPU)
    # 9. Dense CRF
    crf: bool = True
    crf_iterations: int = 10
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 7.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 10.0
    crf_backend: str = "dense"  # "dense": pydensecrf (faithful); "conv": windowed CRF on the GPU
    # Candidate classes per image (which names the prompt lists)
    candidates: str = "all"
    candidates_topk: int = 5
    candidates_threshold: float = 0.5
    candidates_model: str = "openai/clip-vit-large-patch14-336"

    def __post_init__(self) -> None:
        # Accept what a YAML file or a sampler hands us: a list or a single int for heads,
        # numpy scalars, integral floats for ints and ints for floats.
        heads = (self.heads,) if isinstance(self.heads, int) else self.heads
        if isinstance(heads, (list, tuple)):
            object.__setattr__(self, "heads", tuple(_as_int(h) for h in heads))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                object.__setattr__(self, f.name, _as_int(value))
            elif f.type == "float" and isinstance(value, (int, float)) and not isinstance(
                value, bool
            ):
                object.__setattr__(self, f.name, float(value))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SegmenterConfig.{name}={getattr(self, name)!r}: {what}")

        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
            if kind is float:
                need(isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value), f.name, "must be a finite number")
            elif kind is int:
                need(isinstance(value, int) and not isinstance(value, bool), f.name,
                     "must be an integer")
            elif kind is not None:
                need(isinstance(value, kind), f.name, f"must be a {kind.__name__}")
        need(isinstance(self.model, str) and bool(self.model), "model",
             "must name a Hugging Face model id or a local directory")
        need(self.revision is None or isinstance(self.revision, str), "revision",
             "must be a string or null")
        need(self.image_size >= 16, "image_size", "must be at least 16 pixels")
        need(self.layer >= 1, "layer", "is 1-based: use 1 for the first text layer")
        need(len(self.heads) >= 1, "heads", "needs at least one head index")
        need(all(isinstance(h, int) and h >= 0 for h in self.heads), "heads",
             "head indices are 0-based non-negative integers")
        need(len(set(self.heads)) == len(self.heads), "heads", "lists a head twice")
        need(self.dropout_schedule in DROPOUT_SCHEDULES, "dropout_schedule",
             f"must be one of {', '.join(DROPOUT_SCHEDULES)}")
        need(self.dropout_rounds >= 1, "dropout_rounds",
             "must be at least 1 (1 = no Salience Dropout)")
        need(self.dropout_k >= 1, "dropout_k", "must be at least 1 patch per round")
        need(0.0 <= self.threshold <= 1.0, "threshold", "must be in [0, 1]")
        need(self.background in BACKGROUND_RULES, "background",
             f"must be one of {', '.join(BACKGROUND_RULES)}")
        need(self.background_min_classes >= 1, "background_min_classes", "must be at least 1")
        need(self.blur_sigma >= 0.0, "blur_sigma", "must be >= 0 (0 disables the blur)")
        need(self.crf_iterations >= 1, "crf_iterations", "must be at least 1")
        need(self.blur_backend in BLUR_BACKENDS, "blur_backend", f"must be one of {', '.join(BLUR_BACKENDS)}")
        need(self.crf_backend in CRF_BACKENDS, "crf_backend", f"must be one of {', '.join(CRF_BACKENDS)}")
        for name in ("crf_gaussian_sxy", "crf_bilateral_sxy", "crf_bilateral_srgb"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in ("crf_gaussian_compat", "crf_bilateral_compat"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.candidates in CANDIDATE_RULES, "candidates",
             f"must be one of {', '.join(CANDIDATE_RULES)}")
        need(self.candidates_topk >= 1, "candidates_topk", "must be at least 1")

    # -- derived -----------------------------------------------------------------------------
    @property
    def uses_image_labels(self) -> bool:
        """True when the candidate rule reads ground-truth image-level labels (audits only)."""
        return self.candidates == "oracle"

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A copy with some settings changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(_unknown_message(unknown))
        return dataclasses.replace(self, **changes)

    # -- YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self, provenance: dict[str, Any] | None = None) -> str:
        """The config as YAML; `provenance` (study, trial, ...) is kept under its own key."""
        data = self.to_dict()
        if provenance:
            data[PROVENANCE_KEY] = provenance
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterConfig:
        if not isinstance(data, dict):
            raise ValueError("a SegmenterConfig must be a mapping of setting names to values")
        data = {k: v for k, v in data.items() if k != PROVENANCE_KEY}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(_unknown_message(unknown))
        return cls(**data)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> SegmenterConfig:
        """Read a config from YAML text or from a path to a YAML file."""
        text = _read_text_or_path(text_or_path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            where = f" in {text_or_path}" if _looks_like_path(text_or_path) else ""
            raise ValueError(f"invalid YAML{where}: {str(err).splitlines()[0]}") from None
        return cls.from_dict(data if data is not None else {})


def read_provenance(text_or_path: str | Path) -> dict[str, Any]:
    """The provenance block of an exported config file ({} when it has none)."""
    data = yaml.safe_load(_read_text_or_path(text_or_path)) or {}
    return dict(data.get(PROVENANCE_KEY) or {}) if isinstance(data, dict) else {}


def _as_int(value: Any) -> Any:
    """An integral number as int (numpy scalars and 3.0 included); anything else unchanged."""
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _looks_like_path(value: str | Path) -> bool:
    return isinstance(value, Path) or ("\n" not in value and value.endswith((".yaml", ".yml")))


def _read_text_or_path(text_or_path: str | Path) -> str:
    if _looks_like_path(text_or_path):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return path.read_text()
    return str(text_or_path)


def _unknown_message(unknown: set[str]) -> str:
    known = ", ".join(f.name for f in fields(SegmenterConfig))
    return f"unknown SegmenterConfig setting(s): {', '.join(sorted(unknown))} (known: {known})"
