"""fpx.experiment's helpers for the `experiments/*/table.py` scripts: the command line
(`table_main`), the mean ± sd cells and the grouping of a run's metric records."""

import json
import math
import pathlib

import pytest

from fpx.experiment import (
    RunDirectoryError,
    by_variant,
    format_minutes,
    format_value,
    generated_section,
    mean_sd,
    member_histories,
    read_run,
    table_main,
    timing_by_unit,
    unit_ms_per_step,
)

# ---------------------------------------------------------------------------- cells


def test_mean_sd_known_answers():
    mean, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sd == pytest.approx(math.sqrt(5 / 3), rel=1e-15)  # the sample sd (n - 1)
    assert mean_sd(iter([7])) == (7.0, 0.0)  # one seed: no spread; an iterator is read once
    assert mean_sd([0.1, 0.1, 0.1]) == (pytest.approx(0.1, rel=1e-15), 0.0)
    with pytest.raises(ValueError, match="`values` is empty"):
        mean_sd([])


def test_format_value_known_answers():
    assert format_value(None, ".2f") == "—" and format_value(None, ".2f", 0.1) == "—"
    assert format_value(0.12345, ".3f") == "0.123" and format_value(1234567, ",") == "1,234,567"
    assert format_value(5, ",") == "5"  # an int stays an int at scale 1 (a float would print "5.0")
    assert format_value(0.756, ".1f", 0.0712, scale=100) == "75.6 ± 7.1"
    assert format_value(2.0, ".2f", 0.0) == "2.00 ± 0.00"
    assert format_value(2.0, ".2f", 0.0, hide_zero_sd=True) == "2.00"
    assert format_value(2.0, ".2f", 0.5, hide_zero_sd=True) == "2.00 ± 0.50"
    assert format_value(float("nan"), ".2f", hide_zero_sd=True) == "nan"  # shown, never hidden
    with pytest.raises(TypeError, match="`value` must be a real number"):
        format_value("0.5", ".2f")
    with pytest.raises(TypeError, match="`sd` must be a real number"):
        format_value(0.5, ".2f", "0.1")


def test_format_minutes_known_answers():
    assert format_minutes(0) == "0 min 00 s" and format_minutes(150.0) == "2 min 30 s"
    assert format_minutes(3599.6) == "60 min 00 s" and format_minutes(61.2) == "1 min 01 s"
    for bad in (-1.0, float("nan"), float("inf"), "60"):
        with pytest.raises(ValueError, match="`seconds` must be a finite number"):
            format_minutes(bad)


# ---------------------------------------------------------------------------- metric records


