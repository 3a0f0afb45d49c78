"""paretune.bench.claims (verdict rules over fake stores) and benchmarks/reproductions.py."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest

from paretune.bench import claims as C
from paretune.bench.stats import mean_interval
from paretune.bench.store import Store
from paretune.bench.sweep import RunSpec

ROOT = Path(__file__).resolve().parents[2]


def add(store: Store, method: str, seed: int, value: float, *, budget=70000, trainable=80000, options=None,
        model="minilm-l6", task="city-continent"):
    spec = RunSpec(model, task, method, dict(options or ({"r": 2} if budget else {})), budget, seed, 150, 2e-3, 32)
    run_id, _ = store.plan(spec)
    store.start(run_id, "x")
    store.finish(run_id, {"metric": "accuracy", "accuracy": value, "trainable": trainable, "eval_examples": 2000})


def evidence(tmp_path, rows) -> C.Evidence:
    with Store(tmp_path / "b") as s:
        for r in rows:
            add(s, *r[:3], **(r[3] if len(r) > 3 else {}))
    runs, _ = C.load_bench([tmp_path / "b"])
    return C.Evidence(runs, {}, documented={})


def rows(method, values, **kw):
    return [(method, i, v, kw) for i, v in enumerate(values)]


def test_reproduced_not_reproduced_and_noise(tmp_path):
    check = C.vs("pissa", "lora")
    ev = evidence(tmp_path / "a", rows("pissa", [0.70, 0.71, 0.72]) + rows("lora", [0.60, 0.61, 0.62]))
    assert check(ev).category == C.REPRODUCED
    ev = evidence(tmp_path / "b", rows("pissa", [0.50, 0.51, 0.52]) + rows("lora", [0.60, 0.61, 0.62]))
    assert check(ev).category == C.NOT_REPRODUCED
    ev = evidence(tmp_path / "c", rows("pissa", [0.60, 0.65, 0.70]) + rows("lora", [0.61, 0.62, 0.66]))
    v = check(ev)
    assert v.category == C.WITHIN_NOISE and "± " in v.figure and "3 seeds" in v.figure


def test_one_seed_never_says_reproduced(tmp_path):
    ev = evidence(tmp_path, [("pissa", 0, 0.9), ("lora", 0, 0.1)])
    v = C.vs("pissa", "lora")(ev)
    assert v.category == C.HOLDS_ONE and "run --seeds 0,1,2" in v.text
    assert C.vs("lora", "pissa")(ev).category == C.FAILS_ONE


def test_tolerance_and_baseline_pairing(tmp_path):
    ev = evidence(tmp_path, rows("lora", [0.600, 0.601, 0.602]) +
                  rows("full", [0.605, 0.606, 0.607], budget=None, trainable=20_000_000))
    # on par within one point: above full − 0.01 beyond noise
    v = C.vs("lora", "full", delta=-0.01, strict=False, pairing="any", max_param_ratio=0.01)(ev)
    assert v.category == C.REPRODUCED and "0.40% of its parameters" in v.figure
    assert C.vs("lora", "full", pairing="any")(ev).category == C.NOT_REPRODUCED


def test_not_measured_names_the_command(tmp_path):
    ev = evidence(tmp_path, [("lora", 0, 0.6)])
    v = C.vs("pissa", "lora")(ev)
    assert v.category == C.NOT_MEASURED and "paretune bench --quick --methods pissa,lora" in v.text
    assert "--baselines full" in C.vs("bitfit", "full", pairing="any")(ev).text


def test_settings_are_kept_apart_and_mixed_one_seed(tmp_path):
    ev = evidence(tmp_path, [("mos", 0, 0.5), ("lora", 0, 0.6),
                             ("mos", 0, 0.4, {"model": "smollm2-135m", "task": "country-capital"}),
                             ("lora", 0, 0.3, {"model": "smollm2-135m", "task": "country-capital"})])
    v = C.vs("mos", "lora")(ev)
    assert v.category == C.MIXED_ONE and "smollm2-135m" in v.text and "minilm-l6" not in v.text


def test_d90(tmp_path):
    rs = [("full", 0, 0.9, {"budget": None, "trainable": 50000})]
    rs += [("subspace", 0, acc, {"budget": d, "trainable": d, "options": {"dim": d}})
           for d, acc in ((10, 0.3), (100, 0.85), (1000, 0.9))]
    ev = evidence(tmp_path, rs)
    v = C.d90(max_fraction=0.01)(ev)
    assert v.category == C.HOLDS_ONE and "d90 = 100" in v.figure
    assert C.d90(max_d=50)(ev).category == C.FAILS_ONE


def test_external_numbers_rules():
    check = C.external("wanda", "50% Wanda", ["50% magnitude"], lower_is_better=True, command="CMD")
    assert C.external("x", "a", ["b"], command="CMD")(C.Evidence([], {}, {})).text == "not measured yet: CMD"
    ev = C.Evidence([], {"wanda": {"50% Wanda": 200.0, "50% magnitude": 2000.0}}, {})
    v = check(ev)
    assert v.category == C.HOLDS_ONE and v.text.startswith("one run: direction holds")
    ev = C.Evidence([], {"wanda": {"50% Wanda": [200.0, 201.0, 202.0], "50% magnitude": [2000.0, 2100.0, 1900.0]}}, {})
    assert check(ev).category == C.REPRODUCED
    documented = {"wanda": {"_section": "S", "_seeds": 3, "50% Wanda": 300.0, "50% magnitude": 200.0}}
    v = check(C.Evidence([], {}, documented))
    assert v.category == C.FAILS_ONE and v.text.startswith("3 seeds, means only") and "docs/results.md, S" in v.figure


def test_every_registered_method_has_a_claim():
    import paretune  # noqa: F401  (registers the built-in methods)
    from paretune.core.registry import all_methods

    covered = C.claims_by_method()
    missing = sorted(set(all_methods()) - set(covered))
    assert not missing, f"registered methods without a claim in paretune.bench.claims: {missing}"
    assert not set(covered) - set(all_methods()), "claims name methods that are not registered"
    ids = [c.id for c in C.CLAIMS]
    assert len(ids) == len(set(ids))
    for c in C.CLAIMS:
        assert c.family in C.FAMILIES and c.paper and c.claim and (c.evaluate is not None or c.untestable)


def test_every_claim_evaluates_without_runs():
    for c, v in C.evaluate_all(C.Evidence([], {}, {})):
        assert v.category in (C.NOT_MEASURED, C.NOT_TESTABLE), c.id


def test_reading_does_not_migrate_the_bench_file(tmp_path):
    with Store(tmp_path / "b") as s:
        add(s, "lora", 0, 0.6)
    db = tmp_path / "b" / "runs.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    before = db.read_bytes()
    runs, summaries = C.load_bench([tmp_path / "b", tmp_path / "none"])
    assert len(runs) == 1 and db.read_bytes() == before and summaries[1]["missing"]
    assert "--methods lora --budget 70000 --baselines none --seeds 0" in C.reconstructed_command(runs)[0]


def test_shifted_interval():
    iv = C.shifted(mean_interval([1.0, 2.0, 3.0]), ratio=0.5, delta=1.0)
    assert iv.mean == pytest.approx(2.0) and iv.half_width == pytest.approx(mean_interval([1.0, 2.0, 3.0]).half_width / 2)


def test_script_writes_the_doc(tmp_path):
    with Store(tmp_path / "b") as s:
        for seed, (p, l) in enumerate(((0.70, 0.60), (0.71, 0.61), (0.72, 0.62))):
            add(s, "pissa", seed, p)
            add(s, "lora", seed, l)
    spec = importlib.util.spec_from_file_location("reproductions", ROOT / "benchmarks" / "reproductions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "docs" / "reproductions.md"
    assert mod.main(["--bench", str(tmp_path / "b"), "--out", str(out), "--numbers", str(tmp_path / "none.json")]) == 0
    text = out.read_text()
    assert "--bench" in text and "## Low-rank adapters" in text and "| reproduced | 1 |" in text
    assert "paretune bench --model minilm-l6 --task city-continent --methods pissa,lora" in text
    assert not list(out.parent.glob(".*tmp*"))
