"""`fpx report`: incomplete run directories, partial runs, aggregated tables and plots.

Run directories are written by hand (as the runner lays them out), so these run in seconds
without training; one end-to-end check reports a real `:quick` sweep.
"""

import inspect
import json
import pathlib
import re
import statistics

import pytest
from ml_collections import ConfigDict

import fpx.experiment as fx
from fpx.experiment import _plots
from fpx.experiment._report import (
    ReportWarning,
    collect,
    is_replicate_key,
    markdown_table,
    report,
    run_dirs,
)
from fpx.experiment._rundir import RunDirectoryError
from fpx.experiment._runner import expand_sweep
from fpx.experiment._task import task_headline

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.py") + ":quick"


def demo_config(**overrides):
    config = {
        "name": "demo", "experiment": "deq_classifier", "seed": 0,
        "data": {"split_seed": 0}, "model": {"kind": "deq", "width": 16},
        "solver": {"name": "anderson"}, "adjoint": {"name": "implicit"}, "optim": {"name": "adam", "lr": 1e-3},
        "train": {"steps": 20, "eval_every": 10},
        "sweep": {"seed": [0, 1, 2]},
        "variants": {"deq": {"adjoint": {"name": "implicit"}}, "jfb": {"adjoint": {"name": "jfb"}}, "mlp": {"model": {"kind": "mlp"}}},
    }
    config.update(overrides)
    return config


def accuracy(m, step):
    return round(0.5 + 0.01 * m + 0.02 * step / 10, 6)


def write_run(d, config=None, *, upto=None, finished=True, members=None, unit_of=None, metrics=None):
    """A run directory as `fpx run` leaves it: all of it, or (finished=False) as killed at step `upto`."""
    config = config or demo_config()
    d = pathlib.Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    sweep = expand_sweep(ConfigDict(config))
    members = list(range(len(sweep))) if members is None else members
    unit_of = unit_of or (lambda m: sweep[m].get("variant", 0))
    units = {u: i for i, u in enumerate(dict.fromkeys(unit_of(m) for m in members))}
    steps, every = config["train"]["steps"], config["train"]["eval_every"]
    upto = steps if upto is None else upto
    metrics = metrics or (lambda m, s: {
        "eval/accuracy": accuracy(m, s), "eval/loss": 1.0 / s, "train/loss": 2.0 / s,
        "train/forward_steps": 9.0, "train/backward_steps": 0.0 if sweep[m].get("variant") == "jfb" else 8.0,
    })
    records = [{"unit": units[unit_of(m)], "member": m, "step": s, "hparams": sweep[m], **metrics(m, s)}
               for s in range(every, upto + 1, every) for m in members]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    (d / "timing.jsonl").write_text("".join(
        json.dumps({"unit": u, "step": every, "members": 1, "ms_per_step": 1.0 + u}) + "\n" for u in units.values()))
    if finished:
        last = {r["member"]: r for r in records}
        rows = [{"member": m, "hparams": r["hparams"], "step": r["step"], "status": "ok", "ms_per_step": 1.0 + r["unit"],
                 **{k: v for k, v in r.items() if k.startswith(("train/", "eval/"))}} for m, r in sorted(last.items())]
        (d / "summary.json").write_text(json.dumps({"members": rows, "num_members": len(sweep), "stopped_early": False,
                                                    "name": config["name"]}))
    return d


def table_rows(text, first_cell):
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


# ------------------------------------------------------------ what is missing


def test_a_nonexistent_or_empty_directory_is_an_error_naming_it(tmp_path):
    good = write_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for bad, why in [("nope", "does not exist"), ("empty", "it is empty"), ("file", "is not a directory")]:
        with pytest.raises(RunDirectoryError, match=re.escape(str(tmp_path / bad)) + ".*" + why):
            report([good, tmp_path / bad], out=tmp_path / "r")  # strict or not: never only the good run's table
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(RunDirectoryError, match="not an fpx run directory: it has no config.json"):
        run_dirs([tmp_path / "other"])


