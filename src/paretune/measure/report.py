"""The report of an intrinsic-dimension measurement: a PNG plot and a self-contained HTML page.

The plot (Li et al. 2018, Fig. 1 style): the task metric of each subspace run against its
dimension d on a log axis, a horizontal line at the full run's metric and one at 90% of it,
and d90 marked (a vertical dotted line and a ring around its point).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..bench.report import BASE_CSS
from ..core.atomic import atomic_write_text

if TYPE_CHECKING:
    from .intrinsic import IntrinsicResult

PNG_NAME = "intrinsic-dim.png"
HTML_NAME = "intrinsic-dim.html"


def plot_png(result: "IntrinsicResult") -> bytes:
    """Metric against subspace dimension d (log x axis), the full run's metric, its 90% line and
    d90, as PNG bytes (rendered with Agg, whatever the pyplot backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    xs = [r.d for r in result.runs]
    ys = [r.metric for r in result.runs]
    ax.plot(xs, ys, marker="o", color="tab:blue", linewidth=1.5, zorder=3, label="subspace runs")
    ax.axhline(result.full.metric, color="black", linestyle="-", linewidth=1.2,
               label=f"full run ({result.full.trainable:,} trainable): {result.full.metric:.4f}")
    ax.axhline(result.threshold, color="tab:red", linestyle="--", linewidth=1.2,
               label=f"{result.fraction:.0%} of full: {result.threshold:.4f}")
    if result.d90 is not None:
        y90 = next(r.metric for r in result.runs if r.d == result.d90)
        ax.axvline(result.d90, color="tab:red", linestyle=":", linewidth=1.2)
        ax.scatter([result.d90], [y90], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4,
                   label=f"d90 = {result.d90:,}")
    else:
        ax.text(0.02, 0.04, f"no measured d reaches {result.fraction:.0%} of the full run", transform=ax.transAxes,
                color="tab:red", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d (trainable parameters, log scale)")
    ax.set_ylabel(result.metric_name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    said = " (SAID)" if result.settings.get("said") else ""
    fig.suptitle(f"intrinsic dimension{said}: {result.model} on {result.task}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


CSS = BASE_CSS + """
tr.d90 td { background: #eef7ee; font-weight: 600; }
tr.full td { font-style: italic; }
"""


def table_rows(result: "IntrinsicResult") -> tuple[list[str], list[list[str]], list[str]]:
    """Header, cells and row classes of the runs table: the full run, then every d."""
    header = ["run", "d", result.metric_name, "/ full", "trainable", "train s", "reached 90%", "source"]
    cells, classes = [], []
    full = result.full.metric
    for r in [result.full, *result.runs]:
        ratio = r.metric / full if full else float("nan")
        cells.append([
            "full" if r.d is None else "subspace", "-" if r.d is None else f"{r.d:,}", f"{r.metric:.4f}",
            f"{ratio:.3f}", f"{r.trainable:,}", f"{r.seconds:.1f}",
            "-" if r.d is None else ("yes" if r.metric >= result.threshold else "no"),
            "store (reused)" if r.reused else "trained",
        ])
        classes.append("full" if r.d is None else ("d90" if r.d == result.d90 else ""))
    return header, cells, classes


def format_table(result: "IntrinsicResult") -> str:
    """The runs table as aligned text."""
    header, cells, _ = table_rows(result)
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    line = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def render_html(result: "IntrinsicResult", png: bytes | None) -> str:
    """A self-contained page (the plot embedded as a base64 data URI): d90, the runs, the settings."""
    e = html.escape
    header, cells, classes = table_rows(result)
    numeric = {1, 2, 3, 4, 5}
    rows = []
    for row, cls in zip(cells, classes):
        attr = f' class="{cls}"' if cls else ""
        rows.append(f"<tr{attr}>" + "".join(f'<td class="num">{e(c)}</td>' if i in numeric else f"<td>{e(c)}</td>"
                                            for i, c in enumerate(row)) + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"
             + "\n".join(rows) + "</tbody></table>")
    settings = dict(result.settings)
    targets = settings.pop("targets", [])
    settings_rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
                            for k, v in settings.items())
    d90 = "none (no measured d reached the threshold)" if result.d90 is None else f"{result.d90:,}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>intrinsic dimension: {e(result.model)} on {e(result.task)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Intrinsic dimension: {e(result.model)} on {e(result.task)}</h1>",
        f"<p><strong>d90 = {e(d90)}</strong></p>",
        f"<p>{e(result.message)}</p>",
        f'<p class="note">Each subspace run trains only d coordinates of a random affine subspace of the adapted '
        f"layers' weights and biases, θ = θ0 + P·d (Li et al. 2018); the full run trains every parameter. "
        f"{e(result.metric_name)} on the held-out split. d90 is the smallest measured d whose "
        f"{e(result.metric_name)} is at least {result.fraction:.0%} of the full run's "
        f"({result.threshold:.4f}); there is no interpolation between measured d. Report written "
        f"{e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}.</p>",
    ]
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts += ["<h2>Plot</h2>", f'<img alt="{e(result.metric_name)} against subspace dimension d" '
                                   f'src="data:image/png;base64,{data}">']
    parts += ["<h2>Runs</h2>", table,
              f'<p class="note">Every run is stored in {e(str(result.store_path))}.</p>',
              "<h2>Settings</h2>", f"<table><tbody>{settings_rows}</tbody></table>",
              f"<h2>Subspace layers ({len(targets)})</h2>",
              f'<p class="note">{e(", ".join(targets))}</p>',
              "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(result: "IntrinsicResult", out: str | Path) -> tuple[Path, Path]:
    """Write ``out/intrinsic-dim.png`` and ``out/intrinsic-dim.html``, each atomically (a temporary
    file, then a rename); returns their paths."""
    import os
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_png(result)
    png_path = out / PNG_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{PNG_NAME}.tmp-", dir=out)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o644 & ~mask)
        os.replace(tmp, png_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    html_path = out / HTML_NAME
    atomic_write_text(html_path, render_html(result, png))
    return png_path, html_path
