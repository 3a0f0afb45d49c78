"""The adapter engine: geometry, the Delta contract, hosts, target matching, the method registry,
per-sample serving, accounting. It imports nothing from the rest of paretune but ``errors``.

What a method author needs (see docs/adding-a-method.md)::

    from paretune.core import AdapterConfig, Bank, Delta, Geometry, LowRankDelta, SparseDelta, adapter_dtype, register
"""

from .bank import Bank
from .config import AdapterConfig
from .delta import Delta, SharedInBank
from .dtypes import adapter_dtype
from .geometry import Geometry
from .lowrank import LowRankDelta
from .registry import register, unregister
from .sparse import SparseDelta

__all__ = ["AdapterConfig", "Bank", "Delta", "Geometry", "LowRankDelta", "SparseDelta", "adapter_dtype", "register", "unregister"]
