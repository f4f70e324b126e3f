"""fpx: fixed points in JAX — solvers, implicit gradients, feasibility, operators."""

from ._fixed_point import (
    DisplacementTest as DisplacementTest,
    FixedPointError as FixedPointError,
    fixed_point as fixed_point,
)
from .feasibility._feasible_point import feasible_point as feasible_point
from ._misc import max_norm as max_norm, rms_norm as rms_norm, two_norm as two_norm
from ._solution import RESULTS as RESULTS, Solution as Solution
from .adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    JFBAdjoint as JFBAdjoint,
    PhantomAdjoint as PhantomAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
    backward_probe as backward_probe,
)
from .solvers import (
    KM as KM,
    AbstractFixedPointSolver as AbstractFixedPointSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    Halpern as Halpern,
    NewtonKrylov as NewtonKrylov,
    Picard as Picard,
)

from . import data as data, feasibility as feasibility, nn as nn, operators as operators, projective as projective

__version__ = "0.1.0"
