"""`Operator`: the `(init, apply)` pair every `fpx.operators` constructor returns."""

from __future__ import annotations

import functools as ft
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree


class Operator(NamedTuple):
    """A neural operator as a pair of pure functions.

    - `init(key) -> params`: a pytree of real arrays (float64 when `jax_enable_x64` is
      on, else float32, unless the constructor was given a `dtype`).
    - `apply(params, x) -> y`: **one** sample; `jax.vmap(op.apply, in_axes=(None, 0))`
      for a batch. Both are pure, so `jax.jit`, `jax.vmap` and `jax.grad` compose with them.

    A weight-tied *block* for `fpx.operators.deq` (and `iterate(..., injection=True)`) is
    an `Operator` whose apply takes the state as well: `apply(params, z, x) -> z`.

    Any pair of functions is an operator; being a `NamedTuple`, it unpacks as
    `init, apply = op`.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr
    from fpx.operators import Operator
    scale = Operator(init=lambda key: {"a": jnp.ones(())}, apply=lambda p, x: p["a"] * x)
    params = scale.init(jr.PRNGKey(0))
    assert jax.grad(lambda p: scale.apply(p, jnp.arange(3.0)).sum())(params)["a"] == 3.0
    ```
    """

    init: Callable[[PRNGKeyArray], PyTree]
    apply: Callable[..., Any]


def check_real_params(params: PyTree, name: str = "params") -> PyTree:
    """Raise a `TypeError` if any leaf of `params` is complex; return `params` unchanged.

    fpx keeps every trainable parameter real (FNO spectral weights are stored as
    `{"real": ..., "imag": ...}` pairs). For a complex leaf `w`, `jax.grad` returns the
    *conjugate* of the steepest-ascent direction (`∂L/∂Re w - i ∂L/∂Im w`), and optax
    applies it as is: the imaginary parts then move *up* the loss. The check runs at
    trace time (it only looks at dtypes), so it costs nothing under `jit`; the FNO and
    spectral-convolution operators call it in `apply`.

    ```python
    import jax.numpy as jnp
    from fpx.operators import check_real_params
    check_real_params({"w": jnp.ones(3)})
    try:
        check_real_params({"w": jnp.ones(3, jnp.complex64)})
    except TypeError as e:
        assert "complex" in str(e)
    ```
    """
    for path, leaf in jtu.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
            where = jtu.keystr(path) or "(the root)"
            raise TypeError(
                f"{name}{where} has complex dtype {dtype}; fpx.operators keeps parameters real. "
                f"jax.grad returns the conjugate cotangent for complex leaves, so optax would move "
                f"their imaginary parts the wrong way. Store the weight as two real arrays, e.g. "
                f"{{'real': w.real, 'imag': w.imag}}, and form `jax.lax.complex(real, imag)` inside apply."
            )
    return params


def chain(*ops: Operator) -> Operator:
    """The operators applied one after the other: `chain(f, g).apply(p, x) = g(p[1], f(p[0], x))`.

    `params` is a tuple with one entry per operator; `init` splits the key. Use it to put
    an encoder before, and a decoder after, a `deq` or `iterate` block.

    ```python
    import jax.numpy as jnp, jax.random as jr
    from fpx.operators import Operator, chain
    double = Operator(lambda key: (), lambda p, x: 2 * x)
    shift = Operator(lambda key: jnp.ones(()), lambda p, x: x + p)
    op = chain(double, shift)
    assert float(op.apply(op.init(jr.PRNGKey(0)), jnp.array(3.0))) == 7.0
    ```
    """
    if not ops:
        raise ValueError("chain() needs at least one operator.")
    for i, op in enumerate(ops):
        if not (callable(getattr(op, "init", None)) and callable(getattr(op, "apply", None))):
            raise TypeError(f"chain(): argument {i} is {type(op).__name__}, not an Operator(init, apply).")

    def init(key: PRNGKeyArray) -> tuple:
        keys = jr.split(key, len(ops))
        return tuple(op.init(k) for op, k in zip(ops, keys))

    def apply(params: tuple, x):
        if not isinstance(params, (tuple, list)) or len(params) != len(ops):
            raise ValueError(
                f"chain of {len(ops)} operators needs a tuple of {len(ops)} parameter pytrees "
                f"(what its init returns), got {type(params).__name__}."
            )
        for op, p in zip(ops, params):
            x = op.apply(p, x)
        return x

    return Operator(init, apply)


# --------------------------------------------------------------------------- shared helpers


