"""Strict JAX for the whole suite.

- float64 is enabled so known-answer tests can assert exact figures; float32 behaviour is
  tested by passing float32 arrays explicitly.
- implicit rank promotion raises, so broadcasting bugs cannot hide.
- warnings are errors (pyproject `filterwarnings = ["error"]`).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")
