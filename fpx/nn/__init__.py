"""Fixed-point layers: `DEQ` (equinox), `fpx.nn.nnx.DEQ` (flax nnx) and cells."""

from ._cells import (
    CGSCell as CGSCell,
    ContractiveCell as ContractiveCell,
    SubDEQCell as SubDEQCell,
    jacobian_regularizer as jacobian_regularizer,
    normalized_adjacency as normalized_adjacency,
    project as project,
)
from ._deq import DEQ as DEQ
