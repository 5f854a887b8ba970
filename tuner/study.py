"""Running, resuming and reading Optuna studies of a StudySpec."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

import segmenter
from objectives import get_objective
from segmenter import SegmenterConfig
from segmenter.candidate_file import load_candidate_file
from segmenter.images import image_digest
from segmenter.methods import load_method

from .cache import MapCache
from .datasets import Dataset, disjoint_splits, iter_samples, load_dataset
from .spec import ParamSpec, StudySpec, config_from_params
from .trial import (
    CandidatePicker,
    MapProvider,
    TrialRunner,
    TuningImage,
    check_caption,
    finite_mean,
    ground_truth_candidates,
)

DEFAULT_STORAGE = "sqlite:///runs/tune.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def config_hash(config: SegmenterConfig) -> str:
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()[:12]


def open_storage(url: str, heartbeat: int = 30) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL: sqlite:///path, postgresql://..., or journal:PATH (a file).

    Every storage gets heartbeats: a trial whose worker stops beating for 3 x `heartbeat` seconds
    (a killed worker) is marked failed and retried once more with the same parameters. A database
    that another worker is creating at the same moment is opened again after a short back-off.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat, 3 * heartbeat, retry)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    delay = 0.05
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return HeartbeatRDBStorage(
                    url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=retry,
                )
        except Exception as err:  # bad URL, server down, missing driver; or a race on a fresh database
            if attempt + 1 < OPEN_ATTEMPTS and _creation_race(err):
                time.sleep(delay * (1.0 + random.random()))
                delay = min(2.0 * delay, 2.0)
                continue
            raise ValueError(f"cannot open storage {url!r}: {str(err).splitlines()[0]}") from None
    raise AssertionError("unreachable")


OPEN_ATTEMPTS = 12  # about 10-20 s of back-off in all
#: what SQLite and PostgreSQL say when two workers create the same tables at once
_RACE_MESSAGES = ("already exists", "unique constraint", "duplicate key", "database is locked",
                  "alembic_version")


def _creation_race(err: BaseException) -> bool:
    text = str(err).lower()
    return any(m in text for m in _RACE_MESSAGES)


class HeartbeatRDBStorage(optuna.storages.RDBStorage):
    """Optuna's database storage, whose stale trials also include a RUNNING trial that never sent a
    heartbeat (its worker was killed between starting the trial and its first beat) once it started
    longer ago than the grace period; Optuna's own check skips such a trial, and a rerun would wait
    on it forever."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from datetime import datetime

        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import orm

        stale = list(super()._get_stale_trial_ids(study_id))
        grace = self.grace_period if self.grace_period is not None else 2 * (self.heartbeat_interval or 0)
        now = datetime.now()  # Optuna writes datetime_start in the worker's local time
        with _create_scoped_session(self.scoped_session, True) as session:
            running = (session.query(models.TrialModel)
                       .options(orm.selectinload(models.TrialModel.heartbeats))
                       .filter(models.TrialModel.state == TrialState.RUNNING)
                       .filter(models.TrialModel.study_id == study_id).all())
            for trial in running:
                start = trial.datetime_start
                if not trial.heartbeats and start is not None and (now - start).total_seconds() > grace:
                    stale.append(trial.trial_id)
        return stale


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats (Optuna 5 has them for databases only).

    A running trial's worker writes the time (seconds since the epoch) into the trial's system
    attribute `ovss:heartbeat` every `interval` seconds; a RUNNING trial whose last beat (or start)
    is older than `grace` seconds is stale. Workers on several hosts need clocks that agree.
    """

    KEY = "ovss:heartbeat"

    def __init__(self, backend, interval: int, grace: int, callback=None) -> None:
        super().__init__(backend)
        self._interval, self._grace, self._callback = interval, grace, callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, self.KEY, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if now - last_heartbeat(trial, now) > self._grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self):
        return self._callback


def last_heartbeat(trial: FrozenTrial, default: float) -> float:
    """Seconds since the epoch of a journal trial's last beat or start (a retried trial carries
    the beats of the trial it retries, so its own start counts too)."""
    start = trial.datetime_start.timestamp() if trial.datetime_start else default
    return max(float(trial.system_attrs.get(HeartbeatJournalStorage.KEY, start)), start)


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


# --- sampling: seeds per trial, repeats ----------------------------------------------------------------
def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` of a study seeded with `seed` (32 bits)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler made afresh for every trial, seeded from (study seed, trial number).

    What a trial draws depends only on the study seed, its number and the trials before it, never
    on which process draws it: a study run as 3 + 3 trials draws what one run of 6 draws, and
    workers sharing a storage (whose trial numbers differ) draw different configs. After a trial
    that repeated an evaluated config, the next is drawn uniformly at random (RandomSampler), so a
    sampler that has converged does not spend the study on repeats; in a finite search space that
    draw is one of the configs not evaluated yet (`unevaluated(study)` lists their parameters).
    """

    def __init__(
        self, make_sampler: Callable[[int], optuna.samplers.BaseSampler], seed: int,
        unevaluated: Callable[[optuna.Study], list[dict[str, Any]]] | None = None,
    ) -> None:
        self._make, self._seed, self._unevaluated = make_sampler, seed, unevaluated
        self._inner = make_sampler(seed)
        self._planned: dict[str, Any] = {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = trial_seed(self._seed, trial.number)
        self._planned = {}
        if _follows_repeat(study, trial.number):
            self._inner = optuna.samplers.RandomSampler(seed=seed)
            left = self._unevaluated(study) if self._unevaluated is not None else []
            if left:
                self._planned = left[random.Random(seed).randrange(len(left))]
        else:
            self._inner = self._make(seed)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if self._planned:
            return {}
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name in self._planned:
            return self._planned[param_name]
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def _follows_repeat(study: optuna.Study, number: int) -> bool:
    before = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.number < number]
    return bool(before) and "repeat_of" in max(before, key=lambda t: t.number).user_attrs


