"""`tune`: run label-free studies, export their best config, inspect them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEFAULT_DATASET = "shapes"


def parse_batch_size(text: str) -> str | int:
    """--batch-size: segmenter's rule (a positive integer or auto), as an argparse error."""
    from segmenter.backends import parse_batch_size as parse

    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _storage_arg(p: argparse.ArgumentParser) -> None:
    from .study import DEFAULT_STORAGE

    p.add_argument("--storage", default=os.environ.get("OVSS_STORAGE", DEFAULT_STORAGE),
                   help="Optuna storage URL: sqlite:///file.db, postgresql://..., journal:FILE "
                        "(default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from .audit import add_audit_command
    from .data_cli import add_data_commands

    parser = argparse.ArgumentParser(prog="tune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ovss-tune {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run (or continue) a label-free study")
    run.add_argument("--dataset", help=f"dataset name (default: {DEFAULT_DATASET}, or the study file's)")
    run.add_argument("--data-root", default=os.environ.get("OVSS_DATA"),
                     help="dataset directory (default: $OVSS_DATA)")
    run.add_argument("--study-file", help="a study spec YAML (default: studies/<dataset>.yaml)")
    run.add_argument("--study", help="study name (default: <dataset>-<objective>)")
    _storage_arg(run)
    run.add_argument("--trials", type=int, help="distinct finished configs the study should have")
    run.add_argument("--objective", help="objective name (see `tune objectives`)")
    run.add_argument("--images", type=int, help="number of tuning images")
    run.add_argument("--model", help="BLIP ITM model id or directory (overrides the spec's)")
    run.add_argument("--clip-model", help="CLIP model id or directory for the objective and candidates")
    run.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    run.add_argument("--seed", type=int, help="sampler and tuning-subset seed (recorded in the study)")
    run.add_argument("--cache-dir", default="runs/cache", help="map cache directory")
    run.add_argument("--no-cache", action="store_true", help="recompute every map (same values)")
    run.add_argument("--batch-size", type=parse_batch_size, default="auto",
                     help="images per model batch, or auto: from free GPU memory (8 on CPU)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping it")
    run.add_argument("--workers", type=int, default=0,
                     help="processes for the CPU post-processing (dense CRF, blur); 0 = none")
    run.add_argument("--heartbeat", type=int, default=30,
                     help="seconds between a running trial's heartbeats (every storage); a trial silent "
                          "for 3 heartbeats is failed and retried (default %(default)s)")

    export = sub.add_parser("export", help="write the best trial's SegmenterConfig as YAML")
    export.add_argument("--study", required=True)
    _storage_arg(export)
    export.add_argument("-o", "--output", help="file to write (default: standard output)")

    show = sub.add_parser("show", help="a table of a study's top trials")
    show.add_argument("--study", required=True)
    _storage_arg(show)
    show.add_argument("--top", type=int, default=10)

    studies = sub.add_parser("studies", help="list the studies in a storage")
    _storage_arg(studies)

    sub.add_parser("objectives", help="list the registered objectives and the labels they use")

    add_data_commands(sub)
    add_audit_command(sub)

    ev = sub.add_parser("eval", help="mIoU of an exported config on a labelled split")
    ev.add_argument("--config", required=True, help="a SegmenterConfig YAML (from `tune export`)")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--data-root", default=os.environ.get("OVSS_DATA"),
                    help="dataset directory (default: $OVSS_DATA)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--images", type=int, help="evaluate a seeded subset of this many images")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ev.add_argument("--cache-dir", default="runs/cache", help="map cache directory")
    ev.add_argument("--batch-size", type=parse_batch_size, default="auto",
                    help="images per model batch, or auto (default)")
    ev.add_argument("-o", "--output", default="eval.json", help="JSON file (default %(default)s)")
    ev.add_argument("--no-progress", action="store_true")

    seg = sub.add_parser("segment", help="segment images with an exported config")
    seg.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    seg.add_argument("--config", required=True, help="a SegmenterConfig YAML (from `tune export`)")
    seg.add_argument("--classes", help="comma-separated class names")
    seg.add_argument("--classes-file", help="a file with one class name a line")
    seg.add_argument("--out", required=True, help="output directory")
    seg.add_argument("--save-maps", action="store_true", help="also write the per-class maps (.npz)")
    seg.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    seg.add_argument("--batch-size", type=parse_batch_size, default="auto",
                     help="images per model batch, or auto (default)")
    seg.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .spec import SpecError
    from .study import quiet_libraries

    quiet_libraries()
    console = Console()
    try:
        return COMMANDS[args.command](args, console)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during `tune run` (study.Terminated)
        Console(stderr=True).print(
            "[yellow]interrupted[/]: finished trials are saved; rerun the same command to continue"
        )
        return 143 if type(err).__name__ == "Terminated" else 130
    except (SpecError, ValueError, OSError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        Console(stderr=True, highlight=False).print(f"[red]error:[/] {message}", soft_wrap=True)
        return 2


# --- commands ---------------------------------------------------------------------------------------
def cmd_run(args, console: Console) -> int:
    from .spec import builtin_spec_path, load_spec
    from .study import RunOptions, StudyRunner, sigterm_as_interrupt

    spec = load_spec(args.study_file or builtin_spec_path(args.dataset or DEFAULT_DATASET))
    if args.dataset and args.study_file:
        spec = spec.replace(dataset=args.dataset)
    if args.objective:
        spec = spec.replace(objective=args.objective)
    if args.model:
        spec = spec.replace(fixed=spec.fixed.replace(model=args.model))
    if args.clip_model:
        spec = spec.replace(fixed=spec.fixed.replace(candidates_model=args.clip_model),
                            objective_options={**spec.objective_options, "clip_model": args.clip_model})
    options = RunOptions(
        storage=args.storage, study_name=args.study, trials=args.trials, images=args.images,
        device=None if args.device == "auto" else args.device, seed=args.seed,
        cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
        data_root=args.data_root, progress=not args.no_progress, heartbeat=args.heartbeat,
        workers=args.workers, strict=args.strict,
    )
    if options.trials is not None and options.trials < 1:
        raise ValueError("--trials must be at least 1")
    with sigterm_as_interrupt():  # a scheduler's or `timeout`'s SIGTERM ends the trial like Ctrl-C
        runner = StudyRunner(spec, options)
        try:  # the worker processes stay up for the default config's evaluation in the report
            before = runner.finished()
            study = runner.run()
            ran = runner.finished() - before
            repeats = sum("repeat_of" in t.user_attrs for t in study.get_trials(deepcopy=False))
            counted = f"; {repeats} repeats of evaluated configs not counted" if repeats else ""
            console.print(f"study [bold]{runner.name}[/] in {args.storage}: {runner.finished()} distinct "
                          f"configs finished ({ran} run now){counted}; map cache {runner.cache.hits} hits, "
                          f"{runner.cache.misses} misses")
            if runner.exhausted:
                console.print(f"[yellow]stopped before {runner.trials} trials[/]: {runner.exhausted}")
            _print_best(study, console, runner)
        finally:
            runner.close()
    return 0


def _print_best(study, console: Console, runner=None) -> None:
    from segmenter import SegmenterConfig

    from .study import best_trial

    try:
        best = best_trial(study)
    except ValueError:
        console.print("no completed trial yet")
        return
    config = SegmenterConfig.from_dict(best.user_attrs["config"])
    miou = best.user_attrs.get("miou")
    line = f"best trial #{best.number}: objective {best.value:.4f}"
    if miou is not None:
        line += f", mIoU {miou:.4f} (labels used only to report this)"
    console.print(config.to_yaml(), highlight=False, markup=False)
    console.print(line)
    if runner is not None and miou is not None:
        default = runner.default_outcome()
        if default is not None:
            console.print(f"default config ({runner.spec.source}'s fixed settings): objective "
                          f"{default.value:.4f}, mIoU {default.metrics['miou']:.4f}")


def cmd_export(args, console: Console) -> int:
    from segmenter import SegmenterConfig

    from .study import best_trial, load_study

    study = load_study(args.storage, args.study)
    try:
        best = best_trial(study)
    except ValueError:
        raise ValueError(f"study {args.study!r} has no completed trial yet: run it first") from None
    config = SegmenterConfig.from_dict(best.user_attrs["config"])
    provenance = {
        "study": study.study_name, "trial": best.number, "value": best.value,
        "objective": study.user_attrs.get("objective"), "dataset": study.user_attrs.get("dataset"),
        "tuning_split": study.user_attrs.get("tuning_split"),
        "labels_touched": study.user_attrs.get("labels_touched"),
        "miou": best.user_attrs.get("miou"), "package_version": study.user_attrs.get("package_version"),
    }
    text = config.to_yaml(provenance={k: v for k, v in provenance.items() if v is not None})
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        console.print(f"wrote {args.output} (trial #{best.number}, objective {best.value:.4f})")
    else:
        sys.stdout.write(text)
    return 0


def cmd_show(args, console: Console) -> int:
    from optuna.trial import TrialState

    from .study import is_repeat, load_study

    study = load_study(args.storage, args.study)
    trials = [t for t in study.get_trials(deepcopy=False) if not is_repeat(t)]
    repeats = len(study.trials) - len(trials)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    counts["repeats (not shown)"] = repeats
    table = Table(title=f"{study.study_name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    for col in ("trial", "objective", "mIoU", "params"):
        table.add_column(col, justify="right" if col != "params" else "left")
    for t in done[: args.top]:
        miou = t.user_attrs.get("miou")
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        table.add_row(str(t.number), f"{t.value:.4f}", "-" if miou is None else f"{miou:.4f}", params)
    console.print(table)
    return 0


def cmd_studies(args, console: Console) -> int:
    import optuna

    from .study import best_trial, distinct_trials, open_storage

    storage = open_storage(args.storage)
    summaries = optuna.get_all_study_summaries(storage)
    table = Table(title=f"studies in {args.storage}")
    for col in ("study", "dataset", "objective", "finished", "best"):
        table.add_column(col)
    for s in summaries:
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        finished = len(distinct_trials(study))
        best = "-" if s.best_trial is None else f"{best_trial(study).value:.4f}"
        table.add_row(s.study_name, str(s.user_attrs.get("dataset", "?")),
                      str(s.user_attrs.get("objective", "?")), str(finished), best)
    console.print(table)
    return 0


def cmd_objectives(args, console: Console) -> int:
    from objectives import describe_objectives

    table = Table(title="objectives")
    for col in ("name", "direction", "models", "labels", "what it measures"):
        table.add_column(col)
    for row in describe_objectives():
        table.add_row(*(", ".join(v) if isinstance(v, (tuple, list)) else str(v) for v in row))
    console.print(table)
    return 0


def _audit(args, console: Console) -> int:
    from .audit import cmd_audit

    return cmd_audit(args, console)


def cmd_data(args, console: Console) -> int:
    from .data_cli import cmd_data as run_data_command

    return run_data_command(args, console)


def cmd_eval(args, console: Console) -> int:
    import json

    from rich.progress import Progress

    from segmenter import SegmenterConfig

    from .datasets import load_dataset
    from .evaluate import evaluate_config

    config = SegmenterConfig.from_yaml(Path(args.config))
    dataset = load_dataset(args.dataset, **({"root": args.data_root} if args.data_root else {}))
    dataset.check_split(args.split)
    total = min(args.images or len(dataset.ids(args.split)), len(dataset.ids(args.split)))
    with Progress(console=Console(stderr=True), disable=args.no_progress) as progress:
        task = progress.add_task(f"evaluating on {args.dataset}/{args.split}", total=total)
        result = evaluate_config(
            config, dataset, args.split, images=args.images, seed=args.seed,
            device=None if args.device == "auto" else args.device, cache_dir=args.cache_dir,
            batch_size=args.batch_size, on_image=lambda n: progress.update(task, completed=n),
        )
    result["config"] = str(args.config)
    table = Table(title=f"{args.config} on {args.dataset}/{args.split} ({result['images']} images)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in result["iou_per_class"].items():
        table.add_row(name, "-" if iou is None else f"{iou:.4f}")
    console.print(table)
    console.print(f"mIoU {result['miou']:.4f}   pixel accuracy {result['pixel_accuracy']:.4f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.output}")
    return 0


def cmd_segment(args, console: Console) -> int:
    from rich.progress import Progress

    from segmenter import Segmenter, SegmenterConfig

    from .apply import iter_image_paths, read_class_list, segment_paths

    names = read_class_list(args.classes, args.classes_file)
    config = SegmenterConfig.from_yaml(Path(args.config))
    total = sum(1 for _ in iter_image_paths(args.inputs))
    segmenter = Segmenter(config, device=None if args.device == "auto" else args.device,
                          batch_size=args.batch_size)
    with Progress(console=Console(stderr=True), disable=args.no_progress) as progress:
        task = progress.add_task("segmenting", total=total)
        report = segment_paths(segmenter, names, args.inputs, args.out, save_maps=args.save_maps,
                               progress=lambda: progress.advance(task))
    console.print(f"wrote {len(report.written)} label maps and overlays to {args.out}")
    for path, reason in report.failed:
        console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
    return 1 if report.failed and not report.written else 0


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _version() -> str:
    from segmenter import __version__

    return __version__


COMMANDS = {
    "run": cmd_run, "export": cmd_export, "show": cmd_show, "studies": cmd_studies,
    "objectives": cmd_objectives, "segment": cmd_segment, "eval": cmd_eval,
    "data": cmd_data, "audit": _audit,
}

if __name__ == "__main__":
    raise SystemExit(main())
