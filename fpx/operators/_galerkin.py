"""Galerkin and Fourier transformers (Cao, "Choose a Transformer: Fourier or Galerkin", NeurIPS 2021).

Softmax-free attention over the `n` grid points of one sample. With per-head
`Q, K, V ∈ R^{n×e}`, the two forms of the paper are

- **Galerkin**: `Z = Q (K̃ᵀ Ṽ) / n`, layer norm on `K` and `V` (`K̃`, `Ṽ`). `K̃ᵀ Ṽ / n`
  is an `e×e` matrix, so the cost is linear in `n`: `O(n e²)` time, `O(n e + e²)` memory;
- **Fourier**: `Z = (Q̃ K̃ᵀ) V / n`, layer norm on `Q` and `K`: an `n×n` kernel matrix,
  `O(n² e)` time and `O(n²)` memory.

Without the layer norms both are the same bilinear form `(1/n) Σ_j (q_i · k_j) v_j`,
associated differently. `1/n Σ_j` is a quadrature rule for `∫ κ(x, y) v(y) dy` with
`κ(x, y) = q(x) · k(y)` (Fourier) or the projection `Σ_l q_l(x) ⟨k_l, v⟩` (Galerkin), which is
why the operator is resolution-invariant up to quadrature error.

`GalerkinTransformer` is the reference's encoder–decoder (`FourierTransformer` of
scaomath/galerkin-transformer with `decoder_type="ifft"`/`"ifft2"`): a pointwise lift, encoder
layers (multi-head attention with the grid coordinates concatenated to every head's query,
key and value, then a feed-forward sublayer, both with residuals), and the FNO spectral
convolution as decoder (`fpx.operators.SpectralConv`'s layer, reused), 1-D and 2-D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._fno import _check_input, _check_resolution, _fourier_layer, _grid, _normalize_modes, _spectral_spec
from ._operator import (
    Operator,
    Uniform,
    Zeros,
    check_param_shapes,
    check_positive_int,
    check_real_params,
    linear,
    linear_spec,
    make_init,
    mlp,
    mlp_spec,
)

_ATTENTIONS = ("galerkin", "fourier")


def _attention(q: Float[Array, "h n e"], k: Float[Array, "h n e"], v: Float[Array, "h n e"], kind: str) -> Float[Array, "h n e"]:
    """Softmax-free attention per head: `Q (Kᵀ V) / n` (Galerkin) or `(Q Kᵀ) V / n` (Fourier)."""
    n = q.shape[-2]
    if kind == "galerkin":
        return jnp.einsum("hnd,hde->hne", q, jnp.einsum("hnd,hne->hde", k, v) / n)
    return jnp.einsum("hnm,hme->hne", jnp.einsum("hnd,hmd->hnm", q, k) / n, v)


def _layer_norm(p: dict[str, Array], x: Array, eps: float) -> Array:
    """Layer norm over the last axis (biased variance, as `torch.nn.LayerNorm`).

    `p["scale"]`, `p["shift"]` of shape `x.shape[-1:]`, or `(heads, e)` for `x` of shape `(heads, n, e)`.
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    shape = p["scale"].shape[:-1] + (1,) * (x.ndim - p["scale"].ndim) + p["scale"].shape[-1:]
    return centred * lax.rsqrt(var + eps) * p["scale"].reshape(shape) + p["shift"].reshape(shape)


def _norm_names(kind: str) -> tuple[str, str]:
    return ("key_norm", "value_norm") if kind == "galerkin" else ("query_norm", "key_norm")


def _norm_spec(shape: tuple[int, ...]) -> dict[str, Zeros]:
    return {"scale": Zeros(shape), "shift": Zeros(shape)}  # the scale is shifted to 1 by the init's transform


