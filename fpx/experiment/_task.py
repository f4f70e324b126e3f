"""The interface an experiment implements for the generic runner."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._config import ConfigError


def config_dtype(name: str):
    """The dtype named by the config key `dtype`; float64 needs 64-bit JAX switched on."""
    dtype = jnp.dtype(name)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError("config key 'dtype' = 'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1.")
    return dtype


class Task(abc.ABC):
    """A trainable experiment: pure functions of (state, hyperparameters, key).

    `dynamic` lists the config paths whose values may differ between the members of one
    vmapped sweep; the runner passes them as traced scalars in `hp` (keyed by path).
    Sweeps over any other key (a width, a solver name) are run as separate groups, each
    compiled once.

    - `init(hp, key) -> state`
    - `train_step(state, hp, key) -> (state, metrics)`: one optimizer step; `metrics` is
      a dict of scalars (averaged over the chunk by the runner).
    - `evaluate(state, hp) -> metrics`: a dict of scalars.

    `headline` names the metrics that are the task's result (`"eval/test_rel_l2"`, ...):
    `fpx report` shows them first and plots all of them. A registered build function
    declares them as `build_<name>.headline = (...)` (see `task_headline`).

    ```python
    import jax, jax.numpy as jnp, fpx.experiment as fx

    class Quadratic(fx.Task):                  # minimise |w - 1|^2 by gradient steps
        dynamic = ("seed", "optim.lr")         # may differ between the members of one vmapped sweep
        def init(self, hp, key):
            return {"w": jax.random.normal(key, (3,))}
        def train_step(self, state, hp, key):
            loss, g = jax.value_and_grad(lambda w: jnp.sum((w - 1.0) ** 2))(state["w"])
            return {"w": state["w"] - hp["optim.lr"] * g}, {"train/loss": loss}
        def evaluate(self, state, hp):
            return {"eval/loss": jnp.sum((state["w"] - 1.0) ** 2)}

    task, hp = Quadratic(), {"seed": 0, "optim.lr": 0.1}
    state = task.init(hp, jax.random.key(0))
    for k in range(50):
        state, metrics = task.train_step(state, hp, jax.random.key(k))
    assert task.evaluate(state, hp)["eval/loss"] < 1e-6
    ```
    """

    dynamic: ClassVar[tuple[str, ...]] = ("seed",)
    headline: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def init(self, hp: Mapping[str, Array], key: PRNGKeyArray) -> PyTree: ...

    @abc.abstractmethod
    def train_step(self, state: PyTree, hp: Mapping[str, Array], key: PRNGKeyArray) -> tuple[PyTree, dict[str, Any]]: ...

    @abc.abstractmethod
    def evaluate(self, state: PyTree, hp: Mapping[str, Array]) -> dict[str, Any]: ...


def task_headline(experiment: str) -> tuple[str, ...]:
    """The headline metrics of the registered task `experiment`; `()` if it declares none
    (or is not registered, e.g. a report of a run made by an older fpx).

    ```python
    from fpx.experiment._task import task_headline
    assert task_headline("fno_burgers") == ("eval/test_rel_l2", "eval/zero_shot_rel_l2")
    assert task_headline("no_such_task") == ()
    ```
    """
    from ._registry import TASKS, load_tasks

    load_tasks()
    return tuple(getattr(TASKS.get(experiment), "headline", ()))
