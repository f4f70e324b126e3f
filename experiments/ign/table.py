"""The IGN two-moons table: from a run directory of `configs/ign/moons.py` to the README.

    python experiments/ign/table.py RUN_DIR                              # print the table
    python experiments/ign/table.py RUN_DIR --save --note "load 1.2"     # + results.json, the README section, the figures
    python experiments/ign/table.py --from-results                       # README section from results.json only

Per variant (`hparams.variant`; mean ± sd over its seeds, at the last evaluation): the
idempotence error `E|f(f(z)) - f(z)|`, the energy distance of `f(z)` to the held-out data,
the nearest-neighbour distances (samples to data, data to samples), the reconstruction
error `E|f(x) - x|`, the relative change of `f^k(z)` at `k = 1` and at the last `k`,
`fpx.fixed_point` iterating `f` from `z` (mean steps, fraction converged, energy distance
of its fixed points), the norm of the tightness term's gradient, and ms per training step
(the median over the run's timed chunks in `timing.jsonl`; a variant's seeds train as one
vmapped program). `--save` also draws `moons.png` (data, `z`, and `f(z)`, `f(f(z))`,
`f^K(z)` and the fixed points of seed 0 of every variant, restored from the run's last checkpoint) and
`curves.png` (idempotence error and energy distance over training). `tests/test_ign.py`
checks that the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import pathlib

from fpx.experiment import by_variant, format_value, generated_section, mean_sd, member_histories, read_run, table_main
from fpx.experiment import timing_by_unit, unit_ms_per_step

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
SECTION = "ign_table"
KEYS = ("idem_error", "energy_fz", "nn_fz", "nn_data", "rec_error", "fp_steps", "fp_converged", "energy_fp", "tight_grad_norm")


def _stats(values: list[float]) -> dict:
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd}


def _by_variant(records: list[dict], order: list[str]) -> dict[str, list[list[dict]]]:
    return by_variant(member_histories(records), order, default="ign")


def collect(run_dir) -> dict:
    """`{"setup": {...}, "rows": [...]}` from one run directory."""
    config, records = read_run(run_dir)
    timing = timing_by_unit(run_dir)
    order = list(config.get("variant_order") or config.get("variants") or [])
    K = config["eval"]["iterations"]
    rows = []
    for variant, members in _by_variant(records, order).items():
        last = [rs[-1] for rs in members]
        spec = (config.get("variants") or {}).get(variant, {})
        loss = {**config["loss"], **spec.get("loss", {})}
        row = {
            "variant": variant,
            "distance": loss["distance"],
            "lambda_tight": loss["lambda_tight"],
            "tight_grad": loss["tight_grad"],
            "seeds": len(last),
            "step": min(r["step"] for r in last),
            **{k: _stats([r[f"eval/{k}"] for r in last]) for k in KEYS},
            "rel_change_k1": _stats([r["eval/rel_change_k1"] for r in last]),
            "rel_change_kK": _stats([r[f"eval/rel_change_k{K}"] for r in last]),
            "ms_per_step": unit_ms_per_step(last, timing),
        }
        rows.append(row)
    first = records[0]
    setup = {
        "steps": config["train"]["steps"],
        "width": config["model"]["width"],
        "depth": config["model"]["depth"],
        "seeds": len(config["sweep"]["seed"]),
        "iterations": K,
        "num_samples": config["eval"]["num_samples"],
        "energy_z": first["eval/energy_z"],
        "energy_floor": first["eval/energy_floor"],
        "nn_floor": first["eval/nn_floor"],
    }
    return {"setup": setup, "rows": rows}


def _ms(v):
    return format_value(v["mean"], ".3f", v["sd"])


def markdown(result: dict) -> str:
    s = result["setup"]
    head = (f"{s['steps']} training steps, MLP {s['depth']} × {s['width']}, {s['seeds']} seeds, "
            f"{s['num_samples']} noises z; for scale: energy distance of z itself {s['energy_z']:.3f}, "
            f"of as many training points {s['energy_floor']:.3f} (nearest-neighbour distance {s['nn_floor']:.3f})"
            + (f"; {result['note']}" if result.get("note") else ""))
    K = s["iterations"]
    lines = [head, "",
             "| variant | setting | idempotence error E‖f(f(z)) − f(z)‖ | energy distance f(z) ↔ data "
             "| nn distance f(z) → data | nn distance data → f(z) | reconstruction E‖f(x) − x‖ "
             f"| rel. change of f^k(z), k = 1 | k = {K} | fixed_point steps | converged | energy distance z* ↔ data "
             "| ‖∇ L_tight‖ | ms / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        through = "∇ through outer f (paper)" if r["tight_grad"] == "outer" else "frozen copy outer: no ∇"
        setting = f"D = {r['distance']}, λ_t = {r['lambda_tight']:g}, {through}"
        ms = format_value(r["ms_per_step"], ".2f")
        lines.append(
            f"| {r['variant']} | {setting} | {_ms(r['idem_error'])} | {_ms(r['energy_fz'])} "
            f"| {_ms(r['nn_fz'])} | {_ms(r['nn_data'])} | {_ms(r['rec_error'])} | {_ms(r['rel_change_k1'])} | {_ms(r['rel_change_kK'])} "
            f"| {format_value(r['fp_steps']['mean'], '.1f', r['fp_steps']['sd'])} | {100 * r['fp_converged']['mean']:.0f} % "
            f"| {_ms(r['energy_fp'])} | {r['tight_grad_norm']['mean']:.3g} | {ms} |"
        )
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `ign_table` markers)."""
    return generated_section(README, SECTION)


