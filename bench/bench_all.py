"""The whole benchmark in one run: map extraction, trial cost, CLIP reward throughput.

    python bench/bench_all.py                           # tiny random models: a minute, smoke test
    python bench/bench_all.py --size large --json bench-large.json   # BLIP-large + CLIP-L/14-336
    python bench/bench_all.py --size large --device cuda --image-size 336 --batch-size auto

Models are randomly initialised at the published shapes (bench/_models.py): on CPU the ratios
are what count; on a GPU the images/s are real. Sections:

1. extraction: per-image GradCAM maps with Salience Dropout, our path vs the reference-style
   path (full forward and full backward through the ViT every round, one image at a time),
   with how far their maps differ. Target: >= 3x. Then the maps of every head of one layer
   (one round), as a head search needs them: ours from one pass, the reference-style path
   with a pass per head (no reuse across heads).
2. trials: a short study on shapes-world images with a cold map cache vs the warm one, then one
   uncached trial vs one post-processing-only trial (maps cached, new threshold), with and
   without the CLIP objective. Target: post-processing-only >= 20x cheaper.
3. clip: CLIP image embeddings per second (what the CLIP reward spends its time on).

Prints the three tables, a summary of ratios against the targets, and one JSON line (also
written to --json).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _models import BLIP_SIZES, CLIP_SIZES, save_random_blip, save_random_clip
from bench_extraction import ExtractionBench, print_extraction, print_head_sweep, sync
from bench_trials import measure_trials, print_trials

from segmenter.backends.blip import resolve_device
from segmenter.clip import ClipScorer
from tuner.spec import parse_spec

TARGETS = {"extraction_speedup": 3.0, "postprocess_only_speedup": 20.0}


def measure_clip(path: str, images: int, device: str) -> dict:
    """Image embeddings per second of a CLIP at its own input size, batches of 32."""
    scorer = ClipScorer(path, device=device)
    size = scorer.input_size
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)]
    scorer.image_embeddings(crops[:2])  # warm-up
    sync(scorer.device)
    start = time.perf_counter()
    scorer.image_embeddings(crops)
    sync(scorer.device)
    seconds = time.perf_counter() - start
    return {"bench": "clip", "images": images, "input_size": size, "device": str(scorer.device),
            "dtype": str(scorer.dtype), "images_per_s": round(images / seconds, 2)}


def trial_spec(blip: str, clip: str, size: str):
    """A shapes-world study over the random models: one dropout round, layer/head/threshold searched."""
    layers = BLIP_SIZES[size]["text"][0]
    heads = BLIP_SIZES[size]["text"][1]
    return parse_spec({
        "dataset": "shapes",
        # photo-sized images for real models, so the CRF costs what it costs on COCO or VOC
        "dataset_options": {"size": 64 if size == "tiny" else 480},
        "tuning": {"split": "train", "images": 4, "seed": 0},
        "objective": "clip_reward",
        "objective_options": {"clip_model": clip},
        "fixed": {"model": blip, "image_size": BLIP_SIZES[size]["image"], "layer": max(1, layers - 4),
                  "heads": [0], "threshold": 0.15, "dropout_rounds": 1, "background": "always"},
        "search_space": {
            "layer": {"type": "int", "low": max(1, layers - 5), "high": layers - 1},
            "head": {"type": "int", "low": 0, "high": heads - 1},
            "threshold": {"type": "float", "low": 0.05, "high": 0.45, "step": 0.1},
        },
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "trials": 4,
        "name": f"bench-{size}",
    }, source="<bench>")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--rounds", type=int, default=4, help="Salience Dropout rounds (extraction)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="extraction input size (default: the model's, 384 for BLIP-large)")
    parser.add_argument("--batch-size", default="8", help="extraction batch: a number or auto")
    parser.add_argument("--extract-images", type=int, default=None, help="default: 8 (2 for large)")
    parser.add_argument("--trial-images", type=int, default=None, help="default: 16 (2 for large)")
    parser.add_argument("--trials", type=int, default=None, help="study trials (default: 6, 3 for large)")
    parser.add_argument("--clip-images", type=int, default=None, help="default: 64 (8 for large)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = str(resolve_device(args.device))
    small = args.size == "tiny" or device == "cuda"
    results: dict = {"machine": platform.node(), "python": platform.python_version(),
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    with tempfile.TemporaryDirectory() as tmp:
        blip, clip = save_random_blip(args.size, f"{tmp}/blip"), save_random_clip(args.size, f"{tmp}/clip")
        images = args.extract_images or (8 if small else 2)
        extraction = ExtractionBench(blip, args.size, device, args.image_size, images)
        results["extraction"] = extraction.extraction(images, args.rounds, args.batch_size)
        print_extraction(results["extraction"])
        results["head_sweep"] = extraction.head_sweep(2 if small else 1)
        print_head_sweep(results["head_sweep"])
        del extraction  # its two models
        print()
        results["trials"] = measure_trials(
            trial_spec(blip, clip, args.size), args.trials or (6 if small else 3),
            args.trial_images or (16 if small else 2), device)
        print_trials(results["trials"])
        print()
        results["clip"] = measure_clip(clip, args.clip_images or (64 if small else 8), device)
        print(f"{'clip (' + args.size + ', ' + str(CLIP_SIZES[args.size]['image']) + ' px)':<36}"
              f"{results['clip']['images_per_s']:>10} images/s")

    extraction, trials = results["extraction"]["speedup"], results["trials"]["postprocess_only_speedup"]
    steps = results["trials"]["postprocess_steps_5_10_speedup"]
    steps_conv = results["trials"]["postprocess_steps_5_10_conv_crf_speedup"]
    results["summary"] = {
        "extraction_speedup": extraction,
        "head_sweep_speedup": results["head_sweep"]["speedup"],
        "postprocess_only_speedup": trials,
        "postprocess_steps_5_10_speedup": steps,
        "postprocess_steps_5_10_conv_crf_speedup": steps_conv,
        "targets": TARGETS,
        "extraction_target_met": extraction >= TARGETS["extraction_speedup"],
        "postprocess_target_met": trials >= TARGETS["postprocess_only_speedup"],
        "postprocess_steps_target_met": {
            "dense_crf": steps >= TARGETS["postprocess_only_speedup"],
            "conv_crf": steps_conv >= TARGETS["postprocess_only_speedup"],
        },
    }
    print()
    print(f"extraction: ours x{extraction} faster than reference-style "
          f"(target x{TARGETS['extraction_speedup']:.0f}); "
          f"every head of a layer x{results['head_sweep']['speedup']}")
    print(f"post-processing-only trial: x{trials} cheaper than uncached, objective included "
          f"(target x{TARGETS['postprocess_only_speedup']:.0f}); steps 5-10 alone x{steps} with the "
          f"dense CRF, x{steps_conv} with crf_backend conv and the torch blur")
    line = json.dumps(results)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