def test_a_missing_shard_is_a_loud_warning_or_with_strict_an_error(tmp_path):
    config = demo_config(variants={}, sweep={"seed": [0, 1, 2, 3]})
    write_run(tmp_path / "sweep" / "shard-0-of-2", config, members=[0, 2])
    with pytest.warns(ReportWarning, match=r"shard-1-of-2 is missing: members 1, 3 of 4 are not reported"):
        text = report([tmp_path / "sweep"], out=tmp_path / "r")
    assert text.startswith("> **warning**: ") and "shard-1-of-2 is missing" in text
    assert [row.split(" | ")[1] for row in table_rows(text, "demo")][:2] == ["0", "2"]  # the shard present is reported
    with pytest.raises(RunDirectoryError, match=r"strict.*shard-1-of-2 is missing"):
        report([tmp_path / "sweep"], out=tmp_path / "r", strict=True)
    with pytest.raises(RunDirectoryError, match="shard-1-of-2"):
        run_dirs([tmp_path / "sweep"], strict=True)
    # A shard directory that never got its config.json (the slice did not start) is missing too.
    (tmp_path / "sweep" / "shard-1-of-2").mkdir()
    with pytest.raises(RunDirectoryError, match="shard-1-of-2 is missing"):
        collect([tmp_path / "sweep"], strict=True)
    write_run(tmp_path / "sweep" / "shard-1-of-2", config, members=[1, 3])
    assert [r["member"] for r in collect([tmp_path / "sweep"], strict=True).rows] == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["config.json", "summary.json"])
def test_a_half_written_json_file_is_an_error_naming_it(tmp_path, name):
    run = write_run(tmp_path / "run")
    text = (run / name).read_text()
    (run / name).write_text(text[: len(text) // 2])
    with pytest.raises(RunDirectoryError, match=re.escape(str(run / name)) + " is half-written"):
        report([run], out=tmp_path / "r")


def test_broken_metric_lines_are_errors_except_a_killed_runs_last_line(tmp_path):
    run = write_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines) + lines[0][:30])  # finished, yet a half line: corruption
    with pytest.raises(RunDirectoryError, match="metrics.jsonl: its last line is half-written"):
        report([run], out=tmp_path / "r")
    (run / "metrics.jsonl").write_text(lines[0] + lines[1][:30] + "\n" + "".join(lines[2:]))
    (run / "summary.json").unlink()
    with pytest.raises(RunDirectoryError, match="metrics.jsonl: line 2 is corrupt"):
        report([run], out=tmp_path / "r")  # even in an interrupted run, only the last line may be cut


def test_an_interrupted_run_is_summarised_from_its_metrics_and_marked_partial(tmp_path):
    config = demo_config(train={"steps": 40, "eval_every": 10})
    # Killed at step 20: the deq and jfb members have evaluations, the mlp group never started,
    # and the kill cut the last metrics line in half.
    run = write_run(tmp_path / "run", config, upto=20, finished=False, members=[0, 1, 2, 3, 4, 5])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"unit": 0, "member": 0, "step": 30, "eval/acc')
    with pytest.warns(ReportWarning, match=r"partial run \(no summary.json.*9 members at steps 0–20 of 40.*half-written last line was dropped"):
        collection = collect([run])
    status = {r["member"]: r["status"] for r in collection.rows}
    assert status == {**{m: "partial (step 20/40)" for m in range(6)}, **{m: "not started (step 0/40)" for m in (6, 7, 8)}}
    assert collection.rows[0]["eval/accuracy"] == accuracy(0, 20)
    assert collection.rows[0]["ms_per_step"] == 1.0  # from timing.jsonl, as summarize would
    with pytest.warns(ReportWarning):
        text = report([run], out=tmp_path / "r")
    assert "| demo | deq | implicit | deq | 3 |" in text and "3 partial (step 20/40)" in text
    assert "3 not started (step 0/40)" in text
    assert "| demo | 0 | 0–2 | 3 | deq | 1 |" in text and "mlp" not in text.split("compiled group")[1]  # mlp never ran
    with pytest.raises(RunDirectoryError, match="partial run"):
        report([run], out=tmp_path / "r", strict=True)


