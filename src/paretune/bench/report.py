"""The Pareto report of a bench: a terminal table, a two-panel PNG and a self-contained HTML page.

Runs of one configuration (method + options) over several seeds are one row: the quality metric
as mean ± sample standard deviation, the other columns as means (peak memory: the maximum).
A row is Pareto-optimal when no row with at most as many trainable parameters (or stored bytes)
has a higher mean quality: the frontier is "the best quality this many parameters can buy".
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
from ..training.trainer import BASELINES
from ..units import human_bytes

BASELINE_MARKERS = {"head": "s", "full": "D"}  # a plot marker for each of BASELINES


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

    @property
    def mean(self) -> float:
        return statistics.fmean(self.quality) if self.quality else math.nan

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
    runs = [r for r in all_runs if r["model"] == model and r["task"] == task]
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
    envs: list[dict[str, str]] = []
    for r in runs:
        if r["environment"] and r["environment"] not in envs:
            envs.append(r["environment"])
    return Summary(model, task, metric, rows, finished, [r for r in runs if r["status"] == "failed"],
                   [r for r in runs if r["status"] in ("queued", "running")], envs, others)


# -- text -----------------------------------------------------------------------------------

def _pareto_mark(r: Row) -> str:
    return "+".join(m for m, on in (("params", r.pareto_params), ("bytes", r.pareto_bytes)) if on)


def table_rows(s: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (shared by the terminal and HTML reports)."""
    header = ["pareto", "method", "options", "trainable", "stored", s.metric, "train s", "peak memory", "seeds"]
    cells = []
    for r in s.rows:
        q = "-" if not r.quality else (f"{r.mean:.4f} ± {r.std:.4f}" if len(r.quality) > 1 else f"{r.mean:.4f}")
        cells.append([
            _pareto_mark(r) or "", r.method + (" (baseline)" if r.baseline else ""), r.options_text,
            f"{r.trainable:,.0f}", human_bytes(r.stored_bytes), q,
            "-" if r.train_seconds is None else f"{r.train_seconds:.1f}", human_bytes(r.peak_memory_bytes),
            ",".join(map(str, r.seeds)),
        ])
    return header, cells


def format_table(s: Summary) -> str:
    """The results table as aligned text; Pareto-optimal rows are marked in the first column."""
    header, cells = table_rows(s)
    if not cells:
        return f"no finished runs for {s.model} on {s.task}."
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    right = {3, 4, 5, 6, 7}

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [f"{s.model} on {s.task}: {s.metric} (mean ± std over seeds) for what each method trains and stores",
           line(header), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out.append("pareto: best quality for at most this many trainable parameters (params) / stored bytes (bytes)")
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
        for r in s.runs:
            x, y = r["metrics"].get(attr), r["metrics"].get(r["metric"] or s.metric)
            if x is None or y is None or x <= 0 or math.isnan(y):
                continue
            m = r["method"]
            base = m in BASELINES
            color, marker = styles[m]
            ax.scatter([x], [y], color=color, marker=marker, s=70 if base else 40,
                       edgecolors="black" if base else "none", linewidths=1.2, zorder=3, alpha=0.9,
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
        ax.set_ylabel(s.metric)
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
        f"quality = {e(s.metric)} on the held-out split (mean ± std over seeds). Report written "
        f"{e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}.</p>",
        "<h2>Results</h2>",
        _html_table(header, cells, classes, numeric={3, 4, 5, 6, 7}) if cells else "<p>No finished runs.</p>",
        '<p class="note">Highlighted rows are Pareto-optimal: no row with at most as many trainable parameters '
        "(params) or stored bytes (bytes) has a higher mean quality.</p>",
    ]
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts += ["<h2>Pareto plot</h2>",
                  f'<img alt="{e(s.metric)} against trainable parameters and stored bytes" '
                  f'src="data:image/png;base64,{data}">']
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
