"""The official 34-trial search run two ways on the same images and configs: reference-style vs `tune run`.

    python bench/bench_search.py                        # BLIP-base + CLIP-B/16 sized, CPU, 1 thread
    python bench/bench_search.py --images 4 --json search.json
    python bench/bench_search.py --device cuda --images 64 --workers 8   # BLIP-large + CLIP-L/14-336

The official search (PnP-OVSS; README, "Reproducing the paper"): layer x head x threshold
{0.05, ..., 0.45} drawn by a seeded random sampler, 34 trials, Salience Dropout off (one round),
the official preset ([ENC], joined names, float32), the ground-truth classes of each COCO image;
the caption lists the whole vocabulary (`protocol: paper`) and the maps of the image's classes
are cut out of it; the CLIP reward (`mask_rebinarize: official`) counts the classes whose masked
crop M_k * I CLIP names more confidently than the black image (softmax over the image's classes).
Where a checkout lacks one of these pieces, `official_pieces` says so and both runs use today's
stand-in (`--stand-in` forces all three); the printout names each stand-in.

(b) `tune run`: a StudyRunner on studies/paper_coco.yaml (models, data, image count, seed and
    trial count replaced: `search_spec`), timed from loading the models to the last trial, with
    a cold map cache and `--workers` post-processing processes (default none). Like `tune run`
    it makes each trial's label maps (the dense CRF) to record its mIoU.
    Its 34 distinct configs are then fed to (a).
(a) reference-style, as the authors' search ran: one trial at a time, one image at a time; for
    every trial and image a full forward and backward through BLIP (parameters requiring grad,
    eager attention, float32, `backward()` through the text encoder and the ViT), the class maps
    cut from the caption, the reward masks, CLIP on every masked crop and on the black image, the
    class names embedded again; nothing kept from one trial or image to the next.
    `--reference-pass gradcam` uses the project's own pass instead (no ViT backward), which
    leaves only the reuse across trials to measure.

Both read the same images (shapes-world scenes written as COCO-Stuff by `write_coco_layout`, at
BLIP's input size) with random models of the published shapes (bench/_models.py). Printed: wall
and CPU seconds (CPU seconds are steadier on a shared machine), model passes (images through a
text-encoder forward + backward), CLIP images embedded (crops and black images), seconds per
trial, where each run's time goes, the ratio a/b, and whether both runs gave every trial the
same value. `--json PATH` saves it all; `--profile PATH` writes cProfile statistics of (b).
One image by default: (a) costs about 10 s per trial and image with one CPU thread.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _models import BLIP_SIZES, CLIP_SIZES, save_random_blip, save_random_clip  # noqa: E402

from objectives import _clip as clip_module  # noqa: E402
from objectives._clip import _image_tensor, reward_masks  # noqa: E402
from segmenter import SegmenterConfig  # noqa: E402
from segmenter.backends.blip import BlipBackend, resolve_device  # noqa: E402
from segmenter.clip import PAPER_LOGIT_SCALE, ClipScorer  # noqa: E402
from segmenter.pipeline import prompt_for  # noqa: E402
from segmenter.yaml_input import read_yaml_file  # noqa: E402
from tuner import spec as spec_module  # noqa: E402
from tuner import trial as trial_module  # noqa: E402
from tuner.datasets import load_dataset  # noqa: E402
from tuner.datasets.shapes_writers import write_coco_layout  # noqa: E402
from tuner.spec import StudySpec, builtin_spec_path, parse_spec  # noqa: E402
from tuner.study import RunOptions, StudyRunner, distinct_trials, quiet_libraries  # noqa: E402

#: the official search: thresholds, trials, dataset (COCO: its whole vocabulary is the caption)
THRESHOLDS = (0.05, 0.15, 0.25, 0.35, 0.45)
TRIALS = 34
DATASET = "coco_stuff"
#: model sizes by device: BLIP-base + CLIP-B/16 on a CPU, BLIP-large + CLIP-L/14-336 on a GPU
SIZE_BY_DEVICE = {"cpu": "base", "cuda": "large"}
REFERENCE_PASSES = ("full", "gradcam")


# --- which pieces of the official search this checkout has ----------------------------------------
def official_pieces() -> dict[str, bool]:
    """Whether the checkout has the official preset, the official reward-mask rule and the paper
    search protocol (issue 16); where one is missing the bench uses today's stand-in for it:
    the default config, the 0.5 re-binarisation, and a caption and softmax over the ground-truth
    classes (candidate rule `oracle`) instead of the whole vocabulary."""
    try:
        reward_masks(np.ones((1, 2, 2), np.float32), 0.15, 8, rebinarize="official")
        rebinarize = True
    except (TypeError, ValueError):
        rebinarize = False
    return {"preset": callable(getattr(SegmenterConfig, "preset", None)), "rebinarize": rebinarize,
            "protocol": "protocol" in getattr(spec_module, "TOP_KEYS", ())}


# --- timing of the parts ---------------------------------------------------------------------------
@dataclass
class Meter:
    """Seconds and counts spent in wrapped functions, by part name."""

    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def wrap(self, owner, attr: str, part: str, count: Callable[..., int] = lambda *a, **k: 1) -> None:
        """Replace `owner.attr` by a timed version that adds `count(*args)` to the part's count."""
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
                self.counts[part] = self.counts.get(part, 0) + count(*args, **kwargs)
                self.calls[part] = self.calls.get(part, 0) + 1

        setattr(owner, attr, timed)


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its ended child processes."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def _batch_of(pixels, *_args, **_kwargs) -> int:
    return int(pixels.shape[0])


