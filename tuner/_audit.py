"""The engine of `tune audit` (see tuner/audit.py for what it measures and the CLI)."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from . import _audit_stats as S
from .study import is_repeat

AUDIT_VERSION = 1
OBJECTIVE_TOLERANCE = 1e-5  # stored per-image objective values are rounded to 6 decimals
MIOU_TOLERANCE = 1e-6


@dataclass
class AuditOptions:
    """What `tune audit` reads and how far it goes (CLI options of the same names)."""

    study: str
    storage: str = "sqlite:///runs/tune.db"
    dataset: str | None = None  # with `split`: evaluate configs on this labelled split for mIoU
    split: str | None = None
    images: int | None = None  # evaluation images (default: as many as the study tuned on)
    max_trials: int = 50  # trials re-evaluated at most
    reevaluate: bool = True
    bootstrap: int = 1000
    seed: int = 0
    importance: str = "auto"  # auto (fANOVA if scikit-learn is installed, else PED-ANOVA), fanova, ped-anova
    device: str | None = None
    cache_dir: str | None = "runs/cache"
    batch_size: int = 8
    data_root: str | None = None
    progress: bool = False
    protocol: str = "standard"  # evaluation protocol of the audit's mIoU: standard or paper


@dataclass(eq=False)
class _Trial:
    """One completed trial as the audit sees it."""

    frozen: FrozenTrial
    value: float  # higher is better
    objective_per_image: np.ndarray | None
    stored_miou: float | None
    miou: float | None = None  # the mIoU the audit uses (stored or re-evaluated)
    iou_per_class: dict[str, float | None] | None = None
    counts: np.ndarray | None = None  # [n, 3, K] on the images mIoU is measured on
    foreground: float | None = None
    evaluated: bool = False
    eval_objective: float | None = None  # objective on the evaluation images (--dataset/--split)

    @property
    def number(self) -> int:
        return self.frozen.number


# --- entry points ---------------------------------------------------------------------------------
def run_audit(options: AuditOptions) -> dict[str, Any]:
    """Audit one study; the report is a JSON-ready dict (what audit.json holds)."""
    from .study import load_study

    if options.max_trials < 1:
        raise ValueError("--max-trials must be at least 1 (the label-free choice is always evaluated)")
    if options.bootstrap < 0:
        raise ValueError("--bootstrap must be >= 0 (0 skips the intervals)")
    study = load_study(options.storage, options.study)
    return audit_study(study, options)


def audit_study(study: optuna.Study, options: AuditOptions) -> dict[str, Any]:
    """The audit of a loaded study (any storage, in-memory included)."""
    attrs = dict(study.user_attrs)
    if len(study.directions) > 1:
        raise ValueError(f"study {study.study_name!r} has {len(study.directions)} objectives: the audit "
                         "compares one objective with mIoU (audit a single-objective study, e.g. one "
                         "with `objective: combination`)")
    every = study.get_trials(deepcopy=False)
    complete = sorted((t for t in every if t.state == TrialState.COMPLETE and t.value is not None
                       and not is_repeat(t)), key=lambda t: t.number)  # one trial per config
    if len(complete) < 2:
        raise ValueError(
            f"study {study.study_name!r} has {len(complete)} completed trial(s); an audit compares "
            "trials and needs at least 2: run more (`tune run --trials N`)"
        )
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    trials = [_trial(t, sign) for t in complete]
    from .selection import choose

    picked = choose(study)
    choice = picked.trial.number
    notes: list[str] = []
    if sign < 0:
        notes.append("the study minimises its objective: values are negated so that higher is better")

    source = _miou_source(options, attrs, trials)
    _check_protocol(options, source)
    if source["kind"] == "evaluated":  # what the study stored was measured on its tuning images
        for t in trials:
            t.miou = t.iou_per_class = t.counts = t.foreground = None
    elif source["kind"] == "study" and options.protocol != "standard":  # it stored standard-protocol mIoU
        for t in trials:
            t.miou = t.iou_per_class = t.counts = None
    if options.images is not None and source["kind"] != "evaluated":
        notes.append("--images applies to --dataset/--split evaluation only: ignored")
    audit = _Audit(options, attrs, trials, choice, source, notes, sign)
    audit.fill_per_image()
    report = audit.report(study, every)
    report["choice"] = {**picked.summary(), "description": picked.describe()}
    tied = [audit.by_number[t.number].miou for t in picked.tied if t.number in audit.by_number]
    tied = [m for m in tied if m is not None and math.isfinite(m)]
    if len(tied) > 1:
        report["choice"]["tied_miou_range"] = [min(tied), max(tied)]
    report["confidence_check"] = _confidence(study, picked, options)
    return _json_ready(report)


def _confidence(study: optuna.Study, picked, options: AuditOptions) -> dict[str, Any]:
    """The label-free confidence check of the choice (tuner.confidence), stored or computed now."""
    from .confidence import ensure_check, verdict

    stored = study.user_attrs.get("confidence_check")
    if stored and stored.get("trial") == picked.trial.number:
        record = dict(stored)
    elif not options.reevaluate:
        record = {"trial": picked.trial.number, "reliably_better": None,
                  "unavailable": "not stored in the study, and --no-reevaluate forbids computing it"}
    else:
        try:
            record = dict(ensure_check(study, picked, device=options.device, cache_dir=options.cache_dir,
                                       data_root=options.data_root))
        except (ValueError, OSError) as err:
            record = {"trial": picked.trial.number, "reliably_better": None,
                      "unavailable": str(err).splitlines()[0]}
    record["verdict"] = verdict(record)
    return record


def write_audit(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write audit.json and a self-contained audit.html into `out_dir`; returns both paths."""
    from ._audit_report import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "audit.json", out / "audit.html"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


