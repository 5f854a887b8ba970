"""The arithmetic of `tune audit`: rank agreement, regret, top-k, Goodhart scan, bootstrap, importances.

Everything here works on plain arrays over trials (sorted by trial number) and needs no model.
Conventions: `objective[i]` is trial i's study value (higher is better), `miou[i]` its mIoU;
per-image segmentation counts are `[images, 3, K]` arrays of true positives, ground-truth
pixels and predicted pixels per dataset class id (rows 0, 1, 2), which is all that IoU needs:
IoU_c = tp_c / (gt_c + pred_c - tp_c), and the counts of several images add up exactly like
their confusion matrices do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

TOP_KS = (1, 3, 5)
MIN_IMPORTANCE_TRIALS = 5
MIN_BOOTSTRAP_VALID = 20  # fewer valid replicates than this: no interval


# --- ranks ---------------------------------------------------------------------------------------
def order_desc(values: Sequence[float]) -> np.ndarray:
    """Indices from the highest value to the lowest; ties keep the earlier (lower-numbered) trial."""
    values = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(values.size), -values))


def objective_weighted_tau(objective: np.ndarray, miou: np.ndarray) -> float:
    """Weighted Kendall tau (hyperbolic weights) with importance given by the objective's ranking.

    An exchange between the objective's ranks r and s weighs 1/(r+1) + 1/(s+1): disagreements
    among the trials the objective puts on top (where the tuner picks its answer) count most,
    disagreements among its worst trials barely count. In [-1, 1] like Kendall's tau.
    """
    rank = np.empty(objective.size, dtype=np.int64)
    rank[order_desc(objective)] = np.arange(objective.size)
    return float(stats.weightedtau(objective, miou, rank=rank).statistic)


def rank_agreement(objective: np.ndarray, miou: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Spearman rho, Kendall tau-b (with p-values) and the objective-weighted tau; NaN if undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, reported as unavailable
        rho = stats.spearmanr(objective, miou)
        tau = stats.kendalltau(objective, miou)
        wtau = objective_weighted_tau(objective, miou)
    return {
        "spearman": {"value": float(rho.statistic), "p_value": float(rho.pvalue)},
        "kendall": {"value": float(tau.statistic), "p_value": float(tau.pvalue)},
        "weighted_tau": {"value": wtau, "p_value": None},
    }


def top_k(objective: np.ndarray, miou: np.ndarray, ks: Sequence[int] = TOP_KS) -> list[dict[str, Any]]:
    """Per k: is the mIoU-best trial among the objective's top k, and what share of those k are
    among the mIoU top k (k is capped at the number of trials)."""
    by_objective, by_miou = order_desc(objective), order_desc(miou)
    rows = []
    for k in ks:
        kk = min(k, objective.size)
        top_o, top_m = set(by_objective[:kk].tolist()), set(by_miou[:kk].tolist())
        rows.append({"k": k, "k_used": kk, "hit": bool(by_miou[0] in top_o),
                     "overlap": len(top_o & top_m) / kk})
    return rows


# --- regret --------------------------------------------------------------------------------------
def regret(numbers: Sequence[int], objective: np.ndarray, miou: np.ndarray, choice: int) -> dict[str, Any]:
    """mIoU of the labelled optimum minus mIoU of the label-free choice (the trial numbered `choice`)."""
    numbers = list(numbers)
    best = int(order_desc(miou)[0])
    pick = numbers.index(choice)
    lost = float(miou[best] - miou[pick])
    return {
        "label_free_choice": {"trial": choice, "objective": float(objective[pick]),
                              "miou": float(miou[pick])},
        "labelled_optimum": {"trial": numbers[best], "objective": float(objective[best]),
                             "miou": float(miou[best])},
        "regret": lost,
        "relative_regret": lost / float(miou[best]) if miou[best] > 0 else None,
        "choice_rank_by_miou": int(np.flatnonzero(order_desc(miou) == pick)[0]) + 1,
        "vs_median": {"median_miou": float(np.median(miou)), "gain": float(miou[pick] - np.median(miou))},
    }


# --- Goodhart scan ---------------------------------------------------------------------------------
def discordant_pairs(
    numbers: Sequence[int], objective: np.ndarray, miou: np.ndarray, worst: int = 5
) -> dict[str, Any]:
    """Trial pairs where the objective rises while mIoU falls, and the worst of them by mIoU lost."""
    n = objective.size
    i, j = np.triu_indices(n, k=1)
    d_obj, d_miou = objective[j] - objective[i], miou[j] - miou[i]
    tied = (d_obj == 0) | (d_miou == 0)
    bad = (d_obj * d_miou) < 0
    # orient every discordant pair from the lower to the higher objective
    low = np.where(d_obj > 0, i, j)[bad]
    high = np.where(d_obj > 0, j, i)[bad]
    drop = miou[low] - miou[high]
    gain = objective[high] - objective[low]
    order = np.lexsort((-gain, -drop))[:worst]
    pairs = int(i.size)
    untied = pairs - int(tied.sum())
    return {
        "pairs": pairs,
        "discordant": int(bad.sum()),
        "concordant": int(((d_obj * d_miou) > 0).sum()),
        "tied": int(tied.sum()),
        "fraction": float(bad.sum()) / pairs if pairs else None,
        "fraction_untied": float(bad.sum()) / untied if untied else None,
        "worst": [
            {"from_trial": int(numbers[low[o]]), "to_trial": int(numbers[high[o]]),
             "objective_gain": float(gain[o]), "miou_drop": float(drop[o])}
            for o in order
        ],
    }


def per_class_difference(
    choice: dict[str, float | None], optimum: dict[str, float | None]
) -> list[dict[str, Any]]:
    """Per class: IoU of the label-free choice, of the labelled optimum, and choice - optimum."""
    rows = []
    for name in dict.fromkeys([*choice, *optimum]):
        a, b = choice.get(name), optimum.get(name)
        rows.append({"class": name, "choice": a, "optimum": b,
                     "difference": None if a is None or b is None else float(a - b)})
    return rows


def mask_area(objective: np.ndarray, miou: np.ndarray | None, foreground: np.ndarray,
              true_foreground: float | None = None) -> dict[str, Any]:
    """Does the objective follow how much of the image is masked rather than whether it is right?

    Spearman of the objective with the mean predicted foreground fraction, beside the same for
    mIoU. Flagged (a heuristic) when the objective follows area clearly (rho >= 0.5) and clearly
    more than mIoU does (by >= 0.3): a sign it rewards larger masks, not correct ones.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho_obj = float(stats.spearmanr(objective, foreground).statistic)
        rho_miou = None if miou is None else float(stats.spearmanr(miou, foreground).statistic)
    flagged = (not math.isnan(rho_obj) and rho_obj >= 0.5
               and (rho_miou is None or math.isnan(rho_miou) or rho_obj - rho_miou >= 0.3))
    return {
        "trials": int(objective.size),
        "spearman_objective_foreground": rho_obj,
        "spearman_miou_foreground": rho_miou,
        "foreground_range": [float(foreground.min()), float(foreground.max())],
        "true_foreground": true_foreground,
        "rewards_area": bool(flagged),
    }