def _images_of(images, *_args, **_kwargs) -> int:
    return len(images)


# --- the data and the study ------------------------------------------------------------------------
#: the shipped study spec of the official search, which (b) runs on the bench's models and images
PAPER_SPEC = "paper_coco"


def search_spec(root: str, blip: str, clip: str, images: int, trials: int, seed: int, image_size: int,
                layers: int, heads: int, official: dict[str, bool]) -> StudySpec:
    """The official search as a study spec on the random models and the written images.

    With every official piece on this checkout: `studies/paper_coco.yaml` as shipped, with the
    models, data root, image count, seed and trial count replaced and the layer and head ranges
    fitted to the model (the same as shipped for base and large). Else the same search written
    out, with today's stand-in for each missing piece.
    """
    if all(official.values()):
        data = read_yaml_file(builtin_spec_path(PAPER_SPEC))
        data["fixed"].update(model=blip, image_size=image_size, layer=min(8, layers - 1), heads=[0])
        data["search_space"]["layer"]["high"] = layers - 1  # the last layer's maps are zero
        data["search_space"]["head"]["high"] = heads - 1
        data["objective_options"]["clip_model"] = clip
        data.update(dataset_options={"root": root}, trials=trials,
                    tuning={"split": "val", "images": images, "seed": seed})
        return parse_spec(data, f"studies/{PAPER_SPEC}.yaml")
    fixed: dict = {"model": blip, "image_size": image_size, "layer": min(8, layers - 1), "heads": [0],
                   "threshold": 0.15, "dropout_rounds": 1, "background": "auto", "candidates": "oracle"}
    if official["preset"]:
        fixed = {"preset": "official", **fixed}
    objective_options: dict = {"clip_model": clip, "mask_source": "threshold"}
    if official["rebinarize"]:
        objective_options["mask_rebinarize"] = "official"
    data = {
        "name": "official-search", "dataset": DATASET, "dataset_options": {"root": root},
        "tuning": {"split": "val", "images": images, "seed": seed}, "eval_split": "val",
        "objective": "clip_reward", "objective_options": objective_options, "fixed": fixed,
        "search_space": {
            "layer": {"type": "int", "low": 1, "high": layers - 1},  # the last layer's maps are zero
            "head": {"type": "int", "low": 0, "high": heads - 1},
            "threshold": {"type": "categorical", "choices": list(THRESHOLDS)},
        },
        "sampler": {"type": "random"}, "pruner": {"type": "none"}, "trials": trials,
    }
    if official["protocol"]:
        data["protocol"] = "paper"
    return parse_spec(data, "the same search written out, with stand-ins")