def default_dtype(dtype) -> jnp.dtype:
    """`dtype`, or the default float dtype at call time (float64 under `jax_enable_x64`)."""
    return jnp.dtype(dtype) if dtype is not None else jnp.dtype(jnp.result_type(float))


class Uniform(NamedTuple):
    """Init spec: `U[low, high)` of this shape."""

    shape: tuple[int, ...]
    low: float
    high: float


class TruncatedNormal(NamedTuple):
    """Init spec: `std * N(0, 1)` truncated to two standard deviations, rescaled to variance `std**2`."""

    shape: tuple[int, ...]
    std: float


class Zeros(NamedTuple):
    """Init spec: zeros of this shape."""

    shape: tuple[int, ...]


_SPECS = (Uniform, TruncatedNormal, Zeros)


def _bucket(n: int) -> int:
    """`n` rounded up to a power of two (at least 256), so few draw sizes are ever compiled."""
    return max(256, 1 << max(n - 1, 0).bit_length())


@ft.partial(jax.jit, static_argnums=(1, 2))
def _draw_uniform(key: PRNGKeyArray, n: int, dtype) -> Array:
    return jr.uniform(key, (n,), dtype)


@ft.partial(jax.jit, static_argnums=(1, 2))
def _draw_normal(key: PRNGKeyArray, n: int, dtype) -> Array:
    # N(0, 1) truncated to [-2, 2], rescaled to unit variance.
    return jr.truncated_normal(key, -2.0, 2.0, (n,), dtype) / 0.87962566103423978


def _sizes(specs: PyTree):
    leaves, treedef = jtu.tree_flatten(specs, is_leaf=lambda x: isinstance(x, _SPECS))
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    n_uniform = sum(n for leaf, n in zip(leaves, sizes) if isinstance(leaf, Uniform))
    n_normal = sum(n for leaf, n in zip(leaves, sizes) if isinstance(leaf, TruncatedNormal))
    return leaves, treedef, sizes, n_uniform, n_normal


def _assemble(specs: PyTree, uniform: Array, normal: Array, dtype) -> PyTree:
    """Cut the flat draws into the tensors of `specs`, scaled as each spec says."""
    leaves, treedef, sizes, _, _ = _sizes(specs)
    out, at_uniform, at_normal = [], 0, 0
    for leaf, n in zip(leaves, sizes):
        if isinstance(leaf, Uniform):
            piece = uniform[at_uniform : at_uniform + n].reshape(leaf.shape)
            out.append(leaf.low + (leaf.high - leaf.low) * piece)
            at_uniform += n
        elif isinstance(leaf, TruncatedNormal):
            out.append(leaf.std * normal[at_normal : at_normal + n].reshape(leaf.shape))
            at_normal += n
        else:
            out.append(jnp.zeros(leaf.shape, dtype))
    return jtu.tree_unflatten(treedef, out)


def make_init(specs: Callable[[], PyTree], dtype, transform: Callable[[PyTree], PyTree] | None = None):
    """`init(key)`: the tensors of the pytree of specs `specs()`, in `dtype` (default float at call time).

    All uniform tensors come from one flat draw and all normal ones from another, each of
    a power-of-two length: a random-bits kernel takes about 0.3 s to compile on a small
    CPU, and this way a handful of compiled draws serve every operator, instead of one
    draw per tensor shape per operator. Cutting the draws into tensors is one small
    jitted function per operator. Works under `jit` and `vmap` (e.g. over keys).

    ```python
    import jax, jax.numpy as jnp, fpx
    ops = fpx.operators
    init = ops.make_init(lambda: {"lift": ops.linear_spec(2, 8), "head": ops.mlp_spec((8, 16, 1))}, jnp.float32)
    params = init(jax.random.PRNGKey(0))
    y = ops.mlp(params["head"], ops.linear(params["lift"], jnp.ones((5, 2))), jax.nn.gelu)
    assert y.shape == (5, 1)
    ```
    """

    @jax.jit
    def assemble(uniform, normal):
        params = _assemble(specs(), uniform, normal, uniform.dtype)
        return params if transform is None else transform(params)

    def init(key: PRNGKeyArray) -> PyTree:
        dt = default_dtype(dtype)
        _, _, _, n_uniform, n_normal = _sizes(specs())
        k_uniform, k_normal = jr.split(key)
        uniform = _draw_uniform(k_uniform, _bucket(n_uniform), dt)
        normal = _draw_normal(k_normal, _bucket(n_normal), dt) if n_normal else jnp.zeros((0,), dt)
        return assemble(uniform, normal)

    return init


