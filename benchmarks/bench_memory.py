"""Compiled temporary memory of DEQ gradients: implicit vs unrolled, at growing max_steps.

For each `max_steps` in (10, 100, 1000) it compiles `jax.grad` of a loss through a DEQ
cell `tanh(W z + U x + b)` (width 256, batch 128, float32, W = 0.99 * orthogonal so the
solve actually runs long) and reads XLA's `memory_analysis().temp_size_in_bytes`:

- fpx ImplicitAdjoint (the default): should be flat in max_steps;
- fpx UnrolledAdjoint (equinox checkpointed while loop);
- a plain `lax.scan` unrolled for max_steps steps (stores every iterate).

Writes benchmarks/results/bench_memory.json and prints a markdown table.
Run: `.venv/bin/python benchmarks/bench_memory.py`
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
import jax.random as jr

import fpx

WIDTH, BATCH, GAMMA = 256, 128, 0.99
RESULTS = pathlib.Path(__file__).parent / "results"


def problem():
    kw, ku, kx = jr.split(jr.PRNGKey(0), 3)
    q, _ = jnp.linalg.qr(jr.normal(kw, (WIDTH, WIDTH)))
    params = {"W": GAMMA * q, "U": jr.normal(ku, (WIDTH, WIDTH)) / WIDTH**0.5, "b": jnp.full((WIDTH,), 0.02)}
    xs = 0.2 * jr.normal(kx, (BATCH, WIDTH))
    return params, xs


def cell(z, args):
    params, x = args
    return jnp.tanh(params["W"] @ z + params["U"] @ x + params["b"])


def fpx_loss(adjoint, max_steps):
    def loss(params, xs):
        def one(x):
            sol = fpx.fixed_point(
                cell, jnp.zeros(WIDTH), (params, x), solver=fpx.Picard(rtol=1e-5, atol=0.0),
                adjoint=adjoint, max_steps=max_steps, throw=False,
            )
            return jnp.sum(sol.value**2)

        return jnp.mean(jax.vmap(one)(xs))

    return loss


def scan_loss(max_steps):
    def loss(params, xs):
        def one(x):
            z, _ = jax.lax.scan(lambda z, _: (cell(z, (params, x)), None), jnp.zeros(WIDTH), None, length=max_steps)
            return jnp.sum(z**2)

        return jnp.mean(jax.vmap(one)(xs))

    return loss


def temp_bytes(loss, params, xs) -> int:
    compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main():
    params, xs = problem()
    rows = []
    for max_steps in (10, 100, 1000):
        row = {"max_steps": max_steps}
        row["fpx ImplicitAdjoint"] = temp_bytes(fpx_loss(fpx.ImplicitAdjoint(), max_steps), params, xs)
        row["fpx UnrolledAdjoint (checkpointed)"] = temp_bytes(fpx_loss(fpx.UnrolledAdjoint(), max_steps), params, xs)
        row["lax.scan unrolled"] = temp_bytes(scan_loss(max_steps), params, xs)
        rows.append(row)
        print(row, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.platform()}, {jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "problem": f"DEQ tanh cell, width {WIDTH}, batch {BATCH}, float32, contraction {GAMMA}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    names = [k for k in rows[0] if k != "max_steps"]
    print("\n| max_steps | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for row in rows:
        print(f"| {row['max_steps']} | " + " | ".join(f"{row[n] / 2**20:.2f} MiB" for n in names) + " |")


if __name__ == "__main__":
    main()
