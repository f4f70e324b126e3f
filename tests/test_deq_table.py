"""experiments/deq/table.py: the DEQ-digits README table is generated from results.json, and
`collect` reads the runner's files (config.json, metrics.jsonl, timing.jsonl) correctly."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table():
    spec = importlib.util.spec_from_file_location("deq_table", ROOT / "experiments/deq/table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_what_results_json_regenerates():
    table = _table()
    results = json.loads(table.RESULTS.read_text())
    assert table.readme_section() == table.markdown(results)


def _write_run(path: pathlib.Path):
    config = {
        "model": {"kind": "deq", "width": 8},
        "adjoint": {"name": "implicit"},
        "solver": {"name": "anderson"},
        "train": {"steps": 20},
        "sweep": {"seed": [0, 1]},
        "variants": {"implicit-picard": {"solver": {"name": "picard"}}, "jfb-anderson": {"adjoint": {"name": "jfb"}},
                     "mlp": {"model": {"kind": "mlp"}}},
    }
    (path / "config.json").write_text(json.dumps(config))
    records, timing = [], []
    for member, (variant, unit) in enumerate([("implicit-picard", 0), ("implicit-picard", 0), ("jfb-anderson", 1),
                                              ("jfb-anderson", 1), ("mlp", 2), ("mlp", 2)]):
        seed = member % 2
        for step, fwd in ((10, 4.0), (20, 6.0)):
            r = {"member": member, "unit": unit, "step": step, "hparams": {"variant": variant, "seed": seed},
                 "eval/accuracy": 0.5 + 0.1 * seed + step / 100, "eval/loss": 1.0 - step / 100}
            if variant != "mlp":
                r |= {"train/forward_steps": fwd, "train/backward_steps": fwd / 2, "eval/converged_fraction": 1.0}
            records.append(r)
    for unit, times in enumerate(([3.0, 5.0, 4.0], [2.0, 2.0], [1.0])):
        timing += [{"unit": unit, "ms_per_step": t, "step": 10 * (i + 1)} for i, t in enumerate(times)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "timing.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timing))


def test_collect_reads_the_run_directory(tmp_path):
    _write_run(tmp_path)
    result = _table().collect(tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["implicit-picard", "jfb-anderson", "mlp"]  # the config's order
    picard, jfb, mlp = rows["implicit-picard"], rows["jfb-anderson"], rows["mlp"]
    # last evaluation, mean over the two seeds: 0.5 + 0.2 and 0.6 + 0.2
    assert picard["accuracy_mean"] == pytest.approx(0.75) and picard["accuracy_sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert picard["loss"] == pytest.approx(0.8) and picard["step"] == 20 and picard["seeds"] == 2
    assert picard["forward_steps"] == pytest.approx(5.0) and picard["backward_steps"] == pytest.approx(2.5)
    assert picard["solver"] == "picard" and picard["gradient"] == "implicit"
    assert picard["ms_per_step"] == pytest.approx(4.0)  # the median of the unit's chunks
    assert jfb["backward_steps"] is None and jfb["gradient"] == "JFB (one step)" and jfb["solver"] == "anderson"
    assert mlp["forward_steps"] is None and mlp["solver"] is None and mlp["ms_per_step"] == pytest.approx(1.0)
    assert result["setup"] == {"steps": 20, "width": 8, "seeds": 2}
    text = _table().markdown(result)
    assert "| implicit-picard | implicit | picard | 75.0 ± 7.1 % | 0.800 | 5.0 | 2.5 | 4.00 |" in text
