"""Compression of the base model: round-to-nearest k-bit weights (2, 3, 4, 8 bits) in groups along
either channel dimension, packed storage, adapters on the quantised base, and compressed folders.

* :func:`quantize` replaces Linear / GPT-2 Conv1D layers by :class:`QuantizedLinear` in place;
* :func:`save_compressed` / :func:`load_compressed` write and read a compressed model folder
  (quantised and/or pruned; masks kept), and ``paretune compress`` does both from the command line;
* :func:`correct_quantization` trains an error-correcting LoRA against the float model (INT2.1), and
  :func:`glowq` quantises with low-rank corrections that share one right factor per group of layers
  reading the same input (GlowQ);
* :func:`rtn` / :func:`dequantize` / :func:`pack` / :func:`unpack` are the tensor functions;
* :func:`prune` (magnitude per layer or global, Wanda) keeps masks that training and merging
  respect, :func:`perp` retrains norms and biases or a masked LoRA after pruning, and
  :func:`iterative_magnitude_pruning` finds lottery tickets;
* :func:`to_bitnet` trains chosen layers as BitNet b1.58 (ternary weights, 8-bit activations) and
  :func:`freeze_ternary` stores them as ternary codes; :func:`factorize` + :func:`distill` are
  PELA's low-rank compression with distillation; :func:`make_recursive` ties layers into shared
  blocks with per-depth LoRA (Relaxed Recursive Transformers).

Adapters (``paretune.adapt``) host a QuantizedLinear as a Linear; see :mod:`paretune.compress.quantized`
for the scheme, its error bound and the packing.
"""

from .quantize import is_quantized, linear_bytes, quantize, quantized_modules
from .quantized import QuantizedLinear, dequantize, pack, rtn, unpack
from .storage import install_mask, is_compressed, load_compressed, prune_quantized, save_compressed
from .correction import correct_quantization
from .glowq import GlowQGroup, GlowQLinear, glowq, glowq_parameters, glowq_report, is_glowq, load_glowq, save_glowq
from .pruning import apply_masks, masks, perp, prune, remove_masks, sparsity_report
from .lottery import iterative_magnitude_pruning
from .bitnet import BitLinear, TernaryLinear, freeze_ternary, load_ternary, prepare_bitnet_training, save_ternary, to_bitnet
from .lowrank import LowRankLinear, distill, factorize
from .recursive import count_unique, load_recursive, make_recursive, recursive_counts, save_recursive

__all__ = [
    "quantize", "is_quantized", "quantized_modules", "linear_bytes", "QuantizedLinear", "rtn", "dequantize",
    "pack", "unpack", "save_compressed", "load_compressed", "is_compressed", "install_mask", "prune_quantized",
    "correct_quantization", "glowq", "glowq_report", "glowq_parameters", "save_glowq", "load_glowq", "GlowQLinear",
    "GlowQGroup", "is_glowq",
    "prune", "perp", "apply_masks", "masks", "remove_masks", "sparsity_report", "iterative_magnitude_pruning",
    "to_bitnet", "freeze_ternary", "save_ternary", "load_ternary", "BitLinear", "TernaryLinear",
    "prepare_bitnet_training", "factorize", "distill", "LowRankLinear", "make_recursive", "save_recursive",
    "load_recursive", "count_unique", "recursive_counts",
]
