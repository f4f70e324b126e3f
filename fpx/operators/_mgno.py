"""Multigrid neural operator (MgNO; He, Liu & Xu, ICLR 2024) and its V-cycle as a fixed-point block.

Every MgNO layer is one multi-channel multigrid V-cycle for a learned linear system
`A u = f`: 3x3 convolutions for the operator `A^l` and the smoothers `S^{l,i}` on each
level `l`, a stride-2 3x3 convolution restricting the residual to the next coarser
level, a 3x3 transposed convolution prolonging the coarse correction back. The same
V-cycle, as a map `u -> V(u, f)`, is a block for `fpx.operators.iterate` / `deq`:
`MgVCycle`. Its fixed point solves `A^0 u = f` exactly whenever the cycle converges,
which is what multigrid is.

Conventions are those of `fpx.operators.FNO`: one channel-last sample `x` of shape
`(*spatial, channels)`, pure `init`/`apply`, `jax.vmap` for batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._fno import _check_input
from ._operator import Operator, Uniform, check_param_shapes, check_real_params, linear, linear_spec, make_init

_DIMS = (1, 2)
_BOUNDARIES = ("zero", "periodic")
_CONV_LAYOUT = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


# --------------------------------------------------------------------------- argument checks


def _check_int(what: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: `{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_common(what: str, dim, levels, boundary) -> None:
    if isinstance(dim, bool) or dim not in _DIMS:
        raise ValueError(f"{what}: `dim` (the number of spatial dimensions) must be 1 or 2, got {dim!r}.")
    _check_int(what, "levels", levels, 1)
    if boundary not in _BOUNDARIES:
        raise ValueError(
            f"{what}: `boundary` must be 'zero' (zero padding, the paper's Dirichlet default) or 'periodic' "
            f"(circular padding), got {boundary!r}."
        )


def _normalize_smoothing(what: str, smoothing, levels: int) -> tuple[tuple[int, int], ...]:
    """`(pre, post)` for every level, from one pair or from `levels` pairs."""

    def is_count(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    def is_pair(p) -> bool:
        return isinstance(p, (tuple, list)) and len(p) == 2 and all(is_count(n) for n in p)

    if is_pair(smoothing):
        pairs = (tuple(smoothing),) * levels
    elif isinstance(smoothing, (tuple, list)) and len(smoothing) == levels and all(is_pair(p) for p in smoothing):
        pairs = tuple(tuple(p) for p in smoothing)
    else:
        raise ValueError(
            f"{what}: `smoothing` must be a pair (pre, post) of non-negative smoothing counts used on every "
            f"level, or a sequence of `levels`={levels} such pairs (finest level first), got {smoothing!r}."
        )
    if sum(pre + post for pre, post in pairs) == 0:
        raise ValueError(f"{what}: `smoothing`={smoothing!r} has no smoothing step at all; the V-cycle would return 0.")
    return pairs


def _check_resolution(spatial: tuple[int, ...], levels: int, boundary: str, what: str) -> None:
    """Trace-time check that every level of the hierarchy `s, ceil(s/2), ...` has at least 2 points."""
    factor = 2 ** (levels - 1)
    bad = []
    for axis, n in enumerate(spatial):
        if boundary == "periodic":
            if n % factor or n // factor < 2:
                bad.append(axis)
        elif -(-n // factor) < 2:
            bad.append(axis)
    if not bad:
        return
    if boundary == "periodic":
        rule = (
            f"with boundary='periodic' every axis must be a multiple of 2**(levels-1) = {factor} with at least "
            f"{2 * factor} points (each level halves it exactly and keeps >= 2 points): allowed sizes are "
            f"{2 * factor}, {3 * factor}, {4 * factor}, ..."
        )
    else:
        rule = (
            f"with boundary='zero' level l has ceil(s / 2**l) points and the coarsest (l = levels-1 = {levels - 1}) "
            f"needs at least 2, so every axis needs at least 2**(levels-1) + 1 = {factor + 1} points "
            f"(any size from there on, odd ones included)"
        )
    raise ValueError(
        f"{what}: the input resolution {spatial} does not fit `levels`={levels} "
        f"(axis {', '.join(map(str, bad))}): {rule}. Use fewer `levels` or another grid."
    )


# --------------------------------------------------------------------------- convolutions


def _pad(x: Array, boundary: str) -> Array:
    """One ghost point on each side of every spatial axis: zeros, or the periodic wrap."""
    widths = [(1, 1)] * (x.ndim - 1) + [(0, 0)]
    return jnp.pad(x, widths, mode="wrap") if boundary == "periodic" else jnp.pad(x, widths)


def _conv(x: Float[Array, "*n ci"], w: Float[Array, "*k ci co"], boundary: str, stride: int = 1) -> Float[Array, "*m co"]:
    """3x3 (3 in 1-D) cross-correlation `y[i] = sum_k x[stride*i + k - 1] @ w[k]`, one channel-last sample.

    Ghost values beyond the grid are zero (`boundary='zero'`) or periodic; `stride=2`
    gives `ceil(s/2)` points, the value at coarse point `j` centred on fine point `2j`.
    """
    d = x.ndim - 1
    # Zero ghost points as the convolution's own padding: a separate pad costs a copy of
    # every feature map and, on XLA:CPU, doubles a 2-D training step.
    zero = boundary == "zero"
    y = lax.conv_general_dilated(
        (x if zero else _pad(x, boundary))[None],
        w.astype(x.dtype),
        window_strides=(stride,) * d,
        padding=[(1, 1)] * d if zero else "VALID",
        dimension_numbers=_CONV_LAYOUT[d],
    )
    return y[0]


def _prolong(u: Float[Array, "*m c"], w: Float[Array, "*k c c"], fine: tuple[int, ...], boundary: str) -> Float[Array, "*n c"]:
    """Transposed stride-2 convolution onto `fine` points: `y[i] = sum_j u[j] w[i - 2j + 1]`.

    The structural adjoint of `_conv(., stride=2)`: coarse point `j` spreads onto fine
    points `2j - 1, 2j, 2j + 1` (periodically wrapped or cut at the edges). The coarse
    field is spread onto the even fine points (zeros in between) and cross-correlated
    with the spatially flipped kernel.
    """
    d = u.ndim - 1
    spread = lax.pad(
        u,
        jnp.zeros((), u.dtype),
        [(0, n - (2 * m - 1), 1) for n, m in zip(fine, u.shape[:-1])] + [(0, 0, 0)],
    )
    return _conv(spread, jnp.flip(w, axis=tuple(range(d))), boundary)


# --------------------------------------------------------------------------- the V-cycle


def _vcycle_spec(dim: int, u_channels: int, f_channels: int, pairs) -> dict:
    """Init specs: PyTorch's `Conv{1,2}d` default, U(+-1/sqrt(fan_in)) with fan_in = in_channels * 3**dim."""
    k = (3,) * dim

    def kernel(cin: int, cout: int) -> Uniform:
        bound = 1.0 / math.sqrt(cin * 3**dim)
        return Uniform(k + (cin, cout), -bound, bound)

    levels = len(pairs)
    return {
        "A": [kernel(u_channels, f_channels) for _ in range(levels)],
        "pre": [[kernel(f_channels, u_channels) for _ in range(pre)] for pre, _ in pairs],
        "post": [[kernel(f_channels, u_channels) for _ in range(post)] for _, post in pairs],
        "restrict": [kernel(f_channels, f_channels) for _ in range(levels - 1)],
        "prolong": [kernel(u_channels, u_channels) for _ in range(levels - 1)],
    }


