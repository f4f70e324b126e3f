"""fpx: fixed points in JAX — solvers, implicit gradients, feasibility, operators.

`import fpx` loads only the core (fixed points, solvers, adjoints). The subpackages
`fpx.data`, `fpx.experiment`, `fpx.feasibility`, `fpx.nn`, `fpx.operators`,
`fpx.parallel` and `fpx.projective` (and `fpx.feasible_point`) are imported on first attribute access, so
their dependencies (scipy, optax, tqdm, flax, orbax, ml_collections, matplotlib, sklearn)
load only when used.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._argmin import (
    AbstractHypergradient as AbstractHypergradient,
    HypergradientExact as HypergradientExact,
    HypergradientFixedPoint as HypergradientFixedPoint,
    HypergradientLinearSolve as HypergradientLinearSolve,
    HypergradientNeumann as HypergradientNeumann,
    HypergradientUnrolled as HypergradientUnrolled,
    argmin as argmin,
)
from ._argmin_stochastic import argmin_stochastic as argmin_stochastic
from ._fixed_point import (
    DisplacementTest as DisplacementTest,
    FixedPointError as FixedPointError,
    fixed_point as fixed_point,
)
from ._misc import max_norm as max_norm, rms_norm as rms_norm, two_norm as two_norm
from ._solution import RESULTS as RESULTS, Solution as Solution
from .adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    JFBAdjoint as JFBAdjoint,
    PhantomAdjoint as PhantomAdjoint,
    ReversibleAdjoint as ReversibleAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
    backward_probe as backward_probe,
    backward_result as backward_result,
)
from .solvers import (
    KM as KM,
    AbstractFixedPointSolver as AbstractFixedPointSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    Halpern as Halpern,
    NewtonKrylov as NewtonKrylov,
    Picard as Picard,
    SQUAREM as SQUAREM,
)

__version__ = "0.1.0"

# Imported on first access (module-level __getattr__, PEP 562).
_LAZY_SUBMODULES = ("data", "experiment", "feasibility", "nn", "operators", "parallel", "projective")
_LAZY_ATTRIBUTES = {"feasible_point": ("feasibility", "feasible_point")}

if _TYPE_CHECKING:
    from . import (
        data as data,
        experiment as experiment,
        feasibility as feasibility,
        nn as nn,
        operators as operators,
        parallel as parallel,
        projective as projective,
    )
    from .feasibility import feasible_point as feasible_point


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # also sets fpx.<name>
    if name in _LAZY_ATTRIBUTES:
        module, attr = _LAZY_ATTRIBUTES[name]
        value = getattr(_importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_LAZY_ATTRIBUTES))
