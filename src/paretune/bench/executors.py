"""Where the bench's runs execute: reusable worker processes on this machine, or a Ray cluster.

* ``sequential`` (the default): one worker process (:mod:`paretune.bench.worker`) runs every run in
  turn, loading the model and data once.
* ``pool``: ``workers`` worker processes; each run goes to the next free one. Each worker gets
  ``max(1, cores // workers)`` torch threads; when several GPUs are visible, worker ``i`` sees GPU
  ``i % n`` only (``CUDA_VISIBLE_DEVICES``), so use ``workers`` = the number of GPUs.
* ``ray``: ``ray.init(address=...)`` (None: a local Ray started for the sweep; a given address that
  does not answer within a few seconds is a ParetuneError), ``workers`` actors each holding an
  in-process runner (model loaded once per actor). An actor writes its run into a temporary folder
  of its own and returns the metrics; the driver alone writes the store and the run folders.

Every executor has the same small interface, driven by :func:`paretune.bench.sweep.run_sweep`:
``slots`` (how many runs at once), ``submit(slot, argv)``, ``wait(timeout)`` -> ``(slot, reply)``
or None, and ``close()``, which kills whatever still runs (no training outlives the bench). A
reply is the worker's (see :class:`paretune.bench.worker.InProcessRunner.run`); a worker that died
during a run gives a failed reply saying so, and is replaced by a new one for the next run.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ParetuneError

EXECUTORS = ("sequential", "pool", "ray")
RAY_CONNECT_TIMEOUT = 5.0  # seconds to reach a Ray address before giving up


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int | None:
    """Torch threads per worker: cores // workers (None for one worker: torch's default, as a
    `paretune train` process has)."""
    return None if workers <= 1 else max(1, cores() // workers)


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def _read_tail(path: str | None, n: int = 2000) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
    return text if len(text) <= n else "..." + text[-n:]


class WorkerDied(RuntimeError):
    pass


class WorkerProcess:
    """One ``python -m paretune.bench.worker`` child: ``run(argv)`` sends a request and waits for
    the reply; a worker that died is detected (its stdout closes) and the run reported failed."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.capture: str | None = None
        self._n = 0

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PARETUNE_PARENT_PID"] = str(os.getpid())  # the worker exits when this process is gone
        src = str(Path(__file__).resolve().parents[2])  # the folder holding `paretune`, for the child
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paretune.bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, env=env, text=True, bufsize=1,
            start_new_session=True,  # Ctrl-C reaches the bench only, which then kills its workers
        )
        hello = self.proc.stdout.readline()
        if not hello:
            code = self.proc.wait()
            raise WorkerDied(f"the worker process exited ({_describe_exit(code)}) before it was ready")
        self.capture = json.loads(hello).get("capture")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run(self, argv: list[str], out: str | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            if not self.alive():
                self.start()
            self._n += 1
            self.proc.stdin.write(json.dumps({"id": self._n, "argv": [str(a) for a in argv], "out": out}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise WorkerDied("")
            return json.loads(line)
        except (WorkerDied, BrokenPipeError, OSError, ValueError) as e:
            code = self.proc.wait() if self.proc is not None else None
            tail = _read_tail(self.capture)
            why = str(e) if isinstance(e, WorkerDied) and str(e) else \
                f"the worker process died during the run ({_describe_exit(code)})"
            self.proc = None  # the next run starts a new worker
            return {"ok": False, "metrics": None, "error": why + (f"; its output ended with:\n{tail}" if tail else ""),
                    "output": tail, "wall_seconds": time.perf_counter() - t0, "worker_died": True}

    def close(self, grace: float = 2.0) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            try:
                p.stdin.close()  # an idle worker exits at once
            except OSError:
                pass
            try:
                p.wait(timeout=0.2 if grace else 0)
            except subprocess.TimeoutExpired:
                _kill(p)
        for f in (p.stdout,):
            try:
                f.close()
            except OSError:
                pass


def _kill(p: subprocess.Popen) -> None:
    """Kill a worker and anything it started (its own process group)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (OSError, AttributeError):
        try:
            p.kill()
        except OSError:
            pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class LocalExecutor:
    """``workers`` worker processes on this machine (``sequential`` is ``workers=1``)."""

    def __init__(self, workers: int = 1):
        if not (isinstance(workers, int) and workers >= 1):
            raise ParetuneError(f"--workers {workers!r} is invalid; give an integer >= 1.")
        self.slots = workers
        threads = threads_per_worker(workers)
        gpus = _gpu_count()
        self.workers: list[WorkerProcess] = []
        for i in range(workers):
            env: dict[str, str] = {}
            if threads:
                env["PARETUNE_WORKER_THREADS"] = str(threads)
                env["OMP_NUM_THREADS"] = str(threads)
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            self.workers.append(WorkerProcess(env))
        self._done: queue.Queue = queue.Queue()

    def submit(self, slot: int, argv: list[str]) -> None:
        worker = self.workers[slot]

        def go() -> None:
            try:
                reply = worker.run(argv)
            except BaseException as e:  # noqa: BLE001 - reported as the run's failure
                reply = {"ok": False, "metrics": None, "error": f"{type(e).__name__}: {e}", "output": ""}
            self._done.put((slot, reply))

        threading.Thread(target=go, name=f"paretune-worker-{slot}", daemon=True).start()

    def wait(self, timeout: float | None = None) -> tuple[int, dict] | None:
        try:
            return self._done.get(timeout=timeout)
        except queue.Empty:
            return None

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive()]

    def close(self) -> None:
        for w in self.workers:
            w.close()


# -- Ray --------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise ParetuneError("--executor ray needs the package 'ray'; install it with `uv sync --extra ray` "
                            "or `pip install 'paretune[ray]'`.") from None
    return ray


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """A ParetuneError within ``timeout`` seconds when nothing answers at ``address``
    (``host:port`` or ``ray://host:port``; ``auto`` and ``local`` are left to Ray)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ParetuneError(f"--address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001).")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ParetuneError(f"no Ray cluster answers at {address} ({e}); start one with `ray start --head` and "
                            "give its address, or leave --address out to start a local Ray.") from None


def _ray_worker_class(ray):
    class RayWorker:
        """A Ray actor holding one in-process runner: the model is loaded once per actor."""

        def __init__(self, threads: int | None):
            import tempfile

            from paretune.bench.worker import InProcessRunner

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.tmp = tempfile.mkdtemp(prefix="paretune-ray-")
            self.runner = InProcessRunner(capture=os.path.join(self.tmp, "run.log"), threads=threads)

        def run(self, argv: list[str]) -> dict:
            import shutil
            import tempfile

            out = tempfile.mkdtemp(dir=self.tmp)
            try:
                return self.runner.run(argv, out=out)
            finally:
                shutil.rmtree(out, ignore_errors=True)

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(RayWorker)


class RayExecutor:
    """``workers`` Ray actors (one CPU each, or one GPU each with ``gpus_per_worker``)."""

    def __init__(self, workers: int = 1, address: str | None = None, *, gpus_per_worker: float = 0,
                 connect_timeout: float = RAY_CONNECT_TIMEOUT):
        if not (isinstance(workers, int) and workers >= 1):
            raise ParetuneError(f"--workers {workers!r} is invalid; give an integer >= 1.")
        ray = self.ray = _import_ray()
        self._started = False
        if not ray.is_initialized():
            if address:
                check_ray_address(address, connect_timeout)
            try:
                extra = {} if address else {"include_dashboard": False}
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **extra)
            except Exception as e:  # noqa: BLE001
                raise ParetuneError(f"could not connect to Ray at {address or 'a new local cluster'}: {e}") from None
            self._started = True
        self.slots = workers
        self._cls = _ray_worker_class(ray).options(num_cpus=1, num_gpus=gpus_per_worker)
        self._threads = 1 if workers > 1 else None
        self.actors: list[Any] = [None] * workers
        self._refs: dict[Any, int] = {}

    def _actor(self, slot: int):
        if self.actors[slot] is None:
            self.actors[slot] = self._cls.remote(self._threads)
        return self.actors[slot]

    def submit(self, slot: int, argv: list[str]) -> None:
        ref = self._actor(slot).run.remote([str(a) for a in argv])
        self._refs[ref] = slot

    def wait(self, timeout: float | None = None) -> tuple[int, dict] | None:
        if not self._refs:
            return None
        ready, _ = self.ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        slot = self._refs.pop(ref)
        try:
            reply = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the actor died (RayActorError) or the call failed
            died = type(e).__name__ in ("RayActorError", "ActorDiedError", "WorkerCrashedError",
                                        "ActorUnavailableError")
            if died:
                self._drop(slot)
            reply = {"ok": False, "metrics": None, "output": "", "worker_died": died,
                     "error": (f"the Ray worker died during the run ({type(e).__name__}: {str(e)[:500]})" if died
                               else f"{type(e).__name__}: {str(e)[-2000:]}")}
        return slot, reply

    def _drop(self, slot: int) -> None:
        actor, self.actors[slot] = self.actors[slot], None
        if actor is not None:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass

    def pids(self) -> list[int]:
        return [self.ray.get(a.pid.remote()) for a in self.actors if a is not None]

    def close(self) -> None:
        for slot in range(len(self.actors)):
            self._drop(slot)
        self._refs.clear()
        if self._started:
            self.ray.shutdown()


def make_executor(executor: str = "sequential", workers: int = 1, address: str | None = None):
    """The executor named ``executor`` (sequential | pool | ray) with ``workers`` slots."""
    if executor not in EXECUTORS:
        raise ParetuneError(f"--executor {executor!r} is unknown; choose one of {', '.join(EXECUTORS)}.")
    if address and executor != "ray":
        raise ParetuneError("--address is for --executor ray.")
    if executor == "ray":
        return RayExecutor(workers, address)
    if executor == "sequential" and workers != 1:
        executor = "pool"
    return LocalExecutor(workers)
