"""Objectives a study maximises: annotation-free scores per image, and supervised metrics.

    from objectives import get_objective
    reward = get_objective("clip_reward", clip_model="path/or/hub-id", device="cpu")
    values = reward.score(items)     # one float per ScoreInput

Objectives are registered by name and imported only when asked for (a study spec names one).
"""

from __future__ import annotations

from typing import NamedTuple

from ._base import (
    LABEL_USE,
    OBJECTIVES,
    OFFICIAL_REWARD_OPTIONS,
    VIEWS,
    Objective,
    ScoreInput,
    get_objective,
    objective_class,
    official_reward_options,
    register_objective,
)
from .metrics import (
    SegmentationScores,
    confusion_matrix,
    miou,
    num_label_classes,
    to_class_ids,
)

register_objective("clip_reward", "objectives.clip_reward:ClipReward")
register_objective("clip_margin", "objectives.clip_margin:ClipMargin")
register_objective("clip_contrastive", "objectives.clip_contrastive:ClipContrastive")
register_objective("itm_match", "objectives.itm_match:ItmMatch")
register_objective("region_agreement", "objectives.region_agreement:RegionAgreement")
register_objective("patch_coherence", "objectives.patch_coherence:PatchCoherence")
register_objective("flip_consistency", "objectives.flip_consistency:FlipConsistency")
register_objective("combination", "objectives.combination:Combination")
register_objective("miou_supervised", "objectives.miou_supervised:MiouSupervised")


class ObjectiveRow(NamedTuple):
    """One line of `tune objectives`."""

    name: str
    direction: str
    models: tuple[str, ...]
    labels: str  # "none", "image-level" or "pixel"
    summary: str


def describe_objectives() -> list[ObjectiveRow]:
    """Every registered objective, sorted by name, without loading any model."""
    rows = []
    for name in sorted(OBJECTIVES):
        cls = objective_class(name)
        doc = (cls.__doc__ or "").strip()
        rows.append(ObjectiveRow(name, cls.direction, tuple(cls.models), cls.labels,
                                 doc.splitlines()[0] if doc else ""))
    return rows


__all__ = [
    "LABEL_USE",
    "OBJECTIVES",
    "OFFICIAL_REWARD_OPTIONS",
    "VIEWS",
    "Objective",
    "ObjectiveRow",
    "ScoreInput",
    "SegmentationScores",
    "confusion_matrix",
    "describe_objectives",
    "get_objective",
    "miou",
    "num_label_classes",
    "objective_class",
    "official_reward_options",
    "register_objective",
    "to_class_ids",
]
