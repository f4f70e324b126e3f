"""The README table of a `jacobi_decoding` run: `python experiments/jacobi_decoding/table.py RUN_DIR`.

Reads the run's `metrics.jsonl` (member 0) and prints one row per evaluation: phase (AR
training, then consistency fine-tuning), mean Jacobi iterations per 16-token block, forward
passes per token, validation loss and the prompts whose Jacobi output differs from greedy.
"""

import json
import pathlib
import sys


def table(run_dir) -> str:
    records = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = sorted((r for r in records if r.get("member", 0) == 0 and "eval/iterations_per_block" in r), key=lambda r: r["step"])
    lines = ["| step | phase | iterations / block (all, first, later blocks) | forward passes / token | val loss | Jacobi ≠ greedy (prompts) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        phase = "consistency" if r["eval/phase"] else "AR"
        lines.append(f"| {r['step']} | {phase} | {r['eval/iterations_per_block']:.2f} ({r['eval/first_block_iterations']:.2f}, "
                     f"{r['eval/later_block_iterations']:.2f}) | {r['eval/forward_passes_per_token']:.3f} | "
                     f"{r['eval/val_loss']:.3f} | {r['eval/mismatched_prompts']} |")
    base = max((r for r in rows if not r["eval/phase"]), key=lambda r: r["step"])
    tuned = rows[-1]
    lines.append("")
    lines.append(f"Parameters: {rows[-1]['eval/num_params']:,}. Before → after fine-tuning: "
                 f"{base['eval/iterations_per_block']:.2f} → {tuned['eval/iterations_per_block']:.2f} iterations per block "
                 f"({base['eval/iterations_per_block'] / tuned['eval/iterations_per_block']:.2f}× fewer), validation loss "
                 f"{base['eval/val_loss']:.3f} → {tuned['eval/val_loss']:.3f} "
                 f"({100 * (tuned['eval/val_loss'] / base['eval/val_loss'] - 1):+.0f} %).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
