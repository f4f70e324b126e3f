"""`fpx run | report | list`: the command line of fpx experiments."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

EXAMPLES_RUN = """examples:
  fpx run configs/quickstart.py:quick
  fpx run configs/quickstart.py --config.sweep.lr='[1e-3,3e-3]' --config.train.steps=200
  fpx run configs/deq/digits.py:quick --config.solver.name=picard --workdir runs/picard
  fpx run configs/quickstart.py --sweep_shard=0/4 --workdir runs/sweep   # slice 0 of 4
  fpx run configs/quickstart.py --launcher=submitit --shards=4 --slurm.partition=gpu
"""


def _split_overrides(extra: list[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    config, slurm, unknown = {}, {}, []
    for item in extra:
        if item.startswith("--config.") or item.startswith("--slurm."):
            key, sep, value = item[2:].partition("=")
            if not sep:
                unknown.append(item)
                continue
            section, _, path = key.partition(".")
            (config if section == "config" else slurm)[path] = value
        else:
            unknown.append(item)
    return config, slurm, unknown


def _maybe_initialize_distributed() -> None:
    """Multi-host runs: start jax.distributed when a cluster environment says so."""
    import jax

    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_ARRAY_TASK_ID" not in os.environ
    if "JAX_COORDINATOR_ADDRESS" in os.environ or multi_slurm:
        jax.distributed.initialize()


def _run_shard(spec, overrides, workdir, shard, sweep_chunk):
    from .experiment import run

    return run(spec, overrides, workdir=workdir, sweep_shard=shard, sweep_chunk=sweep_chunk, progress=False)


def cmd_run(args, overrides, slurm) -> int:
    from .experiment import report, resolve_config, run

    resolve_config(args.config, overrides)  # fail fast, before anything is submitted or trained
    if args.launcher == "submitit":
        try:
            import submitit
        except ImportError:
            print("--launcher=submitit needs the optional extra: pip install 'fpx[cluster]'", file=sys.stderr)
            return 2
        workdir = pathlib.Path(args.workdir or "runs/sweep")
        executor = submitit.AutoExecutor(folder=str(workdir / "submitit"), cluster=args.submitit_cluster)
        params = {f"slurm_{k}": _literal(v) for k, v in slurm.items()}
        executor.update_parameters(timeout_min=args.timeout_min, **params)
        shards = [f"{i}/{args.shards}" for i in range(args.shards)]
        jobs = executor.map_array(
            _run_shard, [args.config] * args.shards, [overrides] * args.shards, [str(workdir)] * args.shards, shards,
            [args.sweep_chunk] * args.shards,
        )
        print(f"submitted {len(jobs)} shards: {', '.join(j.job_id for j in jobs)}")
        if args.wait:
            for job in jobs:
                job.result()
            print(report([workdir]))
        return 0
    _maybe_initialize_distributed()
    summary = run(
        args.config, overrides, workdir=args.workdir, sweep_shard=args.sweep_shard, sweep_chunk=args.sweep_chunk,
        progress=False if args.quiet else (True if args.progress else None), resume_from=args.resume_from,
    )
    from .experiment import collect, markdown_table

    collection = collect([summary["workdir"]])
    print(markdown_table(collection.rows, headline=collection.headline))
    if summary.get("ms_per_step"):
        print(f"\n{summary['ms_per_step']:.1f} ms per (vmapped) training step; compile {summary['compile_s']:.1f} s")
    print(f"run directory: {summary['workdir']} (metrics.jsonl, summary.json, plots/)")
    return 0


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def cmd_report(args) -> int:
    from .experiment import report

    import warnings

    from .experiment import ReportWarning

    with warnings.catch_warnings(record=True) as caught:  # shown once, below, not twice
        warnings.simplefilter("always", ReportWarning)
        print(report(args.dirs, out=args.out, strict=args.strict))
    for w in caught:
        print(f"fpx: warning: {w.message}", file=sys.stderr)
    print(f"\nwrote {pathlib.Path(args.out or args.dirs[0]) / 'report.md'} and plots/")
    return 0


def cmd_list(args) -> int:
    from .experiment import config_module

    root = pathlib.Path(args.root)
    files = sorted(p for p in root.rglob("*.py") if not p.name.startswith("_"))
    if not files:
        print(f"no configs under {root}/")
        return 1
    for p in files:
        try:
            module = config_module(p)
        except Exception as e:  # noqa: BLE001  (list the others; name the broken one)
            print(f"{str(p):<32} (cannot be imported: {type(e).__name__}: {e})")
            continue
        presets = getattr(module, "PRESETS", ())
        doc = (module.__doc__ or "").strip().splitlines()
        print(f"{str(p):<32} {(':' + '|'.join(presets)) if presets else '':<22} {doc[0] if doc else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fpx", description="fpx experiments: run configs, sweep, report.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser(
        "run", help="train/evaluate a config (and its sweep)", epilog=EXAMPLES_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run CONFIG[:preset]. Override any key with --config.key=value (Python literals); "
        "sweep with --config.sweep.key='[v1,v2]'.",
    )
    p_run.add_argument("config", help="path/to/config.py[:preset]")
    p_run.add_argument("--workdir", help="run directory (default runs/<name>/<timestamp>); an existing one is resumed")
    p_run.add_argument("--sweep_shard", help="i/n: run only slice i of n of the sweep")
    p_run.add_argument("--sweep_chunk", type=int, help="train k sweep members at a time (memory guard)")
    p_run.add_argument("--progress", action="store_true", help="a progress bar even when not on a terminal (default there: a line per evaluation)")
    p_run.add_argument("--quiet", action="store_true", help="no progress output")
    p_run.add_argument(
        "--resume_from", choices=["latest", "previous", "scratch"], default="latest",
        help="on an existing workdir: the newest checkpoint (default; a corrupt one is refused), the newest "
        "intact one (previous), or none (scratch: discard earlier metrics and checkpoints)",
    )
    p_run.add_argument("--launcher", choices=["local", "submitit"], default="local")
    p_run.add_argument("--shards", type=int, default=1, help="with --launcher=submitit: number of array tasks")
    p_run.add_argument("--submitit_cluster", default=None, help="submitit cluster: None (auto: slurm if available), 'local', 'debug'")
    p_run.add_argument("--timeout_min", type=int, default=60)
    p_run.add_argument("--wait", action="store_true", help="with submitit: wait for the shards, then print the report")
    p_rep = sub.add_parser("report", help="merge run directories (and sweep shards) into a table and plots")
    p_rep.add_argument("dirs", nargs="+")
    p_rep.add_argument("--out", help="where to write report.md and plots/ (default: the first dir)")
    p_rep.add_argument("--strict", action="store_true", help="a missing shard or a partial run is an error (exit 2), not a warning")
    p_list = sub.add_parser("list", help="list the experiment configs")
    p_list.add_argument("--root", default="configs")
    for p in (p_run, p_rep, p_list):
        p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    args, extra = parser.parse_known_args(argv)
    overrides, slurm, unknown = _split_overrides(extra)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config overrides look like --config.key=value)")
    from .experiment import ConfigError, RunDirectoryError

    try:
        if args.command == "run":
            return cmd_run(args, overrides, slurm)
        if args.command == "report":
            return cmd_report(args)
        return cmd_list(args)
    except (ConfigError, RunDirectoryError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"fpx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("fpx: interrupted; run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
