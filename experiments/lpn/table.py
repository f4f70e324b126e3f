"""The learned-proximal-network tables: from run directories of `configs/lpn/laplacian.py` and
`configs/lpn/pnp.py` to the README.

    python experiments/lpn/table.py RUN_DIR [RUN_DIR ...]                      # print the table(s)
    python experiments/lpn/table.py RUN_DIR --save --note "load 1.2"           # + results.json, README section, figure
    python experiments/lpn/table.py --from-results                             # README sections and figures from results.json

The kind of a run directory (`laplacian` or `pnp`) is read from its `config.json`; `--save`
replaces that kind's entry of `results.json`, its README section and its figure
(`laplacian.png`, `pnp.png`), and leaves the other kind's alone.

Laplacian (per variant, mean ± sd over its seeds, at the last evaluation): the sup errors
of the learned prox on `[-4, 4]` against the soft threshold (the MAP), the MMSE and the
population optimum of the proximal matching loss at the final γ, `f(0.5)`, the prior's sup
error (R by inverting f with fpx), the inversion's solver steps, the constrained weights'
smallest value after the projection over every step and before it, and the entries clipped
per step (the mean of the per-step counts). PnP (per problem and method, mean over seeds):
test PSNR, the weight chosen on the validation images, and for PnP-ADMM the mean / max
fixed-point steps and converged fraction of Picard and Anderson. ms per training step: the
median over the run's timed chunks (`timing.jsonl`). `tests/test_lpn.py` checks that the
README sections are what `results.json` regenerates.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from fpx.experiment import by_variant, format_value, generated_section, mean_sd, member_histories, read_run
from fpx.experiment import timing_by_unit, unit_ms_per_step, write_generated_section

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
KINDS = {"lpn_laplacian": "laplacian", "lpn_pnp": "pnp"}


def _mean_sd(values):
    values = [v for v in values if v is not None]
    return mean_sd(values) if values else (None, None)


def _members(run_dir: pathlib.Path):
    config, records = read_run(run_dir)
    return config, member_histories(records), timing_by_unit(run_dir)


def _ms(members, timing):
    return unit_ms_per_step([rs[-1] for rs in members], timing)


def _constraint(members) -> dict:
    records = [r for rs in members for r in rs]
    return {
        "min_weight_ever": min(r["eval/min_weight_ever"] for r in records),
        "min_raw_weight_ever": min(r["eval/min_raw_weight_ever"] for r in records),
        "max_negative_after_projection": max(r["train/negative_weights"] for r in records),
        "clipped_per_step": statistics.fmean(r["train/clipped_weights"] for r in records),
    }


def collect(run_dir) -> dict:
    """`{"kind", "setup", "rows", ...}` from one run directory of either config."""
    run_dir = pathlib.Path(run_dir)
    config, by_member, timing = _members(run_dir)
    kind = KINDS.get(config.get("experiment"))
    if kind is None:
        raise SystemExit(f"{run_dir} is a run of {config.get('experiment')!r}, not of {' or '.join(KINDS)}")
    return (_collect_laplacian if kind == "laplacian" else _collect_pnp)(config, by_member, timing)


def _collect_laplacian(config, by_member, timing) -> dict:
    import numpy as np

    rows, prox, prior = [], {}, {}
    e, p = config["eval"], config["prior"]
    for variant, members in by_variant(by_member, config.get("variant_order") or config["variants"]).items():
        last = [rs[-1] for rs in members]
        spec = config["variants"].get(variant, {})
        loss = {**config["loss"], **spec.get("loss", {})}
        row = {"variant": variant, "loss": loss["kind"], "seeds": len(last), "step": min(r["step"] for r in last),
               "batch_size": spec.get("data", {}).get("batch_size", config["data"]["batch_size"])}
        for key in ("soft_sup_error", "soft_sup_error_off_kinks", "mmse_sup_error", "optimum_sup_error", "f_half",
                    "prior_sup_error", "prior_steps"):
            row[key], row[key + "_sd"] = _mean_sd([r[f"eval/{key}"] for r in last])
        row["soft_sup_error_at"] = [r["eval/soft_sup_error_at"] for r in last]
        row["optimum_soft_sup_error"] = last[0]["eval/optimum_soft_sup_error"]
        row["gamma_end"] = loss["gamma_end"] if loss["kind"] == "prox_matching" else None
        row["prior_converged"] = min(r["eval/prior_converged"] for r in last)
        row.update(_constraint(members))
        row["ms_per_step"] = _ms(members, timing)
        rows.append(row)
        prox[variant] = [statistics.fmean(r[f"eval/prox_curve_{i}"] for r in last) for i in range(e["curve_points"])]
        prior[variant] = [statistics.fmean(r[f"eval/prior_curve_{i}"] for r in last) for i in range(e["curve_points"] // 2 + 1)]
    d, m, lo = config["data"], config["model"], config["loss"]
    setup = {"steps": config["train"]["steps"], "batch_size": d["batch_size"], "hidden": m["hidden"], "layers": m["layers"],
             "beta": m["beta"], "gamma_start": lo["gamma_start"], "gamma_end": lo["gamma_end"],
             "gamma_stages": lo["gamma_stages"], "pretrain_fraction": lo["pretrain_fraction"], "scale": d["scale"],
             "noise": d["noise"], "solver": config["solver"]["name"], "seeds": len(config["sweep"]["seed"])}
    curves = {"y": np.linspace(-e["range"], e["range"], e["curve_points"]).tolist(), "prox": prox,
              "x": np.linspace(-p["range"], p["range"], e["curve_points"] // 2 + 1).tolist(), "prior": prior}
    return {"kind": "laplacian", "setup": setup, "rows": rows, "curves": curves}


PNP_METHODS = (("measured", "the measurement y"), ("tikhonov", "Tikhonov ½‖Ax−y‖² + λ/2‖Dx‖²"),
               ("tv", "total variation (Chambolle–Pock)"), ("pnp_picard", "PnP-ADMM + LPN, Picard"),
               ("pnp_accel", "PnP-ADMM + LPN, Anderson"))


def _collect_pnp(config, by_member, timing) -> dict:
    members = list(by_member.values())
    last = [rs[-1] for rs in members]
    rows = []
    for problem in ("deblur", "inpaint"):
        for method, label in PNP_METHODS:
            psnr, sd = _mean_sd([r[f"eval/{problem}_{method}_psnr"] for r in last])
            row = {"problem": problem, "method": method, "label": label, "psnr": psnr, "psnr_sd": sd}
            if method in ("tikhonov", "tv"):
                row["weight"] = last[0][f"eval/{problem}_{method}_weight"]
            if method.startswith("pnp"):
                row["weight"] = [r[f"eval/{problem}_pnp_weight"] for r in last]
                for key in ("steps", "max_steps", "converged"):
                    row[key] = statistics.fmean(r[f"eval/{problem}_{method}_{key}"] for r in last)
            rows.append(row)
    d, m, p, lo = config["data"], config["model"], config["pnp"], config["loss"]
    setup = {"steps": config["train"]["steps"], "batch_size": d["batch_size"], "hidden": m["hidden"], "layers": m["layers"],
             "beta": m["beta"], "alpha": m["alpha"], "noise": d["noise"], "loss": lo["kind"],
             "gamma_start": lo["gamma_start"], "gamma_end": lo["gamma_end"], "num_val": d["num_val"],
             "num_test": d["num_test"], "blur_sigma": p["blur_sigma"], "blur_width": p["blur_width"],
             "blur_noise": p["blur_noise"], "keep": p["keep"], "inpaint_noise": p["inpaint_noise"],
             "max_steps": p["max_steps"], "solver": config["solver"]["name"], "memory": config["solver"].get("memory"),
             "rtol": config["solver"]["rtol"], "seeds": len(config["sweep"]["seed"])}
    extra = {"denoise_psnr": _mean_sd([r["eval/denoise_psnr"] for r in last])[0],
             "noisy_psnr": last[0]["eval/noisy_psnr"], "ms_per_step": _ms(members, timing), **_constraint(members)}
    return {"kind": "pnp", "setup": setup, "rows": rows, "extra": extra}


def _f(v, fmt, sd=None):
    return format_value(v, fmt, sd, hide_zero_sd=True)


def markdown(result: dict) -> str:
    return (_markdown_laplacian if result["kind"] == "laplacian" else _markdown_pnp)(result)


def _markdown_laplacian(result: dict) -> str:
    s = result["setup"]
    head = (f"x ~ Laplace(0, {s['scale']:g}), y = x + {s['noise']:g}·N(0, 1); ICNN {s['layers']} × {s['hidden']}, softplus "
            f"β = {s['beta']:g}; {s['steps']} steps; proximal matching: L1 for {100 * s['pretrain_fraction']:.0f} % of the "
            f"steps, then γ = {s['gamma_start']:g} → {s['gamma_end']:g} in {s['gamma_stages']} stages; prior by "
            f"{s['solver']} on f(y) = x; {s['seeds']} seed(s)" + (f"; {result['note']}" if result.get("note") else ""))
    lines = [head, "",
             "| variant | batch | sup \\|f − soft\\| on [−4, 4] (at y) | same, \\|\\|y\\| − 1\\| > 0.25 | sup \\|f − MMSE\\| "
             "| sup \\|f − c*_γ\\| (γ-optimum's own error) | f(0.5) | sup \\|R − R(0) − \\|x\\|\\| on [−2, 2] "
             "| inversion steps (converged) | min w after projection, every step (before) | clipped / step "
             "| ms / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        at = ", ".join(f"{a:+.2f}" for a in r["soft_sup_error_at"])
        opt = (f"{r['optimum_sup_error']:.3f} ({r['optimum_soft_sup_error']:.3f} at γ = {r['gamma_end']:g})"
               if r["gamma_end"] is not None else "—")
        lines.append(
            f"| {r['variant']} | {r['batch_size']} | {_f(r['soft_sup_error'], '.3f', r['soft_sup_error_sd'])} ({at}) "
            f"| {_f(r['soft_sup_error_off_kinks'], '.3f', r['soft_sup_error_off_kinks_sd'])} "
            f"| {_f(r['mmse_sup_error'], '.3f', r['mmse_sup_error_sd'])} | {opt} "
            f"| {_f(r['f_half'], '.3f', r['f_half_sd'])} | {_f(r['prior_sup_error'], '.3f', r['prior_sup_error_sd'])} "
            f"| {_f(r['prior_steps'], '.1f')} ({100 * r['prior_converged']:.0f} %) "
            f"| {r['min_weight_ever']:.3g} ({r['min_raw_weight_ever']:.2g}) | {r['clipped_per_step']:.1f} "
            f"| {_f(r['ms_per_step'], '.2f')} |")
    return "\n".join(lines)


def _markdown_pnp(result: dict) -> str:
    s, x = result["setup"], result["extra"]
    head = (f"Dense LPN {s['layers']} × {s['hidden']} (β = {s['beta']:g}, α = {s['alpha']:g}) trained {s['steps']} steps "
            f"({s['loss']}, γ = {s['gamma_start']:g} → {s['gamma_end']:g}) at noise {s['noise']:g}: denoising "
            f"{x['noisy_psnr']:.2f} → {x['denoise_psnr']:.2f} dB; {s['num_test']} test digits (weights chosen on "
            f"{s['num_val']} others); deblur: Gaussian σ = {s['blur_sigma']:g} ({s['blur_width']}×{s['blur_width']}), "
            f"noise {s['blur_noise']:g}; inpaint: {100 * s['keep']:.0f} % of pixels kept, noise {s['inpaint_noise']:g}; "
            f"PnP fixed point to rtol {s['rtol']:g}, at most {s['max_steps']} steps, Anderson memory {s['memory']}; "
            f"min constrained weight after projection over every step {x['min_weight_ever']:.3g} (before "
            f"{x['min_raw_weight_ever']:.2g}); {_f(x['ms_per_step'], '.2f')} ms / training step; {s['seeds']} seed(s)"
            + (f"; {result['note']}" if result.get("note") else ""))
    lines = [head, "",
             "| problem | method | test PSNR (dB) | weight (validation) | fixed-point steps, mean (max) | converged |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        w = r.get("weight")
        if isinstance(w, list):
            w = "w = " + ", ".join(f"{v:g}" for v in w) + " × MAP"
        elif w is not None:
            w = f"λ = {w:g}"
        steps = f"{r['steps']:.1f} ({r['max_steps']:.0f})" if "steps" in r else "—"
        conv = f"{100 * r['converged']:.0f} %" if "converged" in r else "—"
        lines.append(f"| {r['problem']} | {r['label']} | {_f(r['psnr'], '.2f', r['psnr_sd'])} | {w or '—'} | {steps} | {conv} |")
    return "\n".join(lines)


def figure(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if result["kind"] == "laplacian":
        import sys

        sys.path.insert(0, str(HERE.parents[1]))
        from fpx.experiment.tasks.lpn import _laplace_mmse

        c, s = result["curves"], result["setup"]
        y, x = np.asarray(c["y"]), np.asarray(c["x"])
        lam = s["noise"] ** 2 / s["scale"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
        a.plot(y, np.sign(y) * np.maximum(np.abs(y) - lam, 0), "k--", lw=1, label="soft(y, 1) (MAP)")
        a.plot(y, _laplace_mmse(y, scale=s["scale"], noise=s["noise"]), "k:", lw=1, label="E[x | y] (MMSE)")
        b.plot(x, lam * np.abs(x), "k--", lw=1, label="|x|")
        for variant, values in c["prox"].items():
            a.plot(y, values, lw=1.5, label=f"LPN, {variant}")
            b.plot(x, c["prior"][variant], lw=1.5, label=f"LPN, {variant}")
        a.set(title="learned prox f(y)", xlabel="y")
        b.set(title="learned prior R(x) − R(0)", xlabel="x")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    else:
        rows = result["rows"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90, gridspec_kw={"width_ratios": [3, 2]})
        problems = ["deblur", "inpaint"]
        methods = [m for m, _ in PNP_METHODS]
        width = 0.16
        for i, m in enumerate(methods):
            vals = [next(r["psnr"] for r in rows if r["problem"] == p and r["method"] == m) for p in problems]
            a.bar(np.arange(2) + (i - 2) * width, vals, width, label=dict(PNP_METHODS)[m])
        a.set(xticks=range(2), xticklabels=problems, ylabel="test PSNR (dB)", title="reconstruction")
        a.set_ylim(bottom=min(r["psnr"] for r in rows) - 2)
        a.legend(fontsize=6)
        for i, m in enumerate(("pnp_picard", "pnp_accel")):
            vals = [next(r["steps"] for r in rows if r["problem"] == p and r["method"] == m) for p in problems]
            b.bar(np.arange(2) + (i - 0.5) * 0.35, vals, 0.35, label="Picard" if m == "pnp_picard" else "Anderson")
        b.set(xticks=range(2), xticklabels=problems, ylabel="mean fixed-point steps", title="PnP-ADMM solve")
        b.legend(fontsize=7)
        for ax in (a, b):
            ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def readme_section(kind: str) -> str:
    """The committed README section of `kind` ("laplacian" or "pnp")."""
    return generated_section(README, f"lpn_{kind}_table")


def update_readme(kind: str, body: str) -> None:
    write_generated_section(README, f"lpn_{kind}_table", body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="*")
    p.add_argument("--save", action="store_true", help="store the rows in results.json, rewrite the README section and the figure")
    p.add_argument("--note", default="", help="with --save: a remark for the table's heading (date, load, machine)")
    p.add_argument("--from-results", action="store_true", help="rewrite the README sections and figures from results.json only")
    args = p.parse_args(argv)
    if args.from_results:
        results = json.loads(RESULTS.read_text())
        for kind, result in results.items():
            update_readme(kind, markdown(result))
            figure(result, HERE / f"{kind}.png")
        return 0
    if not args.run_dir:
        p.error("give a run directory, or --from-results")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for run_dir in args.run_dir:
        result = collect(run_dir)
        if args.note:
            result["note"] = args.note
        print(markdown(result) + "\n")
        if args.save:
            results[result["kind"]] = result
            update_readme(result["kind"], markdown(result))
            figure(result, HERE / f"{result['kind']}.png")
    if args.save:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
