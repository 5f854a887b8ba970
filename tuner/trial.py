"""One trial: a SegmenterConfig run over the tuning images and scored by an objective.

Relevance maps come from the map cache where possible. Without Salience Dropout (one round)
an entry holds every head of the layer, so a change of heads runs no model; with dropout the
dropped patches depend on the heads, and the entry is keyed by them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import optuna

from objectives import VIEWS, Objective, ScoreInput, confusion_matrix, miou, num_label_classes, to_class_ids
from segmenter import Backend, SegmenterConfig, postprocess, prompt_for, salience_dropout
from segmenter.images import image_digest
from segmenter.methods import Method

from .cache import MapCache, cache_key
from .datasets import Dataset, Sample


@dataclass
class TuningImage:
    """A tuning sample kept in memory with its content hash."""

    sample: Sample
    digest: str
    _views: dict = field(default_factory=dict, repr=False, compare=False)

    def view(self, name: str) -> TuningImage:
        """The image under a view transform (objectives.VIEWS), made once; no labels."""
        if name not in self._views:
            if name != "hflip":
                raise ValueError(f"unknown view {name!r}: the tuner can make {', '.join(VIEWS)}")
            image = np.ascontiguousarray(self.sample.image[:, ::-1])
            sample = Sample(id=f"{self.sample.id}#{name}", image=image, labels=None,
                            image_classes=self.sample.image_classes)
            self._views[name] = TuningImage(sample, image_digest(image))
        return self._views[name]


def view_label_maps(
    views: Sequence[str], config: SegmenterConfig, batch: Sequence[TuningImage],
    candidates: Sequence[Sequence[str]], provider: MapProvider, caption: Sequence[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Per image the label map of each view, mapped back onto the image. # each [H, W]

    The view's maps come through the map cache like the image's own, with the same candidates
    (and caption names, see MapProvider.maps).
    """
    out: list[dict[str, np.ndarray]] = [{} for _ in batch]
    for view in views:
        shown = [im.view(view) for im in batch]
        maps = provider.maps(config, shown, candidates, caption)
        for row, im, m in zip(out, shown, maps):
            label_map = postprocess(im.sample.image, m, config, provider.device)
            row[view] = np.ascontiguousarray(label_map[:, ::-1])  # hflip is its own inverse
    return out


@dataclass
class TrialOutcome:
    value: float  # mean of the finite per-image values (NaN when none is finite)
    per_image: list[float]  # NaN where the objective is undefined on an image
    confusion: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)  # miou, pixel_accuracy, iou per class
    extra: dict[str, list[float]] = field(default_factory=dict)  # per image, by extra objective


