"""The Pareto report of a bench: a terminal table, a two-panel PNG and a self-contained HTML page.

Runs of one configuration (method + options) over several seeds are one row: the quality metric
as the mean over seeds ± the half-width of its 95% Student-t interval (:mod:`paretune.bench.stats`;
one seed: no interval), the other columns as means (peak memory: the maximum). A row is
Pareto-optimal when no row with at most as many trainable parameters (or stored bytes) has a
higher mean quality: the frontier is "the best quality this many parameters can buy", computed on
means. Two rows are *within noise* (tied) when their intervals overlap; the table's "tied with"
column lists, for each row, the rows of its budget region (trainable counts within a factor
``REGION_FACTOR`` of each other) it is tied with, and the report ends with a recommendation per
frontier point: "at about N trainable parameters, pick X (quality m ± h); Y and Z are within noise".
Search runs (``--tune lr``, phase ``search``) are not rows: they are the per-method tuning tables.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..core.atomic import atomic_write_text
from .stats import Interval, mean_interval, overlap
from ..training.trainer import BASELINES
from ..units import human_bytes

BASELINE_MARKERS = {"head": "s", "full": "D"}  # a plot marker for each of BASELINES
REGION_FACTOR = 2.0  # two rows are in one budget region when their trainable counts are within this factor


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points of ``(cost, quality)`` pairs, by increasing cost.

    A point is on the frontier when every point of lower or equal cost has lower quality (for
    equal cost and quality, the first one given is kept). Points with a NaN are never on it.
    """
    ok = [i for i, (c, q) in enumerate(points)
          if not (math.isnan(float(c)) or math.isnan(float(q)))]
    order = sorted(ok, key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


@dataclasses.dataclass
class Row:
    """One configuration (method + options) over its seeds."""

    method: str
    options: dict[str, Any]
    budget: int | None
    seeds: list[int]
    quality: list[float]
    trainable: float
    stored_bytes: float
    train_seconds: float | None
    peak_memory_bytes: float | None
    pareto_params: bool = False
    pareto_bytes: bool = False
    number: int = 0  # 1-based position in the table
    tied: list[int] = dataclasses.field(default_factory=list)  # numbers of rows of its region within noise

    @property
    def mean(self) -> float:
        return statistics.fmean(self.quality) if self.quality else math.nan

    @property
    def interval(self) -> Interval:
        return mean_interval(self.quality)

    @property
    def label(self) -> str:
        return self.method + ("" if not self.options else " " + self.options_text)

    @property
    def std(self) -> float:
        return statistics.stdev(self.quality) if len(self.quality) > 1 else 0.0

    @property
    def options_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.options.items())) or "-"

    @property
    def baseline(self) -> bool:
        return self.method in BASELINES


