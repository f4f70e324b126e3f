"""sklearn's 8x8 digits, split and standardised."""

from __future__ import annotations

import numbers

import numpy as np
from jaxtyping import Float, Int


def digits(
    seed: int = 0, test_size: float = 0.2, standardize: bool = True
) -> tuple[Float[np.ndarray, "n 64"], Int[np.ndarray, " n"], Float[np.ndarray, "m 64"], Int[np.ndarray, " m"]]:
    r"""sklearn's handwritten digits (1797 images of 8x8 pixels, 10 classes), split for training.

    `sklearn.datasets.load_digits` ships with scikit-learn (no download). The split is
    stratified, `train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)`;
    with `standardize` every pixel is centred and scaled by the *training* mean and standard
    deviation, and pixels that are constant on the training split keep scale 1 (as
    `StandardScaler` does: dividing by ~0 would blow up test images that differ there).
    Not cached (it takes milliseconds).

    **Returns:** `(x_train, y_train, x_test, y_test)`: images float32 `(n, 64)` (pixel values
    0..16 when not standardised), labels int64 `(n,)`.

    ```python
    import numpy as np
    import fpx.data

    x_train, y_train, x_test, y_test = fpx.data.digits(seed=0)
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64) and x_train.dtype == np.float32
    assert np.allclose(x_train.mean(0), 0, atol=1e-5) and set(np.unique(y_test)) == set(range(10))
    ```
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"fpx.data.digits: `seed` must be a non-negative integer, got {seed!r}.")
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real) or not 0 < test_size < 1:
        raise ValueError(f"fpx.data.digits: `test_size` must be a fraction in the open interval (0, 1), got {test_size!r}.")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=float(test_size), stratify=y, random_state=int(seed)
    )
    if standardize:
        mean, std = x_train.mean(0), x_train.std(0)
        std = np.where(std > 1e-8, std, 1.0)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return x_train, y_train, x_test, y_test
