"""fpx.data: deterministic generators, the on-disk cache, and the physics of the solvers."""

import os

import jax
import numpy as np
import pytest

import fpx.data
from fpx.data import _burgers, _cache, _darcy, _deeponet
from fpx.data._grf import grf1_periodic

# The value at the centre of the solution of -Laplace(u) = 1 on the unit square, u = 0 on the
# boundary: sum over odd m, n of 16 (-1)^((m+n)/2 - 1) / (pi^4 m n (m^2 + n^2)) (checked
# against the series to 8000 terms and Richardson-extrapolated finite differences).
POISSON_CENTRE = 0.0736713533


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Every test caches into its own temporary directory."""
    monkeypatch.setenv("FPX_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rel_l2(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_same(x, y):
    for a, b in zip(x, y, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_writes_once_and_reads_back(data_dir, monkeypatch):
    d1 = fpx.data.antiderivative(3, m=10)
    files = sorted(data_dir.iterdir())
    assert [f.suffix for f in files] == [".npz"] and files[0].name.startswith("antiderivative-")
    # A second call must not generate: make generation fail.
    monkeypatch.setattr(_deeponet, "grf_rbf", lambda *a: pytest.fail("regenerated a cached data set"))
    d2 = fpx.data.antiderivative(3, m=10)
    assert_same(d1, d2)
    assert isinstance(d2, fpx.data.DeepONetData) and d2.u.dtype == np.float32


def test_cache_key_covers_every_argument(data_dir):
    fpx.data.antiderivative(2, m=10)
    fpx.data.antiderivative(2, m=10, seed=1)
    fpx.data.antiderivative(2, m=10, length_scale=0.3)
    fpx.data.antiderivative(2, m=10, num_points=5)
    fpx.data.antiderivative(2, m=10)  # the same call again: no new file
    assert len(list(data_dir.iterdir())) == 4
    # ints and floats that are equal give the same key
    fpx.data.value_iteration_mdps(1, gamma=0.5)
    fpx.data.value_iteration_mdps(1, gamma=0.50)
    assert len(list(data_dir.glob("value_iteration_mdps-*.npz"))) == 1


def test_cache_false_writes_nothing(data_dir):
    fpx.data.csbm(20, cache=False)
    assert not data_dir.exists() or not any(data_dir.iterdir())


def test_corrupt_cache_file_is_regenerated(data_dir):
    a = fpx.data.csbm(30, avg_degree=3.0)
    (path,) = data_dir.iterdir()
    path.write_bytes(b"not a zip file")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        b = fpx.data.csbm(30, avg_degree=3.0)
    assert_same(a, b)
    assert_same(a, fpx.data.csbm(30, avg_degree=3.0))  # rewritten: reads cleanly now
    # A truncated file, as left by a crash of a non-atomic writer, is also regenerated.
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert_same(a, fpx.data.csbm(30, avg_degree=3.0))
    assert [p.name for p in data_dir.iterdir()] == [path.name]  # no temporary files left


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FPX_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fpx.data.data_dir() == tmp_path / ".cache" / "fpx"
    fpx.data.antiderivative(1, m=4)
    assert len(list((tmp_path / ".cache" / "fpx").glob("antiderivative-*.npz"))) == 1


def test_unwritable_cache_still_returns_data(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FPX_DATA_DIR", str(blocker / "sub"))  # mkdir fails: a file is in the way
    d = fpx.data.antiderivative(2, m=5)
    assert d.sensors.shape == (2, 5)
    assert "could not write the cache file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Burgers


def test_burgers_shapes_and_determinism():
    kw = dict(s=32, solve_s=64, steps=100, t_final=0.1)
    u0, uT = fpx.data.burgers(3, **kw)
    assert u0.shape == uT.shape == (3, 32) and u0.dtype == uT.dtype == np.float32
    assert np.isfinite(uT).all() and not np.allclose(u0, uT)
    assert_same((u0, uT), fpx.data.burgers(3, cache=False, **kw))
    v0, vT = fpx.data.burgers(3, seed=1, cache=False, **kw)
    assert not np.allclose(u0, v0) and not np.allclose(uT, vT)
    # The first samples do not depend on n (one random stream; chunks are padded to one shape).
    w0, wT = fpx.data.burgers(2, cache=False, **kw)
    np.testing.assert_array_equal(w0, u0[:2])
    np.testing.assert_allclose(wT, uT[:2], rtol=0, atol=1e-6)


def test_burgers_initial_condition_statistics():
    # GRF1 of the FNO script: mode k has cosine/sine std sqrt(2) 49 ((2 pi k)^2 + 49)^(-5/4).
    coef = grf1_periodic(np.random.default_rng(0), 4000, 64, 2.5, 7.0, 49.0)
    k = np.arange(1, 32)
    std = np.sqrt(2) * 49 * ((2 * np.pi * k) ** 2 + 49) ** -1.25
    cos_part = 2 * coef[:, 1:32].real / 64  # alpha_k
    np.testing.assert_allclose(cos_part.std(0)[:5], std[:5], rtol=0.05)
    u = np.fft.irfft(coef, n=64)
    np.testing.assert_allclose(u.std(), np.sqrt((std**2).sum()), rtol=0.02)  # ~0.27
    np.testing.assert_allclose(coef[:, 0], 0)  # mean zero


def test_burgers_subsampling_is_striding():
    kw = dict(t_final=0.05, steps=200)  # the production dt = 1/4000 at solve_s = 1024
    fine = fpx.data.burgers(2, s=1024, **kw)
    coarse = fpx.data.burgers(2, s=256, **kw)
    for f, c in zip(fine, coarse, strict=True):
        np.testing.assert_array_equal(f[:, ::4], c)


def _production_ic(n, mean=0.0):
    coef = grf1_periodic(np.random.default_rng(7), n, 1024, 2.5, 7.0, 49.0)
    coef[:, 0] = 1024 * mean
    return coef


def test_burgers_solver_conserves_mean_and_dissipates_energy():
    u0_hat = _production_ic(2, mean=0.3)
    u0 = np.fft.irfft(u0_hat, n=1024)
    uT = _burgers._solve_chunks(u0_hat, 1e-3, 1.0, 4000, 1024, np.float32, False)
    np.testing.assert_allclose(uT.mean(1), 0.3, rtol=1e-6)
    energy = lambda u: ((u - u.mean(1, keepdims=True)) ** 2).sum(1)
    assert (energy(uT) < energy(u0)).all()


def test_burgers_time_step_convergence_at_production_settings():
    """solve_s = 1024, dt = 1/4000 to T = 1 against dt/2 and against a float64 run.

    float64: the time-discretisation error is ~4e-10; float32 with compensated summation
    is ~1e-7 from float64 (without it, rounding the ~1e-8 per-step decay of the slow modes
    left errors ~1e-4 that grew with the number of steps).
    """
    u0_hat = _production_ic(2)
    u32 = _burgers._solve_chunks(u0_hat, 1e-3, 1.0, 4000, 1024, np.float32, False)
    half32 = _burgers._solve_chunks(u0_hat, 1e-3, 1.0, 8000, 1024, np.float32, False)
    u64 = _burgers._solve_chunks(u0_hat, 1e-3, 1.0, 4000, 1024, np.float64, False)
    half64 = _burgers._solve_chunks(u0_hat, 1e-3, 1.0, 8000, 1024, np.float64, False)
    assert rel_l2(u64, half64).max() < 1e-8
    assert rel_l2(u32, half32).max() < 1e-5
    assert rel_l2(u32, half64).max() < 1e-5


def test_burgers_nu_0_1_decays_to_one_mode():
    """The reason for nu = 1e-3: at the paper's nu = 0.1, uT is a single small sine."""
    u0, uT = fpx.data.burgers(8, s=64, nu=0.1, solve_s=128, steps=1000, cache=False)
    energy = np.abs(np.fft.rfft(uT)) ** 2
    assert (energy[:, 1] / energy[:, 1:].sum(1) > 0.9999).all()
    assert (np.linalg.norm(uT, axis=1) < 0.03 * np.linalg.norm(u0, axis=1)).all()
    _, uT3 = fpx.data.burgers(8, s=64, nu=1e-3, solve_s=128, steps=1000, t_final=0.25, cache=False)
    energy = np.abs(np.fft.rfft(uT3)) ** 2
    assert (energy[:, 1] / energy[:, 1:].sum(1) < 0.99).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "`n` must be a positive integer, got 0"),
        (dict(n=2.5), "`n` must be a positive integer"),
        (dict(n=1, s=100), "`s` must be a power of two"),
        (dict(n=1, s=2048), "`s` must divide `solve_s` = 1024"),
        (dict(n=1, nu=0.0), "`nu` must be a finite number > 0, got 0.0"),
        (dict(n=1, nu=-1e-3), "`nu` must be a finite number > 0"),
        (dict(n=1, solve_s=1000), "`solve_s` must be a power of two >= 16, got 1000"),
        (dict(n=1, steps=0), "`steps` must be a positive integer"),
        (dict(n=1, t_final=float("inf")), "`t_final`"),
        (dict(n=1, seed=-1), "`seed` must be a non-negative integer"),
    ],
)
def test_burgers_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpx.data.burgers(**kwargs, cache=False)


