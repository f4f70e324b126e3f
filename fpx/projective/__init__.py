"""Projection-based training of plain JAX models (divide and concur on the jaxpr)."""

from ._graph import SUPPORTED as SUPPORTED, UnsupportedPrimitiveError as UnsupportedPrimitiveError
from ._scalar import (
    SCALAR_FUNCTIONS as SCALAR_FUNCTIONS,
    STEP_FUNCTIONS as STEP_FUNCTIONS,
    project_quantizer_graph as project_quantizer_graph,
    project_scalar_graph as project_scalar_graph,
    project_step_graph as project_step_graph,
    quantize as quantize,
)
from ._sets import (
    project_margin as project_margin,
    project_max_graph as project_max_graph,
    project_reduce_max_graph as project_reduce_max_graph,
    prox_cross_entropy as prox_cross_entropy,
)
from ._trainer import Problem as Problem, Trainer as Trainer, TrainerState as TrainerState
