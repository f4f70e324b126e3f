"""Table and figure of a `parallel_sampling` run: `python experiments/parallel_sampling/figures.py RUN_DIR [--out DIR | --update-committed]`.

Prints the markdown table of the last evaluation (RUN_DIR/metrics.jsonl, config.json): for
every sampler length T, Picard tolerance and eta, the parallel rounds against the T
sequential steps, the denoiser evaluations and the max deviation from the sequential
sample; writes `sampling.png` (rounds and max deviation against T) into RUN_DIR, or
`--out DIR`; only `--update-committed` overwrites the committed
`experiments/parallel_sampling/sampling.png`.
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fpx.experiment as fx  # noqa: E402
from fpx.experiment.tasks.parallel_sampling import tag  # noqa: E402


def draw(workdir):
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    s = config["sampling"]
    last = max((r for r in fx.read_metrics(workdir) if r["member"] == 0), key=lambda r: r["step"])
    print(f"Step {last['step']}: test eps-loss {last['eval/test_loss']:.4f}; mean distance to the nearest training image: "
          f"DDIM samples (T = {max(s['steps'])}) {last['eval/nn_dist_samples']:.3f}, test images {last['eval/nn_dist_test']:.3f}.\n")
    print(f"| eta | tol | T (sequential steps) | parallel rounds (mean / max over {s['num_samples']} samples) | "
          f"fewer sequential evaluations | denoiser evaluations (mean) | evaluations / T | converged | max abs deviation from DDIM |")
    print("|---|---|---|---|---|---|---|---|---|")
    curves = {}
    for eta in s["etas"]:
        for tol in s["tols"]:
            for T in s["steps"]:
                k = f"eval/T{T}_tol{tag(tol)}_eta{tag(eta)}_"
                print(f"| {tag(eta)} | {tag(tol)} | {T} | {last[k + 'rounds']:.2f} / {last[k + 'max_rounds']:.0f} | "
                      f"{last[k + 'speedup']:.2f}x | {last[k + 'evals']:.1f} | {last[k + 'evals_ratio']:.2f} | "
                      f"{last[k + 'converged']:.2f} | {last[k + 'max_dev']:.2e} |")
                curves.setdefault((eta, tol), []).append((T, last[k + "rounds"], last[k + "max_dev"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    T = s["steps"]
    axes[0].plot(T, T, "k--", lw=0.8, label="sequential (T)")
    for (eta, tol), c in curves.items():
        axes[0].plot([x[0] for x in c], [x[1] for x in c], "o-", label=f"Picard, eta={tag(eta)}, tol={tag(tol)}")
        axes[1].semilogy([x[0] for x in c], [x[2] for x in c], "o-", label=f"eta={tag(eta)}, tol={tag(tol)}")
    axes[0].set_ylabel("sequential denoiser calls")
    axes[1].set_ylabel("max |Picard - DDIM| (pixels in [-1, 1])")
    for ax in axes:
        ax.set_xlabel("sampler steps T")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    return fx.figure_main(argv, doc=__doc__, draw=draw, filename="sampling.png", run_of="configs/parallel/parallel_sampling.py",
                          committed_dir=pathlib.Path(__file__).resolve().parent)


if __name__ == "__main__":
    raise SystemExit(main())
