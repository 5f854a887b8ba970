"""`tune data check` (what a dataset directory holds) and `tune data download` (fetch a benchmark).

`add_data_commands(subparsers)` registers them on the `tune` parser; `cmd_data(args, console)`
runs the chosen one. Handlers return an exit code and raise ValueError / OSError with one-line
messages on failure.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn
from rich.text import Text

from segmenter.yaml_input import YamlInputError, load_yaml

SAMPLES_READ = 4  # samples decoded per split by `tune data check`


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Add `data check` and `data download` to an argparse subparsers object; returns `data`."""
    from .datasets import DATASETS
    from .datasets.download import MANIFEST_ENV, downloadable

    data = subparsers.add_parser("data", help="check a dataset directory, download a benchmark")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    check = actions.add_parser("check", help="say what a dataset directory holds, or the tree it needs")
    check.add_argument("--dataset", required=True, help=f"dataset name ({', '.join(sorted(DATASETS))})")
    check.add_argument("--data-root", default=os.environ.get("OVSS_DATA"),
                       help="dataset directory, or a data directory holding it (default: $OVSS_DATA)")
    check.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a dataset option, e.g. source=instances (repeatable)")
    check.add_argument("--read", type=_read_count, default=SAMPLES_READ, metavar="N|all",
                       help="decode the first N samples of each split, or all of them, checking "
                            "images and label values (default %(default)s)")
    check.set_defaults(data_handler=cmd_data_check)

    fetch = actions.add_parser("download", help="download, verify and extract a benchmark")
    fetch.add_argument("dataset", choices=downloadable())
    fetch.add_argument("--data-root", default=os.environ.get("OVSS_DATA") or "data",
                       help="data directory to put it in (default: $OVSS_DATA or ./data)")
    fetch.add_argument("--manifest", default=os.environ.get(MANIFEST_ENV),
                       help=f"JSON file replacing the built-in URLs and checksums (default: ${MANIFEST_ENV})")
    fetch.add_argument("--delete-archives", action="store_true", help="remove archives once extracted")
    fetch.add_argument("--allow-unverified", action="store_true",
                       help="accept an archive no checksum is known for (its sha256 is printed before it "
                            "is extracted); without it such an archive is refused")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    fetch.set_defaults(data_handler=cmd_data_download)
    return data


