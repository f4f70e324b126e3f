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


def build_task(config: ConfigDict):
    """The task of `config.experiment`, built from (one member's) config."""
    load_tasks()
    name = config.experiment
    if name not in TASKS:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(TASKS)}.")
    return TASKS[name](config)


def resolve_config(spec_or_config, overrides: Mapping[str, str] | None = None) -> ConfigDict:
    """Load (if given a `path[:preset]`), override and validate a config."""
    config = load_config(spec_or_config) if isinstance(spec_or_config, str) else spec_or_config
    schema = config.to_dict()
    config = apply_overrides(config, overrides or {})
    validate(config, schema)
    return config


def validate(config: ConfigDict, schema: Mapping) -> None:
    for key in ("experiment", "seed", "train", "sweep"):
        if key not in config:
            raise ConfigError(f"config has no {key!r} entry; every experiment config needs it.")
    free = set(REGISTRIES) | {"sweep", "variants"}
    plain = {k: v for k, v in config.to_dict().items() if k not in free}
    check_keys(plain, {k: v for k, v in schema.items() if k not in free})
    for name, assignment in variant_items(config):
        for path, value in assignment.items():
            check_type(f"variants.{name}.{path}", get_path(config.to_dict(), path), value)
        member_config(config, assignment)
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
        default = get_path(config.to_dict(), path)
        for v in values:
            check_type(f"sweep value for {path}", default, v)
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
    """`config.variants`: named sets of overrides (e.g. `mlp: {model: {kind: "mlp"}}`)."""
    variants = config.get("variants", None)
    if not variants:
        return []
    out = []
    for name, assignment in variants.items():
        if not isinstance(assignment, (Mapping, ConfigDict)):
            raise ConfigError(f"variants.{name} must be a dict of config overrides, got {assignment!r}.")
        out.append((name, {resolve_sweep_key(config, k): v for k, v in leaf_paths(assignment.to_dict()).items()}))
    return out


def expand_sweep(config: ConfigDict) -> list[dict[str, Any]]:
    """Members as `{config path: value}` (in order): the variants (if any) times the
    product of the sweep lists. A variant's name is recorded under the key `variant`."""
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


