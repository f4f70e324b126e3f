"""Global L2 strength (log λ) of digits logistic regression by hypergradient descent through fpx.argmin (CG, Anderson, Neumann, exact hypergradients); configs/hypergradients/global_l2_grid.py searches the same hyperparameter by a vmapped grid of inner solves.

Run with 64-bit JAX (the task's float64 default): `JAX_ENABLE_X64=1 fpx run configs/hypergradients/global_l2.py`.
"""

import ml_collections

PRESETS = ("quick", "default", "full")

ESTIMATORS = ("cg", "fixed_point", "neumann", "exact")


def base_config(preset):
    """What the descent and the grid share: data, model, inner solver, and the outer budget `train.steps`."""
    c = ml_collections.ConfigDict()
    c.name = "hypergradients-global-l2"
    c.experiment = "hypergradient_descent"
    c.seed = 0
    c.dtype = "float64"
    c.data = ml_collections.ConfigDict({"n_train": 300, "n_val": 300, "test_fraction": 0.2, "split_seed": 0})
    c.model = ml_collections.ConfigDict({"hidden": 0})  # 0: logistic regression (640 weights)
    c.hyper = ml_collections.ConfigDict({"log_lambda": 0.0})  # descent: the start; grid: the value
    c.outer = ml_collections.ConfigDict({"mode": "descent"})
    # Anderson's default memory of 5 stalls on some cold solves at log λ < -7 (condition number ~1e4).
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 10, "rtol": 1e-9, "atol": 1e-9})
    c.inner = ml_collections.ConfigDict({"max_steps": 10000})
    c.hypergradient = ml_collections.ConfigDict(
        {"estimator": "cg", "rtol": 1e-8, "atol": 1e-8, "max_steps": 1000, "terms": 50}
    )
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 0.3})
    # One training step is one outer step (one inner solve and one hypergradient).
    c.train = ml_collections.ConfigDict({"steps": 64, "eval_every": 1, "checkpoint_every": 64, "max_to_keep": 1})
    c.sweep = ml_collections.ConfigDict({"seed": [0]})
    if preset == "quick":
        c.data.n_train = 100
        c.data.n_val = 100
        c.train.steps = 4
        c.train.eval_every = 2
        c.train.checkpoint_every = 4
    elif preset == "full":
        c.data.n_train = 1000
        c.data.n_val = 400
    return c


def get_config(arg=None):
    preset = arg or "default"
    c = base_config(preset)
    names = ("cg",) if preset == "quick" else ESTIMATORS
    c.variants = ml_collections.ConfigDict({n: {"hypergradient": {"estimator": n}} for n in names})
    c.variant_order = list(names)
    return c
