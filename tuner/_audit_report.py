"""How `tune audit` shows its report: a terminal summary and a self-contained HTML page.

The page has no external resource (inline CSS, figures as base64 PNG data URIs), so it opens
from disk with no network. Figures are drawn with matplotlib's Agg canvas directly (no pyplot,
no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from rich.console import Console
from rich.table import Table

CHOICE_COLOUR, OPTIMUM_COLOUR, DEFAULT_COLOUR = "#d62728", "#2ca02c", "#333333"
OBJECTIVE_COLOUR, MIOU_COLOUR = "#1f77b4", "#ff7f0e"


# --- formatting -----------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10.0 ** -digits:  # tiny objectives keep their digits
            return f"{value:.{digits}g}"
        return f"{value + 0.0:.{digits}f}".replace("-0." + "0" * digits, "0." + "0" * digits)
    return str(value)


def fmt_ci(ci: list[float] | None, digits: int = 3) -> str:
    return "-" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _unavailable(section: Any) -> str | None:
    return section.get("unavailable") if isinstance(section, dict) else None


def headline(report: dict[str, Any]) -> list[str]:
    """The few lines that answer "how far is label-free from labelled tuning"."""
    lines = []
    regret, agreement = report.get("regret", {}), report.get("agreement", {})
    label_free = (report.get("ledger") or {}).get("choice_is_label_free") is not False
    chosen = "label-free choice" if label_free else "choice (NOT label-free, see the ledger)"
    if not _unavailable(regret):
        c, o = regret["label_free_choice"], regret["labelled_optimum"]
        lines.append(f"{chosen}: trial #{c['trial']} (objective {fmt(c['objective'], 4)}), "
                     f"mIoU {fmt(c['miou'])}, rank {regret['choice_rank_by_miou']} of "
                     f"{agreement.get('trials', '?')} by mIoU")
        lines.append(f"labelled optimum: trial #{o['trial']}, mIoU {fmt(o['miou'])}; regret "
                     f"{fmt(regret['regret'])} mIoU (95% CI {fmt_ci(regret.get('regret_ci95'))})")
    else:
        lines.append(f"regret: unavailable: {_unavailable(regret)}")
    choice = report.get("choice")
    if choice:
        line = f"choice: {choice['description']}"
        spread = choice.get("tied_miou_range")
        if spread and "mIoU ranges" not in line:
            line += f"; their mIoU ranges {fmt(spread[0])}-{fmt(spread[1])}"
        lines.append(line)
    check = report.get("confidence_check")
    if check:
        reads = "no labels" if label_free else "with the labels the search read"
        lines.append(f"confidence check ({reads}): {check['verdict']}")
    if not _unavailable(agreement) and agreement.get("undefined"):
        lines.append(f"agreement: undefined: {agreement['undefined']}")
    elif not _unavailable(agreement):
        boot = agreement.get("bootstrap", {})
        rho = agreement["spearman"]["value"]
        ci = (boot.get("spearman") or {}).get("ci95")
        lines.append(f"agreement: Spearman {fmt(rho)} (95% CI {fmt_ci(ci)}), Kendall "
                     f"{fmt(agreement['kendall']['value'])}, top-weighted tau "
                     f"{fmt(agreement['weighted_tau']['value'])} over {agreement['trials']} trials")
    return lines


# --- terminal -------------------------------------------------------------------------------------
def print_summary(report: dict[str, Any], console: Console) -> None:
    """The audit in a terminal: headline, agreement, regret, ledger, Goodhart scan, importances."""
    src = report["miou_source"]
    console.print(f"[bold]audit of study {report['study']}[/] (objective {report.get('objective')}); "
                  f"mIoU: {src['description']}", highlight=False)
    for line in headline(report):
        console.print("  " + line, highlight=False)

    agreement = report["agreement"]
    if not _unavailable(agreement) and not agreement.get("undefined"):
        boot = agreement["bootstrap"]
        table = Table(title="agreement of the objective with mIoU", title_justify="left", min_width=60)
        for col in ("statistic", "value", "95% CI (bootstrap)", "p-value"):
            table.add_column(col, justify="right" if col != "statistic" else "left")
        for key, label in (("spearman", "Spearman rho"), ("kendall", "Kendall tau-b"),
                           ("weighted_tau", "weighted tau (objective's top)")):
            table.add_row(label, fmt(agreement[key]["value"]), fmt_ci((boot.get(key) or {}).get("ci95")),
                          fmt(agreement[key]["p_value"], 3))
        console.print(table)
        if _unavailable(boot):
            console.print(f"  intervals: unavailable: {_unavailable(boot)}", highlight=False)

    regret = report["regret"]
    if not _unavailable(regret):
        default = regret["vs_default"]
        if _unavailable(default):
            console.print(f"  vs fixed settings: unavailable: {_unavailable(default)}", highlight=False)
        else:
            console.print(f"  vs fixed settings ({default['source']}): mIoU {fmt(default['miou'])}, "
                          f"choice gains {fmt(default['gain'])}", highlight=False)
        console.print(f"  vs median trial: mIoU {fmt(regret['vs_median']['median_miou'])}, choice gains "
                      f"{fmt(regret['vs_median']['gain'])}", highlight=False)
    if report.get("top_k"):
        table = Table(title="top-k by objective", title_justify="left", min_width=60)
        for col in ("k", "mIoU-best in it", "bootstrap hit rate", "share in mIoU top-k"):
            table.add_column(col, justify="right")
        for row in report["top_k"]:
            table.add_row(str(row["k_used"]), fmt(row["hit"]), fmt(row.get("bootstrap_hit_rate"), 2),
                          fmt(row["overlap"], 2))
        console.print(table)

    ledger = report["ledger"]
    console.print("[bold]leakage ledger[/]", highlight=False)
    for line in ledger_lines(ledger):
        console.print("  " + line, highlight=False)

    goodhart = report["goodhart"]
    console.print("[bold]Goodhart scan[/]", highlight=False)
    for line in goodhart_lines(goodhart):
        console.print("  " + line, highlight=False)

    imp = report["importances"]
    if _unavailable(imp):
        console.print(f"importances: unavailable: {_unavailable(imp)}", highlight=False)
    else:
        table = Table(title=f"parameter importances ({imp['evaluator']}, {imp['trials']} trials)",
                      title_justify="left", min_width=60)
        for col in ("param", "objective", "mIoU"):
            table.add_column(col, justify="right" if col != "param" else "left")
        for name in imp["objective"]:
            table.add_row(name, fmt(imp["objective"][name]), fmt((imp.get("miou") or {}).get(name)))
        console.print(table)
        for row in imp.get("left_out", []):
            console.print(f"  {row['param']}: left out ({row['reason']})", highlight=False)
    for note in report.get("warnings", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def ledger_lines(ledger: dict[str, Any]) -> list[str]:
    touched = ledger["labels_touched"]
    lines = [
        f"labels the study touched: {', '.join(touched) if isinstance(touched, list) else touched}",
        f"objective {ledger['objective']} reads "
        + ("no labels" if ledger["objective_labels"] == "none" else f"{ledger['objective_labels']} labels")
        + "; candidate rule "
        f"{ledger['candidate_rule']} (in trials: {', '.join(ledger['candidate_rules_in_trials'])})",
        *(["search protocol paper: every caption lists the whole vocabulary, and each tuning image's "
           "ground-truth classes (image-level labels) are its candidates"]
          if ledger.get("search_protocol") == "paper" else []),
        "labels the choice read: " + "; ".join(ledger["choice_label_use"]),
        f"pixel labels in the study: {ledger['pixel_labels_in_study']}",
        f"pixel labels in this audit: {ledger['pixel_labels_in_audit']}",
    ]
    for source in ledger.get("external_sources") or []:
        lines.append(f"external source (not labels): {source.get('kind')} {source.get('path')}, sha256 "
                     f"{source.get('sha256')}, {source.get('images')} images listed")
    t = ledger["tuning"]
    lines.append(f"tuned on {t['images']} images of {t['dataset']}/{t['split']} (seed {t['seed']})")
    for key, what in (("declared_eval", "study's eval split"), ("miou_images", "images mIoU is measured on")):
        row = ledger.get(key)
        if row:
            lines.append(f"{what}: {row.get('dataset')}/{row.get('split')}: overlap with the tuning images "
                         f"{fmt(row.get('overlap'))} ({row.get('note', '')})")
    return lines


def goodhart_lines(goodhart: dict[str, Any]) -> list[str]:
    lines = []
    if _unavailable(goodhart):
        lines.append(f"discordant pairs: unavailable: {_unavailable(goodhart)}")
    else:
        lines.append(f"objective up while mIoU down: {goodhart['discordant']} of {goodhart['pairs']} trial "
                     f"pairs ({fmt(goodhart['fraction'], 2)}; {goodhart['tied']} tied)")
        for w in goodhart["worst"][:3]:
            lines.append(f"  #{w['from_trial']} -> #{w['to_trial']}: objective "
                         f"+{fmt(w['objective_gain'], 4)}, mIoU -{fmt(w['miou_drop'])}")
        per_class = goodhart.get("per_class", {})
        if _unavailable(per_class):
            lines.append(f"per class: unavailable: {_unavailable(per_class)}")
        elif per_class.get("same_trial"):
            lines.append("per class: the label-free choice is the labelled optimum")
        else:
            rows = sorted((r for r in per_class["classes"] if r["difference"] is not None),
                          key=lambda r: r["difference"])
            worst = ", ".join(f"{r['class']} {r['difference']:+.3f}" for r in rows[:3])
            lines.append(f"per class, choice #{per_class['choice']} - optimum #{per_class['optimum']}: "
                         f"largest losses {worst or '-'}")
    area = goodhart.get("mask_area", {})
    if _unavailable(area):
        lines.append(f"mask area: unavailable: {_unavailable(area)}")
    else:
        verdict = "the objective may reward mask area rather than correctness" if area["rewards_area"] \
            else "no sign the objective rewards mask area over correctness"
        lines.append("mask area: Spearman(objective, foreground) "
                     f"{fmt(area['spearman_objective_foreground'])}, Spearman(mIoU, foreground) "
                     f"{fmt(area['spearman_miou_foreground'])}: {verdict}")
    return lines


# --- figures --------------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def figures(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, caption, base64 PNG) for each figure the report's data allows."""
    out = []
    for make in (_scatter, _history, _importances, _per_class, _mask_area):
        made = make(report)
        if made is not None:
            out.append(made)
    return out


