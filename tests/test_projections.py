"""Property tests for the projections in fpx.feasibility (in the set, idempotent,
nonexpansive, optimal)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fpx.feasibility import project_spectral_norm_ball

shapes = st.tuples(st.integers(1, 5), st.integers(1, 5))
entries = st.floats(-10, 10, allow_nan=False, width=64)
radii = st.floats(0.0, 5.0)


def matrices(shape):
    return arrays(np.float64, shape, elements=entries)


@st.composite
def matrix_pair(draw):
    shape = draw(shapes)
    return draw(matrices(shape)), draw(matrices(shape))


def spectral(m):
    return float(np.linalg.norm(np.asarray(m), 2)) if m.size else 0.0


@settings(max_examples=60, deadline=None)
@given(shapes.flatmap(matrices), radii)
def test_in_set_and_idempotent(m, radius):
    p = project_spectral_norm_ball(jnp.asarray(m), radius)
    assert spectral(p) <= radius + 1e-9
    np.testing.assert_allclose(project_spectral_norm_ball(p, radius), p, atol=1e-9)
    if spectral(m) <= radius:
        np.testing.assert_allclose(p, m, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(matrix_pair(), radii)
def test_nonexpansive(pair, radius):
    a, b = pair
    pa = project_spectral_norm_ball(jnp.asarray(a), radius)
    pb = project_spectral_norm_ball(jnp.asarray(b), radius)
    assert float(jnp.linalg.norm(pa - pb)) <= float(np.linalg.norm(a - b)) + 1e-9


@settings(max_examples=60, deadline=None)
@given(matrix_pair(), radii)
def test_variational_inequality_and_optimality(pair, radius):
    # For any Y in the set, <X - P X, Y - P X> <= 0 and |X - P X| <= |X - Y|.
    x, y = pair
    y_in = np.asarray(project_spectral_norm_ball(jnp.asarray(y), radius))
    px = np.asarray(project_spectral_norm_ball(jnp.asarray(x), radius))
    assert np.sum((x - px) * (y_in - px)) <= 1e-7 * (1 + np.abs(x).max() ** 2)
    assert np.linalg.norm(x - px) <= np.linalg.norm(x - y_in) + 1e-9


def test_optimal_against_brute_force_search():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2)) * 3
    px = np.asarray(project_spectral_norm_ball(jnp.asarray(x), 1.0))
    # Random points of the set, concentrated near the boundary where the optimum lies.
    candidates = rng.normal(size=(2000, 3, 2)) * 3
    candidates = np.stack([np.asarray(project_spectral_norm_ball(jnp.asarray(c), 1.0)) for c in candidates])
    best = np.min(np.linalg.norm((candidates - x).reshape(len(candidates), -1), axis=1))
    assert np.linalg.norm(x - px) <= best + 1e-12


def test_errors():
    with pytest.raises(ValueError, match=r"radius"):
        project_spectral_norm_ball(jnp.eye(2), -1.0)
    with pytest.raises(ValueError, match=r"expects a matrix"):
        project_spectral_norm_ball(jnp.ones(3), 1.0)
