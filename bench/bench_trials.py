"""Trial cost: a cold map cache vs a warm one, and a post-processing-only trial vs an uncached one.

    python bench/bench_trials.py                       # studies/shapes.yaml, bundled models, CPU
    python bench/bench_trials.py --trials 8 --images 16 --study-file studies/shapes.yaml

Cold: a new study with an empty cache (every trial that changes layer or dropout runs the model).
Warm: the same seed, so the same trials, on the filled cache: no model runs at all. The same
configs give the same values either way (checked). Then one trial that changes only the
threshold of the fixed config, timed uncached (the model runs) and post-processing-only (maps
from the cache), with the objective and without it (steps 1-10 alone), the latter also with
the GPU-friendly post-processing (`crf_backend: conv`, `blur_backend: torch`). Prints a table
and one JSON line.
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
from tuner.trial import TrialRunner


def timed_study(spec, tmp: Path, name: str, cache: Path | None, device: str | None):
    """Run a study to its trial count; (seconds, runner)."""
    options = RunOptions(storage=f"sqlite:///{tmp}/bench.db", study_name=name, device=device,
                         cache_dir=str(cache) if cache else None, progress=False)
    runner = StudyRunner(spec, options)
    start = time.perf_counter()
    runner.run()
    return time.perf_counter() - start, runner


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_trials(spec, trials: int = 6, images: int = 16, device: str | None = None) -> dict:
    """Cold vs warm study throughput and single-trial costs for `spec` (a StudySpec)."""
    quiet_libraries()
    spec = spec.replace(trials=trials, tuning_images=images, pruner={"type": "none"})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cold_s, cold = timed_study(spec, tmp, "cold", tmp / "cache", device)
        warm_s, warm = timed_study(spec, tmp, "warm", tmp / "cache", device)
        same = [t.value for t in cold.study.trials] == [t.value for t in warm.study.trials]
        runs_cold, runs_warm = cold.provider.model_runs, warm.provider.model_runs
        config = spec.fixed
        # one trial that changes a post-processing setting (the threshold) from the fixed config,
        # timed twice: the model runs (uncached), then maps from the cache. The CLIP crop memo is
        # emptied before each, so CLIP does the same work both times.
        trial = config.replace(threshold=min(1.0, config.threshold + 0.1))
        conv = trial.replace(crf_backend="conv", blur_backend="torch")  # GPU-friendly post-processing
        full, bare = warm.runner, TrialRunner(  # the same trial without the objective
            warm.dataset, warm.images, warm.provider, None, warm.runner.candidates,
            batch_size=warm.batch_size)
        warm.runner.evaluate(config)  # the fixed config's maps into the cache
        cache, no_cache = warm.provider.cache, MapCache(None)

        def timed_trial(runner, trial_config) -> float:
            if getattr(runner.objective, "forget_crops", None):
                runner.objective.forget_crops()
            return _timed(lambda: runner.evaluate(trial_config))

        warm.provider.cache = no_cache  # the model runs
        uncached_s, uncached_bare_s, uncached_conv_s = (
            timed_trial(full, trial), timed_trial(bare, trial), timed_trial(bare, conv))
        warm.provider.cache = cache  # maps from the cache
        post_s, post_bare_s, post_conv_s = (
            timed_trial(full, trial), timed_trial(bare, trial), timed_trial(bare, conv))
    return {
        "bench": "trials", "trials": trials, "images": images,
        "device": str(cold.backend.device), "model": spec.fixed.model,
        "objective": spec.objective, "image_size": spec.fixed.image_size,
        "cold_trials_per_min": round(60 * trials / cold_s, 2),
        "warm_trials_per_min": round(60 * trials / warm_s, 2),
        "warm_over_cold": round(cold_s / warm_s, 2), "same_values": same,
        "model_runs_cold": runs_cold, "model_runs_warm": runs_warm,
        "uncached_trial_s": round(uncached_s, 3), "postprocess_only_trial_s": round(post_s, 3),
        "postprocess_only_speedup": round(uncached_s / post_s, 2),
        "uncached_steps_1_10_s": round(uncached_bare_s, 3),
        "postprocess_steps_5_10_s": round(post_bare_s, 3),
        "postprocess_steps_5_10_speedup": round(uncached_bare_s / post_bare_s, 2),
        "objective_s_per_trial": round(max(0.0, post_s - post_bare_s), 3),
        "uncached_steps_1_10_conv_crf_s": round(uncached_conv_s, 3),
        "postprocess_steps_5_10_conv_crf_s": round(post_conv_s, 3),
        "postprocess_steps_5_10_conv_crf_speedup": round(uncached_conv_s / post_conv_s, 2),
    }


def print_trials(result: dict) -> None:
    print(f"{'trials (' + result['objective'] + ')':<36}{'value':>10}")
    print(f"{'  cold cache trials/min':<36}{result['cold_trials_per_min']:>10}")
    print(f"{'  warm cache trials/min':<36}{result['warm_trials_per_min']:>10}   x{result['warm_over_cold']}"
          f" (same values: {result['same_values']}; model batches {result['model_runs_cold']} cold, "
          f"{result['model_runs_warm']} warm)")
    print(f"{'  uncached trial (s)':<36}{result['uncached_trial_s']:>10}")
    print(f"{'  post-processing-only trial (s)':<36}{result['postprocess_only_trial_s']:>10}"
          f"   x{result['postprocess_only_speedup']} cheaper")
    print(f"{'    of which the objective (s)':<36}{result['objective_s_per_trial']:>10}")
    print(f"{'  steps 1-10 uncached (s)':<36}{result['uncached_steps_1_10_s']:>10}")
    print(f"{'  steps 5-10 from cached maps (s)':<36}{result['postprocess_steps_5_10_s']:>10}"
          f"   x{result['postprocess_steps_5_10_speedup']} cheaper")
    print(f"{'  the same, crf_backend conv, torch blur:':<36}")
    print(f"{'  steps 1-10 uncached (s)':<36}{result['uncached_steps_1_10_conv_crf_s']:>10}")
    print(f"{'  steps 5-10 from cached maps (s)':<36}{result['postprocess_steps_5_10_conv_crf_s']:>10}"
          f"   x{result['postprocess_steps_5_10_conv_crf_speedup']} cheaper")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study-file", default=None, help="default: the shipped shapes study")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    spec = load_spec(args.study_file or builtin_spec_path("shapes"))
    result = measure_trials(spec, args.trials, args.images, args.device)
    print_trials(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