@dataclasses.dataclass
class Summary:
    model: str
    task: str
    metric: str
    rows: list[Row]
    runs: list[dict[str, Any]]  # finished runs of this model and task (from Store.runs)
    failed: list[dict[str, Any]]
    unfinished: list[dict[str, Any]]  # queued or running: an interrupted bench
    environments: list[dict[str, str]]
    others: list[tuple[str, str]]  # other (model, task) pairs in the same store, not reported
    search: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # --tune search runs (any status)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def summarize(all_runs: list[dict[str, Any]], model: str | None = None, task: str | None = None) -> Summary:
    """Group the store's runs (``Store.runs()``) of one model and task into rows; without a
    model / task, the pair of the most recent run."""
    if not all_runs:
        return Summary(model or "?", task or "?", "quality", [], [], [], [], [], [])
    pairs = list(dict.fromkeys((r["model"], r["task"]) for r in all_runs))
    if model is None or task is None:
        last = all_runs[-1]
        model = model or last["model"]
        task = task or next((r["task"] for r in reversed(all_runs) if r["model"] == model), last["task"])
    mine = [r for r in all_runs if r["model"] == model and r["task"] == task]
    runs = [r for r in mine if r.get("phase", "final") == "final"]
    search = [r for r in mine if r.get("phase", "final") == "search"]
    others = [p for p in pairs if p != (model, task)]
    finished = [r for r in runs if r["status"] == "finished"]
    metric = next((r["metric"] for r in finished if r["metric"]), "quality")
    groups: dict[tuple, list[dict]] = {}
    for r in finished:
        key = (r["method"], json.dumps(r["options"], sort_keys=True), json.dumps(r["targets"]))
        groups.setdefault(key, []).append(r)
    rows = []
    for rs in groups.values():
        m = [r["metrics"] for r in rs]
        quality = [x.get(r["metric"] or metric) for x, r in zip(m, rs)]
        quality = [q for q in quality if q is not None and not math.isnan(q)]
        peaks = [x.get("peak_memory_bytes") for x in m if x.get("peak_memory_bytes") is not None]
        rows.append(Row(
            method=rs[0]["method"], options=rs[0]["options"], budget=rs[0]["budget"],
            seeds=sorted(r["seed"] for r in rs), quality=quality,
            trainable=_mean([x.get("trainable") for x in m]) or 0.0,
            stored_bytes=_mean([x.get("stored_bytes") for x in m]) or 0.0,
            train_seconds=_mean([x.get("train_seconds") for x in m]),
            peak_memory_bytes=max(peaks) if peaks else None,
        ))
    rows.sort(key=lambda r: (r.trainable, r.method, r.options_text))
    for attr, flag in (("trainable", "pareto_params"), ("stored_bytes", "pareto_bytes")):
        for i in pareto_front([(getattr(r, attr), r.mean) for r in rows]):
            setattr(rows[i], flag, True)
    for i, r in enumerate(rows, 1):
        r.number = i
    for r in rows:
        r.tied = [o.number for o in region(rows, r) if o is not r and overlap(r.interval, o.interval)]
    envs: list[dict[str, str]] = []
    for r in runs:
        if r["environment"] and r["environment"] not in envs:
            envs.append(r["environment"])
    return Summary(model, task, metric, rows, finished, [r for r in runs if r["status"] == "failed"],
                   [r for r in runs if r["status"] in ("queued", "running")], envs, others, search)


def region(rows: Sequence[Row], row: Row) -> list[Row]:
    """The rows of ``row``'s budget region: trainable counts within ``REGION_FACTOR`` of its own."""
    def near(a: float, b: float) -> bool:
        return a > 0 and b > 0 and max(a, b) / min(a, b) <= REGION_FACTOR

    return [o for o in rows if o.quality and near(o.trainable, row.trainable)]


def ties_text(s: Summary) -> list[str]:
    """"X and Y are within noise" for every frontier row (params) tied with others of its region."""
    lines = []
    for r in s.rows:
        if r.pareto_params and r.tied:
            names = [r.label] + [s.rows[i - 1].label for i in r.tied]
            lines.append(f"{_and(names)} are within noise (95% intervals overlap) at about {_count(r.trainable)} "
                         "trainable parameters")
    return lines


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _count(n: float) -> str:
    """A rounded count: 84,480 -> 84k, 1,234,567 -> 1.2M."""
    if n >= 1e6:
        return f"{n / 1e6:.2g}M" if n < 1e7 else f"{n / 1e6:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.2g}k" if n < 1e4 else f"{n / 1e3:.0f}k"
    return f"{n:.0f}"


def recommendation(s: Summary) -> list[str]:
    """The plain recommendation: one sentence per frontier point (quality against trainable
    parameters), from measured runs only."""
    front = [r for r in s.rows if r.pareto_params and r.quality]
    if not front:
        return ["No finished run to recommend from."]
    lines = []
    one_seed = all(r.interval.n < 2 for r in s.rows if r.quality)
    for r in front:
        iv = r.interval
        q = (f"{s.metric} {iv.mean:.4f} ± {iv.half_width:.4f}" if iv.half_width is not None
             else f"{s.metric} {iv.mean:.4f}, interval unknown with {iv.n} seed")
        line = f"At about {_count(r.trainable)} trainable parameters, pick {r.label} ({q})."
        if r.tied:
            others = [s.rows[i - 1].label for i in r.tied]
            line += f" {_and(others)} {'is' if len(others) == 1 else 'are'} within noise."
        lines.append(line)
    if one_seed:
        lines.append("Every configuration ran with one seed, so the intervals are unknown and no tie can be "
                     "called: rerun with --seeds 0,1,2 (finished runs are kept) to know which differences are real.")
    return lines


