"""Fourier neural operator (Li et al., 2020): spectral convolution, Fourier block, FNO."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._operator import (
    Operator,
    Uniform,
    check_param_shapes,
    check_positive_int,
    check_real_params,
    linear,
    linear_spec,
    make_init,
    mlp,
    mlp_spec,
)

_MAX_DIM = 3  # XLA's FFT transforms at most three axes


def _check_dim(dim) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_DIM:
        raise ValueError(
            f"`dim` is the number of spatial dimensions and must be 1, 2 or 3, got {dim!r} "
            f"(XLA's FFT transforms at most three axes)."
        )


def _normalize_modes(modes, dim: int) -> tuple[int, ...]:
    if isinstance(modes, int) and not isinstance(modes, bool):
        modes = (modes,) * dim
    modes = tuple(modes)
    if len(modes) != dim or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in modes):
        raise ValueError(f"`modes` must be a positive integer or a tuple of {dim} positive integers, got {modes!r}.")
    return modes


def _kept_shape(modes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the retained block of `rfftn` coefficients: `(2 m_1, ..., 2 m_{d-1}, m_d)`.

    Along every axis but the last, the lowest `m` non-negative and the `m` most negative
    frequencies are kept (the two corners of the reference's 2-D layer, stacked); along
    the last (real-FFT) axis, frequencies `0 .. m_d - 1`.
    """
    return tuple(2 * m for m in modes[:-1]) + (modes[-1],)


def _check_resolution(shape: tuple[int, ...], modes: tuple[int, ...], padding: int, what: str) -> None:
    """Trace-time check that every retained frequency exists at this resolution."""
    problems = []
    for axis, (n, m) in enumerate(zip(shape, modes)):
        n = n + padding
        if axis == len(modes) - 1:
            if m > n // 2 + 1:
                problems.append(
                    f"axis {axis}: modes={m} but {n} points have only {n // 2 + 1} real-FFT frequencies "
                    f"(need modes <= s//2 + 1)"
                )
        elif 2 * m > n:
            problems.append(
                f"axis {axis}: modes={m} keeps {2 * m} frequencies (m non-negative and m negative) but "
                f"{n} points have only {n} (need 2*modes <= s)"
            )
    if problems:
        pad = f" (including padding={padding})" if padding else ""
        raise ValueError(
            f"{what}: the input resolution {shape}{pad} is too coarse for modes={modes}:\n  "
            + "\n  ".join(problems)
            + "\nEvaluate on a finer grid or build the operator with fewer modes."
        )


def _spectral_spec(in_channels: int, out_channels: int, modes) -> dict[str, Uniform]:
    """The reference init: `scale * U[0, 1)` for the real and the imaginary parts, scale = 1/(in*out)."""
    scale = 1.0 / (in_channels * out_channels)
    shape = (in_channels, out_channels) + _kept_shape(modes)
    return {"real": Uniform(shape, 0.0, scale), "imag": Uniform(shape, 0.0, scale)}


