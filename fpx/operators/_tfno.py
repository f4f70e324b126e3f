"""Tensorised Fourier neural operator (Kossaifi et al., 2023): an FNO whose spectral weights are factorised.

Every Fourier layer of an FNO holds a complex weight `W` of shape `(width, width, 2m_1,
..., 2m_{d-1}, m_d)` (see `fpx.operators.SpectralConv`); TFNO learns it in factorised form
instead, as neuraloperator's `TFNO` / `SpectralConv(factorization=...)` do:

- **Tucker**: `W = G ×_0 U_0 ×_1 U_1 ··· ×_{d+1} U_{d+1}`, a core `G` of shape
  `(r_0, ..., r_{d+1})` and one factor `U_k` of shape `(s_k, r_k)` per mode of `W`,
  i.e. `W[a_0, ..., a_{d+1}] = Σ_b G[b_0, ..., b_{d+1}] Π_k U_k[a_k, b_k]`;
- **CP**: `W = Σ_{r<R} u_0[:, r] ⊗ u_1[:, r] ⊗ ··· ⊗ u_{d+1}[:, r]`, one factor of shape
  `(s_k, R)` per mode;
- **dense**: `W` itself, which is exactly `fpx.operators.FNO`.

The core and the factors are complex; as everywhere in `fpx.operators` each is stored as a
`{"real": ..., "imag": ...}` pair of real arrays (see `check_real_params`). `apply`
reconstructs the dense `W` of every layer from its factors and runs the FNO on it, so a
factorisation that equals a dense weight reproduces the FNO to rounding; the saving is in
parameters (and in what the optimiser sees), not in the FLOPs of the forward pass.

Differences from neuraloperator: the network around the weights is `fpx.operators.FNO`
(Li et al.'s layers), not neuraloperator's FNO (lifting MLP, skip and channel-MLP options);
there is no `implementation="factorized"` (contracting the input with the factors directly)
and no `fixed_rank_modes`, tensor-train or joint factorisation; CP has no separate
per-component weights vector (tensorly's `weights`, redundant with the factors' scale).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from ._fno import FNO, _check_dim, _check_input, _check_resolution, _kept_shape, _normalize_modes, _spectral_spec
from ._operator import (
    Operator,
    TruncatedNormal,
    check_param_shapes,
    check_positive_int,
    check_real_params,
    linear_spec,
    make_init,
    mlp_spec,
)

_FACTORIZATIONS = ("tucker", "cp", "dense")
_LETTERS = "abcdefgh"


# --------------------------------------------------------------------------- ranks


def _tucker_fraction(shape: tuple[int, ...], fraction: float) -> float:
    """The `c` with `c^N P + c Σ s_k² = fraction · P` (tensorly's `validate_tucker_rank`), by bisection."""
    n_modes, n_dense, squares = len(shape), math.prod(shape), sum(s * s for s in shape)

    def excess(c: float) -> float:
        return n_dense * c**n_modes + squares * c - fraction * n_dense

    low, high = 0.0, max(fraction, 1.0)  # excess(0) < 0 < excess(max(fraction, 1))
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if excess(mid) < 0 else (low, mid)
    return 0.5 * (low + high)


def resolve_rank(shape: Sequence[int], factorization: str, rank) -> tuple[int, ...] | int | None:
    """The rank a `TFNO` uses for a complex weight of shape `shape`, neuraloperator's (tensorly's) convention.

    - a **float** is a fraction of the dense parameter count: CP takes
      `R = round(prod(shape) · rank / sum(shape))` (at least 1), so the factors hold about
      `rank · prod(shape)` entries; Tucker takes `r_k = max(round(c · s_k), 1)` where `c`
      solves `c^N prod(shape) + c Σ s_k² = rank · prod(shape)` (core plus factors), each
      `r_k` capped at `s_k` (tensorly does not cap; a larger Tucker rank only adds
      parameters). So `rank=0.1` keeps about a tenth of the parameters.
    - an **int** is the rank itself: `R` for CP; for Tucker the same rank on every mode
      (capped at the mode's size).
    - a **tuple** of ints (Tucker only) gives `r_k` per mode, each `1 <= r_k <= s_k`:
      `rank=shape` is the full-rank Tucker format, which can represent every dense weight.

    `rank=1` (int) is rank one, `rank=1.0` (float) about as many parameters as the dense
    weight. For `"dense"` the rank is ignored and `None` returned.

    ```python
    from fpx.operators._tfno import resolve_rank
    assert resolve_rank((8, 8, 6), "cp", 0.5) == 9             # round(384 * 0.5 / 22)
    assert resolve_rank((8, 8, 6), "cp", 3) == 3
    assert resolve_rank((8, 8, 6), "tucker", (8, 2, 6)) == (8, 2, 6)
    assert resolve_rank((8, 8, 6), "tucker", 1.0) == (7, 7, 5)   # c = 0.859: 384 c^3 + 164 c = 384
    ```
    """
    shape = tuple(int(s) for s in shape)
    if factorization not in _FACTORIZATIONS:
        raise ValueError(f"TFNO: `factorization` must be one of {_FACTORIZATIONS}, got {factorization!r}.")
    if factorization == "dense":
        return None
    if isinstance(rank, bool):
        raise ValueError(f"TFNO: `rank` must be a positive float (a fraction of the dense parameters) or int, got {rank!r}.")
    if isinstance(rank, numbers.Integral):
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"TFNO: an integer `rank` is the rank itself and must be >= 1, got {rank}.")
        return rank if factorization == "cp" else tuple(min(rank, s) for s in shape)
    if isinstance(rank, numbers.Real):
        rank = float(rank)
        if not (rank > 0 and math.isfinite(rank)):
            raise ValueError(
                f"TFNO: a float `rank` is the fraction of the dense weight's parameters to keep and must be > 0, got {rank}."
            )
        if factorization == "cp":
            return max(int(np.round(math.prod(shape) * rank / sum(shape))), 1)
        c = _tucker_fraction(shape, rank)
        return tuple(min(max(int(np.round(s * c)), 1), s) for s in shape)
    if isinstance(rank, (tuple, list)):
        if factorization != "tucker":
            raise ValueError(f"TFNO: a per-mode `rank` tuple is for factorization='tucker'; CP takes one int or float, got {rank!r}.")
        rank = tuple(rank)
        if (
            len(rank) != len(shape)
            or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in rank)
            or any(not 1 <= r <= s for r, s in zip(rank, shape))
        ):
            raise ValueError(
                f"TFNO: a Tucker `rank` tuple needs one int per mode of the weight shape {shape} "
                f"(in, out, modes...), each 1 <= r_k <= s_k, got {rank!r}."
            )
        return tuple(int(r) for r in rank)
    raise ValueError(f"TFNO: `rank` must be a float, an int or (Tucker) a tuple of ints, got {type(rank).__name__} {rank!r}.")