def _marked(report: dict[str, Any]) -> tuple[dict | None, dict | None, dict | None]:
    regret = report.get("regret", {})
    if _unavailable(regret):
        return None, None, None
    default = regret.get("vs_default", {})
    default = None if _unavailable(default) or default.get("objective") is None else default
    return regret["label_free_choice"], regret["labelled_optimum"], default


def _scatter(report):
    rows = [r for r in report["trials_table"] if r["miou"] is not None]
    if len(rows) < 2:
        return None
    import numpy as np
    from scipy.stats import rankdata

    choice, optimum, default = _marked(report)
    fig, axes = _new_figure(10.0, 4.2, cols=2)
    left, right = axes[0, 0], axes[0, 1]
    numbers = [r["trial"] for r in rows]
    obj, miou = np.array([r["objective"] for r in rows]), np.array([r["miou"] for r in rows])
    ranks = (rankdata(obj) / obj.size, rankdata(miou) / miou.size)  # what Spearman correlates
    for ax, (xs, ys), xlabel, ylabel in (
        (left, (obj, miou), "objective (study value, tuning images)", "mIoU"),
        (right, ranks, "objective rank (fraction of trials)", "mIoU rank (fraction of trials)"),
    ):
        ax.scatter(xs, ys, s=22, color="#8c8c8c", label="trials", zorder=2)
        for point, marker, colour, label, size in (
            (optimum, "D", OPTIMUM_COLOUR, "labelled optimum", 90),
            (choice, "*", CHOICE_COLOUR, "label-free choice", 200),
            (default, "X", DEFAULT_COLOUR, "fixed settings", 90),
        ):
            if point is None:
                continue
            if point.get("trial") is not None:
                label = f"{label} (#{point['trial']})"
            if ax is left:
                ax.scatter([point["objective"]], [point["miou"]], marker=marker, s=size, color=colour,
                           label=label, zorder=3)
            elif point.get("trial") in numbers:  # a trial: mark its ranks
                i = numbers.index(point["trial"])
                ax.scatter([xs[i]], [ys[i]], marker=marker, s=size, color=colour, label=label, zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    agreement = report["agreement"]
    rho = None if _unavailable(agreement) else agreement["spearman"]["value"]
    left.set_title("values", fontsize=10)
    right.set_title(f"ranks (Spearman {fmt(rho)})", fontsize=10)
    return ("Objective vs mIoU", "Each dot is a completed trial; left on the values, right on their ranks "
            "(robust to the objective's scale). Upper right is where both agree; a choice far below the "
            "optimum is regret.", _png(fig))



def _history(report):
    rows = report["trials_table"]
    fig, axes = _new_figure(7.2, 5.0, rows=2, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    numbers = [r["trial"] for r in rows]
    values = [r["objective"] for r in rows]
    best, best_row, running, chosen_miou, best_miou = -float("inf"), None, [], [], []
    top_miou = -float("inf")
    for r in rows:
        if r["objective"] > best:
            best, best_row = r["objective"], r
        running.append(best)
        chosen_miou.append(best_row["miou"] if best_row["miou"] is not None else float("nan"))
        if r["miou"] is not None:
            top_miou = max(top_miou, r["miou"])
        best_miou.append(top_miou if top_miou > -float("inf") else float("nan"))
    top.scatter(numbers, values, s=14, color=OBJECTIVE_COLOUR, alpha=0.6, label="trial")
    top.step(numbers, running, where="post", color=OBJECTIVE_COLOUR, label="best so far")
    top.set_ylabel("objective")
    top.legend(fontsize=8, loc="lower right")
    top.grid(alpha=0.3)
    with_miou = [r for r in rows if r["miou"] is not None]
    if with_miou:
        bottom.scatter([r["trial"] for r in with_miou], [r["miou"] for r in with_miou], s=14,
                       color=MIOU_COLOUR, alpha=0.6, label="trial")
        bottom.step(numbers, best_miou, where="post", color=OPTIMUM_COLOUR, label="labelled optimum so far")
        bottom.step(numbers, chosen_miou, where="post", color=CHOICE_COLOUR,
                    label="label-free choice so far")
        bottom.legend(fontsize=8, loc="lower right")
    else:
        bottom.text(0.5, 0.5, "no mIoU", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("mIoU")
    bottom.set_xlabel("trial")
    bottom.grid(alpha=0.3)
    return ("Optimisation history", "Top: the objective the sampler saw. Bottom: mIoU of each trial, of the "
            "label-free choice at each point of the study, and of the best trial labels would have picked; "
            "the gap between the red and green lines is the regret so far.", _png(fig))


def _importances(report):
    imp = report["importances"]
    if _unavailable(imp) or not imp.get("objective"):
        return None
    names = list(imp["objective"])[::-1]
    import numpy as np

    y = np.arange(len(names))
    fig, axes = _new_figure(6.4, 0.5 * len(names) + 1.4)
    ax = axes[0, 0]
    has_miou = bool(imp.get("miou"))
    h = 0.38 if has_miou else 0.6
    ax.barh(y + (h / 2 if has_miou else 0), [imp["objective"][n] for n in names], height=h,
            color=OBJECTIVE_COLOUR, label="objective")
    if has_miou:
        ax.barh(y - h / 2, [imp["miou"].get(n, 0.0) for n in names], height=h, color=MIOU_COLOUR,
                label="mIoU")
    ax.set_yticks(y, names)
    ax.set_xlabel(f"importance ({imp['evaluator']}, normalised)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return ("Parameter importances", "What drives the objective beside what drives mIoU, on the same trials. "
            "A parameter that matters for one and not the other is where the objective misleads the search.",
            _png(fig))


def _per_class(report):
    per_class = report.get("goodhart", {}).get("per_class")
    if not per_class or _unavailable(per_class):
        return None
    rows = [r for r in per_class["classes"] if r["choice"] is not None or r["optimum"] is not None]
    if not rows:
        return None
    import numpy as np

    x = np.arange(len(rows))
    fig, axes = _new_figure(max(6.4, 0.45 * len(rows) + 2), 3.8)
    ax = axes[0, 0]
    ax.bar(x - 0.2, [r["choice"] or 0.0 for r in rows], width=0.4, color=CHOICE_COLOUR,
           label=f"label-free choice #{per_class['choice']}")
    ax.bar(x + 0.2, [r["optimum"] or 0.0 for r in rows], width=0.4, color=OPTIMUM_COLOUR,
           label=f"labelled optimum #{per_class['optimum']}")
    ax.set_xticks(x, [r["class"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return ("IoU per class", "Where the label-free choice loses (or wins) against the labelled optimum.",
            _png(fig))


def _mask_area(report):
    area = report.get("goodhart", {}).get("mask_area", {})
    rows = [r for r in report["trials_table"] if r["foreground"] is not None]
    if _unavailable(area) or len(rows) < 3:
        return None
    with_miou = [r for r in rows if r["miou"] is not None]
    fig, axes = _new_figure(8.0, 3.4, cols=2)
    left, right = axes[0, 0], axes[0, 1]
    left.scatter([r["foreground"] for r in rows], [r["objective"] for r in rows], s=16,
                 color=OBJECTIVE_COLOUR)
    left.set_ylabel("objective")
    left.set_title(f"Spearman {fmt(area['spearman_objective_foreground'])}", fontsize=9)
    right.scatter([r["foreground"] for r in with_miou], [r["miou"] for r in with_miou], s=16,
                  color=MIOU_COLOUR)
    right.set_ylabel("mIoU")
    right.set_title(f"Spearman {fmt(area['spearman_miou_foreground'])}", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("mean predicted foreground fraction")
        ax.grid(alpha=0.3)
        if area.get("true_foreground") is not None:
            ax.axvline(area["true_foreground"], color="#555555", linestyle="--", linewidth=1)
    return ("Mask area", "Does the objective follow how much of each image the masks cover? The dashed line "
            "is the true foreground fraction of the labelled images.", _png(fig))


# --- HTML -----------------------------------------------------------------------------------------
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0;
       background: #f6f6f4; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 16px; }
.headline { background: #f0f4fa; border-left: 4px solid #1f77b4; padding: 10px 14px; margin: 12px 0; }
.headline p { margin: 3px 0; }
.warn { background: #fff6e5; border-left: 4px solid #e6a100; padding: 8px 14px; margin: 10px 0; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #fafafa; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.choice td { background: #fdecec; } tr.optimum td { background: #eaf6ea; }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
.unavailable { color: #8a5a00; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; }
"""


def _e(value: Any) -> str:
    return html.escape(fmt(value) if not isinstance(value, str) else value)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(),
           classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="n">{_e(v)}</td>' if j in numeric else f"<td>{_e(v)}</td>"
                        for j, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _list(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _na(section: Any) -> str:
    return f'<p class="unavailable">unavailable: {html.escape(_unavailable(section) or "")}</p>'


def render_html(report: dict[str, Any]) -> str:
    """The audit as one HTML page with everything inline."""
    parts: list[str] = []
    add = parts.append
    src = report["miou_source"]
    add(f"<h1>Audit of study {html.escape(report['study'])}</h1>")
    add(f'<p class="sub">objective <code>{_e(report.get("objective"))}</code> &middot; mIoU: '
        f"{_e(src['description'])} &middot; {_e(report['created'])} &middot; storage "
        f"<code>{_e(report['storage'])}</code></p>")
    add('<div class="headline">' + "".join(f"<p>{html.escape(line)}</p>" for line in headline(report))
        + "</div>")
    for note in report.get("warnings", []):
        add(f'<div class="warn">{html.escape(note)}</div>')

    add("<h2>1. Agreement of the objective with mIoU</h2>")
    agreement = report["agreement"]
    if _unavailable(agreement):
        add(_na(agreement))
    else:
        boot = agreement["bootstrap"]
        rows = [[label, agreement[k]["value"], fmt_ci((boot.get(k) or {}).get("ci95")),
                 agreement[k]["p_value"]]
                for k, label in (("spearman", "Spearman rho"), ("kendall", "Kendall tau-b"),
                                 ("weighted_tau", "weighted Kendall tau, objective's top weighted"))]
        add(_table(["statistic", "value", "95% CI", "p-value"], rows, numeric={1, 2, 3}))
        add(f"<p>{agreement['trials']} trials. The weighted tau gives an exchange between the objective's "
            "ranks r and s the weight 1/(r+1) + 1/(s+1): disagreements where the tuner picks its answer "
            "count most, those among its worst trials hardly at all.</p>")
        if _unavailable(boot):
            add(_na(boot))
        else:
            add(f"<p>Intervals: {boot['replicates']} bootstrap replicates (seed {boot['seed']}) over images: "
                f"{html.escape(boot['resampling'])}; each trial's objective is its mean over the drawn "
                f"images, its mIoU is computed once on the summed per-class counts of the drawn images; "
                f"{boot['trials']} trials, {boot['images_objective']} objective and {boot['images_miou']} "
                f"mIoU images.</p>")
        if agreement.get("spearman_same_images") is not None:
            add(f"<p>Spearman of the objective with mIoU when both are measured on the evaluation images: "
                f"{fmt(agreement['spearman_same_images'])}.</p>")

    add("<h2>2. Regret</h2>")
    regret = report["regret"]
    if _unavailable(regret):
        add(_na(regret))
    else:
        c, o = regret["label_free_choice"], regret["labelled_optimum"]
        default = regret["vs_default"]
        rows = [
            ["label-free choice (best objective)", f"#{c['trial']}", c["objective"], c["miou"], "-"],
            ["labelled optimum (best mIoU)", f"#{o['trial']}", o["objective"], o["miou"],
             f"{fmt(regret['regret'])} {fmt_ci(regret.get('regret_ci95'))}"],
            ["median trial", "-", "-", regret["vs_median"]["median_miou"], fmt(-regret["vs_median"]["gain"])],
        ]
        if _unavailable(default):
            rows.append(["fixed settings", "-", "-", "unavailable", _unavailable(default)])
        else:
            above = fmt(-default["gain"]) if default.get("gain") is not None else "-"
            rows.append([f"fixed settings ({default['source']})", "-", default.get("objective"),
                         default["miou"], above])
        add(_table(["", "trial", "objective", "mIoU", "mIoU above the choice"], rows, numeric={2, 3}))
        add(f"<p>The choice ranks {regret['choice_rank_by_miou']} by mIoU; relative regret "
            f"{fmt(regret.get('relative_regret'))}.</p>")
        add(_table(["k", "mIoU-best trial in objective's top k", "bootstrap hit rate",
                    "share of objective's top k in mIoU's top k"],
                   [[r["k_used"], r["hit"], r.get("bootstrap_hit_rate"), r["overlap"]]
                    for r in report["top_k"]],
                   numeric={0, 2, 3}))

    add("<h2>3. Leakage ledger</h2>")
    add(_list(ledger_lines(report["ledger"])))

    add("<h2>4. Goodhart scan</h2>")
    goodhart = report["goodhart"]
    add(_list(goodhart_lines(goodhart)))
    if not _unavailable(goodhart) and goodhart.get("worst"):
        add(_table(["from trial", "to trial", "objective gain", "mIoU drop"],
                   [[f"#{w['from_trial']}", f"#{w['to_trial']}", w["objective_gain"], w["miou_drop"]]
                    for w in goodhart["worst"]], numeric={2, 3}))
    per_class = goodhart.get("per_class") if not _unavailable(goodhart) else None
    if per_class and not _unavailable(per_class):
        rows = sorted(per_class["classes"], key=lambda r: (r["difference"] is None, r["difference"] or 0.0))
        add(_table(["class", f"choice #{per_class['choice']}", f"optimum #{per_class['optimum']}",
                    "difference"], [[r["class"], r["choice"], r["optimum"], r["difference"]] for r in rows],
                   numeric={1, 2, 3}))

    add("<h2>5. Parameter importances</h2>")
    imp = report["importances"]
    if _unavailable(imp):
        add(_na(imp))
    else:
        add(_table(["parameter", "objective", "mIoU"],
                   [[n, v, (imp.get("miou") or {}).get(n)] for n, v in imp["objective"].items()],
                   numeric={1, 2}))
        extra = [f"{r['param']}: left out ({r['reason']})" for r in imp.get("left_out", [])]
        extra += imp.get("notes", [])
        add(f"<p>{html.escape(imp['evaluator'])} over {imp['trials']} trials.</p>")
        if extra:
            add(_list(extra))

    add("<h2>Figures</h2>")
    try:
        made = figures(report)
    except ImportError:
        made = []
        add('<p class="unavailable">figures need matplotlib: <code>pip install matplotlib</code></p>')
    for title, caption, data in made:
        add(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{html.escape(title)}.</b> {html.escape(caption)}</figcaption></figure>")

    add("<h2>Trials</h2>")
    rows, classes = [], []
    for r in report["trials_table"]:
        params = ", ".join(f"{k}={fmt(v, 4)}" for k, v in r["params"].items())
        rows.append([f"#{r['trial']}", r["objective"], r["miou"], r["foreground"], r["evaluated"], params])
        classes.append("choice" if r["label_free_choice"] else "optimum" if r["labelled_optimum"] else "")
    add(_table(["trial", "objective", "mIoU", "foreground", "re-evaluated", "params"], rows,
               numeric={1, 2, 3}, classes=classes))
    consistency = report.get("consistency")
    if consistency:
        add(f"<p>Re-evaluation against the study's stored values ({consistency['trials']} trials): max |d "
            f"objective| per image {fmt(consistency['objective_max_abs_diff'], 6)}, max |d mIoU| "
            f"{fmt(consistency['miou_max_abs_diff'], 6)}; reproduced: {fmt(consistency['reproduced'])}.</p>")
    body = "\n".join(parts)
    title = html.escape(f"audit: {report['study']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n")
