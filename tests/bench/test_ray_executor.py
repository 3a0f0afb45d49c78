"""The bench's Ray executor: a local Ray cluster started in the test, 2 actors, the same results as
the sequential executor; a Ray address that does not answer is a clear error within seconds."""

from __future__ import annotations

import socket
import time

import pytest

from paretune.bench import executors
from paretune.bench.store import Store
from paretune.bench.sweep import run_sweep
from paretune.errors import ParetuneError

from test_workers import ENV, make_tiny, same, spec  # tests/bench is on sys.path (rootdir conftest, no package)


def test_bad_ray_address_errors_quickly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ParetuneError, match="no Ray cluster answers at 127.0.0.1"):
        executors.check_ray_address(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ParetuneError, match="not host:port"):
        executors.check_ray_address("nowhere")
    assert time.perf_counter() - t0 < 5


def test_ray_executor_equals_sequential(tmp_path):
    ray = pytest.importorskip("ray")
    tiny = make_tiny(tmp_path)
    runs = [spec(tiny, "lora", seed=0), spec(tiny, "head", seed=0), spec(tiny, "lora", seed=1)]
    got = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, kw in (("sequential", {}), ("ray", {"executor": "ray", "workers": 2})):
            with Store(tmp_path / name) as store:
                result = run_sweep(runs, store, tmp_path / name, progress=False, log=lambda s: None, env=ENV, **kw)
                got[name] = {(r["method"], r["seed"]): r["metrics"] for r in store.runs()}
            assert result.finished == 3 and not result.failed, result.failed
    finally:
        ray.shutdown()
    for k in got["sequential"]:
        same(got["sequential"][k], got["ray"][k])