# --- where mIoU comes from ---------------------------------------------------------------------------
def _miou_source(options: AuditOptions, attrs: dict, trials: list[_Trial]) -> dict[str, Any]:
    if options.dataset or options.split:
        dataset = options.dataset or attrs.get("dataset")
        split = options.split or attrs.get("eval_split")
        if not dataset or not split:
            raise ValueError("the study records no dataset or eval split: pass both --dataset and --split")
        if not options.reevaluate:
            raise ValueError("--dataset/--split evaluate the trials' configs: drop --no-reevaluate")
        return {"kind": "evaluated", "dataset": dataset, "split": split}
    if any(t.stored_miou is not None for t in trials):
        return {"kind": "study", "dataset": attrs.get("dataset"), "split": attrs.get("tuning_split"),
                "images": len(attrs.get("tuning_ids") or []) or None}
    return {"kind": None}


def _check_protocol(options: AuditOptions, source: dict[str, Any]) -> None:
    """ValueError (one line) for a protocol the audit cannot score its mIoU under."""
    from .datasets import PROTOCOLS, dataset_class

    if options.protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {options.protocol!r}: the audit compares one mIoU "
                         f"with the objective: use one of {', '.join(PROTOCOLS)}")
    if source["kind"] is None or options.protocol == "standard":
        return
    if source.get("dataset"):
        dataset_class(source["dataset"]).check_protocol(options.protocol)
    if source["kind"] == "study" and not options.reevaluate:
        raise ValueError(f"the study stores standard-protocol mIoU: --protocol {options.protocol} "
                         "re-evaluates its trials on the tuning images: drop --no-reevaluate")


def _trial(t: FrozenTrial, sign: float) -> _Trial:
    per_image = t.user_attrs.get("objective_per_image")
    stored = t.user_attrs.get("miou")
    stored = float(stored) if isinstance(stored, (int, float)) and math.isfinite(stored) else None
    record = _Trial(
        frozen=t, value=sign * float(t.value),
        objective_per_image=None if per_image is None else sign * np.asarray(per_image, dtype=np.float64),
        stored_miou=stored, miou=stored, iou_per_class=t.user_attrs.get("iou_per_class"),
    )
    record.counts, fg = _trial_counts(t)
    if fg is not None:
        record.foreground = float(np.mean(fg))
    return record


def _trial_counts(t: FrozenTrial) -> tuple[np.ndarray | None, list[float] | None]:
    """Per-image counts a trial stored itself, if any.

    Format (trial user attrs, one entry per tuning image in `tuning_ids` order):
    "class_counts_per_image": [[[class_id, tp, gt, pred], ...], ...] (rows for classes with a
    nonzero count only), "foreground_per_image": [share of pixels given a class, ...].
    """
    rows, fg = t.user_attrs.get("class_counts_per_image"), t.user_attrs.get("foreground_per_image")
    if not rows:
        return None, fg
    n_classes = 1 + max((int(r[0]) for image in rows for r in image), default=0)
    counts = np.zeros((len(rows), 3, n_classes), dtype=np.int64)
    for i, image in enumerate(rows):
        for class_id, tp, gt, pred in image:
            counts[i, :, int(class_id)] = (tp, gt, pred)
    return counts, fg


