"""Subhomogeneous DEQs (Sittoni & Tudisco, ICML 2024): SubDEQ vs a contractive DEQ vs explicit networks.

Two datasets: sklearn digits (one fixed point per image) and a contextual stochastic block
model graph (node classification, one fixed point over the graph; the paper's GNN setting).
Digits: the max-normalised SubDEQ (`tanh(W z) + relu(U x) + 1.603`, `W` unconstrained), the
plain shifted tanh (1.2), the normalised one with `W` constrained so that its uniqueness
certificate holds for every input, a contractive DEQ (`|W|_2 <= 0.9`) and an MLP. Graph: an
encoder, the reference's propagation `N(tanh(0.9 Â Z + 0.1 H) + 1.2)` (normalised and plain),
the contractive `tanh(0.9 Â Z + 0.1 H)`, a two-layer GCN and an MLP. Equal parameter counts per
dataset. Forward solves: Anderson (memory 5, the paper's solver) to `rtol = 1e-4`; Picard to the
same tolerance at evaluation. See experiments/subdeq/README.md.
"""

import ml_collections

PRESETS = ("quick", "default", "full")

ORDER = [
    "subdeq-digits", "subdeq-plain-digits", "subdeq-certified-digits", "contractive-digits", "mlp-digits",
    "subdeq-csbm", "subdeq-plain-csbm", "contractive-csbm", "gnn-csbm", "mlp-csbm",
]
QUICK = ["subdeq-digits", "mlp-digits", "subdeq-csbm", "gnn-csbm"]


def _variants(names, width_digits, width_graph):
    # The reference implementation's settings: "normalized tanh" (max-normalised, shift 1.603 on
    # images, 1.2 in its GNN code) and the plain shifted tanh (shift 1.2, no normalisation).
    plain = {"normalize": "none", "shift": 1.2}
    digits = lambda kind, **model: {"model": {"kind": kind, "width": width_digits, **model}}  # noqa: E731
    graph = lambda kind, **model: {  # noqa: E731
        "data": {"name": "csbm"}, "model": {"kind": kind, "width": width_graph, **model},
        "optim": {"lr": 1e-2, "weight_decay": 1e-3},
    }
    table = {
        "subdeq-digits": digits("subdeq"),
        "subdeq-plain-digits": digits("subdeq", **plain),
        "subdeq-certified-digits": digits("subdeq", certify=0.9),
        "contractive-digits": digits("contractive"),
        "mlp-digits": digits("mlp"),
        "subdeq-csbm": graph("subdeq", shift=1.2),
        "subdeq-plain-csbm": graph("subdeq", **plain),
        "contractive-csbm": graph("contractive"),
        "gnn-csbm": graph("gnn"),
        "mlp-csbm": graph("mlp"),
    }
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "subdeq"
    c.experiment = "subdeq"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict({
        "name": "digits",
        "digits": {"test_fraction": 0.2, "split_seed": 0, "batch_size": 64},
        "csbm": {"nodes": 1000, "classes": 4, "features": 16, "avg_degree": 5.0, "homophily": 0.8, "signal": 1.0,
                 "seed": 0, "split_seed": 0, "train_fraction": 0.1},
    })
    c.model = ml_collections.ConfigDict(
        {"kind": "subdeq", "width": 64, "shift": 1.603, "normalize": "max", "weight_scale": 1.0, "gamma": 0.9,
         "alpha": 0.1, "certify": 0.0}
    )
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-4, "atol": 1e-6})
    c.adjoint = ml_collections.ConfigDict({"name": "implicit"})
    c.max_steps = 100
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
    c.train = ml_collections.ConfigDict({"steps": 1000, "eval_every": 100, "checkpoint_every": 500, "max_to_keep": 2})
    c.variants = _variants(ORDER, 64, 32)
    c.variant_order = list(ORDER)
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    if preset == "quick":
        c.data.csbm.nodes = 200
        c.solver = ml_collections.ConfigDict({"name": "picard", "rtol": 1e-4, "atol": 1e-6})  # one solve to compile
        c.train.steps = 20
        c.train.eval_every = 10
        c.train.checkpoint_every = 20
        c.variants = _variants(QUICK, 16, 32)
        c.variant_order = list(QUICK)
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    elif preset == "full":
        c.data.csbm.nodes = 20000
        c.train.steps = 5000
        c.train.eval_every = 500
        c.train.checkpoint_every = 1000
        c.variants = _variants(ORDER, 256, 64)
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2, 3, 4]})
    return c
