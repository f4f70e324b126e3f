"""Merge run directories (and sweep shards) into results tables and plots.

`fpx report DIR ...` reads each run directory, or the `shard-i-of-n/` slices of a sharded
sweep, and prints up to three tables: one row per sweep member; mean ± sd over the seeds
of each variant / hyperparameter group (the figures the experiment READMEs quote); and ms
per training step once per compiled group (its members train together in one vmapped
program, so the time is the group's, not a member's).

Nothing is dropped silently: a directory that does not exist, is empty or holds a
half-written file is a `RunDirectoryError`; a missing shard or an interrupted run (no
`summary.json`; it is summarised from `metrics.jsonl` and its members marked `partial`) is
a loud warning listed at the top of the report, or an error with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ._rundir import RunDirectoryError, ends_mid_line, read_json, read_jsonl

REPORT_COLUMNS = (
    "eval/accuracy",
    "eval/loss",
    "train/loss",
    "train/forward_steps",
    "train/backward_steps",
    "eval/converged_fraction",
    "ms_per_step",
)
# A cell with nothing to show: the key is not in that member's config, or it does not report the metric.
MISSING = "—"
_SHARD = re.compile(r"shard-(\d+)-of-(\d+)")


class ReportWarning(UserWarning):
    """A run directory is incomplete (a missing shard, an interrupted run); the report covers the rest.

    ```python
    import json, pathlib, tempfile, warnings
    from fpx.experiment import ReportWarning, report
    run = pathlib.Path(tempfile.mkdtemp())
    (run / "config.json").write_text(json.dumps({"name": "demo", "train": {"steps": 20}}))
    (run / "metrics.jsonl").write_text(json.dumps({"unit": 0, "member": 0, "step": 10,
        "hparams": {"seed": 0}, "train/loss": 0.5}) + "\\n")    # a run killed at step 10 of 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report([run])
    assert any(issubclass(w.category, ReportWarning) for w in caught)
    ```
    """


def is_replicate_key(key: str) -> bool:
    """Seed-like sweep keys (`seed`, `data.split_seed`): replicates of one configuration,
    averaged over in the aggregated table rather than told apart."""
    return key.rsplit(".", 1)[-1].endswith("seed")


@dataclasses.dataclass
class Collection:
    """What `collect` read from the run directories."""

    rows: list[dict]  # one per member: run, member, unit, hparams (defaults filled in), status, step, metrics
    records: list[dict]  # the metrics.jsonl records, each with its "run"
    headline: tuple[str, ...]  # the tasks' headline metrics (`build_<task>.headline`)
    problems: list[str]  # missing shards, partial runs: warnings, or errors with strict=True


# ------------------------------------------------------------------ discovery


def _discover(
    paths: Sequence[str | pathlib.Path],
) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[tuple[pathlib.Path, int, int]], list[str]]:
    """([(given path, run directory)], [(given path, i, n) of missing shards], problems)."""
    found, missing, problems = [], [], []
    for p in map(pathlib.Path, paths):
        if not p.exists():
            raise RunDirectoryError(f"{p} does not exist.")
        if not p.is_dir():
            raise RunDirectoryError(f"{p} is not a directory (a run directory holds config.json, metrics.jsonl, summary.json).")
        shards = {}
        for s in p.iterdir():
            m = _SHARD.fullmatch(s.name)
            if m and s.is_dir():
                shards[(int(m[1]), int(m[2]))] = s
        is_run = any((p / f).exists() for f in ("config.json", "metrics.jsonl", "summary.json"))
        if not is_run and not shards:
            what = "it is empty" if not any(p.iterdir()) else "it has no config.json, metrics.jsonl, summary.json or shard-i-of-n/"
            raise RunDirectoryError(f"{p} is not an fpx run directory: {what}.")
        if is_run:
            found.append((p, p))
        counts = sorted({n for _, n in shards})
        if len(counts) > 1:
            problems.append(
                f"{p} mixes the shards of {' and '.join(map(str, counts))}-way slicings (shard-i-of-n with different n): "
                "members may appear twice; report the shards of one sweep."
            )
        for n in counts:
            missing.extend((p, i, n) for i in range(n) if (i, n) not in shards)
        for key in sorted(shards, key=lambda k: (k[1], k[0])):
            if (shards[key] / "config.json").exists():
                found.append((p, shards[key]))
            else:  # the slice never started (or died before writing anything)
                missing.append((p, *key))
    return found, missing, problems


def _raise_or_warn(problems: list[str], strict: bool) -> None:
    if not problems:
        return
    if strict:
        raise RunDirectoryError("incomplete runs (strict): " + "; ".join(problems))
    for problem in problems:
        warnings.warn(problem, ReportWarning, stacklevel=3)


def run_dirs(paths: Sequence[str | pathlib.Path], *, strict: bool = False) -> list[pathlib.Path]:
    """The run directories under `paths`: each path itself, or its `shard-i-of-n/` slices.

    A path that does not exist or is no run directory is a `RunDirectoryError`; a missing
    shard (`n` says how many there should be) is a `ReportWarning`, or an error with `strict`.

    ```python
    import pathlib, tempfile
    from fpx.experiment._report import run_dirs
    from fpx.experiment._rundir import RunDirectoryError
    sweep = pathlib.Path(tempfile.mkdtemp())
    (sweep / "shard-0-of-2").mkdir()
    (sweep / "shard-0-of-2" / "config.json").write_text("{}")
    try:
        run_dirs([sweep], strict=True)
    except RunDirectoryError as e:
        assert "shard-1-of-2" in str(e)
    ```
    """
    found, missing, problems = _discover(paths)
    problems += [f"{p / f'shard-{i}-of-{n}'} is missing: its slice of the sweep is not reported." for p, i, n in missing]
    _raise_or_warn(problems, strict)
    return [d for _, d in found]


# ------------------------------------------------------------------ reading


def _get(config: Mapping, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _read_run(d: pathlib.Path) -> tuple[dict, list[dict], list[dict], list[str]]:
    """(config, member rows, metric records, problems) of one run directory."""
    config = read_json(d / "config.json")
    steps = _get(config, "train.steps")
    steps = steps if isinstance(steps, int) else None
    shard = _SHARD.fullmatch(d.name)
    unit_prefix = f"{d.name}/" if shard else ""
    metrics_file, summary_file = d / "metrics.jsonl", d / "summary.json"
    finished = summary_file.exists()
    problems = []
    # An interrupted run may end in a half-written line (a kill during an append): drop it and
    # say so; in a finished run every line was written whole, so a broken one is corruption.
    truncated = not finished and ends_mid_line(metrics_file)
    records = read_jsonl(metrics_file, tolerate_partial_tail=not finished)
    last: dict[int, dict] = {}
    for r in records:
        if r["member"] not in last or r["step"] >= last[r["member"]]["step"]:
            last[r["member"]] = r
    if finished:
        summary = read_json(summary_file)
        if "members" not in summary:
            raise RunDirectoryError(f"{summary_file} has no 'members' entry: it is not an fpx summary.")
        rows = [dict(r) for r in summary["members"]]
        for r in rows:
            unit = r.get("unit", last[r["member"]]["unit"] if r["member"] in last else None)
            r["unit"] = None if unit is None else f"{unit_prefix}{unit}"
        if not metrics_file.exists():
            problems.append(f"{metrics_file} is missing: the table comes from summary.json, there are no curves.")
    else:
        from ._runner import member_rows

        rows = [{**r, "unit": f"{unit_prefix}{r['unit']}"} for r in member_rows(d, records)]
        rows += _not_started(config, d, set(last))
    partial = [r for r in rows if steps is not None and r["step"] < steps]
    for r in partial:
        mark = f"partial (step {r['step']}/{steps})" if r["step"] else f"not started (step 0/{steps})"
        r["status"] = mark if r["status"] in ("ok", "not started") else f"{r['status']}, {mark}"
    if not finished or partial:
        why = "no summary.json: interrupted or still running" if not finished else "it stopped early"
        reached = sorted({r["step"] for r in partial})
        at = f"step {reached[0]}" if len(reached) == 1 else f"steps {reached[0]}–{reached[-1]}"
        problems.append(
            f"{d} is a partial run ({why}): {len(partial)} of {len(rows)} members at {at} of {steps}"
            + (", summarised from metrics.jsonl" if not finished else "")
            + (" (its half-written last line was dropped)" if truncated else "")
            + "."
        )
    return config, rows, records, problems


def _not_started(config: dict, d: pathlib.Path, seen: set[int]) -> list[dict]:
    """Rows for the members of an interrupted run that never reached an evaluation."""
    from ml_collections import ConfigDict

    from ._runner import expand_sweep

    try:
        members = expand_sweep(ConfigDict(config))
    except Exception as e:  # noqa: BLE001  (a config of another fpx version: report what was logged)
        warnings.warn(f"{d / 'config.json'}: cannot expand its sweep ({e}); members without metrics are not listed.", ReportWarning, stacklevel=4)
        return []
    shard = _SHARD.fullmatch(d.name)
    i, n = (int(shard[1]), int(shard[2])) if shard else (0, 1)
    return [{"member": m, "unit": None, "hparams": hp, "step": 0, "status": "not started", "ms_per_step": None}
            for m, hp in enumerate(members) if m % n == i and m not in seen]


def _num_members(d: pathlib.Path) -> int | None:
    summary = d / "summary.json"
    if summary.exists():
        try:
            return read_json(summary).get("num_members")
        except RunDirectoryError:
            return None
    return None


def collect(paths: Sequence[str | pathlib.Path], *, strict: bool = False) -> Collection:
    """Read the runs under `paths` (run directories or sharded sweeps) into one `Collection`.

    Rows are sorted by (run, member); a swept key that a member does not set shows the
    config's default. Missing shards and partial runs are `Collection.problems`, each also
    a `ReportWarning`; with `strict=True` they are a `RunDirectoryError` instead.

    ```python
    import json, pathlib, tempfile
    from fpx.experiment._report import collect
    run = pathlib.Path(tempfile.mkdtemp())
    (run / "config.json").write_text(json.dumps({"name": "demo", "experiment": "deq_classifier",
                                                 "optim": {"lr": 1e-3}, "train": {"steps": 10}}))
    (run / "metrics.jsonl").write_text(json.dumps({"unit": 0, "member": 0, "step": 10,
                                                   "hparams": {"optim.lr": 1e-3}, "eval/accuracy": 0.9}) + "\\n")
    (run / "summary.json").write_text(json.dumps({"num_members": 1, "members": [
        {"member": 0, "hparams": {"optim.lr": 1e-3}, "step": 10, "status": "ok", "eval/accuracy": 0.9}]}))
    c = collect([run])
    assert c.rows[0]["run"] == "demo" and c.rows[0]["unit"] == "0" and not c.problems
    ```
    """
    found, missing, problems = _discover(paths)
    runs = []
    for given, d in found:
        config, rows, records, run_problems = _read_run(d)
        runs.append((given, d, config, rows, records))
        problems += run_problems
    for given, i, n in missing:
        # Name the members the slice would have held, from a sibling shard's sweep size.
        total = next((_num_members(d) for g, d, *_ in runs if g == given and _num_members(d)), None)
        which = f": members {', '.join(str(m) for m in range(i, total, n))} of {total} are not reported" if total else ""
        problems.append(f"{given / f'shard-{i}-of-{n}'} is missing{which}.")
    _raise_or_warn(problems, strict)

    # A run is labelled by its config name; two given paths with one name by their path too.
    names = {}
    for given, d, config, *_ in runs:
        names.setdefault(given, str(config.get("name", config.get("experiment", given.name))))
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    label = {g: (f"{n} ({g})" if n in clash else n) for g, n in names.items()}

    all_rows, all_records, headline = [], [], []
    swept = sorted({k for *_, rows, _ in runs for r in rows for k in r["hparams"]})
    from ._task import task_headline

    for given, d, config, rows, records in runs:
        for r in rows:
            hparams = {k: r["hparams"].get(k, _get(config, k) if k != "variant" else MISSING) for k in swept}
            all_rows.append({"run": label[given], **r, "hparams": hparams})
        all_records.extend({**r, "run": label[given]} for r in records)
        headline += [m for m in task_headline(str(config.get("experiment", ""))) if m not in headline]
    all_rows.sort(key=lambda r: (r["run"], r["member"]))
    return Collection(all_rows, all_records, tuple(headline), problems)


# ------------------------------------------------------------------ tables


def _value(row: Mapping, column: str) -> Any:
    """`row[column]`, or None where there is nothing to show: a solver step count of 0 means
    no solve ran (JFB and unrolled adjoints have no backward solve), not a free one."""
    v = row.get(column)
    return None if column.endswith("_steps") and v == 0 else v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return MISSING if v is None else str(v)


def _mean_sd(values: list[Any]) -> str:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return MISSING
    if len(xs) == 1:
        return _fmt(xs[0])
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))  # sample sd, as the READMEs quote
    return f"{mean:.4g} ± {sd:.2g}"


def _ranges(ms: Sequence[int]) -> str:
    """0, 1, 2, 5 -> "0–2, 5"."""
    ms, out = sorted(ms), []
    for m in ms:
        if out and m == out[-1][1] + 1:
            out[-1][1] = m
        else:
            out.append([m, m])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in out)


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in cells) + " |" for cells in body]
    return lines


def _hp_keys(rows: Sequence[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r["hparams"]})
    return (["variant"] if "variant" in keys else []) + [k for k in keys if k != "variant"]


def _default_columns(rows: Sequence[dict], headline: Sequence[str]) -> list[str]:
    """The headline metrics first, then REPORT_COLUMNS; a column equal to an earlier one in
    every row (`eval/loss` is the FNO's `eval/test_rel_l2`) is left out."""
    columns = [c for c in dict.fromkeys([*headline, *REPORT_COLUMNS]) if any(c in r for r in rows)]
    kept: list[str] = []
    for c in columns:
        if not any(all(r.get(c) == r.get(k) for r in rows) for k in kept):
            kept.append(c)
    return kept


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None, *, headline: Sequence[str] = ()) -> str:
    """The results of `rows` (`collect(...).rows` or a summary's `members`) as markdown tables.

    1. one row per member: its hyperparameters, `columns` (default: the `headline`
       metrics, then `REPORT_COLUMNS`), status and step;
    2. when some configuration has several replicates (seed-like keys, `is_replicate_key`):
       mean ± sd over them, per variant / hyperparameter group;
    3. when `ms_per_step` is a column and the rows know their `unit`: ms per training step
       once per compiled group, since its members train together in one vmapped program.

    ```python
    from fpx.experiment import markdown_table
    rows = [{"run": "demo", "member": m, "unit": "0", "hparams": {"variant": "deq", "seed": m},
             "eval/accuracy": a, "status": "ok", "step": 10, "ms_per_step": 2.0}
            for m, a in enumerate([0.9, 0.92, 0.94])]
    text = markdown_table(rows)
    assert "| demo | deq | 3 | 0.92 ± 0.02 | 3 ok | 10 |" in text   # the mean ± sd over seeds
    assert "| demo | 0 | 0–2 | 3 | all members | 2 |" in text       # ms/step once for the group
    ```
    """
    if not rows:
        return "(no members)"
    columns = _default_columns(rows, headline) if columns is None else [c for c in columns if any(c in r for r in rows)]
    # Rows that know their compiled group get its ms/step in a table of their own (below).
    # (A member that never started has no group: unit None.)
    by_unit = "ms_per_step" in columns and all("unit" in r for r in rows) and any(r["unit"] is not None for r in rows)
    member_columns = [c for c in columns if not (by_unit and c == "ms_per_step")]
    hp_keys = _hp_keys(rows)
    body = [[r["run"], r["member"], *(r["hparams"].get(k, MISSING) for k in hp_keys), *(_value(r, c) for c in member_columns),
             r["status"], r["step"]] for r in rows]
    lines = _table(["run", "member", *hp_keys, *member_columns, "status", "steps"], body)
    if any(_fmt(c) == MISSING for cells in body for c in cells):
        lines += ["", f"{MISSING}: not in that member's config, or not reported by it (e.g. no backward solve)."]
    lines += _aggregate(rows, hp_keys, [c for c in member_columns if c != "ms_per_step"])
    if by_unit:
        lines += _timing(rows, hp_keys)
    return "\n".join(lines)


