"""The operator-learning experiments (FNO Burgers, DeepONet antiderivative) end to end through the runner."""

import json
import pathlib

import numpy as np
import pytest

import fpx.experiment as fx
from fpx.experiment._runner import build_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
FNO = str(ROOT / "configs" / "fno" / "burgers.py") + ":quick"
DEEPONET = str(ROOT / "configs" / "deeponet" / "antiderivative.py") + ":quick"


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _curve(workdir, key):
    records = sorted(fx.read_metrics(workdir), key=lambda r: r["step"])
    assert records, "no metrics written"
    return [r[key] for r in records]


@pytest.mark.parametrize(
    "spec, extra_metrics",
    [
        (FNO, ["eval/test_rel_l2", "eval/zero_shot_rel_l2", "eval/zero_shot_ratio", "eval/train_rel_l2", "train/lr"]),
        (DEEPONET, ["eval/test_mse", "eval/test_rel_l2", "eval/train_functions_mse", "train/lr"]),
    ],
    ids=["fno_burgers", "deeponet_antiderivative"],
)
def test_quick_preset_trains_end_to_end(spec, extra_metrics, tmp_path, data_dir):
    workdir = tmp_path / "run"
    summary = fx.run(spec, workdir=workdir, progress=False)
    assert summary["success_mask"] == [True]
    for name in ["config.json", "metrics.jsonl", "summary.json", "plots/curves.png"]:
        assert (workdir / name).exists(), name
    assert any(data_dir.iterdir()), "the data set was not cached under $FPX_DATA_DIR"
    records = fx.read_metrics(workdir)
    for key in ["train/loss", "eval/loss", *extra_metrics]:
        values = [r[key] for r in records]
        assert values and np.all(np.isfinite(values)), key
    # Training improves the fit: the loss after training is below the loss before.
    train, test = _curve(workdir, "train/loss"), _curve(workdir, "eval/loss")
    assert train[-1] < train[0] and test[-1] < test[0], (train, test)
    row = json.loads((workdir / "summary.json").read_text())["members"][0]
    assert row["eval/loss"] == test[-1]


def test_fno_zero_shot_uses_the_same_test_functions(data_dir):
    task = build_task(fx.resolve_config(FNO))
    stride = task.x_eval.shape[1] // task.x_test.shape[1]
    assert stride == 2
    np.testing.assert_array_equal(task.x_eval[:, ::stride], task.x_test)
    np.testing.assert_array_equal(task.y_eval[:, ::stride], task.y_test)
    assert task.x_train.dtype == np.float32 and task.steps_per_epoch == 4


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (FNO, {"data.n_trian": "10"}, r"unknown config key 'data.n_trian'.*Did you mean 'data.n_train'"),
        (FNO, {"data.s": "48"}, r"'data.s' = 48 is not allowed: it must be a power of two"),
        (FNO, {"schedule.name": "linear"}, r"'schedule.name' = 'linear' is not allowed"),
        (FNO, {"sweep.seed": "[0, -1.5]"}, r"sweep value for seed"),
        (DEEPONET, {"model.latnet": "8"}, r"unknown config key 'model.latnet'.*Did you mean 'model.latent'"),
        (DEEPONET, {"model.activation": "'swish'"}, r"'model.activation' = 'swish' is not allowed"),
    ],
)
def test_operator_configs_are_validated(spec, overrides, message):
    with pytest.raises(fx.ConfigError, match=message):
        fx.resolve_config(spec, overrides)


@pytest.mark.parametrize("spec", [FNO, DEEPONET])
def test_operator_task_errors_name_the_keys(spec, data_dir):
    key = "data.batch_size"
    with pytest.raises(fx.ConfigError, match=r"'data.batch_size' \(100000\) exceeds"):
        build_task(fx.resolve_config(spec, {key: "100000"}))


@pytest.mark.parametrize("spec", [FNO, DEEPONET])
def test_seed_and_lr_sweeps_are_vmapped(spec):
    cfg = fx.resolve_config(spec, {"sweep.seed": "[0, 1]", "sweep.lr": "[1e-3, 3e-3]"})
    assert len(fx.expand_sweep(cfg)) == 4
    # Dynamic keys are traced per member: the whole sweep is one compiled, vmapped program.
    assert {"seed", "optim.lr"} <= set(fx.TASKS[cfg.experiment].dynamic)