def linear_spec(fan_in: int, fan_out: int) -> dict[str, Uniform]:
    """Init spec of a dense layer, PyTorch's `nn.Linear` default: weight and bias ~ U(±1/sqrt(fan_in)).

    ```python
    import jax, jax.numpy as jnp, fpx
    params = fpx.operators.make_init(lambda: fpx.operators.linear_spec(3, 4), jnp.float32)(jax.random.PRNGKey(0))
    assert params["weight"].shape == (3, 4) and float(jnp.abs(params["bias"]).max()) <= 3 ** -0.5
    ```
    """
    bound = 1.0 / math.sqrt(fan_in)
    return {"weight": Uniform((fan_in, fan_out), -bound, bound), "bias": Uniform((fan_out,), -bound, bound)}


def glorot_spec(fan_in: int, fan_out: int) -> dict:
    """Glorot (Xavier) truncated-normal weight, zero bias (DeepXDE's default)."""
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return {"weight": TruncatedNormal((fan_in, fan_out), std), "bias": Zeros((fan_out,))}


def linear(p: dict[str, Array], x: Float[Array, "... i"]) -> Float[Array, "... o"]:
    """`x @ W + b` over the last axis (explicit broadcasting of the bias).

    ```python
    import jax.numpy as jnp, fpx
    p = {"weight": jnp.eye(2), "bias": jnp.array([1.0, -1.0])}
    assert jnp.array_equal(fpx.operators.linear(p, jnp.ones((3, 2))), jnp.tile(jnp.array([2.0, 0.0]), (3, 1)))
    ```
    """
    y = x @ p["weight"]
    return y + jnp.reshape(p["bias"], (1,) * (y.ndim - 1) + p["bias"].shape)


def mlp_spec(sizes: tuple[int, ...], layer_spec=linear_spec) -> list[dict]:
    """Init specs of an MLP with layer widths `sizes` (one `layer_spec` per consecutive pair).

    ```python
    import fpx
    assert len(fpx.operators.mlp_spec((4, 32, 32, 1))) == 3
    ```
    """
    return [layer_spec(a, b) for a, b in zip(sizes[:-1], sizes[1:])]


def mlp(params: list[dict[str, Array]], x, activation, final_activation: bool = False):
    """Apply the dense layers `params` (from `mlp_spec`) with `activation` between them.

    ```python
    import jax, jax.numpy as jnp, fpx
    layer = {"weight": jnp.eye(2), "bias": jnp.zeros(2)}
    y = fpx.operators.mlp([layer, layer], jnp.array([-1.0, 2.0]), jax.nn.relu)
    assert jnp.array_equal(y, jnp.array([0.0, 2.0]))
    ```
    """
    for i, p in enumerate(params):
        x = linear(p, x)
        if i < len(params) - 1 or final_activation:
            x = activation(x)
    return x


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def check_param_shapes(params: PyTree, specs: PyTree, what: str) -> None:
    """Trace-time check that `params` has the leaves and shapes of the init specs `specs`.

    Compares leaf by leaf (by key path, so lists and tuples are interchangeable) and names
    every leaf that is missing, unexpected or of the wrong shape, with the shape this
    operator expects: parameters built for another configuration (other `modes`, `width`,
    channels or number of layers) fail here instead of inside an einsum.
    """
    expected = {
        jtu.keystr(path): tuple(spec.shape)
        for path, spec in jtu.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, _SPECS))[0]
    }
    if not isinstance(params, (dict, list, tuple)):
        raise TypeError(f"{what}: `params` must be the pytree its `init(key)` returns, got {type(params).__name__}.")
    got = {
        jtu.keystr(path): tuple(leaf.shape if hasattr(leaf, "shape") else jnp.shape(leaf))
        for path, leaf in jtu.tree_flatten_with_path(params)[0]
    }
    problems = []
    for where, shape in expected.items():
        if where not in got:
            problems.append(f"params{where} is missing (expected shape {shape})")
        elif got[where] != shape:
            problems.append(f"params{where} has shape {got[where]} but this operator expects {shape}")
    problems += [f"params{where} (shape {got[where]}) is not a parameter of this operator" for where in got if where not in expected]
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ValueError(
            f"{what}: the parameters do not fit this operator:\n  "
            + "\n  ".join(shown)
            + "\nThey were probably built for another configuration (other modes, width, channels or layers): "
            "create them with this operator's `init(key)`."
        )