class MapProvider:
    """Steps 1-4 for a batch of images, through the map cache.

    `model` is the loaded segmentation model: a pnp_ovss `Backend` (or the `Method` wrapping
    one), or another `Method` (a dense CLIP method), whose maps are keyed on the method, its
    map-shaping fields (`Method.map_key`) and its checkpoint.
    """

    def __init__(self, model: Backend | Method, cache: MapCache, batch_size: int = 8) -> None:
        self.method = model if isinstance(model, Method) else None
        self.backend = model.backend if isinstance(model, Method) else model  # None: not pnp_ovss
        self.cache, self.batch_size = cache, batch_size
        source = self.backend if self.backend is not None else self.method
        self.device = source.device
        self.model_runs = 0  # batches sent to the model
        self.weights = weights_fingerprint(source.model_id) if cache.enabled else None

    @property
    def method_name(self) -> str:
        """The method whose maps this provider makes."""
        return "pnp_ovss" if self.backend is not None else self.method.name

    def _key(self, config: SegmenterConfig, digest: str, candidates: Sequence[str],
             caption: Sequence[str] | None = None) -> str:
        parts = dict(
            backend=config.backend, model=self.backend.model_id, revision=self.backend.revision,
            weights=self.weights, dtype=str(self.backend.dtype), image=digest,
            image_size=config.image_size, candidates=list(candidates), prompt=config.prompt_prefix,
            spelling=config.class_spelling, aliases=[list(a) for a in config.prompt_aliases],
            itm_token=config.itm_token, layer=config.layer,
        )
        if config.dropout_rounds > 1:  # dropped patches depend on the heads, the schedule and the
            # salience rule, and the stored sum weighs the first round by the double-count flag
            parts.update(heads=list(config.heads), schedule=config.dropout_schedule,
                         rounds=config.dropout_rounds, k=config.dropout_k,
                         first_twice=config.dropout_count_first_twice, salience=config.dropout_salience)
        if caption is not None:  # the caption lists other names than the candidates (protocol paper)
            parts["caption"] = list(caption)
        return cache_key(**parts)

    def maps(
        self, config: SegmenterConfig, images: Sequence[TuningImage],
        candidates: Sequence[Sequence[str]], caption: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Per image the class relevance maps of `config`, one per candidate. # [C, gh, gw]

        The caption lists each image's candidates, or, given `caption` (protocol paper: the whole
        vocabulary), those names for every image, and each candidate's map is cut out of it
        (every candidate must be one of them; `check_caption` says beforehand whether the model
        takes such a caption). An image without candidates (an empty list of a candidates_file,
        an oracle image showing no class) gets no maps ([0, gh, gw]) and no model pass: it is all
        background.
        """
        if config.method != self.method_name:
            raise ValueError(f"the loaded model runs method {self.method_name}, not {config.method}: a study "
                             "or evaluation runs one method (fix `method` in the spec's fixed settings)")
        if self.backend is None:
            return self._method_maps(config, images, candidates)
        keys = [self._key(config, im.digest, c, caption) for im, c in zip(images, candidates)]
        entries: list[np.ndarray | None] = [self.cache.get(k) if len(c) else None
                                            for k, c in zip(keys, candidates)]
        missing = [i for i, e in enumerate(entries) if e is None and len(candidates[i])]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            pixels = self.backend.prepare_images([images[i].sample.image for i in chunk], config.image_size)
            prompts = [prompt_for(config, candidates[i] if caption is None else caption) for i in chunk]
            if config.dropout_rounds == 1:  # every head of the layer from one pass
                cams = self.backend.gradcam(pixels, prompts, [config.layer], itm_token=config.itm_token)
                computed = [c[0].cpu().numpy() for c in cams]  # [heads, C, gh, gw]
            else:
                computed = [m.cpu().numpy() for m in salience_dropout(self.backend, pixels, prompts, config)]
            self.model_runs += 1
            for i, array in zip(chunk, computed):
                if caption is not None:  # the candidates' maps of the caption's classes
                    array = np.take(array, caption_rows(caption, candidates[i]), axis=-3)
                entries[i] = array
                self.cache.put(keys[i], array)
        out = []
        for array, names in zip(entries, candidates):
            if not len(names):
                out.append(np.zeros((0, *self.backend.patch_grid(config.image_size)), dtype=np.float32))
                continue
            assert array is not None
            if config.dropout_rounds == 1:
                array = array[list(config.heads)].mean(0)
                if config.dropout_count_first_twice:
                    array = 2.0 * array
            out.append(array.astype(np.float32))
        return out


    def _method_maps(self, config: SegmenterConfig, images: Sequence[TuningImage],
                     candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """`maps` for a method other than pnp_ovss: one map per candidate from the method. A
        candidate's map does not depend on the other names (the CLIP methods compare each class's
        text embedding with the patches), so a caption of other names changes nothing."""
        method = self.method
        keys = [cache_key(**method.map_key(config), model=method.model_id, weights=self.weights,
                          dtype=str(method.dtype), image=im.digest, candidates=list(c))
                for im, c in zip(images, candidates)]
        entries = [self.cache.get(k) if len(c) else None for k, c in zip(keys, candidates)]
        missing = [i for i, e in enumerate(entries) if e is None and len(candidates[i])]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            computed = method.relevance_maps([images[i].sample.image for i in chunk],
                                             [list(candidates[i]) for i in chunk], config)
            self.model_runs += 1
            for i, array in zip(chunk, computed):
                entries[i] = array
                self.cache.put(keys[i], array)
        return [np.asarray(e, dtype=np.float32) if e is not None else
                np.zeros((0, *method.grid(*im.sample.image.shape[:2], config)), dtype=np.float32)
                for e, im in zip(entries, images)]


def caption_rows(caption: Sequence[str], candidates: Sequence[str]) -> list[int]:
    """The index in `caption` of each candidate; ValueError for a candidate the caption lacks."""
    where = {name: i for i, name in enumerate(caption)}
    missing = [c for c in candidates if c not in where]
    if missing:
        raise ValueError(f"class {missing[0]!r} is not in the caption's names (the dataset vocabulary): "
                         "its map cannot be cut out of the caption")
    return [where[c] for c in candidates]


def check_caption(backend: Backend, config: SegmenterConfig, caption: Sequence[str]) -> None:
    """A one-line ValueError now when a caption listing every name of `caption` (protocol paper: the
    whole vocabulary) is longer than the model takes.

    Uses the backend's own tokenizer check where it has one (BLIP); with another backend such a
    caption fails on the first batch with the backend's message.
    """
    tokenize = getattr(backend, "_tokenize", None)
    if tokenize is None:
        return
    try:
        tokenize([prompt_for(config, caption)])
    except ValueError as err:
        text = str(err)
        if "tokens, more than" not in text:
            raise
        raise ValueError(f"protocol paper lists the whole vocabulary ({len(caption)} names) in every "
                         f"caption, and {text.split(': list fewer')[0]}: use `protocol: standard` (captions "
                         "of each image's candidates) for this dataset and model") from None


def ground_truth_candidates(
    vocabulary: Sequence[str],
) -> Callable[[SegmenterConfig, TuningImage], tuple[str, ...]]:
    """Candidates of protocol paper: an image's ground-truth classes (image-level labels), in
    vocabulary order, whatever the config's candidate rule. ValueError for an image without labels."""
    from segmenter.candidates import select_candidates

    vocabulary = tuple(vocabulary)

    def pick(config: SegmenterConfig, image: TuningImage) -> tuple[str, ...]:
        if image.sample.image_classes is None:
            raise ValueError(f"protocol paper needs image-level labels, and image {image.sample.id!r} has "
                             "none: use `protocol: standard`")
        return select_candidates("oracle", image.sample.image, vocabulary,
                                 image_classes=image.sample.image_classes)

    return pick