def figures(run_dir, out_dir=HERE) -> list[pathlib.Path]:
    """`moons.png` and `curves.png` of a run directory (seed 0 of every variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import jax
    import matplotlib.pyplot as plt
    import numpy as np

    from fpx.experiment import restore

    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    config, records = read_run(run_dir)
    order = list(config.get("variant_order") or config.get("variants") or [])
    groups = _by_variant(records, order)
    panels = []
    for variant, members in groups.items():
        rs = min(members, key=lambda rs: rs[-1]["hparams"].get("seed", 0))
        unit, member = rs[-1]["unit"], rs[-1]["member"]
        task, state, ids = restore(run_dir, unit)
        params = jax.tree_util.tree_map(lambda a: a[ids.index(member)], state["params"])
        K = config["eval"]["iterations"] + 1
        fk = np.asarray(task.iterates(params, task.z_eval, K))
        fixed = np.asarray(task.fixed_points(params, task.z_eval).value)
        panels.append((variant, np.asarray(task.x_test), np.asarray(task.z_eval), fk, fixed))
    n = len(panels)
    fig = plt.figure(figsize=(9, 2.3 * (n + 1)))
    grid = fig.add_gridspec(n + 1, 4)
    x, z = panels[0][1], panels[0][2]

    def scatter(ax, pts, title, color):
        ax.scatter(x[:, 0], x[:, 1], s=0.5, color="0.8", rasterized=True)
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, color=color, rasterized=True)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)

    scatter(fig.add_subplot(grid[0, 0]), x, "held-out data x", "C0")
    scatter(fig.add_subplot(grid[0, 1]), z, "z ~ N(0, I) (the same z in every row)", "C0")
    for i, (variant, _, _, fk, fixed) in enumerate(panels, start=1):
        for j, (pts, title) in enumerate(((fk[0], "f(z)"), (fk[1], "f(f(z))"), (fk[-1], f"f^{K}(z)"),
                                          (fixed, "fpx.fixed_point of f from z"))):
            scatter(fig.add_subplot(grid[i, j]), pts, f"{variant}: {title}", "C3")
    fig.suptitle("two moons (grey: held-out data), seed 0 of every variant", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    moons = out_dir / "moons.png"
    fig.savefig(moons, dpi=60)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for i, (variant, members) in enumerate(groups.items()):
        steps = [r["step"] for r in members[0]]
        for ax, key in zip(axes, ("eval/idem_error", "eval/energy_fz", "eval/nn_fz")):
            values = np.array([[r[key] for r in rs] for rs in members])
            ax.plot(steps, values.mean(0), color=f"C{i}", label=variant)
            ax.fill_between(steps, values.min(0), values.max(0), color=f"C{i}", alpha=0.2)
    first = records[0]
    axes[1].axhline(first["eval/energy_floor"], color="k", ls=":", lw=1, label="training points (floor)")
    axes[1].axhline(first["eval/energy_z"], color="k", ls="--", lw=1, label="z itself")
    axes[2].axhline(first["eval/nn_floor"], color="k", ls=":", lw=1)
    for ax, title in zip(axes, ("idempotence error E|f(f(z)) - f(z)|", "energy distance f(z) to data", "E min |f(z) - x|")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=60)
    plt.close(fig)
    return [moons, curves]


def _print_figures(result: dict, run_dir: str) -> None:
    for path in figures(run_dir):
        print(path)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        after_save=_print_figures,
        save_help="store the rows in results.json, rewrite the README section, draw the figures",
    )


if __name__ == "__main__":
    raise SystemExit(main())
