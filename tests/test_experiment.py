"""The experiment runner: config validation, CLI, vmapped/sharded/sliced sweeps, resume."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fpx.experiment as fx
from fpx.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.py") + ":quick"
F64 = {"dtype": "float64"}
# Report columns without wall-clock time, so that tables of equal runs compare equal.
DETERMINISTIC = [c for c in fx.REPORT_COLUMNS if c != "ms_per_step"]


def metrics_by_member(workdir):
    out = {}
    for r in fx.read_metrics(pathlib.Path(workdir)):
        out.setdefault(r["hparams"]["optim.lr"], []).append(r)
    return out


def assert_same_metrics(a, b, rtol=1e-6):
    assert sorted(a) == sorted(b)
    for lr in a:
        ra, rb = sorted(a[lr], key=lambda r: r["step"]), sorted(b[lr], key=lambda r: r["step"])
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb):
            for k in x:
                if k.startswith(("train/", "eval/")):
                    np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=1e-12, err_msg=f"{k} at lr={lr}")


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.lrr": "0.1"}, r"unknown config key 'optim.lrr'.*Did you mean 'lr'"),
        ({"trian.steps": "10"}, r"unknown config key 'trian.steps'.*Did you mean 'train.steps'"),
        ({"solver.memroy": "3"}, r"unknown config key 'solver.memroy'.*Did you mean 'memory'"),
        ({"train.steps": "1.5"}, r"'train.steps' expects int .* got float 1.5"),
        ({"model.kind": "3"}, r"'model.kind' expects str"),
        ({"optim.lr": "-1"}, r"'optim.lr' = -1.0 is not allowed: it must be a positive number"),
        ({"solver.memory": "0"}, r"invalid 'solver' settings .*Anderson\(memory=...\)` must be .*, got 0"),
        ({"solver.name": "andersen"}, r"unknown solver name 'andersen'.*Did you mean 'anderson'"),
        ({"adjoint.name": "implict"}, r"unknown adjoint name 'implict'.*Did you mean 'implicit'"),
        ({"sweep.lrate": "[1e-3]"}, r"unknown sweep key 'lrate'"),
        ({"sweep.lr": "[1e-3, -2.0]"}, r"sweep value -2.0 for 'optim.lr' is not allowed"),
        ({"sweep.lr": "0.1"}, r"sweep values must be a non-empty list"),
        ({"train.eval_every": "7"}, r"'train.steps' \(40\) must be a multiple of 'train.eval_every' \(7\)"),
    ],
)
def test_config_errors_name_key_value_and_fix(overrides, message):
    with pytest.raises(fx.ConfigError, match=message):
        fx.resolve_config(QUICK, overrides)


def test_registry_sections_accept_constructor_arguments():
    cfg = fx.resolve_config(QUICK, {"solver.name": "km", "solver.alpha": "0.7", "adjoint.name": "phantom", "adjoint.steps": "3"})
    assert fx.build("solver", cfg.solver.to_dict()).alpha == 0.7
    assert fx.build("adjoint", cfg.adjoint.to_dict()).steps == 3
    # The preset's Anderson `memory` is dropped when the solver changes; set explicitly, it is an error.
    assert "memory" not in fx.resolve_config(QUICK, {"solver.name": "km"}).solver
    with pytest.raises(fx.ConfigError, match=r"unknown config key 'solver.memory': km takes"):
        fx.resolve_config(QUICK, {"solver.name": "km", "solver.memory": "3"})
    with pytest.raises(fx.ConfigError, match=r"invalid 'solver' settings .*alpha"):
        fx.resolve_config(QUICK, {"solver.name": "km", "solver.alpha": "1.5"})


def test_unknown_preset_and_missing_file():
    with pytest.raises(fx.ConfigError, match=r"no preset 'quik'.*Did you mean 'quick'"):
        fx.resolve_config(str(ROOT / "configs" / "quickstart.py") + ":quik")
    with pytest.raises(fx.ConfigError, match=r"does not exist"):
        fx.resolve_config("configs/nope.py")


def test_sweep_expansion_product_and_nested_keys():
    cfg = fx.resolve_config(QUICK, {"sweep.lr": "[1e-3, 3e-3]", "sweep.seed": "[0, 1, 2]", "sweep.solver.name": "['picard', 'anderson']"})
    members = fx.expand_sweep(cfg)
    assert len(members) == 12
    assert members[0] == {"optim.lr": 1e-3, "seed": 0, "solver.name": "picard"}


# ---------------------------------------------------------------------- CLI


def test_cli_run_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["run", QUICK, "--workdir", str(workdir), "--config.sweep.lr=[1e-3,3e-3]"]) == 0
    out = capsys.readouterr().out
    assert "| quickstart | 1 | 0.003 |" in out and "ms per (vmapped) training step" in out
    for name in ["config.json", "metrics.jsonl", "summary.json", "plots/curves.png", "plots/solver_steps.png", "plots/sweep.png"]:
        assert (workdir / name).exists(), name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["success_mask"] == [True, True]
    assert all(row["eval/accuracy"] > 0.5 for row in summary["members"])
    records = fx.read_metrics(workdir)
    assert {r["step"] for r in records} == {20, 40} and {r["member"] for r in records} == {0, 1}
    assert all(r["train/backward_steps"] > 0 for r in records)
    assert main(["report", str(workdir)]) == 0
    assert (workdir / "report.md").exists()


def test_cli_bad_override_exits_with_message(capsys):
    assert main(["run", QUICK, "--config.optim.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["list", "--root", str(ROOT / "configs")]) == 0
    assert "quickstart.py" in capsys.readouterr().out


# --------------------------------------------------------------- sweeps


SWEEP3 = {**F64, "sweep.lr": "[1e-3, 3e-3, 1e-2]"}


@pytest.fixture(scope="module")
def whole_sweep(tmp_path_factory):
    """One vmapped run of three learning rates, shared by the tests that compare against it."""
    workdir = tmp_path_factory.mktemp("whole")
    fx.run(QUICK, SWEEP3, workdir=workdir, progress=False)
    return workdir


def test_vmapped_sweep_equals_sequential_runs(tmp_path, whole_sweep):
    fx.run(QUICK, {**F64, "sweep.lr": "[1e-3]"}, workdir=tmp_path / "a")
    fx.run(QUICK, {**F64, "sweep.lr": "[1e-2]"}, workdir=tmp_path / "b")
    together = {lr: rs for lr, rs in metrics_by_member(whole_sweep).items() if lr in (1e-3, 1e-2)}
    apart = {**metrics_by_member(tmp_path / "a"), **metrics_by_member(tmp_path / "b")}
    assert_same_metrics(together, apart)


def test_sweep_chunk_equals_one_vmap(tmp_path, whole_sweep):
    fx.run(QUICK, SWEEP3, workdir=tmp_path / "chunked", sweep_chunk=2)
    assert_same_metrics(metrics_by_member(whole_sweep), metrics_by_member(tmp_path / "chunked"))


def test_sharded_sweep_equals_unsharded(tmp_path, whole_sweep):
    # Four forced host devices; three members are padded to four and sharded over "sweep".
    script = (
        "import jax, sys; assert jax.local_device_count() == 4, jax.local_devices();"
        "import fpx.experiment as fx;"
        f"fx.run({QUICK!r}, {{'dtype': 'float64', 'sweep.lr': '[1e-3, 3e-3, 1e-2]'}}, workdir=sys.argv[1])"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_ENABLE_X64": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "sharded")], check=True, env=env, cwd=ROOT)
    assert_same_metrics(metrics_by_member(tmp_path / "sharded"), metrics_by_member(whole_sweep))


def test_shard_slices_and_report_equal_whole_sweep(tmp_path, whole_sweep):
    for i in range(2):
        fx.run(QUICK, SWEEP3, workdir=tmp_path / "sliced", sweep_shard=f"{i}/2")
    assert sorted(p.name for p in (tmp_path / "sliced").iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    whole = fx.report([whole_sweep], out=tmp_path / "r1", columns=DETERMINISTIC)
    sliced = fx.report([tmp_path / "sliced"], out=tmp_path / "r2", columns=DETERMINISTIC)
    assert whole == sliced
    assert (tmp_path / "r2" / "report.md").exists() and (tmp_path / "r2" / "plots" / "sweep.png").exists()


def test_resume_refuses_a_different_config(tmp_path):
    fx.run(QUICK, {"sweep.lr": "[1e-3]"}, workdir=tmp_path / "run")
    with pytest.raises(fx.ConfigError, match=r"different config"):
        fx.run(QUICK, {"sweep.lr": "[3e-3]"}, workdir=tmp_path / "run")


def test_one_member_diverging_does_not_touch_the_others(tmp_path):
    # float32: a learning rate of 1e38 overflows the weights to inf/NaN, the member diverges.
    # (With 1e30 the weights stay finite, the tanh cell saturates and the solves may converge.)
    fx.run(QUICK, {"optim.name": "sgd", "sweep.lr": "[0.1, 1e38]"}, workdir=tmp_path / "mixed")
    fx.run(QUICK, {"optim.name": "sgd", "sweep.lr": "[0.1]"}, workdir=tmp_path / "alone")
    summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    assert summary["success_mask"] == [True, False]
    assert summary["members"][1]["status"] == "diverged"
    mixed = metrics_by_member(tmp_path / "mixed")
    # float32 vmapped at a different width may round differently: one solver step in 360 samples.
    assert_same_metrics({0.1: mixed[0.1]}, metrics_by_member(tmp_path / "alone"), rtol=1e-3)


def test_static_sweep_axes_run_as_groups(tmp_path):
    summary = fx.run(QUICK, {"sweep.solver.name": "['picard', 'anderson']", "sweep.lr": "[3e-3]"}, workdir=tmp_path / "g")
    rows = {r["hparams"]["solver.name"]: r for r in summary["members"]}
    assert set(rows) == {"picard", "anderson"}
    assert rows["anderson"]["train/forward_steps"] < rows["picard"]["train/forward_steps"]


def test_submitit_local_array_then_report(tmp_path, whole_sweep):
    # submitit's local executor runs the array tasks as separate processes, as SLURM would.
    # The CLI itself runs in a subprocess too (as a user would run it).
    pytest.importorskip("submitit", reason="the optional extra fpx[cluster] is not installed")
    overrides = ["--config.dtype=float64", "--config.sweep.lr=[1e-3,3e-3,1e-2]"]
    command = [sys.executable, "-m", "fpx.cli", "run", QUICK, "--launcher=submitit", "--submitit_cluster=local",
               "--shards=2", "--wait", "--timeout_min=10", "--workdir", str(tmp_path / "array"), *overrides]
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "submitted 2 shards" in done.stdout
    array = fx.report([tmp_path / "array"], out=tmp_path / "r1", columns=DETERMINISTIC)
    assert array == fx.report([whole_sweep], out=tmp_path / "r2", columns=DETERMINISTIC)


def test_progress_bar_is_one_bar_for_the_whole_sweep(tmp_path, capsys):
    fx.run(QUICK, {"sweep.lr": "[1e-3, 3e-3, 1e-2]"}, workdir=tmp_path / "p", progress=True)
    err = capsys.readouterr().err
    assert "40/40" in err and "120/" not in err
    fx.run(QUICK, {"sweep.lr": "[1e-3]"}, workdir=tmp_path / "q", progress=False)
    assert "quickstart" not in capsys.readouterr().err