def tuning_tables(s: Summary) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per configuration searched with --tune lr: (title, header, rows of rate -> validation score),
    the chosen rate marked (the rule of :func:`paretune.bench.tune.choose`)."""
    from .tune import choose

    out = []
    for c in choose(s.search).values():
        opts = " ".join(f"{k}={v}" for k, v in sorted(c.options.items()))
        title = f"{c.method}{' ' + opts if opts else ''}" + (f" ({c.note})" if c.note else "")
        cells = [[f"{lr:.3g}", "-" if math.isnan(sc) else f"{sc:.4f}",
                  "-" if math.isnan(c.losses[lr]) else f"{c.losses[lr]:.4f}",
                  "chosen" if lr == c.lr and not c.note else ""] for lr, sc in sorted(c.scores.items())]
        out.append((title, ["lr", f"validation {s.metric}", "validation loss", ""], cells))
    return out


# -- text -----------------------------------------------------------------------------------

def _pareto_mark(r: Row) -> str:
    return "+".join(m for m, on in (("params", r.pareto_params), ("bytes", r.pareto_bytes)) if on)


def table_rows(s: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (shared by the terminal and HTML reports)."""
    header = ["pareto", "#", "method", "options", "trainable", "stored", f"{s.metric} (95% CI)", "tied with",
              "train s", "peak memory", "seeds"]
    cells = []
    for r in s.rows:
        cells.append([
            _pareto_mark(r) or "", str(r.number), r.method + (" (baseline)" if r.baseline else ""), r.options_text,
            f"{r.trainable:,.0f}", human_bytes(r.stored_bytes), r.interval.text(),
            ",".join(f"#{i}" for i in r.tied),
            "-" if r.train_seconds is None else f"{r.train_seconds:.1f}", human_bytes(r.peak_memory_bytes),
            ",".join(map(str, r.seeds)),
        ])
    return header, cells


NUMERIC_COLUMNS = {1, 4, 5, 6, 8, 9}