@dataclass
class Run:
    """One way of running the search: its time, work and per-trial values."""

    wall_s: float
    cpu_s: float  # CPU seconds of the process (all threads): steadier than wall time on a shared machine
    passes: int  # images through a text-encoder forward + backward
    batches: int  # backend calls those passes took
    clip_images: int  # CLIP image embeddings computed (masked crops and black images)
    values: list[float]  # per trial, the mean reward over the images
    parts: dict[str, float]  # seconds by part

    def row(self, trials: int) -> dict:
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2), "model_passes": self.passes,
                "model_batches": self.batches,
                "clip_images": self.clip_images, "s_per_trial": round(self.wall_s / trials, 3),
                "parts_s": {k: round(v, 2) for k, v in self.parts.items()}}


def run_tune(spec: StudySpec, tmp: Path, device: str, profile: str | None,
             workers: int = 0) -> tuple[Run, list[SegmenterConfig]]:
    """(b): the study through StudyRunner, timed from loading the models to the last trial."""
    meter = Meter()
    original = (trial_module.postprocess, clip_module.reward_masks, BlipBackend.gradcam,
                ClipScorer.image_embeddings)
    if not workers:  # in worker processes it runs beside the rest; waiting for it is in "the rest"
        meter.wrap(trial_module, "postprocess", "post-processing")
    meter.wrap(clip_module, "reward_masks", "reward masks")
    meter.wrap(BlipBackend, "gradcam", "BLIP passes", lambda self, pixels, *a, **k: _batch_of(pixels))
    meter.wrap(ClipScorer, "image_embeddings", "CLIP", lambda self, images, *a, **k: _images_of(images))
    profiler = cProfile.Profile() if profile else None
    options = RunOptions(storage=f"sqlite:///{tmp}/study.db", cache_dir=str(tmp / "cache"), device=device,
                         progress=True, batch_size="auto", workers=workers)
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        if profiler:
            profiler.enable()
        runner = StudyRunner(spec, options)
        setup = time.perf_counter() - start
        runner.run()
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - start
        runner.close()  # the post-processing processes end: their CPU time is counted below
        cpu = cpu_seconds() - cpu
    finally:
        (trial_module.postprocess, clip_module.reward_masks, BlipBackend.gradcam,
         ClipScorer.image_embeddings) = original
    if profiler:
        profiler.dump_stats(profile)
    trials = sorted(distinct_trials(runner.study), key=lambda t: t.number)
    configs = [SegmenterConfig.from_dict(t.user_attrs["config"]) for t in trials]
    parts = {"setup (models, images)": setup, **meter.seconds}
    parts["the rest (Optuna, storage, cache)"] = wall - sum(parts.values())
    run = Run(wall, cpu, meter.counts.get("BLIP passes", 0), meter.calls.get("BLIP passes", 0),
              meter.counts.get("CLIP", 0), [float(t.value) for t in trials], parts)
    return run, configs