# --------------------------------------------------------------------------- specs and reconstruction


def _pair(shape: tuple[int, ...], std: float) -> dict[str, TruncatedNormal]:
    return {"real": TruncatedNormal(shape, std), "imag": TruncatedNormal(shape, std)}


def _factorized_spec(in_channels: int, out_channels: int, modes, factorization: str, rank) -> dict:
    """Init spec of one factorised spectral weight.

    The reconstructed weight's real and imaginary parts have (about) the standard deviation
    `1/(in · out)` of neuraloperator's default `init_std`; the core and factor entries are
    truncated normals scaled accordingly (tltorch's convention: the same std for the core
    and every factor).
    """
    shape = (in_channels, out_channels) + _kept_shape(modes)
    if factorization == "dense":
        return _spectral_spec(in_channels, out_channels, modes)
    resolved = resolve_rank(shape, factorization, rank)
    target = 1.0 / (in_channels * out_channels)  # std of Re W and of Im W
    # A product of n independent complex entries with iid N(0, σ²) real and imaginary parts
    # has E|·|² = (2σ²)^n; W sums `terms` of them, and E|W|² = 2 target².
    if factorization == "tucker":
        terms, n = math.prod(resolved), len(shape) + 1
    else:
        terms, n = resolved, len(shape)
    sigma = math.sqrt(0.5 * (2.0 * target**2 / terms) ** (1.0 / n))
    if factorization == "tucker":
        return {"core": _pair(resolved, sigma), "factors": [_pair((s, r), sigma) for s, r in zip(shape, resolved)]}
    return {"factors": [_pair((s, resolved), sigma) for s in shape]}


