"""Test-accuracy curves of the projective-training benchmark (reads benchmarks/results/bench_projective.json).

    .venv/bin/python experiments/projective/figures.py
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    results = ROOT / "benchmarks" / "results"
    data = json.loads((results / "bench_projective.json").read_text())
    # Times from the quiet-machine timing pass when there is one (the full run shares the CPU).
    timing_file = results / "bench_projective_timing.json"
    timing = json.loads(timing_file.read_text())["summary"] if timing_file.exists() else {}
    fig, (ax_updates, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    for name in dict.fromkeys(r["method"] for r in data["runs"]):
        runs = [r for r in data["runs"] if r["method"] == name]
        steps = np.array([s for s, _ in runs[0]["curve"]])
        accs = np.mean([[a for _, a in r["curve"]] for r in runs], axis=0)
        ms = timing.get(name, {}).get("ms_per_update") or np.median([r["ms_per_update"] for r in runs])
        ax_updates.plot(steps, 100 * accs, label=name)
        ax_time.plot(steps * ms / 1e3, 100 * accs, label=name)
    for ax, xlabel in ((ax_updates, "updates (batch 64)"), (ax_time, "wall-clock seconds (ms/update x updates)")):
        ax.axhline(95, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%), mean of split seeds")
        ax.set_ylim(80, 100)
    ax_time.set_xscale("log")
    ax_updates.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(__file__).with_name("curves.png")
    fig.savefig(out)
    print(out)


if __name__ == "__main__":
    main()