def format_table(s: Summary) -> str:
    """The results table as aligned text; Pareto-optimal rows are marked in the first column."""
    header, cells = table_rows(s)
    if not cells:
        return f"no finished runs for {s.model} on {s.task}."
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    right = NUMERIC_COLUMNS

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [f"{s.model} on {s.task}: {s.metric} (mean over seeds ± 95% Student-t interval; one seed: no interval) "
           "for what each method trains and stores", line(header), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out.append("pareto: best mean quality for at most this many trainable parameters (params) / stored bytes (bytes); "
               f"tied with: rows within a factor {REGION_FACTOR:g} in trainable parameters whose intervals overlap")
    for t in ties_text(s):
        out.append("within noise: " + t)
    for title, header2, rows2 in tuning_tables(s):
        out.append(f"tune lr, {title}: " + ", ".join(f"{c[0]} -> {c[1]}{' (chosen)' if c[3] else ''}" for c in rows2))
    out.append("recommendation:")
    out += ["  " + line_ for line_ in recommendation(s)]
    return "\n".join(out)


# -- plot -----------------------------------------------------------------------------------

METHOD_MARKERS = ("o", "^", "v", "P", "X", "<", ">")
BASELINE_COLORS = {"head": "white", "full": "black"}  # outside tab10, so no method shares them


def method_styles(methods: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per method, every pair distinct: tab10's ten colours, then the next
    marker shape for the next ten methods (the plot gives baselines their own)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    names = sorted(set(methods))
    return {m: (cmap(i % 10), METHOD_MARKERS[(i // 10) % len(METHOD_MARKERS)]) for i, m in enumerate(names)}


def plot_png(s: Summary) -> bytes:
    """The two-panel Pareto plot (quality vs trainable parameters, vs stored bytes) as PNG bytes."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, whatever the backend

    n_methods = len({r["method"] for r in s.runs})
    legend_rows = math.ceil((n_methods + 1) / 6)  # one legend for both panels, six entries a row, below them
    fig = Figure(figsize=(12, 5 + 0.25 * legend_rows), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    styles = method_styles([r["method"] for r in s.runs if r["method"] not in BASELINES])
    styles.update({m: (BASELINE_COLORS.get(m, "gray"), BASELINE_MARKERS[m]) for m in BASELINES})
    panels = (("trainable", "pareto_params", "trainable parameters"), ("stored_bytes", "pareto_bytes", "stored bytes"))
    for ax, (attr, flag, xlabel) in zip(axes, panels):
        labelled: set[str] = set()
        for r in s.runs:  # every run, faint: the seeds behind each mean
            x, y = r["metrics"].get(attr), r["metrics"].get(r["metric"] or s.metric)
            if x is None or y is None or x <= 0 or math.isnan(y):
                continue
            color, marker = styles[r["method"]]
            ax.scatter([x], [y], color=color, marker=marker, s=12, edgecolors="none", zorder=2, alpha=0.35)
        for row in s.rows:  # one point per configuration: the mean over seeds, the 95% interval as an error bar
            x, iv = getattr(row, attr), row.interval
            if x <= 0 or iv.n == 0:
                continue
            m = row.method
            base = m in BASELINES
            color, marker = styles[m]
            if iv.half_width is not None:
                ax.errorbar([x], [iv.mean], yerr=[[iv.half_width], [iv.half_width]], fmt="none", ecolor=color
                            if not base else "black", elinewidth=1.0, capsize=3, zorder=3, alpha=0.8)
            ax.scatter([x], [iv.mean], color=color, marker=marker, s=70 if base else 40,
                       edgecolors="black" if base else "none", linewidths=1.2, zorder=4, alpha=0.9,
                       label=(f"{m} (baseline)" if base else m) if m not in labelled else None)
            labelled.add(m)
        front = [r for r in s.rows if getattr(r, flag) and getattr(r, attr) > 0 and not math.isnan(r.mean)]
        if front:
            xs = [getattr(r, attr) for r in front]
            ys = [r.mean for r in front]
            ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1.2, zorder=2,
                    label="Pareto frontier")
            for r in front:
                if not r.baseline and r.options:
                    ax.annotate(r.options_text, (getattr(r, attr), r.mean), textcoords="offset points",
                                xytext=(4, -11), fontsize=7, color="dimgray")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + " (log scale)")
        ax.set_ylabel(f"{s.metric} (mean over seeds, 95% interval)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{s.metric} vs {xlabel}")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize=8)
    fig.suptitle(f"paretune bench: {s.model} on {s.task}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- HTML -----------------------------------------------------------------------------------

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; }
"""  # the look of every paretune HTML report
CSS = BASE_CSS + """
tr.pareto td { background: #eef7ee; font-weight: 600; }
tr.baseline td:nth-child(2) { font-style: italic; }
pre { white-space: pre-wrap; font-size: 0.8em; background: #f7f7f7; padding: 0.5em; }
"""


def _html_table(header: list[str], cells: list[list[str]], classes: list[str] | None = None,
                numeric: set[int] = frozenset()) -> str:
    e = html.escape
    out = ['<table>', "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for k, row in enumerate(cells):
        cls = f' class="{e(classes[k])}"' if classes and classes[k] else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="num">{e(c)}</td>' if i in numeric else f"<td>{e(c)}</td>" for i, c in enumerate(row))
            + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(s: Summary, png: bytes | None, notes: Sequence[str] = ()) -> str:
    """A self-contained page: no external asset, the plot embedded as a base64 data URI."""
    e = html.escape
    header, cells = table_rows(s)
    classes = [" ".join(c for c, on in (("pareto", r.pareto_params or r.pareto_bytes), ("baseline", r.baseline)) if on)
               for r in s.rows]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>paretune bench: {e(s.model)} on {e(s.task)}</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>paretune bench: {e(s.model)} on {e(s.task)}</h1>",
        f'<p class="note">{len(s.runs)} finished run(s), {len(s.failed)} failed, {len(s.unfinished)} unfinished; '
        f"quality = {e(s.metric)} on the test split: the mean over seeds ± the half-width of its 95% Student-t "
        "interval (mean ± t<sub>0.975, n-1</sub>·s/√n; with one seed there is no interval). Report written "
        f"{e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}.</p>",
        "<h2>Results</h2>",
        _html_table(header, cells, classes, numeric=NUMERIC_COLUMNS) if cells else "<p>No finished runs.</p>",
        '<p class="note">Highlighted rows are Pareto-optimal: no row with at most as many trainable parameters '
        "(params) or stored bytes (bytes) has a higher mean quality. \"tied with\": the rows within a factor "
        f"{REGION_FACTOR:g} in trainable parameters whose 95% intervals overlap this row's (within noise).</p>",
    ]
    ties = ties_text(s)
    if ties:
        parts += ["<h2>Within noise on the frontier</h2>", "<ul>" + "".join(f"<li>{e(t)}</li>" for t in ties) + "</ul>"]
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts += ["<h2>Pareto plot</h2>",
                  f'<img alt="{e(s.metric)} against trainable parameters and stored bytes" '
                  f'src="data:image/png;base64,{data}">']
    tables = tuning_tables(s)
    if tables:
        parts += ["<h2>Learning-rate search (--tune lr)</h2>",
                  '<p class="note">Each rate trained on the training split minus the validation split and scored on '
                  "the validation split (never the test split); the best mean validation score is chosen, and the "
                  "final runs above ran at it.</p>"]
        for title, header2, rows2 in tables:
            parts += [f"<h3>{e(title)}</h3>", _html_table(header2, rows2, ["pareto" if c[3] else "" for c in rows2],
                                                          numeric={0, 1, 2})]
    if s.failed:
        parts += ["<h2>Failed runs</h2>", _html_table(
            ["method", "options", "seed", "error"],
            [[r["method"], json.dumps(r["options"]), str(r["seed"]), (r["error"] or "")[-1500:]] for r in s.failed])]
    if s.unfinished:
        parts.append(f'<p class="note">{len(s.unfinished)} run(s) were not finished (the bench was interrupted); '
                     "run the same command again to finish them.</p>")
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"]
    if s.environments:
        from .store import ENV_FIELDS

        parts += ["<h2>Environment</h2>",
                  _html_table(list(ENV_FIELDS), [[env.get(f, "") for f in ENV_FIELDS] for env in s.environments])]
    if s.runs:
        parts += ["<h2>Runs</h2>", _html_table(
            ["id", "method", "options", "seed", "steps", "lr", "batch", s.metric, "trainable", "finished"],
            [[str(r["id"]), r["method"], json.dumps(r["options"]), str(r["seed"]), str(r["steps"]), f"{r['lr']:g}",
              str(r["batch_size"]), _fmt(r["metrics"].get(r["metric"] or s.metric)),
              f"{r['metrics'].get('trainable', 0):,.0f}", r["finished_at"] or ""] for r in s.runs],
            numeric={7, 8})]
    if s.others:
        parts.append('<p class="note">The same store also holds runs of: '
                     + e(", ".join(f"{m} on {t}" for m, t in s.others)) + ".</p>")
    if s.rows:
        parts += ["<h2>Recommendation</h2>", "<ul>" + "".join(f"<li>{e(t)}</li>" for t in recommendation(s)) + "</ul>",
                  '<p class="note">Drawn from the measured runs above only: one sentence per point of the frontier '
                  "of quality against trainable parameters.</p>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@dataclasses.dataclass
class ReportFiles:
    png: Path | None
    html: Path
    table: str
    summary: Summary


def write_report(all_runs: list[dict[str, Any]], out: str | Path, *, model: str | None = None,
                 task: str | None = None, notes: Sequence[str] = ()) -> ReportFiles:
    """Write OUT/pareto.png and OUT/report.html (each atomically) from the store's runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(all_runs, model, task)
    png_path = None
    png = plot_png(s) if s.runs else None
    if png:
        png_path = out / "pareto.png"
        tmp = out / ".pareto.png.tmp"
        tmp.write_bytes(png)
        tmp.replace(png_path)
    elif (out / "pareto.png").exists():  # no finished run: no plot, not an old one
        (out / "pareto.png").unlink()
    html_path = out / "report.html"
    atomic_write_text(html_path, render_html(s, png, notes))
    return ReportFiles(png_path, html_path, format_table(s), s)
