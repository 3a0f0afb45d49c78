"""The Delta contract every method implements (see docs/architecture.md)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import AdapterFileError
from .config import AdapterConfig
from .geometry import Geometry


class Delta(nn.Module):
    """One adapter on one base module: the contract every method implements.

    A method subclasses this (or :class:`paretune.core.lowrank.LowRankDelta` for ΔW = s·B·A,
    :class:`paretune.core.sparse.SparseDelta` for a fixed set of W's entries), pairs it with an :class:`~paretune.core.config.AdapterConfig` dataclass and registers both
    with :func:`paretune.core.registry.register`. docs/adding-a-method.md walks through one.

    Required:

    * ``__init__(geometry, config, *, bank=None, layer=0)``: build the parameters and initialise
      them as the paper says; pass ``bank`` and ``layer`` on to ``super().__init__``. ``bank`` is
      what :meth:`make_bank` built once for all the adapter's layers (None if it builds nothing),
      ``layer`` the index of this module among the adapter's targets;
    * :meth:`forward` ``(x, base_out)``: the adapted output (LowRankDelta provides it); it may add
      into ``base_out`` in place when no gradient flows (a caller that still needs ``base_out``
      passes a copy);
    * :meth:`trainable_formula`: the paper's trainable-parameter count for one layer;
    * :meth:`delta_weight`: the dense ΔW, if the class is ``mergeable`` (the default; a
      mergeable class without it is refused at registration). LowRankDelta provides it.

    Optional, each with a default here:

    * :meth:`make_bank` (classmethod): frozen tensors shared by all layers of the adapter (default
      none);
    * :meth:`stored_state`: what ``save`` writes (default: every parameter), with
      :meth:`load_stored` reading it back (default: strict copy by name and shape);
    * :meth:`as_lora`: ``(A, B, scaling)`` for an exact LoRA form (PEFT export, the gathered
      per-sample path; default None);
    * :meth:`fused_forward` ``(x)``: base op and delta as one fused autograd node, when this is the
      only delta to run (default None: not offered);
    * :meth:`alone_forward` ``(x, base_out)``: the output when this is the only delta to run, so
      ``base_out`` is exactly the frozen base's W₀x + b₀ (default :meth:`forward`; Hydra reuses
      it for its sequential branch);
    * :meth:`delta_bias`: the change of the bias on merge (default None);
    * :meth:`sparse_delta`: ``(flat positions, values)`` when ΔW is non-zero at a few positions only,
      so merge and unmerge write only those entries (default None; SparseDelta has it);
    * :meth:`layer_formula` (classmethod): the count on one layer when it depends on more than its
      shape (default: :meth:`trainable_formula` of the shape);
    * :meth:`shared_formula` (classmethod): trainable parameters the adapter shares across its
      layers (held in its bank), counted once (default 0; subspace training's θ_d);
    * :meth:`on_step` ``(step, total)``: called by the trainer after each optimizer step (default
      nothing; LaMDA freezes B by it);
    * :meth:`aux_loss`: an auxiliary loss the trainer adds to the task loss (default None);
    * :meth:`growth_state` / :meth:`grow_to`: for parameter shapes that change during training,
      so that a checkpoint resumes mid-growth (default: fixed shapes);
    * with ``shifts_base = True``: :meth:`unshift` and :meth:`restore_base`, for a delta whose
      construction changes the base weight (PiSSA keeps the residual there);
    * with ``depends_on_base = True``: :meth:`merged_deltas`, for a ΔW that is a function of W.

    Flags: ``mergeable``, ``shifts_base``, ``depends_on_base``, ``weightable`` (class attributes;
    ``weightable = False`` for a delta whose output is not the base output plus a change, e.g. one
    that lengthens the sequence).
    """

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True  # has a weight delta (delta_weight), so merge applies
    shifts_base: ClassVar[bool] = False  # True if __init__ changed the base weight (see unshift)
    depends_on_base: ClassVar[bool] = False  # True if ΔW is a function of W itself (Hydra's W_s·W₀)
    weightable: ClassVar[bool] = True  # its output is base_out plus a change (set_active weights scale it)

    def __init__(self, geometry: Geometry, config: AdapterConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__()
        self.config = config
        self.layer = layer
        self.bank = bank  # the same module in every delta of this adapter (shared, not copied)
        self.kind = geometry.kind
        self.d_out = geometry.d_out
        self.d_in = geometry.d_in
        # plain attribute (a tuple hides the base module from nn.Module's registration)
        self._geometry = (geometry,)

    @property
    def geometry(self) -> Geometry:
        return self._geometry[0]

    # -- the contract ------------------------------------------------------------------------
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: AdapterConfig) -> nn.Module | None:
        """Frozen tensors shared by all layers of one adapter (e.g. VeRA's random A and B, sized
        to the largest layer), built once before the deltas; None (the default) for none."""
        return None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, base_out)")

    def delta_weight(self) -> torch.Tensor | None:
        """Dense ΔW, (d_out, d_in), in the adapter's precision (float32 or float64). Required for a
        ``mergeable`` class; the base class has none."""
        return None

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The host's whole output (base op and this delta) as one fused autograd node, used when
        this is the only delta to run; None (the default) when not offered or not applicable."""
        return None

    def alone_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapted output when this is the only delta to run on a base that no other delta
        shifted, so ``base_out`` is exactly the frozen base's output (default: :meth:`forward`)."""
        return self.forward(x, base_out)

    def on_step(self, step: int, total: int) -> None:
        """Called by the trainer after optimizer step ``step`` of ``total``, while the step's
        gradients are still on the parameters (and once with the starting step when a run
        resumes), for schedules over training. Parameters that a schedule creates here (rank
        growth) join the optimizer as a new parameter group. Default: nothing."""

    def formula_now(self) -> int:
        """The paper's count for this layer as it stands; a growing method overrides it to count its
        current rank. Default: :meth:`layer_formula` of the geometry and config."""
        return type(self).layer_formula(self.geometry, self.config)

    @classmethod
    def most_trainable(cls, geometries: list[Geometry], config: AdapterConfig) -> int | None:
        """For a method that grows during training: the most trainable numbers the adapter can
        reach on these layers (its budget), which ``count`` reports as ``max_trainable``. Default:
        None (a fixed size)."""
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary training loss (a router's load balance, an orthogonality penalty) that
        the trainer adds to the task loss after each forward pass; return it and forget it (the
        next forward builds a new one). Default: None."""
        return None

    def growth_state(self) -> dict | None:
        """For a method whose parameter shapes change during training: what :meth:`grow_to` needs
        to rebuild the current shapes (JSON-able ints / lists), written into checkpoints. Default:
        None (fixed shapes)."""
        return None

    def grow_to(self, state: dict) -> None:
        """Rebuild the parameter shapes that :meth:`growth_state` described (values are restored
        afterwards), when a checkpoint taken mid-growth is resumed."""
        raise NotImplementedError(f"{type(self).__name__} has no growth to restore")

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat, values): ΔW is ``values`` at the flat positions ``flat`` (row · d_in + col of the
        (d_out, d_in) view) and zero elsewhere, for a merge that writes only those entries of W;
        None (the default) for a dense ΔW."""
        return None

    def delta_bias(self) -> torch.Tensor | None:
        """Change of the base bias when merged (most methods: none)."""
        return None

    def merged_deltas(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δb) to take out on unmerge, computed while the adapter is merged. The same as
        (delta_weight(), delta_bias()) unless ΔW depends on W (then the method recovers it)."""
        return self.delta_weight(), self.delta_bias()

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: AdapterConfig) -> int:  # pragma: no cover
        """Trainable parameters of one adapted layer of matrix shape (d_out, d_in), per the paper."""
        raise NotImplementedError

    @classmethod
    def layer_formula(cls, geometry: Geometry, config: AdapterConfig) -> int:
        """Trainable parameters of this method on the layer ``geometry`` describes (its shape, its
        name in the model, its bias). Default: :meth:`trainable_formula` of its shape; override it
        when the count depends on more (IA3's feed-forward layers, a norm without β)."""
        return cls.trainable_formula(geometry.d_out, geometry.d_in, config)

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: AdapterConfig) -> int:
        """Trainable parameters shared by all the adapter's layers (a parameter of its bank), counted
        once for the adapter; ``shapes``: (d_out, d_in) of every adapted layer. Default 0."""
        return 0

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The tensors :func:`paretune.save` writes. Default: every parameter of the delta."""
        return {n: p.detach() for n, p in self.named_parameters()}

    def check_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Raise :class:`AdapterFileError` unless ``state`` has exactly the names and shapes of
        :meth:`stored_state` (what :meth:`load_stored` needs)."""
        own = self.stored_state()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise AdapterFileError(
                f"adapter tensors for {where or 'a module'} do not match {self.method}: "
                f"missing {missing or 'none'}, unexpected {extra or 'none'}. "
                "Was the file written by another method or version?"
            )
        for name, value in state.items():
            if tuple(own[name].shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"{where}.{name}: saved shape {tuple(value.shape)} != expected {tuple(own[name].shape)}; "
                    "the adapter was made with other options or another base model."
                )

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Copy tensors saved by :meth:`stored_state` back in (strict: names and shapes)."""
        self.check_stored(state, where)
        params = dict(self.named_parameters())
        params.update(dict(self.named_buffers()))
        for name, value in state.items():
            target = params[name]
            target.copy_(value.to(target.dtype))

    def unshift(self, x: torch.Tensor) -> torch.Tensor:
        """For a delta with ``shifts_base``: what to add to the host's base output to get the
        original base's output (used while the adapter is off, so that off means unchanged)."""
        raise NotImplementedError

    def restore_base(self) -> None:
        """Undo what construction did to the base weight (called by unload when not merged)."""

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, d_in), B (d_out, r), scaling) with ΔW = scaling·B·A, for PEFT export; None if
        the method has no exact LoRA form."""
        return None

    def extra_repr(self) -> str:
        return f"{self.method}: d_in={self.d_in}, d_out={self.d_out}"


def add_dense(delta: Delta, x: torch.Tensor, base_out: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """base_out + ΔW x, with a dense (d_out, d_in) ΔW applied as the host's base op would."""
    if delta.kind != "embedding":  # an embedding's input is ids
        x = x.to(dw.dtype)
    return base_out + delta.geometry.project_in(x, dw).to(base_out.dtype)


class SharedInBank(Delta):
    """A delta whose adapter also trains tensors held on its bank (one parameter for all layers:
    subspace training's θ_d, Compacter's shared PHM rule). Lists their names in ``shared_names``
    (a name the bank does not have is skipped: ScaLearn shares ω only in its ++ variants);
    saves them once, with the adapter's first layer, beside each layer's own parameters, and
    loads them back the same way. Count them with :meth:`Delta.shared_formula`."""

    shared_names: ClassVar[tuple[str, ...]] = ()

    def _stored(self) -> dict[str, torch.Tensor]:
        out = {n: p for n, p in self.named_parameters() if not n.startswith("bank.")}
        if self.layer == 0:
            out.update({n: getattr(self.bank, n) for n in self.shared_names if hasattr(self.bank, n)})
        return out

    def stored_state(self) -> dict[str, torch.Tensor]:
        """Each layer's own parameters; the shared ones with the first layer."""
        return {n: t.detach() for n, t in self._stored().items()}

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.check_stored(state, where)
        for name, target in self._stored().items():
            target.copy_(state[name].to(target.dtype))
