"""Iterations improve accuracy? One weight-tied Fourier block applied k = 1, 2, 4, 8 times, or solved as a DEQ, on Darcy flow.

Every variant has the same parameters (lift, one `FNOBlock`, projection); only the number
of applications of the block changes (`deq`: solved to its fixed point, implicit
gradients). See `fpx/experiment/tasks/iterated_operator.py` and
`experiments/operators/README.md`.

Presets: `quick` (CI, seconds); `default` (2 seeds, 400 steps; its wall clock, compile time
and per-variant ms per step are in the generated table of experiments/operators/README.md);
`full` (larger, not run on CPU).
The variants run cheap-first (`variant_order`: k1, k2, k4, k8, deq), so the k results exist
long before the DEQ finishes.
"""

import ml_collections

PRESETS = ("quick", "default", "full")
VARIANTS = ("k1", "k2", "k4", "k8", "deq")


def _variants(names):
    table = {f"k{k}": {"model": {"kind": "iterate", "k": k}} for k in (1, 2, 4, 8, 16)}
    table["deq"] = {"model": {"kind": "deq"}}
    return ml_collections.ConfigDict({n: table[n] for n in names})


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "operators-iterations"
    c.experiment = "iterated_operator"
    c.seed = 0
    c.dtype = "float32"
    # Darcy at 85^2 (fpx.data.darcy), subsampled to 43^2; first n_train samples train, next n_test test.
    c.data = ml_collections.ConfigDict({"n_train": 500, "n_test": 100, "s": 85, "stride": 2, "seed": 0, "batch_size": 10})
    c.model = ml_collections.ConfigDict(
        {
            "kind": "iterate",  # "iterate" (k applications) or "deq" (fixed point)
            "k": 1,
            "relax": 0.0,  # z <- relax*z + (1-relax)*B(z, v); the DEQ's fixed point does not depend on it
            "width": 16,
            "modes": 8,
            "padding": 5,
            "projection_width": 64,
            "init_scale": 0.5,
        }
    )
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-3, "atol": 1e-6})
    c.adjoint = ml_collections.ConfigDict({"name": "implicit"})
    c.max_steps = 60  # forward and (ImplicitAdjoint default) backward solves; 30 let one DEQ seed stall, see README
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
    c.train = ml_collections.ConfigDict(
        {"steps": 400, "eval_every": 100, "checkpoint_every": 200, "max_to_keep": 2, "lr_schedule": "cosine"}
    )
    c.variants = _variants(VARIANTS)
    c.variant_order = list(VARIANTS)  # cheap first: a ConfigDict would sort them (deq first)
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1]})
    if preset == "quick":
        c.data.update({"n_train": 16, "n_test": 8, "s": 17, "stride": 1, "batch_size": 4})
        c.model.update({"width": 8, "modes": 4, "padding": 2, "projection_width": 16})
        c.max_steps = 10
        c.train.update({"steps": 4, "eval_every": 2, "checkpoint_every": 4})
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    elif preset == "full":
        # The FNO paper's Darcy setting at 85^2 (1000 train, 32 channels, 12 modes, padding 9),
        # trained 500 epochs (25000 steps of 20). Not run here: estimated at more than a day for the
        # variant set on a 2-core CPU; meant for a GPU.
        c.data.update({"n_train": 1000, "n_test": 200, "s": 85, "stride": 1, "batch_size": 20})
        c.model.update({"width": 32, "modes": 12, "padding": 9, "projection_width": 128})
        c.train.update({"steps": 25000, "eval_every": 500, "checkpoint_every": 2500})
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    return c