def _smooth(u, f, A, S, boundary):
    """`u + S (f - A u)`; `u=None` stands for zeros (then just `S f`)."""
    if u is None:
        return _conv(f, S, boundary)
    return u + _conv(f - _conv(u, A, boundary), S, boundary)


def _vcycle(p: dict, u, f: Float[Array, "*n cf"], u_channels: int, boundary: str) -> Float[Array, "*n cu"]:
    """One V-cycle for `A^0 u = f` from `u` (`None`: zeros), all levels, channel-last."""
    levels = len(p["A"])
    saved = []
    for level in range(levels):
        for S in p["pre"][level]:
            u = _smooth(u, f, p["A"][level], S, boundary)
        saved.append((u, f))
        if level < levels - 1:
            residual = f if u is None else f - _conv(u, p["A"][level], boundary)
            f = _conv(residual, p["restrict"][level], boundary, stride=2)
            u = None  # the coarse correction starts from zero
    for level in range(levels - 1, -1, -1):
        if level < levels - 1:
            fine_u, f = saved[level]
            correction = _prolong(u, p["prolong"][level], f.shape[:-1], boundary) if u is not None else None
            u = correction if fine_u is None else (fine_u if correction is None else fine_u + correction)
        for S in p["post"][level]:
            u = _smooth(u, f, p["A"][level], S, boundary)
    if u is None:  # only possible without any smoothing step, refused by the constructors
        u = jnp.zeros(f.shape[:-1] + (u_channels,), f.dtype)
    return u


