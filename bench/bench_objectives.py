"""How well each label-free objective ranks configs the way mIoU does, on shapes worlds.

    python bench/bench_objectives.py                                 # the bundled worlds
    python bench/bench_objectives.py --world /work/worlds/w1 --world /work/worlds/w2 --json out.json
    python bench/bench_objectives.py --fast                          # a smoke run (the test's)

A world is a directory with `blip/` and `clip/` (a BLIP ITM and a CLIP trained on the shapes
world, as `tools/train_shapes_models.py --out DIR` writes them); `--world planted` and
`--world unplanted` name the bundled ones. For each world the same fixed, seeded set of configs
(`--configs`, default 64) over layer, head, threshold, Salience Dropout, blur, CRF and the
background rule is segmented on held-out images (the test split, never seen in training or
tuning) and scored by every objective. Per objective it prints Spearman, Kendall and the
objective-weighted tau between the objective's mean and the dataset mIoU across configs, the
regret of its pick (mIoU points lost against the best config), how many configs tie at its top
value, and bootstrap 95% intervals over images (the images are resampled, every statistic
recomputed), and "blind" pairs: configs with the same objective value whose mIoU differs by more
than 5 points. Maps go through a map cache, so the configs cost one model pass per (image,
layer, dropout setting). Ends with one JSON line (and `--json FILE`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from objectives import ScoreInput, confusion_matrix, get_objective, num_label_classes, to_class_ids  # noqa: E402
from segmenter import SegmenterConfig, load_backend, postprocess  # noqa: E402
from segmenter.backends import resolve_model_path  # noqa: E402
from segmenter.clip import ClipScorer  # noqa: E402
from segmenter.images import image_digest  # noqa: E402
from tuner._audit_stats import bootstrap, counts_from_confusion, miou_from_counts, order_desc, rank_agreement  # noqa: E402
from tuner.cache import MapCache  # noqa: E402
from tuner.datasets.shapes import ShapesDataset  # noqa: E402
from tuner.trial import CandidatePicker, MapProvider, TuningImage, view_label_maps  # noqa: E402

BUNDLED = {
    "planted": "pkg://tuner.datasets/shapes_models",
    "unplanted": "pkg://tuner.datasets/shapes_models_unplanted",
}
THRESHOLDS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55)
DROPOUT = ((1, 10), (2, 10), (3, 5))  # (rounds, k)
BLUR = (0.0, 0.02, 0.05, 0.1)
#: objectives scored by default: (label, registered name, options)
OBJECTIVES = (
    ("clip_reward[threshold]", "clip_reward", {"mask_source": "threshold"}),
    ("clip_reward", "clip_reward", {}),
    ("clip_reward[official]", "clip_reward", {"mask_source": "threshold", "mask_rebinarize": "official"}),
    ("clip_margin[threshold]", "clip_margin", {"mask_source": "threshold"}),
    ("clip_margin[official]", "clip_margin", {"mask_source": "threshold", "mask_rebinarize": "official"}),
    ("clip_margin", "clip_margin", {}),
    ("clip_contrastive", "clip_contrastive", {}),
    ("itm_match", "itm_match", {}),
    ("region_agreement", "region_agreement", {}),
    ("flip_consistency", "flip_consistency", {}),
    ("patch_coherence", "patch_coherence", {}),
    ("miou_supervised (oracle)", "miou_supervised", {}),  # reads the labels: the bench's sanity row
)
#: combinations scored by default: label -> parts
COMBINATIONS = {
    "itm+region": {"itm_match": 1.0, "region_agreement": 1.0},
    "itm+flip": {"itm_match": 1.0, "flip_consistency": 0.5},
    "margin+itm": {"clip_margin": 1.0, "itm_match": 1.0},
    "coherence+margin": {"patch_coherence": 1.0, "clip_margin": 1.0},
    "coherence+itm": {"patch_coherence": 1.0, "itm_match": 1.0},
}


@dataclass
class WorldResult:
    name: str
    configs: list[dict]
    miou: np.ndarray  # [T]
    counts: np.ndarray  # [T, n, 3, K]
    scores: dict[str, np.ndarray]  # objective label -> [T, n]
    seconds: float
    model_runs: int


def world_dir(world: str) -> str:
    """A world directory from a path or a bundled world's name."""
    path = resolve_model_path(BUNDLED.get(world, world))
    for part in ("blip", "clip"):
        if not (Path(path) / part / "config.json").is_file():
            raise SystemExit(f"error: {world!r} is not a world directory: no {part}/config.json in {path}")
    return path