def _spectral_conv(p: dict[str, Array], z: Float[Array, "ci ..."], modes: tuple[int, ...]) -> Float[Array, "co ..."]:
    """Channel-first spectral convolution of one sample: `irfftn(W · rfftn(z)[low modes])`.

    With the unnormalised forward FFT and the `1/N` inverse, the map from a band-limited
    function's samples to the output's samples does not depend on the resolution.
    """
    d = len(modes)
    n = z.shape[1:]
    axes = tuple(range(1, d + 1))
    z_ft = jnp.fft.rfftn(z, axes=axes)
    low = z_ft
    for ax, m, size in zip(axes[:-1], modes[:-1], n[:-1]):
        low = jnp.concatenate(
            [lax.slice_in_dim(low, 0, m, axis=ax), lax.slice_in_dim(low, size - m, size, axis=ax)], axis=ax
        )
    low = lax.slice_in_dim(low, 0, modes[-1], axis=d)
    weight = lax.complex(p["real"], p["imag"])
    out = jnp.einsum("i...,io...->o...", low, weight)
    out = jnp.pad(out, [(0, 0)] * d + [(0, n[-1] // 2 + 1 - modes[-1])])
    for ax, m, size in zip(axes[:-1], modes[:-1], n[:-1]):
        zeros_shape = out.shape[:ax] + (size - 2 * m,) + out.shape[ax + 1 :]
        out = jnp.concatenate(
            [
                lax.slice_in_dim(out, 0, m, axis=ax),
                jnp.zeros(zeros_shape, out.dtype),
                lax.slice_in_dim(out, m, 2 * m, axis=ax),
            ],
            axis=ax,
        )
    return jnp.fft.irfftn(out, s=n, axes=axes)


def _pointwise(p: dict[str, Array], z: Float[Array, "ci ..."]) -> Float[Array, "co ..."]:
    """Channel-first 1x1 convolution `W^T z + b`."""
    y = jnp.einsum("io,i...->o...", p["weight"], z)
    return y + jnp.reshape(p["bias"], p["bias"].shape + (1,) * (z.ndim - 1))


def _fourier_layer(p, z, modes):
    return _spectral_conv(p["spectral"], z, modes) + _pointwise(p["pointwise"], z)


def fourier_layer_spec(width: int, modes) -> dict:
    """Init spec of one Fourier layer of width `width` (spectral convolution + pointwise linear), as in `FNOBlock`.

    ```python
    import jax, jax.numpy as jnp, fpx
    spec = fpx.operators.fourier_layer_spec(8, (4,))
    params = fpx.operators.make_init(lambda: spec, jnp.float32)(jax.random.PRNGKey(0))
    assert set(params) == {"spectral", "pointwise"}
    ```
    """
    return {"spectral": _spectral_spec(width, width, modes), "pointwise": linear_spec(width, width)}


def _check_input(x, dim: int, channels: int, what: str, argname: str = "x") -> None:
    if x.ndim != dim + 1:
        layout = {1: "(s, channels)", 2: "(s1, s2, channels)", 3: "(s1, s2, s3, channels)"}[dim]
        raise ValueError(
            f"{what} (dim={dim}) takes one sample of shape {layout}, got `{argname}` of shape {x.shape}. "
            f"For a batch use `jax.vmap(op.apply, in_axes=(None, 0))`; a single-channel field of "
            f"shape {x.shape} needs a trailing channel axis: `{argname}[..., None]`."
        )
    if x.shape[-1] != channels:
        raise ValueError(
            f"{what} was built for {channels} input channel(s) but `{argname}` of shape {x.shape} has "
            f"{x.shape[-1]} (the last axis). Build it with in_channels={x.shape[-1]} or fix the input."
        )


def _grid(shape: tuple[int, ...], dtype, closed: bool) -> Float[Array, "*n d"]:
    """Coordinates in [0, 1]: `linspace(0, 1, s)` if `closed`, else the periodic `i / s`."""
    coords = [jnp.linspace(0.0, 1.0, n, dtype=dtype) if closed else jnp.arange(n, dtype=dtype) / n for n in shape]
    return jnp.stack(jnp.meshgrid(*coords, indexing="ij"), axis=-1)


def SpectralConv(
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    dtype=None,
) -> Operator:
    """The FNO's spectral convolution `K z = irfftn(R · rfftn(z))` on the lowest `modes` frequencies.

    `apply(params, x)`: `x` of shape `(s_1, ..., s_dim, in_channels)` at any resolution
    with `modes <= s_dim//2 + 1` along the last spatial axis and `2*modes <= s_k` along
    the others, else a `ValueError` at trace time; returns `(s_1, ..., s_dim,
    out_channels)`. `params = {"real": ..., "imag": ...}`, each of shape
    `(in, out, 2m_1, ..., 2m_{dim-1}, m_dim)` (negative and non-negative frequencies
    along every axis but the real-FFT one), initialised as in the reference code with
    `U[0, 1) / (in * out)`. The weights are real/imag pairs of real arrays, never complex
    leaves: see `check_real_params`.

    For a band-limited input (no energy at or above `modes`, and `modes < s/2`) the output
    samples are those of one fixed function, whatever `s` is: this part of the FNO is
    exactly resolution-invariant.

    ```python
    import jax.numpy as jnp, jax.random as jr
    from fpx.operators import SpectralConv
    conv = SpectralConv(dim=1, modes=4, in_channels=1, out_channels=2)
    params = conv.init(jr.PRNGKey(0))
    f = lambda s: jnp.sin(2 * jnp.pi * jnp.arange(s) / s)[:, None]
    coarse, fine = conv.apply(params, f(16)), conv.apply(params, f(64))
    assert coarse.shape == (16, 2) and jnp.allclose(coarse, fine[::4], atol=1e-6)
    ```
    """
    _check_dim(dim)
    modes = _normalize_modes(modes, dim)
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)

    init = make_init(lambda: _spectral_spec(in_channels, out_channels, modes), dtype)
    what = f"SpectralConv(dim={dim}, modes={modes}, in_channels={in_channels}, out_channels={out_channels})"

    def apply(params: dict[str, Array], x: Float[Array, "*n ci"]) -> Float[Array, "*n co"]:
        check_real_params(params)
        check_param_shapes(params, _spectral_spec(in_channels, out_channels, modes), what)
        x = jnp.asarray(x)
        _check_input(x, dim, in_channels, "SpectralConv")
        _check_resolution(x.shape[:-1], modes, 0, "SpectralConv")
        return jnp.moveaxis(_spectral_conv(params, jnp.moveaxis(x, -1, 0), modes), 0, -1)

    return Operator(init, apply)


def FNOBlock(
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    width: int = 32,
    activation: Callable[[Array], Array] = jax.nn.gelu,
    *,
    init_scale: float = 1.0,
    dtype=None,
) -> Operator:
    """A weight-tied Fourier layer with input injection, the block of an FNO-DEQ.

    `apply(params, z, x) = activation(K z + W z + b + x)`, with `K` the spectral
    convolution and `W, b` a pointwise linear map; `z` (the state) and `x` (the injected,
    already lifted input) both of shape `(s_1, ..., s_dim, width)`, at any resolution.
    This is the `(params, z, x)` block signature `fpx.operators.deq` solves and
    `fpx.operators.iterate(..., injection=True)` unrolls. `init_scale` multiplies every
    initial weight: a small value (e.g. 0.3) starts the block as a contraction in `z`.

    ```python
    import jax.numpy as jnp, jax.random as jr
    from fpx.operators import FNOBlock, deq
    block = FNOBlock(dim=1, modes=4, width=8, init_scale=0.3)
    model = deq(block)
    x = 0.1 * jr.normal(jr.PRNGKey(1), (32, 8))
    params = model.init(jr.PRNGKey(0))
    z = model.apply(params, x)
    assert z.shape == (32, 8) and jnp.allclose(z, block.apply(params, z, x), atol=1e-4)
    ```
    """
    _check_dim(dim)
    modes = _normalize_modes(modes, dim)
    check_positive_int("width", width)

    init = make_init(
        lambda: fourier_layer_spec(width, modes), dtype, lambda p: jax.tree_util.tree_map(lambda a: init_scale * a, p)
    )

    what = f"FNOBlock(dim={dim}, modes={modes}, width={width})"

    def apply(params, z: Float[Array, "*n w"], x: Float[Array, "*n w"]) -> Float[Array, "*n w"]:
        check_real_params(params)
        check_param_shapes(params, fourier_layer_spec(width, modes), what)
        z, x = jnp.asarray(z), jnp.asarray(x)
        _check_input(z, dim, width, "FNOBlock", "z")
        if x.shape != z.shape:
            raise ValueError(
                f"FNOBlock: the injected input `x` must have the state's shape {z.shape}, got {x.shape}. "
                f"Lift the input to `width` channels first (e.g. with `chain(encoder, deq(block))`)."
            )
        _check_resolution(z.shape[:-1], modes, 0, "FNOBlock")
        h = _fourier_layer(params, jnp.moveaxis(z, -1, 0), modes)
        return activation(jnp.moveaxis(h, 0, -1) + x).astype(z.dtype)

    return Operator(init, apply)


def FNO(
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    width: int = 32,
    layers: int = 4,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    padding: int = 0,
    activation: Callable[[Array], Array] = jax.nn.gelu,
    append_grid: bool = True,
    grid: str = "auto",
    projection_width: int = 128,
    dtype=None,
) -> Operator:
    """Fourier neural operator (Li et al., 2020), 1-, 2- or 3-D, for one sample at any resolution.

    `apply(params, x)`: `x` of shape `(s, in_channels)` (dim=1), `(s1, s2, in_channels)`
    (dim=2) or `(s1, s2, s3, in_channels)` (dim=3); returns the same spatial shape with
    `out_channels`. The layers are those of the reference code:

    1. append the grid coordinates (`append_grid`; `dim` extra channels) and lift
       pointwise to `width` channels;
    2. if `padding > 0`, append `padding` zeros along every spatial axis (for
       non-periodic inputs; cropped again after the Fourier layers);
    3. `layers` Fourier layers `v <- σ(K v + W v + b)`, `K` the spectral convolution on
       the lowest `modes` frequencies (see `SpectralConv`), no activation after the last;
    4. project pointwise: `Linear(width, projection_width)`, σ, `Linear(..., out_channels)`.

    `grid`: the appended coordinate is `i / s` on a periodic domain (`"periodic"`, exact
    under subsampling `4s -> s`) or `linspace(0, 1, s)` with both ends (`"closed"`, the
    reference's choice, right for data that include the boundary); `"auto"` picks
    `"periodic"` when `padding == 0` and `"closed"` otherwise. `modes` larger than the
    input resolution allows is a `ValueError` at trace time. Pointwise layers use
    PyTorch's default init, spectral weights `U[0, 1)/(width**2)` as real/imag pairs
    (`check_real_params` refuses complex leaves). σ defaults to `jax.nn.gelu` (its tanh
    approximation; the reference's exact GELU is `functools.partial(jax.nn.gelu,
    approximate=False)`).

    ```python
    import jax, jax.numpy as jnp, jax.random as jr
    from fpx.operators import FNO
    fno = FNO(dim=1, modes=8, width=16, layers=2)
    params = fno.init(jr.PRNGKey(0))
    u = jnp.sin(2 * jnp.pi * jnp.arange(64) / 64)[:, None]
    assert fno.apply(params, u).shape == (64, 1)
    batch = jax.vmap(fno.apply, in_axes=(None, 0))(params, jnp.stack([u, 2 * u]))
    assert batch.shape == (2, 64, 1)
    assert fno.apply(params, u[::2]).shape == (32, 1)  # any resolution with modes <= s//2 + 1
    ```
    """
    _check_dim(dim)
    modes = _normalize_modes(modes, dim)
    for name, value in [("width", width), ("layers", layers), ("in_channels", in_channels)]:
        check_positive_int(name, value)
    check_positive_int("out_channels", out_channels)
    check_positive_int("projection_width", projection_width)
    check_positive_int("padding", padding, minimum=0)
    if grid not in ("auto", "periodic", "closed"):
        raise ValueError(f"`grid` must be 'auto', 'periodic' or 'closed', got {grid!r}.")
    closed_grid = grid == "closed" or (grid == "auto" and padding > 0)
    lift_in = in_channels + (dim if append_grid else 0)

    def specs() -> dict:
        return {
            "lift": linear_spec(lift_in, width),
            "layers": [fourier_layer_spec(width, modes) for _ in range(layers)],
            "projection": mlp_spec((width, projection_width, out_channels)),
        }

    init = make_init(specs, dtype)
    what = (
        f"FNO(dim={dim}, modes={modes}, width={width}, layers={layers}, in_channels={in_channels}, "
        f"out_channels={out_channels}, append_grid={append_grid}, projection_width={projection_width})"
    )

    def apply(params: dict, x: Float[Array, "*n ci"]) -> Float[Array, "*n co"]:
        check_real_params(params)
        check_param_shapes(params, specs(), what)
        x = jnp.asarray(x)
        _check_input(x, dim, in_channels, "FNO")
        spatial = x.shape[:-1]
        _check_resolution(spatial, modes, padding, "FNO")
        if append_grid:
            x = jnp.concatenate([x, _grid(spatial, x.dtype, closed_grid).astype(x.dtype)], axis=-1)
        v = jnp.moveaxis(linear(params["lift"], x), -1, 0)  # channel-first (width, *n)
        if padding:
            v = jnp.pad(v, [(0, 0)] + [(0, padding)] * dim)
        for i, layer in enumerate(params["layers"]):
            v = _fourier_layer(layer, v, modes)
            if i < len(params["layers"]) - 1:
                v = activation(v)
        if padding:
            v = v[(slice(None),) + tuple(slice(0, n) for n in spatial)]
        return mlp(params["projection"], jnp.moveaxis(v, 0, -1), activation)

    return Operator(init, apply)
