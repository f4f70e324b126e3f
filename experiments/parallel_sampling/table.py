"""The parallel-sampling table: from a run directory of `configs/parallel/parallel_sampling.py` to the README.

    python experiments/parallel_sampling/table.py RUN_DIR                           # print the table
    python experiments/parallel_sampling/table.py RUN_DIR --save --note "load 12"   # + results.json and the README section
    python experiments/parallel_sampling/table.py --from-results                    # README section from results.json only

From the last evaluation of member 0 in `metrics.jsonl` (the sampler settings of
`config.json`'s `sampling` section): per sampler (eta), tolerance and length T, the Picard
sampler's parallel rounds against the T sequential steps, the denoiser evaluations per step
and the largest deviation of its samples from the sequential DDIM/DDPM samples; the
denoiser's test loss and the nearest-training-image distances. The run note is read from
the run's files too: the finishing date (`summary.json`'s modification time, UTC), the wall
time (from `config.json`, written when the run starts, to `summary.json`), the compilation
time (`summary.json`) and the median ms per training chunk step (`timing.jsonl`; a chunk is
`train.eval_every` steps plus one evaluation, so the figure includes the sampling
evaluation amortised over those steps); `--note` adds what the files cannot know (machine,
load). `tests/test_generated_tables.py` checks that the README section is what
`results.json` regenerates.
"""

from __future__ import annotations

import json
import pathlib

from fpx.experiment import format_minutes, generated_section, read_jsonl, run_info, table_main

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
SECTION = "parallel_sampling_table"


def _tag(value) -> str:
    return f"{value:g}"  # as fpx.experiment.tasks.parallel_sampling.tag names the metrics


def collect(run_dir) -> dict:
    """`{"setup", "rows", "denoiser", "run"}` from one run directory."""
    run_dir = pathlib.Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl", tolerate_partial_tail=True) if r["member"] == 0]
    if not records:
        raise SystemExit(f"no metrics of member 0 in {run_dir}")
    last = max(records, key=lambda r: r["step"])
    s = config["sampling"]
    rows = []
    for eta in sorted(s["etas"]):
        for tol in sorted(s["tols"]):
            for T in sorted(s["steps"]):
                p = f"eval/T{T}_tol{_tag(tol)}_eta{_tag(eta)}_"
                rows.append({"eta": eta, "tol": tol, "T": T, "rounds": last[p + "rounds"],
                             "max_rounds": last[p + "max_rounds"], "speedup": last[p + "speedup"],
                             "evals_ratio": last[p + "evals_ratio"], "max_dev": last[p + "max_dev"],
                             "converged": last[p + "converged"]})
    setup = {"train_steps": config["train"]["steps"], "step": last["step"], "num_samples": s["num_samples"],
             "window": s["window"], "width": config["model"]["width"], "depth": config["model"]["depth"]}
    denoiser = {"test_loss": last["eval/test_loss"], "nn_dist_samples": last.get("eval/nn_dist_samples"),
                "nn_dist_test": last["eval/nn_dist_test"]}
    return {"setup": setup, "rows": rows, "denoiser": denoiser, "run": run_info(run_dir)}


def markdown(result: dict) -> str:
    s, run, d = result["setup"], result["run"], result["denoiser"]
    head = (f"Run of {run['date']} ({format_minutes(run['wall_s'])} wall clock from writing `config.json` to `summary.json`, "
            f"of it {run['compile_s']:.0f} s compilation; "
            f"{run['ms_per_step']:.0f} ms per training step including the evaluations; "
            + (f"{result['note']}; " if result.get("note") else "")
            + f"jax {run['jax']}). Step {s['step']} of {s['train_steps']}, denoiser MLP width {s['width']} × {s['depth']}, "
            f"{s['num_samples']} samples per setting, window {s['window']}:")
    lines = [head, "",
             "| sampler | T | tol | parallel rounds (mean / max) | sequential / parallel | evaluations / T | max deviation | converged |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sampler = "DDIM (ODE, η=0)" if r["eta"] == 0 else f"DDPM (SDE, η={_tag(r['eta'])})"
        lines.append(f"| {sampler} | {r['T']} | {_tag(r['tol'])} | {r['rounds']:.1f} / {r['max_rounds']:.0f} | "
                     f"{r['speedup']:.2f}× | {r['evals_ratio']:.2f} | {r['max_dev']:.2e} | {r['converged']:.0%} |")
    lines.append("")
    near = f"{d['nn_dist_samples']:.2f}" if d["nn_dist_samples"] is not None else "—"
    lines.append(f"Denoiser test loss {d['test_loss']:.4f}; mean nearest-training-image distance of the "
                 f"samples {near} (of test images: {d['nn_dist_test']:.2f}).")
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `parallel_sampling_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        note_help="with --save: a remark for the run note (machine, load)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
