"""Quickstart: a DEQ classifier on sklearn digits with implicit gradients and a vmapped learning-rate sweep."""

import ml_collections

PRESETS = ("quick", "default")


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "quickstart"
    c.experiment = "deq_classifier"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict({"test_fraction": 0.2, "split_seed": 0, "batch_size": 64})
    c.model = ml_collections.ConfigDict({"kind": "deq", "width": 64, "gamma": 0.9})
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-4, "atol": 1e-6})
    c.adjoint = ml_collections.ConfigDict({"name": "implicit"})
    c.max_steps = 60
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
    c.train = ml_collections.ConfigDict({"steps": 400, "eval_every": 50, "checkpoint_every": 100, "max_to_keep": 2})
    c.sweep = ml_collections.ConfigDict({"lr": [1e-3, 3e-3, 1e-2]})
    if preset == "quick":
        c.model.width = 32
        c.train.steps = 40
        c.train.eval_every = 20
        c.train.checkpoint_every = 20
        c.sweep = ml_collections.ConfigDict({"lr": [1e-3, 3e-3]})
    return c
