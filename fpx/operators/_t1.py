"""Transform Once (T1; Poli et al., NeurIPS 2022): one DCT in, every layer on the low modes, one inverse DCT out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jax.scipy.fft import dctn, idctn
from jaxtyping import Array, Float

from ._fno import _check_input
from ._operator import Operator, TruncatedNormal, Uniform, check_param_shapes, check_real_params, linear, linear_spec, make_init

_DIMS = (1, 2)


def _check_int(what: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: `{name}` must be an integer >= {minimum}, got {value!r}.")


def _normalize_modes(what: str, modes, dim: int) -> tuple[int, ...]:
    if isinstance(modes, int) and not isinstance(modes, bool):
        modes = (modes,) * dim
    if not isinstance(modes, (tuple, list)) or len(modes) != dim or any(
        isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in modes
    ):
        raise ValueError(f"{what}: `modes` must be a positive integer or a tuple of {dim} positive integers, got {modes!r}.")
    return tuple(modes)


def _check_resolution(spatial: tuple[int, ...], modes: tuple[int, ...], what: str) -> None:
    """Trace-time check that `s` points along each axis have the `modes` DCT coefficients kept."""
    bad = [f"axis {axis}: modes={m} > {n} points" for axis, (n, m) in enumerate(zip(spatial, modes)) if m > n]
    if bad:
        raise ValueError(
            f"{what}: the input resolution {spatial} is too coarse for `modes`={modes}: a DCT of s points has s "
            f"coefficients, so every axis needs modes <= s ({'; '.join(bad)}). Evaluate on a finer grid or build "
            f"the operator with fewer modes."
        )


def _cell_centres(shape: tuple[int, ...], dtype) -> Float[Array, "*n d"]:
    """The points `(i + 1/2) / s` where the DCT-II basis functions `cos(pi k x)` are sampled."""
    coords = [(jnp.arange(n, dtype=dtype) + 0.5) / n for n in shape]
    return jnp.stack(jnp.meshgrid(*coords, indexing="ij"), axis=-1)


def _layer_spec(width: int, modes: tuple[int, ...]) -> dict:
    """One T1 layer: per-mode channel mixing `(width, width, *modes)` and one `(m, m, width)` mode mixing per axis.

    Initialised as the reference's variance-preserving scheme for O(1) coefficients:
    N(0, 1/width) for the channel mixing, N(0, 1/m) for the mixing along an axis of m modes.
    """
    return {
        "channel": TruncatedNormal((width, width) + modes, 1.0 / math.sqrt(width)),
        "modes": [TruncatedNormal((m, m, width), 1.0 / math.sqrt(m)) for m in modes],
    }


def _t1_layer(p: dict, z: Float[Array, "w *m"], activation) -> Float[Array, "w *m"]:
    """`z + M(activation(C z))`, channel-first: `C` mixes channels mode by mode, `M` mixes modes per channel, axis by axis."""
    h = activation(jnp.einsum("i...,io...->o...", z, p["channel"]))
    for axis, mix in enumerate(p["modes"]):
        h = jnp.moveaxis(jnp.einsum("c...k,kKc->c...K", jnp.moveaxis(h, axis + 1, -1), mix), -1, axis + 1)
    return z + h


def T1(
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    width: int = 32,
    layers: int = 4,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    activation: Callable[[Array], Array] = jnp.sin,
    append_grid: bool = True,
    projection_width: int = 128,
    dtype=None,
) -> Operator:
    """Transform Once (Poli et al., 2022): a frequency-domain operator with one forward and one inverse DCT.

    `apply(params, x)`: `x` of shape `(s, in_channels)` (dim=1) or `(s1, s2, in_channels)`
    (dim=2), any resolution with `modes <= s` along every axis (else a `ValueError` naming
    T1 and `modes`); returns the same spatial shape with `out_channels`. The steps (those
    of the reference code, DiffEqML/kairos `T1_1d`/`T1_2d`, with `transform="dct"`):

    1. append the grid coordinates (`append_grid`; `dim` extra channels), here the cell
       centres `(i + 1/2) / s` where the DCT-II basis is sampled (the reference appends
       `linspace(0, 1, s)`), and lift pointwise (`Linear(in, width)` with bias);
    2. **one** orthonormal type-II DCT of the lifted field over the spatial axes,
       `jax.scipy.fft.dctn(v, norm="ortho") / sqrt(s_1 ... s_d)`, keeping the lowest
       `modes` coefficients along every axis; the `1/sqrt(N)` makes the coefficients the
       amplitudes of the field's cosine series, the same at every resolution;
    3. `layers` layers on the kept coefficients only, `z <- z + M(σ(C z))`: `C` of shape
       `(width, width, *modes)` mixes channels mode by mode (real weights), σ is
       `activation` (the reference's `sin`), `M` mixes the modes along each axis with one
       `(m_k, m_k, width)` matrix per axis and channel (the reference's 2-D layer uses
       `modes1` for both axes; here each axis has its own); then the pointwise head of
       the reference, `W_2 σ(W_1 z)` (`width -> projection_width -> out_channels`, no
       biases), still on the coefficients, as the reference applies it before the
       inverse transform (with σ nonlinear this is not the same as projecting after it);
    4. **one** inverse DCT (the coefficients beyond `modes` are zero), scaled back by
       `sqrt(s_1 ... s_d)`.

    So the output is always band-limited: a cosine series with `modes` terms per axis,
    sampled at the cell centres. For an input that is itself such a series (with fewer
    than `modes` terms) and `append_grid=False`, every step is exact at any resolution:
    the output samples are those of one fixed function, whatever `s` is. The grid
    coordinate is not a finite cosine series, so with `append_grid=True` (the reference's
    choice) this holds only up to its aliasing.

    Initialisation: the lift and the head use PyTorch's `nn.Linear` default (the
    reference starts the head at `1e-8` scale, which makes the initial output nearly zero);
    `C` is N(0, 1/width) and each `M` N(0, 1/m), the reference's variance-preserving
    scales for O(1) coefficients (its "vp" factor `sqrt(N/m)` compensates an
    unnormalised spectrum, which step 2 normalises instead). All weights are real.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr, fpx
    t1 = fpx.operators.T1(dim=1, modes=8, width=16, layers=2, append_grid=False)
    params = t1.init(jr.PRNGKey(0))
    u = lambda s: jnp.cos(jnp.pi * (jnp.arange(s) + 0.5) / s)[:, None]   # cos(pi x) at cell centres
    apply = jax.jit(t1.apply)
    coarse, fine = apply(params, u(16)), apply(params, u(48))
    assert coarse.shape == (16, 1) and jnp.allclose(coarse, fine[1::3], atol=1e-5)  # same function
    batch = jax.jit(jax.vmap(t1.apply, in_axes=(None, 0)))(params, jnp.stack([u(16), 2 * u(16)]))
    assert batch.shape == (2, 16, 1)
    ```
    """
    what = "T1"
    if isinstance(dim, bool) or dim not in _DIMS:
        raise ValueError(f"{what}: `dim` (the number of spatial dimensions) must be 1 or 2, got {dim!r}.")
    modes = _normalize_modes(what, modes, dim)
    for name, value in [("width", width), ("layers", layers), ("in_channels", in_channels)]:
        _check_int(what, name, value, 1)
    _check_int(what, "out_channels", out_channels, 1)
    _check_int(what, "projection_width", projection_width, 1)
    lift_in = in_channels + (dim if append_grid else 0)

    def head_spec(fan_in: int, fan_out: int) -> dict:
        bound = 1.0 / math.sqrt(fan_in)
        return {"weight": Uniform((fan_in, fan_out), -bound, bound)}

    def specs() -> dict:
        return {
            "lift": linear_spec(lift_in, width),
            "layers": [_layer_spec(width, modes) for _ in range(layers)],
            "projection": [head_spec(width, projection_width), head_spec(projection_width, out_channels)],
        }

    init = make_init(specs, dtype)
    full = (
        f"T1(dim={dim}, modes={modes}, width={width}, layers={layers}, in_channels={in_channels}, "
        f"out_channels={out_channels}, append_grid={append_grid}, projection_width={projection_width})"
    )

    def apply(params: dict, x: Float[Array, "*n ci"]) -> Float[Array, "*n co"]:
        check_real_params(params)
        check_param_shapes(params, specs(), full)
        x = jnp.asarray(x)
        _check_input(x, dim, in_channels, what)
        spatial = x.shape[:-1]
        _check_resolution(spatial, modes, what)
        if append_grid:
            x = jnp.concatenate([x, _cell_centres(spatial, x.dtype)], axis=-1)
        v = linear(params["lift"], x)  # (*n, width)
        axes = tuple(range(dim))
        scale = math.sqrt(math.prod(spatial))
        z = dctn(v, type=2, axes=axes, norm="ortho")[tuple(slice(0, m) for m in modes)] / scale
        z = jnp.moveaxis(z, -1, 0)  # channel-first (width, *modes)
        for layer in params["layers"]:
            z = _t1_layer(layer, z, activation)
        first, second = params["projection"]
        y = activation(jnp.moveaxis(z, 0, -1) @ first["weight"]) @ second["weight"]  # (*modes, out)
        y = jnp.pad(y, [(0, n - m) for n, m in zip(spatial, modes)] + [(0, 0)])
        return idctn(y * scale, type=2, axes=axes, norm="ortho")

    return Operator(init, apply)
