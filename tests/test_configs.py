"""Every experiment config has a `:quick` preset, and each preset runs end to end in the suite."""

import json
import pathlib

import pytest

from fpx.cli import main
from fpx.experiment._config import config_module, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.py"))
# Quick presets run by their own feature tests (with more detailed checks).
RUN_ELSEWHERE = {
    "configs/quickstart.py": "tests/test_experiment.py",
    "configs/fno/burgers.py": "tests/test_operator_experiments.py",
    "configs/deeponet/antiderivative.py": "tests/test_operator_experiments.py",
    "configs/operators/iterations.py": "tests/test_iterations_experiment.py",
}


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_has_a_quick_preset(path):
    module = config_module(ROOT / path)
    assert "quick" in module.PRESETS, f"{path} needs a 'quick' preset (run by the test suite)"
    load_config(f"{ROOT / path}:quick")


def test_quick_presets_not_run_elsewhere_are_listed():
    for path, test in RUN_ELSEWHERE.items():
        assert (ROOT / path).exists() and (ROOT / test).exists(), (path, test)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in RUN_ELSEWHERE])
def test_quick_preset_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    workdir = tmp_path / "run"
    assert main(["run", f"{ROOT / path}:quick", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary, "the run wrote an empty summary"
    text = json.dumps(summary)
    assert "NaN" not in text and "nan" not in text.lower().replace("nano", "")
