"""The Jacobi-decoding tables: from a run directory of `configs/parallel/jacobi_decoding.py` to the README.

    python experiments/jacobi_decoding/table.py RUN_DIR                           # print the tables
    python experiments/jacobi_decoding/table.py RUN_DIR --save --note "load 12"   # + results.json and the README section
    python experiments/jacobi_decoding/table.py --from-results                    # README section from results.json only

From `metrics.jsonl` (member 0) and `config.json`: the base model is the evaluation at step
`train.ar_steps` (the end of AR training), the fine-tuned one the last evaluation. The
summary table compares the two (mean Jacobi iterations per block, first / later blocks,
forward passes per token, prompts where Jacobi differs from greedy, validation loss, the
fraction of greedy tokens repeating the previous one); the sentence under it gives the
ratio of iterations, the change of validation loss against the issue's targets (≥ 1.5×
fewer iterations, validation loss within 10 %) and the Jacobi/greedy mismatches over all
evaluations; a second table has one row per evaluation. The run note comes from the run's
files: finishing date (`summary.json`'s modification time, UTC), wall time (`config.json`,
written at the start, to `summary.json`), compilation time (`summary.json`) and the
median ms per step of the timed chunks (`timing.jsonl`; a chunk includes one evaluation);
`--note` adds what the files cannot know (machine, load). `tests/test_generated_tables.py`
checks that the README section is what `results.json` regenerates.
"""

from __future__ import annotations

import json
import pathlib

from fpx.experiment import format_minutes, format_value, generated_section, read_jsonl, run_info, table_main

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
SECTION = "jacobi_decoding_table"
TARGET_SPEEDUP, TARGET_LOSS = 1.5, 0.10
KEYS = ("iterations_per_block", "first_block_iterations", "later_block_iterations", "forward_passes_per_token",
        "mismatched_prompts", "mismatched_tokens", "val_loss", "repeat_fraction", "phase")


def collect(run_dir) -> dict:
    """`{"setup", "evaluations", "base", "tuned", "run"}` from one run directory."""
    run_dir = pathlib.Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    records = sorted((r for r in read_jsonl(run_dir / "metrics.jsonl", tolerate_partial_tail=True)
                      if r["member"] == 0 and "eval/iterations_per_block" in r), key=lambda r: r["step"])
    if not records:
        raise SystemExit(f"no evaluations of member 0 in {run_dir}")
    ar_steps = config["train"]["ar_steps"]
    evaluations = [{"step": r["step"], **{k: r.get(f"eval/{k}") for k in KEYS}} for r in records]
    base = next((e for e in evaluations if e["step"] == ar_steps), None)
    if base is None:
        raise SystemExit(f"{run_dir} has no evaluation at step train.ar_steps = {ar_steps} (the base model)")
    setup = {"steps": config["train"]["steps"], "ar_steps": ar_steps, "block_size": config["decode"]["block_size"],
             "num_tokens": config["decode"]["num_tokens"], "num_prompts": config["eval"]["num_prompts"],
             "num_params": records[-1]["eval/num_params"]}
    return {"setup": setup, "evaluations": evaluations, "base": base, "tuned": evaluations[-1], "run": run_info(run_dir)}


def markdown(result: dict) -> str:
    s, run, base, tuned = result["setup"], result["run"], result["base"], result["tuned"]
    head = (f"Run of {run['date']} ({format_minutes(run['wall_s'])} wall clock from writing `config.json` to `summary.json`, "
            f"of it {run['compile_s']:.0f} s compilation; "
            f"{run['ms_per_step']:.0f} ms per training step including the evaluations; "
            + (f"{result['note']}; " if result.get("note") else "")
            + f"jax {run['jax']}). {s['num_params']:,} parameters, {s['ar_steps']} AR + "
            f"{s['steps'] - s['ar_steps']} consistency steps, {s['num_prompts']} prompts × {s['num_tokens']} tokens:")
    lines = [head, "",
             f"| model | step | mean Jacobi iterations per {s['block_size']}-token block | first block | later blocks | "
             f"forward passes per token | prompts where Jacobi != greedy (of {s['num_prompts']}) | validation loss "
             "(nats/char) | greedy tokens repeating the previous one |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("base (AR only)", base), ("consistency fine-tuned", tuned)):
        lines.append(f"| {name} | {r['step']} | {r['iterations_per_block']:.2f} | {r['first_block_iterations']:.2f} | "
                     f"{r['later_block_iterations']:.2f} | {r['forward_passes_per_token']:.3f} | "
                     f"{r['mismatched_prompts']} | {r['val_loss']:.4f} | {format_value(r['repeat_fraction'], '.3f')} |")
    speedup = base["iterations_per_block"] / tuned["iterations_per_block"]
    change = tuned["val_loss"] / base["val_loss"] - 1
    prompts = max(e["mismatched_prompts"] for e in result["evaluations"])
    tokens = sum(e["mismatched_tokens"] or 0 for e in result["evaluations"])
    agreement = (f"Jacobi output equal to greedy output on all {s['num_prompts']} prompts at every evaluation "
                 "(0 mismatched tokens)." if prompts == 0 else
                 f"Jacobi output differs from greedy output on up to {prompts} of {s['num_prompts']} prompts "
                 f"({tokens} mismatched tokens over all evaluations).")
    lines += ["",
              f"Iterations per block **{speedup:.2f}× fewer** after fine-tuning (target ≥ {TARGET_SPEEDUP}×: "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'missed'}); validation loss **{100 * change:+.1f} %** (target "
              f"within {100 * TARGET_LOSS:.0f} %: {'met' if change <= TARGET_LOSS else 'missed'}); {agreement}",
              "",
              "Every evaluation:",
              "",
              "| step | phase | iterations / block (all, first, later blocks) | forward passes / token | val loss "
              "| repeating tokens | Jacobi ≠ greedy (prompts) |",
              "|---|---|---|---|---|---|---|"]
    for e in result["evaluations"]:
        lines.append(f"| {e['step']} | {'consistency' if e['phase'] else 'AR'} | {e['iterations_per_block']:.2f} "
                     f"({e['first_block_iterations']:.2f}, {e['later_block_iterations']:.2f}) | "
                     f"{e['forward_passes_per_token']:.3f} | {e['val_loss']:.4f} | {format_value(e['repeat_fraction'], '.3f')} | "
                     f"{e['mismatched_prompts']} |")
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `jacobi_decoding_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        note_help="with --save: a remark for the run note (machine, load)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
