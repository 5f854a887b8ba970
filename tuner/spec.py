"""`StudySpec`: a study described in YAML (studies/*.yaml): data, objective, search space, sampler."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna

from segmenter import SegmenterConfig
from segmenter.config import unread_fields
from segmenter.yaml_input import read_yaml_file

PARAM_TYPES = ("int", "float", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("wilcoxon", "median", "none")
#: search-space names that are not SegmenterConfig fields themselves
ALIASES = {"head": "heads"}
#: post-processing cap (pixels, longer side) a study applies unless its `fixed` settings name
#: `postprocess_max_side` (null there: full resolution); benchmark images are smaller than this
TUNING_POSTPROCESS_MAX_SIDE = 1024
#: options the tuner passes itself, which a spec may not set
#: options the tuner passes itself (the loaded models, the device): a spec may not set them
RESERVED_OPTIONS = {"objective": {"device", "clip", "backend", "dtype"}, "dataset": set()}
#: search protocols (`protocol:`): "standard" prompts each tuning image with its candidates (the
#: config's rule); "paper" is the authors' search: every caption lists the whole vocabulary, and
#: each image's ground-truth classes (image-level labels) are the classes cut out, segmented and
#: scored (CLIP's softmax over them)
PROTOCOLS = ("standard", "paper")


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
                                     step=1 if self.step is None else int(self.step), log=self.log)
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
    protocol: str = "standard"  # PROTOCOLS

    def __post_init__(self) -> None:
        if self.objectives and self.objectives[0] != (self.objective, self.objective_options):
            # `objective`/`objective_options` are the first objective's one source of truth: an
            # override (`--objective`, `--clip-model`) that replaces them replaces it in the list too
            object.__setattr__(self, "objectives",
                               ((self.objective, self.objective_options), *self.objectives[1:]))
        check_component_options(self)

    def replace(self, **changes: Any) -> StudySpec:
        """A copy with some fields changed; the objective's and dataset's options are checked
        again (SpecError), so an override cannot pair an objective with options it lacks."""
        return dataclasses.replace(self, **changes)

    @property
    def study_name(self) -> str:
        """The spec's `name` ("{objective}" in it becomes the objective's name), else DATASET-OBJECTIVE
        (DATASET-METHOD-OBJECTIVE for a method other than pnp_ovss, DATASET-BACKEND-OBJECTIVE for
        pnp_ovss on a backend other than blip)."""
        if self.name:
            return str(self.name).replace("{objective}", self.objective)
        if self.fixed.method != "pnp_ovss":
            return f"{self.dataset}-{self.fixed.method}-{self.objective}"
        backend = "" if self.fixed.backend == "blip" else f"{self.fixed.backend}-"
        return f"{self.dataset}-{backend}{self.objective}"

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
        return SAMPLER_CLASSES[self.sampler.get("type", "tpe")](**options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        options = {k: v for k, v in self.pruner.items() if k != "type"}
        return PRUNER_CLASSES[self.pruner.get("type", "wilcoxon")](**options)


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
    "fixed", "search_space", "sampler", "pruner", "trials", "objectives", "tie_break", "preset",
    "protocol",
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


def load_spec(path: str | Path, preset: str | None = None) -> StudySpec:
    """Parse a study spec file; a malformed one raises SpecError naming the file and the key.

    `preset` (e.g. "official", from `tune run --preset`) replaces the spec's own: the fixed
    settings start from it, those the spec writes out applied on top."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"study file not found: {path}")
    try:
        data = read_yaml_file(path)
    except ValueError as err:  # invalid or oversized YAML (segmenter.yaml_input)
        raise SpecError(str(err)) from None
    fixed = data.get("fixed") if isinstance(data, dict) else None
    if isinstance(fixed, dict) and "candidates_file" in fixed:  # relative to the spec's folder
        from segmenter.candidate_file import resolve_candidates_file

        where = resolve_candidates_file(fixed["candidates_file"], path.parent)
        data = {**data, "fixed": {**fixed, "candidates_file": where}}
    if preset is not None and isinstance(data, dict):
        data = {**data, "preset": preset}
    return parse_spec(data, str(path))