def _complex(p: dict[str, Array]) -> Array:
    return lax.complex(p["real"], p["imag"])


def _reconstruct(p: dict, factorization: str) -> dict[str, Array]:
    """The dense `{"real", "imag"}` spectral weight of the factorised one `p`."""
    if factorization == "dense":
        return p
    factors = [_complex(f) for f in p["factors"]]
    order = len(factors)
    modes = _LETTERS[:order]
    if factorization == "tucker":
        ranks = _LETTERS.upper()[:order]
        w = jnp.einsum(f"{ranks}," + ",".join(f"{m}{r}" for m, r in zip(modes, ranks)) + f"->{modes}", _complex(p["core"]), *factors)
    else:
        w = jnp.einsum(",".join(f"{m}z" for m in modes) + f"->{modes}", *factors)
    return {"real": jnp.real(w), "imag": jnp.imag(w)}


def _config(dim, modes, width, layers, in_channels, out_channels, append_grid, projection_width, factorization, rank):
    """Validate the TFNO arguments; return `(modes, specs)` with `specs()` the init-spec pytree."""
    _check_dim(dim)
    modes = _normalize_modes(modes, dim)
    for name, value in [
        ("width", width),
        ("layers", layers),
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("projection_width", projection_width),
    ]:
        check_positive_int(name, value)
    if factorization not in _FACTORIZATIONS:
        raise ValueError(f"TFNO: `factorization` must be one of {_FACTORIZATIONS}, got {factorization!r}.")
    _factorized_spec(width, width, modes, factorization, rank)  # validates `rank` now, not at init
    lift_in = in_channels + (dim if append_grid else 0)

    def specs() -> dict:
        return {
            "lift": linear_spec(lift_in, width),
            "layers": [
                {"spectral": _factorized_spec(width, width, modes, factorization, rank), "pointwise": linear_spec(width, width)}
                for _ in range(layers)
            ],
            "projection": mlp_spec((width, projection_width, out_channels)),
        }

    return modes, specs


