"""DeepONet on the antiderivative operator G(v)(y) = int_0^y v (Lu et al., 2021).

Presets:
- `quick`: CI-sized (200 functions x 4 points, small nets, 40 steps); seconds.
- `default`: the paper's data and network, 25000 full-batch Adam steps (half the paper's)
  with a cosine decay of the learning rate from 1e-3 to zero (~4-5 min on a 2-core CPU).
- `full`: the paper's setup (deeponet_pde.py): 10000 training triplets (10000 GRF functions,
  length scale 0.2, one query point each), 100 sensors, unstacked DeepONet with branch
  [100, 40, 40] and trunk [1, 40, 40] (ReLU, Glorot normal), Adam lr 1e-3, full batch,
  50000 iterations; test MSE over 1000 functions x 100 grid points (the paper: 100000
  random test triplets). Published test MSE ~7e-7.

`model.branch` / `model.trunk` are the hidden widths before the latent layer of width
`model.latent` (so branch [40] + latent 40 is the paper's [100, 40, 40]). `seed` (model
init and batch order) and `optim.lr` are vmapped in a sweep.
"""

import ml_collections

PRESETS = ("quick", "default", "full")


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "deeponet-antiderivative"
    c.experiment = "deeponet_antiderivative"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict(
        {
            "n_train": 10000,
            "n_test": 1000,
            "sensors": 100,
            "num_points": 100,
            "points_per_function": 1,
            "length_scale": 0.2,
            "seed": 0,
            "batch_size": 10000,
        }
    )
    c.model = ml_collections.ConfigDict({"branch": [40], "trunk": [40], "latent": 40, "activation": "relu"})
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3, "weight_decay": 0.0})
    c.schedule = ml_collections.ConfigDict({"name": "cosine", "every_epochs": 1000, "factor": 0.5})
    c.train = ml_collections.ConfigDict({"steps": 25000, "eval_every": 1000, "checkpoint_every": 5000, "max_to_keep": 1})
    c.sweep = ml_collections.ConfigDict({"seed": [0]})
    if preset == "quick":
        c.data.update({"n_train": 200, "n_test": 50, "sensors": 20, "num_points": 20, "points_per_function": 4, "batch_size": 200})
        c.model.update({"branch": [16], "trunk": [16], "latent": 16})
        c.train.update({"steps": 40, "eval_every": 20, "checkpoint_every": 40})
    elif preset == "full":
        c.schedule.name = "constant"
        c.train.update({"steps": 50000, "eval_every": 1000, "checkpoint_every": 10000})
    return c