def test_burgers_and_darcy_under_strict_dtype_promotion():
    # Every mixed-dtype operation is cast explicitly: strict promotion gives the same arrays, bit for bit.
    kw = dict(s=32, solve_s=64, steps=50, t_final=0.1, cache=False)
    standard = fpx.data.burgers(2, **kw), fpx.data.darcy(2, s=9, cache=False)
    u0_hat = grf1_periodic(np.random.default_rng(3), 2, 64, 2.5, 7.0, 49.0)
    standard64 = _burgers._solve_chunks(u0_hat, 1e-3, 0.1, 50, 64, np.float64, False)
    with jax.numpy_dtype_promotion("strict"):
        strict = fpx.data.burgers(2, **kw), fpx.data.darcy(2, s=9, cache=False)
        strict64 = _burgers._solve_chunks(u0_hat, 1e-3, 0.1, 50, 64, np.float64, False)
    for a, b in zip(standard, strict, strict=True):
        assert_same(a, b)
    np.testing.assert_array_equal(standard64, strict64)
    assert strict[0][1].dtype == np.float32 and strict64.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# Darcy


def test_darcy_samples():
    a, u = fpx.data.darcy(4, s=21)
    assert a.shape == u.shape == (4, 21, 21) and a.dtype == u.dtype == np.float32
    assert set(np.unique(a)) == {3.0, 12.0}
    for edge in (u[:, 0], u[:, -1], u[:, :, 0], u[:, :, -1]):
        assert (edge == 0).all()
    assert (u[:, 1:-1, 1:-1] > 0).all()
    # between the solutions for constant a = 12 and a = 3 (comparison principle)
    assert (u.max(axis=(1, 2)) < POISSON_CENTRE / 3).all() and (u.max(axis=(1, 2)) > POISSON_CENTRE / 12).all()
    assert_same((a, u), fpx.data.darcy(4, s=21, cache=False))
    b, _ = fpx.data.darcy(4, s=21, seed=1, cache=False)
    assert not np.array_equal(a, b)
    assert_same((a[:2], u[:2]), fpx.data.darcy(2, s=21, cache=False))
    # both phases are common: the threshold sits at the GRF's zero mean
    frac = (fpx.data.darcy(32, s=21, cache=False)[0] == 12).mean()
    assert 0.3 < frac < 0.7