def parse_spec(data: Any, source: str = "<spec>") -> StudySpec:
    """A StudySpec from parsed YAML; every malformed value is a SpecError naming `source` and
    the key (one line)."""
    def fail(key: str, message: str) -> SpecError:
        return SpecError(f"{source}: {key}: {message}")

    if not isinstance(data, dict):
        raise SpecError(f"{source}: a study spec must be a YAML mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise fail(sorted(unknown, key=str)[0], f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(data.get("dataset"), str) or not data["dataset"]:
        raise fail("dataset", "missing: name the dataset, e.g. `dataset: coco`")
    for key in ("objective", "eval_split", "name"):
        if key in data and not (isinstance(data[key], str) and data[key]):
            raise fail(key, "must be a non-empty string")
    fixed_data = data.get("fixed") or {}
    if not isinstance(fixed_data, dict):
        raise fail("fixed", "must map SegmenterConfig settings to values")
    fixed_data = {"postprocess_max_side": TUNING_POSTPROCESS_MAX_SIDE, **fixed_data}
    if "preset" in data:  # the top-level `preset:` is the fixed settings' starting point
        from segmenter.config import preset_names

        if not isinstance(data["preset"], str) or data["preset"] not in preset_names():
            raise fail("preset", f"unknown preset {data['preset']!r}: use one of {', '.join(preset_names())}")
        fixed_data["preset"] = data["preset"]
    try:
        fixed = SegmenterConfig.from_dict(fixed_data, dataset=data["dataset"])
    except (ValueError, TypeError) as err:
        raise fail("fixed", str(err)) from None

    tuning = data.get("tuning") or {}
    if not isinstance(tuning, dict):
        raise fail("tuning", "expects a mapping with split, images, seed")
    if set(tuning) - {"split", "images", "seed"}:
        unknown = sorted(map(str, set(tuning) - {"split", "images", "seed"}))[0]
        raise fail(f"tuning.{unknown}", "unknown key (known: split, images, seed)")
    if "split" in tuning and not (isinstance(tuning["split"], str) and tuning["split"]):
        raise fail("tuning.split", "must be a split name, or auto")
    for key, least in (("images", 1), ("seed", 0)):
        if key in tuning and not _is_int(tuning[key], least):
            raise fail(f"tuning.{key}",
                       f"must be an integer of at least {least} (true/false are not numbers)")
    trials = data.get("trials", 30)
    if not _is_int(trials, 1):
        raise fail("trials", "must be a positive integer (true/false are not numbers)")

    sampler = _parse_component("sampler", data.get("sampler"), SAMPLERS, fail)
    pruner = _parse_component("pruner", data.get("pruner"), PRUNERS, fail)
    for key in ("objective_options", "dataset_options"):
        if not isinstance(data.get(key) or {}, dict):
            raise fail(key, "must be a mapping")

    raw_space = data.get("search_space") or {}
    if not isinstance(raw_space, dict):
        raise fail("search_space", "must map parameter names to distributions")
    space: list[ParamSpec] = []
    for name, raw in raw_space.items():
        space.append(_parse_param(name, raw, space, set(raw_space), fixed, fail))
    unread = searched_but_unread(fixed.method, space)
    if unread:
        raise fail(f"search_space.{unread}", unread_message(fixed.method, unread))
    if not space:
        raise fail("search_space", "is empty: every trial would run the same config; add a parameter "
                   "(or evaluate the fixed config with `tune eval`)")
    if not any(_can_vary(p) for p in space):
        raise fail("search_space", "no parameter can take more than one value: every trial would run "
                   "the same config")
    objectives = _parse_objectives(data, fail)
    tie_break, tie_break_options = _parse_tie_break(data.get("tie_break"), fail)
    if objectives and tie_break:
        raise fail("tie_break", "a study with several objectives picks from its Pareto front and never "
                   "breaks ties: leave tie_break out, or make it one of the objectives")
    if objectives and (pruner.get("type", "wilcoxon") != "none"):
        raise fail("pruner", "a study with several objectives cannot prune: set `pruner: {type: none}`")
    objective = objectives[0] if objectives else (str(data.get("objective", "clip_reward")),
                                                  dict(data.get("objective_options") or {}))
    if fixed_data.get("preset") == "official":  # the authors' preset scores the authors' reward
        from objectives import official_reward_options

        objective = (objective[0], official_reward_options(*objective))
        objectives = [(name, official_reward_options(name, options)) for name, options in objectives]
        if tie_break:
            tie_break_options = official_reward_options(tie_break, tie_break_options)
    protocol = data.get("protocol", "standard")
    if protocol not in PROTOCOLS:
        raise fail("protocol", f"must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if protocol == "paper":
        searched = sorted(p.name for p in space if p.name.startswith("candidates"))
        if searched:
            raise fail(f"search_space.{searched[0]}", "protocol paper takes each image's ground-truth "
                       "classes as its candidates: a candidate setting cannot change a trial; remove it")
    spec = StudySpec(
        source=source, dataset=data["dataset"], fixed=fixed, search_space=tuple(space),
        objective=objective[0], objective_options=objective[1],
        objectives=tuple(objectives), tie_break=tie_break, tie_break_options=tie_break_options,
        dataset_options=dict(data.get("dataset_options") or {}),
        tuning_split=str(tuning.get("split", "auto")), tuning_images=int(tuning.get("images", 32)),
        tuning_seed=int(tuning.get("seed", 0)), eval_split=str(data.get("eval_split", "val")),
        sampler=sampler, pruner=pruner, trials=trials, name=data.get("name"), protocol=protocol,
    )
    # every value the space can take must make a valid config
    _check_space(spec, fail)
    try:  # the sampler's and pruner's own checks of their options
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            spec.make_sampler(0)
            spec.make_pruner()
    except (ValueError, TypeError) as err:
        raise fail("sampler/pruner", str(err).strip().splitlines()[0]) from None
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


def searched_but_unread(method: str, space: tuple[ParamSpec, ...] | list[ParamSpec]) -> str | None:
    """The first searched setting that `method` never reads (its trials would differ in name
    only), or None; None too when the method itself is searched."""
    if any(param.name == "method" for param in space):
        return None
    unread = unread_fields(method)
    return next((param.name for param in space if ALIASES.get(param.name, param.name) in unread), None)


def unread_message(method: str, name: str) -> str:
    return (f"method {method} never reads {name}: every value gives the same label maps; remove it "
            "or search a setting it reads")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: search-space names whose values are integers
INTEGER_SETTINGS = {f.name for f in dataclasses.fields(SegmenterConfig)
                    if str(f.type) in ("int", "int | None")} | {"head", "heads"}


def _parse_param(name: Any, raw: Any, earlier: list[ParamSpec], space_names: set, fixed: SegmenterConfig,
                 fail) -> ParamSpec:
    """One search-space entry, checked against the setting it samples and the earlier entries."""
    key = f"search_space.{name}"
    names = {f.name for f in dataclasses.fields(SegmenterConfig)} | set(ALIASES)
    if name not in names:
        raise fail(key, "is not a SegmenterConfig setting (or `head`)")
    if name == "candidates_file":
        raise fail(key, "cannot be searched (a study records one file by its hash): set it under fixed, "
                   "one study per file")
    if not isinstance(raw, dict) or raw.get("type") not in PARAM_TYPES:
        raise fail(f"{key}.type", f"must be one of {', '.join(PARAM_TYPES)}")
    extra = set(raw) - {"type", "low", "high", "step", "log", "choices", "condition"}
    if extra:
        raise fail(f"{key}.{sorted(extra, key=str)[0]}", "unknown key")
    kind, log, step = raw["type"], raw.get("log", False), raw.get("step")
    if not isinstance(log, bool):
        raise fail(f"{key}.log", "must be true or false")
    if kind == "categorical":
        for extra_key in ("low", "high", "step", "log"):
            if extra_key in raw:
                raise fail(f"{key}.{extra_key}", "does not apply to a categorical parameter (it has choices)")
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", "must be a non-empty list")
        if len({repr(c) for c in choices}) != len(choices):
            raise fail(f"{key}.choices", "lists a value twice")
    else:
        if "choices" in raw:
            raise fail(f"{key}.choices", f"does not apply to a {kind} range (use type: categorical)")
        if kind == "float" and name in INTEGER_SETTINGS:
            raise fail(f"{key}.type", f"{name} is an integer setting: use type: int (or categorical)")
        for bound in ("low", "high"):
            if not _is_number(raw.get(bound)):
                raise fail(f"{key}.{bound}", "missing or not a finite number")
            if kind == "int" and not float(raw[bound]).is_integer():
                raise fail(f"{key}.{bound}", f"{raw[bound]} is not an integer, as type: int needs")
        low, high = raw["low"], raw["high"]
        if low > high:
            raise fail(key, "low is above high")
        if step is not None:
            if not _is_number(step) or step <= 0:
                raise fail(f"{key}.step", "must be a positive number (leave it out for a continuous range)")
            if kind == "int" and not float(step).is_integer():
                raise fail(f"{key}.step", f"{step} is not an integer, as type: int needs")
            ratio = (high - low) / step
            if abs(ratio - round(ratio)) > 1e-9 * max(1.0, abs(ratio)):
                raise fail(f"{key}.step", f"high - low ({high - low:g}) is not a multiple of step "
                           f"({step:g}): set high to low + a whole number of steps")
        if log:
            if low <= 0:
                raise fail(f"{key}.log", f"a log scale needs low > 0 (low is {low})")
            if step is not None and not (kind == "int" and step == 1):
                raise fail(f"{key}.log", "a log scale cannot have a step: drop one of them")
    condition = raw.get("condition") or {}
    if not isinstance(condition, dict):
        raise fail(f"{key}.condition", "must map an earlier parameter to a value or list")
    parsed: dict[str, tuple[Any, ...]] = {}
    for other, allowed in condition.items():
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        parsed[other] = allowed
        where = f"{key}.condition.{other}"
        if not allowed:
            raise fail(where, "lists no value: the parameter would never be sampled")
        before = {p.name: p for p in earlier}
        if other in before:
            if not any(_param_can_take(before[other], v) for v in allowed):
                raise fail(where, f"no listed value is one {other} can take: the parameter would never "
                           "be sampled")
        elif other in space_names:  # this parameter itself, or one sampled after it
            raise fail(where, "a condition names an *earlier* search-space parameter or a fixed setting")
        elif other not in names:
            raise fail(where, "names no setting: use an earlier search-space parameter or a SegmenterConfig "
                       "setting")
        elif _current(fixed, {}, other) not in allowed:
            raise fail(where, f"{other} is fixed at {_current(fixed, {}, other)!r} and not searched before "
                       f"{name}: the parameter would never be sampled")
    return ParamSpec(
        name=name, type=kind, low=raw.get("low"), high=raw.get("high"), step=step, log=log,
        choices=tuple(raw.get("choices") or ()), condition=parsed,
    )


def _param_can_take(param: ParamSpec, value: Any) -> bool:
    if param.type == "categorical":
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in param.choices)
    return _is_number(value) and param.low <= value <= param.high


def _can_vary(param: ParamSpec) -> bool:
    return len(param.choices) > 1 if param.type == "categorical" else param.high > param.low


def _parse_component(key: str, raw: Any, kinds: tuple[str, ...], fail) -> dict[str, Any]:
    """`sampler:` / `pruner:`: a mapping with `type` and that Optuna class's options."""
    default = kinds[0]
    raw = {"type": default} if raw is None else raw
    if not isinstance(raw, dict) or raw.get("type", default) not in kinds:
        raise fail(f"{key}.type", f"must be one of {', '.join(kinds)}")
    cls = (SAMPLER_CLASSES if key == "sampler" else PRUNER_CLASSES)[raw.get("type", default)]
    options = {k: v for k, v in raw.items() if k != "type"}
    problem = option_problem(cls, options)
    if problem:
        raise fail(f"{key}.{problem[0]}", problem[1])
    return {"type": raw.get("type", default), **options}


SAMPLER_CLASSES = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
PRUNER_CLASSES = {"wilcoxon": optuna.pruners.WilcoxonPruner, "median": optuna.pruners.MedianPruner,
                  "none": optuna.pruners.NopPruner}
# annotation text -> the YAML value types it accepts (others are not checked)
_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def option_problem(
    cls: type, options: dict[str, Any], reserved: set[str] = frozenset()
) -> tuple[str, str] | None:
    """(option, what is wrong) for the first option `cls(**options)` would not take, or None.

    Names are checked against the constructor's parameters (less `reserved` ones, which the
    tuner passes itself, and callables, which YAML cannot give); values against simple
    annotations (int, float, bool, str, optionally None).
    """
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    known = {n: p for n, p in params.items()
             if n not in reserved and p.kind not in (inspect.Parameter.VAR_POSITIONAL,)
             and "Callable" not in str(p.annotation)}
    for name, value in options.items():
        if name in reserved:
            return str(name), "is set by the tuner itself (--device and the loaded models): remove it"
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            return str(name), f"unknown option of {cls.__name__} (its options: {listed})"
        text = str(known[name].annotation).replace("'", "").replace(" ", "")
        parts = text.split("|")
        allowed = [_SIMPLE_TYPES.get(p) for p in parts if p != "None"]
        if not allowed or None in allowed or (value is None and "None" in parts):
            continue
        kinds = tuple(t for group in allowed for t in group)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            return str(name), f"{value!r} is not of type {' | '.join(parts)}"
    return None


def check_component_options(spec: StudySpec) -> None:
    """SpecError when `objective_options` or `dataset_options` name an option the objective or
    dataset class does not take (or give it a value of the wrong simple type)."""
    from objectives._base import objective_class

    from .datasets import dataset_class

    checks = [
        ("objective_options", spec.objective, spec.objective_options, objective_class,
         RESERVED_OPTIONS["objective"]),
        ("dataset_options", spec.dataset, spec.dataset_options, dataset_class, RESERVED_OPTIONS["dataset"]),
    ]
    checks += [(f"objectives.{name}", name, options, objective_class, RESERVED_OPTIONS["objective"])
               for name, options in spec.objectives[1:]]
    if spec.tie_break:
        checks.append(("tie_break", spec.tie_break, spec.tie_break_options, objective_class,
                       RESERVED_OPTIONS["objective"]))
    for key, name, options, lookup, reserved in checks:
        try:
            cls = lookup(name)
        except ValueError as err:
            where = key.removesuffix("_options") if key in ("objective_options", "dataset_options") else key
            raise SpecError(f"{spec.source}: {where}: {err}") from None
        problem = option_problem(cls, options, reserved)
        if problem is None and hasattr(cls, "options_problem"):  # the objective's own value checks
            problem = cls.options_problem(options)
        if problem:
            what = problem[1].replace(cls.__name__, repr(name))
            raise SpecError(f"{spec.source}: {key}.{problem[0]}: {what}")


def _check_space(spec: StudySpec, fail) -> None:
    for param in spec.search_space:
        samples = list(param.choices) if param.type == "categorical" else [param.low, param.high]
        for value in samples:
            try:
                config_from_params(spec.fixed, {param.name: value})
            except (ValueError, TypeError) as err:
                raise fail(f"search_space.{param.name}", str(err)) from None