def weights_fingerprint(model: str) -> list | None:
    """For a checkpoint directory, (name, size, mtime) of its weight and config files, so that maps
    cached for a directory are not served after its weights were replaced; None for a hub id
    (its revision is in the key)."""
    from pathlib import Path

    from segmenter.backends import resolve_model_path

    root = Path(resolve_model_path(model))
    if not root.is_dir():
        return None
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


class CandidatePicker:
    """The candidate classes of an image under a config's rule, computed once per image and rule.

    CLIP (for `clip_topk`) is the objective's when it has one, else loaded on first use.
    `synonyms[i]` are other names of `vocabulary[i]` (Dataset.vocabulary_synonyms), which a
    `candidates_file` may use.
    """

    def __init__(self, vocabulary: Sequence[str], backend: Backend | None, clip=None,
                 synonyms: Sequence[Sequence[str]] | None = None, device=None) -> None:
        """`backend`: the ITM model of itm_threshold (None for a method without one); `device`
        where a CLIP for clip_topk loads (default: the backend's)."""
        self.vocabulary, self.backend, self.clip = tuple(vocabulary), backend, clip
        self.device = device if device is not None or backend is None else backend.device
        self.synonyms = None if synonyms is None else tuple(tuple(s) for s in synonyms)
        self._memo: dict[tuple, tuple[str, ...]] = {}

    def __call__(self, config: SegmenterConfig, image: TuningImage) -> tuple[str, ...]:
        from segmenter.candidates import select_candidates

        key = (image.digest, config.candidates, config.candidates_topk, config.candidates_threshold,
               config.prompt_prefix, config.image_size)
        if config.candidates == "file":  # the file lists classes by image id, not by content
            key += (image.sample.id, config.candidates_file)
        if key not in self._memo:
            if config.candidates == "clip_topk" and self.clip is None:
                from segmenter.clip import ClipScorer

                self.clip = ClipScorer(config.candidates_model, device=self.device)
            self._memo[key] = tuple(select_candidates(
                config.candidates, image.sample.image, self.vocabulary,
                image_classes=image.sample.image_classes, backend=self.backend, clip=self.clip,
                topk=config.candidates_topk, threshold=config.candidates_threshold,
                prompt_prefix=config.prompt_prefix, image_size=config.image_size,
                image_id=image.sample.id, candidates_file=config.candidates_file, synonyms=self.synonyms,
            ))
        return self._memo[key]


