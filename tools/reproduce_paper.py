"""Evaluate the `official` preset on the PnP-OVSS paper's five benchmarks, under both protocols.

    python tools/reproduce_paper.py --data-root DATA [--device cuda] [--images N]
        [--lists voc=voc_lists.json --lists ade20k=ade_lists.json ...] [-o reproduce.json]

For each benchmark (VOC, COCO-Object, PASCAL Context, COCO-Stuff, ADE20K) it builds
`SegmenterConfig.preset("official", dataset=...)` with the benchmark's background rule (always
for VOC and COCO-Object, only for fewer than 3 candidates elsewhere, as the authors' scripts do),
runs `tune eval`'s `evaluate_config(..., protocol="both")` on the validation split and prints the
paper's mIoU beside ours under the paper's protocol (background counted, VOC 255 as background,
...) and under the standard MMSeg protocol. DATA holds the datasets under their usual names
(`tune data check --dataset NAME` shows the expected trees).

The paper's test-time candidates are GPT-4o class lists per image: give them with
`--lists DATASET=FILE` (a `candidates_file`, JSON {image_id: [names]}; `tools/gpt4o_lists.py`
converts the authors' published files). Benchmarks without a list use `--candidates`
(default `clip_topk`, which needs the CLIP model of `--clip-model`), and the table says so.

It runs end to end on CPU on tiny fixtures (tests/test_reproduce_paper.py); the real numbers
need the published BLIP (about 1.8 GB), the datasets, and a GPU for hours.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Benchmark:
    """One column of the paper's table: our dataset name, the paper's mIoU, the background rule."""

    label: str
    dataset: str
    paper_miou: float  # PnP-OVSS (CVPR 2024), BLIP, the paper's main table
    background: str  # the authors' scripts: always, or "auto" (only when fewer than 3 candidates)


BENCHMARKS = (
    Benchmark("VOC", "voc", 51.3, "always"),
    Benchmark("COCO-Object", "coco", 36.2, "always"),
    Benchmark("PC-59", "context", 28.0, "auto"),
    Benchmark("COCO-Stuff", "coco_stuff", 17.9, "auto"),
    Benchmark("ADE20K", "ade20k", 14.2, "auto"),
)
BY_NAME = {b.dataset: b for b in BENCHMARKS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="directory holding the datasets under their usual names")
    p.add_argument("--datasets", default=",".join(b.dataset for b in BENCHMARKS),
                   help="comma-separated benchmarks (default: all five: %(default)s)")
    p.add_argument("--model", default=None, help="BLIP ITM model id or directory (default: the preset's, "
                   "Salesforce/blip-itm-large-flickr)")
    p.add_argument("--image-size", type=int, default=None, help="BLIP input side (default: the preset's 336)")
    p.add_argument("--layer", type=int, default=None, help="GradCAM layer (default: the paper's 8)")
    p.add_argument("--heads", default=None, help="comma-separated heads (default: the paper's 9)")
    p.add_argument("--lists", action="append", default=[], metavar="DATASET=FILE",
                   help="per-image class lists (candidates: file) for a benchmark; repeat per benchmark")
    p.add_argument("--candidates", default="clip_topk", choices=("clip_topk", "itm_threshold", "all"),
                   help="candidate rule where no list is given (default %(default)s)")
    p.add_argument("--clip-model", default=None, help="CLIP model of clip_topk (default: the preset's)")
    p.add_argument("--split", default="val", help="split to evaluate (default %(default)s)")
    p.add_argument("--images", type=int, default=None,
                   help="evaluate a seeded subset of N images per benchmark")
    p.add_argument("--seed", type=int, default=0, help="seed of that subset (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", default="auto", help="images per model batch (default auto)")
    p.add_argument("--cache-dir", default=None, help="map cache directory (default: none)")
    p.add_argument("-o", "--output", default=None, help="write the results as JSON here too")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _lists(pairs: list[str], wanted: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lists {pair!r}: write DATASET=FILE, e.g. --lists voc=voc_lists.json")
        if name not in wanted:
            raise ValueError(f"--lists {pair!r}: {name!r} is not among the benchmarks run "
                             f"({', '.join(wanted)})")
        if not Path(path).is_file():
            raise ValueError(f"--lists {pair!r}: no such file {path}")
        out[name] = Path(path)
    return out


def benchmark_config(bench: Benchmark, args: argparse.Namespace, lists: dict[str, Path]):
    """The official preset for one benchmark, with its background rule and candidates."""
    from segmenter import SegmenterConfig

    changes: dict = {"background": bench.background, "background_min_classes": 3}
    if args.model:
        changes["model"] = args.model
    if args.image_size:
        changes["image_size"] = args.image_size
    if args.layer:
        changes["layer"] = args.layer
    if args.heads:
        changes["heads"] = tuple(int(h) for h in args.heads.split(","))
    if bench.dataset in lists:
        changes.update(candidates="file", candidates_file=str(lists[bench.dataset].resolve()))
    else:
        changes["candidates"] = args.candidates
        if args.clip_model:
            changes["candidates_model"] = args.clip_model
    return SegmenterConfig.preset("official", dataset=bench.dataset, **changes)


def run(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Evaluate each benchmark, appending its row to `rows` as it finishes (kept on a later error).

    Before the model loads: the layouts, the split, and every `--lists` file against the images it
    will be asked for. ValueError naming the benchmark for a failure during an evaluation.
    """
    from rich.console import Console
    from rich.progress import Progress

    from segmenter.candidate_file import load_candidate_file
    from tuner.datasets import load_dataset
    from tuner.evaluate import evaluate_config
    from tuner.study import pick_tuning_ids

    wanted = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown or not wanted:
        raise ValueError(f"--datasets: {', '.join(unknown) or 'none given'}: choose from "
                         f"{', '.join(BY_NAME)}")
    lists = _lists(args.lists, wanted)
    datasets = {name: load_dataset(name, root=args.data_root) for name in wanted}  # layouts checked first
    for dataset in datasets.values():
        dataset.check_split(args.split)
    for name, path in lists.items():  # a bad list fails now, not after the benchmarks before it
        dataset = datasets[name]
        ids = (pick_tuning_ids(dataset, args.split, args.images, args.seed) if args.images
               else dataset.ids(args.split))
        load_candidate_file(path).check(ids, dataset.vocabulary, dataset.vocabulary_synonyms,
                                        f"images of {name}/{args.split}")
    backend = None
    console = Console(stderr=True)
    for name in wanted:
        bench, dataset = BY_NAME[name], datasets[name]
        config = benchmark_config(bench, args, lists)
        if backend is None:
            from segmenter import load_backend

            backend = load_backend(config.backend, config.model, config.revision,
                                   device=None if args.device == "auto" else args.device, dtype=config.dtype)
        with Progress(console=console, disable=args.no_progress) as progress:
            task = progress.add_task(f"{bench.label}", total=args.images or len(dataset.ids(args.split)))
            try:
                result = evaluate_config(
                    config, dataset, args.split, images=args.images, seed=args.seed, backend=backend,
                    cache_dir=args.cache_dir, batch_size=args.batch_size, protocol="both",
                    on_image=lambda n, task=task: progress.update(task, completed=n),
                )
            except ValueError as err:
                raise ValueError(f"{bench.label} ({name}): {err}") from None
        rows.append({
            "benchmark": bench.label, "dataset": name, "paper_miou": bench.paper_miou,
            "miou_paper_protocol": 100 * result["paper"]["miou"], "miou_standard": 100 * result["miou"],
            "images": result["images"], "skipped": len(result.get("skipped", [])),
            "candidates": f"file {lists[name].name}" if name in lists else config.candidates,
            "paper_rule": result["paper"].get("rule"),
        })
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="PnP-OVSS official preset: the paper's mIoU beside ours")
    for column in ("benchmark", "paper", "ours, paper protocol", "ours, standard", "images", "candidates"):
        table.add_column(column, justify="left" if column in ("benchmark", "candidates") else "right")
    for row in rows:
        table.add_row(row["benchmark"], f"{row['paper_miou']:.1f}", f"{row['miou_paper_protocol']:.1f}",
                      f"{row['miou_standard']:.1f}", str(row["images"]), row["candidates"])
    console = Console()
    console.print(table)
    console.print("paper protocol: background counted, VOC/COCO-Stuff 255 as background, ADE20K label 0 "
                  "and Context background counted; standard: the MMSeg harness (README, Evaluation "
                  "protocols). The paper's candidates are GPT-4o lists: compare rows with `file` candidates.",
                  highlight=False)


def _write(rows: list[dict], args: argparse.Namespace) -> None:
    print_table(rows, args)
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict] = []
    try:
        if args.output:  # checked before hours of evaluation, not after
            out = Path(args.output)
            if out.is_dir() or not out.parent.is_dir():
                raise ValueError(f"-o {args.output}: give a file in an existing directory")
        run(args, rows)
    except (ValueError, OSError) as err:
        if rows:  # the benchmarks that finished are kept
            _write(rows, args)
        done = ", ".join(r["benchmark"] for r in rows)
        where = "the table above" + (f" and {args.output}" if args.output else "")
        kept = f" (finished before it, in {where}: {done})"
        print(f"error: {err}" + (kept if rows else ""), file=sys.stderr)
        return 2
    _write(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
