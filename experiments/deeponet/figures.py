"""Figures of a `deeponet_antiderivative` run: `python experiments/deeponet/figures.py RUN_DIR [--out DIR | --update-committed]`.

Writes `antiderivative.png` (the learning curve: training-batch and test MSE; for three
test functions the input `v` and the prediction of `G(v) = int_0^y v` against the truth)
into RUN_DIR, or `--out DIR`; only `--update-committed` overwrites the committed
`experiments/deeponet/antiderivative.png`.
"""

import pathlib

import matplotlib

matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np

import fpx.experiment as fx
from fpx.experiment.tasks.operator_regression import restore


def draw(workdir):
    task, state = restore(workdir)
    params = jax.tree_util.tree_map(lambda a: a[0], state["params"])  # member 0
    records = sorted((r for r in fx.read_metrics(workdir) if r["member"] == 0), key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    ax = axes[0]
    ax.semilogy(steps, [r["train/loss"] for r in records], label="train (batches, running)")
    ax.semilogy(steps, [r["eval/test_mse"] for r in records], label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("learning curve")
    pred = np.asarray(task.predict(params, task.sensors_test[:3]))
    cfg = task.config.data
    x = np.linspace(0, 1, cfg.sensors)
    y = np.asarray(task.y_points[:, 0])
    for i, ax in enumerate(axes[1:]):
        ax.plot(x, np.asarray(task.sensors_test[i]), color="0.7", lw=1, label="v (input)")
        ax.plot(y, np.asarray(task.u_test[i]), "k", lw=2, label="G(v) truth")
        ax.plot(y, pred[i], "C3--", lw=1.5, label="DeepONet")
        ax.set_xlabel("y")
        ax.set_title(f"test function {i}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    return fx.figure_main(argv, doc=__doc__, draw=draw, filename="antiderivative.png", run_of="configs/deeponet/...",
                          committed_dir=pathlib.Path(__file__).resolve().parent)


if __name__ == "__main__":
    raise SystemExit(main())