# --- mIoU from counts ------------------------------------------------------------------------------
def counts_from_confusion(cm: np.ndarray) -> np.ndarray:
    """[3, K] true positives, ground-truth and predicted pixels per class of a confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    return np.stack([np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)])


def miou_from_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU over the classes present in the ground truth, as `objectives.miou`. # counts [..., 3, K]"""
    counts = np.asarray(counts, dtype=np.float64)
    tp, gt, pred = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), 0.0)
        present = gt > 0
        return (iou * present).sum(-1) / present.sum(-1)  # NaN where no class is present


def iou_per_class_from_counts(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
    """IoU per named class of summed counts [3, K] (None where a class is in neither gt nor pred)."""
    tp, gt, pred = np.asarray(counts, dtype=np.float64)
    union = gt + pred - tp
    return {name: (float(tp[c] / union[c]) if union[c] > 0 else None) for c, name in enumerate(class_names)}


# --- bootstrap over images --------------------------------------------------------------------------
def resolves(objective_per_image: np.ndarray, values: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Do per-image values average back to the trials' values (to `tolerance` of their spread)?

    Stored per-image values are rounded; an objective of tiny magnitude rounds to ties, and a
    bootstrap over them would rank different trials than the study did.
    """
    values = np.asarray(values, dtype=np.float64)
    spread = float(np.ptp(values))
    error = float(np.abs(np.asarray(objective_per_image, dtype=np.float64).mean(axis=1) - values).max())
    return error <= tolerance * spread if spread > 0 else error == 0.0


def _resample_weights(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """How many times each of n images is drawn, per replicate. # [replicates, n]"""
    idx = rng.integers(0, n, size=(replicates, n))
    weights = np.zeros((replicates, n))
    np.add.at(weights, (np.arange(replicates)[:, None], idx), 1.0)
    return weights


def bootstrap(
    objective_per_image: np.ndarray,
    counts_per_image: np.ndarray,
    *,
    joint: bool,
    replicates: int = 1000,
    seed: int = 0,
    ks: Sequence[int] = TOP_KS,
    chunk: int = 50,
) -> dict[str, Any]:
    """Percentile intervals of the agreement and regret statistics, resampling images.

    `objective_per_image` [T, n_t]: each trial's objective on the tuning images; the trial's
    objective in a replicate is its mean over the resampled images. `counts_per_image`
    [T, n_e, 3, K]: each trial's per-image class counts on the images mIoU is measured on; the
    trial's mIoU in a replicate is computed once on the summed counts of the resampled images
    (the dataset protocol, not a mean of per-image mIoUs). `joint`: both are on the same images
    in the same order, and one draw of images serves both; otherwise (mIoU measured on another
    split) the two image sets are drawn independently. In each replicate the label-free choice
    and the labelled optimum are picked again.
    """
    objective_per_image = np.asarray(objective_per_image, dtype=np.float64)
    counts_per_image = np.asarray(counts_per_image, dtype=np.float64)
    n_t, n_e = objective_per_image.shape[1], counts_per_image.shape[1]
    if joint and n_t != n_e:
        raise ValueError(f"joint resampling needs the same images: {n_t} objective vs {n_e} mIoU images")
    rng = np.random.default_rng(seed)
    names = ("spearman", "kendall", "weighted_tau", "regret")
    samples: dict[str, list[float]] = {k: [] for k in names}
    hits = {k: [] for k in ks}
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        w_t = _resample_weights(rng, b, n_t)
        w_e = w_t if joint else _resample_weights(rng, b, n_e)
        obj = w_t @ objective_per_image.T / n_t  # [b, T]
        miou = miou_from_counts(np.einsum("bn,tnck->btck", w_e, counts_per_image))  # [b, T]
        for o, m in zip(obj, miou):
            if not np.all(np.isfinite(m)):
                continue
            agreement = rank_agreement(o, m)
            for key in ("spearman", "kendall", "weighted_tau"):
                samples[key].append(agreement[key]["value"])
            samples["regret"].append(float(m.max() - m[order_desc(o)[0]]))
            for row in top_k(o, m, ks):
                hits[row["k"]].append(row["hit"])
    out: dict[str, Any] = {
        "replicates": replicates, "seed": seed, "images_objective": n_t, "images_miou": n_e,
        "trials": int(objective_per_image.shape[0]),
        "resampling": "one draw of the tuning images for objective and mIoU" if joint
        else "tuning images (objective) and evaluation images (mIoU) drawn independently",
    }
    for key, values in samples.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[key] = {
            "valid": int(arr.size),
            "ci95": [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))]
            if arr.size >= MIN_BOOTSTRAP_VALID else None,
        }
    out["top_k_hit_rate"] = {str(k): float(np.mean(v)) if v else None for k, v in hits.items()}
    return out


