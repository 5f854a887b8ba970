"""Trials per minute with a cold map cache vs a warm one, and the cost of a post-processing-only trial.

    python bench/bench_trials.py                       # studies/shapes.yaml, bundled models, CPU
    python bench/bench_trials.py --trials 8 --images 16 --study-file studies/shapes.yaml

Cold: a new study with an empty cache (every trial that changes layer or dropout runs the model).
Warm: the same seed, so the same trials, on the filled cache: no model runs at all. The same
configs give the same values either way (checked). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tuner.cache import MapCache
from tuner.spec import builtin_spec_path, load_spec
from tuner.study import RunOptions, StudyRunner, quiet_libraries


def timed_study(spec, tmp: Path, name: str, cache: Path | None, device: str | None):
    """Run a study to its trial count; (seconds, runner)."""
    options = RunOptions(storage=f"sqlite:///{tmp}/bench.db", study_name=name, device=device,
                         cache_dir=str(cache) if cache else None, progress=False)
    runner = StudyRunner(spec, options)
    start = time.perf_counter()
    runner.run()
    return time.perf_counter() - start, runner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study-file", default=None, help="default: the shipped shapes study")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    quiet_libraries()
    spec = load_spec(args.study_file or builtin_spec_path("shapes"))
    spec = spec.replace(trials=args.trials, tuning_images=args.images, pruner={"type": "none"})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cold_s, cold = timed_study(spec, tmp, "cold", tmp / "cache", args.device)
        warm_s, warm = timed_study(spec, tmp, "warm", tmp / "cache", args.device)
        same = [t.value for t in cold.study.trials] == [t.value for t in warm.study.trials]
        # one trial that runs the model vs one that only post-processes cached maps
        config = spec.fixed
        start = time.perf_counter()
        cold.runner.provider.cache = MapCache(None)  # no cache: the model runs
        cold.runner.evaluate(config)
        uncached_s = time.perf_counter() - start
        warm.runner.evaluate(config)  # fill the cache for this config
        start = time.perf_counter()
        warm.runner.evaluate(config.replace(threshold=min(1.0, config.threshold + 0.1)))
        post_s = time.perf_counter() - start
    result = {
        "bench": "trials", "trials": args.trials, "images": args.images,
        "device": str(cold.backend.device), "model": spec.fixed.model,
        "cold_trials_per_min": round(60 * args.trials / cold_s, 2),
        "warm_trials_per_min": round(60 * args.trials / warm_s, 2),
        "warm_over_cold": round(cold_s / warm_s, 2), "same_values": same,
        "model_runs_cold": cold.provider.model_runs, "model_runs_warm": warm.provider.model_runs,
        "uncached_trial_s": round(uncached_s, 3), "postprocess_only_trial_s": round(post_s, 3),
        "postprocess_only_speedup": round(uncached_s / post_s, 2),
    }
    print(f"{'':<28}{'value':>10}")
    print(f"{'cold cache trials/min':<28}{result['cold_trials_per_min']:>10}")
    print(f"{'warm cache trials/min':<28}{result['warm_trials_per_min']:>10}   x{result['warm_over_cold']}")
    print(f"{'uncached trial (s)':<28}{result['uncached_trial_s']:>10}")
    print(f"{'post-processing-only (s)':<28}{result['postprocess_only_trial_s']:>10}"
          f"   x{result['postprocess_only_speedup']} cheaper")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