def test_a_run_that_stopped_early_is_partial_too(tmp_path):
    run = write_run(tmp_path / "run", demo_config(variants={}), upto=10)
    with pytest.warns(ReportWarning, match="stopped early"):
        rows = collect([run]).rows
    assert {r["status"] for r in rows} == {"partial (step 10/20)"}


# ------------------------------------------------------------------- tables


def test_aggregated_table_is_mean_and_sd_over_seeds_per_variant(tmp_path):
    run = write_run(tmp_path / "run")
    text = report([run], out=tmp_path / "r")
    assert "Mean ± sd over seed" in text
    mean = statistics.mean(accuracy(m, 20) for m in (0, 1, 2))
    sd = statistics.stdev(accuracy(m, 20) for m in (0, 1, 2))
    # run | variant | adjoint.name | model.kind | n | ...
    (deq,) = [line for line in table_rows(text, "demo") if line.startswith("| demo | deq | implicit | deq | 3 |")]
    assert f"| {mean:.4g} ± {sd:.2g} |" in deq and deq.endswith("| 3 ok | 20 |")
    # The replicate key is averaged over, not a column of the aggregated table.
    header = next(line for line in text.split("Mean ± sd")[1].splitlines() if line.startswith("| run"))
    assert "seed" not in header and "| n |" in header


def test_seed_like_keys_are_replicates():
    assert all(map(is_replicate_key, ["seed", "data.split_seed", "init.seed"]))
    assert not any(map(is_replicate_key, ["optim.lr", "seeds_per_batch.x", "variant", "model.width"]))


def test_no_blank_cells_defaults_come_from_the_config(tmp_path):
    run = write_run(tmp_path / "run")
    rows = collect([run]).rows
    mlp = next(r for r in rows if r["hparams"]["variant"] == "mlp")
    assert mlp["hparams"]["adjoint.name"] == "implicit"  # not set by the mlp variant: the config default
    text = markdown_table(rows)
    body = table_rows(text, "demo")[:9]  # the members' rows
    assert not any("|  |" in line or "| |" in line for line in body)
    # A metric a member does not report (no backward solve for JFB) is "—", and the table says what that means.
    jfb = next(line for line in body if "| jfb |" in line)
    assert " — |" in jfb and "—: not in that member's config, or not reported by it" in text
    # A swept key missing from one run's config (merged with another run) is "—" too.
    other = write_run(tmp_path / "other", demo_config(name="other", variants={}, sweep={"optim": {"lr": [1e-3, 3e-3]}}))
    rows = collect([run, other]).rows
    assert {r["hparams"]["optim.lr"] for r in rows if r["run"] == "demo"} == {1e-3}  # the demo run's default
    assert {r["hparams"]["variant"] for r in rows if r["run"] == "other"} == {"—"}


def test_headline_metrics_come_first_and_a_duplicate_loss_column_is_left_out(tmp_path):
    assert task_headline("fno_burgers") == ("eval/test_rel_l2", "eval/zero_shot_rel_l2")
    assert task_headline("deq_classifier")[0] == "eval/accuracy" and task_headline("nope") == ()
    config = demo_config(experiment="fno_burgers", variants={}, sweep={"seed": [0]})
    run = write_run(tmp_path / "run", config, metrics=lambda m, s: {
        "eval/loss": 0.1 / s, "eval/test_rel_l2": 0.1 / s, "eval/zero_shot_rel_l2": 0.12 / s, "train/loss": 0.2 / s})
    text = report([run], out=tmp_path / "r")
    header = table_rows(text, "run")[0]
    assert header.startswith("| run | member | seed | eval/test_rel_l2 | eval/zero_shot_rel_l2 | train/loss |")
    assert "eval/loss" not in header  # the FNO's eval/loss is its test_rel_l2
    assert "| demo | 0 | 0 | 0.005 | 0.006 | 0.01 | ok | 20 |" in text