def test_darcy_discrete_residual():
    a, u = fpx.data.darcy(2, s=25, seed=3, cache=False)
    for ak, uk in zip(a, u, strict=True):
        matrix = _darcy.darcy_matrix(ak.astype(np.float64))
        assert abs(matrix - matrix.T).max() == 0
        exact = _darcy.solve_darcy(ak.astype(np.float64))
        residual = matrix @ exact[1:-1, 1:-1].ravel() - 1.0
        assert np.abs(residual).max() < 1e-10
        np.testing.assert_allclose(uk, exact, rtol=1e-6, atol=1e-9)


def test_darcy_constant_coefficient_is_poisson():
    errors = []
    for s in (17, 33, 65):
        u = _darcy.solve_darcy(np.full((s, s), 2.0))
        np.testing.assert_allclose(u, u.T, atol=1e-15)
        np.testing.assert_allclose(u, u[::-1], atol=1e-15)
        c = s // 2
        assert u.max() == u[c, c]
        errors.append(abs(2 * u[c, c] - POISSON_CENTRE) / POISSON_CENTRE)
    assert errors[-1] < 3e-4
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(ratios, 4.0, rtol=0.05)  # second order


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=-1), "`n` must be a positive integer, got -1"),
        (dict(n=1, s=2), "`s` must be >= 3"),
        (dict(n=1, alpha=0), "`alpha` must be a finite number > 0"),
        (dict(n=1, tau=-3.0), "`tau`"),
    ],
)
def test_darcy_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpx.data.darcy(**kwargs, cache=False)


