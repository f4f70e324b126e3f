"""Helpers shared by the benchmark scripts (`bench_solvers.py`, `bench_deq.py`, `bench_memory.py`).

The DEQ test problem (`make_parameters`, `make_problem`), its float64 reference
(`reference_fixed_point`, `jacobian_spectral_radius`), the timing helpers
(`time_round_robin`, `time_pairs`), the machine description (`machine_info`) and the
rewriting of a generated section of `BENCHMARKS.md` (`update_markdown_section`).

Not a module of fpx: the scripts put this folder on `sys.path` and import it as `_common`.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optimistix as optx  # noqa: E402

import fpx  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
MD_PATH = ROOT / "BENCHMARKS.md"


# --------------------------------------------------------------------------- problem


def make_parameters(
    width: int, batch: int, gamma: float, seed: int, kind: str = "orthogonal", input_scale: float = 0.2
):
    """`W`, `U`, the inputs `x` (one row per batch member) and `b` (float64, numpy).

    `kind="orthogonal"`: `W = gamma * Q`, `Q` Haar-orthogonal, so the eigenvalues of `W`
    lie on the circle of radius `gamma`. `kind="symmetric"`: `W = gamma * Q diag(lam) Q^T`
    with `lam` uniform in [0, 1] and `max(lam) = 1`, so the eigenvalues are real, in
    [0, gamma]. The same seed gives the same `Q`, `U`, `x`, `b` for every `gamma` and kind.
    The entries of `U x` are ~ N(0, input_scale^2), those of `b` ~ N(0, (input_scale / 10)^2).
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((width, width))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
    lam = rng.uniform(0.0, 1.0, width)
    lam[np.argmax(lam)] = 1.0
    if kind == "orthogonal":
        w = gamma * q
    elif kind == "symmetric":
        w = gamma * (q * lam) @ q.T
    else:
        raise ValueError(kind)
    d_in = width
    u = rng.standard_normal((width, d_in)) * (input_scale / np.sqrt(d_in))  # (U x)_i ~ N(0, scale^2)
    x = rng.standard_normal((batch, d_in))
    b = 0.1 * input_scale * rng.standard_normal(width)
    return w, u, x, b


def make_problem(
    width: int, batch: int, gamma: float, seed: int, kind: str = "orthogonal", input_scale: float = 0.2
):
    """`W` and the per-sample input injection `c = U x + b` (float64, numpy).

    `kind="orthogonal"` (the benchmark): `W = gamma * Q`, `Q` Haar-orthogonal, so the
    eigenvalues of `W` lie on the circle of radius `gamma`. `kind="symmetric"` (the
    supplementary problem): `W = gamma * Q diag(lam) Q^T` with `lam` uniform in [0, 1] and
    `max(lam) = 1`, so the eigenvalues are real, in [0, gamma]. The same seed gives the
    same `Q`, `U`, `x`, `b` for every `gamma` and kind. The entries of `U x` are
    ~ N(0, input_scale^2), those of `b` ~ N(0, (input_scale / 10)^2).
    """
    w, u, x, b = make_parameters(width, batch, gamma, seed, kind, input_scale)
    c = x @ u.T + b
    return w, c


def reference_fixed_point(w: np.ndarray, c: np.ndarray, max_iter: int = 100):
    """Float64 Newton on `F(z) = z - tanh(W z + c)`, all batch members at once, with a
    residual-decrease backtracking safeguard. Returns `z*` and the max relative residual."""
    batch, width = c.shape
    eye = np.eye(width)

    def residual(z):
        return z - np.tanh(z @ w.T + c)

    z = np.zeros_like(c)
    f = residual(z)
    for _ in range(max_iter):
        rel = np.linalg.norm(f, axis=1) / np.maximum(np.linalg.norm(z, axis=1), 1e-300)
        if np.all(rel < 1e-14):
            break
        s = 1.0 - np.tanh(z @ w.T + c) ** 2
        jac = eye[None] - s[:, :, None] * w[None]
        dz = np.linalg.solve(jac, -f[..., None])[..., 0]
        t = np.ones((batch, 1))
        for _ in range(30):
            f_new = residual(z + t * dz)
            worse = np.linalg.norm(f_new, axis=1) > np.linalg.norm(f, axis=1)
            if not np.any(worse):
                break
            t = np.where(worse[:, None], 0.5 * t, t)
        z = z + t * dz
        f = residual(z)
    rel = np.linalg.norm(f, axis=1) / np.linalg.norm(z, axis=1)
    return z, float(rel.max())