def is_repeat(trial: FrozenTrial) -> bool:
    """A trial that drew a config the study had already evaluated (it carries that trial's value)."""
    return "repeat_of" in trial.user_attrs


def distinct_trials(study: optuna.Study, states=FINISHED) -> list[FrozenTrial]:
    """The study's trials in `states` without repeats: one per evaluated config."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not is_repeat(t)]


ENUMERATE_LIMIT = 20_000  # grid points; a larger search space counts as unbounded


def enumerate_space(spec: StudySpec, limit: int = ENUMERATE_LIMIT) -> dict[SegmenterConfig, dict] | None:
    """Every distinct config of a finite search space (conditions and aliases applied), each with
    the parameters of its first grid point; None when a dimension is continuous or the grid has
    more than `limit` points."""
    grids = [_grid(param) for param in spec.search_space]
    if any(g is None for g in grids) or math.prod(len(g) for g in grids) > limit:
        return None
    configs: dict[SegmenterConfig, dict] = {}

    def walk(i: int, values: dict[str, Any]) -> None:
        if i == len(grids):
            configs.setdefault(config_from_params(spec.fixed, values), values)
            return
        param = spec.search_space[i]
        active = all((values[k] if k in values else getattr(spec.fixed, "heads" if k == "head" else k))
                     in allowed for k, allowed in param.condition.items())
        if not active:
            walk(i + 1, values)
            return
        for value in grids[i]:
            walk(i + 1, {**values, param.name: value})

    walk(0, {})
    return configs


def _grid(param: ParamSpec) -> list[Any] | None:
    """Every value a dimension can take, as Optuna draws them; None for a continuous one."""
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        dist = optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log,
                                                    step=int(param.step or 1))
        return list(range(dist.low, dist.high + 1, dist.step))
    if not param.step:
        return None
    dist = optuna.distributions.FloatDistribution(float(param.low), float(param.high), step=param.step)
    count = int(round((dist.high - dist.low) / dist.step)) + 1
    return [float(min(k * dist.step + dist.low, dist.high)) for k in range(count)]


# --- what defines a study ----------------------------------------------------------------------------
def study_definition(spec: StudySpec) -> dict[str, Any]:
    """What a study's objective values depend on: trials made under another definition are not
    comparable. The data root is left out (workers may keep the data in different places)."""
    fixed = spec.fixed.to_dict()
    fixed.pop("candidates_file", None)  # where the class-list file lies is left out; its content is in
    lists = candidate_file_of(spec)
    raw = {
        "objective": spec.objective,
        "objective_options": spec.objective_options,
        "dataset": spec.dataset,
        "dataset_options": {k: v for k, v in spec.dataset_options.items() if k != "root"},
        "fixed": fixed,
        "candidates_file_sha256": None if lists is None else lists.sha256,
        "search_space": [dataclasses.asdict(p) for p in spec.search_space],
        "objectives": [list(o) for o in spec.objectives],  # a multi-objective study's objectives
        "tie_break": [spec.tie_break, spec.tie_break_options],
    }
    if spec.protocol != "standard":  # absent from the definitions of studies made before protocols
        raw["protocol"] = spec.protocol
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def candidate_file_of(spec: StudySpec):
    """The `candidates_file` (a segmenter.candidate_file.CandidateFile, read and checked) when some
    config of the study can use the `file` candidate rule; else None."""
    uses = spec.fixed.candidates == "file" or any(
        p.name == "candidates" and "file" in p.choices for p in spec.search_space)
    return load_candidate_file(spec.fixed.candidates_file) if uses else None


def definition_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting in which two definitions differ, as `key (was A, now B)`; None if equal.

    A setting that only one side has inside `fixed` or a search-space entry (a field a newer
    version added with its default) is no difference; in the options it is one.
    """
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if key == "fixed" and isinstance(old, dict) and isinstance(new, dict):
            found = _first_difference(old, new, key)
        elif (key == "search_space" and isinstance(old, list) and isinstance(new, list)
              and len(old) == len(new) and all(isinstance(p, dict) for p in old + new)):
            found = next((d for i, (a, b) in enumerate(zip(old, new))
                          if (d := _first_difference(a, b, f"{key}.{a.get('name', i)}"))), None)
        elif isinstance(old, dict) and isinstance(new, dict):
            found = _first_difference({k: old.get(k) for k in set(old) | set(new)},
                                      {k: new.get(k) for k in set(old) | set(new)}, key)
        else:
            found = None if old == new else f"{key} (was {_short(old)}, now {_short(new)})"
        if found:
            return found
    return None


