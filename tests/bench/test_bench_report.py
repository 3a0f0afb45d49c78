"""The Pareto report: pareto_front, the table, the PNG, the HTML page (rendered in headless Chromium)."""

import math
import os
import shutil
import subprocess

import pytest

from paretune.bench.budget import layer_shapes
from paretune.bench.report import format_table, pareto_front, summarize, write_report
from paretune.bench.store import Store
from paretune.bench.sweep import plan_runs, run_sweep

ENV = {"python": "3.12", "torch": "2.x", "transformers": "4.x", "paretune": "0.1.0", "platform": "Linux",
       "cpu": "test cpu (2 cores)", "gpu": "none"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    pts = [(10, 0.5), (100, 0.7), (50, 0.4), (1000, 0.69), (5, 0.3), (100, 0.6), (2000, 0.9)]
    assert pareto_front(pts) == [4, 0, 1, 6]  # by increasing cost
    assert pareto_front([]) == []
    assert pareto_front([(1, 0.5)]) == [0]
    assert pareto_front([(1, 0.5), (1, 0.5)]) == [0]  # equal points: the first
    assert pareto_front([(2, 0.5), (1, 0.5)]) == [1]  # same quality for more: dominated
    assert pareto_front([(1, math.nan), (2, 0.1)]) == [1]
    assert pareto_front([(3, 0.9), (2, 0.8), (1, 0.7)]) == [2, 1, 0]


@pytest.fixture
def bench_runs(make_bert, fake_runner, tmp_path):
    """A finished fake bench (lora, pissa x 2 budgets x 2 seeds + baselines, one failing method)."""
    model = make_bert()
    per_r = sum(n * (a + b) for (a, b), n in layer_shapes(model, "lora").items())
    plan = plan_runs(model, model="tiny-bert", task="city-continent", methods=["lora", "pissa"],
                     budgets=[2 * per_r, 8 * per_r], seeds=[0, 1], steps=5, batch_size=4)
    with Store(tmp_path) as store:
        run_sweep(plan.runs, store, tmp_path, runner=fake_runner(fail={"full"}), progress=False,
                  log=lambda s: None, env=ENV)
        return store.runs()


def test_summary_and_table(bench_runs):
    s = summarize(bench_runs)
    assert (s.model, s.task, s.metric) == ("tiny-bert", "city-continent", "accuracy")
    assert len(s.failed) == 2 and all(r["method"] == "full" for r in s.failed)
    rows = {(r.method, r.options_text): r for r in s.rows}
    assert set(rows) == {("head", "-"), ("lora", "r=2"), ("lora", "r=8"), ("pissa", "r=2"), ("pissa", "r=8")}
    lora8 = rows[("lora", "r=8")]
    assert lora8.seeds == [0, 1] and lora8.mean == pytest.approx(0.745) and lora8.std == pytest.approx(0.00707, abs=1e-4)
    # pissa is worse than lora at the same size: off the frontier; head is cheapest
    assert [r.pareto_params for r in s.rows] == [True, True, False, True, False]
    assert rows[("head", "-")].pareto_params and not rows[("pissa", "r=8")].pareto_params
    text = format_table(s)
    lines = text.splitlines()
    assert "pareto" in lines[1] and "accuracy" in lines[1] and "peak memory" in lines[1]
    lora8_line = next(line for line in lines if "lora" in line and "r=8" in line)
    assert lora8_line.startswith("params+bytes") and "0.7450 ± 0.0635" in lora8_line
    assert "(baseline)" in text


def test_report_files(bench_runs, tmp_path):
    out = tmp_path / "report"
    files = write_report(bench_runs, out, notes=["skipped x: a note"])
    png = files.png.read_bytes()
    assert files.png == out / "pareto.png" and png[:8] == PNG_MAGIC and len(png) > 20_000
    import matplotlib.image

    img = matplotlib.image.imread(files.png)
    assert img.shape[0] >= 400 and img.shape[1] >= 1000  # two panels side by side
    page = files.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert '<img alt="accuracy' in page and 'src="data:image/png;base64,iVBORw0KGgo' in page
    for text in ("lora", "r=8", "0.7450 ± 0.0635", "params+bytes", "head (baseline)", "Failed runs",
                 "full blew up on purpose", "test cpu (2 cores)", "skipped x: a note"):
        assert text in page, text
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page


def test_report_of_an_empty_or_partial_store(tmp_path):
    files = write_report([], tmp_path)
    assert files.png is None and "No finished runs" in files.html.read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run_chromium(args: list[str], profile) -> subprocess.CompletedProcess:
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(profile)})


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(bench_runs, tmp_path):
    files = write_report(bench_runs, tmp_path / "report")
    url = files.html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    proc = _run_chromium([f"--screenshot={shot}", "--window-size=1200,900", url], tmp_path / "profile1")
    assert shot.is_file(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    assert shot.read_bytes()[:8] == PNG_MAGIC
    import numpy as np
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (900, 1200)
    colors = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 100, f"the screenshot looks blank ({len(colors)} colours)"
    dom = _run_chromium(["--dump-dom", url], tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("paretune bench: tiny-bert on city-continent", "0.7450 ± 0.0635", "params+bytes",
                 "head (baseline)", "data:image/png;base64,"):
        assert text in dom.stdout, text
