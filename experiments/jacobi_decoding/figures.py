"""Figure of a `jacobi_decoding` run: `python experiments/jacobi_decoding/figures.py RUN_DIR [--out DIR | --update-committed]`.

Writes `jacobi.png` (mean Jacobi iterations per 16-token block and validation loss over training,
the start of consistency fine-tuning marked) into RUN_DIR, or `--out DIR`; only
`--update-committed` overwrites the committed `experiments/jacobi_decoding/jacobi.png`. The
README's tables come from `experiments/jacobi_decoding/table.py`.
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fpx.experiment as fx  # noqa: E402


def draw(workdir):
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    ar_steps, block = config["train"]["ar_steps"], config["decode"]["block_size"]
    records = sorted((r for r in fx.read_metrics(workdir) if r["member"] == 0), key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(steps, [r["eval/iterations_per_block"] for r in records], "o-", label="all blocks")
    axes[0].plot(steps, [r["eval/first_block_iterations"] for r in records], "s--", ms=4, label="first block")
    axes[0].plot(steps, [r["eval/later_block_iterations"] for r in records], "^:", ms=4, label="later blocks")
    axes[0].axhline(block, color="0.6", lw=0.8)
    axes[0].set_ylabel(f"Jacobi iterations per {block}-token block")
    axes[0].set_ylim(0, block + 0.5)
    axes[1].plot(steps, [r["eval/val_loss"] for r in records], "o-", color="C3")
    axes[1].set_ylabel("validation loss (nats / char)")
    for ax in axes:
        ax.axvline(ar_steps, color="k", ls="--", lw=0.8)
        ax.set_xlabel("training step (dashed: consistency fine-tuning starts)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    return fx.figure_main(argv, doc=__doc__, draw=draw, filename="jacobi.png", run_of="configs/parallel/jacobi_decoding.py",
                          committed_dir=pathlib.Path(__file__).resolve().parent)


if __name__ == "__main__":
    raise SystemExit(main())