def _first_difference(old: dict[str, Any], new: dict[str, Any], path: str) -> str | None:
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            return f"{path}.{key} (was {_short(old[key])}, now {_short(new[key])})"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


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


def check_objectives_for_method(spec: StudySpec) -> None:
    """A one-line ValueError, before any model loads, when a method without an ITM model (a CLIP
    method) is to be scored by an objective that reads the segmenter's model (itm_match,
    patch_coherence)."""
    from objectives._base import objective_class

    if spec.fixed.method == "pnp_ovss":
        return
    names = [spec.objective, *(name for name, _ in spec.objectives), spec.tie_break]
    for name in dict.fromkeys(filter(None, names)):
        if "segmenter" in getattr(objective_class(name), "models", ()):
            raise ValueError(f"objective {name} reads the segmenter's ITM model, which method "
                             f"{spec.fixed.method} has not: use an objective on CLIP (clip_margin, ...)")


class StudyRunner:
    """Everything one `tune run` needs, built once: dataset, models, tuning images, runner."""

    def __init__(self, spec: StudySpec, options: RunOptions) -> None:
        self.spec, self.options = spec, options
        self.seed = options.seed if options.seed is not None else spec.tuning_seed
        self.trials = options.trials or spec.trials
        self.name = options.study_name or spec.study_name
        self.space = enumerate_space(spec)  # None: continuous or too large to list
        self.space_size = None if self.space is None else len(self.space)
        self.exhausted: str | None = None  # why the study ended before `trials` distinct configs
        self.storage = open_storage(options.storage, options.heartbeat)
        self.study = self._create_study()
        self._check_definition()

        dataset_options = dict(spec.dataset_options)
        if options.data_root:
            dataset_options["root"] = options.data_root
        self.dataset = load_dataset(spec.dataset, **dataset_options)
        self.paper = spec.protocol == "paper"  # captions list the vocabulary; candidates: image labels
        if self.paper and not self.dataset.has_labels:
            raise ValueError(f"protocol paper takes each image's ground-truth classes as its candidates, and "
                             f"dataset {spec.dataset!r} has no labels: use `protocol: standard`")
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
        self.candidate_file = candidate_file_of(spec)
        if self.candidate_file is not None:  # before any model loads
            self._check_candidate_file()
        check_objectives_for_method(spec)
        self.method = load_method(spec.fixed, device=options.device)
        self.backend = self.method.backend  # the ITM model of pnp_ovss; None for the CLIP methods
        self._check_space_against_model()
        self.objective = get_objective(spec.objective, device=str(self.method.device),
                                       dtype=spec.fixed.dtype, backend=self.backend, **spec.objective_options)
        self.extra_objectives = self._extra_objectives()
        #: the labels the study's objectives read (a part of a combination, another objective of a
        #: multi-objective study or the tie-break may read pixel labels: then it is not label-free)
        self.objective_labels = max((o.labels for o in (self.objective, *self.extra_objectives.values())),
                                    key=("none", "image-level", "pixel").index)
        self.cache = MapCache(options.cache_dir)
        self.batch_size = self.method.batch_size(options.batch_size, spec.fixed)
        self.provider = MapProvider(self.method, self.cache, self.batch_size)
        if self.paper:
            check_caption(self.backend, spec.fixed, self.dataset.vocabulary)
        self.images = self._load_images()
        self.runner = TrialRunner(
            self.dataset, self.images, self.provider, self.objective,
            ground_truth_candidates(self.dataset.vocabulary) if self.paper else
            CandidatePicker(self.dataset.vocabulary, self.backend, getattr(self.objective, "clip", None),
                            self.dataset.vocabulary_synonyms, device=self.method.device),
            batch_size=self.batch_size, pool=self._make_pool(options.workers),
            report="instance" if spec.pruner.get("type", "wilcoxon") == "wilcoxon" else "mean",
            extra=self.extra_objectives, caption=self.dataset.vocabulary if self.paper else None,
        )
        self._record_study_attrs()

    # -- setup -------------------------------------------------------------------------------------
    def _create_study(self) -> optuna.Study:
        directions = ["maximize"] * max(len(self.spec.objectives), 1)
        return optuna.create_study(
            storage=self.storage, study_name=self.name, load_if_exists=True,
            directions=directions, pruner=self.spec.make_pruner(),
            sampler=TrialSeededSampler(self.spec.make_sampler, self.seed, self._unevaluated),
        )

    def _unevaluated(self, study: optuna.Study) -> list[dict[str, Any]]:
        """Parameters of the configs of a finite search space that no trial has run or runs."""
        if self.space is None:
            return []
        taken = {SegmenterConfig.from_dict(t.user_attrs["config"])
                 for t in distinct_trials(study, (*FINISHED, TrialState.RUNNING)) if "config" in t.user_attrs}
        return [params for config, params in self.space.items() if config not in taken]

    def _check_definition(self) -> None:
        """Refuse to add trials made under another objective, spec, dataset or model."""
        attrs = self.study.user_attrs
        current = study_definition(self.spec)
        recorded = attrs.get("definition")
        if recorded is None and "objective" in attrs:  # a study made before definitions were kept
            recorded = {"objective": attrs["objective"]}
            current = {"objective": current["objective"]}
        change = None if recorded is None else definition_mismatch(recorded, current)
        self.redefined = change is not None and not self.study.get_trials(deepcopy=False)
        if change is not None and not self.redefined:
            raise ValueError(f"study {self.name!r} was made with another {change}: its trials would "
                             "not be comparable; use a new --study name")
        if "definition" not in attrs or self.redefined:  # a study without trials takes the new one
            self.study.set_user_attr("definition", study_definition(self.spec))

    def _check_candidate_file(self) -> None:
        """Every image the run segments (tuning images, confidence-check images) has a list in the
        `candidates_file` whose names are classes of the dataset."""
        from .confidence import pick_check_ids

        check = self.study.user_attrs.get("check_ids")
        if check is None:
            check = pick_check_ids(self.dataset.ids(self.tuning_split), self.tuning_ids, self.seed)
        self.candidate_file.check(
            [*self.tuning_ids, *check], self.dataset.vocabulary, self.dataset.vocabulary_synonyms,
            what=f"images of {self.tuning_split} this run segments ({len(self.tuning_ids)} tuning, "
                 f"{len(check)} for the confidence check)")

    def _extra_objectives(self) -> dict:
        """The other objectives of a multi-objective study, and the tie-break objective, by name."""
        device, out = str(self.method.device), {}
        clip = getattr(self.objective, "clip", None)
        named = list(self.spec.objectives[1:])
        if self.spec.tie_break:
            named.append((self.spec.tie_break, self.spec.tie_break_options))
        for name, options in named:
            if name in out or (name == self.spec.objective and options == self.spec.objective_options):
                continue
            options = dict(options)
            if clip is not None and name.startswith("clip_") and \
                    options.get("clip_model", clip.model_id) == clip.model_id:  # one CLIP in memory
                options.pop("clip_model", None)
                options["clip"] = clip
            out[name] = get_objective(name, device=device, backend=self.backend, dtype=self.spec.fixed.dtype,
                                      **options)
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

        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def close(self) -> None:
        """Stop the post-processing worker processes."""
        if self.runner.pool is not None:
            self.runner.pool.shutdown(cancel_futures=True)

    def _check_space_against_model(self) -> None:
        """Every layer and head the search space can pick must exist in the model (fail early);
        for another method, every value of the space must suit its model (e.g. windows on its
        patch grid)."""
        fixed, layers, heads = self.spec.fixed, [self.spec.fixed.layer], list(self.spec.fixed.heads)
        if self.backend is None:
            self.method.check(fixed)
            for param in self.spec.search_space:
                values = list(param.choices) if param.type == "categorical" else [param.low, param.high]
                for value in values:
                    self.method.check(config_from_params(fixed, {param.name: value}))
            return
        for param in self.spec.search_space:
            values = list(param.choices) if param.type == "categorical" else [param.low, param.high]
            if param.name == "layer":
                layers = [int(v) for v in values]
            elif param.name in ("head", "heads"):
                heads = [h for v in values for h in config_from_params(fixed, {param.name: v}).heads]
        for layer in layers:
            self.backend.check_layer_heads(layer, heads)
            if layer == self.backend.num_layers:
                raise ValueError(
                    f"layer {layer} is the last text layer of {self.spec.fixed.model}: its maps are always "
                    "zero (the ITM score reads only [CLS] after it), so every config with it segments "
                    f"nothing; search layers 1..{layer - 1}")
        self.backend.patch_grid(fixed.image_size)

    def _load_images(self) -> list[TuningImage]:
        """The tuning samples; corrupt images are skipped with a warning (an error with --strict)."""
        stream = iter_samples(self.dataset, self.tuning_split, self.tuning_ids, strict=self.options.strict)
        images = [TuningImage(sample, image_digest(sample.image)) for sample in stream]
        self.skipped = stream.skipped
        if self.paper:  # the authors' search reads images with labels only: one without a class has no map
            self.skipped += [(im.sample.id, "no ground-truth class (protocol paper)") for im in images
                             if not self._ground_truth(im)]
            images = [im for im in images if self._ground_truth(im)]
        if not images:
            raise ValueError(f"none of the {len(self.tuning_ids)} tuning images could be read")
        self.tuning_ids = [im.sample.id for im in images]
        return images

    def _ground_truth(self, image: TuningImage) -> tuple[str, ...]:
        """The image's candidates under protocol paper (its ground-truth classes)."""
        return ground_truth_candidates(self.dataset.vocabulary)(self.spec.fixed, image)

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
            "objective_labels": self.objective_labels,
            "candidate_rule": fixed.candidates,
            # what the study read beside the dataset: not labels, recorded by content
            "external_sources": [self.candidate_file.source()] if self.candidate_file is not None else [],
            "protocol": self.spec.protocol,
            "labels_touched": sorted({self.objective_labels, "image-level" if self._reads_image_labels(fixed)
                                      else "none", "pixel" if self.dataset.has_labels else "none"}),
            "package_version": segmenter.__version__,
            "models": {
                **({"backend": fixed.backend, "model": fixed.model,
                    "revision": fixed.revision or getattr(self.backend.model.config, "_commit_hash", None)}
                   if self.backend is not None else {"method": fixed.method, "clip_model": fixed.clip_model}),
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
            if key not in attrs or getattr(self, "redefined", False):
                self.study.set_user_attr(key, value)

    def _reads_image_labels(self, config: SegmenterConfig) -> bool:
        """True when a trial of `config` reads image-level labels: its candidate rule (`oracle`), or the
        search protocol paper, whose candidates are each image's ground-truth classes."""
        return self.paper or config.uses_image_labels

    # -- running -----------------------------------------------------------------------------------
    def finished(self) -> int:
        """Distinct configs the study has finished (complete or pruned); repeats are not counted."""
        return len(distinct_trials(self.study))

    def objective_fn(self, trial: optuna.Trial, on_image=None) -> float:
        self._raise_pending()
        self._check_not_surplus(trial)
        trial.set_user_attr("worker", WORKER)  # host:pid, to tell which worker ran (or died in) it
        config = self.spec.suggest(trial)
        digest = config_hash(config)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("config_hash", digest)
        earlier = self._evaluated(digest, trial.number)
        if earlier is not None:  # not evaluated again: the sampler is told the earlier result
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == TrialState.PRUNED:
                for step, value in earlier.intermediate_values.items():
                    trial.report(value, step)
                raise optuna.TrialPruned(f"repeats trial {earlier.number}, which was pruned")
            return tuple(earlier.values) if len(earlier.values) > 1 else float(earlier.value)
        trial.set_user_attr("labels_used", "image-level" if self._reads_image_labels(config) else "none")
        multi = len(self.spec.objectives) > 1
        with self._interruptible():
            outcome = self.runner.evaluate(config, None if multi else trial, on_image=on_image)
        values = np.asarray(outcome.per_image, dtype=np.float64)
        defined = values[np.isfinite(values)]
        trial.set_user_attr("objective_per_image", [float(v) for v in outcome.per_image])
        trial.set_user_attr("undefined_images", int(values.size - defined.size))
        if defined.size == 0:
            reason = (f"objective {self.spec.objective} is undefined (NaN) on all {values.size} tuning "
                      "images of the trial (miou_supervised: images without labelled pixels)")
            trial.set_user_attr("fail_reason", reason)
            raise UndefinedObjective(reason)
        trial.set_user_attr("objective_summary", {
            "mean": float(defined.mean()), "std": float(defined.std()), "min": float(defined.min()),
            "max": float(defined.max()), "images": int(defined.size),
            "undefined": int(values.size - defined.size),
        })
        if outcome.metrics:  # evaluated with pixel labels; never seen by the sampler
            trial.set_user_attr("miou", outcome.metrics["miou"])
            trial.set_user_attr("pixel_accuracy", outcome.metrics["pixel_accuracy"])
            trial.set_user_attr("iou_per_class", outcome.metrics["iou_per_class"])
        if outcome.extra:
            trial.set_user_attr("extra_objectives_per_image", outcome.extra)
        extra_means = {name: finite_mean(values) for name, values in outcome.extra.items()}
        undefined = [name for name, mean in extra_means.items() if not np.isfinite(mean)]
        if undefined:  # undefined on every image, like the study's own objective above
            reason = (f"objective {undefined[0]} is undefined (NaN) on all {values.size} tuning images of "
                      "the trial (miou_supervised: images without labelled pixels)")
            trial.set_user_attr("fail_reason", reason)
            raise UndefinedObjective(reason)
        if self.spec.tie_break and self.spec.tie_break in outcome.extra:
            trial.set_user_attr("tie_break_value", extra_means[self.spec.tie_break])
        elif self.spec.tie_break:  # the tie-break objective is the study's own
            trial.set_user_attr("tie_break_value", outcome.value)
        # another worker may have finished the same config meanwhile: the earlier one counts
        earlier = self._evaluated(digest, trial.number)
        if earlier is not None:
            trial.set_user_attr("repeat_of", earlier.number)
        if multi:
            rest = [extra_means[name] for name, _ in self.spec.objectives[1:]]
            return (outcome.value, *rest)
        return outcome.value

    def _evaluated(self, digest: str, number: int) -> FrozenTrial | None:
        """The first finished, non-repeat trial (other than `number`) that evaluated this config."""
        same = [t for t in distinct_trials(self.study)
                if t.number != number and t.user_attrs.get("config_hash") == digest]
        return min(same, key=lambda t: t.number) if same else None

    def run(self) -> optuna.Study:
        """Run until the study has `trials` distinct finished configs; a finished study does nothing.

        Workers on one storage cooperate: none starts a trial that would take the study past
        `trials`, and while the last trials run elsewhere a worker waits, so that a killed
        worker's trial (failed by its stale heartbeat and retried) is still finished. The run ends
        early, with `exhausted` saying why, when a finite search space has no config left or the
        sampler keeps drawing evaluated configs; it stops with a ValueError when trials keep
        failing (the objective is undefined).
        """
        from .progress import StudyProgress

        if self._exhausted() or self.finished() >= self.trials:
            return self.study
        failures: list[str] = []
        repeats = 0
        with StudyProgress(self, enabled=self.options.progress) as progress, self._signals():
            while True:
                self._raise_pending()
                trials = self.study.get_trials(deepcopy=False)
                states = [t.state for t in trials]
                finished = sum(t.state in FINISHED and not is_repeat(t) for t in trials)
                if finished >= self.trials or self._exhausted():
                    break
                active = sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states)
                if finished + active >= self.trials and TrialState.WAITING not in states:
                    optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: retry it
                    progress.waiting(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                    with self._interruptible():
                        time.sleep(min(2.0, self.options.heartbeat / 2))
                    continue
                self.study.optimize(
                    lambda t: self.objective_fn(t, on_image=progress.image_done),
                    n_trials=1, callbacks=[progress.trial_done], catch=(SurplusTrial, UndefinedObjective),
                )
                last = self._own_last_trial()
                if last is None:
                    continue
                reason = last.user_attrs.get("fail_reason")
                if reason is None and last.state == TrialState.FAIL and not last.user_attrs.get("surplus"):
                    reason = f"trial {last.number} failed (see `tune show --study {self.name}`)"
                if reason or not is_repeat(last):  # a repeat evaluates nothing: it neither fails nor succeeds
                    failures = failures + [reason] if reason else []
                if len(failures) >= MAX_FAILURES:
                    raise ValueError(f"{len(failures)} trials in a row failed, the study stops: "
                                     f"{failures[-1]}")
                repeats = repeats + 1 if is_repeat(last) else 0
                if repeats >= MAX_REPEATS:
                    self.exhausted = (f"the sampler drew {repeats} already evaluated configs in a row: "
                                      "the search space looks exhausted")
                    break
        return self.study

    # -- Ctrl-C and SIGTERM ------------------------------------------------------------------------
    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM while trials run: raised at once inside a trial's evaluation or a wait
        (Optuna then fails the trial), else held until the storage write under way has finished,
        so that no trial is left RUNNING. A second signal is raised at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pending: BaseException | None = None
        self._interrupt_now = False

        def handler(signum, frame):
            error = Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()
            if self._interrupt_now or self._pending is not None:
                raise error
            self._pending = error

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        self._raise_pending()  # a signal held during the last trial's storage writes still stops the run

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        self._raise_pending()
        self._interrupt_now = True
        try:
            yield
        finally:
            self._interrupt_now = False
        self._raise_pending()

    def _raise_pending(self) -> None:
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            raise pending

    def _exhausted(self) -> bool:
        """True (and `exhausted` set) when a finite search space has no config left to evaluate."""
        size = self.space_size
        if size is not None and size < self.trials and self.finished() >= size:
            self.exhausted = f"the search space holds {size} distinct configs and all are evaluated"
            return True
        return False

    def _own_last_trial(self) -> FrozenTrial | None:
        own = [t for t in self.study.get_trials(deepcopy=False)
               if t.user_attrs.get("worker") == WORKER and t.state.is_finished()]
        return max(own, key=lambda t: t.number) if own else None

    def default_outcome(self):
        """The spec's fixed settings (the default config) on the tuning images, through the cache;
        None when they name a layer or head the model does not have."""
        attr = "default_outcome"
        try:  # a spec's fixed layer/heads may lie outside the model when the space covers them
            self.method.check(self.spec.fixed)
        except ValueError:
            return None
        if attr not in self.study.user_attrs:
            outcome = self.runner.evaluate(self.spec.fixed)
            self.study.set_user_attr(attr, {"value": outcome.value, "metrics": outcome.metrics})
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
        if self.paper:
            images = [im for im in images if self._ground_truth(im)]
        return (images, False) if images else (self.images, True)

    def confidence(self, choice) -> dict:
        """The confidence check of `choice` (a tuner.selection.Choice), stored in the study."""
        from .confidence import study_check

        def prepare():
            images, optimistic = self.check_images()
            runner = TrialRunner(self.dataset, images, self.provider, self.objective, self.runner.candidates,
                                 batch_size=self.batch_size, pool=self.runner.pool)
            return (lambda config: runner.evaluate(config).per_image,
                    [im.sample.id for im in images], optimistic)

        return study_check(self.study, choice, self.spec.fixed, self.method, prepare)

    def _check_not_surplus(self, trial: optuna.Trial) -> None:
        """Fail a trial that racing workers started beyond `trials` (the lowest numbers win)."""
        live = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        before = [t for t in distinct_trials(self.study, live) if t.number < trial.number]
        if len(before) >= self.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {self.trials} trials")


class SurplusTrial(Exception):
    """Raised in a trial that another worker's trial made unnecessary."""


class UndefinedObjective(Exception):
    """Raised in a trial whose objective is undefined on every tuning image (the trial fails)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`): handled like Ctrl-C, so the running trial ends cleanly."""


MAX_FAILURES = 5  # trials of one worker failing in a row stop it with the reason
MAX_REPEATS = 100  # drawn configs in a row that the study has already evaluated end it


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread, as Ctrl-C raises
    KeyboardInterrupt: Optuna marks the running trial failed and the storage stays consistent."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(parent: int) -> None:
    """Initializer of the post-processing processes: end when the `tune run` that started them
    ends, however it ends (kill -9 included). Linux: the kernel's parent-death signal; elsewhere a
    thread that watches the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def quiet_libraries() -> None:
    """Keep Optuna's and transformers' per-trial logging out of the progress display."""
    # ERROR: a failed trial (Ctrl-C, SIGTERM, an error the CLI reports in one line) would otherwise
    # print a traceback through Optuna's logger
    optuna.logging.set_verbosity(optuna.logging.ERROR)
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
