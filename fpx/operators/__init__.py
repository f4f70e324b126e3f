"""Neural operators as pure `(init, apply)` pairs: FNO, TFNO, T1, MgNO, Galerkin transformer, DeepONet, GNN; `iterate` and `deq` combinators.

Every constructor returns an `Operator(init, apply)`: `params = op.init(key)` (a pytree of
real arrays), `y = op.apply(params, x)` for one sample (vmap for batches).
"""

from ._combinators import deq as deq, iterate as iterate
from ._deeponet import DeepONet as DeepONet
from ._fno import FNO as FNO, FNOBlock as FNOBlock, SpectralConv as SpectralConv, fourier_layer_spec as fourier_layer_spec
from ._galerkin import GalerkinTransformer as GalerkinTransformer
from ._gnn import GNN as GNN, Graph as Graph, graph_operator as graph_operator
from ._losses import h1_relative as h1_relative, mean_relative_l2 as mean_relative_l2, relative_l2 as relative_l2
from ._mgno import MgNO as MgNO, MgVCycle as MgVCycle
from ._t1 import T1 as T1
from ._tfno import TFNO as TFNO, tfno_parameter_counts as tfno_parameter_counts
from ._operator import (
    Operator as Operator,
    chain as chain,
    check_real_params as check_real_params,
    linear as linear,
    linear_spec as linear_spec,
    make_init as make_init,
    mlp as mlp,
    mlp_spec as mlp_spec,
)