# --- parameter importances -----------------------------------------------------------------------------
def importance_evaluator(name: str, seed: int = 0) -> tuple[Any, str]:
    """(evaluator, its name) for "fanova", "ped-anova" or "auto" (fANOVA when scikit-learn is there)."""
    import optuna

    if name == "auto":
        try:
            import sklearn  # noqa: F401  (fANOVA's random forest)

            name = "fanova"
        except ImportError:
            name = "ped-anova"
    if name == "fanova":
        try:
            return optuna.importance.FanovaImportanceEvaluator(seed=seed), "fanova"
        except ImportError:
            raise ValueError(
                "fANOVA importances need scikit-learn: `pip install scikit-learn`, "
                "or use --importance ped-anova"
            ) from None
    if name == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator(), "ped-anova"
    raise ValueError(f"unknown importance evaluator {name!r}: use auto, fanova or ped-anova")


def param_importances(trials: Sequence[Any], miou: Sequence[float] | None, evaluator: str = "auto",
                      seed: int = 0) -> dict[str, Any]:
    """Optuna importances of the same trials for the objective and for mIoU, side by side.

    `trials`: completed FrozenTrials; `miou`: their mIoU in the same order (None: the objective's
    importances alone, for a study without mIoU). fANOVA assesses only parameters present in
    every trial (conditional ones are left out, and listed); PED-ANOVA assesses conditional
    parameters too. PED-ANOVA ranks what makes a target *low*, so both targets are negated for
    it; fANOVA decomposes variance and needs no sign.
    """
    import optuna

    names_all = sorted({p for t in trials for p in t.params})
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        what = "trials with mIoU" if miou is not None else "completed trials"
        return {"unavailable": f"importances need at least {MIN_IMPORTANCE_TRIALS} {what} "
                               f"(have {len(trials)})"}
    if not names_all:
        return {"unavailable": "the trials have no parameters"}
    try:
        ev, ev_name = importance_evaluator(evaluator, seed)
    except ValueError as err:
        return {"unavailable": str(err)}
    study = optuna.create_study(direction="maximize")
    for i, t in enumerate(trials):
        attrs = {} if miou is None else {"miou": float(miou[i])}
        study.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=t.value, user_attrs=attrs))
    sign = -1.0 if ev_name == "ped-anova" else 1.0
    everywhere = [p for p in names_all if all(p in t.params for t in trials)]
    conditional = [p for p in names_all if p not in everywhere]
    constant = {"objective": len({t.value for t in trials}) == 1,
                "miou": miou is not None and len(set(miou)) == 1}
    notes: list[str] = []
    result: dict[str, Any] = {"evaluator": ev_name, "trials": len(trials)}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for key, target in (("objective", lambda t: sign * t.value),
                                ("miou", lambda t: sign * t.user_attrs["miou"])):
                if key == "miou" and miou is None:
                    result[key] = None
                elif constant[key]:  # nothing to explain; evaluators would return noise or fail
                    result[key] = {p: 0.0 for p in (names_all if ev_name == "ped-anova" else everywhere)}
                    notes.append(f"the {'objective' if key == 'objective' else 'mIoU'} is the same in every "
                                 "trial: its importances are all 0")
                else:
                    result[key] = dict(optuna.importance.get_param_importances(study, evaluator=ev,
                                                                               target=target))
        notes += sorted({str(w.message).splitlines()[0] for w in caught
                         if "achieve low `target`" not in str(w.message)})  # negated on purpose
    except Exception as err:  # optuna's own checks (e.g. degenerate distributions)
        text = str(err).strip()
        return {"unavailable": f"{ev_name} failed: {text.splitlines()[0] if text else type(err).__name__}"}
    assessed = set(result["objective"])
    result["left_out"] = [
        {"param": p, "reason": "conditional: not in every trial" if p in conditional else "not assessed"}
        for p in names_all if p not in assessed
    ]
    result["notes"] = notes
    return result
