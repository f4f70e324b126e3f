"""Fixed-point layers: `DEQ` (equinox), `fpx.nn.nnx.DEQ` (flax nnx) and cells.

`fpx.nn.nnx` (which needs flax) is imported on first access.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._cells import (
    CGSCell as CGSCell,
    ContractiveCell as ContractiveCell,
    SubDEQCell as SubDEQCell,
    jacobian_regularizer as jacobian_regularizer,
    normalized_adjacency as normalized_adjacency,
    project as project,
)
from ._deq import DEQ as DEQ

if _TYPE_CHECKING:
    from . import nnx as nnx


def __getattr__(name: str):
    if name == "nnx":
        return _importlib.import_module(f"{__name__}.nnx")  # also sets fpx.nn.nnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"nnx"})
