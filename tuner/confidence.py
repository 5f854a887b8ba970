"""Is the label-free choice reliably better than the default config? A check that needs no label.

A study picks the config with the best mean objective over its tuning images. When the objective
is nearly flat across configs (attention that barely localises, an objective blind to what
changes), that pick is noise, and it can be worse than the spec's fixed settings. Without labels
the tool can still see this: score the chosen config and the default config with the same
objective on *check images* (a seeded sample of the tuning split that the study did not tune on,
so the choice's selection on the tuning images does not flatter it; twice as many as the tuning
images and at least MIN_CHECK_IMAGES, since per-image values vary widely between images), and
ask whether the chosen config wins image by image.

The test is the one-sided Wilcoxon signed-rank test on the per-image differences (chosen minus
default; zero differences split between the signs, scipy's "zsplit"), with the rank-biserial
correlation as its effect size (+1: the choice wins on every image, 0: no preference) and the
mean difference in objective units. The choice is *reliably better* when p < ALPHA and the mean
difference is positive. When the tuning split has no images beside the tuning images, the check
runs on the tuning images themselves and says that it is optimistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05


def paired_test(chosen: Sequence[float], default: Sequence[float], alpha: float = ALPHA) -> dict:
    """One-sided Wilcoxon signed-rank test that `chosen` beats `default`, image by image.

    Both are per-image objective values on the same images in the same order (higher is better).
    Returns p_value, effect (rank-biserial correlation in [-1, 1]), mean_difference, wins /
    losses / ties (images), images, and reliably_better (p < alpha and mean difference > 0).
    Undefined (NaN) per-image values are left out in pairs.
    """
    a, b = np.asarray(chosen, dtype=np.float64), np.asarray(default, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same images: {a.size} vs {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    out = {"images": int(diff.size), "skipped_undefined": int((~keep).sum()),
           "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()), "ties": int((diff == 0).sum()),
           "mean_difference": float(diff.mean()) if diff.size else 0.0, "alpha": alpha}
    nonzero = diff[diff != 0]
    if nonzero.size == 0:
        out.update(p_value=1.0, effect=0.0)
    else:
        ranks = stats.rankdata(np.abs(nonzero))
        plus, minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
        out["effect"] = float((plus - minus) / (plus + minus))
        out["p_value"] = float(stats.wilcoxon(diff, alternative="greater", zero_method="zsplit").pvalue)
    out["reliably_better"] = bool(out["p_value"] < alpha and out["mean_difference"] > 0)
    return out


def check_choice(
    chosen_config, default_config, evaluate: Callable[[object], Sequence[float]], *,
    check_ids: Sequence[str], optimistic: bool, trial: int, same: bool,
) -> dict:
    """The check of one choice: `evaluate(config)` gives its per-image objective on the check images.

    `same`: the choice is the default config itself (nothing to test: it is kept).
    """
    record = {"trial": trial, "images": len(check_ids), "optimistic": optimistic,
              "check_images": "the tuning images (the split has no others): optimistic" if optimistic
              else "a seeded sample of the tuning split disjoint from the tuning images"}
    if same:
        record.update(same_as_default=True, reliably_better=False, p_value=None, effect=None,
                      verdict="the label-free choice is the default config")
        return record
    record.update(paired_test(evaluate(chosen_config), evaluate(default_config)))
    record["verdict"] = verdict(record)
    return record


def not_reliably_better(record: dict) -> bool:
    """The check ran and found the choice not reliably better than the (different) default config:
    the case in which `tune export` writes the default config."""
    return record.get("reliably_better") is False and not record.get("same_as_default")


def verdict(record: dict) -> str:
    """One sentence for a person."""
    if record.get("same_as_default"):
        return "the label-free choice is the default config"
    if record.get("unavailable"):
        return f"no check: {record['unavailable']}"
    p, effect, n = record["p_value"], record["effect"], record["images"]
    where = "tuning images (optimistic)" if record.get("optimistic") else "held-out check images"
    tally = f"wins {record['wins']}, losses {record['losses']}, ties {record['ties']}"
    if record["reliably_better"]:
        return (f"the choice beats the default config on {n} {where} ({tally}; Wilcoxon p = {p:.3g}, "
                f"effect {effect:+.2f}): reliably better")
    why = ("the objective prefers the default config" if record["mean_difference"] < 0
           else "the objective cannot tell them apart")
    return (f"the choice is NOT reliably better than the default config on {n} {where} ({tally}; "
            f"Wilcoxon p = {p:.3g}, effect {effect:+.2f}): {why}, so the default config is the safer answer")


#: check images: twice the tuning images, at least this many (when the split has them): per-image
#: objective values vary a lot between images, and a test on few of them has little power
MIN_CHECK_IMAGES = 96


def pick_check_ids(split_ids: Sequence[str], tuning_ids: Sequence[str], seed: int) -> list[str]:
    """Ids of the tuning split outside the tuning images, seeded (seed + 1): twice as many as the
    tuning images and at least MIN_CHECK_IMAGES, or all there are."""
    tuning = set(tuning_ids)
    pool = [i for i in split_ids if i not in tuning]
    count = min(max(2 * len(tuning), MIN_CHECK_IMAGES), len(pool))
    if not count:
        return []
    rng = np.random.default_rng(seed + 1)
    return [pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False))]


def study_check(study, choice, fixed, method, prepare: Callable[[], tuple]) -> dict:
    """The check of `choice` stored in the study, or one run now and stored.

    `fixed` is the default config, `method` the loaded segmentation method (segmenter.methods; a
    default config it cannot run is reported as unavailable), and `prepare()` returns (evaluate,
    check_ids, optimistic) for the check images; it runs only when a check is needed. The one
    path of `tune run`, `tune export` and `tune audit`.
    """
    from segmenter import SegmenterConfig

    from .study import config_hash

    stored = study.user_attrs.get("confidence_check")
    if stored and stored.get("trial") == choice.trial.number:
        return stored
    try:
        method.check(fixed)
    except ValueError as err:
        record = {"trial": choice.trial.number, "reliably_better": None,
                  "unavailable": f"the default config is not valid here ({err})"}
    else:
        evaluate, check_ids, optimistic = prepare()
        chosen = SegmenterConfig.from_dict(choice.trial.user_attrs["config"])
        record = check_choice(chosen, fixed, evaluate, check_ids=check_ids, optimistic=optimistic,
                              trial=choice.trial.number, same=config_hash(chosen) == config_hash(fixed))
    study.set_user_attr("confidence_check", record)
    return record


def ensure_check(study, choice, *, device: str | None = None, cache_dir: str | None = "runs/cache",
                 data_root: str | None = None) -> dict:
    """The study's stored check of `choice`, or one computed now from the study's records (and stored).

    Loads the study's models (through the map cache, usually no model run) when the check is missing,
    e.g. for a study that `tune run` made before the check existed, or one run by several workers.
    """
    from segmenter import SegmenterConfig

    from ._audit_eval import Reevaluator

    stored = study.user_attrs.get("confidence_check")
    if stored and stored.get("trial") == choice.trial.number:
        return stored
    attrs = dict(study.user_attrs)
    if "fixed" not in attrs or "dataset" not in attrs:
        return {"trial": choice.trial.number, "reliably_better": None,
                "unavailable": "the study records no default config (not made by `tune run`)"}
    evaluator = Reevaluator(attrs, device=device, cache_dir=cache_dir, data_root=data_root)

    def prepare():
        dataset, split = attrs["dataset"], attrs.get("tuning_split")
        ids = attrs.get("check_ids")
        if ids is None:
            ids = pick_check_ids(evaluator.dataset(dataset).ids(split), attrs.get("tuning_ids") or [],
                                 int(attrs.get("seed") or 0))
            study.set_user_attr("check_ids", ids)
        images = evaluator.image_set(dataset, split, ids or attrs.get("tuning_ids") or [])
        return (lambda config: evaluator.evaluate(config, images).objective,
                [im.sample.id for im in images.images], not ids)

    return study_check(study, choice, SegmenterConfig.from_dict(attrs["fixed"]), evaluator.method, prepare)
