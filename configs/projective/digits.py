"""PJAX's digits setting: projection-based training (AP, DR, DM, accelerated DR) vs Adam.

sklearn digits, stratified 80/20 split, standardised; MLP relu(x W1 + b1) W2, 64 -> 64 -> 10;
batch 64, 400 updates; cross-entropy prox. `dr-skip` adds a skip connection x W3 to the logits.
"""

import ml_collections

PRESETS = ("quick", "default")


def _variants(names):
    table = {
        "dr": {},
        "ap": {"projective": {"method": "ap"}},
        "dm": {"projective": {"method": "dm"}},
        "dr-anderson": {"solver": {"name": "anderson", "memory": 5}},
        "dr-halpern": {"solver": {"name": "halpern"}},
        "dr-skip": {"model": {"kind": "skip"}},
        "adam": {"training": "gradient"},
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "projective-digits"
    c.experiment = "projective_classifier"
    c.seed = 0
    c.dtype = "float32"
    c.training = "projective"
    c.data = ml_collections.ConfigDict({"test_fraction": 0.2, "split_seed": 0, "batch_size": 64})
    c.model = ml_collections.ConfigDict({"kind": "mlp", "hidden": 64})
    c.projective = ml_collections.ConfigDict(
        {"method": "dr", "loss": "cross_entropy", "steps": 50, "prox_step": 1.0, "anchor": 1.0, "margin": 1.0, "warm_start": True}
    )
    c.solver = ml_collections.ConfigDict({"name": "picard", "rtol": 1e-6, "atol": 1e-8})
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    c.train = ml_collections.ConfigDict({"steps": 400, "eval_every": 50, "checkpoint_every": 400, "max_to_keep": 1})
    c.variants = _variants(["dr", "ap", "dm", "dr-anderson", "dr-halpern", "dr-skip", "adam"])
    c.sweep = ml_collections.ConfigDict({"data": {"split_seed": [0, 1, 2]}})
    if preset == "quick":
        c.model.hidden = 8
        c.data.batch_size = 16
        c.projective.steps = 5
        c.train.steps = 4
        c.train.eval_every = 2
        c.train.checkpoint_every = 4
        c.variants = _variants(["dr-skip", "adam"])
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    return c
