"""Graph value iteration with a convergent graph solver (Park et al., ICLR 2022): CGS values and
policies on random MDPs, trained on nS in [20, 50) and tested on held-out and larger graphs,
with the Picard step bound ⌈log(tol)/log γ⌉ checked on every forward and adjoint solve."""

import ml_collections

PRESETS = ("quick", "default", "full")


def _variants(names):
    table = {
        "dense": {"data": {"graph": "dense"}},    # fpx.data.value_iteration_mdps
        "sparse": {"data": {"graph": "sparse"}},  # the reference code's deterministic graphs
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "cgs-value-iteration"
    c.experiment = "cgs_value_iteration"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict({
        "graph": "dense",
        "n_train": 512,
        "n_test": 64,
        "batch_size": 16,
        "states_min": 20,
        "states_max": 50,
        "actions_min": 5,
        "actions_max": 10,
        "gamma": 0.9,
        "seed": 0,
        "test_states": [50, 100, 200],
    })
    c.model = ml_collections.ConfigDict({"heads": 16, "hidden": 32, "layers": 3, "decoder_hidden": 64, "gamma": 0.5})
    c.solver = ml_collections.ConfigDict({"name": "picard", "rtol": 0.0, "atol": 1e-6})
    c.adjoint = ml_collections.ConfigDict({"name": "implicit"})
    c.max_steps = 40
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
    c.schedule = ml_collections.ConfigDict({"name": "cosine"})
    c.train = ml_collections.ConfigDict({"steps": 1000, "eval_every": 250, "checkpoint_every": 500, "max_to_keep": 2})
    c.variants = _variants(["dense", "sparse"])
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1]})
    if preset == "quick":
        c.data.n_train = 32
        c.data.n_test = 8
        c.data.batch_size = 8
        c.data.test_states = [50]  # pads with the training-size set into one evaluation solve
        c.model.heads = 4
        c.model.hidden = 8
        c.model.layers = 1
        c.model.decoder_hidden = 16
        c.train.steps = 20
        c.train.eval_every = 10
        c.train.checkpoint_every = 20
        # One graph kind keeps the suite fast (one compiled group); the sparse graphs' data,
        # scores and step bound are unit-tested in tests/test_cgs.py.
        c.variants = _variants(["dense"])
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    elif preset == "full":  # GPU-sized: the reference's 64 heads, 5000 updates of 64 graphs
        c.data.n_train = 8192
        c.data.n_test = 256
        c.data.batch_size = 64
        c.model.heads = 64
        c.model.hidden = 64
        c.train.steps = 5000
        c.train.eval_every = 500
        c.train.checkpoint_every = 1000
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    return c
