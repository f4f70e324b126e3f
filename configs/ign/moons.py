"""Idempotent generative network (Shocher et al., ICLR 2024) on two moons (task `ign`):
the paper's losses against two ablations, no tightness term and the frozen copy in the
wrong place (the outer application), which zeroes the tightness gradient."""

import ml_collections

PRESETS = ("quick", "default", "full")


def _variants(names):
    table = {
        "ign": {},
        "ign-mse": {"loss": {"distance": "mse"}},
        "no-tightness": {"loss": {"lambda_tight": 0.0}},
        "frozen-outer": {"loss": {"tight_grad": "frozen_outer"}},
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "ign-moons"
    c.experiment = "ign"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict(
        {"name": "moons", "noise": 0.05, "num_train": 4096, "num_test": 2000, "split_seed": 0, "batch_size": 256}
    )
    c.model = ml_collections.ConfigDict({"width": 128, "depth": 3, "activation": "silu"})
    # The paper's weights and clamp ratio (Appendix, Table of hyperparameters): 20, 20, 2.5, a = 1.5.
    c.loss = ml_collections.ConfigDict(
        {"distance": "l1", "lambda_rec": 20.0, "lambda_idem": 20.0, "lambda_tight": 2.5, "tight_clamp": 1.5,
         "tight_grad": "outer"}
    )
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3, "b1": 0.5, "b2": 0.999})
    c.solver = ml_collections.ConfigDict({"name": "picard", "rtol": 1e-3, "atol": 1e-4})
    c.max_steps = 50
    c.eval = ml_collections.ConfigDict({"num_samples": 2000, "iterations": 5, "grad_batch": 256})
    c.train = ml_collections.ConfigDict(
        {"steps": 4000, "eval_every": 500, "checkpoint_every": 1000, "max_to_keep": 1, "cosine_decay": True}
    )
    c.variant_order = ["ign", "ign-mse", "no-tightness", "frozen-outer"]
    c.variants = _variants(c.variant_order)
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    if preset == "quick":
        c.data.num_train = 1024
        c.data.num_test = 500
        c.model.width = 64
        c.eval = ml_collections.ConfigDict({"num_samples": 500, "iterations": 3, "grad_batch": 128})
        c.train = ml_collections.ConfigDict({"steps": 200, "eval_every": 50, "checkpoint_every": 200, "max_to_keep": 1,
                                            "cosine_decay": True})
        c.variant_order = ["ign"]  # the wrong placement is checked by tests/test_ign.py directly
        c.variants = _variants(c.variant_order)
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    elif preset == "full":
        # GPU-sized: a wider, deeper network, ten times the training, 5 seeds.
        c.data.num_train = 65536
        c.data.num_test = 10000
        c.model = ml_collections.ConfigDict({"width": 1024, "depth": 4, "activation": "silu"})
        c.eval = ml_collections.ConfigDict({"num_samples": 10000, "iterations": 10, "grad_batch": 1024})
        c.train = ml_collections.ConfigDict({"steps": 40000, "eval_every": 1000, "checkpoint_every": 10000, "max_to_keep": 2,
                                            "cosine_decay": True})
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2, 3, 4]})
    return c
