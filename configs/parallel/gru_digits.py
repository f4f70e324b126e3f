"""A GRU on sklearn digits read as a sequence: forward by DEER / quasi-DEER (`fpx.parallel.scan`,
implicit backward) against the same GRU run by `lax.scan` with ordinary backpropagation."""

import ml_collections

PRESETS = ("quick", "default", "full")


def _variants(names):
    table = {
        "deer": {"scan": {"method": "deer"}},
        "quasi_deer": {"scan": {"method": "quasi_deer"}},
        "elk": {"scan": {"method": "elk"}},
        "sequential": {"scan": {"method": "sequential"}},
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "gru-digits"
    c.experiment = "gru_sequence_classifier"
    c.seed = 0
    c.dtype = "float32"
    # rows: 8 steps of 8 pixels; pixels: 64 steps of 1 pixel.
    c.data = ml_collections.ConfigDict(
        {"sequence": "pixels", "test_fraction": 0.2, "split_seed": 0, "batch_size": 32, "deviation_batch": 64}
    )
    c.model = ml_collections.ConfigDict({"hidden": 16})
    # max_steps 0, rtol 0, atol 0: fpx.parallel.scan's defaults (T; 1e-6 in float32).
    c.scan = ml_collections.ConfigDict(
        {"method": "deer", "gradient": "default", "max_steps": 0, "block_size": 8, "rtol": 0.0, "atol": 0.0}
    )
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-2, "weight_decay": 0.0})
    c.train = ml_collections.ConfigDict({"steps": 2000, "eval_every": 200, "checkpoint_every": 1000, "max_to_keep": 1})
    c.variant_order = ["deer", "quasi_deer", "sequential"]
    c.variants = _variants(c.variant_order)
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1]})
    if preset == "quick":
        c.data.sequence = "rows"
        c.data.batch_size = 16
        c.data.deviation_batch = 16
        c.model.hidden = 8
        c.train.steps = 20
        c.train.eval_every = 10
        c.train.checkpoint_every = 20
        c.variant_order = ["deer", "sequential"]
        c.variants = _variants(c.variant_order)
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    elif preset == "full":
        # GPU-sized: wider GRU, longer training, ELK too, three seeds.
        c.data.batch_size = 128
        c.data.deviation_batch = 360
        c.model.hidden = 64
        c.train.steps = 5000
        c.train.eval_every = 250
        c.train.checkpoint_every = 1000
        c.train.max_to_keep = 2
        c.variant_order = ["deer", "quasi_deer", "elk", "sequential"]
        c.variants = _variants(c.variant_order)
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return c
