"""Every experiment config has a `:quick` preset that runs end to end in the suite, every preset
validates, every README command names an existing config (validating with its overrides) or
script, and same-seed runs write identical metrics."""

import ast
import json
import pathlib
import re
import shlex

import pytest

from fpx.cli import main
from fpx.experiment import (
    config_module,
    expand_sweep,
    load_config,
    member_config,
    resolve_config,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.py"))
# Quick presets run by their own feature tests (with more detailed checks).
RUN_ELSEWHERE = {
    "configs/quickstart.py": "tests/test_experiment.py",
    "configs/fno/burgers.py": "tests/test_operator_experiments.py",
    "configs/deeponet/antiderivative.py": "tests/test_operator_experiments.py",
    "configs/operators/iterations.py": "tests/test_iterations_experiment.py",
    "configs/operators/darcy_benchmark.py": "tests/test_darcy_benchmark.py",
    "configs/parallel/jacobi_decoding.py": "tests/test_parallel_tasks.py",
    "configs/parallel/parallel_sampling.py": "tests/test_parallel_tasks.py",
    "configs/ign/moons.py": "tests/test_ign.py",
    "configs/lpn/laplacian.py": "tests/test_lpn.py",
    "configs/lpn/pnp.py": "tests/test_lpn.py",
    "configs/cgs/value_iteration.py": "tests/test_cgs.py",
    "configs/fpdm/digits.py": "tests/test_fpdm.py",
    "configs/subdeq/subdeq.py": "tests/test_subdeq.py",
    "configs/hypergradients/global_l2.py": "tests/test_hypergradient_task.py",
    "configs/hypergradients/global_l2_grid.py": "tests/test_hypergradient_task.py",
}


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_has_a_quick_preset(path):
    module = config_module(ROOT / path)
    assert "quick" in module.PRESETS, f"{path} needs a 'quick' preset (run by the test suite)"
    load_config(f"{ROOT / path}:quick")


def _presets(path):
    return [(path, preset) for preset in config_module(ROOT / path).PRESETS]


@pytest.mark.parametrize("path,preset", [pp for path in CONFIGS for pp in _presets(path)])
def test_every_preset_validates_and_expands(path, preset):
    # What `fpx run` checks before anything trains: the README commands run the default
    # presets, which are too long for the suite, so each preset is at least validated here.
    config = resolve_config(f"{ROOT / path}:{preset}")
    members = expand_sweep(config)
    assert members, f"{path}:{preset} has no sweep members"
    for member in members:
        member_config(config, member)


def _readme_commands():
    """`(readme, argv)` of every command in a ```bash block of README.md and experiments/*/README.md."""
    out = []
    for readme in [ROOT / "README.md", *sorted((ROOT / "experiments").glob("*/README.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.DOTALL):
            for line in block.splitlines():
                argv = shlex.split(line, comments=True)
                if argv and not argv[0].startswith("#"):
                    out.append((readme.relative_to(ROOT).as_posix(), argv))
    return out


README_COMMANDS = _readme_commands()
SHARED_CLI_FLAGS = {
    "table_main": ("--save", "--note", "--from-results"),
    "figure_main": ("--out", "--update-committed"),
    "script_main": ("--out", "--update-committed", "--quick", "--from-json"),
}


@pytest.mark.parametrize("readme,argv", README_COMMANDS, ids=[" ".join(a)[:80] for _, a in README_COMMANDS])
def test_readme_commands_exist_and_validate(readme, argv):
    # A new user copies these lines: the config (and preset) must exist and validate with the
    # overrides shown, and a script must exist and take the flags shown.
    if argv[:2] == ["fpx", "run"]:
        overrides = dict(a[len("--config."):].split("=", 1) for a in argv if a.startswith("--config."))
        resolve_config(str(ROOT / argv[2]), overrides)
    elif argv[0] in ("python", ".venv/bin/python"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{readme}: {argv[1]} does not exist"
        source = script.read_text()
        # Options of the shared command lines the scripts call (fpx.experiment.table_main, figure_main).
        shared = {flag for call, flags in SHARED_CLI_FLAGS.items() if f"{call}(" in source for flag in flags}
        for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source or flag in shared, f"{readme}: {argv[1]} has no option {flag}"
    else:
        assert argv[0] in ("fpx", "pip", "make", "sbatch"), f"{readme}: unexpected command {argv}"


def _quick_spec_names(tree: ast.Module, path: str) -> set[str]:
    """Module-level names bound to `str(ROOT / "configs" / ... ) + ":quick"` for `path`."""
    parts = pathlib.PurePosixPath(path).parts
    names = set()
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.BinOp)):
            continue
        left, right = node.value.left, node.value.right
        if not (isinstance(right, ast.Constant) and right.value == ":quick"):
            continue
        if not (isinstance(left, ast.Call) and getattr(left.func, "id", None) == "str" and len(left.args) == 1):
            continue
        chain, arg = [], left.args[0]
        while isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Div) and isinstance(arg.right, ast.Constant):
            chain.insert(0, arg.right.value)
            arg = arg.left
        if getattr(arg, "id", None) == "ROOT" and tuple(chain) == parts:
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _runs(node: ast.AST) -> bool:
    calls = (n for n in ast.walk(node) if isinstance(n, ast.Call))
    return any(getattr(c.func, "attr", getattr(c.func, "id", None)) in ("run", "main") for c in calls)


@pytest.mark.parametrize("path", sorted(RUN_ELSEWHERE))
def test_quick_presets_not_run_here_are_run_by_their_test(path):
    # The listed test module binds the `:quick` spec of `path` and has a test that
    # references it (directly or in its parametrization) and runs the runner or the CLI.
    assert path in CONFIGS, f"{path} is listed in RUN_ELSEWHERE but is not a config under configs/"
    tree = ast.parse((ROOT / RUN_ELSEWHERE[path]).read_text())
    names = _quick_spec_names(tree, path)
    assert names, f"{RUN_ELSEWHERE[path]} defines no `str(ROOT / ...{path!r}) + ':quick'` spec"
    runners = [
        f.name
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and f.name.startswith("test_") and _runs(f)
        and names & {n.id for n in ast.walk(f) if isinstance(n, ast.Name)}
    ]
    assert runners, f"no test in {RUN_ELSEWHERE[path]} runs {path}:quick"


# The final figures of every member of the `:quick` presets run here (deterministic: fixed
# seeds, fixed data split; float32 models under the suite's settings). A change of solver,
# model, data or runner that moves them is caught here; re-derive them if it is intended.
KNOWN = {
    "configs/deq/digits.py": {
        "implicit-anderson": {
            "eval/accuracy": 0.6333333, "eval/loss": 1.6261611, "train/loss": 1.7606291,
            "train/forward_steps": 9.1546879, "train/backward_steps": 7.8578124, "eval/converged_fraction": 1.0,
        },
        "jfb-anderson": {
            "eval/accuracy": 0.625, "eval/loss": 1.6449677, "train/loss": 1.7808851,
            "train/forward_steps": 9.3640623, "train/backward_steps": 0.0, "eval/converged_fraction": 1.0,
        },
        "mlp": {"eval/accuracy": 0.4, "eval/loss": 1.9677010, "train/loss": 2.0761073},
    },
    "configs/parallel/gru_digits.py": {
        # The DEER-trained GRU's figures equal lax.scan training's (implicit gradients).
        "deer": {
            "eval/accuracy": 0.2972222, "eval/loss": 2.0796063, "train/loss": 2.1407313,
            "eval/forward_steps": 3.0166667, "eval/converged_fraction": 1.0,
        },
        "sequential": {"eval/accuracy": 0.2972222, "eval/loss": 2.0796063, "train/loss": 2.1407313},
    },
    "configs/projective/models.py": {
        # Every model by the default Trainer (3 inner steps here), the binary network by Adam through
        # its straight-through signs.
        "binary-adam": {"eval/accuracy": 0.1277778, "eval/loss": 2.4811616, "train/loss": 2.333003},
        "binary-dr": {"eval/accuracy": 0.1277778, "eval/loss": 2.4602273, "train/loss": 2.2256556, "train/inner_steps": 3.0},
        "cnn-dr": {"eval/accuracy": 0.0861111, "eval/loss": 3.6637967, "train/loss": 3.2775335, "train/inner_steps": 3.0},
        "mlp-dr": {"eval/accuracy": 0.1888889, "eval/loss": 2.4025362, "train/loss": 2.2623045, "train/inner_steps": 3.0},
        "rnn-dr": {"eval/accuracy": 0.0444444, "eval/loss": 2.8253875, "train/loss": 2.4499588, "train/inner_steps": 3.0},
        "skip-dr": {"eval/accuracy": 0.2333333, "eval/loss": 2.2310667, "train/loss": 1.7558262, "train/inner_steps": 3.0},
        "ternary-dr": {"eval/accuracy": 0.175, "eval/loss": 2.2450981, "train/loss": 2.3070951, "train/inner_steps": 3.0},
    },
    "configs/projective/digits.py": {
        "adam": {"eval/accuracy": 0.1111111, "eval/loss": 2.7316430, "train/loss": 2.6058397},
        "dr-skip": {
            "eval/accuracy": 0.55, "eval/loss": 1.5450760, "train/loss": 1.0890522,
            "train/inner_steps": 5.0, "train/infeasible_fraction": 0.0,
        },
    },
}


def test_every_quick_preset_is_run_somewhere():
    assert sorted(KNOWN) == sorted(p for p in CONFIGS if p not in RUN_ELSEWHERE)


@pytest.mark.parametrize("path", sorted(KNOWN))
def test_quick_preset_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    workdir = tmp_path / "run"
    assert main(["run", f"{ROOT / path}:quick", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    steps = load_config(f"{ROOT / path}:quick").train.steps
    rows = {row["hparams"]["variant"]: row for row in summary["members"]}
    assert sorted(rows) == sorted(KNOWN[path])
    assert summary["success_mask"] == [True] * len(rows)
    for variant, figures in KNOWN[path].items():
        row = rows[variant]
        assert row["status"] == "ok" and row["step"] == steps, (variant, row["status"], row["step"])
        for key, value in figures.items():
            assert row[key] == pytest.approx(value, rel=1e-3, abs=1e-6), f"{variant}: {key} = {row[key]}, expected {value}"
    text = json.dumps(summary)
    assert "NaN" not in text and "Infinity" not in text


def test_same_seed_runs_write_identical_metrics(tmp_path, monkeypatch):
    # Issue 12 found two same-seed DeepONet runs apart (the FNO shares its training loop).
    # The first run generates the data set, the second reads it from the cache: both paths
    # must give the same bits. (Same machine and CPU count; with another number of CPUs XLA
    # splits reductions differently: experiments/deeponet/README.md, "Reproducibility".)
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    lines = []
    for run in ("a", "b"):
        assert main(["run", f"{ROOT / 'configs/deeponet/antiderivative.py'}:quick", "--workdir", str(tmp_path / run)]) == 0
        lines.append((tmp_path / run / "metrics.jsonl").read_text().splitlines())
    assert lines[0] and lines[0] == lines[1]
