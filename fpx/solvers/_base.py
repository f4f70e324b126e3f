"""The interface every fixed-point solver implements."""

from __future__ import annotations

import abc
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree, Scalar

from .. import _validate as checks
from .._misc import unguarded_norm
from .._solution import RESULTS

State = TypeVar("State")
Fn = Callable[[PyTree, Any], PyTree]


def _check_tolerance(cls: str, name: str, value) -> None:
    checks.real(
        cls,
        name,
        value,
        low=0,
        label=f"`{name}`",
        context=f" in {cls}({name}={value!r})",
        hint=" Tolerances must be finite: an infinite one accepts any iterate.",
    )


def is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_unit_interval(cls: str, name: str, value) -> None:
    checks.real(
        cls, name, value, low=0, high=1, low_open=True,
        hint=f" {name}=1 is the plain Picard step, smaller values damp it.",
    )


class AbstractFixedPointSolver(eqx.Module, Generic[State]):
    """Base class of fpx's fixed-point solvers (the optimistix `init/step/terminate` pattern).

    The shared driver (`fpx.fixed_point`) owns the loop: it evaluates `fz0 = fn(z0, args)`,
    calls `init` once, then `step` until `terminate` says stop or `max_steps` is reached.
    It also owns the non-finite check, the best-residual iterate, the residual trace and
    infeasibility detection, so a solver only says how to move.

    Subclasses set the fields `rtol`, `atol` and `norm` (stopping test
    `norm(z - fn(z)) <= atol + rtol * norm(z)`) and implement:

    - `init(fn, z0, fz0, args) -> state`
    - `step(fn, z, fz, args, state) -> (z_next, fz_next, state_next)`: `fz == fn(z, args)`
      on entry; the step proposes the next iterate and evaluates `fn` there.
    - optionally `terminate`, `stats`, and `drift_scale` (enables infeasibility detection).

    ```python
    from collections.abc import Callable
    import jax.numpy as jnp, fpx
    class Averaged(fpx.AbstractFixedPointSolver):
        rtol: float = 1e-5
        atol: float = 1e-6
        norm: Callable = fpx.two_norm
        def init(self, fn, z0, fz0, args):
            return None                                    # no state
        def step(self, fn, z, fz, args, state):
            z_next = 0.5 * (z + fz)                        # the next iterate, and fn evaluated there
            return z_next, fn(z_next, args), state
    sol = fpx.fixed_point(lambda z, a: jnp.cos(z) + a, jnp.zeros(2), jnp.zeros(2), solver=Averaged())
    assert sol.converged and jnp.allclose(sol.value, jnp.cos(sol.value), atol=1e-4)
    ```
    """

    # Subclasses declare the fields `rtol: float`, `atol: float` and
    # `norm: Callable[[PyTree], Scalar]` (not declared here as `AbstractVar`s, which would
    # put them first in every subclass's positional signature: `KM(0.5)` must mean alpha).

    # Evaluations of `fn` per step, when it is a constant; `None` when the solver counts
    # them itself in `stats(state)["num_fn_evals"]`.
    fn_evals_per_step: ClassVar[int | None] = 1

    # True for solvers built for one class of maps that always has a fixed point (the
    # trajectory maps of `fpx.parallel.scan`): the driver then never reads an iterate that
    # moves while the residual stalls as "no fixed point" (out of steps is out of steps).
    map_has_fixed_point: ClassVar[bool] = False

    # Under `vmap`, whether a member that has finished may keep stepping unmasked while the
    # rest of the batch runs; the driver then freezes only what the solution is read from,
    # and of the state only counters, scalars and arrays smaller than `z` (`_frozen_leaves`
    # in the driver). A solver opts in when its `stats` read nothing else of the state and
    # its step has no data-dependent inner loop (whose length a finished member's wandering
    # iterate would set for the batch: Newton–Krylov's GMRES and line search). The default
    # keeps JAX's own rule: every finished member's whole state frozen.
    vmap_free_running: ClassVar[bool] = False

    def __check_init__(self):
        _check_tolerance(type(self).__name__, "rtol", self.rtol)
        _check_tolerance(type(self).__name__, "atol", self.atol)
        checks.function(type(self).__name__, "norm", self.norm, what="a function of a pytree, e.g. fpx.two_norm")

    @abc.abstractmethod
    def init(self, fn: Fn, z0: PyTree, fz0: PyTree, args: Any) -> State:
        """Initial solver state, given `z0` and `fz0 = fn(z0, args)`."""

    @abc.abstractmethod
    def step(self, fn: Fn, z: PyTree, fz: PyTree, args: Any, state: State) -> tuple[PyTree, PyTree, State]:
        """One iteration: returns the next iterate, `fn` evaluated there, and the new state."""

    def terminate(
        self, z: PyTree, fz: PyTree, residual_norm: Scalar, state: State
    ) -> tuple[Bool[Array, ""], RESULTS]:
        """Stopping test; the default is `residual_norm <= atol + rtol * norm(z)` with a finite tolerance.

        With the default `two_norm`, `|z|` here is the plain sum of squares (its overflow
        guard is a branch per step, 5 % of a DEQ forward pass): if it overflows, the
        tolerance is inf, which never passes, so the guard is not needed for the truth of
        the result. (The residual norm, computed by the driver, keeps the guard.)
        """
        tol = self.atol + self.rtol * unguarded_norm(self.norm)(z)
        converged = (residual_norm <= tol) & jnp.isfinite(tol)
        return converged, RESULTS.successful

    def stats(self, state: State) -> dict[str, Any]:
        """Solver-specific statistics merged into `Solution.stats`."""
        return {}

    def drift_scale(self, state: State, num_steps: Array) -> Array | None:
        """Normaliser `s_k` with `(z_0 - z_k) / s_k -> v` (the infimal displacement of fn).

        `None` (the default) means the solver's iterates have no such law and
        infeasibility detection is unavailable with it.
        """
        return None