# --- (a): the reference-style search ---------------------------------------------------------------
class ReferenceSearch:
    """The authors' way: one trial at a time, one image at a time, nothing reused.

    `reference_pass` "full": BLIP forward with parameters requiring grad and a full `backward()`
    (text encoder and ViT), as the official code; "gradcam": the project's own pass
    (`BlipBackend.gradcam`, ViT under inference mode, no parameter gradients), per image and
    trial: a stricter reference that leaves only the reuse to measure.
    """

    def __init__(self, blip: str, clip: str, device: str, reference_pass: str, official: dict[str, bool],
                 meter: Meter) -> None:
        from transformers import BlipForImageTextRetrieval

        self.backend = BlipBackend(blip, device=device, dtype="float32")
        self.reference_pass, self.official = reference_pass, official
        self.model = None
        if reference_pass == "full":  # parameters require grad, eager attention: the original setup
            self.model = BlipForImageTextRetrieval.from_pretrained(blip).eval().to(self.backend.device)
        self.clip = ClipScorer(clip, device=device, dtype="float32")
        self.rebinarize = "official" if official["rebinarize"] else 0.5
        meter.wrap(self, "relevance", "BLIP passes", lambda pixels, *a, **k: _batch_of(pixels))
        meter.wrap(self.clip, "image_embeddings", "CLIP", _images_of)
        meter.wrap(self, "masks", "reward masks")

    def relevance(self, pixels: torch.Tensor, prompt, layer: int, itm_token: str) -> torch.Tensor:
        """Every head's class maps of one image for a caption (a Prompt). # [heads, C, gh, gw]"""
        if self.model is None:
            return self.backend.gradcam(pixels, [prompt], [layer], itm_token=itm_token)[0][0]
        tokens, weights = self.backend._tokenize([prompt])  # ids and [1, C, T] piece averages
        tokens["input_ids"] = self.backend._swap_first(tokens["input_ids"], itm_token)  # [ENC] if asked
        attention = self.model.text_encoder.encoder.layer[layer - 1].crossattention.self
        kept = {}

        def keep(_module, _inputs, output):
            output[1].retain_grad()
            kept["probs"] = output[1]  # [1, heads, T, 1 + gh*gw]

        hook = attention.register_forward_hook(keep)
        try:
            self.model.zero_grad(set_to_none=True)
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                             pixel_values=pixels, interpolate_pos_encoding=pixels.shape[-1] != self.native)
            out.itm_score[:, 1].sum().backward()
        finally:
            hook.remove()
        probs = kept["probs"]
        cam = (probs * probs.grad.clamp(min=0))[0, :, :, 1:].detach()  # [heads, T, gh*gw]
        side = pixels.shape[-1] // self.backend._patch
        maps = torch.einsum("ct,htn->hcn", weights[0], cam)  # [heads, C, gh*gw]
        return maps.reshape(maps.shape[0], maps.shape[1], side, side)

    @property
    def native(self) -> int:
        return self.backend._native_size

    def masks(self, maps: np.ndarray, threshold: float) -> torch.Tensor:
        return reward_masks(maps, threshold, self.clip.input_size, rebinarize=self.rebinarize,
                            device=self.clip.device)

    def reward(self, image: np.ndarray, names: Sequence[str], maps: np.ndarray, threshold: float) -> float:
        """The classes whose masked crop CLIP names more confidently than the black image."""
        size = self.clip.input_size
        masks = self.masks(maps, threshold)  # [K, S, S]
        picture = _image_tensor(image, size, self.clip.device)  # [3, S, S] in [0, 1]
        crops = torch.cat([picture[None] * masks[:, None], picture.new_zeros(1, 3, size, size)])
        embeds = self.clip.image_embeddings(crops)  # [K + 1, D]: the crops, then the black image
        self.clip._text_cache.clear()  # the names embedded again, as the original does
        probs = (PAPER_LOGIT_SCALE * embeds @ self.clip.text_embeddings(names).T).softmax(-1)  # [K + 1, K]
        k = torch.arange(len(names))
        return float((probs[k, k] > probs[-1, k]).sum())

    def trial(self, config: SegmenterConfig, samples, vocabulary: Sequence[str]) -> float:
        """The mean reward of `config` over the samples."""
        scores = []
        for sample in samples:
            names = [n for n in vocabulary if n in set(sample.image_classes)]  # the oracle's order
            caption = list(vocabulary) if self.official["protocol"] else names
            pixels = self.backend.prepare_images([sample.image], config.image_size)
            prompt = prompt_for(config, caption)  # the config's spelling of the names
            maps = self.relevance(pixels, prompt, config.layer, config.itm_token)  # [heads, C, gh, gw]
            rows = [caption.index(n) for n in names]
            maps = maps[list(config.heads)].mean(0)[rows].float().cpu().numpy()  # [K, gh, gw]
            scores.append(self.reward(sample.image, names, maps, config.threshold))
        return float(np.mean(scores))