def _encoder_spec(width, heads, dim, feedforward_width, kind, attention_norm, layer_norm, gain) -> dict:
    bound = gain * math.sqrt(6.0 / (2 * width))  # xavier_uniform_(gain) of a (width, width) weight

    def qkv():
        return {"weight": Uniform((width, width), -bound, bound), "bias": Zeros((width,))}

    attention = {"query": qkv(), "key": qkv(), "value": qkv(), "output": linear_spec(width + heads * dim, width)}
    if attention_norm:
        for name in _norm_names(kind):
            attention[name] = _norm_spec((heads, width // heads))
    spec = {"attention": attention, "feedforward": mlp_spec((width, feedforward_width, width))}
    if layer_norm:
        spec["norm_1"], spec["norm_2"] = _norm_spec((width,)), _norm_spec((width,))
    return spec


def _encoder_layer(p, h, pos, *, heads, kind, attention_norm, layer_norm, eps, activation):
    """One encoder layer on the flattened grid: `h` of shape `(n, width)`, `pos` of shape `(n, dim)`."""
    n, width = h.shape
    e = width // heads

    def split(y):  # (n, width) -> (heads, n, e)
        return jnp.transpose(y.reshape(n, heads, e), (1, 0, 2))

    att = p["attention"]
    q, k, v = (split(linear(att[name], h)) for name in ("query", "key", "value"))
    if attention_norm:
        if kind == "galerkin":
            k, v = _layer_norm(att["key_norm"], k, eps), _layer_norm(att["value_norm"], v, eps)
        else:
            q, k = _layer_norm(att["query_norm"], q, eps), _layer_norm(att["key_norm"], k, eps)
    coords = jnp.broadcast_to(pos[None], (heads,) + pos.shape)
    q, k, v = (jnp.concatenate([coords, y], axis=-1) for y in (q, k, v))
    z = _attention(q, k, v, kind)  # (heads, n, dim + e)
    z = jnp.transpose(z, (1, 0, 2)).reshape(n, heads * z.shape[-1])
    h = h + linear(att["output"], z)
    if layer_norm:
        h = _layer_norm(p["norm_1"], h, eps)
    h = h + mlp(p["feedforward"], h, activation)
    if layer_norm:
        h = _layer_norm(p["norm_2"], h, eps)
    return h


def GalerkinTransformer(
    dim: int = 1,
    modes: int | Sequence[int] = 16,
    width: int = 32,
    heads: int = 1,
    layers: int = 2,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    attention: str = "galerkin",
    feedforward_width: int | None = None,
    decoder_width: int | None = None,
    decoder_layers: int = 2,
    projection_width: int | None = None,
    attention_norm: bool | None = None,
    layer_norm: bool = False,
    eps: float = 1e-5,
    activation: Callable[[Array], Array] = jax.nn.relu,
    decoder_activation: Callable[[Array], Array] = jax.nn.silu,
    append_grid: bool = True,
    grid: str = "periodic",
    xavier_gain: float = 1e-2,
    diagonal_weight: float = 1e-2,
    dtype=None,
) -> Operator:
    """Galerkin / Fourier transformer (Cao, 2021): softmax-free attention encoder, spectral-convolution decoder.

    `apply(params, x)`: one sample `x` of shape `(s, in_channels)` (dim=1) or `(s1, s2,
    in_channels)` (dim=2), any resolution with `modes <= s_dim//2 + 1` along the last axis
    and `2*modes <= s_1` along the first; returns the same spatial shape with
    `out_channels`. Vmap for batches. The layers are those of the reference code
    (scaomath/galerkin-transformer, `FourierTransformer`, decoder `"ifft"`/`"ifft2"`):

    1. append the grid coordinates to `x` (`append_grid`: `i/s`, or `linspace(0, 1, s)`
       for `grid="closed"`) and lift pointwise to `width` channels; the `n = s_1 ··· s_dim`
       grid points are then a sequence;
    2. `layers` encoder layers, each `h <- h + Attn(h)`, `h <- h + FFN(h)` (with
       `layer_norm=True`, a layer norm after each residual, the reference's
       `layer_norm`), FFN `Linear(width, feedforward_width)`, `activation`, `Linear(...,
       width)`. `Attn` splits `h W_Q + b_Q`, `h W_K + b_K`, `h W_V + b_V` into `heads`
       heads of `e = width/heads` channels, layer-normalises per head `K, V` (Galerkin) or
       `Q, K` (Fourier) when `attention_norm` (default `not layer_norm`, as in the
       reference), concatenates the `dim` grid coordinates in front of every head's
       `Q, K, V`, takes `attention="galerkin"`: `Q (Kᵀ V) / n` (linear in `n`, never an
       `n×n` matrix) or `"fourier"`: `(Q Kᵀ) V / n`, and maps the concatenated heads
       `(n, heads·(dim + e))` back to `width` with a linear layer;
    3. `decoder_layers` Fourier layers `v <- σ(K v + W v + b)` (the FNO's spectral
       convolution on the lowest `modes` frequencies plus a pointwise linear map; σ =
       `decoder_activation` after every one, the last included, as in the reference),
       `width -> decoder_width -> ... -> decoder_width`;
    4. project pointwise: `Linear(decoder_width, projection_width)`, σ, `Linear(...,
       out_channels)`.

    `feedforward_width` defaults to `2*width`, `decoder_width` to `width`,
    `projection_width` to `decoder_width`. Init as in the reference: `W_Q, W_K, W_V` are
    `xavier_uniform(gain=xavier_gain) + diagonal_weight·I` with zero biases, layer norms
    start at scale 1 and shift 0, the other dense layers use PyTorch's default, spectral
    weights the FNO's `U[0, 1)/(in·out)` real/imag pairs. Differences from the reference
    code: no dropout (apply is deterministic); its Fourier attention also divides the
    scores by `sqrt(dim + e)`, which the paper's formula (used here) does not (the query's
    layer-norm scale, or `W_Q`, absorbs the factor); its 1-D model lifts `x` without the coordinates
    (`append_grid=False` for that; the coordinates still enter every attention head).

    `params = {"lift", "encoder": [{"attention": {"query", "key", "value", "output",
    "key_norm", "value_norm" | "query_norm", "key_norm"}, "feedforward": [...]}, ...],
    "decoder": [{"spectral", "pointwise"}, ...], "projection": [...]}`.

    ```python
    import jax, jax.numpy as jnp, jax.random as jr
    import fpx
    op = fpx.operators.GalerkinTransformer(dim=1, modes=8, width=16, heads=2, layers=2, attention="galerkin")
    # attention="fourier" for (Q Kᵀ) V / n; dim=2 takes x of shape (s1, s2, in_channels).
    params = op.init(jr.PRNGKey(0))
    u = lambda s: jnp.sin(2 * jnp.pi * jnp.arange(s) / s)[:, None]
    coarse = jax.jit(op.apply)(params, u(64))  # one sample of shape (s, in_channels)
    batch = jax.jit(jax.vmap(op.apply, in_axes=(None, 0)))(params, jnp.stack([u(256), 2 * u(256)]))
    assert coarse.shape == (64, 1) and batch.shape == (2, 256, 1)
    # Any resolution: the attention is a quadrature (1/n) Σ_j, one function up to its error.
    assert jnp.abs(batch[0, ::4] - coarse).max() < 1e-2 * jnp.abs(coarse).max()
    ```
    """
    what = "GalerkinTransformer"
    try:
        if isinstance(dim, bool) or dim not in (1, 2):
            raise ValueError(f"`dim` is the number of spatial dimensions and must be 1 or 2, got {dim!r}.")
        modes = _normalize_modes(modes, dim)
        feedforward_width = 2 * width if feedforward_width is None and isinstance(width, int) else feedforward_width
        decoder_width = width if decoder_width is None else decoder_width
        projection_width = decoder_width if projection_width is None else projection_width
        for name, value in [
            ("width", width),
            ("heads", heads),
            ("layers", layers),
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("feedforward_width", feedforward_width),
            ("decoder_width", decoder_width),
            ("decoder_layers", decoder_layers),
            ("projection_width", projection_width),
        ]:
            check_positive_int(name, value)
        if width % heads:
            raise ValueError(f"`heads`={heads} must divide `width`={width} (each head takes width/heads channels).")
        if attention not in _ATTENTIONS:
            raise ValueError(f"`attention` must be 'galerkin' or 'fourier', got {attention!r}.")
        if grid not in ("periodic", "closed"):
            raise ValueError(f"`grid` must be 'periodic' or 'closed', got {grid!r}.")
        if not eps > 0:
            raise ValueError(f"`eps` (the layer norms' epsilon) must be > 0, got {eps!r}.")
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    attention_norm = (not layer_norm) if attention_norm is None else bool(attention_norm)
    layer_norm = bool(layer_norm)
    lift_in = in_channels + (dim if append_grid else 0)

    def specs() -> dict:
        encoder = [
            _encoder_spec(width, heads, dim, feedforward_width, attention, attention_norm, layer_norm, xavier_gain)
            for _ in range(layers)
        ]
        sizes = (width,) + (decoder_width,) * decoder_layers
        decoder = [
            {"spectral": _spectral_spec(a, b, modes), "pointwise": linear_spec(a, b)} for a, b in zip(sizes[:-1], sizes[1:])
        ]
        return {
            "lift": linear_spec(lift_in, width),
            "encoder": encoder,
            "decoder": decoder,
            "projection": mlp_spec((decoder_width, projection_width, out_channels)),
        }

    def finish(params: dict) -> dict:
        """Add `diagonal_weight · I` to `W_Q, W_K, W_V`; layer-norm scales start at 1."""
        eye = jnp.eye(width, dtype=params["lift"]["weight"].dtype)
        encoder = []
        for layer in params["encoder"]:
            att = dict(layer["attention"])
            for name in ("query", "key", "value"):
                att[name] = {**att[name], "weight": att[name]["weight"] + diagonal_weight * eye}
            for name in _norm_names(attention) if attention_norm else ():
                att[name] = {**att[name], "scale": att[name]["scale"] + 1}
            layer = {**layer, "attention": att}
            for name in ("norm_1", "norm_2") if layer_norm else ():
                layer[name] = {**layer[name], "scale": layer[name]["scale"] + 1}
            encoder.append(layer)
        return {**params, "encoder": encoder}

    init = make_init(specs, dtype, finish)
    closed = grid == "closed"
    described = (
        f"{what}(dim={dim}, modes={modes}, width={width}, heads={heads}, layers={layers}, in_channels={in_channels}, "
        f"out_channels={out_channels}, attention={attention!r}, attention_norm={attention_norm}, layer_norm={layer_norm})"
    )

    def apply(params: dict, x: Float[Array, "*n ci"]) -> Float[Array, "*n co"]:
        check_real_params(params)
        check_param_shapes(params, specs(), described)
        x = jnp.asarray(x)
        _check_input(x, dim, in_channels, what)
        spatial = x.shape[:-1]
        _check_resolution(spatial, modes, 0, what)
        n = math.prod(spatial)
        coords = _grid(spatial, x.dtype, closed).astype(x.dtype)
        if append_grid:
            x = jnp.concatenate([x, coords], axis=-1)
        h = linear(params["lift"], x.reshape(n, lift_in))
        pos = coords.reshape(n, dim)
        for layer in params["encoder"]:
            h = _encoder_layer(
                layer, h, pos, heads=heads, kind=attention, attention_norm=attention_norm, layer_norm=layer_norm, eps=eps,
                activation=activation,
            )
        v = jnp.moveaxis(h.reshape(spatial + (width,)), -1, 0)  # channel-first for the spectral layers
        for layer in params["decoder"]:
            v = decoder_activation(_fourier_layer(layer, v, modes))
        return mlp(params["projection"], jnp.moveaxis(v, 0, -1), decoder_activation)

    return Operator(init, apply)
