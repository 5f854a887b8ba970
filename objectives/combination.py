"""`combination`: a weighted sum of named objectives, declared in the study spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._base import LABEL_USE, Objective, ScoreInput, get_objective


class Combination(Objective):
    """Per image, sum over parts of weight x part's score (the parts are other objectives).

    Declared in a spec as
    `objective: combination` with
    `objective_options: {parts: {clip_margin: 1.0, region_agreement: {weight: 0.5, segments: 80}}}`:
    each part is an objective name with its weight, or a mapping with `weight` and that
    objective's own options. CLIP parts share one loaded CLIP model; `device` and the
    segmenter's backend reach every part that takes them. A part that maximises nothing
    (direction "minimize") enters with its sign flipped.

    Rationale: each label-free objective sees one side of a segmentation (what a mask shows,
    where its edges run, whether it is stable) and fails where that side is blind; a sum lets a
    study see them together. Known failure mode: the weights set the exchange rate between
    scales that differ per objective and dataset; the benchmark (`bench/bench_objectives.py`)
    is how the shipped weights were chosen, and `tune audit` shows whether they held.
    """

    name = "combination"
    models = ("clip", "segmenter")

    def __init__(self, parts: Mapping[str, Any] | None = None, *, device: str | None = None,
                 backend=None, dtype: str | None = None) -> None:
        if not parts or not isinstance(parts, Mapping):
            raise ValueError("objective combination needs `parts`: a mapping of objective names to "
                             "weights, e.g. {clip_margin: 1.0, region_agreement: 0.5}")
        self.parts: dict[str, Objective] = {}
        self.weights: dict[str, float] = {}
        shared_clip = None
        for name, declared in parts.items():
            if name == self.name:
                raise ValueError("objective combination cannot contain itself")
            options = dict(declared) if isinstance(declared, Mapping) else {"weight": declared}
            weight = options.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise ValueError(f"combination part {name!r}: weight must be a finite number, not {weight!r}")
            if shared_clip is not None and "clip_model" not in options and _takes_clip(name):
                options["clip"] = shared_clip
            part = get_objective(name, device=device, backend=backend, dtype=dtype, **options)
            shared_clip = shared_clip or getattr(part, "clip", None)
            self.parts[name], self.weights[name] = part, float(weight)
        self.clip = shared_clip  # the candidate rule clip_topk reuses it
        self.views = tuple(dict.fromkeys(v for p in self.parts.values() for v in p.views))
        self.labels = max((p.labels for p in self.parts.values()), key=LABEL_USE.index)
        self.last_parts: dict[str, np.ndarray] = {}  # each part's per-image scores of the last call

    @classmethod
    def options_problem(cls, options: Mapping[str, Any]) -> tuple[str, str] | None:
        """Each part's own value check (Objective.options_problem), as `parts.NAME.OPTION`."""
        from ._base import objective_class

        parts = options.get("parts")
        for name, declared in (parts.items() if isinstance(parts, Mapping) else ()):
            if not isinstance(declared, Mapping):
                continue
            try:
                part = objective_class(name)
            except ValueError:  # the constructor names it
                continue
            problem = part.options_problem({k: v for k, v in declared.items() if k != "weight"})
            if problem:
                return f"parts.{name}.{problem[0]}", problem[1]
        return None

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        total = np.zeros(len(items), dtype=np.float64)
        self.last_parts = {}
        for name, part in self.parts.items():
            values = np.asarray(part.score(items), dtype=np.float64)
            self.last_parts[name] = values
            sign = 1.0 if part.direction == "maximize" else -1.0
            total += sign * self.weights[name] * values
        return total


def _takes_clip(name: str) -> bool:
    from ._base import objective_class

    return "clip" in objective_class(name).models and "segmenter" not in objective_class(name).models
