"""Darcy data generation: today's sparse direct solve against fpx.data._elliptic's iterative solvers.

Problem: `fpx.data.darcy`'s, i.e. `-div(a grad u) = 1` on the unit square, `u = 0` on the
boundary, `a` the thresholded GRF (3 / 12) of the FNO benchmark, 5-point finite differences
on the `s x s` grid (`(s-2)^2` unknowns), float64, relative-residual tolerance `--rtol`
(1e-8). Candidates, side by side in one run on the same samples:

- `direct`: `fpx.data._darcy.solve_darcy` (scipy `spsolve`, MMD ordering), one sample at a time;
- `cg` / `mg-cg`, Jacobi- / multigrid-preconditioned CG from zero, either the window as one
  `vmap`ped batch or one sample after another (what `fpx.data.darcy` does on a CPU);
- `warm-start` / `recycled`, with Jacobi or multigrid preconditioning, in SKR order (greedy
  nearest neighbour of the coefficient fields over all `--samples` fields) and, for the
  recycled Jacobi solver, in the original order too (the effect of the sorting). Their
  iteration counts are compared with the same preconditioner from zero.

The full setting draws 1000 fields per resolution, but solving all of them with every
candidate takes hours on this machine, so each candidate solves the same `--windows`
windows of `--window` consecutive samples of the SKR order (spread evenly along it; the
unsorted variant takes windows of consecutive original indices), and the per-sample
figures are extrapolated to the 1000 samples: time = median over windows of (window time /
window size) x 1000, iterations = mean per sample x 1000. Every window starts cold (no
warm start or recycled space from the sample before it), so the sequential methods are
measured slightly pessimistically. The SKR sort of all fields is timed separately and added
to the SKR candidates' totals. Windows are timed one after another, the candidates
round-robin within each window (rotating which goes first); every candidate is called once
on a dummy window first (compilation, reported separately). Accuracy: the largest relative
L2 difference from `direct` on the SKR windows.

XLA runs single-threaded by default (`--threads all` to lift it), like scipy's SuperLU.

Usage:
    .venv/bin/python benchmarks/bench_pde_solvers.py            # s = 211 and 421: 17 min here
    .venv/bin/python benchmarks/bench_pde_solvers.py --quick    # s = 33, 64 fields, 2 windows of 8, no MG sequences: < 1 min
    .venv/bin/python benchmarks/bench_pde_solvers.py --from-json benchmarks/results/bench_pde_solvers.json

Writes `benchmarks/results/bench_pde_solvers.json` (`--quick`: `bench_pde_solvers_quick.json`)
and prints the markdown table; BENCHMARKS.md is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="s = 33, 64 fields, 2 windows of 8, without the two MG sequences (< 1 min)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="grid sizes s (nodes per side)")
    parser.add_argument("--samples", type=int, default=None, help="fields drawn per size (the SKR sort covers them all)")
    parser.add_argument("--windows", type=int, default=None, help="windows solved by every candidate")
    parser.add_argument("--window", type=int, default=None, help="samples per window")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", choices=("1", "all"), default="1", help="XLA CPU threads")
    parser.add_argument("--skip", nargs="*", default=[], help="candidates to leave out (by name; replaces --quick's list)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--from-json", type=Path, default=None, help="only print the markdown table of a results file")
    return parser.parse_args(argv)


OPTS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if OPTS.threads == "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from _common import RESULTS_DIR, machine_info  # noqa: E402
from fpx.data import _darcy, _elliptic  # noqa: E402
from fpx.data._grf import grf2_cosine  # noqa: E402

# Per size: (windows, samples per window). Full: 1000 fields.
FULL = dict(sizes=(211, 421), samples=1000, plan={211: (2, 16), 421: (1, 12)})
QUICK = dict(sizes=(33,), samples=64, plan={33: (2, 8)}, skip=("warm-start (MG, SKR)", "recycled (MG, SKR)"))

DIRECT = "direct"
CANDIDATES = (
    DIRECT, "cg, vmapped window", "cg, one by one", "mg-cg, vmapped window", "mg-cg, one by one",
    "warm-start (Jacobi, SKR)", "recycled (Jacobi, SKR)", "recycled (Jacobi, unsorted)",
    "warm-start (MG, SKR)", "recycled (MG, SKR)",
)
# Names used by runs made before the candidates were renamed (same computations).
OLD_NAMES = {"cg": "cg, vmapped window", "mg-cg": "mg-cg, vmapped window"}


def draw_fields(n: int, s: int, seed: int) -> np.ndarray:
    """The `n` coefficient masks (`a = 3 + 9 mask`) of `fpx.data.darcy(n, s, seed)`, blocks of 64 like it."""
    rng = np.random.default_rng(seed)
    mask = np.empty((n, s, s), bool)
    for start in range(0, n, 64):
        g = grf2_cosine(rng, min(64, n - start), s, 2.0, 3.0)
        mask[start : start + len(g)] = g >= 0
    return mask


def coefficient(mask):
    return np.where(mask, 12.0, 3.0)


def candidate(name: str, rtol: float):
    """`name` -> function(a (L, s, s) float64) -> (u (L, s, s), iterations per sample, converged, residuals)."""

    def unpack(sol):
        jax.block_until_ready(sol)
        return (np.asarray(sol.value), np.asarray(sol.num_steps), np.asarray(sol.converged),
                np.asarray(sol.residual_norm))

    if name == DIRECT:
        def run(a):
            u = np.stack([_darcy.solve_darcy(x) for x in a])
            return u, np.zeros(len(a), int), np.ones(len(a), bool), np.full(len(a), np.nan)
        return run
    if name.startswith(("cg, ", "mg-cg, ")):
        method = name.split(",")[0]
        if name.endswith("vmapped window"):
            return lambda a: unpack(_elliptic.solve_darcy_iterative(a, method=method, rtol=rtol, batch=len(a)))
        if method == "cg":  # Jacobi CG from zero, sample after sample (the baseline of the sequences)
            return lambda a: unpack(_elliptic.solve_sequence(a, method="independent", preconditioner="jacobi", rtol=rtol))
        return lambda a: unpack(_elliptic.solve_darcy_iterative(a, method=method, rtol=rtol, batch=1))
    method, pre = {
        "warm-start (Jacobi, SKR)": ("warm-start", "jacobi"),
        "recycled (Jacobi, SKR)": ("recycled", "jacobi"),
        "recycled (Jacobi, unsorted)": ("recycled", "jacobi"),
        "warm-start (MG, SKR)": ("warm-start", "mg"),
        "recycled (MG, SKR)": ("recycled", "mg"),
    }[name]
    # The windows come already in SKR order: solve them as given.
    return lambda a: unpack(_elliptic.solve_sequence(a, method=method, preconditioner=pre, rtol=rtol))


def run_size(s: int, cfg: dict, names: list[str]) -> dict:
    n = cfg["samples"]
    windows, size = cfg["plan"][s]
    t0 = time.perf_counter()
    mask = draw_fields(n, s, cfg["seed"])
    t_fields = time.perf_counter() - t0
    t0 = time.perf_counter()
    order = _elliptic.skr_order(mask)
    t_sort = time.perf_counter() - t0
    starts = np.linspace(0, n - size, windows).round().astype(int)
    sorted_windows = [order[st : st + size] for st in starts]
    plain_windows = [np.arange(st, st + size) for st in starts]
    print(f"#   s={s}: {n} fields in {t_fields:.1f} s, SKR sort {t_sort:.2f} s; {windows} windows of {size}", flush=True)

    fns = {name: candidate(name, cfg["rtol"]) for name in names}
    first = {}
    dummy = coefficient(mask[order[:size]][::-1])  # the same shape, other fields
    for name, fn in fns.items():
        if name == DIRECT:
            continue
        t0 = time.perf_counter()
        fn(dummy)
        first[name] = time.perf_counter() - t0
        print(f"#     compile+first {name}: {first[name]:.1f} s", flush=True)

    per = {name: {"times_s": [], "iterations": [], "converged": True, "max_residual": 0.0, "max_rel_diff": 0.0} for name in names}
    for w in range(windows):
        rot = names[w % len(names):] + names[: w % len(names)]
        reference = None
        outputs = {}
        for name in rot:
            idx = plain_windows[w] if "unsorted" in name else sorted_windows[w]
            a = coefficient(mask[idx])
            t0 = time.perf_counter()
            u, steps, ok, res = fns[name](a)
            dt = time.perf_counter() - t0
            rec = per[name]
            rec["times_s"].append(dt)
            rec["iterations"].append(int(steps.sum()))
            rec["converged"] &= bool(ok.all())
            if name != DIRECT:
                rec["max_residual"] = max(rec["max_residual"], float(np.max(res)))
            outputs[name] = u
            print(f"#     window {w + 1}/{windows} {name}: {dt:.2f} s, {int(steps.sum())} iterations", flush=True)
        reference = outputs.get(DIRECT)
        if reference is not None:
            for name, u in outputs.items():
                if "unsorted" in name or name == DIRECT:
                    continue
                d = np.linalg.norm((u - reference).reshape(size, -1), axis=1) / np.linalg.norm(reference.reshape(size, -1), axis=1)
                per[name]["max_rel_diff"] = max(per[name]["max_rel_diff"], float(d.max()))

    rows = []
    for name in names:
        rec = per[name]
        per_sample = statistics.median(t / size for t in rec["times_s"])
        sort_share = t_sort / n if "SKR" in name else 0.0
        rows.append({
            "name": name,
            "seconds_per_sample": per_sample + sort_share,
            "extrapolated_seconds": (per_sample + sort_share) * n,
            "iterations_per_sample": sum(rec["iterations"]) / (windows * size),
            "extrapolated_iterations": sum(rec["iterations"]) / (windows * size) * n,
            "first_call_s": first.get(name),
            **rec,
        })
    return {"s": s, "unknowns": (s - 2) ** 2, "samples": n, "windows": windows, "window": size,
            "measured_samples": windows * size, "fields_s": t_fields, "skr_sort_s": t_sort, "rows": rows}


def markdown(report: dict) -> str:
    lines = []
    cfg = report["config"]
    for res in report["results"]:
        rows = {OLD_NAMES.get(r["name"], r["name"]): r for r in res["rows"]}
        base = rows.get(DIRECT)
        jacobi0 = rows.get("cg, one by one")
        mg0 = rows.get("mg-cg, one by one") or rows.get("mg-cg, vmapped window")
        lines.append(
            f"**s = {res['s']}** ({res['unknowns']:,} unknowns), rtol {cfg['rtol']:g}, float64: measured on "
            f"{res['measured_samples']} of {res['samples']} samples ({res['windows']} window(s) of {res['window']}), "
            f"extrapolated to {res['samples']}; SKR sort of all {res['samples']} fields {res['skr_sort_s']:.2f} s "
            f"(included in the SKR rows)."
        )
        lines.append("")
        lines.append("| solver | time / sample | total, extrapolated | speed-up vs direct | iterations / sample | "
                     "iterations vs the same preconditioner from zero | max rel. L2 diff. vs direct | compile + first window |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            speed = f"{base['seconds_per_sample'] / r['seconds_per_sample']:.2f}x" if base else "-"
            its = f"{r['iterations_per_sample']:.0f}" if name != DIRECT else "-"
            zero = mg0 if ("MG" in name or name.startswith("mg-cg")) else jacobi0
            ratio = "-"
            if name != DIRECT and zero is not None and zero is not r:
                ratio = f"{zero['iterations_per_sample'] / r['iterations_per_sample']:.2f}x fewer"
            diff = f"{r['max_rel_diff']:.1e}" if (name != DIRECT and base and "unsorted" not in name) else "-"
            comp = f"{r['first_call_s']:.1f} s" if r["first_call_s"] is not None else "-"
            conv = "" if r["converged"] else " (NOT CONVERGED)"
            lines.append(
                f"| {name}{conv} | {r['seconds_per_sample'] * 1e3:.1f} ms | {r['extrapolated_seconds']:.0f} s | {speed} | "
                f"{its} | {ratio} | {diff} | {comp} |"
            )
        lines.append("")
    m = report["machine"]
    lines.append(
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs (shared), {m['platform']}; jax {m['jax']}, XLA threads: "
        f"{cfg['threads']}; load average (1, 5, 15 min) before / after: {report['load_before']} / {report['load_after']}; "
        f"{m['date_utc']}, commit {m['git_commit']}{' + uncommitted changes' if m['fpx_uncommitted_changes'] else ''}; "
        f"{report['total_seconds']:.0f} s in all."
    )
    return "\n".join(lines) + "\n"


def main() -> dict:
    opts = OPTS
    if opts.from_json:
        print(markdown(json.loads(opts.from_json.read_text())))
        return {}
    cfg = dict(QUICK if opts.quick else FULL)
    cfg["plan"] = dict(cfg["plan"])
    if opts.sizes:
        cfg["sizes"] = tuple(opts.sizes)
    if opts.samples:
        cfg["samples"] = opts.samples
    for s in cfg["sizes"]:
        w, L = cfg["plan"].get(s, (2, 8))
        cfg["plan"][s] = (opts.windows or w, opts.window or L)
    cfg.update(quick=opts.quick, rtol=opts.rtol, seed=opts.seed, threads=opts.threads, sizes=list(cfg["sizes"]))
    skip = set(opts.skip) | (set(cfg.pop("skip", ())) if opts.quick and not opts.skip else set())
    names = [c for c in CANDIDATES if c not in skip]
    out_path = opts.out or RESULTS_DIR / ("bench_pde_solvers_quick.json" if opts.quick else "bench_pde_solvers.json")

    start = time.perf_counter()
    machine = machine_info()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# bench_pde_solvers: {'quick' if opts.quick else 'full'} run, load {load_before}", flush=True)
    results = [run_size(s, cfg, names) for s in cfg["sizes"]]
    report = {
        "machine": machine, "config": {**cfg, "plan": {str(k): v for k, v in cfg["plan"].items()}},
        "candidates": names, "results": results, "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()), "total_seconds": time.perf_counter() - start,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    print(f"# wrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path} "
          f"in {report['total_seconds']:.1f} s total")
    return report


if __name__ == "__main__":
    main()