def MgVCycle(
    width: int = 16,
    levels: int = 4,
    smoothing: tuple[int, int] | Sequence[tuple[int, int]] = (1, 1),
    *,
    f_channels: int | None = None,
    dim: int = 2,
    boundary: str = "zero",
    dtype=None,
) -> Operator:
    """One multigrid V-cycle `u -> V(u, f)` with learned convolutions, a block for `iterate` and `deq`.

    `apply(params, u, f)`: `u` of shape `(*spatial, width)` (the iterate), `f` of shape
    `(*spatial, f_channels)` (the right-hand side; `f_channels` defaults to `width`, so
    that `deq`'s default initial state `zeros_like(f)` fits). On level `l = 0 .. levels-1`
    (level 0 the input grid, level `l` with `ceil(s / 2**l)` points per axis):

    1. `pre` smoothing steps `u <- u + S^{l,i} (f^l - A^l u)`;
    2. restrict the residual, `f^{l+1} = R^l (f^l - A^l u)`, and start the coarse
       correction at `u^{l+1} = 0`;
    3. after the coarser levels, add the prolonged correction `u <- u + P^l u^{l+1}`;
    4. `post` smoothing steps as in 1.

    `A^l` (one per level, `width -> f_channels`), `S^{l,i}` (one per smoothing step,
    `f_channels -> width`) and `R^l` (`f_channels -> f_channels`) are 3x3 convolutions
    (3 in 1-D) without bias, `R^l` with stride 2; `P^l` (`width -> width`) is the
    transposed stride-2 3x3 convolution (the adjoint structure of `R^l`, 3 taps per axis
    at every resolution). `boundary='zero'` pads with zeros (a homogeneous Dirichlet
    condition one point outside the grid), `'periodic'` wraps. `smoothing` is one
    `(pre, post)` pair for every level or `levels` pairs, finest first. `params =
    {"A": [...], "pre": [[...]], "post": [[...]], "restrict": [...], "prolong": [...]}`,
    kernels of shape `(3,)*dim + (in, out)`, PyTorch's default convolution init.

    Every step is linear and bias-free and all smoothing steps and residuals of a level
    share its `A^l`, so `V(u, f) = u + B (f - A^0 u)` for a linear `B`: the solution of
    `A^0 u = f` is a fixed point, and when the cycle converges (spectral radius of
    `I - B A^0` below 1) it is the only one. `fpx.operators.deq(MgVCycle(...))` solves
    the layer's system to convergence (for parameters that make the cycle converge);
    `iterate(MgVCycle(...), k, injection=True)` runs `k` V-cycles from `u = 0`, and an
    MgNO layer is `k = 1`.

    Resolutions: `boundary='zero'` takes any size with at least `2**(levels-1) + 1`
    points per axis (odd sizes such as 85 coarsen as `85, 43, 22, 11, ...`, as the
    reference code's stride-2 convolutions do); `'periodic'` needs multiples of
    `2**(levels-1)` with at least `2**levels` points. Others are a `ValueError`.

    ```python
    import jax, jax.random as jr, fpx
    block = fpx.operators.MgVCycle(width=4, levels=3, dim=2)
    params = block.init(jr.PRNGKey(0))
    f = jr.normal(jr.PRNGKey(1), (17, 16, 4))
    three_cycles = jax.jit(fpx.operators.iterate(block, 3, injection=True).apply)  # u_3 from u_0 = 0
    assert three_cycles(params, f).shape == (17, 16, 4)
    ```
    """
    what = "MgVCycle"
    _check_int(what, "width", width, 1)
    _check_common(what, dim, levels, boundary)
    f_channels = width if f_channels is None else f_channels
    _check_int(what, "f_channels", f_channels, 1)
    pairs = _normalize_smoothing(what, smoothing, levels)
    init = make_init(lambda: _vcycle_spec(dim, width, f_channels, pairs), dtype)
    full = f"MgVCycle(width={width}, levels={levels}, smoothing={pairs}, f_channels={f_channels}, dim={dim})"

    def apply(params: dict, u: Float[Array, "*n w"], f: Float[Array, "*n cf"]) -> Float[Array, "*n w"]:
        check_real_params(params)
        check_param_shapes(params, _vcycle_spec(dim, width, f_channels, pairs), full)
        u, f = jnp.asarray(u), jnp.asarray(f)
        _check_input(u, dim, width, what, "u")
        _check_input(f, dim, f_channels, what, "f")
        if u.shape[:-1] != f.shape[:-1]:
            raise ValueError(f"{what}: `u` {u.shape} and `f` {f.shape} must share the spatial shape.")
        _check_resolution(u.shape[:-1], levels, boundary, f"{what}(levels={levels}, boundary={boundary!r})")
        return _vcycle(params, u, f, width, boundary).astype(u.dtype)

    return Operator(init, apply)


