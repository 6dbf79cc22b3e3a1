"""Compare runs and studies: a table, accuracy per round, Pareto fronts; markdown, PNG, HTML.

Inputs are run directories (``summary.json``) and study directories (``study.json`` from
``stamen sweep``), in any mix. Runs are grouped by the keys that vary between them except
the seed — a study's varied keys, or for loose runs the config keys whose values differ —
and every number is the mean over the group's seeds, ``± sample standard deviation``
(n − 1 in the denominator) when there are several (no ``±`` when all seeds agree).

Figures (only those with data):

- ``accuracy_per_round.png``: test accuracy per round, one line per group (mean, shaded ± std);
- ``pareto_uplink.png``: final accuracy against total uplink bytes (fewer bytes, more accuracy);
- ``pareto_epsilon.png``: final accuracy against ε (less ε, more accuracy);
- ``pareto_robust.png``: final accuracy against robust accuracy (both higher).

In a Pareto plot every group is a point with ± std error bars; the non-dominated groups are
joined by the front's staircase and labelled. ``report.md`` holds the table and links the
PNGs; ``report.html`` is self-contained (figures embedded as base64 data URIs); ``groups.csv``
has the table's numbers unrounded.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import statistics
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stamen.server.results import RunDirectory, atomic_write


class ReportError(ValueError):
    """An input that cannot be reported on; the message names the path."""


#: (column, heading, format) of the metrics in the comparison table
METRICS = (
    ("final_test_accuracy", "final acc", "{:.4f}"),
    ("best_test_accuracy", "best acc", "{:.4f}"),
    ("total_uplink_bytes", "uplink bytes", "{:.0f}"),
    ("total_downlink_bytes", "downlink bytes", "{:.0f}"),
    ("epsilon", "ε", "{:.3f}"),
    ("robust_accuracy", "robust acc", "{:.4f}"),
    ("rounds", "rounds", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
)
OPTIONAL = ("epsilon", "robust_accuracy")
_IGNORED_KEYS = {"run.seed", "run.name", "run.out_dir"}


# ---------------------------------------------------------------------------------------
# reading runs
# ---------------------------------------------------------------------------------------
def _last(rows: list[dict[str, Any]], key: str):
    for r in reversed(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return v
    return None


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_outcome(run_dir: str | Path) -> dict[str, Any]:
    """What a finished run achieved, from its summary.json (and metrics.jsonl for what the summary lacks).

    ε / δ: the summary's ``epsilon`` / ``delta``, else the last round's; robust accuracy: the
    summary's ``final_robust_accuracy`` (or ``robust_accuracy``), else the last round's.
    """
    run = RunDirectory(run_dir)
    if not run.summary_path.is_file():
        raise ReportError(f"{run.path} has no summary.json (an unfinished run?)")
    try:
        summary = run.read_summary()
        rows = run.read_metrics()
    except (OSError, ValueError) as err:
        raise ReportError(f"{run.path}: unreadable results ({err})") from None
    out = {k: _num(summary.get(k)) for k in ("final_test_accuracy", "best_test_accuracy", "total_uplink_bytes",
                                             "total_downlink_bytes", "rounds", "wall_s")}
    out["epsilon"] = _num(summary.get("epsilon"))
    if out["epsilon"] is None:
        out["epsilon"] = _last(rows, "epsilon")
    out["delta"] = _num(summary.get("delta"))
    if out["delta"] is None:
        out["delta"] = _last(rows, "delta")
    robust = _num(summary.get("final_robust_accuracy"))
    if robust is None:
        robust = _num(summary.get("robust_accuracy"))
    out["robust_accuracy"] = robust if robust is not None else _last(rows, "robust_accuracy")
    return out


@dataclass
class RunRecord:
    path: Path
    source: str  # the study's name, or "runs" for loose run directories
    config: dict[str, Any]  # flattened section.key -> value
    outcome: dict[str, Any]
    metrics: list[dict[str, Any]]
    varied: list[str] = field(default_factory=list)  # the keys that vary in its source

    @property
    def seed(self):
        return self.config.get("run.seed")


def _flat_config(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.toml"
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ReportError(f"{run_dir}: unreadable config.toml ({err})") from None
    return {f"{s}.{k}": v for s, sec in data.items() if isinstance(sec, dict) for k, v in sec.items()}


def _record(run_dir: Path, source: str) -> RunRecord:
    outcome = read_outcome(run_dir)
    return RunRecord(run_dir, source, _flat_config(run_dir), outcome, RunDirectory(run_dir).read_metrics())


def collect_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """Every finished run under ``paths`` (run or study directories), with its varied keys."""
    if not paths:
        raise ReportError("give at least one run or study directory")
    records: list[RunRecord] = []
    loose: list[RunRecord] = []
    for raw in paths:
        p = Path(raw)
        if (p / "study.json").is_file():
            try:
                study = json.loads((p / "study.json").read_text())
            except (OSError, ValueError) as err:
                raise ReportError(f"{p}/study.json is unreadable ({err})") from None
            varied = [k for k in study.get("varied_keys", []) if k not in _IGNORED_KEYS]
            found = 0
            for run in study.get("runs", []):
                run_dir = p / run["dir"]
                if (run_dir / "summary.json").is_file():
                    rec = _record(run_dir, str(study.get("name", p.name)))
                    rec.varied = varied
                    records.append(rec)
                    found += 1
            if not found:
                raise ReportError(f"study {p} has no finished runs yet")
        elif (p / "summary.json").is_file():
            rec = _record(p, "runs")
            loose.append(rec)
            records.append(rec)
        elif p.is_dir():
            raise ReportError(f"{p} is neither a run directory (summary.json) nor a study directory (study.json)")
        else:
            raise ReportError(f"{p} does not exist")
    if loose:
        keys = sorted({k for r in loose for k in r.config} - _IGNORED_KEYS)
        differing = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in loose}) > 1]
        for r in loose:
            r.varied = differing
    return records


# ---------------------------------------------------------------------------------------
# grouping and statistics
# ---------------------------------------------------------------------------------------
@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample std (n − 1); None for n < 2
    n: int


def mean_std(values: Sequence[float | None]) -> Stat:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


@dataclass
class Group:
    key: tuple
    values: dict[str, Any]  # varied key -> value (plus "study" when several sources)
    runs: list[RunRecord]
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.values:
            return self.runs[0].path.name if len(self.runs) == 1 else self.runs[0].source
        shown = {k: v for k, v in self.values.items() if v is not None} or self.values
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_cell(v)}" for k, v in shown.items())

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def group_runs(records: list[RunRecord]) -> tuple[list[str], list[Group]]:
    """Groups of runs that differ only in their seed, in order of first appearance; returns
    (the grouping columns, the groups)."""
    sources = list(dict.fromkeys(r.source for r in records))
    keys: list[str] = []
    for r in records:
        for k in r.varied:
            if k not in keys:
                keys.append(k)
    columns = (["study"] if len(sources) > 1 else []) + keys
    groups: dict[tuple, Group] = {}
    for r in records:
        values = {"study": r.source} if len(sources) > 1 else {}
        values.update({k: r.config.get(k) for k in keys})
        key = tuple(json.dumps(values[c], sort_keys=True) for c in columns)
        if key not in groups:
            groups[key] = Group(key, values, [])
        groups[key].runs.append(r)
    for g in groups.values():
        g.stats = {m: mean_std([r.outcome.get(m) for r in g.runs]) for m, _, _ in METRICS}
    return columns, list(groups.values())


def pareto_front(points: Sequence[tuple[float, float]], *, maximize: tuple[bool, bool]) -> list[int]:
    """Indices of the non-dominated points, by increasing first coordinate.

    ``maximize[i]`` says whether coordinate i is better large. A point is dominated when
    another is at least as good in both coordinates and better in one; equal points do not
    dominate each other. O(n log n): sort by the first coordinate (best first), sweep the second.
    """
    keyed = []
    for i, (x, y) in enumerate(points):
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        keyed.append(((-x if maximize[0] else x), (-y if maximize[1] else y), i))  # both: smaller is better
    keyed.sort()
    front: list[int] = []
    best_b, last = math.inf, None
    for a, b, i in keyed:
        if b < best_b or (last is not None and (a, b) == last):
            front.append(i)
            best_b, last = b, (a, b)
    return sorted(front, key=lambda i: points[i][0])


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def fmt_stat(stat: Stat, fmt: str) -> str:
    if stat.mean is None:
        return "—"
    text = fmt.format(stat.mean)
    if stat.std:  # omitted for one seed, and when every seed gave the same value
        text += " ± " + fmt.format(stat.std)
    return text


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        esc = [[c.replace("|", "\\|") for c in row] for row in [self.headers, *self.rows]]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(" --- " for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_table(columns: list[str], groups: list[Group]) -> Table:
    metrics = [m for m in METRICS if m[0] not in OPTIONAL or any(g.stats[m[0]].n for g in groups)]
    headers = [*columns, "seeds", *(h for _, h, _ in metrics)]
    rows = []
    for g in groups:
        seeds = ",".join(_cell(s) for s in g.seeds)
        rows.append([*(_cell(g.values.get(c)) for c in columns), seeds,
                     *(fmt_stat(g.stats[m], f) for m, _, f in metrics)])
    return Table(headers, rows)


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_accuracy_per_round(groups: list[Group]) -> bytes | None:
    plt = _pyplot()
    curves = []
    for g in groups:
        per_round: dict[int, list[float]] = {}
        for r in g.runs:
            for row in r.metrics:
                if _num(row.get("test_accuracy")) is not None:
                    per_round.setdefault(int(row["round"]), []).append(float(row["test_accuracy"]))
        if per_round:
            rounds = sorted(per_round)
            stats = [mean_std(per_round[t]) for t in rounds]
            curves.append((g, rounds, stats))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (g, rounds, stats), color in zip(curves, _colors(len(curves))):
        mean = [s.mean for s in stats]
        ax.plot(rounds, mean, marker=".", color=color, label=f"{g.label} (n={len(g.runs)})")
        if len(g.runs) > 1:
            lo = [s.mean - (s.std or 0.0) for s in stats]
            hi = [s.mean + (s.std or 0.0) for s in stats]
            ax.fill_between(rounds, lo, hi, color=color, alpha=0.18, linewidth=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="test accuracy", title="Test accuracy per round (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    data = _png(fig)
    plt.close(fig)
    return data


def plot_pareto(groups: list[Group], x_metric: str, *, x_label: str, x_better: str, log_x: bool,
                title: str) -> bytes | None:
    """Final accuracy (y, higher is better) against ``x_metric``; ``x_better`` is "low" or "high"."""
    plt = _pyplot()
    have = [g for g in groups if g.stats[x_metric].mean is not None and g.stats["final_test_accuracy"].mean is not None]
    if not have:
        return None
    pts = [(g.stats[x_metric].mean, g.stats["final_test_accuracy"].mean) for g in have]
    front = pareto_front(pts, maximize=(x_better == "high", True))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for g, color in zip(have, _colors(len(have))):
        xs, ys = g.stats[x_metric], g.stats["final_test_accuracy"]
        for r in g.runs:  # the seeds, faint
            if r.outcome.get(x_metric) is not None and r.outcome.get("final_test_accuracy") is not None:
                ax.scatter(r.outcome[x_metric], r.outcome["final_test_accuracy"], color=color, alpha=0.25, s=14)
        ax.errorbar(xs.mean, ys.mean, xerr=xs.std or None, yerr=ys.std or None, fmt="o", color=color,
                    capsize=3, label=g.label, markersize=6)
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    if front:
        where = "post" if x_better == "low" else "pre"
        ax.step(fx, fy, where=where, color="black", linewidth=1.2, alpha=0.7, label="Pareto front", zorder=0)
        for i in front:
            ax.annotate(have[i].label, pts[i], textcoords="offset points", xytext=(5, 5), fontsize=7)
    if log_x and all(p[0] > 0 for p in pts):
        ax.set_xscale("log")
    better = "← better" if x_better == "low" else "better →"
    ax.set(xlabel=f"{x_label}  ({better})", ylabel="final test accuracy  (higher is better)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    data = _png(fig)
    plt.close(fig)
    return data


FIGURES = (
    ("accuracy_per_round.png", "Test accuracy per round", None),
    ("pareto_uplink.png", "Accuracy vs total uplink bytes",
     dict(x_metric="total_uplink_bytes", x_label="total uplink bytes", x_better="low", log_x=True)),
    ("pareto_epsilon.png", "Accuracy vs privacy budget ε",
     dict(x_metric="epsilon", x_label="ε (δ as configured)", x_better="low", log_x=False)),
    ("pareto_robust.png", "Accuracy vs robust accuracy",
     dict(x_metric="robust_accuracy", x_label="robust accuracy", x_better="high", log_x=False)),
)


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    table: Table
    groups: list[Group]
    figures: dict[str, Path]  # file name -> path
    markdown: Path
    html: Path
    csv: Path


def build_report(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> Report:
    """Write the comparison table, the figures, report.md and report.html; return what was written."""
    records = collect_runs(paths)
    columns, groups = group_runs(records)
    out = Path(out_dir) if out_dir is not None else default_report_dir(paths)
    table = comparison_table(columns, groups)

    figures: dict[str, Path] = {}
    images: dict[str, bytes] = {}
    for name, title, spec in FIGURES:
        data = plot_accuracy_per_round(groups) if spec is None else plot_pareto(groups, title=title, **spec)
        if data is not None:
            path = out / name
            atomic_write(path, data)
            figures[name], images[name] = path, data

    sources = [str(Path(p)) for p in paths]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    note = ("Mean over seeds; ± is the sample standard deviation (n − 1). Bytes are totals over all rounds "
            "(serialized message sizes).")
    md = [f"# Stamen report\n", f"Generated {stamp} from: {', '.join(sources)}\n", f"{len(records)} runs in "
          f"{len(groups)} groups. {note}\n", table.markdown()]
    for name, title, _ in FIGURES:
        if name in figures:
            md.append(f"\n## {title}\n\n![{title}]({name})\n")
    md_path = out / "report.md"
    atomic_write(md_path, "\n".join(md))

    html_path = out / "report.html"
    atomic_write(html_path, _html_page(table, images, sources, stamp, len(records), len(groups), note))
    csv_path = out / "groups.csv"
    atomic_write(csv_path, _groups_csv(columns, groups))
    return Report(out, table, groups, figures, md_path, html_path, csv_path)


def default_report_dir(paths: Sequence[str | Path]) -> Path:
    if len(paths) == 1 and (Path(paths[0]) / "study.json").is_file():
        return Path(paths[0]) / "report"
    return Path("report")


def _html_page(table: Table, images: dict[str, bytes], sources: list[str], stamp: str, n_runs: int,
               n_groups: int, note: str) -> str:
    figs = []
    for name, title, _ in FIGURES:
        if name in images:
            b64 = base64.b64encode(images[name]).decode("ascii")
            figs.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{html.escape(title)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
             "font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,th:first-child{text-align:left}figure{margin:2em 0}img{max-width:100%}"
             "figcaption{color:#555;font-size:13px}.meta{color:#666;font-size:13px}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Stamen report</title>"
            f"<style>{style}</style></head><body><h1>Stamen report</h1>"
            f"<p class=\"meta\">Generated {html.escape(stamp)} from {html.escape(', '.join(sources))}: "
            f"{n_runs} runs in {n_groups} groups. {html.escape(note)}</p>"
            f"{table.html()}{''.join(figs)}</body></html>\n")


def _groups_csv(columns: list[str], groups: list[Group]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    metric_cols = [c for m, _, _ in METRICS for c in (f"{m}_mean", f"{m}_std")]
    w.writerow([*columns, "n", "seeds", *metric_cols])
    for g in groups:
        vals = []
        for m, _, _ in METRICS:
            s = g.stats[m]
            vals += ["" if s.mean is None else repr(s.mean), "" if s.std is None else repr(s.std)]
        w.writerow([*(_cell(g.values.get(c)) for c in columns), len(g.runs), " ".join(_cell(s) for s in g.seeds),
                    *vals])
    return buf.getvalue()