def TFNO(
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    width: int = 32,
    layers: int = 4,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    factorization: str = "tucker",
    rank: float | int | Sequence[int] = 0.5,
    padding: int = 0,
    activation: Callable[[Array], Array] = jax.nn.gelu,
    append_grid: bool = True,
    grid: str = "auto",
    projection_width: int = 128,
    dtype=None,
) -> Operator:
    """Tensorised FNO (Kossaifi et al., 2023): `fpx.operators.FNO` with factorised spectral weights.

    Same arguments, layers and `apply(params, x)` as `FNO` (one sample `x` of shape
    `(s_1, ..., s_dim, in_channels)`, any resolution; vmap for batches), plus:

    - `factorization`: `"tucker"` (a complex core and one complex factor per mode of the
      weight `(width, width, 2m_1, ..., m_dim)`), `"cp"` (rank-`R` sum of outer products)
      or `"dense"` (exactly `FNO`, same parameters and init).
    - `rank`: neuraloperator's convention (see `resolve_rank`): a **float** is the fraction
      of the dense weight's parameters to keep (`rank=0.1`: about 10 %), an **int** the
      rank itself (CP's `R`; Tucker: the same rank on every mode), a **tuple** (Tucker) the
      rank per mode; `rank=(width, width, 2m_1, ..., m_dim)` is full-rank Tucker.

    `params["layers"][i]["spectral"]` is `{"core": pair, "factors": [pair, ...]}` (Tucker)
    or `{"factors": [pair, ...]}` (CP), each `pair = {"real": ..., "imag": ...}` real
    arrays, the factor of mode `k` of shape `(s_k, r_k)` (Tucker) or `(s_k, R)` (CP); the
    lifting, pointwise and projection layers are the FNO's. Factorised weights start with
    truncated-normal entries scaled so that the reconstructed weight's real and imaginary
    parts have standard deviation `1/width²` (neuraloperator's default); `"dense"` uses
    the FNO's init. `apply` reconstructs each layer's dense weight from its factors and runs
    the FNO on it. `tfno_parameter_counts` tabulates the parameter count per rank.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr
    import fpx
    tfno = fpx.operators.TFNO(dim=1, modes=8, width=16, layers=2, factorization="tucker", rank=0.25)
    params = tfno.init(jr.PRNGKey(0))
    u = jnp.sin(2 * jnp.pi * jnp.arange(64) / 64)[:, None]
    batch = jax.jit(jax.vmap(tfno.apply, in_axes=(None, 0)))(params, jnp.stack([u, 2 * u]))  # vmap for a batch
    assert batch.shape == (2, 64, 1)
    (row,) = fpx.operators.tfno_parameter_counts([0.25], dim=1, modes=8, width=16, layers=2)
    assert row["total"] == sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert row["spectral"] < 0.3 * row["dense_spectral"]
    ```
    """
    try:
        modes, specs = _config(dim, modes, width, layers, in_channels, out_channels, append_grid, projection_width, factorization, rank)
        fno = FNO(
            dim,
            modes,
            width,
            layers,
            in_channels,
            out_channels,
            padding=padding,
            activation=activation,
            append_grid=append_grid,
            grid=grid,
            projection_width=projection_width,
            dtype=dtype,
        )
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith("TFNO") else f"TFNO: {message}") from None
    init = make_init(specs, dtype)
    what = (
        f"TFNO(dim={dim}, modes={modes}, width={width}, layers={layers}, in_channels={in_channels}, "
        f"out_channels={out_channels}, factorization={factorization!r}, rank={rank!r})"
    )

    def apply(params: dict, x: Float[Array, "*n ci"]) -> Float[Array, "*n co"]:
        check_real_params(params)
        check_param_shapes(params, specs(), what)
        x = jnp.asarray(x)
        _check_input(x, dim, in_channels, "TFNO")
        _check_resolution(x.shape[:-1], modes, padding, "TFNO")
        dense = {
            **params,
            "layers": [{**layer, "spectral": _reconstruct(layer["spectral"], factorization)} for layer in params["layers"]],
        }
        return fno.apply(dense, x)

    return Operator(init, apply)


def tfno_parameter_counts(
    ranks: Sequence,
    *,
    factorization: str = "tucker",
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    width: int = 32,
    layers: int = 4,
    in_channels: int = 1,
    out_channels: int = 1,
    append_grid: bool = True,
    projection_width: int = 128,
) -> list[dict]:
    """Real parameter counts of `TFNO(..., factorization=factorization, rank=r)` for each `r` in `ranks`.

    One row per rank, a dict with `rank` (as given), `resolved` (the rank used per layer,
    see `resolve_rank`), `spectral` (real numbers in all factorised spectral weights),
    `dense_spectral` (the same for `FNO`), `compression = spectral / dense_spectral` and
    `total` (every parameter of the operator; equals the size of what `init` returns).
    The other arguments are `TFNO`'s. For a "parameters vs error at several ranks" table.

    ```python
    import fpx
    rows = fpx.operators.tfno_parameter_counts([0.05, 0.2, 1.0], factorization="cp", modes=8, width=16)
    assert [r["resolved"] for r in rows] == [3, 10, 51] and rows[0]["dense_spectral"] == 4 * 2 * 16 * 16 * 8
    assert all(abs(r["compression"] - f) < 0.01 for r, f in zip(rows, [0.05, 0.2, 1.0]))
    ```
    """
    rows = []
    for r in ranks:
        try:
            mode_tuple, specs = _config(dim, modes, width, layers, in_channels, out_channels, append_grid, projection_width, factorization, r)
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith("TFNO") else f"TFNO: {e}") from None
        tree = specs()
        size = lambda t: sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(t, is_leaf=lambda x: hasattr(x, "shape")))
        spectral = sum(size(layer["spectral"]) for layer in tree["layers"])
        dense = layers * 2 * width * width * math.prod(_kept_shape(mode_tuple))
        weight_shape = (width, width) + _kept_shape(mode_tuple)
        rows.append(
            {
                "rank": r,
                "resolved": resolve_rank(weight_shape, factorization, r),
                "spectral": spectral,
                "dense_spectral": dense,
                "compression": spectral / dense,
                "total": size(tree),
            }
        )
    return rows