# ---------------------------------------------------------------------------------------------
# DeepONet


def test_antiderivative_layout_and_determinism():
    d = fpx.data.antiderivative(5, m=40, num_points=30)
    assert d.x.shape == (40,) and d.sensors.shape == (5, 40) and d.y.shape == (30,) and d.u.shape == (5, 30)
    np.testing.assert_allclose(d.x, np.linspace(0, 1, 40), atol=1e-7)
    assert_same(d, fpx.data.antiderivative(5, m=40, num_points=30, cache=False))
    assert not np.allclose(d.sensors, fpx.data.antiderivative(5, m=40, num_points=30, seed=1, cache=False).sensors)
    assert_same(d.sensors[:2], fpx.data.antiderivative(2, m=40, num_points=30, cache=False).sensors)
    # RBF field: unit variance, smooth
    big = fpx.data.antiderivative(400, cache=False)
    np.testing.assert_allclose(big.sensors.var(), 1.0, atol=0.15)
    # cumulative trapezoid on the sensors (num_points = m: the same points) agrees
    h = big.x[1] - big.x[0]
    trap = np.concatenate([np.zeros((400, 1)), np.cumsum(h * (big.sensors[:, 1:] + big.sensors[:, :-1]) / 2, 1)], 1)
    np.testing.assert_allclose(trap, big.u, atol=5e-4)


def test_deeponet_targets_are_exact_for_known_functions(monkeypatch):
    """Replace the random field by known functions: the targets are their exact integrals."""

    def fake(rng, n, resolution, length_scale):
        x = np.linspace(0, 1, resolution)
        return np.stack([np.sin(2 * np.pi * x) + x**2, np.pi**2 * np.sin(np.pi * x)])

    monkeypatch.setattr(_deeponet, "grf_rbf", fake)
    d = fpx.data.antiderivative(2, m=11, num_points=57, cache=False)
    y = d.y.astype(np.float64)
    np.testing.assert_allclose(d.u[0], (1 - np.cos(2 * np.pi * y)) / (2 * np.pi) + y**3 / 3, atol=1e-6)
    np.testing.assert_allclose(d.u[1], np.pi * (1 - np.cos(np.pi * y)), atol=1e-6)
    np.testing.assert_allclose(d.sensors[0], np.sin(2 * np.pi * d.x) + d.x**2, atol=1e-6)
    p = fpx.data.poisson1d(2, m=11, num_points=57, cache=False)
    np.testing.assert_allclose(p.u[1], np.sin(np.pi * y), atol=1e-6)  # -u'' = pi^2 sin(pi y)


