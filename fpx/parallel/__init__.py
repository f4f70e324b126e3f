"""Sequential computations evaluated in parallel as fixed points.

A recurrence `h_t = f(h_{t-1}, x_t)` is one system of equations in all `T` states at
once; `scan` solves it with a parallel fixed-point or Newton iteration run by fpx's one
driver (result codes, best iterate, `throw`, per-sequence results under `vmap`) and
differentiates it by the implicit function theorem.
"""

from ._decode import (
    JacobiTrajectories as JacobiTrajectories,
    consistency_loss as consistency_loss,
    greedy_decode as greedy_decode,
    jacobi_decode as jacobi_decode,
    jacobi_trajectories as jacobi_trajectories,
)
from ._sampling import ddim_sample as ddim_sample, picard_sample as picard_sample
from ._scan import scan as scan
