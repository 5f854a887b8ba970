"""`tune audit`: how far a label-free study's choice is from what labels would have chosen.

    tune audit --study shapes-clip_reward                     # mIoU the study recorded
    tune audit --study coco-clip_reward --dataset coco --split val --images 200   # fill mIoU in

What it measures, over the study's completed trials (pruned ones have no value):

1. Agreement of the objective with mIoU: Spearman, Kendall tau-b, and a top-weighted Kendall
   tau (weights 1/(r+1) by the objective's rank r: disagreement where the tuner picks counts
   most), with bootstrap intervals over images.
2. Regret: mIoU of the labelled optimum minus mIoU of the label-free choice (the study's best
   trial, what `tune export` writes); the choice against the study's fixed (default) settings
   and the median trial; top-k hit rates.
3. The leakage ledger: which labels the study touched, which images it tuned on, and whether
   they overlap the images mIoU is measured on.
4. A Goodhart scan: trial pairs where the objective rises while mIoU falls, IoU per class of
   the choice against the optimum, and whether the objective follows mask area.
5. Parameter importances for the objective and for mIoU side by side.

Where mIoU comes from: the trials' "miou" user attrs (measured on the tuning images, never
seen by the sampler), or, with `--dataset/--split`, a re-evaluation of the label-free choice,
the top trials and a seeded sample of the others on a labelled split. Intervals need per-image
segmentation counts, which a study does not store, so the audit re-evaluates the trials'
configs image by image through the study's own models and map cache (no VLM runs when the
cache is warm) and checks that it reproduces the stored values. `--protocol paper` scores
mIoU as PnP-OVSS's own code does (tuner.datasets.PROTOCOLS); a study stores standard-protocol
mIoU, so under it every mIoU is the audit's own re-evaluation. A study whose trials store
"class_counts_per_image" and "foreground_per_image" needs no re-evaluation (format:
`tuner._audit._trial_counts`).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

#: the engine's public names, imported on first use (scipy and optuna make it slow to import)
_ENGINE = ("AuditOptions", "audit_study", "run_audit", "write_audit")

__all__ = [*_ENGINE, "add_audit_command", "cmd_audit"]


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        from . import _audit

        return getattr(_audit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- CLI -------------------------------------------------------------------------------------------------
def add_audit_command(subparsers) -> argparse.ArgumentParser:
    """Register `tune audit` on an argparse subparsers object; the handler is `cmd_audit`."""
    from .cli import non_negative_int, positive_int

    audit = subparsers.add_parser(
        "audit", help="how far the label-free choice is from what labels would have chosen",
        description="Compare a study's objective with mIoU: rank agreement with bootstrap intervals, "
                    "regret, leakage ledger, Goodhart scan, importances. Writes audit.json and audit.html.",
    )
    audit.add_argument("--study", required=True)
    audit.add_argument("--storage", default=os.environ.get("OVSS_STORAGE", "sqlite:///runs/tune.db"),
                       help="Optuna storage URL (default %(default)s)")
    audit.add_argument("--dataset", help="evaluate trials' configs on this dataset for mIoU (default: the "
                                         "study's, when --split is given)")
    audit.add_argument("--split", help="labelled split to evaluate on (default: the study's eval split, "
                                       "when --dataset is given); the study's tuning images are left out")
    audit.add_argument("--images", type=positive_int,
                       help="evaluation images, a seeded subset (default: as many as the study tuned on)")
    audit.add_argument("--data-root", default=os.environ.get("OVSS_DATA"), help="dataset directory")
    audit.add_argument("--max-trials", type=positive_int, default=50,
                       help="trials re-evaluated at most: the label-free choice, the top 5, then a seeded "
                            "sample (default %(default)s)")
    audit.add_argument("--no-reevaluate", action="store_true",
                       help="use only what the study stored (no intervals, no mask-area check)")
    audit.add_argument("--bootstrap", type=non_negative_int, default=1000,
                       help="bootstrap replicates over images, 0 to skip (default %(default)s)")
    audit.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of the bootstrap and the samples")
    audit.add_argument("--protocol", choices=["standard", "paper"], default="standard",
                       help="evaluation protocol of mIoU: standard (default) or paper (as PnP-OVSS's own "
                            "code, background counted; re-evaluates a study's stored standard-protocol mIoU)")
    audit.add_argument("--importance", choices=["auto", "fanova", "ped-anova"], default="auto",
                       help="importance evaluator (auto: fANOVA when scikit-learn is installed)")
    audit.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    audit.add_argument("--cache-dir", default="runs/cache", help="map cache directory of the study")
    audit.add_argument("--no-cache", action="store_true", help="recompute every map")
    audit.add_argument("--batch-size", type=positive_int, default=8,
                       help="images per model batch (default %(default)s)")
    audit.add_argument("--no-progress", action="store_true")
    audit.add_argument("-o", "--output", help="output directory (default runs/audit/<study>)")
    return audit


def cmd_audit(args, console) -> int:
    """`tune audit`: run the audit, print the summary, write audit.json and audit.html."""
    from ._audit import AuditOptions, run_audit, write_audit
    from ._audit_report import print_summary
    from .outputs import writable_dir

    if args.images is not None and args.images < 1:
        raise ValueError("--images must be at least 1")
    out_dir = Path(args.output) if args.output else Path("runs/audit") / re.sub(r"[^\w.-]+", "_", args.study)
    writable_dir(out_dir, "audit output directory", create=False)  # before the audit's work, not after
    options = AuditOptions(
        study=args.study, storage=args.storage, dataset=args.dataset, split=args.split, images=args.images,
        max_trials=args.max_trials, reevaluate=not args.no_reevaluate, bootstrap=args.bootstrap,
        seed=args.seed, importance=args.importance, device=None if args.device == "auto" else args.device,
        cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
        data_root=args.data_root, progress=not args.no_progress, protocol=args.protocol,
    )
    report = run_audit(options)
    print_summary(report, console)  # shown even if writing fails below
    json_path, html_path = write_audit(report, out_dir)
    console.print(f"wrote {json_path} and {html_path}", highlight=False)
    return 0