def test_ms_per_step_is_shown_once_per_compiled_group(tmp_path):
    run = write_run(tmp_path / "run")
    text = report([run], out=tmp_path / "r")
    member_header = table_rows(text, "run")[0]
    assert "ms" not in member_header  # not repeated on every member's row as if it were per member
    units = text.split("once per compiled group")[1]
    assert "| demo | 0 | 0–2 | 3 | deq | 1 |" in units
    assert "| demo | 2 | 6–8 | 3 | mlp | 3 |" in units
    # Without ms_per_step among the columns (tables that must compare equal) there is no timing table.
    assert "compiled group" not in markdown_table(collect([run]).rows, ["eval/accuracy"])
    # Rows that do not know their unit (a summary's members) keep the old per-member column.
    summary = json.loads((run / "summary.json").read_text())
    plain = markdown_table([{"run": "demo", **r} for r in summary["members"]])
    assert "ms_per_step" in table_rows(plain, "run")[0]


def test_shards_merge_into_the_table_of_the_whole_sweep(tmp_path):
    config = demo_config()
    whole = write_run(tmp_path / "whole", config, unit_of=lambda m: 0)
    for i in range(2):
        write_run(tmp_path / "sliced" / f"shard-{i}-of-2", config, members=list(range(i, 9, 2)), unit_of=lambda m: 0)
    columns = ["eval/accuracy", "train/loss"]
    assert report([whole], out=tmp_path / "r1", columns=columns) == report([tmp_path / "sliced"], out=tmp_path / "r2", columns=columns)
    # Each shard's unit 0 is its own compiled group.
    units = report([tmp_path / "sliced"], out=tmp_path / "r2").split("once per compiled group")[1]
    assert "| demo | shard-0-of-2/0 | 0, 2, 4, 6, 8 | 5 |" in units and "| demo | shard-1-of-2/0 | 1, 3, 5, 7 | 4 |" in units


