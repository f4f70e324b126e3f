"""The README table of a `parallel_sampling` run: `python experiments/parallel_sampling/table.py RUN_DIR`.

Reads the run's `summary.json` (member 0) and prints, per sampler setting, the parallel
rounds against the `T` sequential steps, the denoiser evaluations and the largest deviation
of the Picard samples from the sequential DDIM/DDPM samples.
"""

import json
import pathlib
import re
import sys


def table(run_dir) -> str:
    row = json.loads((pathlib.Path(run_dir) / "summary.json").read_text())["members"][0]
    keys = sorted({m.groups() for k in row if (m := re.match(r"eval/T(\d+)_tol([^_]+)_eta([^_]+)_rounds$", k))},
                  key=lambda g: (float(g[2]), float(g[1]), int(g[0])))
    lines = ["| sampler | T | tol | parallel rounds (mean / max) | sequential / parallel | evaluations / T | max deviation | converged |",
             "|---|---|---|---|---|---|---|---|"]
    for T, tol, eta in keys:
        p = f"eval/T{T}_tol{tol}_eta{eta}_"
        sampler = "DDIM (ODE, η=0)" if float(eta) == 0 else f"DDPM (SDE, η={eta})"
        lines.append(f"| {sampler} | {T} | {tol} | {row[p + 'rounds']:.1f} / {row[p + 'max_rounds']:.0f} | "
                     f"{row[p + 'speedup']:.2f}× | {row[p + 'evals_ratio']:.2f} | {row[p + 'max_dev']:.2e} | "
                     f"{row[p + 'converged']:.0%} |")
    lines.append("")
    lines.append(f"Denoiser test loss {row['eval/test_loss']:.4f}; mean nearest-training-image distance of the "
                 f"samples {row['eval/nn_dist_samples']:.2f} (of test images: {row['eval/nn_dist_test']:.2f}).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