def test_poisson1d():
    p = fpx.data.poisson1d(3, m=20, num_points=201)
    np.testing.assert_allclose(p.u[:, [0, -1]], 0.0, atol=1e-7)
    a = fpx.data.antiderivative(3, m=20, num_points=201)
    np.testing.assert_array_equal(p.sensors, a.sensors)  # same input functions
    # u = y F(1) - F with F'' = f, so -u' = F' - F(1) = A - int_0^1 A for the antiderivative A
    h = np.float64(p.y[1] - p.y[0])
    du = (p.u[:, 2:].astype(np.float64) - p.u[:, :-2]) / (2 * h)
    mean_a = np.trapezoid(a.u, dx=h, axis=1)[:, None]
    np.testing.assert_allclose(-du, a.u[:, 1:-1] - mean_a, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "`n` must be a positive integer"),
        (dict(n=1, m=1), "`m` .* must be >= 2, got 1"),
        (dict(n=1, length_scale=0.0), "`length_scale` must be a finite number > 0"),
        (dict(n=1, num_points=0), "`num_points` must be a positive integer"),
        (dict(n=1, resolution=3), "`resolution` must be >= 4"),
    ],
)
def test_deeponet_bad_arguments(kwargs, match):
    for fn in (fpx.data.antiderivative, fpx.data.poisson1d):
        with pytest.raises(ValueError, match=match):
            fn(**kwargs, cache=False)


# ---------------------------------------------------------------------------------------------
# value-iteration MDPs


def test_value_iteration_mdps():
    mdp = fpx.data.value_iteration_mdps(16, seed=2)
    assert mdp.transitions.shape == (16, 49, 9, 49) and mdp.rewards.shape == (16, 49, 9)
    assert mdp.values.dtype == np.float64 and mdp.state_mask.dtype == bool
    assert ((20 <= mdp.num_states) & (mdp.num_states < 50)).all()
    assert ((5 <= mdp.num_actions) & (mdp.num_actions < 10)).all()
    np.testing.assert_array_equal(mdp.state_mask.sum(1), mdp.num_states)
    np.testing.assert_array_equal(mdp.action_mask.sum(1), mdp.num_actions)
    valid = mdp.state_mask[:, :, None] & mdp.action_mask[:, None, :]
    np.testing.assert_allclose(mdp.transitions.sum(-1), valid, atol=1e-12)
    padded_target = np.broadcast_to(~mdp.state_mask[:, None, None, :], mdp.transitions.shape)
    assert (mdp.transitions[padded_target] == 0).all()
    assert (np.abs(mdp.rewards) <= 1).all() and (mdp.rewards[~valid] == 0).all()
    assert (mdp.values[~mdp.state_mask] == 0).all()
    v, q = fpx.data.bellman(mdp.transitions, mdp.rewards, mdp.action_mask, mdp.state_mask, mdp.values, mdp.gamma)
    assert np.abs(v - mdp.values).max() < 1e-10
    # the greedy policy's exact value (a linear solve) is the optimal value
    for b in range(3):
        k, pi = mdp.num_states[b], mdp.policy[b, : mdp.num_states[b]]
        P = mdp.transitions[b, np.arange(k), pi, :k]
        r = mdp.rewards[b, np.arange(k), pi]
        exact = np.linalg.solve(np.eye(k) - mdp.gamma * P, r)
        np.testing.assert_allclose(mdp.values[b, :k], exact, atol=1e-9)
    assert_same(mdp[:-1], fpx.data.value_iteration_mdps(16, seed=2, cache=False)[:-1])
    small = fpx.data.value_iteration_mdps(3, seed=2, cache=False)
    np.testing.assert_array_equal(small.transitions, mdp.transitions[:3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "`n` must be a positive integer"),
        (dict(n=1, states=(50, 20)), r"`states` must be a pair \(lo, hi\)"),
        (dict(n=1, actions=(0, 3)), "`actions` must be a pair"),
        (dict(n=1, gamma=1.0), r"`gamma` must lie in the open interval \(0, 1\), got 1.0"),
    ],
)
def test_mdp_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpx.data.value_iteration_mdps(**kwargs, cache=False)


# ---------------------------------------------------------------------------------------------
# CSBM


