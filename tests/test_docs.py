"""Every runnable example in the README and in public docstrings runs and its asserts hold."""

import inspect
import pathlib
import re

import pytest

import fpx
import fpx.experiment
import fpx.nn.nnx
import fpx.parallel

BLOCK = re.compile(r"```python\n(.*?)```", re.S)
ROOT = pathlib.Path(__file__).resolve().parents[1]


MODULES = {
    "fpx": fpx,
    "fpx.nn": fpx.nn,
    "fpx.nn.nnx": fpx.nn.nnx,
    "fpx.feasibility": fpx.feasibility,
    "fpx.projective": fpx.projective,
    "fpx.operators": fpx.operators,
    "fpx.parallel": fpx.parallel,
    "fpx.data": fpx.data,
    "fpx.experiment": fpx.experiment,
}


def _public_objects():
    for prefix, module in MODULES.items():
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                if getattr(obj, "__module__", "").startswith("fpx"):
                    yield f"{prefix}.{name}", obj


def _docstring_examples():
    for name, obj in _public_objects():
        for i, block in enumerate(BLOCK.findall(inspect.getdoc(obj) or "")):
            yield pytest.param(block, id=f"{name}-{i}")


@pytest.mark.parametrize("code", list(_docstring_examples()))
def test_docstring_example_runs(code):
    exec(compile(code, "<docstring>", "exec"), {})


def test_readme_examples_run():
    blocks = BLOCK.findall((ROOT / "README.md").read_text())
    assert blocks, "README.md has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_every_public_function_and_solver_has_an_example():
    documented = {name for name, obj in _public_objects() if BLOCK.search(inspect.getdoc(obj) or "")}
    must = {
        f"fpx.{name}"
        for name in ["fixed_point", "Picard", "KM", "Halpern", "Anderson", "Broyden", "NewtonKrylov"]
        + ["ImplicitAdjoint", "JFBAdjoint", "PhantomAdjoint", "UnrolledAdjoint"]
    } | {f"fpx.nn.{name}" for name in ["DEQ", "ContractiveCell", "SubDEQCell", "CGSCell", "jacobian_regularizer"]}
    must |= {"fpx.nn.nnx.DEQ", "fpx.feasibility.project_spectral_norm_ball"}
    must |= {f"fpx.projective.{n}" for n in ["Trainer", "project_margin", "project_max_graph", "prox_cross_entropy"]}
    must |= {f"fpx.operators.{n}" for n in ["FNO", "DeepONet", "GNN", "iterate", "deq", "relative_l2"]}
    must |= {f"fpx.data.{n}" for n in ["burgers", "darcy", "antiderivative", "digits"]}
    must |= {
        f"fpx.{n}"
        for n in ["argmin", "argmin_stochastic", "HypergradientExact", "HypergradientLinearSolve", "HypergradientFixedPoint"]
        + ["HypergradientNeumann", "HypergradientUnrolled"]
    }
    must |= {
        f"fpx.parallel.{n}"
        for n in ["scan", "jacobi_decode", "greedy_decode", "jacobi_trajectories", "consistency_loss"]
        + ["JacobiTrajectories", "ddim_sample", "picard_sample"]
    }
    assert must <= documented, f"missing examples: {sorted(must - documented)}"