def _write_run(path: pathlib.Path, records, timing=(), config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"train": {"steps": 20}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if timing:
        (path / "timing.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timing))
    return path


def _records():
    # members 0-3: two variants x two seeds, written out of step order; member 4 has no variant
    out = []
    for step in (20, 10):
        for member, (variant, unit) in enumerate([("b", 0), ("a", 1), ("b", 0), ("a", 1)]):
            out.append({"member": member, "unit": unit, "step": step, "hparams": {"variant": variant, "seed": member // 2},
                        "eval/accuracy": 0.5 + step / 100 + 0.1 * (member // 2)})
    out.append({"member": 4, "unit": 2, "step": 10, "hparams": {"seed": 0}, "eval/accuracy": 0.1})
    return out


def test_member_histories_and_by_variant():
    histories = member_histories(_records())
    assert list(histories) == [0, 1, 2, 3, 4]  # order of first appearance
    assert [r["step"] for r in histories[2]] == [10, 20]  # sorted by step: the last is the last evaluation
    tie = member_histories([{"member": 0, "step": 5, "k": 1}, {"member": 0, "step": 5, "k": 2}])
    assert tie[0][-1]["k"] == 2  # equal steps: the later record counts as the last
    groups = by_variant(histories, order=["a", "b"], default="plain")
    assert list(groups) == ["a", "b", "plain"]
    assert [rs[-1]["member"] for rs in groups["a"]] == [1, 3] and len(groups["plain"]) == 1
    assert list(by_variant(histories, default="plain")) == ["b", "a", "plain"]  # no order: as they appear
    assert list(by_variant(histories, order=["plain"], default="plain")) == ["plain", "b", "a"]
    with pytest.raises(ValueError, match="member 4 has no hparams.variant"):
        by_variant(histories, order=["a", "b"])
    with pytest.raises(ValueError, match="record 0 has no 'member' or 'step'"):
        member_histories([{"step": 1}])


def test_timing_and_ms_per_step(tmp_path):
    timing = [{"unit": 0, "ms_per_step": t} for t in (3.0, 9.0, 4.0)] + [{"unit": 1, "ms_per_step": 2.0}]
    run = _write_run(tmp_path / "run", _records(), timing)
    with (run / "timing.jsonl").open("a") as f:
        f.write('{"unit": 1, "ms_per')  # a crash during the last append
    by_unit = timing_by_unit(run)
    assert by_unit == {0: [3.0, 9.0, 4.0], 1: [2.0]}
    last = [rs[-1] for rs in member_histories(_records()).values()]
    assert unit_ms_per_step(last[:1], by_unit) == 4.0  # the unit's median
    assert unit_ms_per_step([last[0], last[2]], by_unit) == 4.0  # two members of one unit: counted once
    assert unit_ms_per_step(last, by_unit) == 3.0  # (4 + 2) / 2; unit 2 has no timings
    assert unit_ms_per_step(last[4:], by_unit) is None
    assert timing_by_unit(tmp_path / "no-such-run") == {}


def test_read_run(tmp_path):
    run = _write_run(tmp_path / "run", _records())
    config, records = read_run(run)
    assert config == {"train": {"steps": 20}} and len(records) == 9
    with pytest.raises(SystemExit, match="has no config.json"):
        read_run(tmp_path / "missing")
    empty = _write_run(tmp_path / "empty", [])
    with pytest.raises(SystemExit, match="no metrics in"):
        read_run(empty)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"member": 0, "st')
    with pytest.raises(RunDirectoryError, match="half-written"):
        read_run(run)
    assert len(read_run(run, tolerate_partial_tail=True)[1]) == 9


# ---------------------------------------------------------------------------- the command line


def _script(tmp_path, **extra):
    """What a table.py passes: its collect and markdown, README with markers, results path."""
    readme, results = tmp_path / "README.md", tmp_path / "results.json"
    readme.write_text("# Demo\n\nintro\n<!-- demo_table:begin (generated by table.py) -->\nold\n<!-- demo_table:end -->\n\noutro\n")
    seen = []

    def collect(run_dir, preset="default"):
        config, records = read_run(run_dir)
        histories = member_histories(records)
        rows = []
        for variant, members in by_variant(histories, default="plain").items():
            m, s = mean_sd(rs[-1]["eval/accuracy"] for rs in members)
            rows.append({"variant": variant, "mean": m, "sd": s})
        return {"preset": preset, "steps": config["train"]["steps"], "rows": rows}

    def markdown(result):
        head = f"`:{result['preset']}`, {result['steps']} steps" + (f"; {result['note']}" if result.get("note") else "")
        rows = [f"| {r['variant']} | {format_value(r['mean'], '.1f', r['sd'], scale=100)} % |" for r in result["rows"]]
        return "\n".join([head, "", "| variant | accuracy |", "|---|---|", *rows])

    kwargs = dict(doc="The demo table: from a run directory to the README.\n\nMore text.", collect=collect,
                  markdown=markdown, readme=readme, section="demo_table", results=results,
                  options={"--preset": {"default": "default", "help": "names the row"}},
                  after_save=lambda result, run_dir: seen.append(("save", run_dir)),
                  after_from_results=lambda result: seen.append(("from-results", result["preset"])))
    kwargs.update(extra)
    return kwargs, readme, results, seen


def test_save_writes_results_and_the_section_and_from_results_regenerates_it(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _records())
    kwargs, readme, results, seen = _script(tmp_path)
    before = readme.read_text()
    assert table_main([str(run)], **kwargs) == 0  # print only
    printed = capsys.readouterr().out
    assert "| b | 75.0 ± 7.1 % |" in printed and "| plain | 10.0 % |" not in printed
    assert "| plain | 10.0 ± 0.0 % |" in printed  # one member: sd 0
    assert readme.read_text() == before and not results.exists() and seen == []

    assert table_main([str(run), "--save", "--preset", "quick", "--note", "load 1.5"], **kwargs) == 0
    stored = json.loads(results.read_text())
    assert stored["preset"] == "quick" and stored["note"] == "load 1.5"
    assert results.read_text().endswith("}\n") and '\n "preset"' in results.read_text()  # indent 1
    section = generated_section(readme, "demo_table")
    assert section == capsys.readouterr().out.rstrip("\n") and section.startswith("`:quick`, 20 steps; load 1.5")
    text = readme.read_text()
    assert text.startswith("# Demo\n\nintro\n<!-- demo_table:begin (generated by table.py) -->\n")
    assert text.endswith("<!-- demo_table:end -->\n\noutro\n") and seen == [("save", str(run))]

    readme.write_text(text.replace("75.0 ± 7.1", "99.9"))  # hand-edited: --from-results restores it
    assert "| b | 99.9 % |" in readme.read_text()
    assert table_main(["--from-results"], **kwargs) == 0
    assert readme.read_text() == text and seen[-1] == ("from-results", "quick")


def test_allow_nan_false_refuses_nan_before_writing(tmp_path):
    kwargs, readme, results, _ = _script(tmp_path, collect=lambda run_dir, preset: {"rows": [], "x": float("nan"),
                                                                                     "preset": preset, "steps": 1},
                                         allow_nan=False)
    results.write_text('{"old": 1}\n')
    with pytest.raises(ValueError, match="Out of range float"):
        table_main(["run", "--save"], **kwargs)
    assert results.read_text() == '{"old": 1}\n' and "old" in generated_section(readme, "demo_table")
    kwargs["allow_nan"] = True
    assert table_main(["run", "--save"], **kwargs) == 0 and "NaN" in results.read_text()


def test_argument_errors(tmp_path, capsys):
    kwargs, readme, results, seen = _script(tmp_path)
    with pytest.raises(SystemExit) as e:
        table_main([], **kwargs)
    assert e.value.code == 2 and "give a run directory, or --from-results" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        table_main(["--from-results"], **kwargs)  # no results.json yet
    assert e.value.code == 2 and "results.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        table_main(["run", "--unknown"], **kwargs)
    assert e.value.code == 2 and "unrecognized arguments: --unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        table_main(["--help"], **kwargs)
    out = capsys.readouterr().out
    assert e.value.code == 0 and "The demo table: from a run directory to the README." in out and "More text" not in out
    assert "--preset PRESET  names the row" in out and "--from-results" in out
    with pytest.raises(SystemExit, match="no config.json"):
        table_main([str(tmp_path / "not-a-run")], **kwargs)
    assert seen == [] and not results.exists()


def test_bad_arguments_of_table_main_name_them(tmp_path):
    kwargs, *_ = _script(tmp_path)
    with pytest.raises(ValueError, match="section name"):
        table_main(["run"], **{**kwargs, "section": "two words"})
    with pytest.raises(ValueError, match="`doc` must be the script's docstring"):
        table_main(["run"], **{**kwargs, "doc": None})
    with pytest.raises(TypeError, match="`markdown` must be a function"):
        table_main(["run"], **{**kwargs, "markdown": "table"})
    with pytest.raises(ValueError, match="option 'preset' must be a long option"):
        table_main(["run"], **{**kwargs, "options": {"preset": {}}})


def test_store_false_option_reaches_collect_under_its_dest(tmp_path, capsys):
    # experiments/operators/table.py: `--no-test-time` is collect(run_dir, test_time=False)
    calls = []
    kwargs, *_ = _script(tmp_path, collect=lambda run_dir, test_time: calls.append(test_time) or {"rows": []},
                         markdown=lambda result: "x",
                         options={"--no-test-time": {"dest": "test_time", "action": "store_false", "help": "skip"}})
    table_main(["run"], **kwargs)
    table_main(["run", "--no-test-time"], **kwargs)
    assert calls == [True, False]


# ---------------------------------------------------------------------------- figures.py


def test_figure_main_saves_where_asked_and_only_update_committed_touches_the_committed_copy(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fpx.experiment import figure_main

    drawn = []

    def draw(run_dir):
        drawn.append(run_dir)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        return fig

    run, committed = tmp_path / "run", tmp_path / "committed"
    kwargs = dict(doc='"Figures of a demo run: more."', draw=draw, filename="demo.png", run_of="configs/demo.py",
                  committed_dir=committed)
    assert figure_main([str(run)], **kwargs) == 0
    assert (run / "demo.png").is_file() and not committed.exists() and drawn == [run]
    assert capsys.readouterr().out.strip() == str(run / "demo.png")
    assert figure_main([str(run), "--update-committed"], **kwargs) == 0 and (committed / "demo.png").is_file()
    with pytest.raises(SystemExit) as e:
        figure_main([str(run), "--out", str(tmp_path), "--update-committed"], **kwargs)
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        figure_main(["--help"], **kwargs)
    out = capsys.readouterr().out
    assert "Figures of a demo run: more." in out and "configs/demo.py" in out


# ---------------------------------------------------------------------------- standalone scripts


def test_script_main_measures_writes_and_regenerates_from_json(tmp_path, capsys):
    from fpx.experiment import script_main

    readme = tmp_path / "README.md"
    readme.write_text("# Demo\n<!-- demo:begin (generated) -->\nold\n<!-- demo:end -->\n")
    calls, drawn = [], []

    def run(quick, seeds=2):
        calls.append((quick, seeds))
        return {"rows": [seed * (1 if quick else 10) for seed in range(seeds)]}

    kwargs = dict(doc="A demo experiment: more.\n\nDetails.", run=run, markdown=lambda r: f"rows {r['rows']}",
                  readme=readme, section="demo", results_name="demo.json", default_out=tmp_path / "runs",
                  committed_dir=tmp_path / "committed", figure=lambda r, path: drawn.append(path) or path.write_text("png"),
                  figure_name="demo.png", options={"--seeds": {"type": int, "default": 2}})
    assert script_main(["--quick", "--seeds", "3"], **kwargs) == {"rows": [0, 1, 2]}
    assert json.loads((tmp_path / "runs" / "demo.json").read_text()) == {"rows": [0, 1, 2]}
    assert drawn == [tmp_path / "runs" / "demo.png"] and "old" in readme.read_text()  # no --update-committed
    assert capsys.readouterr().out.strip() == "rows [0, 1, 2]"
    # the committed section from a results file, without measuring
    assert script_main(["--from-json", str(tmp_path / "runs" / "demo.json"), "--update-committed"], **kwargs)
    assert calls == [(True, 3)] and generated_section(readme, "demo") == "rows [0, 1, 2]"
    assert json.loads((tmp_path / "committed" / "demo.json").read_text()) == {"rows": [0, 1, 2]}
    with pytest.raises(SystemExit) as e:
        script_main(["--from-json", str(tmp_path / "missing.json")], **kwargs)
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`figure` and `figure_name` together"):
        script_main([], **{**kwargs, "figure_name": None})
