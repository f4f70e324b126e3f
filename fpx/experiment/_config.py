"""Loading, overriding and validating `ml_collections` experiment configs.

A config file defines `get_config(arg)`; `path.py:preset` passes `preset` as `arg`.
Every config is checked against its own defaults (the schema is the config the preset
produced): an unknown key is an error naming the full path and the nearest valid keys,
a value of the wrong type or out of range is an error naming key, value and what is allowed.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import inspect
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message says which and what is allowed.

    ```python
    import fpx.experiment as fx
    try:                                                     # run from the repository root
        fx.resolve_config("configs/quickstart.py:quick", {"optim.lrr": "1e-3"})
    except fx.ConfigError as e:
        assert "optim.lrr" in str(e) and "lr" in str(e)      # names the key and the nearest valid one
    else:
        raise AssertionError
    ```
    """


def split_spec(spec: str) -> tuple[pathlib.Path, str | None]:
    path, _, preset = spec.partition(":")
    return pathlib.Path(path), (preset or None)


def config_module(path: pathlib.Path):
    """Import a config file as a module (its `get_config`, `PRESETS`, docstring).

    ```python
    import pathlib, fpx.experiment as fx
    module = fx.config_module(pathlib.Path("configs/quickstart.py"))   # run from the repository root
    assert module.PRESETS == ("quick", "default") and module.get_config("quick").train.steps == 40
    ```
    """
    module_spec = importlib.util.spec_from_file_location(f"fpx_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ConfigDict:
    """Load `path/to/config.py[:preset]` by calling its `get_config(preset)`.

    ```python
    import fpx.experiment as fx
    config = fx.load_config("configs/quickstart.py:quick")   # path[:preset], from the repository root
    assert config.experiment == "deq_classifier" and config.train.steps == 40
    assert fx.load_config("configs/quickstart.py").train.steps == 400   # no preset: get_config(None)
    ```
    """
    path, preset = split_spec(spec)
    if path.is_dir():
        raise ConfigError(f"config {str(path)!r} is a directory; give a config file, e.g. {path}/<name>.py (`fpx list --root {path}`).")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (run `fpx list` for the available configs).")
    try:
        module = config_module(path)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}.") from None
    except Exception as e:  # noqa: BLE001  (the user's file: name it and what it raised)
        raise ConfigError(f"config file {path} cannot be imported: {_raised(e)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no `get_config(arg)` function.")
    presets = getattr(module, "PRESETS", None)
    if presets is not None and preset is not None and preset not in presets:
        raise ConfigError(f"{path} has no preset {preset!r}; presets: {', '.join(presets)}.{_nearest(preset, presets)}")
    try:
        config = module.get_config(preset)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: get_config({preset!r}) raised {_raised(e)}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, got {type(config).__name__}.")
    return config


def _raised(e: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(str(pathlib.Path(__file__).parent))]
    where = f" (at {pathlib.Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _nearest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def leaf_paths(config: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(leaf_paths(value, path + "."))
        else:
            out[path] = value
    return out


def _parse_value(text: str):
    """A Python literal; a bare word is a string, also inside a list (`[anderson,km]`)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        return [_parse_value(item.strip()) for item in inner[1:-1].split(",") if item.strip()]
    return text


def check_type(path: str, old, new):
    """`new` as a value for the config key `path` whose default is `old` (an int is taken
    for a float, a tuple for a list; `None` on either side allows anything); else ConfigError."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, int):
        return float(new)
    elif isinstance(old, (int, float)) and isinstance(new, type(old)):
        return new
    elif isinstance(old, str) and isinstance(new, str):
        return new
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(new)
    raise ConfigError(
        f"config key {path!r} expects {type(old).__name__} (default {old!r}) but got "
        f"{type(new).__name__} {new!r}."
    )


def apply_overrides(config: ConfigDict, overrides: Mapping[str, str]) -> ConfigDict:
    """Apply `--config.a.b=value` overrides (values parsed as Python literals).

    ```python
    import fpx.experiment as fx
    config = fx.load_config("configs/quickstart.py:quick")  # run from the repository root
    config = fx.apply_overrides(config, {"optim.lr": "1e-2", "solver.name": "picard", "sweep.lr": "[1e-3, 1e-2]"})
    assert config.optim.lr == 1e-2 and config.solver.name == "picard" and list(config.sweep.lr) == [1e-3, 1e-2]
    ```
    """
    from ._registry import REGISTRIES, lookup, parameters

    config = ConfigDict(config.to_dict())
    paths = leaf_paths(config.to_dict())
    # `solver.name=...` first, so that the arguments that follow are checked against it.
    ordered = sorted(overrides.items(), key=lambda kv: not kv[0].endswith(".name"))
    for path, text in ordered:
        value = _parse_value(text) if isinstance(text, str) else text
        if path.startswith("sweep."):
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"sweep values must be a non-empty list, got {path}={value!r}.")
            node = config.sweep
            *parents, last = path[len("sweep."):].split(".")
            for p in parents:
                if p not in node:
                    node[p] = ConfigDict()
                node = node[p]
            node[last] = list(value)
            continue
        section, _, arg = path.partition(".")
        if path not in paths and section in REGISTRIES and "." not in arg and section in config:
            # Registry sections accept any argument of the chosen constructor.
            params = parameters(lookup(section, config[section]["name"]))
            if arg not in params:
                raise ConfigError(
                    f"unknown config key {path!r}: {config[section]['name']} takes "
                    f"{', '.join(params) or 'no arguments'}.{_nearest(arg, params)}"
                )
            default = params[arg].default
            value = check_type(path, None if default is inspect.Parameter.empty else default, value)
            config[section][arg] = value
            paths[path] = value
            continue
        if path not in paths:
            raise ConfigError(f"unknown config key {path!r}.{_nearest(path, paths)}")
        value = check_type(path, paths[path], value)
        node = config
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    prune_registry_sections(config, explicit={p for p in overrides})
    return config


