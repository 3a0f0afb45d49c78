"""What prompt tuning, prefix tuning and MAM share: finding the model around an adapted module,
and a forward pre-hook on that model that makes its other inputs fit the virtual tokens.

A delta sees only its host module. Virtual tokens also change what the whole model is called
with: the attention mask grows by the n virtual positions, token-level labels get n ignored
(-100) entries in front, given position ids move by n, and for prefix tuning the key/value
prefixes go in as a pre-filled cache. :class:`ModelHook` does this in a forward pre-hook
(``with_kwargs=True``) on the outermost module above the host whose forward takes ``input_ids``
or ``inputs_embeds`` (the transformers model the adapter was added to), and clears its per-call
state in a forward hook that always runs. The hooks are removed by the delta's ``restore_base``
(called by unload, remove, and an adapt that fails).

Each hook acts only while its delta runs (its adapter active, not in a per-sample block), read
from the host's routing, so an inactive adapter leaves the model's inputs as they are.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..core.geometry import Geometry
from ..errors import ParetuneError, TargetError

CACHE_NAMES = ("cache", "past_key_values")  # transformers 5 renamed past_key_values to cache
FILLED = "_paretune_prefix_filled"  # set on a cache filled with prefixes during the current call


def _takes(module: nn.Module, names: tuple[str, ...]) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False
    return any(n in params for n in names)


def _child(module: nn.Module, name: str) -> nn.Module:
    from ..core.host import Host

    if name in module._modules:
        return module._modules[name]
    if isinstance(module, Host):  # inside a block host, names continue in the wrapped module
        return module.base._modules[name]
    raise KeyError(name)


def _chain(geometry: Geometry) -> list[nn.Module] | None:
    """The modules from the host of ``geometry`` up to the model it was adapted in
    (``geometry.root``, set when the module was hosted), outermost last; None if it is not hosted."""
    root = getattr(geometry, "root", None)
    if root is None or not geometry.name:
        return None
    chain = [root]
    try:
        for part in geometry.name.split("."):
            chain.append(_child(chain[-1], part))
    except KeyError:
        return None
    return chain[::-1]


def locate(geometry: Geometry, method: str) -> tuple[nn.Module, nn.Module]:
    """(the host wrapping ``geometry``'s module, the model to hook): the model is the outermost
    module above the host whose forward takes ``input_ids`` or ``inputs_embeds``. A TargetError
    if there is none (a module outside a transformers-style model).

    The modules above the host come from ``geometry.root`` (the model the adapter is added to)."""
    from ..core.host import Host

    chain = _chain(geometry)
    if not chain or not isinstance(chain[0], Host) or chain[0].base is not geometry.base:
        raise TargetError(f"{method}: {geometry.name or type(geometry.base).__name__} is not hosted in a model.")
    host = chain[0]
    models = [m for m in chain if not isinstance(m, Host) and _takes(m, ("input_ids", "inputs_embeds"))]
    if not models:
        raise TargetError(
            f"{method}: {geometry.name or type(geometry.base).__name__} is not inside a model whose forward takes "
            "input_ids or inputs_embeds (a transformers model); virtual tokens need such a model to extend its "
            "attention mask and labels."
        )
    return host, models[-1]


def host_in(model: nn.Module, geometry: Geometry, method: str) -> nn.Module:
    """The host wrapping ``geometry``'s module inside ``model`` (found earlier by :func:`locate`)."""
    from ..core.host import Host

    for module in model.modules():
        if isinstance(module, Host) and module.base is geometry.base:
            return module
    raise TargetError(f"{method}: {geometry.name or type(geometry.base).__name__} is not hosted in the same model "
                      "as the adapter's other layers.")


def cache_name(model: nn.Module, *, through_kwargs: bool = False) -> str | None:
    """The name under which ``model``'s forward takes a key/value cache, or None. With
    ``through_kwargs``, a forward with ``**kwargs`` counts as taking ``cache`` (transformers 5's
    BERT classifiers pass their keywords on to the encoder that takes it)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None
    named = next((n for n in CACHE_NAMES if n in params), None)
    if named is None and through_kwargs and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return CACHE_NAMES[0]
    return named


def bind(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as keywords (positional ones named by the forward's signature)."""
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise ParetuneError(f"{type(model).__name__} was called with {len(args)} positional arguments; "
                            "pass the inputs by keyword.")
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def get_cache(kw: dict[str, Any]) -> tuple[str | None, Any]:
    """(the keyword holding the cache, the cache) of a call, (None, None) without one."""
    for n in CACHE_NAMES:
        if kw.get(n) is not None:
            return n, kw[n]
    return None, None


def cached_length(cache: Any) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def pad_front(t: torch.Tensor, n: int, value: float) -> torch.Tensor:
    """``t`` (batch, length, ...) with n entries equal to ``value`` put before its length dimension."""
    front = torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([front, t], dim=1)


def input_length(kw: dict[str, Any]) -> tuple[int, int]:
    """(batch, length) of the call's input_ids or inputs_embeds."""
    t = kw.get("input_ids")
    if t is None:
        t = kw.get("inputs_embeds")
    if t is None or t.dim() < 2:
        raise ParetuneError("virtual tokens need batched input_ids (batch, length) or inputs_embeds "
                            "(batch, length, dim).")
    return t.shape[0], t.shape[1]


def extend_common(kw: dict[str, Any], n: int, fresh: bool, *, labels: bool) -> None:
    """Make the call's attention mask, position ids (and token-level labels, token type ids when
    ``labels``: the virtual tokens sit in the input sequence) cover n more leading positions.

    ``fresh``: no cached tokens yet, so the virtual tokens are added in this call. On a later call
    with a cache (generation), a 2-D mask shorter than cache + input gets its n ones, and given
    position ids are moved by n with it."""
    batch, length = input_length(kw)
    mask = kw.get("attention_mask")
    _, cache = get_cache(kw)
    short = False
    if mask is not None:
        if mask.dim() != 2:
            raise ParetuneError("virtual tokens need a 2-D attention_mask (batch, length); got one of shape "
                                f"{tuple(mask.shape)}.")
        short = fresh or mask.shape[1] < cached_length(cache) + length
        if short:
            kw["attention_mask"] = pad_front(mask, n, 1)
    pos = kw.get("position_ids")
    if pos is not None:
        if fresh and labels:  # the prompt's own positions 0..n-1, the input's after them
            front = torch.arange(n, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], n)
            kw["position_ids"] = torch.cat([front, pos + n], dim=1)
        elif fresh or short:
            kw["position_ids"] = pos + n
    if labels and fresh:
        lab = kw.get("labels")
        if lab is not None and lab.dim() == 2 and lab.shape == (batch, length):
            kw["labels"] = pad_front(lab, n, -100)
        tt = kw.get("token_type_ids")
        if tt is not None and tt.dim() == 2:
            kw["token_type_ids"] = pad_front(tt, n, 0)


class ModelHook:
    """A forward pre-hook (with keywords) and an always-called forward hook on ``model``:
    ``before(kw) -> kw or None`` edits the call's keywords, ``after()`` clears per-call state."""

    def __init__(self, model: nn.Module, before: Callable[[dict[str, Any]], dict[str, Any] | None],
                 after: Callable[[], None]):
        def pre(module, args, kwargs):
            kw = before(bind(module, args, kwargs))
            return None if kw is None else ((), kw)

        def post(module, args, output):
            after()

        self.handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                        model.register_forward_hook(post, always_call=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def running(delta: nn.Module, host: nn.Module) -> bool:
    """Whether ``delta`` runs in the host's next forward (active, unmerged, no per-sample block)."""
    if getattr(host, "plan", None) is not None:
        raise ParetuneError(f"{getattr(delta, 'method', 'this method')}: per-sample serving is not offered for "
                            "virtual-token adapters; run each adapter's rows as their own batch.")
    return any(d is delta for d in host.route()[1])