def _aggregate(rows: Sequence[dict], hp_keys: Sequence[str], columns: Sequence[str]) -> list[str]:
    replicate = [k for k in hp_keys if is_replicate_key(k)]
    group_keys = [k for k in hp_keys if not is_replicate_key(k)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["run"], *(repr(r["hparams"].get(k)) for k in group_keys)), []).append(r)
    if not replicate or all(len(g) == 1 for g in groups.values()):
        return []
    body = []
    for members in groups.values():
        first = members[0]
        status = Counter(r["status"] for r in members)
        steps = sorted({r["step"] for r in members})
        body.append([first["run"], *(first["hparams"].get(k, MISSING) for k in group_keys), len(members),
                     *(_mean_sd([_value(r, c) for r in members]) for c in columns),
                     ", ".join(f"{n} {s}" for s, n in status.items()),
                     str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"])
    return ["", f"Mean ± sd over {', '.join(replicate)} (n replicates per group):", "",
            *_table(["run", *group_keys, "n", *columns, "status", "steps"], body)]


def _timing(rows: Sequence[dict], hp_keys: Sequence[str]) -> list[str]:
    units: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["unit"] is not None:
            units.setdefault((r["run"], r["unit"]), []).append(r)
    body = []
    for (run, unit), members in units.items():
        run_rows = [r for r in rows if r["run"] == run]
        # What the group's members share that sets them apart from the rest of the run; a
        # variant's name stands for the keys it sets.
        variant = members[0]["hparams"].get("variant", MISSING)
        one_variant = variant != MISSING and all(r["hparams"].get("variant") == variant for r in members)
        others = [r for r in run_rows if r["hparams"].get("variant") == variant] if one_variant else run_rows
        shared = [str(variant)] if one_variant and len(others) < len(run_rows) else []
        shared += [f"{k}={_fmt(members[0]['hparams'][k])}" for k in hp_keys if k != "variant" and not is_replicate_key(k)
                   and len({repr(r["hparams"].get(k)) for r in members}) == 1
                   and len({repr(r["hparams"].get(k)) for r in others}) > 1]
        group = ", ".join(shared) or ("all members" if len(members) == len(run_rows) else MISSING)
        body.append([run, str(unit), _ranges([r["member"] for r in members]), len(members), group, members[0].get("ms_per_step")])
    return ["", "ms per training step, once per compiled group (its members train together, vmapped):", "",
            *_table(["run", "unit", "members", "n", "group", "ms/step"], body)]


# ------------------------------------------------------------------ report


def report(
    paths: Sequence[str | pathlib.Path],
    out: str | pathlib.Path | None = None,
    columns: Sequence[str] | None = None,
    *,
    strict: bool = False,
) -> str:
    """Write `report.md` and `plots/` for the runs under `paths` into `out` (default: the
    first path); return the text (warnings, then the tables) that `fpx report` prints.

    A path that does not exist, is empty or holds a half-written file is a
    `RunDirectoryError`. A missing shard or a partial run is listed as a warning at the top
    (and is a `ReportWarning`); with `strict=True` it is a `RunDirectoryError`.

    ```python
    import json, pathlib, tempfile, warnings
    from fpx.experiment import report
    run = pathlib.Path(tempfile.mkdtemp())
    (run / "config.json").write_text(json.dumps({"name": "demo", "train": {"steps": 20}}))
    (run / "metrics.jsonl").write_text(json.dumps({"unit": 0, "member": 0, "step": 10,
        "hparams": {"seed": 0}, "train/loss": 0.5}) + "\\n")    # killed at step 10 of 20
    with warnings.catch_warnings(record=True) as caught:   # ReportWarning: a partial run
        warnings.simplefilter("always")
        text = report([run])
    assert "partial (step 10/20)" in text and "warning" in text and caught
    ```
    """
    collection = collect(paths, strict=strict)
    text = "".join(f"> **warning**: {p}\n" for p in collection.problems)
    text += ("\n" if text else "") + markdown_table(collection.rows, columns, headline=collection.headline)
    out = pathlib.Path(out) if out is not None else pathlib.Path(paths[0])
    out.mkdir(parents=True, exist_ok=True)
    from ._plots import plot_records  # matplotlib, only when plotting

    plots = plot_records(collection.records, out / "plots", headline=collection.headline)
    images = "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots)
    (out / "report.md").write_text("# fpx report\n\n" + text + "\n\n" + images + "\n")
    return text
