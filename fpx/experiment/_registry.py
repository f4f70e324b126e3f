"""Solvers, adjoints and optimizers chosen from config by name with their arguments.

A config section such as `solver = {"name": "anderson", "memory": 5, "rtol": 1e-4}` is
turned into `fpx.Anderson(memory=5, rtol=1e-4)`; any argument the constructor takes may
be set (also from the command line), anything else is an error naming the nearest
valid argument.

All the registries live here: `SOLVERS`, `ADJOINTS`, `OPTIMIZERS` (config sections) and
`TASKS` (experiments, filled by `register_task`). Each is exported as a read-only view
(`types.MappingProxyType`); add a task with `register_task`, not by assignment.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .. import adjoint as _adjoint
from .. import solvers as _solvers
from ._config import ConfigError

_SOLVERS: dict[str, Callable] = {
    "picard": _solvers.Picard,
    "km": _solvers.KM,
    "halpern": _solvers.Halpern,
    "anderson": _solvers.Anderson,
    "broyden": _solvers.Broyden,
    "newton_krylov": _solvers.NewtonKrylov,
    "squarem": _solvers.SQUAREM,
}
_ADJOINTS: dict[str, Callable] = {
    "implicit": _adjoint.ImplicitAdjoint,
    "jfb": _adjoint.JFBAdjoint,
    "phantom": _adjoint.PhantomAdjoint,
    "reversible": _adjoint.ReversibleAdjoint,
    "unrolled": _adjoint.UnrolledAdjoint,
}
SOLVERS: Mapping[str, Callable] = MappingProxyType(_SOLVERS)
ADJOINTS: Mapping[str, Callable] = MappingProxyType(_ADJOINTS)


def _optimizer(name: str) -> Callable:
    # `inject_hyperparams` keeps the learning rate in the optimizer state, so it can be a
    # traced per-member value in a vmapped sweep (see `set_learning_rate`).
    def make(lr: float = 1e-3, weight_decay: float = 0.0, **kwargs):
        base = getattr(optax, name)
        inner = optax.inject_hyperparams(base)(learning_rate=lr, **kwargs)
        if weight_decay:
            return optax.chain(optax.add_decayed_weights(weight_decay), inner)
        return inner

    make.__signature__ = inspect.Signature(
        [
            inspect.Parameter("lr", inspect.Parameter.KEYWORD_ONLY, default=1e-3),
            inspect.Parameter("weight_decay", inspect.Parameter.KEYWORD_ONLY, default=0.0),
        ]
        + [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for n, p in inspect.signature(getattr(optax, name)).parameters.items()
            if n not in ("learning_rate", "weight_decay") and p.default is not inspect.Parameter.empty
        ]
    )
    return make


OPTIMIZERS: Mapping[str, Callable] = MappingProxyType({name: _optimizer(name) for name in ("adam", "sgd", "rmsprop", "lion")})


def set_learning_rate(opt_state, lr):
    """Overwrite the injected learning rate(s) in an optax state with `lr` (may be traced)."""

    def is_injected(x):
        return hasattr(x, "hyperparams") and isinstance(x, tuple) and "learning_rate" in x.hyperparams

    def update(x):
        if is_injected(x):
            hyper = dict(x.hyperparams)
            hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
            return x._replace(hyperparams=hyper)
        return x

    found = []
    new = jax.tree_util.tree_map(lambda x: found.append(1) or update(x) if is_injected(x) else x, opt_state, is_leaf=is_injected)
    if not found:
        raise ValueError("set_learning_rate: the optimizer state has no injected learning rate (use optax.inject_hyperparams).")
    return new


# The config sections built from a registry: `solver = {"name": ..., **arguments}` etc.
REGISTRIES: Mapping[str, Mapping[str, Callable]] = MappingProxyType({"solver": SOLVERS, "adjoint": ADJOINTS, "optim": OPTIMIZERS})

_TASKS: dict[str, Callable] = {}
TASKS: Mapping[str, Callable] = MappingProxyType(_TASKS)


def register_task(name: str):
    """Decorator: `@register_task("deq_classifier")` on a `build(config) -> Task` function.

    ```python
    import fpx.experiment as fx

    @fx.register_task("docs_example_task")
    def build_docs_example_task(config):   # returns a Task built from the config (fpx.experiment.Task)
        return fx.load_tasks()["projective_classifier"](config)   # here: a built-in task under a new name

    build_docs_example_task.headline = ("eval/loss",)      # the metrics `fpx report` shows first
    assert fx.TASKS["docs_example_task"] is build_docs_example_task
    ```
    """

    def wrap(build):
        _TASKS[name] = build
        return build

    return wrap


def load_tasks() -> Mapping[str, Callable]:
    """Import the built-in tasks (each module of `fpx/experiment/tasks` registers its own); return `TASKS`.

    ```python
    import fpx.experiment as fx
    tasks = fx.load_tasks()
    assert {"deq_classifier", "fno_burgers"} <= set(tasks) and tasks is fx.TASKS
    ```
    """
    import importlib
    import pkgutil

    from . import tasks

    for module in pkgutil.iter_modules(tasks.__path__):
        importlib.import_module(f"{tasks.__name__}.{module.name}")
    return TASKS


def parameters(factory: Callable) -> dict[str, inspect.Parameter]:
    return {
        n: p
        for n, p in inspect.signature(factory).parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def lookup(section: str, name: str) -> Callable:
    registry = REGISTRIES[section]
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown {section} name {name!r} at '{section}.name'; choose from {', '.join(registry)}.{hint}")
    return registry[name]


def check_section(section: str, cfg: Mapping[str, Any]) -> None:
    factory = lookup(section, cfg["name"])
    params = parameters(factory)
    for key in cfg:
        if key != "name" and key not in params:
            close = difflib.get_close_matches(key, list(params), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{section}.{key}': {cfg['name']} takes {', '.join(params) or 'no arguments'}.{hint}"
            )


def build(section: str, cfg: Mapping[str, Any], **extra) -> Any:
    """Instantiate `cfg["name"]` from the `section` registry with the other keys as arguments.

    ```python
    import fpx, fpx.experiment as fx
    solver = fx.build("solver", {"name": "anderson", "memory": 3, "rtol": 1e-4})
    assert isinstance(solver, fpx.Anderson) and solver.memory == 3 and solver.rtol == 1e-4
    try:
        fx.build("solver", {"name": "anderson", "memroy": 3})
    except fx.ConfigError as e:
        assert "memory" in str(e)                             # "Did you mean 'memory'?"
    ```
    """
    check_section(section, cfg)
    factory = lookup(section, cfg["name"])
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    kwargs.update(extra)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid '{section}' settings {dict(cfg)}: {e}") from e
