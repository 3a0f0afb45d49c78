"""paretune: parameter-efficient adaptation of PyTorch and Hugging Face models.

    import paretune
    paretune.adapt(model, "lora", r=8, targets=["q_proj", "v_proj"])
    ...train...
    paretune.save(model, "my-adapter")
"""

__version__ = "0.1.0"

from . import methods  # noqa: E402,F401  (importing the package registers the built-in methods)
from .api import active, adapt, adapters, merge, per_sample, remove, set_active, unload, unmerge  # noqa: E402
from .api import print_trainable_parameters  # noqa: E402
from .configs import (  # noqa: E402
    AdaLoraConfig, BitFitConfig, IA3Config, LoraConfig, MethodConfig, PissaConfig, PrefixTuningConfig,
    PromptTuningConfig, VeraConfig,
)
from .hf import from_pretrained  # noqa: E402  (also gives adapted transformers models their save_pretrained)
from .core.accounting import count  # noqa: E402
from .io import BaseWeightsWarning, hot_swap, load, save  # noqa: E402
from .parallel import parallel  # noqa: E402
from .peft_io import export_peft, import_peft  # noqa: E402
from .core.registry import all_methods  # noqa: E402
from .errors import AdapterFileError, ConfigError, DivergedError, ParetuneError, TargetError  # noqa: E402


def list_methods() -> dict[str, str]:
    """Every registered method: name -> one-line summary with its trainable-parameter formula
    (what ``paretune methods`` prints)."""
    return {name: f"{spec.summary}; trainable per layer = {spec.formula}" for name, spec in all_methods().items()}


def train(*args, **kwargs):
    """Fine-tune an adapted model (see :func:`paretune.training.trainer.train`)."""
    from .training import train as _train

    return _train(*args, **kwargs)


__all__ = [
    "adapt", "list_methods", "count", "set_active", "active", "adapters", "merge", "unmerge", "unload", "remove",
    "save", "load", "hot_swap", "export_peft", "import_peft", "per_sample", "parallel", "train",
    "ParetuneError", "ConfigError", "TargetError", "AdapterFileError", "DivergedError", "BaseWeightsWarning",
    "from_pretrained", "print_trainable_parameters", "MethodConfig", "LoraConfig", "PissaConfig", "VeraConfig",
    "AdaLoraConfig", "IA3Config", "BitFitConfig", "PromptTuningConfig", "PrefixTuningConfig", "__version__",
]
