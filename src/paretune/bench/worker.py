"""A reusable bench worker: runs ``paretune train`` command after command in one process, with the
model, the task data and its tokenisation loaded once per worker.

    python -m paretune.bench.worker          # JSON lines: a request per line on stdin, a reply per line

A request is ``{"id": ..., "argv": [...]}`` where ``argv`` is a run's ``RunSpec.argv(run_dir)`` (a
``python -m paretune.cli train ...`` command); the worker runs that command in-process (the typer
app's ``train`` command, so it runs whatever options the argv holds) and replies
``{"id", "ok", "metrics", "error", "output", "wall_seconds", "loads"}``. The first line it writes
is ``{"hello": pid, "capture": path}``.

What makes an in-process run give the result of a fresh ``paretune train`` process:

* ``paretune.models.load`` is memoised per (model, task, num_labels, dtype): the first call loads,
  every call returns a deep copy of that master model (adapters change the model they are given)
  and the shared tokenizer.
* A classification head is made by ``from_pretrained`` (random init) right after
  ``torch.manual_seed(seed)`` (``paretune train`` seeds before loading); a copied model's head is
  re-initialised the same way: ``torch.manual_seed(seed)`` then the model's own ``_init_weights`` on
  the head modules, which draws exactly what ``from_pretrained`` draws (checked at the first load of
  each model: a head that the checkpoint itself holds is left as loaded).
* Built-in task splits, data files and their tokenisation are memoised (a data file by path, size
  and mtime; a tokenisation by tokenizer, rows, labels and max_length).
* The trainer seeds (``torch.manual_seed(seed)``) before anything else random, so a run's result
  depends on its argv only, not on the runs before it in the worker.

Memory of a run in a worker (the trainer's own ``peak_memory_bytes``, ``ru_maxrss``, would be the
worker's lifetime peak): on CPU a thread samples the process's resident set size every 10 ms
(``/proc/self/statm``) during the run; ``peak_memory_bytes`` is the largest sample (the worker's
whole RSS, which includes its cached master models, as a ``paretune train`` process's peak RSS
includes its own model) and ``peak_memory_delta_bytes`` is that peak minus the RSS at the run's
start (what the run itself added). Before each run, garbage is collected and freed heap pages go
back to the OS (``malloc_trim`` on glibc), so the earlier runs' freed memory does not count; the
worker's cached master model does (one model copy more than a ``paretune train`` process holds).
On CUDA ``peak_memory_bytes`` stays the trainer's
``torch.cuda.max_memory_allocated`` (peak stats reset at each run's start). ``memory_measure`` in
the metrics names which.

A run that raises (or exits non-zero) is a failed reply with its output tail; the worker goes on.
The worker exits when its stdin closes or its parent dies (a watchdog thread), so no training
outlives the bench.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

OUTPUT_TAIL = 2000
SAMPLE_SECONDS = 0.01
THREADS_ENV = "PARETUNE_WORKER_THREADS"


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``), so that
    a run's RSS samples do not include memory the runs before it freed but the allocator kept."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): RSS may then include freed pages
        pass


def _tail(text: str, n: int = OUTPUT_TAIL) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def train_args(argv: list[str]) -> list[str]:
    """The arguments of the `paretune` command in a run's argv (``python -m paretune.cli train ...``
    or ``paretune train ...``): ``["train", ...]``."""
    argv = [str(a) for a in argv]
    if "paretune.cli" in argv:
        args = argv[argv.index("paretune.cli") + 1:]
    elif argv and Path(argv[0]).name == "paretune":
        args = argv[1:]
    else:
        args = argv
    if not args or args[0] != "train":
        raise ValueError(f"not a `paretune train` command: {' '.join(argv[:6])}...")
    return args


def _option(args: list[str], flag: str, default: str | None = None) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


# -- memory ---------------------------------------------------------------------------------

def rss_bytes() -> int | None:
    """This process's resident set size now (Linux /proc/self/statm), None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakRSS:
    """Samples the RSS every ``interval`` seconds in a thread between ``start()`` and ``stop()``;
    ``peak`` (largest sample) and ``start_rss`` (at start)."""

    def __init__(self, interval: float = SAMPLE_SECONDS):
        self.interval = interval
        self.start_rss = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = rss_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def start(self) -> "PeakRSS":
        if self.start_rss is not None:
            self._thread = threading.Thread(target=self._loop, name="paretune-rss", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


# -- memoised loading -----------------------------------------------------------------------

def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _head_names(model) -> list[str]:
    from ..training.trainer import head_modules

    return head_modules(model)


def reinit_head(model) -> None:
    """Initialise the task head(s) as ``from_pretrained`` does for weights it lacks (the model's
    own ``_init_weights``), drawing from the global torch RNG."""
    for name in _head_names(model):
        for m in model.get_submodule(name).modules():
            model._init_weights(m)


def _same_head(a, b) -> bool:
    import torch

    for name in _head_names(a):
        sa, sb = a.get_submodule(name).state_dict(), b.get_submodule(name).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


class Caches:
    """The worker's memo of models, task splits, data files and tokenisations."""

    def __init__(self) -> None:
        self.models: dict[tuple, tuple[Any, Any, bool]] = {}  # key -> (master model, tokenizer, fresh head)
        self.tasks: dict[str, Any] = {}
        self.files: dict[tuple, Any] = {}
        self.encodings: dict[tuple, Any] = {}
        self.loads = 0  # real model loads (for tests and the reply)
        self.seed = 0  # the current run's seed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route paretune's model, task, data and tokenisation loading through the memo while a
        run runs (module attributes patched and restored)."""
        from .. import data as data_pkg
        from .. import models
        from ..training import trainer

        real_load, real_task, real_data, real_encode = models.load, data_pkg.get_task, data_pkg.load_data, trainer.encode
        import torch

        def load(name_or_path, *, task="auto", num_labels=None, dtype=None):
            key = (os.fspath(name_or_path), task, num_labels, str(dtype))
            got = self.models.get(key)
            if got is None:
                torch.manual_seed(self.seed)  # as `paretune train` does before loading
                master, tok = real_load(name_or_path, task=task, num_labels=num_labels, dtype=dtype)
                self.loads += 1
                fresh = False
                if task == "classification" or num_labels is not None:
                    after = torch.get_rng_state()
                    probe = copy.deepcopy(master)
                    torch.manual_seed(self.seed)
                    reinit_head(probe)
                    fresh = _same_head(probe, master)  # else the checkpoint holds the head: keep it
                    torch.set_rng_state(after)
                    del probe
                self.models[key] = got = (master, tok, fresh)
                return copy.deepcopy(master), tok
            master, tok, fresh = got
            net = copy.deepcopy(master)
            if fresh:
                torch.manual_seed(self.seed)
                reinit_head(net)
            return net, tok

        def get_task(name):
            if name not in self.tasks:
                self.tasks[name] = _CachedTask(real_task(name))
            return self.tasks[name]

        def load_data(source, kind=None):
            if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
                st = Path(source).stat()
                key = (str(Path(source).resolve()), st.st_size, st.st_mtime_ns, kind)
                if key not in self.files:
                    self.files[key] = real_data(source, kind)
                return self.files[key]
            return real_data(source, kind)

        def encode(data, tokenizer, *, labels=None, max_length=64):
            key = (id(tokenizer), data.kind, len(data), _fingerprint(data.rows), tuple(labels or ()), max_length)
            if key not in self.encodings:
                self.encodings[key] = real_encode(data, tokenizer, labels=labels, max_length=max_length)
            return self.encodings[key]

        models.load, data_pkg.get_task, data_pkg.load_data, trainer.encode = load, get_task, load_data, encode
        try:
            yield
        finally:
            models.load, data_pkg.get_task, data_pkg.load_data, trainer.encode = (
                real_load, real_task, real_data, real_encode)


class _CachedTask:
    """A built-in task whose splits are computed once."""

    def __init__(self, task):
        self._task, self._splits = task, {}

    def __getattr__(self, name):
        return getattr(self._task, name)

    def splits(self, test_fraction: float = 0.2):
        if test_fraction not in self._splits:
            self._splits[test_fraction] = self._task.splits(test_fraction)
        return self._splits[test_fraction]


# -- one run in this process -----------------------------------------------------------------

@contextlib.contextmanager
def _captured(path: str | None) -> Iterator[io.StringIO]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C-level output too) to
    ``path`` during a run (nothing captured with None)."""
    buf = io.StringIO()
    if path is None:
        yield buf
        return
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield buf
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


class InProcessRunner:
    """Runs `paretune train` argvs in this process, one after another, with :class:`Caches`.

    ``capture``: a file that receives the run's stdout/stderr (its tail is the reply's ``output``);
    None leaves them alone. ``threads``: torch's intra-op threads (None: torch's default)."""

    def __init__(self, *, capture: str | None = None, threads: int | None = None):
        self.caches = Caches()
        self.capture = capture
        self._command = None
        if threads:
            import torch

            torch.set_num_threads(max(1, int(threads)))

    def command(self):
        if self._command is None:
            import typer.main

            from ..cli import app

            self._command = typer.main.get_command(app)
        return self._command

    def run(self, argv: list[str], out: str | None = None) -> dict[str, Any]:
        """One run: the reply (``ok``, ``metrics`` or ``error``, ``output``, ``wall_seconds``,
        ``loads``). ``out`` replaces the argv's ``--out`` folder (a Ray actor writes locally)."""
        t0 = time.perf_counter()
        reply: dict[str, Any] = {"ok": False, "metrics": None, "error": None, "output": ""}
        try:
            args = train_args(argv)
            if out is not None:
                args = [out if i and args[i - 1] == "--out" else a for i, a in enumerate(args)]
            run_dir = Path(_option(args, "--out") or ".")
            self.caches.seed = int(_option(args, "--seed", "0"))
        except Exception as e:  # noqa: BLE001
            reply.update(error=f"{type(e).__name__}: {e}", wall_seconds=time.perf_counter() - t0)
            return reply
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _release_freed_memory()  # the earlier runs' freed memory is not this run's
        sampler = PeakRSS().start()
        code: Any = None
        error = None
        try:
            with _captured(self.capture), self.caches.installed():
                try:
                    code = self.command().main(args=args, prog_name="paretune", standalone_mode=False)
                except SystemExit as e:
                    code = e.code
                except BaseException as e:  # noqa: BLE001 - a run's failure is the run's own
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    error = f"{traceback.format_exc()}"
                    if hasattr(e, "format_message"):  # click usage errors
                        error += f"\n{e.format_message()}"
        finally:
            sampler.stop()
        output = Path(self.capture).read_text(errors="replace") if self.capture and Path(self.capture).exists() else ""
        reply["output"] = _tail(output)
        reply["loads"] = self.caches.loads
        if error is None and code not in (None, 0):
            error = f"exit status {code}: {_tail(output) or '(no output)'}"
        if error is None:
            try:
                metrics = json.loads((run_dir / "metrics.json").read_text())
            except (OSError, ValueError) as e:
                error = f"the run exited 0 but wrote no usable metrics ({e})"
            else:
                if not cuda and sampler.peak is not None:
                    metrics["peak_memory_bytes"] = int(sampler.peak)
                    metrics["peak_memory_delta_bytes"] = int(sampler.peak - (sampler.start_rss or 0))
                    metrics["memory_measure"] = "worker RSS peak, sampled every 10 ms during the run"
                elif cuda:
                    metrics["memory_measure"] = "torch.cuda.max_memory_allocated during training"
                reply.update(ok=True, metrics=metrics)
        if error is not None:
            reply["error"] = _tail(error)
        reply["wall_seconds"] = time.perf_counter() - t0
        return reply


# -- the worker process ---------------------------------------------------------------------

PARENT_ENV = "PARETUNE_PARENT_PID"


def _die_with_parent() -> None:
    """Exit when the parent process dies (a watchdog thread polls the parent pid every 0.5 s).
    ``PARETUNE_PARENT_PID`` (set by :class:`paretune.bench.executors.WorkerProcess`) closes the
    gap before the thread starts: a worker whose parent is already gone exits at once.
    Not PR_SET_PDEATHSIG: it fires when the parent *thread* that started the worker ends, and the
    local executor starts workers from short-lived threads."""
    parent = os.getppid()
    expected = os.environ.get(PARENT_ENV)
    if expected and expected.isdigit() and int(expected) != parent:
        os._exit(1)  # the bench died before this worker started watching

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="paretune-parent-watch", daemon=True).start()


def serve(stdin, reply_fd: int, runner: InProcessRunner) -> None:
    """Answer requests from ``stdin`` (JSON lines) on ``reply_fd`` until stdin closes."""

    def send(obj: dict) -> None:
        os.write(reply_fd, (json.dumps(obj, default=str) + "\n").encode())

    send({"hello": os.getpid(), "capture": runner.capture})
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("quit"):
            break
        reply = runner.run(req["argv"], out=req.get("out"))
        reply["id"] = req.get("id")
        send(reply)


def main() -> None:
    import faulthandler

    _die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    reply_fd = os.dup(1)  # replies go here; the runs' own stdout goes to the capture file
    os.dup2(2, 1)
    faulthandler.enable()  # a segfault's stack lands in the capture file or the worker's stderr
    threads = os.environ.get(THREADS_ENV)
    capture = os.path.join(tempfile.mkdtemp(prefix="paretune-worker-"), "run.log")
    runner = InProcessRunner(capture=capture, threads=int(threads) if threads else None)
    runner.command()  # import the CLI (and torch) before the first run
    serve(sys.stdin, reply_fd, runner)


if __name__ == "__main__":
    main()
