"""PJAX's comparison models, and quantised ones, trained by projection and by optax on digits.

Every model of `fpx/experiment/tasks/projective_classifier.py` (`mlp`, `skip`, `cnn`, `rnn`,
`binary`, `ternary`) three ways: the default `fpx.projective.Trainer` (DR, 25 inner steps,
cross-entropy prox, anchor 1), optax Adam (lr 1e-3) and SGD with momentum 0.9 (lr 0.05) on
the cross-entropy of the identical plain-JAX function (straight-through estimators give the
quantised models their gradient). sklearn digits, stratified 80/20 split, batch 64,
split seeds 0, 1, 2. `benchmarks/bench_projective.py --models` times the same comparison
interleaved in one process (the tables of experiments/projective/README.md).

    fpx run configs/projective/models.py --workdir runs/projective-models
    fpx run configs/projective/models.py:quick        # CI-sized: every model by DR, binary by Adam, 2 updates
"""

import ml_collections

PRESETS = ("quick", "default")
MODELS = ("mlp", "skip", "cnn", "rnn", "binary", "ternary")
TRAINING = {
    "dr": {"training": "projective"},
    "adam": {"training": "gradient", "optim": {"name": "adam", "lr": 1e-3}},
    "sgd": {"training": "gradient", "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
}
# The RNN's projection problem is the largest (a bilinear h W node per time step): fewer
# hidden units keep one update near a second on 2 CPU cores.
HIDDEN = {"rnn": 16}


def _variants(names):
    out = {}
    for name in names:
        kind, training = name.rsplit("-", 1)
        variant = {"model": {"kind": kind}, **TRAINING[training]}
        if kind in HIDDEN:
            variant["model"]["hidden"] = HIDDEN[kind]
        out[name] = variant
    return ml_collections.ConfigDict(out)


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "projective-models"
    c.experiment = "projective_classifier"
    c.seed = 0
    c.dtype = "float32"
    c.training = "projective"
    c.data = ml_collections.ConfigDict({"test_fraction": 0.2, "split_seed": 0, "batch_size": 64})
    c.model = ml_collections.ConfigDict({"kind": "mlp", "hidden": 64, "channels": 8})
    c.projective = ml_collections.ConfigDict(
        {"method": "dr", "loss": "cross_entropy", "steps": 25, "prox_step": 1.0, "anchor": 1.0, "margin": 1.0, "warm_start": True}
    )
    c.solver = ml_collections.ConfigDict({"name": "picard", "rtol": 1e-6, "atol": 1e-8})
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    c.train = ml_collections.ConfigDict({"steps": 400, "eval_every": 50, "checkpoint_every": 400, "max_to_keep": 1})
    c.variants = _variants([f"{kind}-{training}" for kind in MODELS for training in TRAINING])
    c.sweep = ml_collections.ConfigDict({"data": {"split_seed": [0, 1, 2]}})
    if preset == "quick":
        c.model.hidden = 4
        c.model.channels = 2
        c.data.batch_size = 8
        c.projective.steps = 3
        c.train.steps = 2
        c.train.eval_every = 2
        c.train.checkpoint_every = 2
        c.variants = _variants([f"{kind}-dr" for kind in MODELS] + ["binary-adam"])
        for name in c.variants:
            c.variants[name].model.hidden = 4
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    return c
