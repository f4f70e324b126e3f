"""Test-accuracy curves of the projective-training benchmark (`benchmarks/bench_projective.py`).

    .venv/bin/python experiments/projective/figures.py [RESULTS_DIR] [--out DIR | --update-committed]

Reads `RESULTS_DIR/bench_projective.json` (default `runs/bench_projective`, where the benchmark
writes; `benchmarks/results` holds the committed one) and, if present, the quiet-machine
timing pass `bench_projective_timing.json`. Writes `curves.png` into RESULTS_DIR (into
`runs/bench_projective` when reading the committed results), or `--out DIR`; only
`--update-committed` overwrites the committed `experiments/projective/curves.png`.
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


COMMITTED = ROOT / "benchmarks" / "results"
DEFAULT = ROOT / "runs" / "bench_projective"


def main(results=DEFAULT, out=None):
    results = pathlib.Path(results)
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
    out = pathlib.Path(out or (DEFAULT if results.resolve() == COMMITTED else results))
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "curves.png")
    print(out / "curves.png")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Test-accuracy curves of benchmarks/bench_projective.py's results.")
    parser.add_argument("results", nargs="?", type=pathlib.Path, default=DEFAULT, help="directory of bench_projective.json (default: runs/bench_projective)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=pathlib.Path, help="directory for curves.png")
    where.add_argument("--update-committed", action="store_true", help="overwrite the committed experiments/projective/curves.png")
    args = parser.parse_args()
    main(args.results, pathlib.Path(__file__).parent if args.update_committed else args.out)
