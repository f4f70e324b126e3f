"""Quickstart: solve a deep-equilibrium (DEQ) cell with every fpx solver and differentiate it.

Run with `.venv/bin/python examples/deq_solvers.py`. Prints a table of steps, function evaluations, residuals and timings,
then checks the implicit gradient against backpropagation through an unrolled solve.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import jax.random as jr

import fpx

WIDTH, BATCH, GAMMA = 128, 64, 0.95


def make_problem(key):
    kw, ku, kx = jr.split(key, 3)
    # A symmetric W with spectrum spread over [-GAMMA, GAMMA]: the Jacobian's spectrum is
    # real, where Anderson/Krylov acceleration pays (for spectra filling a disk, as with a
    # scaled random orthogonal W, no Krylov method beats Picard: see BENCHMARKS.md).
    q, _ = jnp.linalg.qr(jr.normal(kw, (WIDTH, WIDTH)))
    w = GAMMA * (q * jnp.linspace(-1.0, 1.0, WIDTH)) @ q.T
    params = {"W": w, "U": jr.normal(ku, (WIDTH, WIDTH)) / WIDTH**0.5, "b": jnp.full((WIDTH,), 0.02)}
    x = jr.normal(kx, (BATCH, WIDTH))
    return params, x


def cell(z, inputs):
    params, x = inputs
    return jnp.tanh(params["W"] @ z + 0.2 * params["U"] @ x + params["b"])


def main():
    params, xs = make_problem(jr.PRNGKey(0))
    solvers = {
        "Picard": fpx.Picard(),
        "KM(0.8)": fpx.KM(0.8),
        "Halpern(rho=0.95)": fpx.Halpern(contraction=GAMMA),
        "Anderson(5)": fpx.Anderson(memory=5),
        "Broyden(10)": fpx.Broyden(memory=10),
        "NewtonKrylov": fpx.NewtonKrylov(),
    }
    print(f"DEQ cell z = tanh(W z + U x + b): width {WIDTH}, batch {BATCH}, contraction {GAMMA}, rtol 1e-5\n")
    header = f"{'solver':<20}{'converged':>10}{'steps':>8}{'fn evals':>10}{'residual':>12}{'ms':>9}"
    print(header)
    print("-" * len(header))
    for name, solver in solvers.items():

        @jax.jit
        def solve(params, xs, solver=solver):
            z0 = jnp.zeros(WIDTH)
            return jax.vmap(lambda x: fpx.fixed_point(cell, z0, (params, x), solver=solver, max_steps=2000, throw=False))(xs)

        jax.block_until_ready(solve(params, xs))
        start = time.perf_counter()
        sol = jax.block_until_ready(solve(params, xs))
        ms = 1e3 * (time.perf_counter() - start)
        ok = float(jnp.mean(sol.result == fpx.RESULTS.successful))
        evals = sol.stats["num_fn_evals"] + sol.stats.get("num_jvps", 0)
        print(
            f"{name:<20}{ok:>10.0%}{float(jnp.mean(sol.stats['num_steps'])):>8.1f}"
            f"{float(jnp.mean(evals)):>10.1f}{float(jnp.max(sol.stats['residual_norm'])):>12.2e}{ms:>9.1f}"
        )

    def loss(params, solver):
        z0 = jnp.zeros(WIDTH)
        zs = jax.vmap(lambda x: fpx.fixed_point(cell, z0, (params, x), solver=solver, max_steps=2000).value)(xs)
        return jnp.mean(zs**2)

    def loss_unrolled(params, steps=600):
        zs = jnp.zeros((BATCH, WIDTH))
        for _ in range(steps):
            zs = jax.vmap(cell, in_axes=(0, (None, 0)))(zs, (params, xs))
        return jnp.mean(zs**2)

    g_implicit = jax.jit(jax.grad(loss), static_argnums=1)(params, fpx.Anderson(rtol=1e-7))
    g_unrolled = jax.jit(jax.grad(loss_unrolled))(params)
    num = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(g_implicit), jax.tree.leaves(g_unrolled)))
    den = sum(jnp.sum(b**2) for b in jax.tree.leaves(g_unrolled))
    print(f"\nimplicit gradient vs backprop through 600 unrolled steps: relative error {float((num / den) ** 0.5):.2e}")


if __name__ == "__main__":
    main()