# --- the audit -------------------------------------------------------------------------------------
@dataclass
class _Audit:
    options: AuditOptions
    attrs: dict[str, Any]
    trials: list[_Trial]
    choice: int
    source: dict[str, Any]
    notes: list[str]
    sign: float = 1.0  # -1 for a study that minimises
    consistency: dict[str, Any] | None = None
    default: dict[str, Any] = field(default_factory=dict)
    true_foreground: float | None = None
    eval_ids: list[str] | None = None
    _reeval: Any = None
    _reeval_error: str | None = None
    _image_sets: dict[tuple, Any] = field(default_factory=dict)

    @property
    def by_number(self) -> dict[int, _Trial]:
        return {t.number: t for t in self.trials}

    @property
    def _must_evaluate(self) -> bool:
        """True when every mIoU comes from the audit's own evaluation (a failure to run it is an error)."""
        return self.source["kind"] == "evaluated" or (self.source["kind"] == "study"
                                                      and self.options.protocol != "standard")

    # -- re-evaluation -------------------------------------------------------------------------------
    def reevaluator(self):
        """The study's models and data (built once); None, with the reason kept, when they cannot load."""
        if self._reeval is None and self._reeval_error is None:
            from ._audit_eval import Reevaluator

            try:
                self._reeval = Reevaluator(
                    self.attrs, device=self.options.device, cache_dir=self.options.cache_dir,
                    batch_size=self.options.batch_size, data_root=self.options.data_root,
                    protocol=self.options.protocol)
            except (ValueError, OSError, KeyError) as err:
                if self._must_evaluate:
                    raise
                self._reeval_error = _first_line(err)
        return self._reeval

    def image_set(self, dataset: str, split: str, ids: list[str]):
        key = (dataset, split, tuple(ids))
        if key not in self._image_sets:
            self._image_sets[key] = self.reevaluator().image_set(dataset, split, ids)
        return self._image_sets[key]

    def tuning_images(self):
        ids = self.attrs.get("tuning_ids")
        if not ids:
            raise ValueError("the study records no tuning_ids: cannot rebuild its tuning images")
        return self.image_set(self.attrs["dataset"], self.attrs["tuning_split"], list(ids))

    def evaluation_images(self):
        """The labelled images mIoU is measured on: the tuning images, or a seeded --split subset."""
        if self.source["kind"] != "evaluated":
            return self.tuning_images()
        reeval = self.reevaluator()
        dataset, split = self.source["dataset"], self.source["split"]
        ds = reeval.dataset(dataset)
        ds.check_split(split)
        ids = ds.ids(split)
        tuning = set(self.attrs.get("tuning_ids") or [])
        if dataset == self.attrs.get("dataset"):  # held out: never an image the study tuned on
            kept = [i for i in ids if i not in tuning]  # (a "val:tune" study shares ids with "val")
            if not kept:
                raise ValueError(f"split {split!r} has no images besides the study's tuning images")
            if len(kept) < len(ids):
                self.notes.append(f"{len(ids) - len(kept)} tuning images of {split!r} left out of the "
                                  "evaluation images")
            ids = kept
        count = self.options.images or len(tuning) or 32
        if count < len(ids):
            rng = np.random.default_rng(self.options.seed)
            ids = [ids[i] for i in sorted(rng.choice(len(ids), size=count, replace=False))]
        images = self.image_set(dataset, split, ids)
        if images.skipped:
            self.notes.append(f"{len(images.skipped)} corrupt evaluation images skipped "
                              f"(first: {images.skipped[0][0]}: {images.skipped[0][1]})")
        if not images.labelled:
            raise ValueError(f"split {split!r} of dataset {dataset!r} has no pixel labels: mIoU needs them")
        return images

    def _select(self) -> tuple[list[_Trial], int]:
        """Trials to re-evaluate: the choice, the default, the top 5 by objective and by stored mIoU,
        then a seeded sample of the rest."""
        need = [t for t in self.trials if self.source["kind"] == "evaluated"
                or t.counts is None or t.foreground is None]
        if not need:
            return [], 0
        default = self._default_trial()
        ranked = [self.choice] + ([default.number] if default is not None else [])
        ranked += [self.trials[i].number for i in S.order_desc([t.value for t in self.trials])[:5]]
        with_miou = [t for t in self.trials if t.stored_miou is not None]
        if self.source["kind"] == "study" and with_miou:
            ranked += [with_miou[i].number for i in S.order_desc([t.stored_miou for t in with_miou])[:5]]
        rest = [t.number for t in self.trials if t.number not in ranked]
        rng = np.random.default_rng(self.options.seed)
        ranked += [rest[i] for i in rng.permutation(len(rest))]
        wanted = set(t.number for t in need)
        chosen = list(dict.fromkeys(n for n in ranked if n in wanted))[: self.options.max_trials]
        return [self.by_number[n] for n in sorted(chosen)], len(need)

    def fill_per_image(self) -> None:
        """Re-evaluate where the audit needs per-image data; fill mIoU in with --dataset/--split."""
        if self.source["kind"] is None or not self.options.reevaluate:
            if self.source["kind"] == "study" and not self.options.reevaluate:
                self._reeval_error = "skipped (--no-reevaluate)"
            return
        selected, need = self._select()
        if len(selected) < need:
            what = ("mIoU is measured for" if self.source["kind"] == "evaluated"
                    else "per-image counts (intervals, mask area) cover")
            covered = len(self.trials) - need + len(selected)
            self.notes.append(f"{what} {covered} of {len(self.trials)} trials (--max-trials "
                              f"{self.options.max_trials}): the label-free choice, the top trials, then a "
                              "seeded sample")
        default_needed = "fixed" in self.attrs and self._default_trial() is None
        if not selected and not default_needed:
            return
        if self.reevaluator() is None:
            return
        try:
            images = self.evaluation_images()
        except (ValueError, OSError, KeyError) as err:
            if self._must_evaluate:
                raise
            self._reeval_error = _first_line(err)
            return
        self.true_foreground = images.true_foreground(self.options.protocol)
        self.eval_ids = images.ids
        from segmenter import SegmenterConfig

        diffs_obj: list[float] = []
        diffs_miou: list[float] = []
        with self._progress(len(selected) * len(images.images)) as advance:
            for t in selected:
                if "config" not in t.frozen.user_attrs:
                    self.notes.append(f"trial #{t.number} records no config: not re-evaluated")
                    continue
                try:
                    config = SegmenterConfig.from_dict(t.frozen.user_attrs["config"])
                except ValueError as err:  # a study from an older version of the settings
                    if self.source["kind"] == "evaluated":
                        raise ValueError(f"trial #{t.number}: {_first_line(err)}") from None
                    self.notes.append(f"trial #{t.number} not re-evaluated: {_first_line(err)}")
                    continue
                out = self.reevaluator().evaluate(config, images, on_image=advance)
                t.evaluated = True
                t.counts, t.foreground = out.counts, float(out.foreground.mean())
                summed = out.counts.sum(axis=0)
                names = images.dataset.scored_class_names(self.options.protocol)
                if self.source["kind"] == "evaluated":
                    t.miou = float(S.miou_from_counts(summed))
                    t.iou_per_class = S.iou_per_class_from_counts(summed, names)
                    t.eval_objective = float(out.objective.mean())
                else:
                    if t.miou is None:  # measured on the same images as the stored values
                        t.miou = float(S.miou_from_counts(summed))
                        t.iou_per_class = S.iou_per_class_from_counts(summed, names)
                    fresh = self.sign * out.objective
                    if t.objective_per_image is not None and t.objective_per_image.size == fresh.size:
                        diffs_obj.append(float(np.abs(fresh - t.objective_per_image).max()))
                    # the study stores per-image values rounded to 6 decimals; the bootstrap needs
                    # them at full precision (an objective of magnitude 1e-20 rounds to all zeros)
                    t.objective_per_image = fresh
                    if t.stored_miou is not None and self.options.protocol == "standard":
                        diffs_miou.append(abs(float(S.miou_from_counts(summed)) - t.stored_miou))
        if self.source["kind"] == "evaluated":
            self._refresh_tuning_objective([t for t in selected if t.evaluated])
        if self.source["kind"] == "study" and (diffs_obj or diffs_miou):
            self.consistency = {
                "trials": len([t for t in selected if t.evaluated]),
                "objective_max_abs_diff": max(diffs_obj, default=None),
                "miou_max_abs_diff": max(diffs_miou, default=None),
            }
            reproduced = (max(diffs_obj, default=0.0) <= OBJECTIVE_TOLERANCE
                          and max(diffs_miou, default=0.0) <= MIOU_TOLERANCE)
            self.consistency["reproduced"] = reproduced
            if not reproduced:
                self.notes.append(
                    "re-evaluation does not reproduce the study's stored values (max |d objective| "
                    f"{max(diffs_obj, default=0.0):.2g}, max |d mIoU| {max(diffs_miou, default=0.0):.2g}): "
                    "models, data or code changed since the study ran; point estimates use the stored "
                    "values, intervals the re-evaluated counts"
                )
        if default_needed:
            try:
                self.default = self._evaluate_default(images)
            except (ValueError, OSError, KeyError, IndexError) as err:
                self.default = {"unavailable": f"the fixed settings cannot be evaluated: {_first_line(err)}"}

    def _refresh_tuning_objective(self, trials: list[_Trial]) -> None:
        """Full-precision objective per tuning image where the stored, rounded values lose the trials."""
        from segmenter import SegmenterConfig

        stored = [t for t in trials if t.objective_per_image is not None]
        if len(stored) < 2 or S.resolves(np.stack([t.objective_per_image for t in stored]),
                                         np.array([t.value for t in stored])):
            return
        try:
            images = self.tuning_images()
        except (ValueError, OSError, KeyError) as err:
            self.notes.append(f"tuning images not readable ({_first_line(err)}): intervals use the stored "
                              "per-image objective values")
            return
        with self._progress(len(trials) * len(images.images), "re-scoring tuning images") as advance:
            for t in trials:
                config = SegmenterConfig.from_dict(t.frozen.user_attrs["config"])
                t.objective_per_image = self.sign * self.reevaluator().evaluate(
                    config, images, on_image=advance).objective
        self.notes.append("the stored per-image objective values (rounded to 6 decimals) do not resolve the "
                          "trials, so the objective was re-evaluated on the tuning images for the intervals")

    def _progress(self, total: int, what: str = "re-evaluating trials"):
        from contextlib import contextmanager

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        @contextmanager
        def bar():
            progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True),
                                disable=not self.options.progress, transient=True)
            with progress:
                task = progress.add_task("images", total=total)
                yield lambda: progress.advance(task)

        return bar()

    # -- the default (fixed) settings ---------------------------------------------------------------
    def _default_trial(self) -> _Trial | None:
        """The trial that ran exactly the study's fixed settings, if one did.

        The stored dicts are compared (both written by the same run), not config hashes, which
        change whenever SegmenterConfig gains a setting.
        """
        fixed = self.attrs.get("fixed")
        if not isinstance(fixed, dict):
            return None
        for t in self.trials:
            if t.frozen.user_attrs.get("config") == fixed:
                return t
        return None

    def _evaluate_default(self, images) -> dict[str, Any]:
        from segmenter import SegmenterConfig

        config = SegmenterConfig.from_dict(self.attrs["fixed"])
        reeval = self.reevaluator()
        reeval.method.check(config)  # the fixed settings alone may not fit
        out = reeval.evaluate(config, images)
        summed = out.counts.sum(axis=0)
        result = {"source": "evaluated", "trial": None, "miou": float(S.miou_from_counts(summed)),
                  "foreground": float(out.foreground.mean())}
        if self.source["kind"] == "evaluated":
            try:
                result["objective"] = float(reeval.evaluate(config, self.tuning_images()).objective.mean())
            except (ValueError, OSError, KeyError) as err:
                result["objective"] = None
                self.notes.append(f"default settings' objective on the tuning images: {err}")
        else:
            result["objective"] = float(out.objective.mean())
        return result

    def default_comparison(self, choice: _Trial) -> dict[str, Any]:
        if "fixed" not in self.attrs:
            return {"unavailable": "the study records no fixed settings"}
        trial = self._default_trial()
        if trial is not None and trial.miou is not None:
            default = {"source": f"trial #{trial.number}", "trial": trial.number, "miou": trial.miou,
                       "objective": trial.value, "foreground": trial.foreground}
        elif self.default:
            if "unavailable" in self.default:
                return dict(self.default)
            default = dict(self.default)
        else:
            why = self._reeval_error or ("no trial ran them and the study has no mIoU to compare"
                                         if self.source["kind"] is None else "no trial ran them")
            return {"unavailable": f"the fixed settings were not evaluated: {why}"}
        default["gain"] = None if choice.miou is None else choice.miou - default["miou"]
        return default

    # -- the report -----------------------------------------------------------------------------------
    def report(self, study: optuna.Study, every: list[FrozenTrial]) -> dict[str, Any]:
        scored = [t for t in self.trials if t.miou is not None and math.isfinite(t.miou)]
        numbers = [t.number for t in scored]
        obj = np.array([t.value for t in scored])
        miou = np.array([t.miou for t in scored])
        choice = self.by_number[self.choice]
        counts = {s.name.lower(): sum(t.state == s for t in every) for s in TrialState}
        report: dict[str, Any] = {
            "audit_version": AUDIT_VERSION,
            "study": study.study_name,
            "storage": _redact(self.options.storage),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "objective": self.attrs.get("objective"),
            "trials": {**{k: v for k, v in counts.items() if v}, "audited": len(self.trials),
                       "with_miou": len(scored), "re_evaluated": sum(t.evaluated for t in self.trials)},
            "miou_source": self._source_report(),
            "ledger": self._ledger(choice),
        }
        missing = self._why_no_miou(scored)
        if missing:
            for key in ("agreement", "regret", "goodhart"):
                report[key] = {"unavailable": missing}
            report["top_k"] = []
        else:
            report["agreement"] = {"trials": len(scored), **S.rank_agreement(obj, miou),
                                   "weighted_by": "objective rank, hyperbolic weights 1/(r+1)",
                                   "bootstrap": self._bootstrap(scored)}
            flat = [what for what, v in (("the objective", obj), ("mIoU", miou)) if np.ptp(v) == 0]
            if flat:
                verb = "takes" if len(flat) == 1 else "take"
                report["agreement"]["undefined"] = (f"{' and '.join(flat)} {verb} the same value in every "
                                                    "trial: rank correlations are undefined")
                if np.ptp(obj) == 0:
                    self.notes.append("the objective takes the same value in every trial, so it cannot rank "
                                      "them: the label-free choice is arbitrary (the study's best trial)")
            if self.source["kind"] == "evaluated":
                evaluated = [t for t in scored if t.eval_objective is not None]
                if len(evaluated) >= 2:
                    same = S.rank_agreement(np.array([t.eval_objective for t in evaluated]),
                                            np.array([t.miou for t in evaluated]))
                    report["agreement"]["spearman_same_images"] = same["spearman"]["value"]
            report["top_k"] = S.top_k(obj, miou)
            boot = report["agreement"]["bootstrap"]
            for row in report["top_k"]:
                row["bootstrap_hit_rate"] = (boot.get("top_k_hit_rate") or {}).get(str(row["k"]))
            if self.choice in numbers:
                report["regret"] = S.regret(numbers, obj, miou, self.choice)
                report["regret"]["regret_ci95"] = (boot.get("regret") or {}).get("ci95")
                report["regret"]["vs_default"] = self.default_comparison(choice)
            else:
                why = f"the label-free choice (trial #{self.choice}) has no mIoU"
                report["regret"] = {"unavailable": why}
            report["goodhart"] = S.discordant_pairs(numbers, obj, miou)
            report["goodhart"]["per_class"] = self._per_class(scored, choice)
        report["goodhart"] = {**report.get("goodhart", {}), "mask_area": self._mask_area()}
        if missing and self.source["kind"] is None:  # the objective's side alone
            report["importances"] = S.param_importances([t.frozen for t in self.trials], None,
                                                        self.options.importance, self.options.seed)
        elif missing:
            report["importances"] = {"unavailable": missing}
        else:
            report["importances"] = S.param_importances([t.frozen for t in scored], list(miou),
                                                         self.options.importance, self.options.seed)
        report["consistency"] = self.consistency
        optimum = numbers[int(S.order_desc(miou)[0])] if numbers else None
        report["trials_table"] = [self._row(t, optimum) for t in self.trials]
        report["warnings"] = list(dict.fromkeys(self.notes))
        return report

    def _why_no_miou(self, scored: list[_Trial]) -> str | None:
        if self.source["kind"] is None:
            return ("the study recorded no mIoU (it ran without pixel labels): pass --dataset/--split to "
                    "evaluate its trials on a labelled split")
        if len(scored) < 2:
            return f"only {len(scored)} trial(s) have an mIoU; an audit needs at least 2"
        return None

    def _source_report(self) -> dict[str, Any]:
        src = dict(self.source)
        protocol = self.options.protocol
        if src["kind"] is not None:
            src["protocol"] = protocol
        if src["kind"] == "study" and protocol == "standard":
            src["description"] = ("trial user attr 'miou', measured by the study on its tuning images "
                                  "(standard protocol)")
        elif src["kind"] == "study":
            src["description"] = (f"re-evaluated by the audit on the study's tuning images under the "
                                  f"{protocol} protocol (the study stores standard-protocol mIoU)")
        elif src["kind"] == "evaluated":
            src["images"] = len(self.eval_ids or [])
            src["description"] = (f"re-evaluated by the audit on {src['dataset']}/{src['split']} "
                                  f"({src['images']} images, seed {self.options.seed}, {protocol} protocol)")
        else:
            src["description"] = "none"
        if src["kind"] is not None and protocol == "paper" and src.get("dataset"):
            from .datasets import dataset_class

            src["paper_rule"] = dataset_class(src["dataset"]).paper_rule
        return src

    def _bootstrap(self, scored: list[_Trial]) -> dict[str, Any]:
        if self.options.bootstrap == 0:
            return {"unavailable": "skipped (--bootstrap 0)"}
        joint = self.source["kind"] == "study"
        usable = [t for t in scored if t.counts is not None and t.objective_per_image is not None]
        if usable:
            n_t, n_e = usable[0].objective_per_image.size, usable[0].counts.shape[0]
            usable = [t for t in usable if t.objective_per_image.size == n_t and t.counts.shape[0] == n_e]
        if len(usable) < 2:
            why = self._reeval_error or "no per-image counts (re-evaluation found nothing to evaluate)"
            return {"unavailable": f"per-image segmentation counts are missing for the trials: {why}"}
        if joint and n_t != n_e:
            return {"unavailable": f"the objective covers {n_t} tuning images and the counts {n_e}: some "
                                   "tuning images could not be read again"}
        per_image = np.stack([t.objective_per_image for t in usable])
        if not S.resolves(per_image, np.array([t.value for t in usable])):
            return {"unavailable": "the per-image objective values (stored rounded to 6 decimals) do not "
                                   "average back to the trials' values: resampling them would rank "
                                   "other trials"}
        n_classes = max(t.counts.shape[2] for t in usable)
        counts = np.zeros((len(usable), n_e, 3, n_classes))
        for i, t in enumerate(usable):
            counts[i, :, :, : t.counts.shape[2]] = t.counts
        return S.bootstrap(per_image, counts, joint=joint,
                           replicates=self.options.bootstrap, seed=self.options.seed)

    def _per_class(self, scored: list[_Trial], choice: _Trial) -> dict[str, Any]:
        optimum = scored[int(S.order_desc([t.miou for t in scored])[0])]
        if choice.iou_per_class is None or optimum.iou_per_class is None:
            return {"unavailable": "IoU per class was not recorded for the choice or the optimum"}
        rows = S.per_class_difference(choice.iou_per_class, optimum.iou_per_class)
        return {"choice": choice.number, "optimum": optimum.number, "same_trial": choice is optimum,
                "classes": rows}

    def _mask_area(self) -> dict[str, Any]:
        measured = [t for t in self.trials if t.foreground is not None]
        if len(measured) < 3:
            why = self._reeval_error or ("no mIoU source to re-evaluate on" if self.source["kind"] is None
                                         else "fewer than 3 trials were re-evaluated")
            return {"unavailable": f"mean predicted foreground is known for {len(measured)} trial(s): {why}"}
        miou = [t.miou for t in measured]
        has_miou = all(m is not None for m in miou)
        return S.mask_area(np.array([t.value for t in measured]), np.array(miou) if has_miou else None,
                           np.array([t.foreground for t in measured]), self.true_foreground)

    def _row(self, t: _Trial, optimum: int | None) -> dict[str, Any]:
        return {
            "trial": t.number, "objective": t.value, "miou": t.miou, "stored_miou": t.stored_miou,
            "foreground": t.foreground, "evaluated": t.evaluated, "eval_objective": t.eval_objective,
            "params": dict(t.frozen.params), "label_free_choice": t.number == self.choice,
            "labelled_optimum": t.number == optimum,
        }

    # -- the leakage ledger ------------------------------------------------------------------------------
    def _ledger(self, choice: _Trial) -> dict[str, Any]:
        attrs = self.attrs
        tuning_ids = list(attrs.get("tuning_ids") or [])
        objective_labels = attrs.get("objective_labels", "unknown")
        rules = sorted({str((t.frozen.user_attrs.get("config") or {}).get("candidates", "?"))
                        for t in self.trials})
        image_level = [t.number for t in self.trials
                       if t.frozen.user_attrs.get("labels_used") == "image-level"]
        reasons = []
        if objective_labels not in ("none", "unknown"):
            reasons.append(f"the objective {attrs.get('objective')!r} reads {objective_labels} labels")
        protocol = attrs.get("protocol", "standard")
        if choice.frozen.user_attrs.get("labels_used", "none") != "none":
            used = choice.frozen.user_attrs["labels_used"]
            reasons.append(f"the search protocol paper reads {used} labels (each tuning image's ground-truth "
                           "classes are its candidates)" if protocol == "paper"
                           else f"the choice's candidate rule reads {used} labels")
        stored = any(t.stored_miou is not None for t in self.trials)
        ledger: dict[str, Any] = {
            "labels_touched": attrs.get("labels_touched", "unknown (not recorded)"),
            "objective": attrs.get("objective"),
            "objective_labels": objective_labels,
            "candidate_rule": attrs.get("candidate_rule"),
            "search_protocol": protocol,
            "candidate_rules_in_trials": rules,
            # files the study read beside the dataset (candidates: file): not labels, by content hash
            "external_sources": list(attrs.get("external_sources") or []),
            "trials_using_image_labels": image_level,
            "choice_is_label_free": not reasons if objective_labels != "unknown" else None,
            "choice_label_use": reasons or ["none: the objective and the choice's candidates read no labels"
                                            + (" of the dataset (its candidates come from an external file, "
                                               "below)" if attrs.get("external_sources") else "")],
            "pixel_labels_in_study": "mIoU recorded per trial for reporting only (never the objective, "
                                     "never shown to the sampler)" if stored else "not read",
            "pixel_labels_in_audit": self._audit_label_use(),
            "tuning": {"dataset": attrs.get("dataset"), "split": attrs.get("tuning_split"),
                       "images": len(tuning_ids), "seed": attrs.get("seed"),
                       "skipped_corrupt": len(attrs.get("skipped_images") or [])},
        }
        ledger["declared_eval"] = self._overlap(attrs.get("dataset"), attrs.get("eval_split"), None)
        if self.source["kind"] == "study":
            ledger["miou_images"] = {
                "dataset": attrs.get("dataset"), "split": attrs.get("tuning_split"),
                "images": len(tuning_ids),
                "overlap": len(tuning_ids), "overlap_fraction": 1.0 if tuning_ids else None,
                "note": "mIoU is measured on the tuning images themselves: fine to compare trials, "
                        "optimistic as an estimate of held-out mIoU",
            }
        elif self.source["kind"] == "evaluated":
            ledger["miou_images"] = self._overlap(self.source["dataset"], self.source["split"], self.eval_ids)
        return ledger

    def _audit_label_use(self) -> str:
        if self.source["kind"] == "evaluated":
            return f"pixel: mIoU of the trials' configs on {self.source['dataset']}/{self.source['split']}"
        if any(t.evaluated for t in self.trials):
            return "pixel: per-image counts of the trials' configs on the tuning images"
        return "none beyond what the study stored"

    def _overlap(self, dataset: str | None, split: str | None, ids: list[str] | None) -> dict[str, Any]:
        """How many tuning images are among `ids` (or among the split's ids when `ids` is None)."""
        tuning = set(self.attrs.get("tuning_ids") or [])
        row: dict[str, Any] = {"dataset": dataset, "split": split}
        if not split:
            return {**row, "overlap": None, "note": "not recorded"}
        if dataset != self.attrs.get("dataset"):
            return {**row, "images": None if ids is None else len(ids), "overlap": 0, "overlap_fraction": 0.0,
                    "note": "another dataset than the study tuned on"}
        if ids is None:
            try:
                from ._audit_eval import _takes_root
                from .datasets import load_dataset

                options = {k: _typed(v) for k, v in (self.attrs.get("dataset_options") or {}).items()}
                if self.options.data_root and _takes_root(dataset):
                    options["root"] = self.options.data_root
                ids = load_dataset(dataset, **options).ids(split)
                method = "ids of the split intersected with the tuning ids"
            except Exception as err:  # a dataset not on this machine: fall back on the split names
                shared = _overlap_by_name(split, self.attrs.get("tuning_split"), len(tuning))
                return {**row, "images": None, "overlap": shared,
                        "overlap_fraction": None if shared is None or not tuning else shared / len(tuning),
                        "note": f"dataset not readable here ({_first_line(err)}); judged by split name, "
                                "distinct splits taken to be disjoint"}
        else:
            method = "the audit's evaluation ids intersected with the tuning ids"
        shared = len(tuning & set(ids))
        return {**row, "images": len(ids), "overlap": shared,
                "overlap_fraction": shared / len(tuning) if tuning else None, "note": method}


def _overlap_by_name(split: str, tuning_split: str | None, tuning: int) -> int | None:
    """Tuning images in `split`, from the names alone: "val" and "val:tune" may share images."""
    if split == tuning_split:
        return tuning
    (base, _, part), (tbase, _, tpart) = (s.partition(":") for s in (split, tuning_split or ""))
    if base != tbase or {part, tpart} == {"tune", "eval"}:
        return 0
    return None  # one is a partition of the other: unknown without the ids


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _typed(value: Any) -> Any:
    from ._audit_eval import _typed as typed

    return typed(value)


# --- JSON ---------------------------------------------------------------------------------------------
def _json_ready(value: Any) -> Any:
    """NaN and infinities become None, numpy scalars Python numbers, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
