"""The documentation site builds strictly and its API reference documents every public object.

`mkdocs build --strict` (mkdocs.yml at the root, sources in docs/) fails on a broken link or
anchor, a page missing from the nav, a `::: name` that mkdocstrings cannot resolve and any
other warning. The public objects are the explicit re-exports (`from ._x import y as y`) of
each public package's `__init__.py`, the lazy attributes of `fpx`, and what a public plain
module (`fpx.nn.nnx`) defines; each must have an entry (an HTML id) on an API page under its
own path or under another public path of the same object.
"""

import ast
import html as html_module
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = [
    "fpx", "fpx.solvers", "fpx.nn", "fpx.nn.nnx", "fpx.feasibility", "fpx.projective",
    "fpx.operators", "fpx.data", "fpx.parallel", "fpx.experiment",
]


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    path = pathlib.Path(module.__file__)
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py":
        names = [
            alias.name
            for node in tree.body  # top level only: not the `if TYPE_CHECKING:` block
            if isinstance(node, ast.ImportFrom) and node.level >= 1
            for alias in node.names
            if alias.asname == alias.name and not alias.name.startswith("_")
        ]
    else:
        names = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("_")]
    names += list(getattr(module, "_LAZY_ATTRIBUTES", {}))
    return names


def public_objects() -> dict[str, object]:
    return {
        f"{name}.{attr}": getattr(importlib.import_module(name), attr) for name in PACKAGES for attr in public_names(name)
    }


def test_public_names_are_found():
    objects = public_objects()
    for path in ["fpx.fixed_point", "fpx.feasible_point", "fpx.nn.nnx.DEQ", "fpx.projective.SUPPORTED", "fpx.experiment.run"]:
        assert path in objects
    assert "fpx.nn.nnx.initial_state" not in objects  # a helper nnx.py imports, not its API


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


def test_site_builds_strictly(site):
    for page in ["index.html", "getting-started/index.html", "api/core/index.html", "papers/index.html", "design/index.html"]:
        assert (site / page).is_file(), page


def test_every_public_object_is_in_the_api_reference(site):
    ids = set()
    for page in (site / "api").rglob("index.html"):
        ids |= set(re.findall(r'id="(fpx[\w.]*)"', page.read_text()))
    objects = public_objects()
    missing = []
    for path, obj in objects.items():
        aliases = {p for p, o in objects.items() if o is obj}
        if not aliases & ids:
            missing.append(path)
    assert not missing, f"public objects without an entry in docs/api/*.md: {missing}"


def test_api_pages_show_annotated_signatures_and_examples(site):
    html = (site / "api" / "core" / "index.html").read_text()
    text = html_module.unescape(re.sub(r"<[^>]+>", "", html))
    assert "max_steps: int = 256" in text  # fixed_point's signature, annotations included
    assert "memory: int = 5" in text  # an equinox Module's fields as its signature (Anderson)
    assert 'class="highlight"' in html and "sol = fpx.fixed_point(cell, jnp.zeros(3)" in text  # examples as code


def test_papers_page_has_a_row_per_experiment():
    # docs/papers.md promises one row per experiment directory: a new experiment must add its row.
    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "docs" / "papers.md").read_text()
    missing = [d.name for d in sorted((root / "experiments").iterdir())
               if d.is_dir() and f"| `experiments/{d.name}` |" not in text]
    assert not missing, f"docs/papers.md has no row for experiments/{missing}"
