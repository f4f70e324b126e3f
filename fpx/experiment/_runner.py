"""The generic runner: sweeps as one jit(vmap(train)), chunked scans, metrics, checkpoints."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._config import (
    ConfigDict,
    ConfigError,
    apply_overrides,
    check_keys,
    check_type,
    check_values,
    get_path,
    leaf_paths,
    load_config,
    prune_registry_sections,
    resolve_sweep_key,
    set_path,
    sweep_items,
)
from ._registry import REGISTRIES, TASKS, build, load_tasks
from ._task import Task, task_headline
from ._rundir import (
    RunDirectoryError,
    RunLock,
    append_lines,
    atomic_write_json,
    atomic_write_text,
    ends_mid_line,
    prune_manifests,
    read_json,
    read_jsonl,
    verify_manifest,
    write_manifest,
)


def build_task(config: ConfigDict):
    """The task of `config.experiment`, built from (one member's) config.

    ```python
    import fpx.experiment as fx
    config = fx.resolve_config("configs/quickstart.py:quick")   # run from the repository root
    member = fx.member_config(config, fx.expand_sweep(config)[0])
    task = fx.build_task(member)
    assert isinstance(task, fx.Task) and "optim.lr" in task.dynamic
    ```
    """
    load_tasks()
    name = config.experiment
    if name not in TASKS:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(TASKS)}.")
    return TASKS[name](config)


def resolve_config(spec_or_config, overrides: Mapping[str, str] | None = None) -> ConfigDict:
    """Load (if given a `path[:preset]`), override and validate a config.

    ```python
    import fpx.experiment as fx
    config = fx.resolve_config("configs/quickstart.py:quick", {"solver.memory": "8"})   # from the repository root
    assert config.solver.memory == 8
    try:
        fx.resolve_config("configs/quickstart.py:quick", {"solver.memroy": "8"})
    except fx.ConfigError as e:
        assert "memory" in str(e)
    ```
    """
    config = load_config(spec_or_config) if isinstance(spec_or_config, str) else spec_or_config
    schema = config.to_dict()
    config = apply_overrides(config, overrides or {})
    validate(config, schema)
    return config


def validate(config: ConfigDict, schema: Mapping) -> None:
    for key in ("experiment", "seed", "train", "sweep"):
        if key not in config:
            raise ConfigError(f"config has no {key!r} entry; every experiment config needs it.")
    free = set(REGISTRIES) | {"sweep", "variants", "variant_order"}
    plain = {k: v for k, v in config.to_dict().items() if k not in free}
    check_keys(plain, {k: v for k, v in schema.items() if k not in free})
    defaults = leaf_paths(config.to_dict())
    for name, assignment in variant_items(config):
        for path, value in assignment.items():
            check_type(f"variants.{name}.{path}", defaults.get(path), value)
    for section in REGISTRIES:
        if section in config:
            build(section, config[section].to_dict())  # checks names, arguments and values
    load_tasks()
    if config.experiment not in TASKS:
        raise ConfigError(f"config key 'experiment' = {config.experiment!r} is not a known experiment; available: {', '.join(TASKS)}.")
    constraints = getattr(TASKS[config.experiment], "constraints", {})
    check_values(config, constraints)
    for path, values in sweep_items(config):
        if not values:
            raise ConfigError(f"sweep over {path!r} has no values.")
        default = defaults.get(path)
        for v in values:
            check_type(f"sweep value for {path}", default, v)
    # Every member, before anything trains: a bad value in the last member of a sweep must
    # not surface after the others have run.
    for assignment in expand_sweep(config):
        try:
            check_values(member_config(config, assignment), constraints)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in assignment.items())
            raise ConfigError(f"sweep member ({shown}): {e}") from None
    train = config.train
    for key in ("steps", "eval_every"):
        if not (isinstance(train[key], int) and train[key] >= 1):
            raise ConfigError(f"config key 'train.{key}' = {train[key]!r} must be a positive integer.")
    if train.steps % train.eval_every:
        raise ConfigError(
            f"'train.steps' ({train.steps}) must be a multiple of 'train.eval_every' ({train.eval_every})."
        )
    if train.checkpoint_every % train.eval_every:
        raise ConfigError(
            f"'train.checkpoint_every' ({train.checkpoint_every}) must be a multiple of 'train.eval_every' ({train.eval_every})."
        )


VARIANT = "variant"


def variant_items(config: ConfigDict) -> list[tuple[str, dict[str, Any]]]:
    """`config.variants`: named sets of overrides (e.g. `mlp: {model: {kind: "mlp"}}`), in
    the order of `config.variant_order` if given (a ConfigDict sorts its keys), else by name."""
    variants = config.get("variants", None)
    if not variants:
        return []
    names = list(variants.keys())
    order = config.get("variant_order", None)
    if order is not None:
        order = list(order)
        if sorted(order) != sorted(names):
            raise ConfigError(
                f"'variant_order' {order} must name every variant exactly once: {', '.join(sorted(names))}."
            )
        names = order
    out = []
    for name in names:
        assignment = variants[name]
        if not isinstance(assignment, (Mapping, ConfigDict)):
            raise ConfigError(f"variants.{name} must be a dict of config overrides, got {assignment!r}.")
        flat = leaf_paths(assignment.to_dict()) if isinstance(assignment, ConfigDict) else leaf_paths(assignment)
        out.append((name, {resolve_sweep_key(config, k, what=f"key of variant {name!r}"): v for k, v in flat.items()}))
    return out


def expand_sweep(config: ConfigDict) -> list[dict[str, Any]]:
    """Members as `{config path: value}` (in order): the variants (if any) times the
    product of the sweep lists. A variant's name is recorded under the key `variant`.

    ```python
    import fpx.experiment as fx
    config = fx.resolve_config("configs/quickstart.py:quick", {"sweep.seed": "[0, 1]"})   # from the repository root
    members = fx.expand_sweep(config)
    assert len(members) == 4 and {"optim.lr": 1e-3, "seed": 1} in members   # 2 learning rates x 2 seeds
    ```
    """
    items = sweep_items(config)
    keys = [k for k, _ in items]
    values = [v for _, v in items]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"the sweep names the same config key twice: {keys}.")
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*values)] if keys else [{}]
    variants = variant_items(config)
    if not variants:
        return combos
    return [{VARIANT: name, **assignment, **combo} for name, assignment in variants for combo in combos]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise ConfigError(f"--sweep_shard must look like i/n (e.g. 0/4), got {text!r}.") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--sweep_shard={text}: need 0 <= i < n.")
    return i, n


def shard_members(num_members: int, shard: tuple[int, int] | None) -> list[int]:
    if shard is None:
        return list(range(num_members))
    i, n = shard
    return [m for m in range(num_members) if m % n == i]


class _Metrics:
    """`metrics.jsonl`: whole lines appended per evaluation, reconciled with each unit's
    checkpoint on resume (see `reconcile`)."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / "metrics.jsonl"

    def reconcile(self, unit: int, members: Sequence[int], step: int, every: int) -> list[str]:
        """Make the lines of `unit` exactly one per (member, evaluation step) up to `step`.

        Lines after `step` (written after the checkpoint resumed from) and a half-written
        last line are dropped, exact duplicates are dropped; a missing line, or two
        different lines for one (member, step), is a `RunDirectoryError` naming them: the
        checkpoint cannot recreate them. Returns notes on what was repaired.
        """
        records = read_jsonl(self.path, tolerate_partial_tail=True)
        notes = [f"dropped the half-written last line of {self.path.name}"] if ends_mid_line(self.path) else []
        kept, seen, dropped_later, duplicates = [], {}, 0, 0
        for r in records:
            if r.get("unit") != unit:
                kept.append(r)
                continue
            key = (r.get("member"), r.get("step"))
            if not isinstance(key[1], int) or key[1] > step:
                dropped_later += 1
                continue
            if key in seen:
                if seen[key] != r:
                    raise RunDirectoryError(
                        f"{self.path} holds two different records for member {key[0]} at step {key[1]}; "
                        "this run directory was written by two runs. Start over with --resume_from=scratch."
                    )
                duplicates += 1
                continue
            seen[key] = r
            kept.append(r)
        expected = {(m, s) for m in members for s in range(every, step + 1, every)}
        missing, unexpected = sorted(expected - set(seen)), sorted(set(seen) - expected, key=repr)
        if missing or unexpected:
            problem = (f"lacks the records of {_describe_keys(missing)}" if missing
                       else f"holds records no member of unit {unit} writes: {_describe_keys(unexpected)}")
            raise RunDirectoryError(
                f"{self.path} {problem}, but the checkpoint of unit {unit} is at step {step}: resuming would "
                "lose them. Recompute the whole run with --resume_from=scratch (runs are deterministic), "
                "or restore metrics.jsonl."
            )
        if dropped_later:
            notes.append(f"dropped {dropped_later} line(s) of unit {unit} written after its checkpoint at step {step}")
        if duplicates:
            notes.append(f"dropped {duplicates} duplicated line(s) of unit {unit}")
        if notes:
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return notes

    def append(self, records: Sequence[dict]) -> None:
        append_lines(self.path, records)


def _describe_keys(keys: Sequence[tuple], limit: int = 6) -> str:
    shown = ", ".join(f"(member {m}, step {s})" for m, s in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _to_python(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


def _sweep_sharding(num: int):
    devices = jax.local_devices()
    if len(devices) < 2 or num < 2:
        return None, num
    padded = -(-num // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("sweep",))
    return NamedSharding(mesh, PartitionSpec("sweep")), padded


RESUME_FROM = ("latest", "previous", "scratch")


class _Progress:
    """A tqdm bar on a terminal; otherwise one line per evaluation on stderr (logs of
    batch jobs); or nothing."""

    def __init__(self, total: int, mode: str, name: str):
        self.mode, self.name, self.total, self.done = mode, name, total, 0
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=name, unit="step", leave=True, dynamic_ncols=True)

    def advance(self, steps: int, line: str | None = None) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)
        elif self.mode == "lines" and line:
            print(f"{self.name}: {line}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.mode != "off":
            (self.bar.write if self.bar is not None else lambda t: print(t, file=sys.stderr, flush=True))(f"{self.name}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_mode(progress: bool | None) -> str:
    if progress is None:
        return "bar" if sys.stderr.isatty() else "lines"
    return "bar" if progress else "off"


def _prepare_workdir(workdir: pathlib.Path) -> pathlib.Path:
    for parent in [workdir, *workdir.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == workdir else f"is below the file {parent}"
            raise RunDirectoryError(f"--workdir {workdir} {what}; a run directory must be a directory.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirectoryError(f"cannot create --workdir {workdir}: {e.strerror}.") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"--workdir {workdir} is not writable; choose another directory.")
    return workdir


def _start_over(workdir: pathlib.Path) -> None:
    """`--resume_from=scratch`: forget the metrics and checkpoints of an earlier attempt."""
    import shutil

    for name in ("metrics.jsonl", "timing.jsonl", "summary.json"):
        (workdir / name).unlink(missing_ok=True)
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)


def run(
    spec_or_config,
    overrides: Mapping[str, str] | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    sweep_shard: str | tuple[int, int] | None = None,
    sweep_chunk: int | None = None,
    progress: bool | None = None,
    resume_from: str = "latest",
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """Train every member of the config's sweep (or one slice of it) and write the run dir.

    Returns the summary (also written to `workdir/summary.json`). Re-running on an existing
    workdir resumes from the last checkpoint and ends with exactly the metrics of an
    uninterrupted run. One process at a time may write a workdir (`RunLock`).

    `resume_from`: `"latest"` resumes from the newest checkpoint and refuses one that fails
    its checksums; `"previous"` falls back to the newest intact checkpoint (recomputing the
    steps after it; from step 0 if none is intact); `"scratch"` discards the earlier
    metrics and checkpoints. `progress`: `None` shows a bar on a terminal and a line per
    evaluation otherwise, `True` a bar, `False` nothing. `stop_after_step` stops early as
    if preempted (for tests).

    ```python
    import tempfile, fpx
    summary = fpx.experiment.run("configs/quickstart.py:quick", {"train.steps": "20"},
                                 workdir=tempfile.mkdtemp(), progress=False)
    assert summary["members"][0]["step"] == 20
    ```
    """
    config = resolve_config(spec_or_config, overrides)
    shard = parse_shard(sweep_shard) if isinstance(sweep_shard, str) or sweep_shard is None else tuple(sweep_shard)
    if sweep_chunk is not None and sweep_chunk < 1:
        raise ConfigError(f"--sweep_chunk must be a positive integer, got {sweep_chunk}.")
    if resume_from not in RESUME_FROM:
        raise ConfigError(f"--resume_from={resume_from!r}: choose one of {', '.join(RESUME_FROM)}.")
    name = str(config.get("name", config.experiment))
    if workdir is None:
        workdir = pathlib.Path("runs") / pathlib.Path(name) / time.strftime("%Y%m%d-%H%M%S")
    workdir = pathlib.Path(workdir)
    if shard is not None:
        workdir = workdir / f"shard-{shard[0]}-of-{shard[1]}"
    members = expand_sweep(config)
    units = _units(config, members, shard_members(len(members), shard), sweep_chunk)
    # Built before anything is written: a task's own checks (e.g. a batch larger than the
    # data) fail without leaving a run directory behind.
    for unit in units:
        unit["task"] = build_task(member_config(config, members[unit["members"][0]]))
    _prepare_workdir(workdir)
    with RunLock(workdir):
        resolved = json.loads(json.dumps(config.to_dict(), default=str))
        config_file = workdir / "config.json"
        if config_file.exists():
            try:
                recorded = read_json(config_file)
            except RunDirectoryError as e:
                raise RunDirectoryError(
                    f"{e} It records the config this run directory was trained with. If that is the config "
                    f"you are passing now, delete {config_file} and rerun to rewrite it; otherwise pick another --workdir."
                ) from None
            if recorded != resolved:
                raise ConfigError(
                    f"{workdir} holds a run with a different config; resume only with the same config or pick another --workdir."
                )
        else:
            atomic_write_json(config_file, resolved)
        if resume_from == "scratch":
            _start_over(workdir)
        metrics = _Metrics(workdir)
        total = config.train.steps * sum(len(u["members"]) > 0 for u in units)
        bar = _Progress(total, _progress_mode(progress), name)
        timing = {}
        try:
            for index, unit in enumerate(units):
                timing[index] = _train_unit(config, unit, index, len(units), members, workdir, metrics, bar,
                                            stop_after_step, resume_from)
        finally:
            bar.close()
        summary = summarize(workdir, members, timing)
        summary["stopped_early"] = stop_after_step is not None and any(t.get("stopped") for t in timing.values())
        summary["name"] = name
        summary["workdir"] = str(workdir)
        atomic_write_json(workdir / "summary.json", summary)
        from ._plots import plot_run

        plot_run(workdir)
    return summary


def _units(config, members, selected, sweep_chunk):
    """Group members by their static (non-vmappable) values, then chunk each group."""
    task_cls = TASKS[config.experiment] if config.experiment in TASKS else None
    dynamic = set(getattr(task_cls, "dynamic", ("seed",)))
    groups: dict[tuple, list[int]] = {}
    for m in selected:
        static = tuple(sorted((k, repr(v)) for k, v in members[m].items() if k not in dynamic))
        groups.setdefault(static, []).append(m)
    units = []
    for ms in groups.values():
        size = sweep_chunk or len(ms)
        for start in range(0, len(ms), size):
            units.append({"members": ms[start : start + size]})
    return units


def member_config(config: ConfigDict, assignment: Mapping[str, Any]) -> ConfigDict:
    """The config of one sweep member: `config` with `assignment` (an `expand_sweep` entry) applied.

    ```python
    import fpx.experiment as fx
    config = fx.resolve_config("configs/quickstart.py:quick")   # run from the repository root
    second = fx.member_config(config, fx.expand_sweep(config)[1])
    assert fx.expand_sweep(config)[1] == {"optim.lr": 3e-3} and second.optim.lr == 3e-3
    ```
    """
    cfg = ConfigDict(config.to_dict())
    for path, value in assignment.items():
        if path != VARIANT:
            set_path(cfg, path, value)
    # Preset arguments the member's constructor lacks are dropped; those the member sets are checked.
    prune_registry_sections(cfg, explicit=set(assignment))
    for section in REGISTRIES:
        if section in cfg:
            build(section, cfg[section].to_dict())
    return cfg




def _train_unit(config, unit, unit_index, num_units, members, workdir, metrics, bar, stop_after_step, resume_from):
    import orbax.checkpoint as ocp

    ms, task = unit["members"], unit["task"]
    dynamic = tuple(task.dynamic)
    hp_np = {p: np.array([get_path(member_config(config, members[m]).to_dict(), p) for m in ms]) for p in dynamic}
    sharding, padded = _sweep_sharding(len(ms))
    pad = padded - len(ms)

    def stack(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        return jax.device_put(x, sharding) if sharding is not None else x

    hp = {p: stack(v) for p, v in hp_np.items()}
    keys = stack(jax.vmap(jr.PRNGKey)(jnp.asarray(hp_np["seed"])))
    steps, every = config.train.steps, config.train.eval_every

    init = jax.jit(jax.vmap(task.init))

    def chunk(state, hp, key, start):
        def body(state, i):
            state, metrics = task.train_step(state, hp, jr.fold_in(key, start + i))
            return state, metrics

        state, metrics = jax.lax.scan(body, state, jnp.arange(every))
        return state, jax.tree_util.tree_map(jnp.mean, metrics), task.evaluate(state, hp)

    chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None)))
    state = init(hp, keys)
    directory = (workdir / "checkpoints" / f"unit-{unit_index}").absolute()
    manifests = workdir / "checkpoints" / "manifests" / f"unit-{unit_index}"
    # max_to_keep is applied here, after the new checkpoint's manifest is written: a crash
    # in between still leaves the previous, verified checkpoint.
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=None))
    group = _group_label(members[ms[0]], task)
    headline = task_headline(config.experiment)
    try:
        start, state = _restore(manager, directory, manifests, state, unit_index, resume_from, bar)
        for note in metrics.reconcile(unit_index, ms, start, every):
            bar.note(note)
        if num_units > 1:
            bar.note(f"group {unit_index + 1}/{num_units}{group}: {len(ms)} member(s), from step {start}/{steps}")
        bar.advance(start)
        timing = {"compile_s": None, "train_s": 0.0, "steps": 0, "stopped": False}
        while start < steps:
            if stop_after_step is not None and start >= stop_after_step:
                timing["stopped"] = True
                break
            t0 = time.perf_counter()
            state, train_metrics, eval_metrics = chunk(state, hp, keys, start)
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - t0
            if timing["compile_s"] is None:
                timing["compile_s"] = elapsed
            else:
                timing["train_s"] += elapsed
                timing["steps"] += every
                # Wall-clock goes to its own file: metrics.jsonl stays deterministic (resume test).
                append_lines(workdir / "timing.jsonl", [{"unit": unit_index, "step": start + every, "members": len(ms), "ms_per_step": 1e3 * elapsed / every}])
            start += every
            records = []
            for j, m in enumerate(ms):
                record = {"unit": unit_index, "member": m, "step": start, "hparams": {k: _to_python(v) for k, v in members[m].items()}}
                record.update({f"train/{k}": _to_python(v[j]) for k, v in train_metrics.items()})
                record.update({f"eval/{k}": _to_python(v[j]) for k, v in eval_metrics.items()})
                records.append(record)
            metrics.append(records)
            if start % config.train.checkpoint_every == 0 or start == steps:
                _save(manager, directory, manifests, start, state, config.train.max_to_keep)
            bar.advance(every, _progress_line(unit_index, num_units, group, start, steps, records, headline, timing))
    finally:
        manager.close()
    return timing


def _restore(manager, directory, manifests, state, unit_index, resume_from, bar):
    """(step, state) of the newest checkpoint that passes its checksums and restores;
    `(0, state)` without one. A corrupt one is an error unless `resume_from="previous"`."""
    import orbax.checkpoint as ocp

    if resume_from == "scratch":
        return 0, state
    steps = sorted(manager.all_steps(), reverse=True)
    for rank, step in enumerate(steps):
        problem = verify_manifest(directory / str(step), manifests, step)
        if problem is None:
            try:
                return step, manager.restore(step, args=ocp.args.StandardRestore(state))
            except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types)
                problem = f"orbax cannot restore it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        interrupted = rank == 0 and problem.endswith("its save was interrupted")
        fallback = steps[rank + 1] if rank + 1 < len(steps) else None
        if not (interrupted or resume_from == "previous"):
            raise RunDirectoryError(
                f"checkpoint step {step} of unit {unit_index} is corrupt: {problem}. Resume from the newest intact "
                f"checkpoint with --resume_from=previous (the steps after it are recomputed), or start over with "
                f"--resume_from=scratch."
            )
        # Kept for inspection, out of orbax's way: the step is saved anew when training reaches it.
        aside = directory.parent / "skipped" / f"unit-{unit_index}-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory / str(step), aside)
        (manifests / f"{step}.json").unlink(missing_ok=True)
        manager.reload()
        bar.note(f"checkpoint step {step} of unit {unit_index} skipped ({problem}) and moved to {aside}; "
                 + (f"trying step {fallback}" if fallback is not None else "starting from step 0"))
    return 0, state


def _save(manager, directory, manifests, step, state, max_to_keep):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    write_manifest(directory / str(step), manifests, step)
    kept = sorted(manager.all_steps())
    for old in kept[: max(len(kept) - max_to_keep, 0)] if max_to_keep else []:
        manager.delete(old)
    prune_manifests(manifests, manager.all_steps())


def _group_label(assignment: Mapping[str, Any], task) -> str:
    dynamic = set(getattr(task, "dynamic", ("seed",)))
    static = {k: v for k, v in assignment.items() if k not in dynamic}
    return (" (" + ", ".join(f"{k}={v}" for k, v in static.items()) + ")") if static else ""


def _progress_line(unit_index, num_units, group, step, steps, records, headline, timing) -> str:
    headline = [k for k in headline if k in records[0]]
    shown = headline or [k for k in records[0] if k.startswith("eval/")][:3]
    values = ", ".join(f"{k} {np.mean([r[k] for r in records]):.4g}" for k in shown)
    where = f"group {unit_index + 1}/{num_units}{group} " if num_units > 1 else ""
    line = f"{where}step {step}/{steps}: {values}"
    if timing["steps"] and step < steps:
        per_step = timing["train_s"] / timing["steps"]
        line += f" ({1e3 * per_step:.3g} ms/step, group done in ~{_duration(per_step * (steps - step))})"
    return line


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else (f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h")


def restore(workdir: str | os.PathLike, unit: int = 0, step: int | None = None) -> tuple[Task, Any, list[int]]:
    """`(task, state, members)` of a run directory, for figures and post-hoc evaluation.

    The task is rebuilt from `config.json` for the first member of sweep unit `unit` (the
    members of one unit share everything but the `dynamic` hyperparameters), `state` is
    that unit's checkpointed training state at `step` (default: the latest checkpoint) with
    the members stacked on axis 0, and `members` are their indices (as in
    `metrics.jsonl`), in that order.

    ```python
    import tempfile, jax, fpx
    workdir = tempfile.mkdtemp()
    fpx.experiment.run("configs/quickstart.py:quick", {"train.steps": "20"}, workdir=workdir, progress=False)
    task, state, members = fpx.experiment.restore(workdir)
    assert members == [0, 1]                       # the two learning rates of the quick sweep
    first = jax.tree_util.tree_map(lambda a: a[0], state)
    accuracy = task.evaluate(first, {"seed": 0, "optim.lr": 1e-3})["accuracy"]
    logged = [r for r in fpx.experiment.read_metrics(workdir) if r["member"] == 0][-1]["eval/accuracy"]
    assert abs(float(accuracy) - logged) < 1e-6    # the checkpoint is the state that was evaluated
    ```
    """
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    config = ConfigDict(read_json(workdir / "config.json"))
    members = sorted({r["member"] for r in read_metrics(workdir) if r["unit"] == unit})
    if not members:
        raise RunDirectoryError(f"{workdir} has no metrics for sweep unit {unit}; choose a unit that metrics.jsonl names.")
    assignments = expand_sweep(config)
    task = build_task(member_config(config, assignments[members[0]]))
    hp = {p: jnp.asarray(np.array([get_path(member_config(config, assignments[m]).to_dict(), p) for m in members]))
          for p in task.dynamic}
    _, padded = _sweep_sharding(len(members))
    hp = {p: jnp.concatenate([v, jnp.repeat(v[-1:], padded - len(members), axis=0)]) for p, v in hp.items()}
    abstract = jax.eval_shape(jax.vmap(task.init), hp, jax.vmap(jr.PRNGKey)(hp["seed"]))
    manager = ocp.CheckpointManager((workdir / "checkpoints" / f"unit-{unit}").absolute())
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise RunDirectoryError(f"{workdir} has no checkpoint for sweep unit {unit}.")
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    finally:
        manager.close()
    state = jax.tree_util.tree_map(lambda a: a[: len(members)], state)
    return task, state, members


def read_metrics(workdir: str | os.PathLike, *, tolerate_partial_tail: bool = True) -> list[dict]:
    """The records of `workdir/metrics.jsonl`: one per (member, evaluation step), with keys
    `unit`, `member`, `step`, `hparams` and the `train/*`, `eval/*` metrics.

    A half-written last line (a run killed while writing) is skipped unless
    `tolerate_partial_tail=False`; any other corrupt line is a `RunDirectoryError`.

    ```python
    import tempfile, fpx
    workdir = tempfile.mkdtemp()
    fpx.experiment.run("configs/quickstart.py:quick", {"train.steps": "20"}, workdir=workdir, progress=False)
    records = fpx.experiment.read_metrics(workdir)
    assert sorted((r["member"], r["step"]) for r in records) == [(0, 20), (1, 20)]   # 2 learning rates
    ```
    """
    return read_jsonl(pathlib.Path(workdir) / "metrics.jsonl", tolerate_partial_tail=tolerate_partial_tail)


def member_rows(workdir: str | os.PathLike, records: Sequence[dict]) -> list[dict]:
    """One row per member from its last metric record: hparams, step, status (`ok`,
    `unconverged`: a solve did not converge, `diverged`: a metric is not finite), the
    median ms per step of its unit (`timing.jsonl`) and the `train/*`, `eval/*` metrics."""
    last: dict[int, dict] = {}
    for r in records:
        if r["member"] not in last or r["step"] >= last[r["member"]]["step"]:
            last[r["member"]] = r
    unit_ms: dict[int, list[float]] = {}
    for t in read_jsonl(pathlib.Path(workdir) / "timing.jsonl", tolerate_partial_tail=True):
        unit_ms.setdefault(t["unit"], []).append(t["ms_per_step"])
    rows = []
    for m in sorted(last):
        r = last[m]
        finite = all(np.isfinite(v) for k, v in r.items() if k.startswith(("train/", "eval/")) and isinstance(v, (int, float)))
        converged = r.get("eval/converged_fraction", 1.0)
        status = "diverged" if not finite else ("ok" if converged >= 1.0 else "unconverged")
        times = unit_ms.get(r["unit"])
        rows.append({"member": m, "unit": r["unit"], "hparams": r["hparams"], "step": r["step"], "status": status,
                     "ms_per_step": float(np.median(times)) if times else None,
                     **{k: v for k, v in r.items() if k.startswith(("train/", "eval/"))}})
    return rows


def summarize(workdir, members, timing) -> dict[str, Any]:
    rows = member_rows(workdir, read_metrics(workdir))
    train_s = sum(t["train_s"] for t in timing.values())
    steps = sum(t["steps"] for t in timing.values())
    return {
        "members": rows,
        "num_members": len(members),
        "success_mask": [row["status"] == "ok" for row in rows],
        "ms_per_step": 1e3 * train_s / steps if steps else None,
        "compile_s": sum(t["compile_s"] or 0.0 for t in timing.values()),
    }