def test_two_runs_with_one_name_are_told_apart(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    runs = {r["run"] for r in collect([a, b]).rows}
    assert runs == {f"demo ({a})", f"demo ({b})"}


# -------------------------------------------------------------------- plots


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_records makes, kept open to be inspected."""
    kept, close = [], _plots.plt.close
    monkeypatch.setattr(_plots.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def axes_by_title(figs):
    return {ax.get_title(): ax for fig in figs for ax in fig.axes if ax.get_title()}


def test_sweep_plot_labels_and_axis(tmp_path, figures):
    config = demo_config(variants={}, sweep={"optim": {"lr": [1e-3, 3e-3, 1e-2]}, "seed": [0, 1]})
    run = write_run(tmp_path / "run", config, unit_of=lambda m: 0)
    report([run], out=tmp_path / "r")
    (sweep,) = [ax for fig in figures for ax in fig.axes if ax.get_title().startswith("sweep")]
    assert sweep.get_xlabel() == "optim.lr" and sweep.get_xscale() == "log"  # the learning rate, not the seed
    assert "mean ± sd over seed" in sweep.get_title()
    assert sweep.get_legend() is None or not any("None" in t.get_text() for t in sweep.get_legend().get_texts())
    assert len(sweep.containers) == 1 and sweep.containers[0].has_yerr  # one curve, seeds as error bars


def test_sweep_plot_over_an_integer_key_has_integer_ticks(tmp_path, figures):
    config = demo_config(sweep={"model": {"width": [8, 16, 64]}, "seed": [0, 1]}, variants={"deq": {}, "jfb": {"adjoint": {"name": "jfb"}}})
    run = write_run(tmp_path / "run", config)
    report([run], out=tmp_path / "r")
    (sweep,) = [ax for fig in figures for ax in fig.axes if ax.get_title().startswith("sweep")]
    assert sweep.get_xlabel() == "model.width"
    assert [t.get_text() for t in sweep.get_xticklabels()] == ["8", "16", "64"]
    labels = [t.get_text() for t in sweep.get_legend().get_texts()]
    assert labels == ["deq", "jfb"]  # neither width=None nor seed=...


def test_only_seeds_swept_gives_no_sweep_plot(tmp_path):
    run = write_run(tmp_path / "run", demo_config(variants={}))
    assert not (tmp_path / "r" / "plots" / "sweep.png").exists()
    report([run], out=tmp_path / "r")
    assert (tmp_path / "r" / "plots" / "curves.png").exists() and not (tmp_path / "r" / "plots" / "sweep.png").exists()


def test_many_curves_get_distinct_styles(tmp_path, figures):
    run = write_run(tmp_path / "run", demo_config(variants={}, sweep={"seed": list(range(15))}), unit_of=lambda m: 0)
    report([run], out=tmp_path / "r")
    lines = axes_by_title(figures)["train/loss"].get_lines()
    assert len(lines) == 15
    assert len({(str(line.get_color()), line.get_linestyle()) for line in lines}) == 15


def test_members_without_a_backward_solve_are_not_drawn(tmp_path, figures):
    run = write_run(tmp_path / "run")
    report([run], out=tmp_path / "r")
    ax = axes_by_title(figures)
    assert len(ax["train/backward_steps"].get_lines()) == 6  # deq and mlp seeds; the jfb members' zeros left out
    assert len(ax["train/forward_steps"].get_lines()) == 9


def test_loss_spanning_decades_is_log_and_every_headline_curve_is_drawn(tmp_path, figures):
    config = demo_config(experiment="fno_burgers", variants={}, sweep={"seed": [0]}, train={"steps": 2000, "eval_every": 100})
    run = write_run(tmp_path / "run", config, metrics=lambda m, s: {
        "eval/loss": 1.0 / s**2, "eval/test_rel_l2": 1.0 / s**2, "eval/zero_shot_rel_l2": 1.2 / s**2, "train/loss": 0.5 + 1.0 / s})
    report([run], out=tmp_path / "r")
    ax = axes_by_title(figures)
    assert {"train/loss", "eval/test_rel_l2", "eval/zero_shot_rel_l2"} <= set(ax) and "eval/loss" not in ax
    assert ax["eval/zero_shot_rel_l2"].get_yscale() == "log" and ax["train/loss"].get_yscale() == "linear"


# ------------------------------------------------------------ docs and e2e


@pytest.mark.parametrize("fn", [fx.report, fx.markdown_table, collect, run_dirs, _plots.plot_records, task_headline])
def test_docstring_examples_run(fn):
    blocks = re.findall(r"```python\n(.*?)```", inspect.getdoc(fn), re.DOTALL)
    assert blocks, fn.__name__
    for code in blocks:
        exec(compile(code, f"<{fn.__name__} docstring>", "exec"), {})


def test_report_of_a_quick_seed_and_lr_sweep(tmp_path):
    workdir = tmp_path / "run"
    fx.run(QUICK, {"sweep.lr": "[1e-3, 3e-3]", "sweep.seed": "[0, 1]"}, workdir=workdir, progress=False)
    text = report([workdir], strict=True)
    assert table_rows(text, "run")[0].startswith("| run | member | optim.lr | seed | eval/accuracy | eval/loss |")
    assert len(table_rows(text, "quickstart")) == 4 + 2 + 1  # members, lr groups (mean ± sd over seeds), one unit
    assert "| quickstart | 0 | 0–3 | 4 | all members |" in text
    assert (workdir / "plots" / "sweep.png").exists() and (workdir / "report.md").exists()