def config_set(base: SegmenterConfig, layers: int, heads: int, count: int,
               seed: int) -> list[SegmenterConfig]:
    """`count` distinct configs drawn (seeded) over the searched settings; layer < the last layer."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    for _ in range(count * 50):
        rounds, k = DROPOUT[rng.integers(len(DROPOUT))]
        values = dict(
            layer=int(rng.integers(1, layers)), heads=(int(rng.integers(heads)),),
            threshold=float(THRESHOLDS[rng.integers(len(THRESHOLDS))]),
            dropout_rounds=int(rounds), dropout_k=int(k),
            blur_sigma=float(BLUR[rng.integers(len(BLUR))]), crf=bool(rng.integers(2)),
            background=("always", "auto")[int(rng.integers(2))],
        )
        key = tuple(sorted(values.items()))
        if key not in seen:
            seen.add(key)
            out.append(base.replace(**values))
        if len(out) == count:
            break
    return out


def build_objectives(backend, clip: ClipScorer, names: Sequence[str] | None, combos: dict) -> dict:
    out = {}
    for label, name, options in OBJECTIVES:
        if names and label not in names:
            continue
        extra = {"clip": clip} if name.startswith("clip_") else {}
        out[label] = get_objective(name, device=str(backend.device), backend=backend, **options, **extra)
        if out[label].labels != "none":  # only the oracle row may read labels
            assert label.endswith("(oracle)"), label
    for parts in combos.values():  # a combination's parts are scored on their own (see combine)
        for name in parts:
            if name not in out:
                extra = {"clip": clip} if name.startswith("clip_") else {}
                out[name] = get_objective(name, device=str(backend.device), backend=backend, **extra)
    return out


def combine(scores: dict[str, np.ndarray], combos: dict) -> dict[str, np.ndarray]:
    """Each combination's per-image scores: the weighted sum of its parts' (what `combination` does)."""
    return {label: sum(weight * scores[name] for name, weight in parts.items())
            for label, parts in combos.items()}


def score_world(world: str, n_configs: int, n_images: int, seed: int, cache_dir: str,
                names: Sequence[str] | None = None, combos: dict | None = None,
                progress: bool = True) -> WorldResult:
    """Segment the world's held-out images under the config set; every objective's per-image score."""
    root = world_dir(world)
    start = time.perf_counter()
    backend = load_backend("blip", str(Path(root) / "blip"), device="cpu")
    clip = ClipScorer(str(Path(root) / "clip"), device="cpu")
    dataset = ShapesDataset()
    ids = dataset.ids("test")[:n_images]
    images = [TuningImage(s, image_digest(s.image)) for s in (dataset.load("test", i) for i in ids)]
    text = backend.model.config.text_config
    base = SegmenterConfig(model=str(Path(root) / "blip"), image_size=64, candidates="itm_threshold",
                           candidates_threshold=0.5, crf_iterations=5)
    configs = config_set(base, text.num_hidden_layers, text.num_attention_heads, n_configs, seed)
    objectives = build_objectives(backend, clip, names, COMBINATIONS if combos is None else combos)
    views = tuple(dict.fromkeys(v for o in objectives.values() for v in o.views))
    provider = MapProvider(backend, MapCache(cache_dir), batch_size=16)
    picker = CandidatePicker(dataset.vocabulary, backend, clip)
    k = num_label_classes(dataset.class_names)
    counts = np.zeros((len(configs), len(images), 3, k), dtype=np.int64)
    scores = {label: np.zeros((len(configs), len(images))) for label in objectives}
    for t, config in enumerate(configs):
        cands = [picker(config, im) for im in images]
        maps = provider.maps(config, images, cands)
        seen = view_label_maps(views, config, images, cands, provider) if views else [None] * len(images)
        items = []
        for i, (im, names_i, m) in enumerate(zip(images, cands, maps)):
            label_map = postprocess(im.sample.image, m, config)
            pred = to_class_ids(label_map, names_i, dataset.class_names)
            cm = confusion_matrix(pred, im.sample.labels, k, dataset.ignore_index)
            counts[t, i] = counts_from_confusion(cm)
            items.append(ScoreInput(image=im.sample.image, class_names=tuple(names_i), maps=m,
                                    label_map=label_map, threshold=config.threshold,
                                    vocabulary=dataset.vocabulary, label_names=dataset.class_names,
                                    image_digest=im.digest, views=seen[i], labels=im.sample.labels))
        for label, objective in objectives.items():
            scores[label][t] = objective.score(items)
        if progress:
            print(f"\r  {Path(root).name}: config {t + 1}/{len(configs)}", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    combos = COMBINATIONS if combos is None else combos
    scores = {**{k: v for k, v in scores.items() if names is None or k in names}, **combine(scores, combos)}
    miou = miou_from_counts(counts.sum(axis=1))
    return WorldResult(Path(root).name if world not in BUNDLED else world,
                       [_describe(c) for c in configs], miou, counts, scores,
                       time.perf_counter() - start, provider.model_runs)


def _describe(config: SegmenterConfig) -> dict:
    return {k: getattr(config, k) for k in ("layer", "heads", "threshold", "dropout_rounds", "dropout_k",
                                            "blur_sigma", "crf", "background")}


def tied_at_top(values: np.ndarray, rel: float = 1e-9) -> int:
    """How many configs share the highest value (within a relative 1e-9)."""
    top = values.max()
    return int(np.sum(np.abs(values - top) <= rel * max(abs(top), 1e-12)))


def summarise(result: WorldResult, replicates: int, seed: int) -> dict:
    rows = {}
    for label, per_image in result.scores.items():
        value = per_image.mean(axis=1)
        agreement = rank_agreement(value, result.miou)
        pick = int(order_desc(value)[0])
        tied = tied_at_top(value)
        top = np.flatnonzero(np.abs(value - value.max()) <= 1e-9 * max(abs(value.max()), 1e-12))
        boot = bootstrap(per_image, result.counts, joint=True, replicates=replicates, seed=seed)
        i, j = np.triu_indices(value.size, k=1)
        same = np.abs(value[i] - value[j]) <= 1e-9 * np.maximum(np.abs(value[i]), 1e-12)
        blind = int(np.sum(same & (np.abs(result.miou[i] - result.miou[j]) > 0.05)))
        rows[label] = {
            "spearman": agreement["spearman"]["value"], "kendall": agreement["kendall"]["value"],
            "weighted_tau": agreement["weighted_tau"]["value"],
            "regret_points": 100 * float(result.miou.max() - result.miou[pick]),
            "pick": result.configs[pick], "pick_miou": float(result.miou[pick]),
            "tied_at_top": tied,
            # pairs of configs with one objective value whose mIoU differs by more than 5 points
            "blind_pairs": blind,
            "tied_miou_spread_points": 100 * float(np.ptp(result.miou[top])) if tied > 1 else 0.0,
            "ci95": {key: boot[key]["ci95"] for key in ("spearman", "kendall", "weighted_tau", "regret")},
        }
        if rows[label]["ci95"]["regret"] is not None:
            rows[label]["ci95"]["regret_points"] = [100 * v for v in rows[label]["ci95"].pop("regret")]
        else:
            rows[label]["ci95"]["regret_points"] = rows[label]["ci95"].pop("regret")
    return {
        "world": result.name, "configs": len(result.configs), "images": int(result.counts.shape[1]),
        "best_miou": float(result.miou.max()), "median_miou": float(np.median(result.miou)),
        "seconds": round(result.seconds, 1), "model_batches": result.model_runs, "objectives": rows,
    }


def _ci(pair, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if pair is None else f"[{pair[0] * scale:.{digits}f}, {pair[1] * scale:.{digits}f}]"


def print_table(summary: dict) -> None:
    print(f"\nworld {summary['world']}: {summary['configs']} configs x {summary['images']} held-out images, "
          f"best mIoU {summary['best_miou']:.3f}, median {summary['median_miou']:.3f}, "
          f"{summary['seconds']} s, {summary['model_batches']} model batches")
    header = f"{'objective':<24} {'Spearman':>8} {'95% CI':>15} {'Kendall':>8} {'w-tau':>6} " \
             f"{'regret':>7} {'95% CI':>15} {'tied':>5} {'blind':>5}"
    print(header)
    print("-" * len(header))
    for label, row in summary["objectives"].items():
        ci = row["ci95"]
        print(f"{label:<24} {row['spearman']:>8.3f} {_ci(ci['spearman']):>15} {row['kendall']:>8.3f} "
              f"{row['weighted_tau']:>6.3f} {row['regret_points']:>7.1f} "
              f"{_ci(ci['regret_points'], digits=1):>15} {row['tied_at_top']:>5} {row['blind_pairs']:>5}")


def print_across(worlds: list[dict]) -> None:
    """One row per objective: Spearman / regret (mIoU points) / blind pairs in each world, and means."""
    labels = list(dict.fromkeys(k for w in worlds for k in w["objectives"]))
    names = [w["world"] for w in worlds]
    best = ", ".join(f"{w['world']} {w['best_miou']:.3f}" for w in worlds)
    print(f"\nacross worlds: Spearman / regret in mIoU points (blind pairs) per world; best mIoU {best}")
    print(f"{'objective':<24} " + " ".join(f"{n[:22]:>22}" for n in names) + f" {'mean':>14}")
    for label in labels:
        cells, rhos, regrets = [], [], []
        for w in worlds:
            row = w["objectives"].get(label)
            if row is None:
                cells.append(f"{'-':>22}")
                continue
            rhos.append(row["spearman"])
            regrets.append(row["regret_points"])
            blind = row.get("blind_pairs", "-")
            cell = f"{row['spearman']:>6.2f} / {row['regret_points']:>5.1f} ({blind:>2})"
            cells.append(cell.rjust(22))
        mean = f"{np.mean(rhos):.2f} / {np.mean(regrets):.1f}" if rhos else "-"
        print(f"{label:<24} " + " ".join(cells) + f" {mean:>14}")


def parse_combination(text: str) -> tuple[str, dict[str, float]]:
    """'label=name:w,name:w' or 'name:w,name:w' -> (label, parts)."""
    label, _, body = text.rpartition("=")
    parts = {}
    for piece in body.split(","):
        name, _, weight = piece.partition(":")
        parts[name.strip()] = float(weight or 1.0)
    return label or "+".join(parts), parts


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", action="append", help="world directory or bundled name (repeatable)")
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=500, help="bootstrap replicates")
    parser.add_argument("--objectives", help="comma-separated labels to score (default: all)")
    parser.add_argument("--combination", action="append",
                        help="a combination to score, 'label=name:weight,name:weight' (repeatable; "
                             "replaces the default ones)")
    parser.add_argument("--cache-dir", help="map cache (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (stated in the output)")
    parser.add_argument("--fast", action="store_true", help="8 configs x 6 images, 50 replicates")
    parser.add_argument("--summarise", nargs="+", metavar="JSON",
                        help="print the across-worlds table of earlier runs' JSON files, and stop")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--save-scores", metavar="DIR",
                        help="write each world's per-image scores and counts (npz) for later analysis")
    args = parser.parse_args(argv)
    if args.summarise:
        worlds = [w for f in args.summarise for w in json.loads(Path(f).read_text())["worlds"]]
        print_across(worlds)
        return {"worlds": worlds}
    if args.fast:
        args.configs, args.images, args.bootstrap = 8, 6, 50
    if args.configs < 2 or args.images < 1:
        parser.error("--configs must be >= 2 and --images >= 1")
    torch.set_num_threads(args.threads)
    combos = None if not args.combination else dict(parse_combination(c) for c in args.combination)
    names = [n.strip() for n in args.objectives.split(",")] if args.objectives else None
    worlds = args.world or [w for w in BUNDLED if Path(resolve_model_path(BUNDLED[w])).is_dir()]
    print(f"bench_objectives: torch threads {args.threads}, seed {args.seed}, "
          f"{args.configs} configs, {args.images} images, {args.bootstrap} bootstrap replicates")
    out = {"threads": args.threads, "seed": args.seed, "worlds": []}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            result = score_world(world, args.configs, args.images, args.seed, args.cache_dir or tmp,
                                 names, combos)
            summary = summarise(result, args.bootstrap, args.seed)
            if args.save_scores:
                Path(args.save_scores).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(Path(args.save_scores) / f"{result.name}.npz", counts=result.counts,
                                    miou=result.miou, configs=json.dumps(result.configs),
                                    **{f"score:{k}": v for k, v in result.scores.items()})
            print_table(summary)
            out["worlds"].append(summary)
    if len(out["worlds"]) > 1:
        print_across(out["worlds"])
    line = json.dumps(out)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return out


if __name__ == "__main__":
    main()
