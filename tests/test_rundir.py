"""Run-directory integrity: one writer, atomic files, checked checkpoints, reconciled metrics,
CLI errors without tracebacks, and resume after random kills."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fpx.experiment as fx
from fpx.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.py") + ":quick"
# Three checkpoints (40, 80, 120), two kept; evaluations every 20 steps; two members.
OVERRIDES = {"dtype": "float64", "sweep.lr": "[1e-3, 3e-3]", "train.steps": "120", "train.checkpoint_every": "40"}
CLI_OVERRIDES = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def run(workdir, **kwargs):
    return fx.run(QUICK, OVERRIDES, workdir=workdir, progress=False, **kwargs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """metrics.jsonl of the uninterrupted run."""
    workdir = tmp_path_factory.mktemp("straight")
    run(workdir)
    return (workdir / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def interrupted_template(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("interrupted")
    assert run(workdir, stop_after_step=80)["stopped_early"]
    return workdir


@pytest.fixture
def interrupted(interrupted_template, tmp_path):
    """A fresh copy of a run stopped at step 80 (checkpoints 40 and 80, metrics to 80)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(interrupted_template, workdir)
    (workdir / "lock").unlink(missing_ok=True)
    return workdir


def lines(workdir):
    return (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)


def newest_checkpoint_file(workdir, step=80):
    files = sorted((p for p in (workdir / "checkpoints" / "unit-0" / str(step)).rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    return files[-1]


# ------------------------------------------------------------- metrics.jsonl


def test_resume_repairs_a_half_written_last_line(interrupted, straight):
    with (interrupted / "metrics.jsonl").open("a") as f:
        f.write('{"eval/accuracy": 0.5, "hpar')  # a kill in the middle of an append
    run(interrupted)
    assert (interrupted / "metrics.jsonl").read_text() == straight


def test_resume_drops_exact_duplicates_and_lines_after_the_checkpoint(interrupted, straight):
    # A run killed after writing step 100's evaluation but before its checkpoint at 120...
    extra = json.loads(lines(interrupted)[-1])
    extra.update(step=100, **{"train/loss": -1.0})
    text = "".join(lines(interrupted)[:2] * 2 + lines(interrupted)[2:]) + json.dumps(extra) + "\n"
    (interrupted / "metrics.jsonl").write_text(text)
    run(interrupted)
    assert (interrupted / "metrics.jsonl").read_text() == straight


def test_resume_refuses_missing_lines_and_says_how_to_recompute(interrupted, straight):
    kept = lines(interrupted)
    (interrupted / "metrics.jsonl").write_text("".join(kept[1:]))
    with pytest.raises(fx.RunDirectoryError, match=r"lacks the records of \(member 0, step 20\).*--resume_from=scratch"):
        run(interrupted)
    run(interrupted, resume_from="scratch")
    assert (interrupted / "metrics.jsonl").read_text() == straight


def test_resume_refuses_when_metrics_were_deleted(interrupted):
    (interrupted / "metrics.jsonl").unlink()
    with pytest.raises(fx.RunDirectoryError, match=r"lacks the records of \(member 0, step 20\), \(member 0, step 40\)"):
        run(interrupted)


def test_resume_refuses_two_different_records_for_one_step(interrupted):
    first = json.loads(lines(interrupted)[0])
    first["train/loss"] = 123.0
    with (interrupted / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(first) + "\n")
    with pytest.raises(fx.RunDirectoryError, match=r"two different records for member 0 at step 20"):
        run(interrupted)


# -------------------------------------------------------------- checkpoints


def test_a_corrupted_checkpoint_is_refused_then_skipped_on_request(interrupted, straight):
    target = newest_checkpoint_file(interrupted)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    target.write_bytes(bytes(data))
    with pytest.raises(fx.RunDirectoryError, match=rf"checkpoint step 80 of unit 0 is corrupt: file .*{target.name} does not match its checksum.*--resume_from=previous"):
        run(interrupted)
    run(interrupted, resume_from="previous")  # from step 40; steps 60 and 80 recomputed
    assert (interrupted / "metrics.jsonl").read_text() == straight


def test_a_truncated_checkpoint_is_refused(interrupted):
    target = newest_checkpoint_file(interrupted)
    size = target.stat().st_size
    with target.open("r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(fx.RunDirectoryError, match=rf"file .*{target.name} has {size // 3} bytes, {size} were written"):
        run(interrupted)


def test_an_interrupted_save_falls_back_to_the_previous_checkpoint(interrupted, straight):
    # Killed after orbax committed step 80 but before its manifest was written.
    (interrupted / "checkpoints" / "manifests" / "unit-0" / "80.json").unlink()
    run(interrupted)
    assert (interrupted / "metrics.jsonl").read_text() == straight


def test_only_max_to_keep_checkpoints_and_their_manifests_remain(interrupted):
    run(interrupted)
    assert sorted(p.name for p in (interrupted / "checkpoints" / "unit-0").iterdir()) == ["120", "80"]
    assert sorted(p.name for p in (interrupted / "checkpoints" / "manifests" / "unit-0").iterdir()) == ["120.json", "80.json"]


# -------------------------------------------------------- config and summary


def test_a_half_written_config_is_named(interrupted):
    text = (interrupted / "config.json").read_text()
    (interrupted / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(fx.RunDirectoryError, match=r"config.json is half-written or corrupt.*delete .*config.json and rerun"):
        run(interrupted)


def test_a_half_written_summary_is_rewritten(interrupted, straight):
    (interrupted / "summary.json").write_text('{"members": [')
    summary = run(interrupted)
    assert fx.read_json(interrupted / "summary.json")["members"] == json.loads(json.dumps(summary["members"]))
    assert (interrupted / "metrics.jsonl").read_text() == straight


def test_json_files_are_replaced_atomically(tmp_path):
    from fpx.experiment._rundir import atomic_write_json

    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert fx.read_json(tmp_path / "a.json") == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_read_jsonl_names_a_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(fx.RunDirectoryError, match=r"metrics.jsonl: line 2 is corrupt"):
        fx.read_jsonl(path, tolerate_partial_tail=True)
    path.write_text('{"a": 1}\n{"a": ')
    assert fx.read_jsonl(path, tolerate_partial_tail=True) == [{"a": 1}]
    with pytest.raises(fx.RunDirectoryError, match=r"its last line is half-written"):
        fx.read_jsonl(path)


# --------------------------------------------------------------------- locks


def test_a_second_writer_is_refused(interrupted, straight):
    with fx.RunLock(interrupted):
        with pytest.raises(fx.RunDirectoryError, match=rf"{interrupted} is in use by pid {os.getpid()} on host"):
            run(interrupted)
    run(interrupted)  # the lock went with its holder
    assert (interrupted / "metrics.jsonl").read_text() == straight


# ----------------------------------------------------------------------- CLI


@pytest.fixture
def broken_configs(tmp_path):
    (tmp_path / "syntax.py").write_text("import ml_collections\ndef get_config(arg=None):\n    return ml_collections.ConfigDict({'a': 1)\n")
    (tmp_path / "raises.py").write_text("def get_config(arg=None):\n    raise ValueError('preset not ready')\n")
    (tmp_path / "afile").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/syntax.py"], r"config file .*syntax.py, line 3: closing parenthesis"),
        (["{tmp}/raises.py"], r"raises.py: get_config\(None\) raised ValueError: preset not ready \(at raises.py:2\)"),
        (["{tmp}"], r"is a directory; give a config file"),
        ([QUICK, "--config.data.batch_size=100000"], r"'data.batch_size' \(100000\) exceeds the 1437 training examples"),
        ([QUICK, "--config.sweep.lr=[1e-3,\"x\"]"], r"sweep value 'x' for 'optim.lr' is not allowed: it must be a positive number"),
        ([QUICK, "--config.sweep.solver.name=[anderson,andersen]"], r"sweep member \(optim.lr=0.001, solver.name='andersen'\): unknown solver name 'andersen'.*Did you mean 'anderson'"),
        ([QUICK, "--workdir={tmp}/afile"], r"--workdir .*afile is a file"),
        ([QUICK, "--workdir={tmp}/afile/below"], r"--workdir .*afile/below is below the file .*afile"),
        ([QUICK, "--resume_from=oldest"], r"argument --resume_from: invalid choice: 'oldest'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(argv, message, broken_configs, capsys):
    import re

    argv = [a.replace("{tmp}", str(broken_configs)) for a in argv]
    if not any(a.startswith("--workdir") for a in argv):
        argv.append(f"--workdir={broken_configs}/never")
    try:
        code = main(["run", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    # One error line (argparse prints its usage lines above its own).
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (broken_configs / "never").exists()  # nothing was created before the error


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_workdir_is_named(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    assert main(["run", QUICK, f"--workdir={locked}/w"]) == 2
    assert "cannot create --workdir" in capsys.readouterr().err


def test_debug_shows_the_traceback(broken_configs):
    with pytest.raises(fx.ConfigError, match="preset not ready"):
        main(["run", f"{broken_configs}/raises.py", "--debug"])


# ------------------------------------------------------------ fault injection


def _cli(workdir):
    command = [sys.executable, "-m", "fpx.cli", "run", QUICK, "--workdir", str(workdir), "--quiet", *CLI_OVERRIDES]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "JAX_ENABLE_X64": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(text):
    return sorted((json.loads(line) for line in text.splitlines()), key=lambda r: (r["unit"], r["step"], r["member"]))


def test_random_kills_then_two_writers_end_with_the_uninterrupted_metrics(tmp_path, straight):
    """`kill -9` at random points of training (twice), then two `fpx run` at once:
    one finishes, the other is refused, and the metrics are those of the uninterrupted run."""
    rng = random.Random(0)
    workdir = tmp_path / "faulty"
    metrics = workdir / "metrics.jsonl"
    for _ in range(2):
        process = _cli(workdir)
        before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        deadline = time.monotonic() + 300
        # Kill once training has written something new, at a random moment after that.
        while process.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) > before:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    first, second = _cli(workdir), _cli(workdir)
    outcomes = sorted([(p.wait(timeout=600), p.communicate()[1]) for p in (first, second)], key=lambda o: o[0])
    assert outcomes[0][0] == 0, outcomes[0][1][-2000:]
    assert outcomes[1][0] == 2 and "is in use by pid" in outcomes[1][1], outcomes[1][1][-2000:]
    got, want = _records(metrics.read_text()), _records(straight)
    assert [(r["member"], r["step"]) for r in got] == [(r["member"], r["step"]) for r in want]
    for a, b in zip(got, want):
        for k in b:
            if k.startswith(("train/", "eval/")):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-9, err_msg=f"{k} at member {b['member']}, step {b['step']}")
