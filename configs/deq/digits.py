"""DEQ on sklearn digits: implicit vs JFB vs unrolled gradients, Picard vs Anderson, vs an explicit MLP of equal size."""

import ml_collections

PRESETS = ("quick", "default")


def _variants(names):
    table = {
        "implicit-anderson": {"adjoint": {"name": "implicit"}, "solver": {"name": "anderson"}},
        "implicit-picard": {"adjoint": {"name": "implicit"}, "solver": {"name": "picard"}},
        "jfb-anderson": {"adjoint": {"name": "jfb"}, "solver": {"name": "anderson"}},
        "unrolled-picard": {"adjoint": {"name": "unrolled"}, "solver": {"name": "picard"}},
        "mlp": {"model": {"kind": "mlp"}},
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "deq-digits"
    c.experiment = "deq_classifier"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict({"test_fraction": 0.2, "split_seed": 0, "batch_size": 64})
    c.model = ml_collections.ConfigDict({"kind": "deq", "width": 64, "gamma": 0.9})
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-4, "atol": 1e-6})
    c.adjoint = ml_collections.ConfigDict({"name": "implicit"})
    c.max_steps = 60
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
    c.train = ml_collections.ConfigDict({"steps": 1000, "eval_every": 100, "checkpoint_every": 500, "max_to_keep": 2})
    c.variants = _variants(["implicit-anderson", "implicit-picard", "jfb-anderson", "unrolled-picard", "mlp"])
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    if preset == "quick":
        c.model.width = 16
        c.train.steps = 20
        c.train.eval_every = 10
        c.train.checkpoint_every = 20
        c.variants = _variants(["implicit-anderson", "jfb-anderson", "mlp"])
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    return c