def jacobian_spectral_radius(w: np.ndarray, c: np.ndarray, z: np.ndarray, count: int):
    """Spectral radius of `T'(z*) = diag(1 - tanh^2) W` for the first `count` members."""
    radii = []
    for i in range(min(count, c.shape[0])):
        s = 1.0 - np.tanh(w @ z[i] + c[i]) ** 2
        radii.append(float(np.max(np.abs(np.linalg.eigvals(s[:, None] * w)))))
    return radii


def two_norm(v):
    # What `optx.two_norm` (= `fpx.two_norm`) computes for a single array.
    return jnp.sqrt(jnp.sum(v * v))


# --------------------------------------------------------------------------- timing


def time_round_robin(thunks: dict[str, Callable[[], object]], repeats: int):
    """Median wall time of warm calls, the candidates interleaved round-robin.

    The first call of each thunk (tracing + compilation + one run) is timed separately and
    excluded. Returns `{name: {"median_s", "min_s", "times_s", "first_call_s"}}` and the
    outputs of the first call.
    """
    outputs, first = {}, {}
    for name, thunk in thunks.items():
        t0 = time.perf_counter()
        outputs[name] = jax.block_until_ready(thunk())
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in thunks}
    names = list(thunks)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the start
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(thunks[name]())
            times[name].append(time.perf_counter() - t0)
    timing = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "times_s": ts,
            "first_call_s": first[name],
        }
        for name, ts in times.items()
    }
    return timing, outputs


def time_pairs(a: Callable[[], object], b: Callable[[], object], pairs: int):
    """Ratios `time(b) / time(a)` of back-to-back calls, alternating which goes first.

    Both thunks must be warm. Pairing cancels the slow drifts of a shared machine that a
    ratio of two separately taken medians picks up.
    """
    ratios, ta, tb = [], [], []
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        spent = {}
        for thunk in order:
            t0 = time.perf_counter()
            jax.block_until_ready(thunk())
            spent[thunk] = time.perf_counter() - t0
        ta.append(spent[a])
        tb.append(spent[b])
        ratios.append(spent[b] / spent[a])
    return {
        "pairs": pairs,
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "median_a_s": statistics.median(ta),
        "median_b_s": statistics.median(tb),
    }


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def git(*cmd):
        try:
            out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "fpx")
    return {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "fpx_uncommitted_changes": None if status is None else bool(status),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "optimistix": optx.__version__ if hasattr(optx, "__version__") else version("optimistix"),
        "equinox": version("equinox"),
        "fpx": fpx.__version__,
        "numpy": np.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _f(x, digits=1):
    return f"{x:.{digits}f}"


def _e(x):
    return f"{x:.1e}"


def update_markdown_section(section: str, begin: str, end: str, heading: str, path: Path = MD_PATH) -> None:
    """Replace the text between the markers `begin` and `end` of `path` by `section`.

    Without the markers the block is appended under `heading` (a `## ...` line).
    """
    block = f"{begin}\n{section}{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n")
        return
    path.write_text(f"# Benchmarks\n\n{heading}\n\n" + block + "\n")


def add_common_arguments(parser) -> None:
    """The options every DEQ-cell benchmark takes (problem, tolerances, outputs)."""
    import argparse

    parser.add_argument("--quick", action="store_true", help="smaller problem (width 128, batch 32), 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed warm calls per candidate (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-scale", type=float, default=0.2, help="std of the entries of U x (b: a tenth of it)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument(
        "--update-md",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the generated section of BENCHMARKS.md (default: on for the full run, off with --quick)",
    )


def common_config(opts, quick: dict, full: dict, name: str, **extra) -> tuple[dict, Path, bool]:
    """(config, JSON output path, whether to update BENCHMARKS.md) from the common options."""
    cfg = dict(quick if opts.quick else full)
    if opts.repeats is not None:
        cfg["repeats"] = opts.repeats
    cfg.update(
        quick=opts.quick,
        seed=opts.seed,
        input_scale=opts.input_scale,
        rtol=opts.rtol,
        atol=opts.atol,
        max_steps=opts.max_steps,
        dtype="float32",
        gammas=list(cfg["gammas"]),
        **extra,
    )
    out_path = opts.out or RESULTS_DIR / (f"{name}_quick.json" if opts.quick else f"{name}.json")
    update_md = (not opts.quick) if opts.update_md is None else opts.update_md
    return cfg, out_path, update_md
