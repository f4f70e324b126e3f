"""Losses and metrics of operator learning: relative L2 and relative H1 errors."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Scalar


def _check_same_shape(pred, target, what: str):
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"{what}: `pred` and `target` must have the same shape, got {pred.shape} and {target.shape}.")
    return pred, target


def relative_l2(pred: Float[ArrayLike, "..."], target: Float[ArrayLike, "..."]) -> Scalar:
    """`|pred - target|_2 / |target|_2` of **one** sample, the norm over all its axes.

    The FNO papers' metric. A zero `target` gives `inf` (or NaN if `pred` is zero too).
    `jax.vmap` it for per-sample values; `mean_relative_l2` averages over a batch.

    ```python
    import jax.numpy as jnp
    from fpx.operators import relative_l2
    assert jnp.isclose(relative_l2(jnp.array([3.0, 4.0]) * 1.1, jnp.array([3.0, 4.0])), 0.1)
    ```
    """
    pred, target = _check_same_shape(pred, target, "relative_l2")
    return jnp.linalg.norm((pred - target).ravel()) / jnp.linalg.norm(target.ravel())


def mean_relative_l2(pred: Float[ArrayLike, "b ..."], target: Float[ArrayLike, "b ..."]) -> Scalar:
    """Mean over the leading (batch) axis of the per-sample `relative_l2` (norm over all other axes).

    ```python
    import jax.numpy as jnp
    from fpx.operators import mean_relative_l2
    target = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    pred = target * jnp.array([[1.1], [1.3]])
    assert jnp.isclose(mean_relative_l2(pred, target), 0.2)
    ```
    """
    pred, target = _check_same_shape(pred, target, "mean_relative_l2")
    if pred.ndim < 1:
        raise ValueError("mean_relative_l2: the inputs need a leading batch axis; use relative_l2 for one sample.")
    batch = pred.shape[0]
    error = jnp.linalg.norm((pred - target).reshape(batch, -1), axis=1)
    return jnp.mean(error / jnp.linalg.norm(target.reshape(batch, -1), axis=1))


def _periodic_derivative(f: Float[Array, "s ..."], dx: float, method: str) -> Float[Array, "s ..."]:
    s = f.shape[0]
    if method == "fd":
        return (jnp.roll(f, -1, axis=0) - jnp.roll(f, 1, axis=0)) / (2.0 * dx)
    f_hat = jnp.fft.rfft(f, axis=0)
    k = jnp.arange(s // 2 + 1)
    if s % 2 == 0:
        k = k.at[-1].set(0)  # the Nyquist mode has no well-defined (real) derivative
    wavenumber = (2.0 * jnp.pi / (s * dx)) * k
    wavenumber = jnp.reshape(wavenumber, wavenumber.shape + (1,) * (f.ndim - 1))
    return jnp.fft.irfft(1j * wavenumber * f_hat, n=s, axis=0)


def h1_relative(
    pred: Float[ArrayLike, "s ..."],
    target: Float[ArrayLike, "s ..."],
    dx: float,
    *,
    derivative: str = "spectral",
) -> Scalar:
    """Relative H1 error of one periodic 1-D field: `|e|_H1 / |target|_H1`, `|f|_H1^2 = |f|^2 + |f'|^2`.

    `pred`, `target` of shape `(s,)` or `(s, channels)`, sampled at spacing `dx` on a
    periodic domain of length `s * dx` (the derivative is along axis 0). The norms are
    Riemann sums (the common factor `dx` cancels); `dx` fixes the scale of `f' = df/dx`
    relative to `f`. `derivative="spectral"` (default) differentiates exactly on the
    resolved Fourier modes (the Nyquist mode of an even `s` is dropped);
    `derivative="fd"` uses the second-order central difference.

    ```python
    import jax.numpy as jnp
    from fpx.operators import h1_relative
    x = jnp.arange(64) / 64
    target, error = jnp.sin(2 * jnp.pi * x), 0.01 * jnp.sin(6 * jnp.pi * x)
    exact = 0.01 * jnp.sqrt((1 + 36 * jnp.pi**2) / (1 + 4 * jnp.pi**2))
    assert jnp.isclose(h1_relative(target + error, target, dx=1 / 64), exact)
    ```
    """
    pred, target = _check_same_shape(pred, target, "h1_relative")
    if pred.ndim not in (1, 2):
        raise ValueError(f"h1_relative takes one 1-D field of shape (s,) or (s, channels), got shape {pred.shape}.")
    if derivative not in ("spectral", "fd"):
        raise ValueError(f"h1_relative: `derivative` must be 'spectral' or 'fd', got {derivative!r}.")
    error = pred - target

    def h1_squared(f):
        return jnp.sum(f**2) + jnp.sum(_periodic_derivative(f, dx, derivative) ** 2)

    return jnp.sqrt(h1_squared(error) / h1_squared(target))
