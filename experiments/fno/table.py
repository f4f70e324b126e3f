"""The FNO-Burgers table: from a run directory of `configs/fno/burgers.py` to the README.

    python experiments/fno/table.py RUN_DIR                           # print the table
    python experiments/fno/table.py RUN_DIR --save --note "load 12"   # + results.json and the README section
    python experiments/fno/table.py --from-results                    # README section from results.json only

From `metrics.jsonl` (member 0) and `config.json`: the train, test (s = `data.s`) and
zero-shot (s = `data.eval_s`) mean relative L2 errors of the last evaluation, their ratio,
the issue's targets (test ≤ 0.025, zero-shot within 10 % of the test error), the test error
at the evaluation nearest epoch 120 (for the README's comparison with a reference run), and
from the run's files the wall time (`config.json`, written when training starts, after the
data are generated or read from the cache, to `summary.json`), the compilation time
(`summary.json`), the median ms per step of the timed chunks (`timing.jsonl`; a chunk is
`train.eval_every` steps plus one evaluation) and the finishing date (`summary.json`'s
modification time, UTC). `--preset` names the row (the run directory does not record the
preset); `--note` adds what the files cannot know (machine, load, data generation time).
`tests/test_generated_tables.py` checks that the README section is what `results.json`
regenerates.
"""

from __future__ import annotations

import json
import pathlib

from fpx.experiment import format_minutes, generated_section, read_jsonl, run_info, table_main

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results.json"
SECTION = "fno_table"
TARGET_TEST, TARGET_ZERO_SHOT = 0.025, 0.10
COMPARE_EPOCH = 120


def collect(run_dir, preset: str = "default") -> dict:
    """`{"setup", "row", "run"}` from one run directory; `preset` names the row."""
    run_dir = pathlib.Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    records = sorted((r for r in read_jsonl(run_dir / "metrics.jsonl", tolerate_partial_tail=True)
                      if r["member"] == 0 and "eval/test_rel_l2" in r), key=lambda r: r["step"])
    if not records:
        raise SystemExit(f"no evaluations of member 0 in {run_dir}")
    last = records[-1]
    near = min(records, key=lambda r: abs(r["eval/epoch"] - COMPARE_EPOCH))
    d = config["data"]
    setup = {"n_train": d["n_train"], "n_test": d["n_test"], "s": d["s"], "eval_s": d["eval_s"],
             "width": config["model"]["width"], "modes": config["model"]["modes"], "schedule": config["schedule"]["name"]}
    row = {"preset": preset, "step": last["step"], "epochs": last["eval/epoch"], "train_rel_l2": last["eval/train_rel_l2"],
           "test_rel_l2": last["eval/test_rel_l2"], "zero_shot_rel_l2": last["eval/zero_shot_rel_l2"],
           "zero_shot_ratio": last["eval/zero_shot_ratio"],
           "max_zero_shot_deviation": max(abs(r["eval/zero_shot_ratio"] - 1) for r in records),
           "compare_epoch": near["eval/epoch"], "compare_test_rel_l2": near["eval/test_rel_l2"]}
    return {"setup": setup, "row": row, "run": run_info(run_dir)}


def markdown(result: dict) -> str:
    s, r, run = result["setup"], result["row"], result["run"]
    head = (f"Run of {run['date']} (`:{r['preset']}`; " + (f"{result['note']}; " if result.get("note") else "")
            + f"jax {run['jax']} on CPU). {s['n_train']} train / {s['n_test']} test functions, width {s['width']}, "
            f"{s['modes']} modes, {s['schedule']} schedule:")
    ratio = r["zero_shot_ratio"]
    lines = [head, "",
             f"| preset | epochs | train rel. L2 | test rel. L2 (s = {s['s']}) | zero-shot test rel. L2 (s = {s['eval_s']}) "
             f"| zero-shot / s = {s['s']} | training wall time (`config.json` → `summary.json`) | ms / step (median) |",
             "|---|---|---|---|---|---|---|---|",
             f"| {r['preset']} | {r['epochs']:.0f} | {r['train_rel_l2']:.4f} | **{r['test_rel_l2']:.4f}** | "
             f"**{r['zero_shot_rel_l2']:.4f}** | {ratio:.4f} | {format_minutes(run['wall_s'])} (compile {run['compile_s']:.0f} s) | "
             f"{run['ms_per_step']:.1f} |",
             "",
             f"Issue targets: test relative L2 ≤ {TARGET_TEST} — **{'met' if r['test_rel_l2'] <= TARGET_TEST else 'missed'}** "
             f"({r['test_rel_l2']:.4f}); zero-shot error at s = {s['eval_s']} within {100 * TARGET_ZERO_SHOT:.0f} % of the "
             f"s = {s['s']} error — **{'met' if abs(ratio - 1) <= TARGET_ZERO_SHOT else 'missed'}** ({100 * (ratio - 1):+.2f} %; "
             f"at most {100 * r['max_zero_shot_deviation']:.2f} % apart at any evaluation). Test rel. L2 at epoch "
             f"{r['compare_epoch']:.0f}: {r['compare_test_rel_l2']:.4f}."]
    return "\n".join(lines)


def readme_section() -> str:
    """The committed README section (between the `fno_table` markers)."""
    return generated_section(README, SECTION)


def main(argv=None) -> int:
    return table_main(
        argv, doc=__doc__, collect=collect, markdown=markdown, readme=README, section=SECTION, results=RESULTS,
        options={"--preset": {"default": "default", "help": "the preset the run was started with (names the row)"}},
        save_help="store the row in results.json and rewrite the README section",
        note_help="with --save: a remark for the run note (machine, load)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