def prune_registry_sections(config: ConfigDict, explicit=frozenset()) -> None:
    """Drop preset arguments the chosen constructor does not take.

    A preset written for `anderson` carries `memory`; switching `solver.name` to `km`
    (from the command line or in a sweep) drops it, while an argument the user set
    explicitly is kept and checked (and then reported if the constructor lacks it).
    """
    from ._registry import REGISTRIES, lookup, parameters

    for section in REGISTRIES:
        if section not in config or "name" not in config[section]:
            continue
        params = parameters(lookup(section, config[section]["name"]))
        for key in list(config[section].keys()):
            if key != "name" and key not in params and f"{section}.{key}" not in explicit:
                del config[section][key]


def check_keys(config: Mapping, schema: Mapping, prefix: str = "") -> None:
    """Every key of `config` must exist in `schema` (recursively), with a compatible type."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {path!r}.{_nearest(key, schema)}")
        ref = schema[key]
        if isinstance(ref, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} must be a dict of settings, got {value!r}.")
            check_keys(value, ref, path + ".")
        else:
            check_type(path, ref, value)


Check = Callable[[Any], bool]

POSITIVE: tuple[Check, str] = (lambda v: v > 0, "a positive number")
NON_NEGATIVE: tuple[Check, str] = (lambda v: v >= 0, "a non-negative number")
POSITIVE_INT: tuple[Check, str] = (lambda v: isinstance(v, int) and v >= 1, "a positive integer")
UNIT_OPEN: tuple[Check, str] = (lambda v: 0 < v < 1, "a number in (0, 1)")


def one_of(*values) -> tuple[Check, str]:
    return (lambda v: v in values, "one of " + ", ".join(repr(v) for v in values))


def check_values(config: ConfigDict, constraints: Mapping[str, tuple[Check, str]]) -> None:
    paths = leaf_paths(config.to_dict())
    for path, (check, allowed) in constraints.items():
        if path in paths and not _passes(check, paths[path]):
            raise ConfigError(f"config key {path!r} = {paths[path]!r} is not allowed: it must be {allowed}.")
        for sweep_value in _sweep_values_for(config, path):
            if not _passes(check, sweep_value):
                raise ConfigError(f"sweep value {sweep_value!r} for {path!r} is not allowed: it must be {allowed}.")


def _passes(check: Check, value) -> bool:
    try:
        return bool(check(value))
    except TypeError:  # e.g. a string where a number is needed
        return False


def resolve_sweep_key(config: ConfigDict, key: str, what: str = "sweep key") -> str:
    """`lr` -> `optim.lr`: a sweep key is a full path or a leaf name that is unique.

    `section.argument` of a registry section (`solver.memory`) is taken as it is: the
    constructor the member's config names checks it (`member_config`)."""
    from ._registry import REGISTRIES

    paths = [p for p in leaf_paths(config.to_dict()) if not p.startswith(("sweep.", "variants."))]
    if key in paths:
        return key
    section, _, argument = key.partition(".")
    if section in REGISTRIES and section in config and argument and "." not in argument:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"unknown {what} {key!r}: no config key has that name.{_nearest(key, [p.rsplit('.', 1)[-1] for p in paths])}")
    raise ConfigError(f"{what} {key!r} is ambiguous: write the full path, one of {', '.join(matches)}.")


def sweep_items(config: ConfigDict) -> list[tuple[str, list]]:
    """`(config path, values)` for every swept key; nested sweep dicts give dotted keys."""
    sweep = config.get("sweep", None)
    if not sweep:
        return []
    return [(resolve_sweep_key(config, key), list(values)) for key, values in leaf_paths(sweep.to_dict()).items()]


def _sweep_values_for(config: ConfigDict, path: str):
    for swept, values in sweep_items(config):
        if swept == path:
            yield from values


def set_path(config: ConfigDict, path: str, value) -> None:
    node = config
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value


def get_path(config: Mapping, path: str):
    node = config
    for p in path.split("."):
        node = node[p]
    return node


def config_hash(config: ConfigDict) -> str:
    return hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
