"""Throughput of fpx.operators' FNO against a straightforward port of the reference code, and of fpx.data.

1. FNO-1D training step (forward + backward, `jax.value_and_grad` of an MSE loss, jitted),
   width 32, 16 modes, 4 Fourier layers, batch 20, float32, at s = 256 and s = 1024:
   `fpx.operators.FNO` (one sample, `jax.vmap`ped; spectral weights as real/imag pairs)
   against a reference written here the way the original PyTorch code is (batch-first
   `(b, channels, s)` layout, complex weight leaves, `einsum("bix,iox->box")`, the
   spectrum written into a zero array with `.at[].set`), ported to JAX. Both start from
   the same weights and compute the same function (checked: the outputs agree). The
   forward pass alone is timed as well. Reported: samples/s and the fpx / reference time
   ratio, as the ratio of medians and as the median of back-to-back paired ratios.
2. Data-generation throughput of `fpx.data.burgers(..., cache=False)` and
   `fpx.data.darcy(..., cache=False)` (samples/s of a warm call, and the first call
   with compilation), if `fpx.data` is importable; otherwise the section is skipped with
   a message.

Every timing is the median of `--repeats` warm calls (the compiling first call is
excluded), each ending in `jax.block_until_ready`, candidates timed round-robin.

Usage:
    .venv/bin/python benchmarks/bench_operators.py            # full run, about 2 min
    .venv/bin/python benchmarks/bench_operators.py --quick    # s = 256 only, small data sets: < 30 s

Writes `benchmarks/results/bench_operators.json` (`--quick`: `bench_operators_quick.json`)
and prints the markdown tables; BENCHMARKS.md is left alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import fpx.operators as ops  # noqa: E402
from _common import RESULTS_DIR, machine_info, time_pairs, time_round_robin  # noqa: E402

FULL = dict(resolutions=(256, 1024), batch=20, width=32, modes=16, layers=4, repeats=21, pairs=21,
            burgers_n=16, darcy_n=16, data_repeats=3)
QUICK = dict(resolutions=(256,), batch=20, width=32, modes=16, layers=4, repeats=5, pairs=5,
             burgers_n=2, darcy_n=2, data_repeats=1)


# --------------------------------------------------------------------------- reference FNO


def reference_params(params):
    """fpx FNO parameters in the reference layout: complex spectral weights `(in, out, modes)`."""
    layers = []
    for layer in params["layers"]:
        spectral = layer["spectral"]
        layers.append({
            "weights1": jax.lax.complex(spectral["real"], spectral["imag"]),
            "w": layer["pointwise"]["weight"],
            "b": layer["pointwise"]["bias"],
        })
    return {
        "fc0": params["lift"],
        "layers": layers,
        "fc1": params["projection"][0],
        "fc2": params["projection"][1],
    }


def reference_fno1d(p, x, modes):
    """FNO1d.forward of the reference code, batch-first, ported line by line to JAX.

    `x`: (batch, s, 1). The grid is `i / s` (fpx's default for padding=0) so that the two
    implementations compute the same function; the reference itself uses linspace(0, 1, s).
    """
    b, s, _ = x.shape
    grid = jnp.broadcast_to((jnp.arange(s, dtype=x.dtype) / s)[None, :, None], (b, s, 1))
    x = jnp.concatenate([x, grid], axis=-1)
    x = x @ p["fc0"]["weight"] + p["fc0"]["bias"][None, None, :]
    x = jnp.transpose(x, (0, 2, 1))  # (b, width, s)
    for i, layer in enumerate(p["layers"]):
        x_ft = jnp.fft.rfft(x)
        out_ft = jnp.zeros((b, x.shape[1], s // 2 + 1), x_ft.dtype)
        out_ft = out_ft.at[:, :, :modes].set(jnp.einsum("bix,iox->box", x_ft[:, :, :modes], layer["weights1"]))
        x1 = jnp.fft.irfft(out_ft, n=s)
        x2 = jnp.einsum("bix,io->box", x, layer["w"]) + layer["b"][None, :, None]
        x = x1 + x2
        if i < len(p["layers"]) - 1:
            x = jax.nn.gelu(x)
    x = jnp.transpose(x, (0, 2, 1))
    x = jax.nn.gelu(x @ p["fc1"]["weight"] + p["fc1"]["bias"][None, None, :])
    return x @ p["fc2"]["weight"] + p["fc2"]["bias"][None, None, :]


# --------------------------------------------------------------------------- section 1


def run_fno(s: int, cfg: dict) -> dict:
    fno = ops.FNO(dim=1, modes=cfg["modes"], width=cfg["width"], layers=cfg["layers"], dtype=jnp.float32)
    params = fno.init(jr.PRNGKey(cfg["seed"]))
    ref_p = reference_params(params)
    rng = np.random.default_rng(cfg["seed"])
    x = jnp.asarray(rng.standard_normal((cfg["batch"], s, 1)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((cfg["batch"], s, 1)), jnp.float32)
    modes = cfg["modes"]

    def fpx_forward(p, x):
        return jax.vmap(fno.apply, in_axes=(None, 0))(p, x)

    def ref_forward(p, x):
        return reference_fno1d(p, x, modes)

    def loss(forward):
        return lambda p, x, y: jnp.mean((forward(p, x) - y) ** 2)

    fpx_step = jax.jit(jax.value_and_grad(loss(fpx_forward)))
    ref_step = jax.jit(jax.value_and_grad(loss(ref_forward)))
    fpx_fwd, ref_fwd = jax.jit(fpx_forward), jax.jit(ref_forward)
    thunks = {
        "fpx fwd+bwd": lambda: fpx_step(params, x, y),
        "reference fwd+bwd": lambda: ref_step(ref_p, x, y),
        "fpx fwd": lambda: fpx_fwd(params, x),
        "reference fwd": lambda: ref_fwd(ref_p, x),
    }
    timing, outputs = time_round_robin(thunks, cfg["repeats"])
    paired_step = time_pairs(thunks["reference fwd+bwd"], thunks["fpx fwd+bwd"], cfg["pairs"])
    paired_fwd = time_pairs(thunks["reference fwd"], thunks["fpx fwd"], cfg["pairs"])

    out_diff = float(jnp.max(jnp.abs(outputs["fpx fwd"] - outputs["reference fwd"])))
    out_scale = float(jnp.max(jnp.abs(outputs["reference fwd"])))
    # The complex-leaf gradient is the conjugate: compare fpx's imag gradient with -Im.
    g_fpx = outputs["fpx fwd+bwd"][1]["layers"][0]["spectral"]
    g_ref = outputs["reference fwd+bwd"][1]["layers"][0]["weights1"]
    grad_diff = float(jnp.max(jnp.abs(g_fpx["real"] - g_ref.real)) + jnp.max(jnp.abs(g_fpx["imag"] + g_ref.imag)))
    grad_scale = float(jnp.max(jnp.abs(g_ref)))
    rows = {
        name: {
            "median_ms": 1e3 * t["median_s"],
            "min_ms": 1e3 * t["min_s"],
            "samples_per_s": cfg["batch"] / t["median_s"],
            "first_call_s": t["first_call_s"],
        }
        for name, t in timing.items()
    }
    return {
        "s": s,
        "rows": rows,
        "step_ratio_of_medians": rows["fpx fwd+bwd"]["median_ms"] / rows["reference fwd+bwd"]["median_ms"],
        "step_ratio_paired": paired_step["median_ratio"],
        "forward_ratio_of_medians": rows["fpx fwd"]["median_ms"] / rows["reference fwd"]["median_ms"],
        "forward_ratio_paired": paired_fwd["median_ratio"],
        "max_abs_output_difference": out_diff,
        "output_scale": out_scale,
        "max_abs_spectral_grad_difference_conjugated": grad_diff,
        "spectral_grad_scale": grad_scale,
    }


# --------------------------------------------------------------------------- section 2


def run_data(cfg: dict) -> dict:
    try:
        data = importlib.import_module("fpx.data")
    except ImportError as e:
        return {"skipped": f"fpx.data is not importable yet ({type(e).__name__}: {e})"}
    results = {}
    for name, n, kwargs in (("burgers", cfg["burgers_n"], {}), ("darcy", cfg["darcy_n"], {})):
        fn = getattr(data, name, None)
        if fn is None:
            results[name] = {"skipped": f"fpx.data has no `{name}` yet"}
            continue
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(n, seed=cfg["seed"], cache=False, **kwargs))
            first = time.perf_counter() - t0
        except TypeError as e:
            results[name] = {"skipped": f"fpx.data.{name}(n, seed=..., cache=False) failed: {e}"}
            continue
        times = []
        for r in range(cfg["data_repeats"]):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(n, seed=cfg["seed"] + 1 + r, cache=False, **kwargs))
            times.append(time.perf_counter() - t0)
        median = float(np.median(times))
        shapes = [tuple(np.shape(a)) for a in (out if isinstance(out, (tuple, list)) else (out,))]
        results[name] = {
            "n": n,
            "shapes": shapes,
            "first_call_s": first,
            "median_s": median,
            "times_s": times,
            "samples_per_s": n / median,
            "ms_per_sample": 1e3 * median / n,
        }
    return results


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    lines = []
    add = lines.append
    add(
        f"Run: {m['date_utc']}{' (`--quick`)' if cfg['quick'] else ''}, {report['total_seconds']:.0f} s, on "
        f"{m['platform']}, {m['cpu_count']} CPUs ({m['jax_backend']}); jax {m['jax']}, fpx git {m['git_commit']}"
        f"{' (uncommitted changes under fpx/)' if m['fpx_uncommitted_changes'] else ''}."
    )
    add("")
    add(
        f"FNO-1D, width {cfg['width']}, {cfg['modes']} modes, {cfg['layers']} layers, batch {cfg['batch']}, float32; "
        f"fwd+bwd = jitted `value_and_grad` of an MSE loss. Median of {cfg['repeats']} warm calls; "
        f"paired = median over {cfg['pairs']} back-to-back (reference, fpx) pairs of the time ratio."
    )
    add("")
    add("| s | fpx fwd+bwd samples/s | reference fwd+bwd samples/s | **fpx / ref time (paired)** | ratio of medians | fpx fwd samples/s | ref fwd samples/s | fwd fpx / ref (paired) | max output diff |")
    add("|---|---|---|---|---|---|---|---|---|")
    for r in report["fno"]:
        rows = r["rows"]
        add(
            f"| {r['s']} | {rows['fpx fwd+bwd']['samples_per_s']:.0f} | {rows['reference fwd+bwd']['samples_per_s']:.0f} | "
            f"**{r['step_ratio_paired']:.2f}** | {r['step_ratio_of_medians']:.2f} | {rows['fpx fwd']['samples_per_s']:.0f} | "
            f"{rows['reference fwd']['samples_per_s']:.0f} | {r['forward_ratio_paired']:.2f} | "
            f"{r['max_abs_output_difference']:.1e} (of {r['output_scale']:.1e}) |"
        )
    add("")
    data = report["data"]
    if "skipped" in data:
        add(f"Data generation: skipped: {data['skipped']}")
    else:
        add("Data generation, default arguments (Burgers: solved at s=1024 with 4000 steps, returned at 256; "
            "Darcy: s=85); warm call = median over fresh seeds.")
        add("")
        add("| generator | n | shapes | warm call s | samples/s | ms/sample | first call s (compile) |")
        add("|---|---|---|---|---|---|---|")
        for name, row in data.items():
            if "skipped" in row:
                add(f"| {name} | skipped: {row['skipped']} | | | | | |")
                continue
            add(
                f"| `fpx.data.{name}(cache=False)` | {row['n']} | {row['shapes']} | {row['median_s']:.2f} | "
                f"{row['samples_per_s']:.1f} | {row['ms_per_sample']:.1f} | {row['first_call_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="s = 256 only, tiny data sets, few repeats (< 30 s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed warm calls per candidate (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-data", action="store_true", help="skip the fpx.data section")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    opts = parser.parse_args(argv)
    cfg = dict(QUICK if opts.quick else FULL)
    if opts.repeats is not None:
        cfg["repeats"] = opts.repeats
    cfg.update(quick=opts.quick, seed=opts.seed, resolutions=list(cfg["resolutions"]), dtype="float32")
    out_path = opts.out or RESULTS_DIR / ("bench_operators_quick.json" if opts.quick else "bench_operators.json")

    start = time.perf_counter()
    machine = machine_info()
    print(f"# bench_operators: {'quick' if opts.quick else 'full'} run on {machine['platform']} "
          f"({machine['cpu_count']} CPUs)", flush=True)
    report = {"machine": machine, "config": cfg, "fno": [], "data": None, "total_seconds": None}
    for s in cfg["resolutions"]:
        t0 = time.perf_counter()
        report["fno"].append(run_fno(s, cfg))
        print(f"#   FNO s={s}: {time.perf_counter() - t0:.1f} s", flush=True)
    if opts.no_data:
        report["data"] = {"skipped": "--no-data"}
    else:
        t0 = time.perf_counter()
        report["data"] = run_data(cfg)
        print(f"#   data generation: {time.perf_counter() - t0:.1f} s", flush=True)
    report["total_seconds"] = time.perf_counter() - start

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    print(f"# wrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path} "
          f"in {report['total_seconds']:.1f} s total")
    return report


if __name__ == "__main__":
    main()
