"""The "iterations improve accuracy" experiment (configs/operators/iterations.py) end to end through the runner."""

import json
import pathlib

import jax
import numpy as np
import pytest

import fpx.experiment as fx
from fpx.experiment._runner import _member_config, build_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "operators" / "iterations.py") + ":quick"
VARIANTS = ["k1", "k2", "k4", "k8", "deq"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_quick_preset_runs_every_variant_with_equal_parameter_counts(tmp_path, data_dir):
    workdir = tmp_path / "run"
    summary = fx.run(QUICK, workdir=workdir, progress=False)
    assert any(data_dir.iterdir()), "the Darcy data were not cached under $FPX_DATA_DIR"
    for name in ["config.json", "metrics.jsonl", "summary.json", "plots/curves.png"]:
        assert (workdir / name).exists(), name
    rows = {row["hparams"]["variant"]: row for row in summary["members"]}
    assert sorted(rows) == sorted(VARIANTS)
    assert summary["success_mask"] == [True] * len(VARIANTS)

    records = fx.read_metrics(workdir)
    keys = ["train/loss", "train/lr", "eval/loss", "eval/test_rel_l2", "eval/train_rel_l2", "eval/num_params"]
    for variant in VARIANTS:
        mine = [r for r in records if r["hparams"]["variant"] == variant]
        assert {r["step"] for r in mine} == {2, 4}, variant
        solver_keys = ["train/forward_steps", "eval/forward_steps", "eval/converged_fraction"]
        for key in keys + (solver_keys if variant == "deq" else []):
            values = [r[key] for r in mine]
            assert values and np.all(np.isfinite(values)), (variant, key)
        if variant != "deq":
            assert not any(k in mine[0] for k in solver_keys), variant
    # Relative L2 errors of a barely trained model: positive and O(1).
    assert all(0.0 < rows[v]["eval/test_rel_l2"] < 10.0 for v in VARIANTS)
    assert all(rows[v]["eval/converged_fraction"] == 1.0 for v in ["deq"])

    # Equal parameter counts: the k variants (and the DEQ) differ only in how often the
    # block is applied. Counted from the trained state in the run ...
    counts = {v: rows[v]["eval/num_params"] for v in VARIANTS}
    assert len(set(counts.values())) == 1, counts
    # ... and from freshly built models: the same parameter tree, shapes and dtypes.
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["width"] == 8 and config["dtype"] == "float32"
    cfg = fx.resolve_config(QUICK)
    members = {m["variant"]: m for m in fx.expand_sweep(cfg)}
    shapes = {}
    for v in VARIANTS:
        task = build_task(_member_config(cfg, members[v]))
        shapes[v] = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
        assert task.is_deq == (v == "deq")
    for v in VARIANTS:
        assert shapes[v] == shapes["k1"], v
    leaves = jax.tree_util.tree_leaves(shapes["k1"])
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    assert counts["k1"] == sum(leaf.size for leaf in leaves)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.widht": "8"}, r"unknown config key 'model.widht'.*Did you mean 'model.width'"),
        ({"model.kind": "'loop'"}, r"'model.kind' = 'loop' is not allowed: it must be one of 'iterate', 'deq'"),
        ({"model.relax": "1.0"}, r"'model.relax' = 1.0 is not allowed"),
        ({"model.k": "0"}, r"'model.k' = 0 is not allowed"),
        ({"train.lr_schedule": "'step'"}, r"'train.lr_schedule' = 'step' is not allowed"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(fx.ConfigError, match=message):
        fx.resolve_config(QUICK, overrides)
