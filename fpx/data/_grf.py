"""Gaussian random fields used by the operator-learning data sets (NumPy, float64).

- `grf1_periodic`: the FNO Burgers initial conditions (`GRF1.m` of Li et al. 2020,
  `data_generation/burgers` in the neuraloperator repository): on [0, 1) periodic,
  covariance `sigma^2 (-Delta + tau^2 I)^(-gamma)`, Karhunen-Loeve expansion
  `u(x) = sum_{k=1}^{N} alpha_k cos(2 pi k x) + beta_k sin(2 pi k x)` with independent
  `alpha_k, beta_k ~ N(0, lambda_k^2)`, `lambda_k = sqrt(2) sigma ((2 pi k)^2 + tau^2)^(-gamma/2)`,
  `N = s/2` modes, mean zero. (GRF1.m evaluates the same series through chebfun with a
  half-period shift, which flips the sign of the odd modes: the same distribution.)
- `grf2_cosine`: the FNO Darcy field (`GRF.m`): on [0, 1]^2 with zero-Neumann Laplacian,
  cosine KL coefficients `s tau^(alpha-1) (pi^2 (k1^2 + k2^2) + tau^2)^(-alpha/2) xi`, the
  constant mode removed, transformed with an orthonormal 2-D inverse DCT-II (MATLAB `idct2`).
- `grf_rbf`: the DeepONet field (Lu et al. 2021): zero mean, kernel
  `exp(-(x - x')^2 / (2 l^2))` on a uniform grid of [0, 1], sampled with a Cholesky factor.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft
import scipy.linalg


def grf1_periodic(rng: np.random.Generator, n: int, s: int, gamma: float, tau: float, sigma: float) -> np.ndarray:
    """`n` samples on the grid `x_j = j / s`, as rfft coefficients of shape `(n, s//2 + 1)`."""
    modes = s // 2
    k = np.arange(1, modes + 1, dtype=np.float64)
    lam = np.sqrt(2.0) * sigma * ((2 * np.pi * k) ** 2 + tau**2) ** (-gamma / 2)
    xi = rng.standard_normal((n, 2, modes))
    alpha, beta = lam * xi[:, 0], lam * xi[:, 1]
    coef = np.zeros((n, modes + 1), np.complex128)
    # u_j = sum_k alpha_k cos(2 pi k j/s) + beta_k sin(2 pi k j/s) in numpy's irfft normalisation;
    # at the Nyquist mode k = s/2 the sine vanishes on the grid and the cosine is (-1)^j.
    coef[:, 1:modes] = 0.5 * s * (alpha[:, :-1] - 1j * beta[:, :-1])
    coef[:, modes] = s * alpha[:, -1]
    return coef


def grf2_cosine(rng: np.random.Generator, n: int, s: int, alpha: float, tau: float) -> np.ndarray:
    """`n` samples of shape `(s, s)`."""
    k1, k2 = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    coef = tau ** (alpha - 1) * (np.pi**2 * (k1**2 + k2**2) + tau**2) ** (-alpha / 2)
    xi = rng.standard_normal((n, s, s))
    spectrum = s * coef * xi
    spectrum[:, 0, 0] = 0.0
    return scipy.fft.idctn(spectrum, type=2, norm="ortho", axes=(1, 2))


@functools.lru_cache(maxsize=8)
def _rbf_factor(resolution: int, length_scale: float) -> np.ndarray:
    x = np.linspace(0.0, 1.0, resolution)
    kernel = np.exp(-0.5 * ((x[:, None] - x[None, :]) / length_scale) ** 2)
    # The kernel matrix is numerically singular; a tiny jitter (grown until the factorisation
    # succeeds) adds white noise of standard deviation sqrt(jitter) at the grid points.
    jitter = 1e-13
    while True:
        try:
            factor = scipy.linalg.cholesky(kernel + jitter * np.eye(resolution), lower=True)
            factor.setflags(write=False)
            return factor
        except np.linalg.LinAlgError:
            jitter *= 10


def grf_rbf(rng: np.random.Generator, n: int, resolution: int, length_scale: float) -> np.ndarray:
    """`n` samples at `linspace(0, 1, resolution)`, shape `(n, resolution)`."""
    xi = rng.standard_normal((n, resolution))
    return xi @ _rbf_factor(resolution, length_scale).T