def run_reference(configs: Sequence[SegmenterConfig], blip: str, clip: str, root: str, ids: Sequence[str],
                  device: str, reference_pass: str, official: dict[str, bool]) -> Run:
    """(a): the same configs on the same images, timed from loading the models to the last trial."""
    meter = Meter()
    start, cpu = time.perf_counter(), cpu_seconds()
    search = ReferenceSearch(blip, clip, device, reference_pass, official, meter)
    dataset = load_dataset(DATASET, root=root)
    setup = time.perf_counter() - start
    values = []
    for t, config in enumerate(configs):
        samples = [dataset.load("val", i) for i in ids]  # read again every trial
        values.append(search.trial(config, samples, dataset.vocabulary))
        print(f"\r  (a) reference-style: trial {t + 1}/{len(configs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    parts = {"setup (models)": setup, "BLIP passes": meter.seconds.get("BLIP passes", 0.0),
             "CLIP": meter.seconds.get("CLIP", 0.0), "reward masks": meter.seconds.get("reward masks", 0.0)}
    parts["the rest (reading, resizing)"] = wall - sum(parts.values())
    return Run(wall, cpu, meter.counts.get("BLIP passes", 0), meter.calls.get("BLIP passes", 0),
               meter.counts.get("CLIP", 0), values, parts)


