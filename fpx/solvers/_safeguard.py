"""Shared machinery of the multi-secant solvers (Anderson, Broyden).

Both keep the last *accepted* iterate and propose the next one from it. A proposal made
from a non-empty memory is judged when the driver hands it back evaluated: if its residual
grew beyond `safeguard * residual(accepted)` it is rejected, the memory is reset and the
next proposal is a plain relaxed step from the accepted iterate. Judging the proposal one
step late keeps every step at exactly one evaluation of `fn` (no `lax.cond`, which under
`vmap` would run both branches).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Scalar

from .. import _validate as checks
from .._misc import ravel
from ._base import AbstractFixedPointSolver, _check_unit_interval


class MemoryState(eqx.Module):
    z_acc: Float[Array, " n"]  # last accepted iterate (flat)
    g_acc: Float[Array, " n"]  # T(z_acc) - z_acc
    r_acc: Scalar  # |g_acc|
    from_memory: Bool[Array, ""]  # was the pending proposal built from a non-empty memory?
    left: Float[Array, "m n"]  # Anderson: dZ, Broyden: U
    right: Float[Array, "m n"]  # Anderson: dG, Broyden: V
    count: Int[Array, ""]  # valid memory slots since the last reset (<= m); the rest are stale
    pos: Int[Array, ""]  # next slot to write
    num_rejected: Int[Array, ""]
    num_accepted: Int[Array, ""]


class AbstractMemorySolver(AbstractFixedPointSolver):
    """What Anderson and Broyden share: their argument checks and one evaluation per step."""

    vmap_free_running: ClassVar[bool] = True  # counters-only stats, no inner loops

    # Subclasses declare `memory`, `beta`, `safeguard`, `rtol`, `atol`, `norm`.

    fn_evals_per_step: ClassVar[int | None] = 1

    def __check_init__(self):
        name = type(self).__name__
        checks.integer(name, "memory", self.memory, minimum=1, maximum=1024)
        _check_unit_interval(name, "beta", self.beta)
        if self.safeguard is not None:
            checks.real(
                name, "safeguard", self.safeguard, low=1,
                hint=" It is the residual growth a memory step may cause before it is rejected: a number >= 1 or None (no safeguard).",
            )

class AbstractSecantSolver(AbstractMemorySolver):
    """The generic safeguarded step on a `MemoryState`; a subclass supplies the secant
    update (`_new_pair`) and the proposal (`_propose`). Anderson implements the same rules
    in a specialised form (see `fpx.solvers._anderson`)."""

    def init(self, fn, z0, fz0, args):
        z, _ = ravel(z0)
        n, m = z.size, self.memory
        zeros = jnp.zeros((m, n), z.dtype)
        int0 = jnp.array(0, jnp.int32)
        return MemoryState(
            z_acc=z,
            g_acc=jnp.zeros_like(z),
            r_acc=jnp.array(jnp.inf, z.dtype),
            from_memory=jnp.array(False),
            left=zeros,
            right=zeros,
            count=int0,
            pos=int0,
            num_rejected=int0,
            num_accepted=int0,
        )

    @abc.abstractmethod
    def _new_pair(self, state: MemoryState, dz, dg) -> tuple[Array, Array, Bool[Array, ""]]:
        """Memory columns to store for the secant pair (dz, dg), and whether to store them."""

    @abc.abstractmethod
    def _propose(self, state: MemoryState) -> Array:
        """Next iterate from `state.z_acc`, `state.g_acc` and the memory."""

    def step(self, fn, z, fz, args, state):
        zf, unravel = ravel(z)
        fzf, _ = ravel(fz)
        g = fzf - zf
        # The driver's norm, so the safeguard judges steps by the same measure as the test.
        r = jnp.asarray(self.norm(unravel(g))).astype(g.dtype)
        if self.safeguard is None:
            accept = jnp.array(True)
        else:
            accept = ~state.from_memory | (r <= self.safeguard * state.r_acc)
        has_prev = state.num_accepted > 0

        left_col, right_col, store = self._new_pair(state, zf - state.z_acc, g - state.g_acc)
        store = accept & has_prev & store
        # One masked row write per array (slots beyond `count` are ignored by `_propose`,
        # so a reset only has to zero the counters, not the memory).
        row = (jnp.arange(self.memory) == state.pos)[:, None] & store
        left = jnp.where(row, left_col[None, :], state.left)
        right = jnp.where(row, right_col[None, :], state.right)
        count = jnp.where(store, jnp.minimum(state.count + 1, self.memory), state.count)
        pos = jnp.where(store, (state.pos + 1) % self.memory, state.pos)
        count = jnp.where(accept, count, 0)
        pos = jnp.where(accept, pos, 0)

        state = MemoryState(
            z_acc=jnp.where(accept, zf, state.z_acc),
            g_acc=jnp.where(accept, g, state.g_acc),
            r_acc=jnp.where(accept, r, state.r_acc),
            from_memory=count > 0,
            left=left,
            right=right,
            count=count,
            pos=pos,
            num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
            num_accepted=state.num_accepted + accept.astype(jnp.int32),
        )
        z_next = unravel(self._propose(state))
        return z_next, fn(z_next, args), state

    def stats(self, state):
        return {"num_rejected": state.num_rejected}