class _Writer:
    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / "metrics.jsonl"

    def truncate(self, unit: int, after_step: int) -> None:
        """Drop lines of `unit` beyond `after_step` (written after the last checkpoint)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and not _later(json.loads(line), unit, after_step)]
        self.path.write_text("".join(line + "\n" for line in keep))

    def append(self, records: Sequence[dict]) -> None:
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")


def _later(record, unit, step):
    return record["unit"] == unit and record["step"] > step


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


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    disable = not (enabled if enabled is not None else sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit="step", disable=disable, leave=True, dynamic_ncols=True)


def run(
    spec_or_config,
    overrides: Mapping[str, str] | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    sweep_shard: str | tuple[int, int] | None = None,
    sweep_chunk: int | None = None,
    progress: bool | None = None,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """Train every member of the config's sweep (or one slice of it) and write the run dir.

    Returns the summary (also written to `workdir/summary.json`). Re-running on an existing
    workdir resumes from the last checkpoint and ends with exactly the metrics of an
    uninterrupted run. `stop_after_step` stops early as if preempted (for tests).
    """
    config = resolve_config(spec_or_config, overrides)
    shard = parse_shard(sweep_shard) if isinstance(sweep_shard, str) or sweep_shard is None else tuple(sweep_shard)
    if sweep_chunk is not None and sweep_chunk < 1:
        raise ConfigError(f"--sweep_chunk must be a positive integer, got {sweep_chunk}.")
    if workdir is None:
        workdir = pathlib.Path("runs") / pathlib.Path(str(config.get("name", config.experiment))) / time.strftime("%Y%m%d-%H%M%S")
    workdir = pathlib.Path(workdir)
    if shard is not None:
        workdir = workdir / f"shard-{shard[0]}-of-{shard[1]}"
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict()
    config_file = workdir / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != json.loads(json.dumps(resolved, default=str)):
        raise ConfigError(
            f"{workdir} holds a run with a different config; resume only with the same config or pick another --workdir."
        )
    config_file.write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))

    members = expand_sweep(config)
    selected = shard_members(len(members), shard)
    units = _units(config, members, selected, sweep_chunk)
    writer = _Writer(workdir)
    total = config.train.steps * sum(len(u["members"]) > 0 for u in units)
    bar = _progress(total, progress, desc=str(config.get("name", config.experiment)))
    timing = {}
    try:
        for index, unit in enumerate(units):
            timing[index] = _train_unit(config, unit, index, members, workdir, writer, bar, stop_after_step)
    finally:
        bar.close()
    summary = summarize(workdir, members, timing)
    summary["stopped_early"] = stop_after_step is not None and any(t.get("stopped") for t in timing.values())
    summary["name"] = str(config.get("name", config.experiment))
    summary["workdir"] = str(workdir)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
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
    """The config of one sweep member: `config` with `assignment` (an `expand_sweep` entry) applied."""
    cfg = ConfigDict(config.to_dict())
    for path, value in assignment.items():
        if path != VARIANT:
            set_path(cfg, path, value)
    prune_registry_sections(cfg)
    for section in REGISTRIES:
        if section in cfg:
            build(section, cfg[section].to_dict())
    return cfg




def _train_unit(config, unit, unit_index, members, workdir, writer, bar, stop_after_step):
    import orbax.checkpoint as ocp

    ms = unit["members"]
    base = member_config(config, members[ms[0]])
    task = build_task(base)
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
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints" / f"unit-{unit_index}").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.train.max_to_keep),
    )
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        start = latest
    writer.truncate(unit_index, start)
    bar.update(start)
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
            with (workdir / "timing.jsonl").open("a") as f:
                f.write(json.dumps({"unit": unit_index, "step": start + every, "members": len(ms), "ms_per_step": 1e3 * elapsed / every}) + "\n")
        start += every
        records = []
        for j, m in enumerate(ms):
            record = {"unit": unit_index, "member": m, "step": start, "hparams": {k: _to_python(v) for k, v in members[m].items()}}
            record.update({f"train/{k}": _to_python(v[j]) for k, v in train_metrics.items()})
            record.update({f"eval/{k}": _to_python(v[j]) for k, v in eval_metrics.items()})
            records.append(record)
        writer.append(records)
        if start % config.train.checkpoint_every == 0 or start == steps:
            manager.save(start, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
        bar.update(every)
    manager.close()
    return timing


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def summarize(workdir, members, timing) -> dict[str, Any]:
    records = read_metrics(workdir)
    last: dict[int, dict] = {}
    for r in records:
        if r["member"] not in last or r["step"] >= last[r["member"]]["step"]:
            last[r["member"]] = r
    unit_ms: dict[int, list[float]] = {}
    timing_file = pathlib.Path(workdir) / "timing.jsonl"
    if timing_file.exists():
        for line in timing_file.read_text().splitlines():
            t = json.loads(line)
            unit_ms.setdefault(t["unit"], []).append(t["ms_per_step"])
    rows = []
    for m in sorted(last):
        r = last[m]
        finite = all(np.isfinite(v) for k, v in r.items() if k.startswith(("train/", "eval/")) and isinstance(v, (int, float)))
        converged = r.get("eval/converged_fraction", 1.0)
        status = "diverged" if not finite else ("ok" if converged >= 1.0 else "unconverged")
        times = unit_ms.get(r["unit"])
        rows.append({"member": m, "hparams": r["hparams"], "step": r["step"], "status": status,
                     "ms_per_step": float(np.median(times)) if times else None,
                     **{k: v for k, v in r.items() if k.startswith(("train/", "eval/"))}})
    train_s = sum(t["train_s"] for t in timing.values())
    steps = sum(t["steps"] for t in timing.values())
    return {
        "members": rows,
        "num_members": len(members),
        "success_mask": [row["status"] == "ok" for row in rows],
        "ms_per_step": 1e3 * train_s / steps if steps else None,
        "compile_s": sum(t["compile_s"] or 0.0 for t in timing.values()),
    }
