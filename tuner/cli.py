"""`tune`: run label-free studies, export their best config, inspect them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

DEFAULT_DATASET = "shapes"


def parse_batch_size(text: str) -> str | int:
    """--batch-size: segmenter's rule (a positive integer or auto), as an argparse error."""
    from segmenter.backends import parse_batch_size as parse

    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_at_least(least: int, meaning: str = ""):
    """An argparse type: an integer >= `least`, else a one-line usage error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {least}{meaning}")
        return value
    parse.__name__ = f"integer >= {least}"
    return parse


#: --images, --trials, --top ...: 0 is refused (it would mean "the default" in one command and
#: "all" in another); leave the option out for its default
positive_int = _int_at_least(1, " (leave the option out for its default)")
non_negative_int = _int_at_least(0)


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
    run.add_argument("--trials", type=positive_int,
                     help="distinct finished configs the study should have (default: the spec's `trials`)")
    run.add_argument("--objective", help="objective name (see `tune objectives`)")
    run.add_argument("--images", type=positive_int,
                     help="number of tuning images (default: the spec's `tuning.images`)")
    run.add_argument("--model", help="the method's model id or directory, BLIP ITM for pnp_ovss, CLIP for "
                                     "the CLIP methods (overrides the spec's)")
    run.add_argument("--preset", metavar="NAME",
                     help="start the spec's fixed settings from a preset (official = the authors' code); "
                          "the settings the spec writes out still apply")
    run.add_argument("--method", metavar="NAME",
                     help="the segmentation method (pnp_ovss, maskclip, sclip, clearclip, naclip): its spec "
                          "studies/<method>_<dataset>.yaml when one ships (or --study-file's), started from "
                          "the method's preset (its published settings)")
    run.add_argument("--clip-model", help="CLIP model id or directory for the objective and candidates")
    run.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    run.add_argument("--seed", type=non_negative_int,
                     help="sampler and tuning-subset seed, recorded in the study (default: the spec's "
                          "`tuning.seed`)")
    run.add_argument("--cache-dir", default="runs/cache", help="map cache directory")
    run.add_argument("--no-cache", action="store_true", help="recompute every map (same values)")
    run.add_argument("--batch-size", type=parse_batch_size, default="auto",
                     help="images per model batch, or auto: from free GPU memory (8 on CPU)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping it")
    run.add_argument("--workers", type=non_negative_int, default=0,
                     help="processes for the CPU post-processing (dense CRF, blur); 0 or 1: none, "
                          "the main process does it (default %(default)s)")
    run.add_argument("--heartbeat", type=positive_int, default=30,
                     help="seconds between a running trial's heartbeats (every storage); a trial silent "
                          "for 3 heartbeats is failed and retried (default %(default)s)")

    export = sub.add_parser("export", help="write the best trial's SegmenterConfig as YAML")
    export.add_argument("--study", required=True)
    _storage_arg(export)
    export.add_argument("-o", "--output", help="file to write (default: standard output)")
    export.add_argument("--force", action="store_true",
                        help="write the choice even when the confidence check finds it not reliably "
                             "better than the default config")
    export.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                        help="where the confidence check runs when the study has not stored it")
    export.add_argument("--cache-dir", default="runs/cache", help="map cache directory")
    export.add_argument("--data-root", default=os.environ.get("OVSS_DATA"),
                        help="dataset directory, for a confidence check the study has not stored")

    show = sub.add_parser("show", help="a table of a study's top trials")
    show.add_argument("--study", required=True)
    _storage_arg(show)
    show.add_argument("--top", type=positive_int, default=10, help="trials listed (default %(default)s)")

    studies = sub.add_parser("studies", help="list the studies in a storage")
    _storage_arg(studies)

    sub.add_parser("objectives", help="list the registered objectives and the labels they use")

    add_data_commands(sub)
    add_audit_command(sub)

    ev = sub.add_parser("eval", help="mIoU of an exported config on a labelled split")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a SegmenterConfig YAML (from `tune export`)")
    source.add_argument("--preset", metavar="NAME",
                        help="evaluate a preset instead: official = the authors' settings, or a CLIP "
                             "method's name (maskclip, sclip, clearclip, naclip): its published settings")
    ev.add_argument("--model", help="the method's model id or directory, BLIP ITM for pnp_ovss, CLIP for "
                                    "the CLIP methods (overrides the config's)")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--data-root", default=os.environ.get("OVSS_DATA"),
                    help="dataset directory (default: $OVSS_DATA)")
    ev.add_argument("--split", help="split to evaluate (default: the part of val the config was not "
                                    "tuned on, as its provenance says: val:eval after val:tune; else val)")
    ev.add_argument("--images", type=positive_int,
                    help="evaluate a seeded subset of this many images (default: every image of the split)")
    ev.add_argument("--seed", type=non_negative_int, default=0, help="seed of that subset (default 0)")
    ev.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ev.add_argument("--cache-dir", default="runs/cache", help="map cache directory")
    ev.add_argument("--batch-size", type=parse_batch_size, default="auto",
                    help="images per model batch, or auto (default)")
    ev.add_argument("-o", "--output", default="eval.json", help="JSON file (default %(default)s)")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping it")
    ev.add_argument("--protocol", choices=["standard", "paper", "both"], default="standard",
                    help="standard: MMSeg harness of SCLIP/NACLIP (default); paper: as PnP-OVSS's own "
                         "evaluation code, background counted; both: the two side by side")

    seg = sub.add_parser("segment", help="segment images with an exported config")
    seg.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    source = seg.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a SegmenterConfig YAML (from `tune export`)")
    source.add_argument("--preset", metavar="NAME",
                        help="segment with a preset instead: official = the authors' settings, or a CLIP "
                             "method's name (maskclip, sclip, clearclip, naclip): its published settings")
    seg.add_argument("--model", help="the method's model id or directory, BLIP ITM for pnp_ovss, CLIP for "
                                     "the CLIP methods (overrides the config's)")
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
        _print_error(_storage_full_message(err, args) or _one_line(err))
        return 2
    except Exception as err:  # a bug or an unforeseen library error: one line, traceback on request
        if os.environ.get("OVSS_DEBUG"):
            raise
        full = _storage_full_message(err, args)
        if full:
            _print_error(full)
            return 2
        _print_error(f"{type(err).__name__}: {_one_line(err)} (unexpected; set OVSS_DEBUG=1 for the "
                     "traceback and report it)")
        return 1


#: longest error line printed; longer messages (a value echoed back) are cut
MAX_ERROR_CHARS = 400


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _print_error(message: str) -> None:
    Console(stderr=True, highlight=False).print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def _storage_full_message(err: BaseException, args) -> str | None:
    """The one-line error for a full disk (ENOSPC, SQLite's "database or disk is full")."""
    import errno

    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        text = str(e).lower()
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text \
                or "no space left" in text:
            where = getattr(args, "storage", None)
            return (f"no space left on the device ({_one_line(e)}){f' of storage {where}' if where else ''}: "
                    "free space, then rerun the same command; finished trials are kept")
    return None


# --- commands ---------------------------------------------------------------------------------------
def cmd_run(args, console: Console) -> int:
    from .cache import MapCache
    from .spec import RESERVED_OPTIONS, builtin_spec_path, load_spec, option_problem
    from .study import RunOptions, StudyRunner, sigterm_as_interrupt

    cpus = os.cpu_count() or 1
    if args.workers > cpus:
        raise ValueError(f"--workers {args.workers} is more than the {cpus} CPUs here: each worker "
                         f"process holds a copy of the post-processing; use at most {cpus}")
    if args.method:
        spec = _method_spec(args)
    else:
        spec = load_spec(args.study_file or builtin_spec_path(args.dataset or DEFAULT_DATASET),
                         preset=args.preset)
    if not args.no_cache:
        MapCache(args.cache_dir)  # a cache directory that cannot be written fails now, not in a trial
    if args.dataset and args.study_file:
        spec = spec.replace(dataset=args.dataset)
    if args.objective and args.objective != spec.objective:
        from objectives._base import objective_class

        cls = objective_class(args.objective)
        kept = {k: v for k, v in spec.objective_options.items()
                if not option_problem(cls, {k: v}, RESERVED_OPTIONS["objective"])}
        dropped = sorted(set(spec.objective_options) - set(kept))
        if dropped:
            console.print(f"note: objective {args.objective} takes no {', '.join(dropped)}: {spec.source}'s "
                          f"objective_options for {spec.objective} are left out", highlight=False)
        spec = spec.replace(objective=args.objective, objective_options=kept)
    if args.model:  # the method's checkpoint: BLIP's for pnp_ovss, CLIP's for the CLIP methods
        field = "model" if spec.fixed.method == "pnp_ovss" else "clip_model"
        spec = spec.replace(fixed=spec.fixed.replace(**{field: args.model}))
    if args.clip_model:  # the candidate rule's CLIP, and the objective's when it takes one
        from objectives import objective_class

        from .spec import RESERVED_OPTIONS, option_problem

        takes = not option_problem(objective_class(spec.objective), {"clip_model": args.clip_model},
                                   RESERVED_OPTIONS["objective"])
        spec = spec.replace(fixed=spec.fixed.replace(candidates_model=args.clip_model),
                            objective_options={**spec.objective_options,
                                               **({"clip_model": args.clip_model} if takes else {})})
    blind = _blind_to_threshold_masks(spec)
    if blind:
        console.print(f"note: {blind[0]} scores threshold masks (mask_source: threshold), which the searched "
                      f"{', '.join(blind[1])} cannot change: configs that differ only there score alike "
                      "(README, Objectives)", highlight=False)
    options = RunOptions(
        storage=args.storage, study_name=args.study, trials=args.trials, images=args.images,
        device=None if args.device == "auto" else args.device, seed=args.seed,
        cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
        data_root=args.data_root, progress=not args.no_progress, heartbeat=args.heartbeat,
        workers=args.workers, strict=args.strict,
    )
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


def _method_spec(args):
    """The spec of `tune run --method NAME`: --study-file, else studies/<NAME>_<dataset>.yaml when
    it ships, else studies/<dataset>.yaml; a CLIP method's fixed settings start from its preset."""
    from segmenter.backends import BACKENDS
    from segmenter.config import CLIP_METHODS
    from segmenter.methods import METHODS

    from .spec import SpecError, builtin_spec_path, load_spec, searched_but_unread, unread_message

    if args.method not in METHODS:
        hint = ""
        if args.method in BACKENDS:
            hint = (f"; {args.method} is a backend of pnp_ovss: give --study-file a spec whose fixed "
                    f"settings say `backend: {args.method}`")
        raise ValueError(f"unknown method {args.method!r}: use one of {', '.join(METHODS)}{hint}")
    if args.preset and args.method in CLIP_METHODS:
        raise ValueError(f"--method {args.method} starts from its own preset: give --method or --preset, "
                         "not both")
    dataset = args.dataset or DEFAULT_DATASET
    path = args.study_file
    if path is None:
        try:
            path = builtin_spec_path(f"{args.method}_{dataset}")
        except ValueError:
            path = builtin_spec_path(dataset)
    spec = load_spec(path, preset=args.method if args.method in CLIP_METHODS else args.preset)
    if spec.fixed.method != args.method:
        spec = spec.replace(fixed=spec.fixed.replace(method=args.method))
        unread = searched_but_unread(args.method, spec.search_space)
        if unread:
            raise SpecError(f"{path}: search_space.{unread}: {unread_message(args.method, unread)}")
    return spec


#: settings applied after the class maps are thresholded: threshold masks never see them
_AFTER_THRESHOLD = ("background", "blur", "crf", "postprocess")


def _blind_to_threshold_masks(spec) -> tuple[str, list[str]] | None:
    """(objective, searched settings it cannot see) when the study's objective scores threshold
    masks (`mask_source: threshold`, which `preset: official` sets) and the search space varies
    background, blur, CRF or post-processing settings; else None."""
    scored = [(spec.objective, spec.objective_options)] if not spec.objectives else list(spec.objectives)
    threshold = [name for name, options in scored if options.get("mask_source") == "threshold"]
    searched = [p.name for p in spec.search_space if p.name.startswith(_AFTER_THRESHOLD)]
    return (", ".join(threshold), searched) if threshold and searched else None


def _values_text(trial) -> str:
    return ", ".join(f"{v:.4f}" for v in trial.values) if len(trial.values) > 1 else f"{trial.value:.4f}"


def _print_best(study, console: Console, runner=None) -> None:
    from segmenter import SegmenterConfig

    from .confidence import verdict
    from .selection import choose

    try:
        choice = choose(study)
    except ValueError:
        console.print("no completed trial yet")
        return
    best = choice.trial
    config = SegmenterConfig.from_dict(best.user_attrs["config"])
    miou = best.user_attrs.get("miou")
    names = study.user_attrs.get("objectives") or [study.user_attrs.get("objective", "objective")]
    what = "objectives " + ", ".join(names) if len(best.values) > 1 else "objective"
    line = f"best trial #{best.number}: {what} {_values_text(best)}"
    reads_pixels = study.user_attrs.get("objective_labels") == "pixel"
    reads_image_labels = best.user_attrs.get("labels_used") == "image-level"  # protocol paper, oracle
    if miou is not None:
        line += f", mIoU {miou:.4f}" + (
            " (the objective READ pixel labels: not a label-free choice)" if reads_pixels
            else " (the search READ image-level labels: not a label-free choice; pixel labels only report "
                 "this)" if reads_image_labels else " (labels used only to report this)")
    console.print(config.to_yaml(), highlight=False, markup=False)
    console.print(line)
    console.print(f"choice: {choice.describe()}", highlight=False)
    if runner is None:
        return
    default = runner.default_outcome()
    if default is not None:
        first = f" ({names[0]})" if len(names) > 1 else ""
        text = f"default config ({runner.spec.source}'s fixed settings): objective{first} {default.value:.4f}"
        if default.metrics:
            text += f", mIoU {default.metrics['miou']:.4f}"
        console.print(text)
    check = runner.confidence(choice)
    colour = "green" if check.get("reliably_better") or check.get("same_as_default") else "yellow"
    on = f" (on the first objective, {names[0]})" if len(names) > 1 else ""
    console.print(f"[{colour}]confidence check{on}:[/] {verdict(check)}", highlight=False)


def cmd_export(args, console: Console) -> int:
    from segmenter import SegmenterConfig

    from .confidence import ensure_check, not_reliably_better, verdict
    from .outputs import writable_file, write_text_atomic
    from .selection import choose
    from .study import load_study

    study = load_study(args.storage, args.study)
    choice = choose(study)
    best = choice.trial
    output = writable_file(args.output, "the exported config") if args.output else None  # before any work
    check = ensure_check(study, choice, device=None if args.device == "auto" else args.device,
                         cache_dir=args.cache_dir, data_root=args.data_root)
    config = SegmenterConfig.from_dict(best.user_attrs["config"])
    provenance = {
        "study": study.study_name, "trial": best.number,
        "value": best.value if len(best.values) == 1 else list(best.values),
        "objective": study.user_attrs.get("objective"), "dataset": study.user_attrs.get("dataset"),
        "tuning_split": study.user_attrs.get("tuning_split"),
        "tuning_ids": study.user_attrs.get("tuning_ids"),
        "dataset_options": study.user_attrs.get("dataset_options") or None,
        "labels_touched": study.user_attrs.get("labels_touched"),
        "external_sources": study.user_attrs.get("external_sources") or None,
        "miou": best.user_attrs.get("miou"), "package_version": study.user_attrs.get("package_version"),
        "choice": choice.summary(),
        "confidence_check": {k: check.get(k) for k in ("reliably_better", "p_value", "effect", "images",
                                                       "optimistic", "mean_difference") if k in check},
    }
    if len(study.user_attrs.get("objectives") or []) > 1:
        provenance["objective"] = list(study.user_attrs["objectives"])
    fallback = not_reliably_better(check) and not args.force
    console_err = Console(stderr=True, highlight=False)
    if fallback:  # the numbers of the trial belong to the choice, not to what is written
        config = SegmenterConfig.from_dict(study.user_attrs["fixed"])
        provenance["rejected_choice"] = {k: provenance.pop(k) for k in ("trial", "value", "miou")}
        default = study.user_attrs.get("default_outcome") or {}
        provenance["default_config"] = {"value": default.get("value"),
                                        "miou": (default.get("metrics") or {}).get("miou")}
        provenance["exported"] = "default config: the choice is not reliably better (use --force for it)"
        console_err.print(f"[yellow]{verdict(check)}[/]", soft_wrap=True)
        console_err.print(f"[yellow]wrote the default config instead of trial #{best.number}; "
                          "`tune export --force` writes the choice anyway[/]", soft_wrap=True)
    elif not_reliably_better(check) and args.force:
        provenance["exported"] = "the choice, forced (--force) although not reliably better"
    text = config.to_yaml(provenance={k: v for k, v in provenance.items() if v is not None})
    if output is not None:
        write_text_atomic(output, text)
        what = "the default config" if fallback else f"trial #{best.number}, objective {_values_text(best)}"
        console.print(f"wrote {output} ({what})")
    else:
        sys.stdout.write(text)
    return 0


def cmd_show(args, console: Console) -> int:
    from optuna.trial import TrialState

    from .selection import choose, distinct_complete
    from .study import is_repeat, load_study

    study = load_study(args.storage, args.study)
    trials = [t for t in study.get_trials(deepcopy=False) if not is_repeat(t)]
    done = sorted(distinct_complete(study), key=lambda t: tuple(-v for v in t.values))
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    counts["repeats (not shown)"] = len(study.trials) - len(trials)
    table = Table(title=f"{study.study_name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    choice = choose(study) if done else None
    for col in ("trial", "objective", "mIoU", "params"):
        table.add_column(col, justify="right" if col != "params" else "left")
    for t in done[: args.top]:
        miou = t.user_attrs.get("miou")
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        mark = " *" if choice is not None and t.number == choice.trial.number else ""
        table.add_row(f"{t.number}{mark}", _values_text(t), "-" if miou is None else f"{miou:.4f}", params)
    console.print(table)
    if choice is not None:
        console.print(f"* the study's answer: {choice.describe()}", highlight=False)
        check = study.user_attrs.get("confidence_check")
        if check and check.get("trial") == choice.trial.number:
            from .confidence import not_reliably_better, verdict

            console.print(f"confidence check: {verdict(check)}", highlight=False)
            if not_reliably_better(check):
                console.print("so `tune export` writes the default config (`--force`: this answer)",
                              highlight=False)
    return 0


def cmd_studies(args, console: Console) -> int:
    import optuna

    from .selection import choose
    from .study import distinct_trials, open_storage

    storage = open_storage(args.storage)
    summaries = optuna.get_all_study_summaries(storage)
    table = Table(title=f"studies in {args.storage}")
    for col in ("study", "dataset", "objective", "finished", "best"):
        table.add_column(col)
    for s in summaries:
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        finished = len(distinct_trials(study))
        try:
            best = _values_text(choose(study).trial)
        except ValueError:
            best = "-"
        table.add_row(s.study_name, str(s.user_attrs.get("dataset", "?")),
                      ", ".join(s.user_attrs.get("objectives") or [str(s.user_attrs.get("objective", "?"))]),
                      str(finished), best)
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


def _config_from_args(args, dataset: str | None = None):
    """The SegmenterConfig of `--config FILE` or `--preset NAME`, with `--model` on top."""
    from segmenter import SegmenterConfig

    if args.config:
        config = SegmenterConfig.from_yaml(Path(args.config), dataset=dataset)
    else:
        config = SegmenterConfig.preset(args.preset, dataset=dataset)
    if not args.model:
        return config
    # the method's checkpoint: BLIP's for pnp_ovss, CLIP's for the CLIP methods
    return config.replace(**{"model" if config.method == "pnp_ovss" else "clip_model": args.model})


def cmd_eval(args, console: Console) -> int:
    import json
    import warnings

    from rich.progress import Progress

    from segmenter.config import read_provenance

    from .cache import MapCache
    from .datasets import load_dataset
    from .evaluate import evaluate_config, print_scores
    from .outputs import writable_file, write_text_atomic

    config = _config_from_args(args, args.dataset)
    provenance = read_provenance(Path(args.config)) if args.config else {}
    writable_file(args.output, "-o/--output file")  # before any image is evaluated
    MapCache(args.cache_dir)  # a cache directory that cannot be written fails before the evaluation
    same_dataset = provenance.get("dataset") == args.dataset
    options = _partition_options(provenance) if same_dataset else {}
    dataset = load_dataset(args.dataset, **options, **({"root": args.data_root} if args.data_root else {}))
    split, note = _eval_split(dataset, args.split, provenance if same_dataset else {})
    dataset.check_split(split)
    if note:
        console.print(note, highlight=False)
    total = min(args.images or len(dataset.ids(split)), len(dataset.ids(split)))
    with Progress(console=Console(stderr=True), disable=args.no_progress) as progress, \
            warnings.catch_warnings():
        from .datasets import SkippedImageWarning

        warnings.simplefilter("ignore", SkippedImageWarning)  # skipped images are listed below
        task = progress.add_task(f"evaluating on {args.dataset}/{split}", total=total)
        result = evaluate_config(
            config, dataset, split, images=args.images, seed=args.seed,
            device=None if args.device == "auto" else args.device, cache_dir=args.cache_dir,
            batch_size=args.batch_size, on_image=lambda n: progress.update(task, completed=n),
            strict=args.strict, protocol=args.protocol,
        )
    result["config"] = str(args.config) if args.config else f"preset {args.preset}"
    seen = _tuning_images_evaluated(dataset, split, result, provenance if same_dataset else {})
    if seen is not None:
        result["tuning_images_evaluated"] = seen[0]
    print_scores(result, f"{result['config']} on {args.dataset}/{split} ({result['images']} images)", console)
    for item in result["skipped"]:
        console.print(f"[yellow]skipped[/] corrupt image {item['id']}: {item['reason']}", highlight=False,
                      soft_wrap=True)
    if result["skipped"]:
        console.print(f"{len(result['skipped'])} corrupt images skipped, {result['images']} scored")
    if seen is not None and seen[0]:
        console.print(f"[yellow]warning:[/] {seen[0]} of the {result['images']} evaluated images {seen[1]}: "
                      f"this mIoU is not on held-out images (omit --split for the disjoint part)",
                      highlight=False, soft_wrap=True)
    write_text_atomic(args.output, json.dumps(result, indent=2))
    console.print(f"wrote {args.output}")
    return 0


def _partition_options(provenance: dict) -> dict:
    """The held-out partition's settings the study used (split_seed, tune_fraction), as numbers."""
    from segmenter.yaml_input import load_yaml

    recorded = provenance.get("dataset_options") or {}
    return {k: load_yaml(str(recorded[k]), f"provenance dataset_options.{k}")
            for k in ("split_seed", "tune_fraction") if k in recorded}


def _eval_split(dataset, requested: str | None, provenance: dict) -> tuple[str, str]:
    """(split to evaluate, a note saying why it was chosen, or "")."""
    from .datasets import split_parts

    tuned = provenance.get("tuning_split")
    if requested is not None:
        return requested, ""
    base = "val" if "val" in dataset.splits or not dataset.splits else dataset.splits[0]
    if tuned and split_parts(tuned)[1] == "tune" and split_parts(tuned)[0] == base:
        return f"{base}:eval", (f"evaluating {base}:eval: the config was tuned on {tuned}, the other part of "
                                f"{base} (pass --split {base} to include the tuning images)")
    return base, ""


def _tuning_images_evaluated(dataset, split: str, result: dict, provenance: dict) -> tuple[int, str] | None:
    """(how many evaluated images the config was tuned on, how that is known), or None when
    the config's provenance names no tuning split of this dataset."""
    from .datasets import split_parts
    from .study import pick_tuning_ids

    tuned = provenance.get("tuning_split")
    if not tuned:
        return None
    skipped = {item["id"] for item in result["skipped"]}
    images = result.get("images_requested")
    evaluated = pick_tuning_ids(dataset, split, images, result["seed"]) if images else dataset.ids(split)
    evaluated = set(evaluated) - skipped
    if provenance.get("tuning_ids"):
        return len(evaluated & set(provenance["tuning_ids"])), f"are tuning images of the config ({tuned})"
    if split_parts(tuned)[0] not in dataset.splits:
        return 0, ""
    return len(evaluated & set(dataset.ids(tuned))), f"lie in {tuned}, the part the config was tuned on"


def cmd_segment(args, console: Console) -> int:
    from rich.progress import Progress

    from segmenter import Segmenter

    from .apply import plan_outputs, read_class_list, segment_paths
    from .outputs import writable_dir

    names = read_class_list(args.classes, args.classes_file)
    config = _config_from_args(args)
    planned = plan_outputs(args.inputs)  # a missing input fails before any work
    total = len(planned)
    if total == 0:
        from .apply import IMAGE_SUFFIXES

        raise ValueError(f"no image found in {', '.join(args.inputs)} (nor below it): give image files "
                         f"or directories holding {', '.join(sorted(IMAGE_SUFFIXES))} files")
    if config.candidates == "file":  # every input has a list of known names, before the model loads
        from segmenter.candidate_file import load_candidate_file

        from .apply import image_id

        load_candidate_file(config.candidates_file).check([image_id(n) for _, n in planned], names,
                                                          what="input images")
    writable_dir(args.out, "--out directory")  # before the model loads
    segmenter = Segmenter(config, device=None if args.device == "auto" else args.device,
                          batch_size=args.batch_size)
    with Progress(console=Console(stderr=True), disable=args.no_progress) as progress:
        task = progress.add_task("segmenting", total=total)
        report = segment_paths(segmenter, names, planned, args.out, save_maps=args.save_maps,
                               progress=lambda: progress.advance(task))
    on_disk = sum(1 for path in report.outputs if path.is_file())
    console.print(f"wrote {on_disk} label maps and overlays to {args.out} (named as the inputs, "
                  "input tree mirrored)", highlight=False)
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