@pytest.mark.parametrize("classes, homophily", [(2, 0.8), (3, 0.2)])
def test_csbm(classes, homophily):
    n, deg = 3000, 10.0
    g = fpx.data.csbm(n, seed=1, classes=classes, features=8, avg_degree=deg, homophily=homophily, signal=2.0)
    assert g.features.shape == (n, 8) and g.features.dtype == np.float32
    assert g.labels.shape == (n,) and g.senders.dtype == g.receivers.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(g.labels), [n // classes] * classes)
    edges = set(zip(g.senders.tolist(), g.receivers.tolist(), strict=True))
    assert len(edges) == len(g.senders)  # no duplicates
    assert edges == {(j, i) for i, j in edges}  # symmetric
    assert (g.senders != g.receivers).all()
    assert (np.diff(g.senders) >= 0).all()
    assert abs(len(g.senders) / n - deg) < 0.05 * deg
    same = (g.labels[g.senders] == g.labels[g.receivers]).mean()
    assert abs(same - homophily) < 0.03
    means = np.stack([g.features[g.labels == c].mean(0) for c in range(classes)])
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 2.0, atol=0.15)
    assert_same(g, fpx.data.csbm(n, seed=1, classes=classes, features=8, avg_degree=deg, homophily=homophily,
                                 signal=2.0, cache=False))
    other = fpx.data.csbm(n, seed=2, classes=classes, features=8, avg_degree=deg, homophily=homophily, cache=False)
    assert not np.array_equal(other.labels, g.labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_nodes=0), "`n_nodes` must be a positive integer"),
        (dict(n_nodes=10, classes=1), "`classes` must be >= 2"),
        (dict(n_nodes=10, homophily=1.5), r"`homophily` must lie in \[0, 1\], got 1.5"),
        (dict(n_nodes=10, classes=4, features=3), "`features` must be >= `classes` = 4"),
        (dict(n_nodes=10, avg_degree=50.0), "lower `avg_degree`"),
        (dict(n_nodes=10, signal=-1.0), "`signal` must be a finite number >= 0"),
    ],
)
def test_csbm_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpx.data.csbm(**kwargs, cache=False)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits():
    x_train, y_train, x_test, y_test = fpx.data.digits(seed=0)
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert x_train.dtype == x_test.dtype == np.float32
    # stratified: class proportions agree to one sample
    assert np.abs(np.bincount(y_test) - np.bincount(y_train) * 360 / 1437).max() <= 1.0
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-5)
    std = x_train.std(0)
    np.testing.assert_allclose(std[std > 0], 1, atol=1e-4)  # constant pixels keep scale 1 (stay 0)
    assert np.isfinite(x_test).all()
    raw = fpx.data.digits(seed=0, standardize=False)
    assert raw[0].min() == 0 and raw[0].max() == 16
    np.testing.assert_array_equal(raw[1], y_train)
    assert not np.array_equal(fpx.data.digits(seed=1)[1], y_train)
    assert fpx.data.digits(test_size=0.5)[2].shape == (899, 64)
    with pytest.raises(ValueError, match=r"`test_size` must be a fraction in the open interval \(0, 1\), got 1.5"):
        fpx.data.digits(test_size=1.5)


def test_no_progress_bar_for_small_runs(capsys):
    fpx.data.burgers(1, s=16, solve_s=16, steps=10, cache=False)
    fpx.data.darcy(1, s=5, cache=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_when_asked(capsys):
    fpx.data.darcy(2, s=5, cache=False, progress=True)
    assert "fpx.data.darcy" in capsys.readouterr().err


def test_cache_path_is_stable():
    """The file name is a pure function of the arguments and the format version."""
    a = _cache.cache_path("burgers", dict(n=1, s=2))
    b = _cache.cache_path("burgers", dict(s=2, n=1))
    assert a == b and a.parent == fpx.data.data_dir() and a.name.startswith("burgers-")
    assert os.path.basename(a) != os.path.basename(_cache.cache_path("burgers", dict(n=2, s=2)))
