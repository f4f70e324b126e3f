"""The "iterations improve accuracy" experiment (configs/operators/iterations.py) end to end through the runner."""

import json
import pathlib

import jax
import numpy as np
import pytest

import fpx.experiment as fx
from fpx.experiment import build_task, member_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "operators" / "iterations.py") + ":quick"
VARIANTS = ["k1", "k2", "k4", "k8", "deq"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


# Measured on the quick preset (float32, seeded, deterministic): every variant's test rel. L2 goes
# from 0.950-0.953 untrained to 0.932-0.934 after 2 steps and 0.925-0.927 after 4; the DEQ's
# forward solves take 4 of the 10 allowed steps.
FINAL_TEST_REL_L2_BELOW = 0.935


def _parameter_count(width, modes, projection_width):
    """Lift Linear(3, w) (the coefficient a and two grid coordinates), one FNOBlock (real and
    imaginary spectral weights of shape (w, w, 2m, m), a pointwise Linear(w, w)), projection w -> p -> 1."""
    lift = 3 * width + width
    block = 2 * width * width * (2 * modes) * modes + width * width + width
    projection = width * projection_width + projection_width + projection_width + 1
    return lift + block + projection


def test_quick_preset_runs_every_variant_with_equal_parameter_counts(tmp_path, data_dir):
    workdir = tmp_path / "run"
    summary = fx.run(QUICK, workdir=workdir, progress=False)
    assert any(data_dir.iterdir()), "the Darcy data were not cached under $FPX_DATA_DIR"
    for name in ["config.json", "metrics.jsonl", "summary.json", "plots/curves.png"]:
        assert (workdir / name).exists(), name
    rows = {row["hparams"]["variant"]: row for row in summary["members"]}
    assert sorted(rows) == sorted(VARIANTS)
    assert summary["success_mask"] == [True] * len(VARIANTS)

    # metrics.jsonl: one line per variant and evaluation (steps 2 and 4), with exactly these keys.
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(VARIANTS)
    records = [json.loads(line) for line in lines]
    keys = {"train/loss", "train/lr", "eval/loss", "eval/test_rel_l2", "eval/train_rel_l2", "eval/num_params"}
    solver_keys = {"train/forward_steps", "eval/forward_steps", "eval/converged_fraction", "train/converged_fraction", "train/skipped_fraction"}
    # The logged lr is the mean over each chunk of the cosine schedule 3e-3 (1 + cos(pi t / 4)) / 2.
    t = np.arange(4)
    lr_means = (3e-3 * (1 + np.cos(np.pi * t / 4)) / 2).reshape(2, 2).mean(axis=1)
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["width"] == 8 and config["dtype"] == "float32"
    assert config["max_steps"] == 10
    for variant in VARIANTS:
        mine = sorted((r for r in records if r["hparams"]["variant"] == variant), key=lambda r: r["step"])
        assert [r["step"] for r in mine] == [2, 4], variant
        expected = keys | {"hparams", "member", "step", "unit"} | (solver_keys if variant == "deq" else set())
        for r in mine:
            assert set(r) == expected, (variant, set(r) ^ expected)
            assert r["eval/loss"] == r["eval/test_rel_l2"]
        np.testing.assert_allclose([r["train/lr"] for r in mine], lr_means, rtol=1e-6)
        # Training lowers both the training loss and the test error at every evaluation.
        assert mine[1]["train/loss"] < mine[0]["train/loss"], variant
        assert mine[1]["eval/test_rel_l2"] < mine[0]["eval/test_rel_l2"] < 0.94, variant
        assert mine[1]["eval/test_rel_l2"] < FINAL_TEST_REL_L2_BELOW, variant
        assert rows[variant]["eval/test_rel_l2"] == mine[1]["eval/test_rel_l2"]
        if variant == "deq":
            for r in mine:  # every forward solve converged in 4 steps (cap 10), none skipped
                assert r["eval/converged_fraction"] == 1.0 and r["train/converged_fraction"] == 1.0
                assert r["eval/forward_steps"] == 4.0 and r["train/forward_steps"] == 4.0  # measured, deterministic
                assert r["train/skipped_fraction"] == 0.0

    # Equal parameter counts: the k variants (and the DEQ) differ only in how often the
    # block is applied. Counted from the trained state in the run, against the closed form ...
    m = config["model"]
    count = _parameter_count(m["width"], m["modes"], m["projection_width"])
    assert count == 4361
    assert {rows[v]["eval/num_params"] for v in VARIANTS} == {float(count)}
    # ... and from freshly built models: the same parameter tree, shapes and dtypes.
    cfg = fx.resolve_config(QUICK)
    members = {m["variant"]: m for m in fx.expand_sweep(cfg)}
    shapes = {}
    for v in VARIANTS:
        task = build_task(member_config(cfg, members[v]))
        shapes[v] = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
        assert task.is_deq == (v == "deq")
    for v in VARIANTS:
        assert shapes[v] == shapes["k1"], v
    leaves = jax.tree_util.tree_leaves(shapes["k1"])
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    assert count == sum(leaf.size for leaf in leaves)


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