def cmd_data(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run the `data` action chosen on the command line."""
    return args.data_handler(args, console or Console())


# --- check -----------------------------------------------------------------------------------------
def parse_options(items: list[str]) -> dict[str, Any]:
    """["source=instances", "recursive=true"] -> {"source": "instances", "recursive": True}."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"dataset option {item!r} is not KEY=VALUE")
        try:
            options[key.strip()] = load_yaml(value, f"--option {key.strip()}") if value.strip() else ""
        except YamlInputError:
            options[key.strip()] = value
    return options


def cmd_data_check(args: argparse.Namespace, console: Console | None = None) -> int:
    """Print what a dataset directory holds; 1 when its layout is wrong or files are missing."""
    from .datasets import LayoutError, dataset_class, disjoint_splits

    console = console or Console()
    options = parse_options(getattr(args, "option", []) or [])
    if args.data_root:
        options["root"] = args.data_root
    cls = dataset_class(args.dataset)
    try:
        dataset = cls(**options)
    except LayoutError as err:
        console.print(f"[red]{escape(args.dataset)}: layout problem:[/] {escape(err.problem)}",
                      soft_wrap=True)
        if err.expected:
            console.print("expected layout:")
            console.print(err.expected, markup=False, highlight=False, soft_wrap=True)
        return 1
    except TypeError as err:  # an option the dataset does not take
        raise ValueError(f"dataset {args.dataset!r}: {err}") from None

    problems: list[str] = []
    title = getattr(dataset, "title", "")
    where = getattr(dataset, "root", None)
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(args.dataset + (f": {title}" if title else "") + (f" at {where}" if where else ""))
    names = dataset.class_names
    count = f"{len(names)} classes" + (f" (background + {len(names) - 1})" if dataset.has_background
                                        else " (no background class)")
    labels = f"pixel labels, ignore index {dataset.ignore_index}" if dataset.has_labels else "no labels"
    say(f"{count}, {labels}")

    survey = {r.split: r for r in dataset.survey()} if hasattr(dataset, "survey") else {}
    say(f"{'split':<12}{'images':>10}{'annotated':>12}")
    for split in dataset.splits:
        ids = dataset.ids(split)
        report = survey.get(split)
        annotated = str(report.labels) if report else ("-" if not dataset.has_labels else "generated")
        say(f"{split:<12}{len(ids):>10}{annotated:>12}")
        if not ids:
            problems.append(f"split {split} has no images")
        if report and report.labels < report.images:
            missing = report.images - report.labels
            problems.append(f"split {split}: {missing} of {report.images} images have no annotation, "
                            f"e.g. {report.missing[0]}")
    for split, note in getattr(dataset, "split_notes", {}).items():
        say(f"not used: {split}: {note}")

    problems += _read_samples(dataset, args.read)
    if dataset.splits:
        eval_split = "val" if "val" in dataset.splits else dataset.splits[0]
        tune, evaluate = disjoint_splits(dataset, eval_split)
        say(f"studies evaluated on {evaluate} tune on {tune} (disjoint images)")
    if problems:
        for problem in problems:
            console.print(f"[red]problem:[/] {escape(problem)}", soft_wrap=True)
        return 1
    console.print("[green]ok[/]")
    return 0


def _read_count(text: str) -> int | None:
    """--read: a count of samples, or "all" (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--read takes a number of samples or all, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--read must be 0 or more (or all)")
    return value


#: problems listed per split before the rest are counted
PROBLEMS_SHOWN = 5


def _read_samples(dataset, count: int | None) -> list[str]:
    """Decode the first `count` samples (None: all) of each split, images and label values
    alike; one line per problem (a file's name, and for labels each bad value and its count)."""
    from .datasets import CorruptImage, LabelValueError

    problems = []
    for split in dataset.splits if count != 0 else ():
        ids = dataset.ids(split)
        if hasattr(dataset, "label_exists"):  # missing annotations are reported by the survey
            ids = [i for i in ids if dataset.label_exists(split, i)]
        found: list[str] = []
        for sample_id in ids if count is None else ids[:count]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dataset.load(split, sample_id)
            except CorruptImage as err:
                found.append(f"split {split}: unreadable sample {sample_id}: {err}")
            except LabelValueError as err:
                found.append(f"split {split}: {err}")
            except (OSError, ValueError) as err:
                found.append(f"split {split}: {str(err).splitlines()[0]}")
        problems += found[:PROBLEMS_SHOWN]
        if len(found) > PROBLEMS_SHOWN:
            problems.append(f"split {split}: {len(found) - PROBLEMS_SHOWN} more samples with problems")
    return problems


# --- download --------------------------------------------------------------------------------------
class _AmountColumn(ProgressColumn):
    """Bytes and speed for downloads, a file count for extraction."""

    def render(self, task) -> Text:
        if task.fields.get("unit") == "files":
            return Text(f"{int(task.completed)}/{int(task.total or 0)} files")
        from rich.filesize import decimal

        total = "?" if task.total is None else decimal(int(task.total))
        speed = f"  {decimal(int(task.speed))}/s" if task.speed else ""
        return Text(f"{decimal(int(task.completed))}/{total}{speed}")


def cmd_data_download(args: argparse.Namespace, console: Console | None = None) -> int:
    """Download, verify (md5/sha256) and extract a benchmark's archives; resumes partial files."""
    from .datasets.download import fetch_dataset

    console = console or Console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), _AmountColumn(),
                        console=Console(stderr=True), disable=bool(getattr(args, "no_progress", False)),
                        transient=False)
    tasks: dict[tuple[str, str], Any] = {}

    def update(kind: str, name: str, done: int, total: int | None) -> None:
        key = (kind, name)
        if key not in tasks:
            verb = "downloading" if kind == "bytes" else "extracting"
            tasks[key] = progress.add_task(f"{verb} {name}", total=total, unit=kind)
        progress.update(tasks[key], completed=done, total=total)

    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731

    def unverified(name: str, sha256: str) -> None:  # said before the archive is extracted
        say(f"warning: no checksum is known for {name}; extracting it unverified (--allow-unverified); "
            f"its sha256 is {sha256} (pin it in a --manifest)")

    with progress:
        report = fetch_dataset(
            args.dataset, args.data_root, args.manifest,
            on_download=lambda n, d, t: update("bytes", n, d, t),
            on_extract=lambda n, d, t: update("files", n, d, t),
            delete_archives=bool(getattr(args, "delete_archives", False)),
            allow_unverified=bool(getattr(args, "allow_unverified", False)), on_unverified=unverified,
        )
    for name in report.downloaded:
        say(f"downloaded {name}")
    for name in report.resumed:
        say(f"resumed and finished {name}")
    for name in report.skipped:
        say(f"{name}: already extracted")
    for name, files in report.extracted.items():
        say(f"extracted {files} files from {name}")
    say(f"{args.dataset} is in {report.directory}: check it with "
        f"`tune data check --dataset {args.dataset} --data-root {report.directory}`")
    return 0
