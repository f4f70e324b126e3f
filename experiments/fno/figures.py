"""Figures of an `fno_burgers` run: `python experiments/fno/figures.py RUN_DIR [--out DIR | --update-committed]`.

Writes `burgers.png` (the learning curve: train / test / zero-shot relative L2 per epoch;
the prediction against the truth for two test functions at the training resolution and
zero-shot at the evaluation resolution) into RUN_DIR, or `--out DIR`; only
`--update-committed` overwrites the committed `experiments/fno/burgers.png`.
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
    epochs = [r["eval/epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    ax = axes[0]
    ax.semilogy(epochs, [r["train/loss"] for r in records], label="train (batches, running)")
    ax.semilogy(epochs, [r["eval/train_rel_l2"] for r in records], label="train set")
    ax.semilogy(epochs, [r["eval/test_rel_l2"] for r in records], label=f"test, s={task.x_test.shape[1]}")
    ax.semilogy(epochs, [r["eval/zero_shot_rel_l2"] for r in records], "--", label=f"test zero-shot, s={task.x_eval.shape[1]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean relative L2")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("learning curve")
    pred_s = np.asarray(task.predict(params, task.x_test[:2]))[..., 0]
    pred_e = np.asarray(task.predict(params, task.x_eval[:2]))[..., 0]
    for i, ax in enumerate(axes[1:]):
        s, e = task.x_test.shape[1], task.x_eval.shape[1]
        ax.plot(np.arange(e) / e, np.asarray(task.x_eval[i, :, 0]), color="0.7", lw=1, label="u0 (input)")
        ax.plot(np.arange(e) / e, np.asarray(task.y_eval[i, :, 0]), "k", lw=2, label="u(T=1) truth")
        ax.plot(np.arange(s) / s, pred_s[i], "C0o", ms=2, label=f"FNO at s={s}")
        ax.plot(np.arange(e) / e, pred_e[i], "C3", lw=1, label=f"FNO zero-shot at s={e}")
        ax.set_xlabel("x")
        ax.set_title(f"test function {i}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    return fx.figure_main(argv, doc=__doc__, draw=draw, filename="burgers.png", run_of="configs/fno/...",
                          committed_dir=pathlib.Path(__file__).resolve().parent)


if __name__ == "__main__":
    raise SystemExit(main())
