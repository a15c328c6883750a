"""dnls: differentiable non-local search for PyTorch.

Memory-bounded patch operations on videos ``(B, T, C, H, W)``: :func:`search` finds the k
nearest patches of each query in a space-time window; :func:`gather`, :func:`scatter` and
:func:`wpsum` read, write back and weight-sum those patches; :func:`iunfold` and :func:`ifold`
unfold and fold any rectangular region in query batches. Every op is differentiable and takes
``start``/``count`` (where it walks the query grid) so memory stays bounded by the batch.

Note: the original dnls project used the names ``scatter`` and ``gather`` the other way round.
Here they follow PyTorch: ``gather`` reads patches, ``scatter`` writes them.
"""

from . import distributed as distributed
from . import nn as nn
from ._grid import QueryGrid, query_grid
from ._plan import plan_batches
from .ops.flows import accumulate_flows
from .ops.fold import ifold, iunfold
from .ops.patches import gather, scatter, wpsum
from .ops.refine import refine
from .ops.search import search

__version__ = "0.1.0"

__all__ = [
    "QueryGrid",
    "accumulate_flows",
    "gather",
    "ifold",
    "iunfold",
    "plan_batches",
    "query_grid",
    "refine",
    "scatter",
    "search",
    "wpsum",
]
