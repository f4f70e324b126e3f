"""Global L2 strength (log λ) of digits logistic regression by a vmapped grid sweep of plain inner solves: the baseline of configs/hypergradients/global_l2.py at equal inner-training compute (as many grid values as descent steps, one inner solve each).

Run with 64-bit JAX: `JAX_ENABLE_X64=1 fpx run configs/hypergradients/global_l2_grid.py`.
"""

import importlib.util
import pathlib

import ml_collections
import numpy as np

PRESETS = ("quick", "default", "full")

_spec = importlib.util.spec_from_file_location("global_l2_config", pathlib.Path(__file__).with_name("global_l2.py"))
_descent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_descent)


def get_config(arg=None):
    preset = arg or "default"
    c = _descent.base_config(preset)
    c.name = "hypergradients-global-l2-grid"
    c.outer.mode = "grid"
    values = c.train.steps  # one inner solve per value, as one per descent step
    c.train = ml_collections.ConfigDict({"steps": 1, "eval_every": 1, "checkpoint_every": 1, "max_to_keep": 1})
    c.sweep = ml_collections.ConfigDict({"log_lambda": [float(v) for v in np.linspace(-10.0, 2.0, values)]})
    return c