# --------------------------------------------------------------------------- MgNO


def MgNO(
    in_channels: int = 1,
    out_channels: int = 1,
    width: int = 32,
    levels: int = 4,
    num_layers: int = 4,
    smoothing: tuple[int, int] | Sequence[tuple[int, int]] = (1, 1),
    *,
    dim: int = 2,
    boundary: str = "zero",
    activation: Callable[[Array], Array] = jax.nn.gelu,
    dtype=None,
) -> Operator:
    """Multigrid neural operator (He, Liu & Xu, ICLR 2024), 1- or 2-D, for one sample.

    `apply(params, x)`: `x` of shape `(s, in_channels)` (dim=1) or `(s1, s2, in_channels)`
    (dim=2); returns the same spatial shape with `out_channels`. With `v_0 = x`:

        v_{k+1} = activation(V_k(0, v_k) + W_k v_k + b_k),   k = 0 .. num_layers-1
        y = W_out v_L + b_out

    `V_k(0, f)` is one multigrid V-cycle from zero for the layer's own learned system
    `A u = f`, exactly `MgVCycle` (see there: per-level 3x3 operator `A^l`, a 3x3
    smoother per smoothing step, stride-2 residual restriction, transposed-convolution
    prolongation, `smoothing` = `(pre, post)` counts), with `f_channels` the layer's input
    channels (`in_channels` for the first layer, `width` after) and `width` output
    channels. `W_k v + b_k` is a pointwise linear map (the reference's 1x1 convolution
    beside each V-cycle, `MgNO_DC`); `activation` follows every layer, the last included.
    As in the paper there is no lifting or projection network: the first V-cycle reads
    the `in_channels` input directly, and the only projection is the pointwise linear
    `width -> out_channels` map `W_out, b_out` (the reference's has no bias; this one
    has). `params = {"layers": [{"vcycle": ..., "pointwise": ...}, ...], "projection": ...}`.

    Choices, where the reference code (xlliu2017/MgNO, `MgConv_DC`) differs or varies:
    the level-`l` operator `A^l` is shared by that level's smoothing steps and its
    residual (the paper's `A^l`; the code draws a new one per step); the residual, not
    `f`, is restricted (the paper's V-cycle; the code's default restricts `f`); the
    prolongation has 3 taps per axis at every resolution, so one set of parameters runs
    at any resolution (the code uses 4 taps for even and 3 for odd sizes).
    `boundary='zero'` (zero padding, the paper's Dirichlet default) or `'periodic'`.
    `activation` defaults to `jax.nn.gelu` (tanh approximation; the reference's exact GELU is
    `functools.partial(jax.nn.gelu, approximate=False)`).

    Resolutions: the hierarchy is `s, ceil(s/2), ceil(s/4), ...` per axis, as the
    reference's stride-2 padded convolutions make it (85 -> 43 -> 22 -> 11 for the
    Darcy 85x85 grid). `boundary='zero'` takes any size with at least `2**(levels-1) + 1`
    points per axis; `boundary='periodic'` needs multiples of `2**(levels-1)` with at
    least `2**levels` points. Other inputs are a `ValueError` naming MgNO and `levels`.
    The parameters run at any allowed resolution, but the convolutions are stencils in
    grid units: unlike a band-limited FNO, the operator is not resolution-invariant.
    With `boundary='periodic'` it commutes with shifts by multiples of `2**(levels-1)`.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr, fpx
    mgno = fpx.operators.MgNO(in_channels=1, out_channels=1, width=8, levels=3, num_layers=2)
    params = mgno.init(jr.PRNGKey(0))
    a = jr.uniform(jr.PRNGKey(1), (2, 33, 33, 1))  # a batch of two 33x33 inputs: 33 -> 17 -> 9 points
    batch = jax.jit(jax.vmap(mgno.apply, in_axes=(None, 0)))(params, a)
    assert batch.shape == (2, 33, 33, 1)
    ```
    """
    what = "MgNO"
    for name, value in [("in_channels", in_channels), ("out_channels", out_channels), ("width", width)]:
        _check_int(what, name, value, 1)
    _check_int(what, "num_layers", num_layers, 1)
    _check_common(what, dim, levels, boundary)
    pairs = _normalize_smoothing(what, smoothing, levels)

    def specs() -> dict:
        layers = []
        for k in range(num_layers):
            cin = in_channels if k == 0 else width
            layers.append({"vcycle": _vcycle_spec(dim, width, cin, pairs), "pointwise": linear_spec(cin, width)})
        return {"layers": layers, "projection": linear_spec(width, out_channels)}

    init = make_init(specs, dtype)
    full = (
        f"MgNO(in_channels={in_channels}, out_channels={out_channels}, width={width}, levels={levels}, "
        f"num_layers={num_layers}, smoothing={pairs}, dim={dim})"
    )

    def apply(params: dict, x: Float[Array, "*n ci"]) -> Float[Array, "*n co"]:
        check_real_params(params)
        check_param_shapes(params, specs(), full)
        x = jnp.asarray(x)
        _check_input(x, dim, in_channels, what)
        _check_resolution(x.shape[:-1], levels, boundary, f"{what}(levels={levels}, boundary={boundary!r})")
        v = x
        for layer in params["layers"]:
            v = activation(_vcycle(layer["vcycle"], None, v, width, boundary) + linear(layer["pointwise"], v))
        return linear(params["projection"], v)

    return Operator(init, apply)
