"""Offline, seeded, deterministic data sets for fixed-point and operator learning.

Every generator is a pure function of its arguments: the same arguments give the same
arrays (NumPy, float32 unless documented), on any run. Nothing is downloaded.

- `burgers`, `darcy`: the FNO benchmarks (1-D viscous Burgers, 2-D Darcy flow).
- `solve_darcy_iterative`, `solve_sequence`, `skr_order`: the iterative solvers behind
  `darcy(solver=...)` (multigrid-preconditioned CG, deflated CG with Krylov recycling, SKR order);
  `unrolled_pcg`, `iteration_aware_loss`: differentiable solver iterations for training
  initial guesses (neural warm starts).
- `antiderivative`, `poisson1d`: DeepONet operators on random functions at sensors.
- `value_iteration_mdps`: random MDPs with optimal values (graph value iteration).
- `csbm`: contextual stochastic block model graphs (node classification).
- `digits`: sklearn's 8x8 digits, stratified split, standardised.

The generators (all but `digits`) cache their output in `$FPX_DATA_DIR` (default
`~/.cache/fpx`), one `.npz` per call named by a hash of the generator, all its arguments
and a format version; pass `cache=False` to skip the cache. Files are written atomically
(temporary file, then `os.replace`); an unreadable file is regenerated with a warning.
Delete the directory to clear the cache. Long runs (`burgers`, `darcy`) show a tqdm
progress bar on stderr (`progress=None`: only when the run takes more than a few seconds).
"""

from ._burgers import burgers as burgers
from ._cache import data_dir as data_dir
from ._darcy import darcy as darcy
from ._deeponet import DeepONetData as DeepONetData, antiderivative as antiderivative, poisson1d as poisson1d
from ._digits import digits as digits
from ._elliptic import (
    EllipticSolution as EllipticSolution,
    skr_order as skr_order,
    solve_darcy_iterative as solve_darcy_iterative,
    solve_sequence as solve_sequence,
    sor_solve as sor_solve,
)
from ._graphs import Graph as Graph, csbm as csbm
from ._warm_start import iteration_aware_loss as iteration_aware_loss, unrolled_pcg as unrolled_pcg
from ._mdp import MDPs as MDPs, bellman as bellman, value_iteration_mdps as value_iteration_mdps