# --- the whole benchmark ---------------------------------------------------------------------------
def measure_search(images: int = 1, trials: int = TRIALS, device: str = "cpu", size: str | None = None,
                   seed: int = 0, reference_pass: str = "full", stand_in: bool = False,
                   image_size: int | None = None, profile: str | None = None, workers: int = 0) -> dict:
    """Run (b) then (a) on the same images and configs; the result as a dict (see `print_search`)."""
    quiet_libraries()
    device = str(resolve_device(device))
    size = size or SIZE_BY_DEVICE.get(device.split(":")[0], "base")
    official = {k: (v and not stand_in) for k, v in official_pieces().items()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        blip = save_random_blip(size, str(tmp / "blip"))
        clip = save_random_clip(size, str(tmp / "clip"))
        native = BLIP_SIZES[size]["image"]
        side = image_size or (336 if size != "tiny" else native)  # the official search's 336 px
        root = str(write_coco_layout(tmp / "coco", images, seed, splits=("val",), size=native))
        text = BLIP_SIZES[size]["text"]
        spec = search_spec(root, blip, clip, images, trials, seed, side, text[0], text[1], official)
        tune, configs = run_tune(spec, tmp, device, profile, workers)
        ids = load_dataset(DATASET, root=root).ids("val")[:images]
        reference = run_reference(configs, blip, clip, root, ids, device, reference_pass, official)
    done = len(configs)
    diffs = np.abs(np.asarray(tune.values) - np.asarray(reference.values))
    best_a, best_b = int(np.argmax(reference.values)), int(np.argmax(tune.values))
    return {
        "bench": "search", "spec": spec.source, "device": device, "threads": torch.get_num_threads(),
        "size": size,
        "blip": f"BLIP-{size} ({BLIP_SIZES[size]['image']} px native, searched at {side} px)",
        "clip": f"CLIP-{size} ({CLIP_SIZES[size]['image']} px, patch {CLIP_SIZES[size]['patch']})",
        "images": images, "trials": done, "seed": seed, "reference_pass": reference_pass, "workers": workers,
        "official_pieces": official, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "configs": [{"layer": c.layer, "head": c.heads[0], "threshold": c.threshold} for c in configs],
        "a_reference": reference.row(done), "b_tune_run": tune.row(done),
        "ratio_wall": round(reference.wall_s / tune.wall_s, 2),
        "ratio_cpu": round(reference.cpu_s / tune.cpu_s, 2),
        "ratio_passes": round(reference.passes / max(tune.passes, 1), 2),
        "ratio_clip_images": round(reference.clip_images / max(tune.clip_images, 1), 2),
        "same_values": int(np.sum(diffs <= 1e-9)),
        "max_value_diff": float(diffs.max()) if diffs.size else 0.0,
        "same_best": best_a == best_b,
        "values_a": reference.values, "values_b": tune.values,
    }


def print_search(result: dict) -> None:
    missing = [k for k, v in result["official_pieces"].items() if not v]
    stand_in = {"preset": "the default config, not the official preset",
                "rebinarize": "reward masks re-binarised at 0.5, not the official rule",
                "protocol": "caption and softmax over the ground-truth classes, not the whole vocabulary"}
    print(f"\nthe official search ({result['spec']}): {result['trials']} trials x {result['images']} "
          f"images ({DATASET} vocabulary), {result['blip']}, {result['clip']}, random weights, "
          f"{result['device']}, torch threads {result['threads']}")
    for key in missing:
        print(f"  STAND-IN: {stand_in[key]}")
    head = f"{'':<22}{'wall s':>9}{'CPU s':>9}{'model passes':>14}{'CLIP images':>13}{'s/trial':>9}"
    print(head)
    print("-" * len(head))
    for label, key in (("(a) reference-style", "a_reference"), ("(b) tune run", "b_tune_run")):
        row = result[key]
        print(f"{label:<22}{row['wall_s']:>9.1f}{row['cpu_s']:>9.1f}{row['model_passes']:>14}"
              f"{row['clip_images']:>13}{row['s_per_trial']:>9.2f}")
    ratios = [result[k] for k in ("ratio_wall", "ratio_cpu", "ratio_passes", "ratio_clip_images",
                                  "ratio_wall")]
    print(f"{'ratio a/b':<22}" + "".join(f"{'x' + str(r):>{w}}" for r, w in zip(ratios, (9, 9, 14, 13, 9))))
    print(f"(a) one image at a time, BLIP pass '{result['reference_pass']}'; (b) "
          f"{result['b_tune_run']['model_batches']} BLIP calls (batches of up to 8 images), "
          f"{result['workers']} post-processing workers")
    print(f"same trial values: {result['same_values']}/{result['trials']} (max |diff| "
          f"{result['max_value_diff']:.3g}); same best config: {result['same_best']}")
    for label, key in (("(a)", "a_reference"), ("(b)", "b_tune_run")):
        row = result[key]
        parts = ", ".join(f"{name} {sec:.1f} s ({100 * sec / row['wall_s']:.0f}%)"
                          for name, sec in row["parts_s"].items())
        print(f"where {label}'s time goes: {parts}")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1, help="COCO-style images searched on (default 1)")
    parser.add_argument("--trials", type=int, default=TRIALS, help=f"distinct configs (default {TRIALS})")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="cpu (default), cuda, auto")
    parser.add_argument("--size", choices=list(BLIP_SIZES),
                        help="model sizes (default: base on CPU, large on CUDA)")
    parser.add_argument("--image-size", type=int, help="BLIP input side searched at, a multiple of 16 "
                        "(default 336)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="study seed: images and sampler")
    parser.add_argument("--reference-pass", choices=REFERENCE_PASSES, default="full",
                        help="(a)'s BLIP pass: full forward+backward (default) or the project's gradcam")
    parser.add_argument("--stand-in", action="store_true",
                        help="use today's stand-ins even where the official pieces exist")
    parser.add_argument("--workers", type=int, default=0,
                        help="(b)'s post-processing processes, as `tune run --workers` (default 0: none)")
    parser.add_argument("--profile", metavar="PATH", help="write cProfile statistics of (b) to PATH")
    parser.add_argument("--json", metavar="PATH", help="also write the result to PATH")
    args = parser.parse_args(argv)
    if args.image_size is not None and (args.image_size < 16 or args.image_size % 16):
        parser.error(f"--image-size {args.image_size}: give a multiple of the models' 16-pixel patch, "
                     "e.g. 336")
    if args.images < 1 or args.trials < 1 or args.threads < 1:
        parser.error("--images, --trials and --threads must be at least 1")
    if args.images < 1 or args.trials < 1 or args.threads < 1 or args.workers < 0:
        parser.error("--images, --trials and --threads must be >= 1, --workers >= 0")
    torch.set_num_threads(args.threads)
    result = measure_search(args.images, args.trials, args.device, args.size, args.seed, args.reference_pass,
                            args.stand_in, args.image_size, args.profile, args.workers)
    print_search(result)
    if args.profile:
        print(f"\ncProfile of (b), top 15 by cumulative time (all in {args.profile}):")
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(15)
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
