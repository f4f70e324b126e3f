"""`import fpx` is light: the subpackages and their dependencies load on first use.

Every check runs in a fresh interpreter (this process has imported everything already).
No wall-clock assertion (it would flake on a loaded machine): the number of modules that
`import fpx` adds to `import jax` stands in for its cost; `benchmarks/bench_import.py`
measures the seconds.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("flax", "orbax", "ml_collections", "matplotlib", "sklearn", "scipy", "tqdm", "optax")
LAZY = ("data", "experiment", "feasibility", "nn", "operators", "parallel", "projective")


def fresh(code: str) -> dict:
    """Run `code` in a new interpreter; it ends by printing one JSON value, returned here."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def loaded(modules, package):
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def test_import_fpx_loads_no_heavy_dependency_and_no_subpackage():
    out = fresh(
        "import json, sys; import jax; before = set(sys.modules); import fpx;"
        "print(json.dumps({'all': sorted(sys.modules), 'new': sorted(set(sys.modules) - before)}))"
    )
    modules = out["all"]
    for name in HEAVY:
        assert not loaded(modules, name), f"`import fpx` loads {name}: {loaded(modules, name)[:5]}"
    for sub in LAZY:
        assert f"fpx.{sub}" not in modules, f"`import fpx` imports fpx.{sub} eagerly"
    # A deterministic stand-in for import time: before the lazy imports `import fpx` added
    # 784 modules to `import jax` (scipy, optax, tqdm, ...); now about 150.
    assert len(out["new"]) < 300, len(out["new"])


def test_public_names_are_reachable_by_attribute_access():
    out = fresh(
        "import json, fpx;"
        "names = [fpx.fixed_point, fpx.Picard, fpx.KM, fpx.Anderson, fpx.ImplicitAdjoint, fpx.Solution, fpx.RESULTS,"
        " fpx.feasible_point, fpx.nn.DEQ, fpx.nn.nnx.DEQ, fpx.data.darcy, fpx.data.digits, fpx.experiment.run,"
        " fpx.experiment.register_task, fpx.feasibility.project_box, fpx.operators.FNO, fpx.projective.Trainer];"
        "print(json.dumps({'names': [getattr(n, '__name__', type(n).__name__) for n in names],"
        " 'same': fpx.feasible_point is fpx.feasibility.feasible_point,"
        " 'version': fpx.__version__}))"
    )
    assert out["names"][:2] == ["fixed_point", "Picard"]
    assert out["names"][7:14] == ["feasible_point", "DEQ", "DEQ", "darcy", "digits", "run", "register_task"]
    assert out["same"] and out["version"] == "0.1.0"


def test_nnx_is_an_attribute_of_fpx_nn():
    # The README's `fpx.nn.nnx.DEQ` after a plain `import fpx`.
    out = fresh(
        "import json, sys, fpx; import fpx.nn; flax_before = 'flax' in sys.modules; deq = fpx.nn.nnx.DEQ;"
        "print(json.dumps([flax_before, 'flax' in sys.modules, deq.__module__]))"
    )
    assert out == [False, True, "fpx.nn.nnx"]


def test_dir_lists_every_lazy_name_and_unknown_names_raise():
    out = fresh(
        "import json, sys, fpx, fpx.nn;"
        "listed = dir(fpx); nn_listed = dir(fpx.nn); still_lazy = 'fpx.data' not in sys.modules;"
        "err = None\n"
        "try:\n    fpx.nope\n"
        "except AttributeError as e:\n    err = str(e)\n"
        "print(json.dumps({'dir': listed, 'nn': nn_listed, 'lazy': still_lazy, 'err': err}))"
    )
    assert set(LAZY) | {"feasible_point", "fixed_point", "Picard", "__version__"} <= set(out["dir"])
    assert {"nnx", "DEQ", "ContractiveCell"} <= set(out["nn"])
    assert out["lazy"], "dir(fpx) must not import the subpackages"
    assert out["err"] == "module 'fpx' has no attribute 'nope'"


@pytest.mark.parametrize(
    "module, absent",
    [
        ("fpx.nn", ("flax", "orbax", "ml_collections", "matplotlib", "sklearn", "scipy", "tqdm")),
        ("fpx.operators", ("flax", "orbax", "ml_collections", "matplotlib", "sklearn", "scipy", "tqdm")),
        ("fpx.data", ("flax", "orbax", "ml_collections", "matplotlib", "sklearn", "optax")),
        ("fpx.experiment", ("flax", "orbax", "matplotlib", "sklearn", "scipy", "tqdm")),
    ],
)
def test_a_subpackage_loads_only_what_it_needs(module, absent):
    modules = fresh(f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))")
    assert module in modules
    for name in absent:
        assert not loaded(modules, name), f"`import {module}` loads {name}"


def test_registries_are_read_only_views():
    out = fresh(
        "import json, fpx\n"
        "fx = fpx.experiment\n"
        "errors = []\n"
        "for reg in (fx.SOLVERS, fx.ADJOINTS, fx.OPTIMIZERS, fx.TASKS):\n"
        "    try:\n        reg['x'] = None\n"
        "    except TypeError:\n        errors.append(type(reg).__name__)\n"
        "empty = len(fx.TASKS)\n"
        "fx.register_task('toy')(lambda config: None)\n"
        "print(json.dumps({'errors': errors, 'empty': empty, 'toy': 'toy' in fx.TASKS,"
        " 'builtin': sorted(fx.load_tasks())}))"
    )
    assert out["errors"] == ["mappingproxy"] * 4
    assert out["empty"] == 0 and out["toy"]
    assert {"toy", "deq_classifier", "projective_classifier", "fno_burgers"} <= set(out["builtin"])
