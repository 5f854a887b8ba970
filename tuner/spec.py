"""`StudySpec`: a study described in YAML (studies/*.yaml): data, objective, search space, sampler."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import yaml

from segmenter import SegmenterConfig

PARAM_TYPES = ("int", "float", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("wilcoxon", "median", "none")
#: search-space names that are not SegmenterConfig fields themselves
ALIASES = {"head": "heads"}


class SpecError(ValueError):
    """A malformed study spec; the message names the file and the key."""


@dataclass(frozen=True)
class ParamSpec:
    """One search-space dimension, optionally conditional on values of earlier ones."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    condition: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high),
                                       step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class StudySpec:
    """A parsed study spec. `fixed` holds the SegmenterConfig every trial starts from."""

    source: str
    dataset: str
    fixed: SegmenterConfig
    search_space: tuple[ParamSpec, ...]
    objective: str = "clip_reward"
    objective_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    tuning_split: str = "auto"  # a split disjoint from eval_split (datasets.tuning_split)
    tuning_images: int = 32
    tuning_seed: int = 0
    eval_split: str = "val"
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "wilcoxon"})
    trials: int = 30
    name: str | None = None
    #: a multi-objective study (Optuna directions): (name, options) per objective, the first being
    #: `objective`/`objective_options`; empty for a single objective
    objectives: tuple[tuple[str, dict[str, Any]], ...] = ()
    #: objective that breaks ties between configs with equal values (tuner.selection); None: the
    #: mean per-image rank
    tie_break: str | None = None
    tie_break_options: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> StudySpec:
        return dataclasses.replace(self, **changes)

    @property
    def study_name(self) -> str:
        return self.name or f"{self.dataset}-{self.objective}"

    # -- trials ----------------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> SegmenterConfig:
        """Sample a config: the search space's values over the fixed settings."""
        values: dict[str, Any] = {}
        for param in self.search_space:
            if all(_current(self.fixed, values, k) in allowed for k, allowed in param.condition.items()):
                values[param.name] = param.suggest(trial)
        return config_from_params(self.fixed, values)

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        options = {k: v for k, v in self.sampler.items() if k != "type"}
        options["seed"] = seed if seed is not None else options.get("seed", 0)
        if self.sampler.get("type", "tpe") == "random":
            return optuna.samplers.RandomSampler(**options)
        return optuna.samplers.TPESampler(**options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        kind = self.pruner.get("type", "wilcoxon")
        options = {k: v for k, v in self.pruner.items() if k != "type"}
        if kind == "median":
            return optuna.pruners.MedianPruner(**options)
        if kind == "wilcoxon":
            return optuna.pruners.WilcoxonPruner(**options)
        return optuna.pruners.NopPruner()


def config_from_params(fixed: SegmenterConfig, values: dict[str, Any]) -> SegmenterConfig:
    """Trial parameters -> SegmenterConfig (`head: 9` means heads=(9,); `heads: "3,9"` a set)."""
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name == "head":
            changes["heads"] = (int(value),)
        elif name == "heads" and isinstance(value, str):
            changes["heads"] = tuple(int(h) for h in value.replace("+", ",").split(",") if h.strip())
        else:
            changes[name] = value
    return fixed.replace(**changes)


def _current(fixed: SegmenterConfig, values: dict[str, Any], name: str) -> Any:
    if name in values:
        return values[name]
    return getattr(fixed, ALIASES.get(name, name))


# --- reading specs -----------------------------------------------------------------------------
TOP_KEYS = {
    "name", "dataset", "dataset_options", "tuning", "eval_split", "objective", "objective_options",
    "fixed", "search_space", "sampler", "pruner", "trials", "objectives", "tie_break",
}


def builtin_spec_path(dataset: str) -> Path:
    """studies/<dataset>.yaml shipped with the package."""
    path = Path(str(resources.files("studies") / f"{dataset}.yaml"))
    if not path.is_file():
        shipped = sorted(p.stem for p in Path(path.parent).glob("*.yaml"))
        raise SpecError(
            f"no study spec ships for dataset {dataset!r} (shipped: {', '.join(shipped)}); "
            "write one and pass --study-file"
        )
    return path


def load_spec(path: str | Path) -> StudySpec:
    """Parse a study spec file; a malformed one raises SpecError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    return parse_spec(data, str(path))


def parse_spec(data: Any, source: str = "<spec>") -> StudySpec:
    def fail(key: str, message: str) -> SpecError:
        return SpecError(f"{source}: {key}: {message}")

    if not isinstance(data, dict):
        raise SpecError(f"{source}: a study spec must be a YAML mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(data.get("dataset"), str):
        raise fail("dataset", "missing: name the dataset, e.g. `dataset: coco`")
    try:
        fixed = SegmenterConfig.from_dict(dict(data.get("fixed") or {}))
    except (ValueError, TypeError) as err:
        raise fail("fixed", str(err)) from None

    tuning = data.get("tuning") or {}
    if not isinstance(tuning, dict) or set(tuning) - {"split", "images", "seed"}:
        raise fail("tuning", "expects a mapping with split, images, seed")
    for key, kind in (("images", int), ("seed", int), ("split", str)):
        if key in tuning and not isinstance(tuning[key], kind):
            raise fail(f"tuning.{key}", f"must be {kind.__name__}")
    if tuning.get("images", 1) < 1:
        raise fail("tuning.images", "must be at least 1")

    space = []
    raw_space = data.get("search_space") or {}
    if not isinstance(raw_space, dict):
        raise fail("search_space", "must map parameter names to distributions")
    names = {f.name for f in dataclasses.fields(SegmenterConfig)} | set(ALIASES)
    for name, raw in raw_space.items():
        key = f"search_space.{name}"
        if name not in names:
            raise fail(key, "is not a SegmenterConfig setting (or `head`)")
        if not isinstance(raw, dict) or raw.get("type") not in PARAM_TYPES:
            raise fail(f"{key}.type", f"must be one of {', '.join(PARAM_TYPES)}")
        extra = set(raw) - {"type", "low", "high", "step", "log", "choices", "condition"}
        if extra:
            raise fail(f"{key}.{sorted(extra)[0]}", "unknown key")
        if raw["type"] in ("int", "float"):
            for bound in ("low", "high"):
                if not isinstance(raw.get(bound), (int, float)) or isinstance(raw.get(bound), bool):
                    raise fail(f"{key}.{bound}", "missing or not a number")
            if raw["low"] > raw["high"]:
                raise fail(key, "low is above high")
        elif not isinstance(raw.get("choices"), list) or not raw["choices"]:
            raise fail(f"{key}.choices", "must be a non-empty list")
        condition = raw.get("condition") or {}
        if not isinstance(condition, dict):
            raise fail(f"{key}.condition", "must map an earlier parameter to a value or list")
        space.append(ParamSpec(
            name=name, type=raw["type"], low=raw.get("low"), high=raw.get("high"),
            step=raw.get("step"), log=bool(raw.get("log", False)),
            choices=tuple(raw.get("choices") or ()),
            condition={k: tuple(v) if isinstance(v, list) else (v,) for k, v in condition.items()},
        ))

    sampler = data.get("sampler") or {"type": "tpe"}
    if not isinstance(sampler, dict) or sampler.get("type", "tpe") not in SAMPLERS:
        raise fail("sampler.type", f"must be one of {', '.join(SAMPLERS)}")
    pruner = data.get("pruner") or {"type": "wilcoxon"}
    if not isinstance(pruner, dict) or pruner.get("type", "wilcoxon") not in PRUNERS:
        raise fail("pruner.type", f"must be one of {', '.join(PRUNERS)}")
    trials = data.get("trials", 30)
    if not isinstance(trials, int) or trials < 1:
        raise fail("trials", "must be a positive integer")
    for key in ("objective_options", "dataset_options"):
        if not isinstance(data.get(key) or {}, dict):
            raise fail(key, "must be a mapping")

    objectives = _parse_objectives(data, fail)
    tie_break, tie_break_options = _parse_tie_break(data.get("tie_break"), fail)
    if objectives and (pruner.get("type", "wilcoxon") != "none"):
        raise fail("pruner", "a study with several objectives cannot prune: set `pruner: {type: none}`")
    objective = objectives[0] if objectives else (str(data.get("objective", "clip_reward")),
                                                  dict(data.get("objective_options") or {}))
    spec = StudySpec(
        source=source, dataset=data["dataset"], fixed=fixed, search_space=tuple(space),
        objective=objective[0], objective_options=objective[1],
        objectives=tuple(objectives), tie_break=tie_break, tie_break_options=tie_break_options,
        dataset_options=dict(data.get("dataset_options") or {}),
        tuning_split=str(tuning.get("split", "auto")), tuning_images=int(tuning.get("images", 32)),
        tuning_seed=int(tuning.get("seed", 0)), eval_split=str(data.get("eval_split", "val")),
        sampler=dict(sampler), pruner=dict(pruner), trials=trials, name=data.get("name"),
    )
    # every value the space can take must make a valid config
    _check_space(spec, fail)
    return spec


def _parse_objectives(data: dict, fail) -> list[tuple[str, dict[str, Any]]]:
    """`objectives: {name: {options}, ...}` (or a list of names): two or more, no `objective` beside."""
    raw = data.get("objectives")
    if raw is None:
        return []
    if "objective" in data or "objective_options" in data:
        raise fail("objectives", "give either `objective` (+ `objective_options`) or `objectives`, not both")
    if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
        raw = {n: {} for n in raw}
    if not isinstance(raw, dict) or len(raw) < 2:
        raise fail("objectives", "must map two or more objective names to their options")
    out = []
    for name, options in raw.items():
        if not isinstance(options, dict | type(None)):
            raise fail(f"objectives.{name}", "must be a mapping of that objective's options")
        out.append((str(name), dict(options or {})))
    return out


def _parse_tie_break(raw: Any, fail) -> tuple[str | None, dict[str, Any]]:
    """`tie_break: NAME` or `tie_break: {name: NAME, options: {...}}`."""
    if raw is None:
        return None, {}
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, dict) and isinstance(raw.get("name"), str) and set(raw) <= {"name", "options"} \
            and isinstance(raw.get("options") or {}, dict):
        return raw["name"], dict(raw.get("options") or {})
    raise fail("tie_break", "must name an objective, or be {name: NAME, options: {...}}")


def _check_space(spec: StudySpec, fail) -> None:
    for param in spec.search_space:
        samples = list(param.choices) if param.type == "categorical" else [param.low, param.high]
        for value in samples:
            try:
                config_from_params(spec.fixed, {param.name: value})
            except (ValueError, TypeError) as err:
                raise fail(f"search_space.{param.name}", str(err)) from None
