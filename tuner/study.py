"""Running, resuming and reading Optuna studies of a StudySpec."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

import segmenter
from objectives import get_objective
from segmenter import SegmenterConfig, load_backend
from segmenter.backends import resolve_batch_size
from segmenter.images import image_digest

from .cache import MapCache
from .datasets import Dataset, disjoint_splits, iter_samples, load_dataset
from .spec import StudySpec, config_from_params
from .trial import CandidatePicker, MapProvider, TrialRunner, TuningImage

DEFAULT_STORAGE = "sqlite:///runs/tune.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def config_hash(config: SegmenterConfig) -> str:
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()[:12]


def open_storage(url: str, heartbeat: int = 30) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL: sqlite:///path, postgresql://..., or journal:PATH (a file).

    Database storages get heartbeats: a trial whose worker stops beating for 3 x `heartbeat`
    seconds is marked failed and retried once more with the same parameters.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=2
                ),
            )
    except Exception as err:  # bad URL, server down, missing driver
        raise ValueError(f"cannot open storage {url!r}: {str(err).splitlines()[0]}") from None


def load_study(storage: str, name: str) -> optuna.Study:
    """An existing study; a missing one is a one-line error listing those in the storage."""
    store = open_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if name not in names:
        have = ", ".join(names) if names else "none"
        raise ValueError(f"no study {name!r} in {storage} (studies there: {have})")
    return optuna.load_study(study_name=name, storage=store)


def pick_tuning_ids(dataset: Dataset, split: str, count: int, seed: int) -> list[str]:
    """A seeded subset of a split (all of it when it has fewer images)."""
    ids = dataset.ids(split)
    if not ids:
        raise ValueError(f"split {split!r} of dataset {dataset.name!r} has no images")
    if count >= len(ids):
        return list(ids)
    rng = np.random.default_rng(seed)
    return [ids[i] for i in sorted(rng.choice(len(ids), size=count, replace=False))]


@dataclass
class RunOptions:
    storage: str = DEFAULT_STORAGE
    study_name: str | None = None
    trials: int | None = None
    images: int | None = None
    device: str | None = None
    seed: int | None = None
    cache_dir: str | None = "runs/cache"
    batch_size: int | str = "auto"  # images per model batch; "auto": from free GPU memory
    data_root: str | None = None
    progress: bool = True
    heartbeat: int = 30
    workers: int = 0  # processes for post-processing (0: in the main process)
    strict: bool = False  # a corrupt tuning image fails the run instead of being skipped


class StudyRunner:
    """Everything one `tune run` needs, built once: dataset, models, tuning images, runner."""

    def __init__(self, spec: StudySpec, options: RunOptions) -> None:
        self.spec, self.options = spec, options
        self.seed = options.seed if options.seed is not None else spec.tuning_seed
        self.trials = options.trials or spec.trials
        self.name = options.study_name or spec.study_name
        self.storage = open_storage(options.storage, options.heartbeat)
        self.study = self._create_study()

        dataset_options = dict(spec.dataset_options)
        if options.data_root:
            dataset_options["root"] = options.data_root
        self.dataset = load_dataset(spec.dataset, **dataset_options)
        # tuning and evaluation images are disjoint unless a spec names both splits itself
        if spec.tuning_split == "auto":
            self.tuning_split, self.eval_split = disjoint_splits(self.dataset, spec.eval_split)
        else:
            self.tuning_split, self.eval_split = spec.tuning_split, spec.eval_split
        self.tuning_split = self.study.user_attrs.get("tuning_split", self.tuning_split)
        self.dataset.check_split(self.tuning_split)
        recorded = self.study.user_attrs.get("tuning_ids")
        count = options.images or spec.tuning_images
        self.tuning_ids = recorded or pick_tuning_ids(self.dataset, self.tuning_split, count, self.seed)
        if recorded and options.images and options.images != len(recorded):
            raise ValueError(
                f"study {self.name!r} tunes on {len(recorded)} images; --images {options.images} "
                "would change it: use a new --study name"
            )
        self.backend = load_backend(spec.fixed.backend, spec.fixed.model, spec.fixed.revision,
                                    device=options.device)
        self._check_space_against_model()
        self.objective = get_objective(spec.objective, device=str(self.backend.device),
                                       backend=self.backend, **spec.objective_options)
        self.extra_objectives = self._extra_objectives()
        self.cache = MapCache(options.cache_dir)
        self.batch_size = resolve_batch_size(options.batch_size, self.backend, spec.fixed.image_size)
        self.provider = MapProvider(self.backend, self.cache, self.batch_size)
        self.images = self._load_images()
        self.runner = TrialRunner(
            self.dataset, self.images, self.provider, self.objective,
            CandidatePicker(self.dataset.vocabulary, self.backend, getattr(self.objective, "clip", None)),
            batch_size=self.batch_size, pool=self._make_pool(options.workers),
            report="instance" if spec.pruner.get("type", "wilcoxon") == "wilcoxon" else "mean",
            extra=self.extra_objectives,
        )
        self._record_study_attrs()

    # -- setup -------------------------------------------------------------------------------------
    def _create_study(self) -> optuna.Study:
        directions = ["maximize"] * max(len(self.spec.objectives), 1)
        return optuna.create_study(
            storage=self.storage, study_name=self.name, load_if_exists=True,
            directions=directions, sampler=self.spec.make_sampler(self.seed),
            pruner=self.spec.make_pruner(),
        )

    def _extra_objectives(self) -> dict:
        """The other objectives of a multi-objective study, and the tie-break objective, by name."""
        device, out = str(self.backend.device), {}
        clip = getattr(self.objective, "clip", None)
        named = list(self.spec.objectives[1:])
        if self.spec.tie_break:
            named.append((self.spec.tie_break, self.spec.tie_break_options))
        for name, options in named:
            if name in out or (name == self.spec.objective and options == self.spec.objective_options):
                continue
            shared = {"clip": clip} if clip is not None and "clip_model" not in options and \
                name.startswith("clip_") else {}
            out[name] = get_objective(name, device=device, backend=self.backend, **options, **shared)
        for objective in (self.objective, *out.values()):
            if getattr(objective, "direction", "maximize") != "maximize":
                raise ValueError(f"objective {objective.name!r} minimises: studies maximise their objectives")
        return out

    @staticmethod
    def _make_pool(workers: int):
        if workers <= 1:
            return None
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        """Stop the post-processing worker processes."""
        if self.runner.pool is not None:
            self.runner.pool.shutdown()

    def _check_space_against_model(self) -> None:
        """Every layer and head the search space can pick must exist in the model (fail early)."""
        fixed, layers, heads = self.spec.fixed, [self.spec.fixed.layer], list(self.spec.fixed.heads)
        for param in self.spec.search_space:
            values = list(param.choices) if param.type == "categorical" else [param.low, param.high]
            if param.name == "layer":
                layers = [int(v) for v in values]
            elif param.name in ("head", "heads"):
                heads = [h for v in values for h in config_from_params(fixed, {param.name: v}).heads]
        for layer in layers:
            self.backend.check_layer_heads(layer, heads)
        self.backend.patch_grid(fixed.image_size)

    def _load_images(self) -> list[TuningImage]:
        """The tuning samples; corrupt images are skipped with a warning (an error with --strict)."""
        stream = iter_samples(self.dataset, self.tuning_split, self.tuning_ids, strict=self.options.strict)
        images = [TuningImage(sample, image_digest(sample.image)) for sample in stream]
        self.skipped = stream.skipped
        if not images:
            raise ValueError(f"none of the {len(self.tuning_ids)} tuning images could be read")
        self.tuning_ids = [im.sample.id for im in images]
        return images

    def _record_study_attrs(self) -> None:
        attrs = self.study.user_attrs
        if attrs.get("seed") is not None and attrs["seed"] != self.seed:
            raise ValueError(
                f"study {self.name!r} was created with seed {attrs['seed']}, not {self.seed}: "
                "drop --seed or use a new --study name"
            )
        fixed = self.spec.fixed
        record: dict[str, Any] = {
            "dataset": self.spec.dataset,
            "dataset_options": {k: str(v) for k, v in self.spec.dataset_options.items()},
            "tuning_split": self.tuning_split,
            "skipped_images": [f"{i}: {why}" for i, why in self.skipped],
            "tuning_ids": self.tuning_ids,
            "eval_split": self.eval_split,
            "seed": self.seed,
            "objective": self.spec.objective,
            "objective_labels": self.objective.labels,
            "candidate_rule": fixed.candidates,
            "labels_touched": sorted({self.objective.labels, "image-level" if fixed.uses_image_labels
                                      else "none", "pixel" if self.dataset.has_labels else "none"}),
            "package_version": segmenter.__version__,
            "models": {
                "backend": fixed.backend, "model": fixed.model,
                "revision": fixed.revision or getattr(self.backend.model.config, "_commit_hash", None),
                **{k: str(v) for k, v in self.spec.objective_options.items()},
            },
            "objective_options": dict(self.spec.objective_options),
            "objectives": [name for name, _ in self.spec.objectives] or [self.spec.objective],
            "objectives_options": {name: options for name, options in self.spec.objectives},
            "tie_break": self.spec.tie_break,
            "tie_break_options": dict(self.spec.tie_break_options),
            "spec": self.spec.source,
            "fixed": fixed.to_dict(),
        }
        for key, value in record.items():
            if key not in attrs:
                self.study.set_user_attr(key, value)

    # -- running -----------------------------------------------------------------------------------
    def finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED))

    def objective_fn(self, trial: optuna.Trial, on_image=None) -> float:
        self._check_not_surplus(trial)
        trial.set_user_attr("worker", WORKER)  # host:pid, to tell which worker ran (or died in) it
        config = self.spec.suggest(trial)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("config_hash", config_hash(config))
        trial.set_user_attr("labels_used", "image-level" if config.uses_image_labels else "none")
        multi = len(self.spec.objectives) > 1
        outcome = self.runner.evaluate(config, None if multi else trial, on_image=on_image)
        values = np.asarray(outcome.per_image)
        trial.set_user_attr("objective_per_image", [float(v) for v in outcome.per_image])
        trial.set_user_attr("objective_summary", {
            "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "images": int(values.size),
        })
        if outcome.metrics:  # evaluated with pixel labels; never seen by the sampler
            trial.set_user_attr("miou", outcome.metrics["miou"])
            trial.set_user_attr("pixel_accuracy", outcome.metrics["pixel_accuracy"])
            trial.set_user_attr("iou_per_class", outcome.metrics["iou_per_class"])
        if outcome.extra:
            trial.set_user_attr("extra_objectives_per_image", outcome.extra)
        if self.spec.tie_break and self.spec.tie_break in outcome.extra:
            trial.set_user_attr("tie_break_value", float(np.mean(outcome.extra[self.spec.tie_break])))
        elif self.spec.tie_break:  # the tie-break objective is the study's own
            trial.set_user_attr("tie_break_value", outcome.value)
        if multi:
            rest = [float(np.mean(outcome.extra[name])) for name, _ in self.spec.objectives[1:]]
            return (outcome.value, *rest)
        return outcome.value

    def run(self) -> optuna.Study:
        """Run until the study has `trials` finished trials; a finished study does nothing.

        Workers on one storage cooperate: none starts a trial that would take the study past
        `trials`, and while the last trials run elsewhere a worker waits, so that a killed
        worker's trial (failed by its stale heartbeat and retried) is still finished.
        """
        from .progress import StudyProgress

        if self.finished() >= self.trials:
            return self.study
        with StudyProgress(self, enabled=self.options.progress) as progress:
            while True:
                states = [t.state for t in self.study.get_trials(deepcopy=False)]
                finished = sum(s in FINISHED for s in states)
                if finished >= self.trials:
                    break
                active = sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states)
                if finished + active >= self.trials and TrialState.WAITING not in states:
                    optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: retry it
                    time.sleep(min(2.0, self.options.heartbeat / 2))
                    continue
                self.study.optimize(
                    lambda t: self.objective_fn(t, on_image=progress.image_done),
                    n_trials=1, callbacks=[progress.trial_done], catch=(SurplusTrial,),
                )
        return self.study

    def default_outcome(self):
        """The spec's fixed settings (the default config) on the tuning images, through the cache;
        None when they name a layer or head the model does not have."""
        attr = "default_outcome"
        try:  # a spec's fixed layer/heads may lie outside the model when the space covers them
            self.backend.check_layer_heads(self.spec.fixed.layer, self.spec.fixed.heads)
        except ValueError:
            return None
        if attr not in self.study.user_attrs:
            outcome = self.runner.evaluate(self.spec.fixed)
            self.study.set_user_attr(attr, {"value": outcome.value, "metrics": outcome.metrics,
                                            "per_image": [float(v) for v in outcome.per_image]})
        stored = self.study.user_attrs[attr]
        return SimpleNamespace(value=stored["value"], metrics=stored["metrics"])

    # -- the label-free confidence check ------------------------------------------------------------
    def check_images(self) -> tuple[list[TuningImage], bool]:
        """Check images (tuner.confidence): a seeded sample of the tuning split outside the tuning
        images, as many as those, recorded in the study; (images, optimistic)."""
        from .confidence import pick_check_ids

        ids = self.study.user_attrs.get("check_ids")
        if ids is None:
            tuning = self.study.user_attrs.get("tuning_ids") or self.tuning_ids
            ids = pick_check_ids(self.dataset.ids(self.tuning_split), tuning, self.seed)
            self.study.set_user_attr("check_ids", ids)
        if not ids:  # nothing beside the tuning images: check on them, and say it is optimistic
            return self.images, True
        stream = iter_samples(self.dataset, self.tuning_split, ids, strict=self.options.strict)
        images = [TuningImage(sample, image_digest(sample.image)) for sample in stream]
        return (images, False) if images else (self.images, True)

    def confidence(self, choice) -> dict:
        """The confidence check of `choice` (a tuner.selection.Choice), stored in the study."""
        from .confidence import check_choice

        stored = self.study.user_attrs.get("confidence_check")
        if stored and stored.get("trial") == choice.trial.number:
            return stored
        fixed = self.spec.fixed
        try:
            self.backend.check_layer_heads(fixed.layer, fixed.heads)
        except ValueError as err:
            record = {"trial": choice.trial.number, "reliably_better": None,
                      "unavailable": f"the default config is not valid here ({err})"}
        else:
            images, optimistic = self.check_images()
            runner = TrialRunner(self.dataset, images, self.provider, self.objective, self.runner.candidates,
                                 batch_size=self.batch_size)
            chosen = SegmenterConfig.from_dict(choice.trial.user_attrs["config"])
            record = check_choice(
                chosen, fixed, lambda config: runner.evaluate(config).per_image,
                check_ids=[im.sample.id for im in images], optimistic=optimistic,
                trial=choice.trial.number, same=config_hash(chosen) == config_hash(fixed),
            )
        self.study.set_user_attr("confidence_check", record)
        return record

    def _check_not_surplus(self, trial: optuna.Trial) -> None:
        """Fail a trial that racing workers started beyond `trials` (the lowest numbers win)."""
        live = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        before = [t for t in self.study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
        if len(before) >= self.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {self.trials} trials")


class SurplusTrial(Exception):
    """Raised in a trial that another worker's trial made unnecessary."""


def quiet_libraries() -> None:
    """Keep Optuna's and transformers' per-trial logging out of the progress display."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # older transformers
        pass
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", message=".*requires torchvision.*")
