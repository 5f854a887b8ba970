"""`SegmenterConfig`: every setting of the PnP-OVSS pipeline in one frozen dataclass.

The defaults are ours: the authors' values where theirs are sound, our choice where ours is
better, and each field's comment says which ("[official]" or "[ours]", with the authors' value).
`SegmenterConfig.preset("official")` reproduces the authors' code (github letitiabanana/PnP-OVSS;
README "Differences from the authors' code"). The YAML form is what `tune export` writes and what
`tune segment` / `tune eval` read; `from_yaml(to_yaml(c)) == c` holds exactly. A YAML mapping may
start from a preset: `preset: official` and then the settings that differ from it.

Settings whose cost grows with their value have upper bounds (`BOUNDS`), so no config can ask
for hours of work per image.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .yaml_input import load_yaml, read_yaml_file

DROPOUT_SCHEDULES = ("topk", "halving")
BLUR_BACKENDS = ("scipy", "torch")
CRF_BACKENDS = ("dense", "conv")
BACKGROUND_RULES = ("always", "never", "auto")
CANDIDATE_RULES = ("all", "clip_topk", "itm_threshold", "oracle", "file")
ITM_TOKENS = ("cls", "enc")
DROPOUT_SALIENCES = ("classes", "tokens")
CLASS_SPELLINGS = ("given", "joined")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: upper bounds of the settings whose cost grows with them (the official value in brackets):
#: image_size (336) sets the ViT's work, which grows as its square or faster; dropout_rounds (4)
#: model passes per image; blur_sigma (0.05, a fraction of the image side) the blur's kernel,
#: which at 0.25 already spans the image; crf_iterations (10) mean-field steps, which converge
#: in about 10; crf_*_sxy (3, 50) pixel ranges, which the windowed CRF pads the image by.
BOUNDS = {
    "image_size": 1024, "dropout_rounds": 20, "blur_sigma": 0.25, "crf_iterations": 50,
    "crf_gaussian_sxy": 1000.0, "crf_bilateral_sxy": 1000.0, "crf_bilateral_srgb": 1000.0,
}
#: the smallest post-processing cap (postprocess_max_side) that makes sense
MIN_POSTPROCESS_SIDE = 32

# Keys a config file may carry beside the settings; they describe where the file came from.
PROVENANCE_KEY = "provenance"
# The key that makes a YAML mapping start from a preset (`preset: official`).
PRESET_KEY = "preset"

#: the authors' code (PnP-OVSS, github letitiabanana/PnP-OVSS @e439962) where it differs from
#: our defaults; README "Differences from the authors' code" gives the file and line of each
OFFICIAL = {
    "itm_token": "enc", "dropout_count_first_twice": True, "dropout_salience": "tokens",
    "class_spelling": "joined", "dtype": "float32", "align_corners": True,
}
#: the official prompt words that joining the name's words does not give, by dataset
#: (the official VOC list says `table` and `tvmonitor`; ADE20K and COCO join every name)
OFFICIAL_ALIASES = {
    "voc": {"dining table": "table", "television monitor": "tvmonitor"},
    "voc20": {"dining table": "table", "television monitor": "tvmonitor"},
}
#: the methods' own post-processing, which their presets switch to: no blur, no CRF (the
#: background rule is `prob_thd`, step 5 of a CLIP method)
CLIP_POSTPROCESS = {"blur_sigma": 0.0, "crf": False}
PRESETS = {"default": {}, "official": OFFICIAL}
#: methods whose preset is their name: the published settings of their released code
#: (segmenter.methods.clip_dense.PUBLISHED), with their own post-processing
CLIP_METHODS = ("maskclip", "sclip", "clearclip", "naclip")
#: the CLIP method settings, by their names in `ClipDenseParams`
CLIP_FIELDS = ("logit_scale", "prob_thd", "slide_crop", "slide_stride", "short_side", "naclip_sigma",
               "templates")
#: the settings only pnp_ovss reads: its model, GradCAM source, Salience Dropout and its step 5
#: and 7 (threshold, upsampling, background rule); the CLIP methods never read them
PNP_OVSS_FIELDS = ("backend", "model", "revision", "itm_token", "layer", "heads", "dropout_schedule",
                   "dropout_rounds", "dropout_k", "dropout_count_first_twice", "dropout_salience",
                   "threshold", "align_corners", "background", "background_min_classes")


def unread_fields(method: str) -> tuple[str, ...]:
    """The settings built-in method `method` never reads, so that changing them cannot change its
    label maps (none are known for a method added with `register_method`)."""
    if method == "pnp_ovss":
        return ("clip_model", *CLIP_FIELDS)
    if method in CLIP_METHODS:
        return (*PNP_OVSS_FIELDS, *(() if method == "naclip" else ("naclip_sigma",)))
    return ()


@dataclass(frozen=True)
class SegmenterConfig:
    """All tunable and fixed settings of one PnP-OVSS segmenter.

    `layer` is 1-based (the paper's "layer 8"); `heads` are 0-based head indices of that layer's
    cross-attention (the official code's "head 9"), averaged when several are given.
    """

    #: the segmentation method (segmenter.methods.METHODS): "pnp_ovss" (GradCAM of a VLM's ITM
    #: score, steps 1-10) or a dense CLIP method: "maskclip", "sclip", "clearclip", "naclip"
    method: str = "pnp_ovss"
    # 1. Model (pnp_ovss: `backend` and `model`; the CLIP methods: `clip_model`)
    backend: str = "blip"
    model: str = "Salesforce/blip-itm-large-flickr"
    revision: str | None = None
    image_size: int = 336
    #: the models' precision: "auto" = bfloat16 on a CUDA GPU that has it, float32 elsewhere
    #: [ours: about 2x faster on a GPU]; "float32" [official]; the CLIP objectives follow it
    dtype: str = "auto"
    # 2. Prompt
    prompt_prefix: str = "a picture of "
    #: how a class name is written in the caption: "given" as the class list spells it [ours:
    #: `dining table`]; "joined" with its spaces and hyphens removed [official: `diningtable`;
    #: the official word-piece grouping needs one word per class]
    class_spelling: str = "given"
    #: caption words that replace given class names ({name: word}, e.g. VOC's official
    #: `dining table: table`); the label map and the outputs keep the given names
    prompt_aliases: tuple[tuple[str, str], ...] = ()
    #: the caption's first token in the ITM pass: "cls" the tokenizer's [CLS] [ours: what
    #: transformers' BLIP ITM feeds, and every checkpoint's tokenizer has it]; "enc" BLIP's [ENC],
    #: which BLIP was trained for ITM with [official: LAVIS swaps it in]
    itm_token: str = "cls"
    # 3. GradCAM source
    layer: int = 8
    heads: tuple[int, ...] = (9,)
    # 4. Salience Dropout
    dropout_schedule: str = "topk"
    dropout_rounds: int = 4
    dropout_k: int = 10
    #: the first round's maps count twice in the sum [official: True, the aggregate starts from
    #: round 1 and adds every round; ours: False, every round counts once]
    dropout_count_first_twice: bool = False
    #: what picks the patches to drop: "classes" the sum of the class maps, each class's word
    #: pieces averaged [ours]; "tokens" the sum of every word piece's map plus the [SEP] map for
    #: captions shorter than the batch's longest [official]
    dropout_salience: str = "classes"
    # 5. Threshold
    threshold: float = 0.15
    # 6. Upsampling: bilinear; align_corners [official: True; ours: False, pixel centres aligned
    #: the way image resizing does]
    align_corners: bool = False
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
    # CLIP methods (maskclip, sclip, clearclip, naclip; segmenter/methods/clip_dense.py): the
    # checkpoint, then the fields of ClipDenseParams. Their step 5 replaces threshold and
    # background: softmax over classes of logit_scale x cosine similarity, background where the
    # top probability is below prob_thd; blur and CRF then apply as for pnp_ovss
    clip_model: str = "openai/clip-vit-base-patch16"
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    slide_crop: int = 224  # sliding-window side in pixels; 0: the whole image in one pass
    slide_stride: int = 112
    short_side: int | None = 336  # the image's shorter side before inference; null: as it is
    naclip_sigma: float = 5.0  # naclip: Gaussian neighbourhood, in patches
    templates: str = "imagenet"  # imagenet (80 prompts averaged) | single ("a photo of a {}.")
    # Candidate classes per image (which names the prompt lists)
    candidates: str = "all"
    candidates_topk: int = 5
    candidates_threshold: float = 0.5
    candidates_model: str = "openai/clip-vit-large-patch14-336"
    # `candidates: file`: JSON {image_id: [class names]} (segmenter/candidate_file.py); a relative
    # path in a YAML file is relative to that file's folder
    candidates_file: str | None = None
    # Post-processing resolution (not in the paper): steps 5-10 run on the image scaled down so
    # that its longer side is at most this many pixels, and the label map is scaled back up by
    # nearest neighbour; null = full resolution (faithful, and slow on photos)
    postprocess_max_side: int | None = None

    def __post_init__(self) -> None:
        # Accept what a YAML file or a sampler hands us: a list or a single int for heads,
        # numpy scalars, integral floats for ints and ints for floats.
        heads = (self.heads,) if isinstance(self.heads, int) else self.heads
        if isinstance(heads, (list, tuple)):
            object.__setattr__(self, "heads", tuple(_as_int(h) for h in heads))
        aliases = self.prompt_aliases
        if isinstance(aliases, dict):
            aliases = tuple(aliases.items())
        if isinstance(aliases, (list, tuple)):
            object.__setattr__(self, "prompt_aliases", tuple(
                tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in aliases))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "int | None"):
                object.__setattr__(self, f.name, _as_int(value))
            elif f.type == "float" and isinstance(value, (int, float)) and not isinstance(
                value, bool
            ):
                object.__setattr__(self, f.name, float(value))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                shown = reprlib.repr(getattr(self, name))  # bounded: a value may be huge
                raise ValueError(f"SegmenterConfig.{name}={shown}: {what}")

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
        from .methods import METHODS

        need(self.method in METHODS, "method", f"is unknown: use one of {', '.join(METHODS)}")
        from .backends import BACKENDS

        need(self.backend in BACKENDS, "backend", f"is unknown: use one of {', '.join(BACKENDS)} "
             "(the model pnp_ovss runs on)")
        need(isinstance(self.clip_model, str) and bool(self.clip_model), "clip_model",
             "must name a CLIP model id or a local directory")
        try:
            self.clip_params()
        except ValueError as err:
            raise ValueError(f"SegmenterConfig.{err}") from None
        need(isinstance(self.model, str) and bool(self.model), "model",
             "must name a Hugging Face model id or a local directory")
        need(self.revision is None or isinstance(self.revision, str), "revision",
             "must be a string or null")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        need(self.itm_token in ITM_TOKENS, "itm_token", f"must be one of {', '.join(ITM_TOKENS)}")
        need(self.class_spelling in CLASS_SPELLINGS, "class_spelling",
             f"must be one of {', '.join(CLASS_SPELLINGS)}")
        need(self.dropout_salience in DROPOUT_SALIENCES, "dropout_salience",
             f"must be one of {', '.join(DROPOUT_SALIENCES)}")
        need(isinstance(self.prompt_aliases, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) and x.strip() for x in p)
            for p in self.prompt_aliases), "prompt_aliases",
            "must map class names to caption words, e.g. {dining table: table}")
        need(len({a for a, _ in self.prompt_aliases}) == len(self.prompt_aliases), "prompt_aliases",
             "names a class twice")
        need(16 <= self.image_size <= BOUNDS["image_size"], "image_size",
             f"must be 16..{BOUNDS['image_size']} pixels")
        need(self.layer >= 1, "layer", "is 1-based: use 1 for the first text layer")
        need(len(self.heads) >= 1, "heads", "needs at least one head index")
        need(all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in self.heads), "heads",
             "head indices are 0-based non-negative integers")
        need(len(set(self.heads)) == len(self.heads), "heads", "lists a head twice")
        need(self.dropout_schedule in DROPOUT_SCHEDULES, "dropout_schedule",
             f"must be one of {', '.join(DROPOUT_SCHEDULES)}")
        need(1 <= self.dropout_rounds <= BOUNDS["dropout_rounds"], "dropout_rounds",
             f"must be 1..{BOUNDS['dropout_rounds']} (1 = no Salience Dropout)")
        need(self.dropout_k >= 1, "dropout_k", "must be at least 1 patch per round")
        need(0.0 <= self.threshold <= 1.0, "threshold", "must be in [0, 1]")
        need(self.background in BACKGROUND_RULES, "background",
             f"must be one of {', '.join(BACKGROUND_RULES)}")
        need(self.background_min_classes >= 1, "background_min_classes", "must be at least 1")
        need(0.0 <= self.blur_sigma <= BOUNDS["blur_sigma"], "blur_sigma",
             f"must be in [0, {BOUNDS['blur_sigma']}] (a fraction of the image side; 0 disables the blur)")
        need(1 <= self.crf_iterations <= BOUNDS["crf_iterations"], "crf_iterations",
             f"must be 1..{BOUNDS['crf_iterations']}")
        need(self.blur_backend in BLUR_BACKENDS, "blur_backend", f"must be one of {', '.join(BLUR_BACKENDS)}")
        need(self.crf_backend in CRF_BACKENDS, "crf_backend", f"must be one of {', '.join(CRF_BACKENDS)}")
        for name in ("crf_gaussian_sxy", "crf_bilateral_sxy", "crf_bilateral_srgb"):
            need(0 < getattr(self, name) <= BOUNDS[name], name, f"must be in (0, {BOUNDS[name]:g}]")
        for name in ("crf_gaussian_compat", "crf_bilateral_compat"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.candidates in CANDIDATE_RULES, "candidates",
             f"must be one of {', '.join(CANDIDATE_RULES)}")
        need(self.candidates_topk >= 1, "candidates_topk", "must be at least 1")
        need(0.0 <= self.candidates_threshold <= 1.0, "candidates_threshold",
             "must be in [0, 1] (an ITM match probability)")
        need(isinstance(self.candidates_model, str) and bool(self.candidates_model), "candidates_model",
             "must name a CLIP model id or a local directory")
        need(self.candidates_file is None or (isinstance(self.candidates_file, str)
                                              and bool(self.candidates_file)), "candidates_file",
             "must be the path of a JSON file of per-image class lists, or null")
        need(self.candidates != "file" or self.candidates_file is not None, "candidates_file",
             "is required by candidates: file: give the JSON file of per-image class lists")
        side = self.postprocess_max_side
        need(side is None or (isinstance(side, int) and not isinstance(side, bool)
                              and side >= MIN_POSTPROCESS_SIDE), "postprocess_max_side",
             f"must be null (full resolution) or an integer of at least {MIN_POSTPROCESS_SIDE} pixels")

    # -- derived -----------------------------------------------------------------------------
    @property
    def uses_image_labels(self) -> bool:
        """True when the candidate rule reads ground-truth image-level labels (audits only)."""
        return self.candidates == "oracle"

    def clip_params(self):
        """The CLIP method's hyperparameters (`ClipDenseParams`; variant naclip for pnp_ovss,
        which reads none of them). Raises ValueError for an invalid field."""
        from .methods.clip_dense import ClipDenseParams

        variant = self.method if self.method in CLIP_METHODS else "naclip"
        return ClipDenseParams(variant, **{name: getattr(self, name) for name in CLIP_FIELDS})

    @classmethod
    def preset(cls, name: str = "official", dataset: str | None = None, **changes: Any) -> SegmenterConfig:
        """A config starting from preset `name`, with `changes` on top.

        "official" reproduces the authors' code: [ENC] as the ITM token, round 1 counted twice,
        token-level Salience Dropout scores, joined class names (with `dataset`'s official words,
        e.g. VOC `table`, in `prompt_aliases`), float32, `align_corners=True`. "default" is
        `SegmenterConfig()`. A CLIP method's name ("maskclip", "sclip", "clearclip", "naclip")
        gives that method with its released code's settings and its own post-processing (no blur,
        no CRF). Raises ValueError for an unknown preset or setting.
        """
        if name in CLIP_METHODS:
            from .methods.clip_dense import PUBLISHED

            values: dict[str, Any] = {"method": name, **CLIP_POSTPROCESS,
                                      **{f: getattr(PUBLISHED[name], f) for f in CLIP_FIELDS}}
        elif name in PRESETS:
            values = dict(PRESETS[name])
        else:
            raise ValueError(f"unknown preset {name!r}: use one of {', '.join(preset_names())}")
        if name == "official" and dataset in OFFICIAL_ALIASES:
            values["prompt_aliases"] = tuple(OFFICIAL_ALIASES[dataset].items())
        values.update(changes)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(_unknown_message(unknown))
        return cls(**values)

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
            if f.name == "prompt_aliases":
                out[f.name] = dict(value)
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self, provenance: dict[str, Any] | None = None) -> str:
        """The config as YAML; `provenance` (study, trial, ...) is kept under its own key."""
        data = self.to_dict()
        if provenance:
            data[PROVENANCE_KEY] = provenance
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], dataset: str | None = None) -> SegmenterConfig:
        """A config from a mapping of settings; `preset: NAME` starts from that preset (with
        `dataset`'s official words under "official"), the other settings applied on top."""
        if not isinstance(data, dict):
            raise ValueError("a SegmenterConfig must be a mapping of setting names to values")
        data = {k: v for k, v in data.items() if k != PROVENANCE_KEY}
        preset = data.pop(PRESET_KEY, None)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(_unknown_message(unknown))
        if preset is not None:
            if not isinstance(preset, str):
                raise ValueError(f"preset must be a name: one of {', '.join([*PRESETS, *CLIP_METHODS])}")
            return cls.preset(preset, dataset, **data)
        return cls(**data)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path, dataset: str | None = None) -> SegmenterConfig:
        """Read a config from YAML text or from a path to a YAML file.

        A relative `candidates_file` in a file is taken relative to that file's folder.
        Raises FileNotFoundError for a missing file and ValueError for invalid or oversized YAML
        (`segmenter.yaml_input`), unknown or invalid settings, and a file that holds no setting:
        every setting would take its default, the published 1.8 GB BLIP among them, which is
        never what an empty or truncated file meant.
        """
        data = _load_yaml_text_or_path(text_or_path)
        where = str(text_or_path) if _looks_like_path(text_or_path) else "the config text"
        settings = {k for k in data or {} if k != PROVENANCE_KEY} if isinstance(data, dict) else data
        if not settings:
            raise ValueError(
                f"{where} holds no settings: write a config (`tune export` does), or at least "
                f"`model: {cls.model}` to use the published model and our defaults, or "
                "`preset: official` for the authors' settings"
            )
        if _looks_like_path(text_or_path) and isinstance(data, dict) and "candidates_file" in data:
            from .candidate_file import resolve_candidates_file

            data = {**data, "candidates_file": resolve_candidates_file(data["candidates_file"],
                                                                       Path(text_or_path).parent)}
        return cls.from_dict(data, dataset)


def read_provenance(text_or_path: str | Path) -> dict[str, Any]:
    """The provenance block of an exported config file ({} when it has none)."""
    data = _load_yaml_text_or_path(text_or_path) or {}
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


def _load_yaml_text_or_path(text_or_path: str | Path) -> Any:
    """Bounded YAML (`segmenter.yaml_input`) of a config file or of config text."""
    if _looks_like_path(text_or_path):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return read_yaml_file(path)
    return load_yaml(str(text_or_path), "config text")


def _unknown_message(unknown: set[str]) -> str:
    known = ", ".join(f.name for f in fields(SegmenterConfig))
    return f"unknown SegmenterConfig setting(s): {', '.join(sorted(unknown))} (known: {known})"


def preset_names() -> tuple[str, ...]:
    """Every name `SegmenterConfig.preset` takes: "default", "official" and each CLIP method."""
    return (*PRESETS, *CLIP_METHODS)
