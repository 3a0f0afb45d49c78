"""Built-in methods: one file per family, each registering itself on import."""

from . import lora, pissa  # noqa: F401
from . import nola, hydra  # noqa: F401
from . import kronecker  # noqa: F401
from . import block_lora, lamda  # noqa: F401
from . import vera  # noqa: F401
from . import randlora  # noqa: F401
from . import neuroada, random_sparse  # noqa: F401
from . import fourierft  # noqa: F401
from . import loca  # noqa: F401
from . import shira  # noqa: F401
from . import lt_sft  # noqa: F401
from . import subspace  # noqa: F401
from . import ia3  # noqa: F401
from . import bitfit  # noqa: F401
from . import ln_tuning  # noqa: F401
from . import bottleneck, compacter  # noqa: F401
from . import poly  # noqa: F401
from . import prompt_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
from . import mam  # noqa: F401
from . import scalearn  # noqa: F401
from . import flylora  # noqa: F401
from . import lora_mixer, mosa  # noqa: F401
from . import mos  # noqa: F401
from . import mixlora  # noqa: F401
from . import adalora, increlora  # noqa: F401
