"""Learned proximal networks, the 1-D Laplacian experiment (Fang, Buchanan & Sulam, ICLR 2024, §5.1;
task `lpn_laplacian`): an LPN trained with the L2 loss learns the MMSE shrinkage, one trained
with proximal matching (γ annealed 0.5 -> 0.1 after L1 pretraining) the soft threshold, the
prox of |x|; the prior R is evaluated by inverting the LPN with `fpx.fixed_point`."""

import ml_collections

PRESETS = ("quick", "default", "full")


def _variants(names):
    table = {
        "prox_matching": {"loss": {"kind": "prox_matching"}},
        # The L2 / L1 models converge with a quarter of the batch (their losses average over all samples).
        "l2": {"loss": {"kind": "l2"}, "data": {"batch_size": 500}},
        "l1": {"loss": {"kind": "l1"}, "data": {"batch_size": 500}},
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "lpn-laplacian"
    c.experiment = "lpn_laplacian"
    c.seed = 0
    c.dtype = "float32"
    # x ~ Laplace(0, scale), y = x + noise * N(0, 1): the MAP denoiser is soft(y, noise^2 / scale) = soft(y, 1).
    c.data = ml_collections.ConfigDict({"scale": 1.0, "noise": 1.0, "batch_size": 2000})
    # The reference: hidden 50, 4 layers, softplus beta 10 (a smaller network fits the same 1-D function).
    c.model = ml_collections.ConfigDict({"hidden": 32, "layers": 3, "beta": 10.0, "alpha": 0.0, "init": "uniform"})
    c.loss = ml_collections.ConfigDict({
        "kind": "prox_matching", "pretrain": "l1", "pretrain_fraction": 0.2,
        "gamma_start": 0.5, "gamma_end": 0.1, "gamma_stages": 5, "lr_start": 1.0, "lr_end": 0.003,
    })
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    c.train = ml_collections.ConfigDict({"steps": 30000, "eval_every": 3000, "checkpoint_every": 15000, "max_to_keep": 1,
                                         "lr_decay": 0.1})
    # The solver that inverts f (R(x) = <x, y> - |x|^2/2 - psi(y) with f(y) = x).
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-5, "atol": 1e-6})
    c.prior = ml_collections.ConfigDict({"range": 2.0, "points": 41, "max_steps": 200, "step": 1.0})
    c.eval = ml_collections.ConfigDict({"range": 4.0, "points": 401, "curve_points": 81})
    c.variants = _variants(["prox_matching", "l2"])
    c.variant_order = ["prox_matching", "l2"]
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1]})
    if preset == "quick":
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
        c.data.batch_size = 256
        c.model.hidden, c.model.layers = 16, 2
        c.train = ml_collections.ConfigDict({"steps": 600, "eval_every": 300, "checkpoint_every": 600, "max_to_keep": 1,
                                             "lr_decay": 0.1})
        c.optim.lr = 1e-2
        c.loss.update({"gamma_stages": 3, "pretrain_fraction": 0.4, "lr_start": 1.0, "lr_end": 0.01})
        c.variants = _variants(["prox_matching"])
        c.variant_order = ["prox_matching"]
        c.prior.points = 21
        c.eval = ml_collections.ConfigDict({"range": 4.0, "points": 201, "curve_points": 41})
    elif preset == "full":
        # GPU-sized: the reference's network and batch (hidden 50, 4 layers, batch 2000), 3 seeds, the L1 loss too.
        c.data.batch_size = 2000
        c.model.hidden, c.model.layers = 50, 4
        c.train = ml_collections.ConfigDict({"steps": 44000, "eval_every": 4000, "checkpoint_every": 20000, "max_to_keep": 1,
                                             "lr_decay": 0.1})
        c.variants = _variants(["prox_matching", "l2", "l1"])
        c.variant_order = ["prox_matching", "l2", "l1"]
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    return c
