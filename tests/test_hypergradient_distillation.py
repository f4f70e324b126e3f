"""Dataset distillation (`experiments/hypergradients/distillation.py`), a tiny version: 30 outer steps on one seed.

The first outer step's inner solve is the classifier trained on the 10 random real digits
the distillation starts from (at the starting λ): the baseline. After 30 hypergradient
steps on the 10 images and log λ, the classifier trained on them alone must beat it on the
test split by a wide margin (the full run: 95.9 % against 64.8 %). One compiled step serves
both, so the test costs about one compilation.
"""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script():
    path = ROOT / "experiments/hypergradients/distillation.py"
    spec = importlib.util.spec_from_file_location("distillation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distilled_digits_beat_random_real_digits():
    m = _script()
    d = m.load(0)
    x, y, x_test, y_test = map(jnp.asarray, (d["x"], d["y"], d["x_test"], d["y_test"]))
    opt, step = m.make_step(0.1, 30)
    hyper = (jnp.asarray(d["real10"]), jnp.asarray(m.LOG_LAMBDA0, jnp.float64))
    opt_state, params = opt.init(hyper), m.zeros()
    losses, accs = [], []
    for _ in range(30):
        hyper, opt_state, params, loss, steps = step(hyper, opt_state, params, x, y)
        losses.append(float(loss))
        accs.append(float(m.accuracy(params, x_test, y_test)))
        assert int(steps) <= 100
    real, distilled = accs[0], accs[-1]
    assert distilled > real + 0.15, (real, distilled)
    assert losses[-1] < 0.5 * losses[0]
    assert np.all(np.isfinite(np.asarray(hyper[0]))) and float(hyper[1]) >= m.LOG_LAMBDA_MIN
