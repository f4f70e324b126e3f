"""The SubDEQ table: from a run directory of `configs/subdeq/subdeq.py` to the README.

    python experiments/subdeq/table.py RUN_DIR                              # print the table
    python experiments/subdeq/table.py RUN_DIR --save --note "load 1.2"     # + results.json, curves.png, the README section
    python experiments/subdeq/table.py --from-results                       # README section from results.json only

Per variant (`hparams.variant`; mean ± sd over its seeds, at the last evaluation): parameter
count (`eval/params`, measured on the model) and its difference to the SubDEQ model of the
same dataset, test accuracy, forward solver steps per solve at evaluation (the configured
solver, Anderson in `:default`) and Picard steps to the same tolerance, the smallest
fraction of converged forward solves over every training step and evaluation of the run,
and the contraction factor `κ` that certifies existence and uniqueness of the fixed point:
for SubDEQ the Thompson-metric bound of `subhomogeneity_certificate` (largest over test
inputs and seeds), its exact value at the fixed point (`κ*`, a lower bound on any such
certificate) and the fraction of test inputs with `κ < 1`; for the contractive cells the
Banach factor in the 2-norm (`|W|_2`, or `1 - alpha` on the graph). `tests/test_subdeq.py`
checks that the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import pathlib
import statistics

from fpx.experiment import by_variant, format_value, generated_section, mean_sd, member_histories, read_run, table_main

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
PLOT = HERE / "curves.png"
SECTION = "subdeq_table"
MODEL = {
    ("subdeq", "max"): "SubDEQ, max-normalised",
    ("subdeq", "none"): "SubDEQ, plain shifted tanh",
    ("contractive", None): "contractive DEQ",
    ("mlp", None): "MLP (explicit)",
    ("gnn", None): "GCN, 2 layers (explicit)",
}


def _setting(config: dict, variant: str, path: str):
    """The value of `path` (dotted) for `variant`: the variant's override, else the config's."""
    spec, base = config["variants"].get(variant, {}), config
    for key in path.split("."):
        spec = spec.get(key, {}) if isinstance(spec, dict) else {}
        base = base[key]
    return spec if not isinstance(spec, dict) else base


def _describe(config: dict, variant: str) -> str:
    kind = _setting(config, variant, "model.kind")
    if kind != "subdeq":
        return MODEL[(kind, None)]
    text = MODEL[(kind, _setting(config, variant, "model.normalize"))] + f", shift {_setting(config, variant, 'model.shift')}"
    if _setting(config, variant, "model.certify"):
        text += f", W constrained to κ ≤ {_setting(config, variant, 'model.certify')}"
    return text


def collect(run_dir) -> dict:
    """`{"setup": {...}, "rows": [...]}` from one run directory."""
    config, records = read_run(run_dir)
    rows = []
    for variant, members in by_variant(member_histories(records), config.get("variant_order") or config["variants"]).items():
        last = [rs[-1] for rs in members]

        def values(key, last=last):
            return [r[key] for r in last if key in r] or None

        def mean(key):
            v = values(key)
            return statistics.fmean(v) if v else None

        implicit = "eval/forward_steps" in last[0]
        converged = [r[k] for rs in members for r in rs for k in ("eval/converged_fraction", "train/converged_fraction") if k in r]
        accuracy_mean, accuracy_sd = mean_sd(values("eval/accuracy"))
        kind = _setting(config, variant, "model.kind")
        rows.append({
            "variant": variant,
            "data": _setting(config, variant, "data.name"),
            "model": _describe(config, variant),
            "kind": kind,
            "seeds": len(last),
            "step": min(r["step"] for r in last),
            "params": mean("eval/params"),
            "accuracy_mean": accuracy_mean,
            "accuracy_sd": accuracy_sd,
            "forward_steps": mean("eval/forward_steps") if implicit else None,
            "picard_steps": mean("eval/picard_steps") if implicit else None,
            "converged_min": min(converged) if converged else None,
            "kappa_max": max(values("eval/kappa_max")) if implicit else None,
            "kappa_local_max": max(values("eval/kappa_local_max")) if implicit else None,
            "certified_fraction": min(values("eval/certified_fraction")) if implicit else None,
        })
    reference = {r["data"]: r["params"] for r in rows if r["kind"] == "subdeq"}
    for r in rows:
        ref = reference.get(r["data"])
        r["params_delta"] = (r["params"] - ref) / ref if ref else None
    setup = {
        "steps": config["train"]["steps"],
        "seeds": len(config["sweep"]["seed"]),
        "solver": config["solver"]["name"],
        "rtol": config["solver"]["rtol"],
        "max_steps": config["max_steps"],
    }
    return {"setup": setup, "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    head = (f"{s['steps']} training steps, {s['seeds']} seeds, forward solver {s['solver']} to rtol {s['rtol']:g} "
            f"(at most {s['max_steps']} steps)" + (f"; {result['note']}" if result.get("note") else ""))
    lines = [head, "",
             "| variant | model | params (vs SubDEQ) | test accuracy (mean ± sd) | forward steps | Picard steps "
             "| converged (min) | κ bound (max) | κ* at the fixed point | inputs with κ < 1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        delta = "" if r["params_delta"] is None else f" ({100 * r['params_delta']:+.1f} %)"
        kappa = format_value(r["kappa_max"], ".3g")
        if r["kind"] == "contractive":
            kappa += " (2-norm)"
        elif r["kappa_max"] is not None:
            kappa += " (Thompson)"
        certified = "—" if r["certified_fraction"] is None else f"{100 * r['certified_fraction']:.0f} %"
        converged = "—" if r["converged_min"] is None else f"{100 * r['converged_min']:.1f} %"
        lines.append(
            f"| {r['variant']} | {r['model']} | {r['params']:.0f}{delta} | "
            f"{format_value(r['accuracy_mean'], '.1f', r['accuracy_sd'], scale=100)} % | "
            f"{format_value(r['forward_steps'], '.1f')} | {format_value(r['picard_steps'], '.1f')} | {converged} | {kappa} | "
            f"{format_value(r['kappa_local_max'], '.3g')} | {certified} |"
        )
    return "\n".join(lines)


def plot(run_dir, path=PLOT) -> None:
    """Test accuracy and Picard steps over training, mean over seeds, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, records = read_run(run_dir)
    curves: dict[str, dict[int, list[dict]]] = {}
    for r in records:
        curves.setdefault(r["hparams"]["variant"], {}).setdefault(r["step"], []).append(r)
    datasets = sorted({_setting(config, v, "data.name") for v in curves})
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.2 * len(datasets), 5.6), squeeze=False, sharex="col")
    for col, data in enumerate(datasets):
        for variant, by_step in curves.items():
            if _setting(config, variant, "data.name") != data:
                continue
            steps = sorted(by_step)
            acc = [statistics.fmean(r["eval/accuracy"] for r in by_step[s]) for s in steps]
            axes[0, col].plot(steps, acc, marker=".", label=variant)
            if "eval/picard_steps" in by_step[steps[0]][0]:
                pic = [statistics.fmean(r["eval/picard_steps"] for r in by_step[s]) for s in steps]
                axes[1, col].plot(steps, pic, marker=".", label=variant)
        axes[0, col].set_title(data)
        axes[0, col].set_ylabel("test accuracy")
        axes[1, col].set_ylabel("Picard steps to tolerance")
        axes[1, col].set_xlabel("training step")
        axes[0, col].legend(fontsize=7)
        axes[1, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def readme_section() -> str:
    """The committed README section (between the `subdeq_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        after_save=lambda result, run_dir: plot(run_dir), allow_nan=False,
        save_help="store the rows in results.json, draw curves.png, rewrite the README section",
    )


if __name__ == "__main__":
    raise SystemExit(main())