class TrialRunner:
    """Evaluates configs over a fixed list of tuning images."""

    def __init__(
        self,
        dataset: Dataset,
        images: Sequence[TuningImage],
        provider: MapProvider,
        objective: Objective | None,
        candidates: Callable[[SegmenterConfig, TuningImage], tuple[str, ...]],
        batch_size: int = 8,
        report: str = "instance",
        pool: Executor | None = None,
        extra: dict[str, Objective] | None = None,
        caption: Sequence[str] | None = None,
    ) -> None:
        self.dataset, self.images, self.provider = dataset, list(images), provider
        #: the names every caption lists (protocol paper: the whole vocabulary); None: each image's
        #: candidates (see MapProvider.maps)
        self.caption = None if caption is None else tuple(caption)
        self.objective, self.candidates, self.batch_size = objective, candidates, batch_size
        #: objectives scored on the same label maps beside the study's (the other objectives of a
        #: multi-objective study, the tie-break objective): per image in TrialOutcome.extra
        self.extra = dict(extra or {})
        self.report = report  # "instance": per-image values (Wilcoxon); "mean": running mean
        self.pool = pool  # worker processes for the CPU post-processing (the dense CRF holds the GIL)

    def _start_label_maps(self, config: SegmenterConfig, batch: Sequence[TuningImage], maps):
        """Start steps 5-10 for a batch; returns a function that waits for the label maps.

        In worker processes when there are some and the work is on CPU: the CRF runs there while
        the caller sends the next batch through the model, so the GPU does not wait on it.
        """
        images = [im.sample.image for im in batch]
        if self.pool is None or config.blur_backend == "torch" or config.crf_backend == "conv":
            device = self.provider.device
            done = [postprocess(image, m, config, device) for image, m in zip(images, maps)]
            return lambda: done
        futures = [self.pool.submit(postprocess, image, m, config) for image, m in zip(images, maps)]
        return lambda: [f.result() for f in futures]

    def evaluate(
        self,
        config: SegmenterConfig,
        trial: optuna.Trial | None = None,
        on_image: Callable[[int], None] | None = None,
    ) -> TrialOutcome:
        labelled = self.dataset.has_labels and all(im.sample.labels is not None for im in self.images)
        n_eval = num_label_classes(self.dataset.class_names)
        confusion = np.zeros((n_eval, n_eval), dtype=np.int64) if labelled else None
        per_image: list[float] = []
        extra: dict[str, list[float]] = {name: [] for name in self.extra}
        scorers = [o for o in (self.objective, *self.extra.values()) if o is not None]
        views = tuple(dict.fromkeys(v for o in scorers for v in o.views))
        pixel = any(o.labels == "pixel" for o in scorers)

        def finish(start, batch, cands, maps, label_maps) -> None:
            items = []
            seen_views = (view_label_maps(views, config, batch, cands, self.provider, self.caption) if views
                          else [None] * len(batch))
            for im, names, m, label_map, seen in zip(batch, cands, maps, label_maps(), seen_views):
                items.append(ScoreInput(
                    image=im.sample.image, class_names=tuple(names), maps=m, label_map=label_map,
                    threshold=config.threshold, vocabulary=self.dataset.vocabulary,
                    image_classes=im.sample.image_classes, label_names=self.dataset.class_names,
                    image_digest=im.digest, views=seen,
                    labels=im.sample.labels if pixel else None,
                ))
                if confusion is not None:
                    pred = to_class_ids(label_map, names, self.dataset.class_names)
                    confusion[...] += confusion_matrix(pred, im.sample.labels, n_eval,
                                                       self.dataset.ignore_index)
            if self.objective is None:  # evaluation only: labels, no objective
                if on_image is not None:
                    on_image(start + len(batch))
                return
            for name, objective in self.extra.items():
                extra[name].extend(float(v) for v in np.asarray(objective.score(items), dtype=np.float64))
            scores = np.asarray(self.objective.score(items), dtype=np.float64)
            for score in scores:
                per_image.append(float(score))
                if trial is not None and np.isfinite(score):  # an undefined value is not reported
                    step = len(per_image) - 1
                    value = float(score) if self.report == "instance" else finite_mean(per_image)
                    trial.report(value, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after {len(per_image)} images")
                if on_image is not None:
                    on_image(len(per_image))

        pending = None  # the previous batch, whose post-processing runs while this one's maps do
        for start in range(0, len(self.images), self.batch_size):
            batch = self.images[start : start + self.batch_size]
            cands = [self.candidates(config, im) for im in batch]
            maps = self.provider.maps(config, batch, cands, self.caption)
            started = (start, batch, cands, maps, self._start_label_maps(config, batch, maps))
            if pending is not None:
                finish(*pending)
            pending = started
        if pending is not None:
            finish(*pending)
        metrics = {}
        if confusion is not None:
            metrics = _metrics_dict(miou(confusion), self.dataset.class_names)
        return TrialOutcome(finite_mean(per_image), per_image, confusion, metrics, extra)


def finite_mean(values: Sequence[float]) -> float:
    """The mean of the defined (finite) values; NaN when there are none. An image on which an
    objective is undefined (e.g. miou_supervised without labelled pixels) is skipped."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else float("nan")


def _metrics_dict(scores, class_names: Sequence[str]) -> dict:
    iou = scores.per_class_iou[: len(class_names)]
    return {
        "miou": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "iou_per_class": {n: None if np.isnan(v) else float(v) for n, v in zip(class_names, iou)},
    }
