"""Measurements on models: the intrinsic dimension of a model on a task (Li et al. 2018;
Aghajanyan et al. 2020), by training in random subspaces of growing dimension.

    from paretune.measure import intrinsic_dimension
    result = intrinsic_dimension("digits-mlp", "digits", [10, 100, 1000], out="intrinsic-out")
    result.d90, result.html_path
"""

from .intrinsic import (  # noqa: F401
    FRACTION,
    IntrinsicResult,
    RunRecord,
    d90_message,
    find_d90,
    intrinsic_dimension,
    parse_dims,
)

__all__ = ["intrinsic_dimension", "IntrinsicResult", "RunRecord", "find_d90", "parse_dims", "d90_message", "FRACTION"]
